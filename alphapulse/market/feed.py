"""The market-data feed interface the daemon consumes.

One protocol for historical replay and the live exchange feed, so the daemon's loop, its
restart logic and its tests do not care where candles come from.  A feed only *delivers*:
candles come out raw and in order, and the daemon validates them, so one validator owns every
reject decision and its counters whatever the source.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from alphapulse.domain import Candle


class FeedError(RuntimeError):
    """A feed cannot start or continue (missing/unreadable file, bad format, lost exchange)."""


@runtime_checkable
class Feed(Protocol):
    """Source of closed candles for one symbol and timeframe.

    Attributes: ``symbol`` (e.g. "BTCUSDT"), ``timeframe`` (e.g. "5m"), ``finished``, True once the source is
    exhausted (a replay at end of file; a live feed never finishes), and ``stalled``, True while a live stream is
    silent (its bars then come late or from polling: the risk checks take no new risk; a replay never stalls).
    """

    symbol: str
    timeframe: str
    finished: bool

    @property
    def stalled(self) -> bool:
        """True while a live stream is silent (see above)."""
        ...

    async def open(self) -> None:
        """Get ready before the daemon says READY: load or connect, and fetch the warm-up history.

        A problem the operator must fix (a missing file, a refused connection) raises :class:`FeedError`.
        """
        ...

    def candles(self) -> AsyncIterator[Candle]:
        """Raw, not yet validated candles in delivery order, each once it has closed.

        Implemented as ``async def candles(self): ... yield candle`` (an async generator); it is
        declared without ``async`` here because calling an async generator function returns
        the iterator directly rather than a coroutine.
        """
        ...

    def now_ms(self) -> int | None:
        """The feed's clock in ms UTC, or None to mean "use the candle's own close time".

        Paced replay: the simulated time; max-speed replay: None; live: wall time.  The
        daemon uses it for anything time-based (day rollover, staleness), so a replay
        exercises those paths exactly as live trading would.
        """
        ...

    def history(self, before_ts: int, n: int) -> list[Candle]:
        """The last ``n`` candles with ``ts < before_ts``, oldest first, for feature warm-up."""
        ...

    def describe(self) -> dict[str, object]:
        """JSON-able state for /health: kind, source, progress, counters."""
        ...
