"""Live WEEX candle feed: closed bars, in order, once each, with gaps back-filled over REST.

The rule that decides when a bar has closed, and where its values come from (why: the daemon acts on
every delivered candle, so a bar must be final, never delivered twice, and never silently skipped):

* Bar ``B`` (open time ``ts``) is **due** when the WebSocket shows a bar with a later open time, or
  when the server-corrected wall clock passes ``ts + bar + grace`` (so a silent or dead stream
  delays a candle by ``grace_s`` at most, never indefinitely).  While the stream is stalled, REST is
  also asked every ``stall_poll_s`` which bar is forming, which serves as the stream's signal would.
* A due bar's values are always fetched over **REST** (authoritative, final), and it is delivered only
  once REST proves it closed: ``historyKlines`` serves closed bars only; a ``klines`` row counts as
  closed when a later row follows it in the same answer (that endpoint ends with the forming bar) or
  the clock is past its close plus the grace.  ``klines`` serves the usual single just-closed bar,
  ``historyKlines`` pages of 100 whenever more than one bar is pending (after a disconnect, a silent
  stream, or a restart with ``start_after_ts``).  So every bar missed while the stream was down is
  delivered, in order, *before* any later one.
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
from alphapulse.exchange.weex.client import WeexClient
from alphapulse.exchange.weex.errors import WeexError
from alphapulse.exchange.weex.ws import KlineStream
from alphapulse.log import get_logger
from alphapulse.market.feed import FeedError

log = get_logger(__name__)

#: Most bars fetched for one delivery batch (20 historyKlines pages): bounds memory and request weight after a
#: long downtime; the rest follows in the next batches.
MAX_BATCH_BARS = 2000
STOP_TIMEOUT_S = 5.0  # the stream task stops within this on close, or is left to the loop's own teardown


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
        stall_poll_s: float = 5.0,
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
        self.stall_poll_s = stall_poll_s
        self.poll_initial_s = poll_initial_s
        self.poll_max_s = poll_max_s
        self.silence_timeout_s = silence_timeout_s
        self.finished = False  # a live feed never finishes
        self._stream = stream
        self._stream_factory = stream_factory
        self._opened = False
        self._iterating = False
        self._next_ts: int | None = None  # open time of the first bar not yet delivered
        self._latest_open_ts: int | None = None  # newest bar open time seen (stream, or REST probe when stalled)
        self._last_probe_mono = 0.0
        self._stream_task: asyncio.Task[None] | None = None
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
        self.stall_probes = 0  # REST look-ups of the forming bar while the stream was stalled
        self.last_error: str | None = None
        self.last_emitted_ts: int | None = None
        self._opened_mono: float | None = None

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
                self._next_ts = (self.start_after_ts // self.bar_ms + 1) * self.bar_ms  # aligned, even if it is not
            else:
                # The exchange's forming bar (the last klines row), not our clock's: its market clock decides.
                recent = await self.client.klines(self.symbol, self.timeframe, limit=2)
                self._next_ts = recent[-1].ts if recent else self.client.now_ms() // self.bar_ms * self.bar_ms
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
        rows = await self.client.history(self.symbol, self.timeframe, start, end, closed_by_ms=self._next_ts)
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
        """Wall time corrected by the server offset, or the close of the last delivered bar if that is later.

        On the real venue a delivered bar has closed by the server's clock, so this is the server's clock.  Only
        an exchange that replays its market faster than real time (a local ``fake-weex --speed``) closes bars
        ahead of its server clock: then the market's own time is the better clock, so the daemon's time rules
        (order-rate window, staleness, daily roll-over) run on market time as they would on the real venue.
        """
        now = self.client.now_ms()
        last = self.last_emitted_ts
        return now if last is None or last + self.bar_ms <= now else last + self.bar_ms

    def history(self, before_ts: int, n: int) -> list[Candle]:
        """The last ``n`` bars with ``ts < before_ts``, oldest first, from memory: the warm-up prefetched in
        :meth:`open` plus every bar delivered since.  Synchronous by protocol, so it never fetches: before
        :meth:`open`, or further back than ``warmup_bars``, it returns what it has (possibly fewer)."""
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
            "stall_probes": self.stall_probes,
            "last_error": self.last_error,
            "now_ms": self.client.now_ms(),
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
        self._stream_task = asyncio.create_task(self._watch_stream(self._stream), name="weex-kline-stream")
        try:
            while True:
                for candle in await self._next_closed():
                    self._mark(candle)
                    yield candle
        finally:
            self._iterating = False
            await self.close()

    async def close(self) -> None:
        """Stop the WebSocket stream (idempotent; the client belongs to the caller and stays open).

        ``candles()`` does this itself when it ends or is cancelled; call it when abandoning an iteration
        without closing the generator."""
        if self._stream is not None:
            await self._stream.close()
        task, self._stream_task = self._stream_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            # asyncio.wait, not ``suppress(CancelledError): await task``: that would also swallow a cancellation
            # of the caller arriving meanwhile, and wait without bound for a task slow to stop
            _, pending = await asyncio.wait({task}, timeout=STOP_TIMEOUT_S)
            if pending:
                log.warning("weex_feed_stream_task_slow_to_stop", timeout_s=STOP_TIMEOUT_S)

    # -- internals -------------------------------------------------------------------------

    async def _watch_stream(self, stream: KlineStream) -> None:
        """Note the newest bar open time the stream shows and wake the delivery loop when it moves on.

        Supervised: an unexpected error in the stream is logged and the stream restarted after a pause, so
        the fast path cannot die silently (the clock rule would still deliver, only later)."""
        while True:
            try:
                async for update in stream.updates():
                    self._note_open(update.candle.ts)
                return  # the stream was closed
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = f"stream: {type(exc).__name__}: {exc}"
                log.error("weex_feed_stream_crashed", error=self.last_error, exc_info=True)
                await asyncio.sleep(max(self.tick_s, 1.0))

    def _note_open(self, ts: int) -> None:
        """A bar with open time ``ts`` exists on the exchange (so every earlier bar has closed)."""
        if self._latest_open_ts is None or ts > self._latest_open_ts:
            self._latest_open_ts = ts
            self._wake.set()

    async def _probe_if_stalled(self) -> None:
        """While the stream is stalled, ask REST every ``stall_poll_s`` which bar is forming.

        Without this a silent stream would leave only the clock rule, which is late by the grace and, on the
        fake exchange's fast replay (market clock ahead of the server clock), very late."""
        if not self.stalled or time.monotonic() - self._last_probe_mono < self.stall_poll_s:
            return
        self._last_probe_mono = time.monotonic()
        try:
            recent = await self.client.klines(self.symbol, self.timeframe, limit=2)
        except WeexError as exc:
            self.rest_errors += 1
            self.last_error = str(exc)
            return
        self.stall_probes += 1
        if recent:
            self._note_open(recent[-1].ts)

    def _mark(self, c: Candle) -> None:
        if self.last_emitted_ts is not None and c.ts - self.last_emitted_ts > self.bar_ms:
            self.gaps_passed += 1
            self.bars_missing += (c.ts - self.last_emitted_ts) // self.bar_ms - 1
        self.emitted += 1
        self.last_emitted_ts = c.ts
        self._next_ts = c.ts + self.bar_ms
        self._remember([c])

    def _horizon(self, now: int) -> int:
        """The latest exchange time we know has been reached: our clock, or a bar opening on the stream.

        The stream is believed without a skew limit because it is only a trigger: what is delivered must
        still be proven closed by REST (see :meth:`_proven`), so a bogus open time costs REST calls, never
        a wrong candle.  This is also what keeps a fast replay on the fake exchange (whose market clock runs
        ahead of its server clock) flowing at market pace."""
        seen = self._latest_open_ts
        return now if seen is None else max(now, seen)

    def _proven(self, rows: list[Candle], now: int) -> list[Candle]:
        """The rows of a ``klines`` answer that are certainly closed: a later bar follows them in the same
        answer, or the clock has passed their close plus the grace.  ``klines`` ends with the forming bar,
        whose partial values must never be delivered."""
        out = []
        for i, c in enumerate(rows):
            if i + 1 < len(rows) or c.ts + self.bar_ms + self.grace_ms <= now:
                out.append(c)
        return out

    async def _next_closed(self) -> list[Candle]:
        """Wait until at least the next bar is closed, then return every closed bar REST has after it."""
        poll_s = self.poll_initial_s
        while True:
            self._wake.clear()  # before reading the state, so a signal arriving meanwhile is not lost
            await self._probe_if_stalled()
            nxt = self._next_ts
            assert nxt is not None
            now = self.client.now_ms()
            horizon = self._horizon(now)
            seen = self._latest_open_ts
            closed_by_stream = seen is not None and seen >= nxt + self.bar_ms
            if closed_by_stream or now >= nxt + self.bar_ms + self.grace_ms:
                last = horizon // self.bar_ms * self.bar_ms - self.bar_ms  # newest bar closed by the horizon
                try:
                    rows: list[Candle] | None = await self._fetch(nxt, last, now)
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
            timeout = min(self.tick_s, max(0.0, (nxt + self.bar_ms + self.grace_ms - now) / 1000))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _fetch(self, first: int, last: int, now: int) -> list[Candle]:
        """Closed bars in ``[first, last]`` over REST, oldest first.

        One pending bar (the usual case): ``klines`` (limit 3), keeping only bars proven closed.  More: pages
        of ``historyKlines`` (closed bars only), topped up from ``klines`` if history lags the newest bars.
        More than :data:`MAX_BATCH_BARS`: bounded by the newest bar the exchange has, then taken a batch at
        a time, passing over batches the exchange has no data for (an outage is a gap, not a stall).
        """
        bar = self.bar_ms
        pending = (last - first) // bar + 1
        if pending <= 0:
            return []
        if pending == 1:
            rows = self._proven(await self.client.klines(self.symbol, self.timeframe, limit=3), now)
        elif pending > MAX_BATCH_BARS:
            newest = self._proven(await self.client.klines(self.symbol, self.timeframe, limit=2), now)
            if not newest:
                return []
            last = min(last, newest[-1].ts)
            rows = []
            cursor = first
            while cursor <= last and not rows:
                end = min(last, cursor + MAX_BATCH_BARS * bar - bar)
                rows = await self.client.history(self.symbol, self.timeframe, cursor, end, closed_by_ms=end + bar)
                cursor = end + bar
        else:
            rows = await self.client.history(self.symbol, self.timeframe, first, last, closed_by_ms=last + bar)
            if not rows or rows[-1].ts < last:
                # historyKlines may lag the newest bars: top the tail up from the recent klines.
                recent = await self.client.klines(self.symbol, self.timeframe, limit=min(1000, pending + 2))
                newest_ts = rows[-1].ts if rows else first - bar
                rows = rows + [c for c in self._proven(recent, now) if c.ts > newest_ts]
        out = [c for c in rows if first <= c.ts <= last]
        if pending > 1 and out:
            self.backfilled += len(out)
            log.info("weex_feed_backfill", first_ts=first, last_ts=out[-1].ts, pending=pending, got=len(out))
        return out
