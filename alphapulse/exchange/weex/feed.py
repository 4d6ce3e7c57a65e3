"""Live WEEX candle feed: closed bars, in order, once each, with gaps back-filled over REST.

The rule that decides when a bar has closed, and where its values come from (why: the daemon acts on
every delivered candle, so a bar must be final, never delivered twice, and never silently skipped):

* Bar ``B`` (open time ``ts``) is **closed** when the WebSocket shows a bar with a later open time, or
  when the server-corrected wall clock passes ``ts + bar + grace`` (so a silent or dead stream
  delays a candle by ``grace_s`` at most, never indefinitely).
* A closed bar's values are always fetched over **REST** (authoritative, final): ``klines`` for the
  usual single just-closed bar, ``historyKlines`` pages of 100 when more than one bar is pending
  (after a disconnect, a silent stream, or a restart with ``start_after_ts``).  So every bar missed
  while the stream was down is delivered, in order, *before* any later one.
* Delivery is monotonic: only bars after the last delivered one, ascending.  A bar the exchange has no
  candle for while it has later ones is a **real exchange gap**: it is passed through as a gap (the
  daemon's validator counts it).  When REST has nothing yet for the pending range (it lags the
  stream), the feed polls again with back-off; REST errors are retried the same way and counted, so a
  flaky exchange stalls the feed (visible in :meth:`WeexFeed.describe`) instead of inventing data.

Warm-up history is fetched over REST in :meth:`WeexFeed.open` and served from memory by the synchronous
:meth:`WeexFeed.history`, with delivered bars appended so it stays current.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from alphapulse.domain import Candle, timeframe_ms
from alphapulse.exchange.weex.client import HISTORY_PAGE_ROWS, WeexClient
from alphapulse.exchange.weex.errors import WeexError
from alphapulse.exchange.weex.ws import KlineStream
from alphapulse.log import get_logger
from alphapulse.market.feed import FeedError

log = get_logger(__name__)

#: How far ahead of our (server-corrected) clock a bar open time on the stream is still believed.
MAX_SKEW_MS = 30_000


class WeexFeed:
    """A :class:`~alphapulse.market.feed.Feed` of closed WEEX candles (see the module docstring for the rule).

    ``start_after_ts``: resume after this bar (the last one the daemon decided); everything after it is
    back-filled first.  Without it, the first bar delivered is the one forming when :meth:`open` ran.
    ``warmup_bars``: how many bars before the first delivered one :meth:`open` prefetches for
    :meth:`history`.  ``tick_s`` bounds every wait, so a wall-clock step or a missed wake-up costs at most
    one tick.  ``stream`` may be given (tests); by default a :class:`KlineStream` on the client's session.
    """

    kind = "weex"

    def __init__(
        self,
        client: WeexClient,
        ws_url: str,
        symbol: str,
        timeframe: str,
        *,
        start_after_ts: int | None = None,
        warmup_bars: int = 0,
        grace_s: float = 2.0,
        tick_s: float = 1.0,
        poll_initial_s: float = 0.5,
        poll_max_s: float = 10.0,
        silence_timeout_s: float = 30.0,
        stream: KlineStream | None = None,
        stream_factory: Callable[[], KlineStream] | None = None,
    ) -> None:
        self.client = client
        self.ws_url = ws_url
        self.symbol = symbol
        self.timeframe = timeframe
        self.bar_ms = timeframe_ms(timeframe)
        self.start_after_ts = start_after_ts
        self.warmup_bars = max(0, int(warmup_bars))
        self.grace_ms = int(grace_s * 1000)
        self.tick_s = tick_s
        self.poll_initial_s = poll_initial_s
        self.poll_max_s = poll_max_s
        self.silence_timeout_s = silence_timeout_s
        self.finished = False  # a live feed never finishes
        self._stream = stream
        self._stream_factory = stream_factory
        self._opened = False
        self._iterating = False
        self._next_ts: int | None = None  # open time of the first bar not yet delivered
        self._stream_latest_ts: int | None = None  # newest bar open time seen on the stream
        self._wake = asyncio.Event()
        self._history: list[Candle] = []  # warm-up plus delivered bars, ascending ts
        self._history_ts: list[int] = []
        self._history_cap = max(self.warmup_bars, 1000) * 2
        # counters for /health
        self.emitted = 0
        self.backfilled = 0  # bars delivered from a range of more than one pending bar
        self.gaps_passed = 0  # exchange gaps passed through
        self.bars_missing = 0
        self.rest_errors = 0
        self.empty_polls = 0
        self.last_error: str | None = None
        self.last_emitted_ts: int | None = None
        self._opened_mono: float | None = None
        self._market_ts: int | None = None  # newest bar open time the exchange confirmed over REST
        self.market_confirmations = 0

    # -- start-up --------------------------------------------------------------------------

    async def open(self) -> None:
        """Start the client, sync the server clock, fix the starting bar and prefetch warm-up (idempotent).

        Raises :class:`FeedError` when the exchange cannot be reached, so start-up fails loudly.
        """
        if self._opened:
            return
        try:
            await self.client.start()
            await self.client.sync_time()
            if self.start_after_ts is not None:
                self._next_ts = self.start_after_ts + self.bar_ms
            else:
                self._next_ts = self.client.now_ms() // self.bar_ms * self.bar_ms  # the bar forming now
            if self.warmup_bars:
                await self.prefetch_history(self.warmup_bars)
        except WeexError as exc:
            raise FeedError(f"WEEX feed cannot start: {exc}") from exc
        self._opened = True
        self._opened_mono = time.monotonic()

    async def prefetch_history(self, n: int) -> list[Candle]:
        """Fetch the ``n`` closed bars before the first bar to deliver (REST history, 100 a page) into memory."""
        assert self._next_ts is not None, "open() fixes the first bar before history can be fetched"
        end = self._next_ts - self.bar_ms
        start = end - (n - 1) * self.bar_ms
        rows = await self.client.history(self.symbol, self.timeframe, start, end)
        self._remember(rows)
        log.info("weex_feed_warmup", symbol=self.symbol, timeframe=self.timeframe, bars=len(rows), wanted=n)
        return rows

    def _remember(self, rows: list[Candle]) -> None:
        for c in rows:
            i = bisect.bisect_left(self._history_ts, c.ts)
            if i < len(self._history_ts) and self._history_ts[i] == c.ts:
                self._history[i] = c
            else:
                self._history_ts.insert(i, c.ts)
                self._history.insert(i, c)
        if len(self._history) > self._history_cap:
            cut = len(self._history) - self._history_cap
            del self._history[:cut]
            del self._history_ts[:cut]

    # -- Feed protocol ---------------------------------------------------------------------

    def now_ms(self) -> int:
        """Wall time corrected by the server offset, or the exchange's market time where that is later.

        On the real venue they agree.  The market can only be *ahead* of the server clock where the exchange
        replays candles faster than real time (a local ``fake-weex --speed``): then the newest bar the exchange
        itself has confirmed over REST is the better clock, so closure, staleness and the sanity bound on
        stream times all follow the market instead of refusing it.
        """
        now = self.client.now_ms()
        return now if self._market_ts is None or self._market_ts <= now else self._market_ts

    def history(self, before_ts: int, n: int) -> list[Candle]:
        """The last ``n`` bars with ``ts < before_ts``, oldest first, from memory (prefetched in :meth:`open`)."""
        if n <= 0:
            return []
        k = bisect.bisect_left(self._history_ts, before_ts)
        return self._history[max(0, k - n) : k]

    def last_message_age_s(self) -> float | None:
        """Seconds since the stream's last frame (data or ping), else since :meth:`open`; None before open."""
        stream = self._stream
        if stream is not None and stream.last_message_mono is not None:
            return stream.last_message_age_s()
        if self._opened_mono is None:
            return None
        return time.monotonic() - self._opened_mono

    @property
    def stalled(self) -> bool:
        """No frame from the stream for longer than the silence timeout (the REST path may still deliver)."""
        age = self.last_message_age_s()
        return self._iterating and age is not None and age > self.silence_timeout_s

    def describe(self) -> dict[str, object]:
        stream = self._stream
        age = self.last_message_age_s()
        return {
            "kind": self.kind,
            "symbol": self.symbol,
            "timeframe": self.timeframe,
            "ws_url": self.ws_url,
            "rest_url": self.client.rest_url,
            "start_after_ts": self.start_after_ts,
            "next_ts": self._next_ts,
            "last_emitted_ts": self.last_emitted_ts,
            "emitted": self.emitted,
            "backfilled": self.backfilled,
            "gaps_passed": self.gaps_passed,
            "bars_missing": self.bars_missing,
            "rest_errors": self.rest_errors,
            "empty_polls": self.empty_polls,
            "last_error": self.last_error,
            "now_ms": self.now_ms(),
            "market_ts": self._market_ts,
            "market_confirmations": self.market_confirmations,
            "server_offset_ms": self.client.offset_ms,
            "history_bars": len(self._history),
            "connected": stream.connected if stream is not None else False,
            "reconnects": stream.reconnects if stream is not None else 0,
            "silences": stream.silences if stream is not None else 0,
            "last_message_age_s": None if age is None else round(age, 3),
            "stalled": self.stalled,
            "finished": self.finished,
        }

    async def candles(self) -> AsyncIterator[Candle]:
        """Closed candles, in order, each once, for ever (one iteration at a time)."""
        if self._iterating:
            raise RuntimeError("WeexFeed.candles() is already being iterated")
        await self.open()
        self._iterating = True
        if self._stream is None:
            self._stream = self._stream_factory() if self._stream_factory else KlineStream(
                lambda: self.client.session, self.ws_url, self.symbol, self.timeframe,
                silence_timeout_s=self.silence_timeout_s)
        stream_task = asyncio.create_task(self._watch_stream(self._stream), name="weex-kline-stream")
        try:
            while True:
                for candle in await self._next_closed():
                    self._mark(candle)
                    yield candle
        finally:
            self._iterating = False
            await self._stream.close()
            stream_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stream_task

    # -- internals -------------------------------------------------------------------------

    async def _watch_stream(self, stream: KlineStream) -> None:
        """Note the newest bar open time the stream shows and wake the delivery loop when it moves on."""
        async for update in stream.updates():
            ts = update.candle.ts
            if self._stream_latest_ts is None or ts > self._stream_latest_ts:
                self._stream_latest_ts = ts
                self._wake.set()

    def _mark(self, c: Candle) -> None:
        if self.last_emitted_ts is not None and c.ts - self.last_emitted_ts > self.bar_ms:
            self.gaps_passed += 1
            self.bars_missing += (c.ts - self.last_emitted_ts) // self.bar_ms - 1
        self.emitted += 1
        self.last_emitted_ts = c.ts
        self._next_ts = c.ts + self.bar_ms
        self._remember([c])

    def _note_market(self, ts: int) -> None:
        if self._market_ts is None or ts > self._market_ts:
            self._market_ts = ts

    async def _confirm_market(self) -> None:
        """The stream shows a bar far ahead of our clock: ask REST whether the exchange really is there."""
        self.market_confirmations += 1
        rows = await self.client.klines(self.symbol, self.timeframe, limit=2)
        if rows:
            self._note_market(max(c.ts for c in rows))

    def _last_closed(self) -> int:
        """Open time of the newest bar known to be closed (by the stream or by the clock)."""
        now = self.now_ms()
        seen = self._stream_opened(now)
        horizon = now if seen is None else max(now, seen)
        return horizon // self.bar_ms * self.bar_ms - self.bar_ms

    def _stream_opened(self, now: int) -> int | None:
        """The newest bar open time the stream showed, if plausible: at most ``MAX_SKEW_MS`` ahead of our
        clock.  A bar opening on the stream proves the previous one closed even if our clock lags a little;
        a bogus far-future open time must not make us treat unfinished bars as closed."""
        seen = self._stream_latest_ts
        return seen if seen is not None and seen <= now + MAX_SKEW_MS else None

    async def _next_closed(self) -> list[Candle]:
        """Wait until at least the next bar is closed, then return every closed bar REST has after it."""
        poll_s = self.poll_initial_s
        while True:
            nxt = self._next_ts
            assert nxt is not None
            now = self.now_ms()
            seen = self._stream_opened(now)
            latest = self._stream_latest_ts
            if seen is None and latest is not None and latest > now + MAX_SKEW_MS:
                try:
                    await self._confirm_market()  # implausible until the exchange's REST side says so
                except WeexError as exc:
                    self.rest_errors += 1
                    self.last_error = str(exc)
                now = self.now_ms()
                seen = self._stream_opened(now)
            closed_by_stream = seen is not None and seen >= nxt + self.bar_ms
            if closed_by_stream or now >= nxt + self.bar_ms + self.grace_ms:
                last = self._last_closed()
                try:
                    rows = await self._fetch(nxt, last)
                except WeexError as exc:
                    self.rest_errors += 1
                    self.last_error = str(exc)
                    log.warning("weex_feed_rest_error", error=str(exc), next_ts=nxt, retry_in_s=round(poll_s, 2))
                    rows = None
                if rows:
                    return rows
                if rows is not None:
                    self.empty_polls += 1
                await asyncio.sleep(poll_s)
                poll_s = min(self.poll_max_s, poll_s * 2)
                continue
            self._wake.clear()
            timeout = min(self.tick_s, max(0.0, (nxt + self.bar_ms + self.grace_ms - now) / 1000))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _fetch(self, first: int, last: int) -> list[Candle]:
        """Closed bars in ``[first, last]`` over REST: ``klines`` for one bar, ``historyKlines`` pages otherwise."""
        pending = (last - first) // self.bar_ms + 1
        if pending <= 0:
            return []
        if pending == 1:
            rows = await self.client.klines(self.symbol, self.timeframe, limit=3)
        else:
            rows = await self.client.history(self.symbol, self.timeframe, first, last, closed_by_ms=last + self.bar_ms)
            if not rows or rows[-1].ts < last:
                # historyKlines may lag the newest bars: top the tail up from the recent klines.
                recent = await self.client.klines(self.symbol, self.timeframe,
                                                  limit=min(1000, min(pending, HISTORY_PAGE_ROWS) + 2))
                newest = rows[-1].ts if rows else first - self.bar_ms
                rows = rows + [c for c in recent if c.ts > newest]
        if rows:
            self._note_market(max(c.ts for c in rows))
        out = [c for c in rows if first <= c.ts <= last]
        if pending > 1 and out:
            self.backfilled += len(out)
            log.info("weex_feed_backfill", first_ts=first, last_ts=last, pending=pending, got=len(out))
        return out
