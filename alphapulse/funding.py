"""Perpetual-futures funding: which funding events fall in an interval, at which rate.

A perpetual swap exchanges a funding payment between longs and shorts at each funding time (normally every
8 h at 00:00, 08:00 and 16:00 UTC; the exchange shortens the interval in stress, e.g. 2-hourly on SOL around
2022-11-10). Holding a position for months pays or earns several %/year of its notional, so the training
environment, the backtester and the paper broker must all charge it, the same way:

* :class:`FundingSchedule` answers :meth:`~FundingSchedule.events_between` ``(t0, t1]`` - half-open, so
  consecutive bars ``(open, close]`` never count an event twice and an event exactly at a bar's close belongs
  to that bar (the position held *during* the bar pays it);
* inside the coverage of a rate file the file's events are used as they are (no fixed step assumed);
  outside it (before the file starts, after it ends, and in holes longer than the normal 8 h step) and when
  there is no file at all, a stated default applies: :data:`DEFAULT_FUNDING_RATE` (0.01 % per 8 h, the
  exchange's base rate) at 00:00/08:00/16:00 UTC;
* the money for one event is :func:`alphapulse.costs.funding_payment` (positive rate: longs pay).

Rate files are ``timestamp,funding_rate`` gzip CSVs (``shared/data/futures/*-funding_rate.csv.gz``:
timestamp = funding time in ms UTC, rate as a fraction per funding interval). Rates are kept as ``Decimal``
parsed from the file's text, so sums are exact.
"""

from __future__ import annotations

import bisect
import csv
import gzip
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from alphapulse.costs import funding_payment

__all__ = [
    "DEFAULT_FUNDING_INTERVAL_MS",
    "DEFAULT_FUNDING_RATE",
    "FundingError",
    "FundingEvent",
    "FundingSchedule",
    "funding_file_for",
    "load_funding_events",
]

#: The exchange's base funding rate: 0.01 % per 8-hour interval (about 11 %/year of notional).
DEFAULT_FUNDING_RATE = Decimal("0.0001")
#: Default funding times: every 8 h from midnight UTC (00:00, 08:00, 16:00).
DEFAULT_FUNDING_INTERVAL_MS = 8 * 3_600_000
_MINUTE_MS = 60_000


class FundingError(Exception):
    """A funding-rate file that cannot be used (missing, malformed, unsorted); the message names the file."""


@dataclass(frozen=True, slots=True)
class FundingEvent:
    """One funding time: ``ts`` in ms UTC, ``rate`` per interval (fraction), ``source`` "file" or "default"."""

    ts: int
    rate: Decimal
    source: str = "file"


def load_funding_events(path: str | Path) -> list[FundingEvent]:
    """Read a ``timestamp,funding_rate`` file (gzip if it ends in ``.gz``), sorted by time, duplicates dropped.

    Timestamps are rounded to the minute (the raw feed carries a few ms of jitter); a duplicate time must carry
    the same rate, otherwise the file is refused.
    """
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rt", newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None or [h.strip() for h in header[:2]] != ["timestamp", "funding_rate"]:
                raise FundingError(f"{p}: expected header 'timestamp,funding_rate', got {header!r}")
            by_ts: dict[int, Decimal] = {}
            for line_no, row in enumerate(reader, start=2):
                if not row:
                    continue
                try:
                    ts = round(int(Decimal(row[0].strip())) / _MINUTE_MS) * _MINUTE_MS
                    rate = Decimal(row[1].strip())
                except (IndexError, ValueError, InvalidOperation):
                    raise FundingError(f"{p}:{line_no}: not a 'timestamp,funding_rate' row: {row!r}") from None
                if not rate.is_finite():
                    raise FundingError(f"{p}:{line_no}: funding rate is not finite: {row[1]!r}")
                if ts in by_ts and by_ts[ts] != rate:
                    raise FundingError(f"{p}:{line_no}: two different rates at {ts}: {by_ts[ts]} and {rate}")
                by_ts[ts] = rate
    except OSError as exc:
        raise FundingError(f"{p}: cannot be read ({exc.strerror or exc})") from None
    return [FundingEvent(ts, by_ts[ts]) for ts in sorted(by_ts)]


def funding_file_for(symbol: str, data_dir: str | Path) -> Path:
    """The conventional rate file of a symbol: ``BTCUSDT``/``BTC/USDT``/``BTC/USDT:USDT`` ->
    ``<data_dir>/BTC_USDT_USDT-funding_rate.csv.gz`` (whether it exists is the caller's concern)."""
    s = symbol.upper().split(":")[0].replace("/", "").replace("_", "").replace("-", "")
    if not s.endswith("USDT") or len(s) <= 4:
        raise ValueError(f"not a USDT-margined symbol: {symbol!r}")
    base = s[:-4]
    return Path(data_dir) / f"{base}_USDT_USDT-funding_rate.csv.gz"


class FundingSchedule:
    """Funding events of one perpetual: the file's events where it has coverage, a default schedule elsewhere.

    Coverage is the union of the file's *runs*: stretches of events no more than ``max_step_ms`` apart (8 h by
    default: the normal interval is the longest one the exchange uses). Between two runs, before the first and
    after the last event, default events (``default_rate`` at every multiple of ``default_interval_ms`` since
    the epoch, i.e. 00/08/16 UTC) apply. ``FundingSchedule()`` without events is the default schedule alone.
    """

    __slots__ = ("_default_interval", "_default_rate", "_events", "_runs", "_ts")

    def __init__(
        self,
        events: Iterable[FundingEvent] = (),
        *,
        default_rate: Decimal = DEFAULT_FUNDING_RATE,
        default_interval_ms: int = DEFAULT_FUNDING_INTERVAL_MS,
        max_step_ms: int = DEFAULT_FUNDING_INTERVAL_MS,
    ) -> None:
        if default_interval_ms <= 0 or max_step_ms <= 0:
            raise ValueError("default_interval_ms and max_step_ms must be positive")
        evs = sorted(events, key=lambda e: e.ts)
        for a, b in zip(evs, evs[1:], strict=False):
            if a.ts == b.ts:
                raise ValueError(f"two funding events at {a.ts}")
        self._events: tuple[FundingEvent, ...] = tuple(evs)
        self._ts: list[int] = [e.ts for e in evs]
        self._default_rate = Decimal(default_rate)
        self._default_interval = default_interval_ms
        runs: list[tuple[int, int]] = []
        for ts in self._ts:
            if runs and ts - runs[-1][1] <= max_step_ms:
                runs[-1] = (runs[-1][0], ts)
            else:
                runs.append((ts, ts))
        self._runs: tuple[tuple[int, int], ...] = tuple(runs)

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        *,
        default_rate: Decimal = DEFAULT_FUNDING_RATE,
        default_interval_ms: int = DEFAULT_FUNDING_INTERVAL_MS,
        max_step_ms: int = DEFAULT_FUNDING_INTERVAL_MS,
    ) -> FundingSchedule:
        """Load a rate file (see :func:`load_funding_events`); keywords as for the constructor."""
        return cls(load_funding_events(path), default_rate=default_rate, default_interval_ms=default_interval_ms,
                   max_step_ms=max_step_ms)

    @property
    def default_rate(self) -> Decimal:
        return self._default_rate

    @property
    def coverage(self) -> tuple[tuple[int, int], ...]:
        """The file's covered stretches ``(first_ts, last_ts)``, inclusive, in time order."""
        return self._runs

    @property
    def events(self) -> tuple[FundingEvent, ...]:
        """The file's events (default events are generated on demand, never stored)."""
        return self._events

    def covered(self, ts: int) -> bool:
        """True when ``ts`` lies inside a covered stretch (the file, not the default, decides there)."""
        i = bisect.bisect_right(self._runs, (ts, 1 << 62)) - 1
        return i >= 0 and self._runs[i][0] <= ts <= self._runs[i][1]

    def events_between(self, t0: int, t1: int) -> list[FundingEvent]:
        """Funding events with ``t0 < ts <= t1``, in time order: the file's, plus defaults outside coverage."""
        if t1 <= t0:
            return []
        lo = bisect.bisect_right(self._ts, t0)
        hi = bisect.bisect_right(self._ts, t1)
        out = list(self._events[lo:hi])
        step = self._default_interval
        first = (t0 // step + 1) * step  # the first default time strictly after t0
        if first <= t1:
            out.extend(FundingEvent(ts, self._default_rate, "default")
                       for ts in range(first, t1 + 1, step) if not self.covered(ts))
            out.sort(key=lambda e: e.ts)
        return out

    def rate_sum(self, t0: int, t1: int) -> Decimal:
        """Sum of the rates of the events in ``(t0, t1]`` (exact)."""
        return sum((e.rate for e in self.events_between(t0, t1)), Decimal(0))

    def payments(self, position_qty: Decimal, mark_price: Decimal, t0: int, t1: int
                 ) -> tuple[Decimal, list[tuple[FundingEvent, Decimal]]]:
        """What a position held over ``(t0, t1]`` pays: ``(total, [(event, payment), ...])``.

        Each event's payment is :func:`alphapulse.costs.funding_payment` at ``mark_price`` (quantised per
        event, so the total is the exact sum of the booked amounts); positive = the account pays.
        """
        booked = [(e, funding_payment(position_qty, mark_price, e.rate)) for e in self.events_between(t0, t1)]
        return sum((p for _, p in booked), Decimal(0)), booked

