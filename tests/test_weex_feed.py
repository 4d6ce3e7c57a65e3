"""WeexFeed over real HTTP and WebSocket on 127.0.0.1 (tests/weex_stub.py), with real BTCUSDT 5m bars.

Time is a fake wall clock shared by the stub (server time) and the client, so a 5-minute bar closes when
the test says so; the feed re-checks every 10 ms (``tick_s``).  The stub serves a bar over REST only once
it has closed on that clock, plus a synthetic "forming" bar with values no real bar has: it must never
come out of the feed.  The warm-up prefetch is tested against the fake exchange (alphapulse fake-weex) on the
bundled 1h file, whose history is long enough for a ``trend_v1`` warm-up.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from alphapulse.domain import Candle
from alphapulse.exchange.weex.client import WeexClient
from alphapulse.exchange.weex.feed import WeexFeed
from alphapulse.exchange.weex.ws import KlineStream
from alphapulse.market.feed import Feed, FeedError
from tests.weex_stub import FakeClock, Recorded, WeexStub

pytestmark = pytest.mark.timeout(20)

BAR = 300_000
K = 300  # index (in ``bars``) of the bar forming when a test starts
HIST = "/capi/v3/market/historyKlines"
KLINES = "/capi/v3/market/klines"


@dataclass
class Env:
    stub: WeexStub
    client: WeexClient
    clock: FakeClock
    bars: list[Candle]

    def feed(self, silence_s: float = 2.0, **kw: Any) -> WeexFeed:
        kw.setdefault("grace_s", 2.0)
        kw.setdefault("tick_s", 0.01)
        kw.setdefault("poll_initial_s", 0.01)
        kw.setdefault("poll_max_s", 0.05)

        def stream() -> KlineStream:
            return KlineStream(lambda: self.client.session, self.stub.ws_url, "BTCUSDT", "5m",
                               silence_timeout_s=silence_s, ack_timeout_s=1.0, backoff_initial_s=0.02,
                               backoff_max_s=0.1)

        return WeexFeed(self.client, self.stub.ws_url, "BTCUSDT", "5m", silence_timeout_s=silence_s,
                        stream_factory=stream, **kw)

    def at(self, i: int, offset_ms: int = 100) -> None:
        """Move the wall clock to ``offset_ms`` into bar ``i``."""
        self.clock.set_ms(self.bars[i].ts + offset_ms)

    def junk(self, i: int) -> Candle:
        """A stream update for bar ``i`` with values that differ from the exchange's final ones."""
        b = self.bars[i]
        return Candle(b.ts, b.open, b.high + 1, b.low - 1, b.close + 0.5, b.volume / 3)


@pytest.fixture
async def env(btc_candles: list[Candle]) -> AsyncIterator[Env]:
    bars = btc_candles[5000:5400]
    assert all(b.ts - a.ts == BAR for a, b in zip(bars, bars[1:]))
    clock = FakeClock((bars[K].ts + 10_000) / 1000)
    stub = WeexStub(clock=clock)
    stub.add_candles(bars)
    await stub.start()
    client = WeexClient(stub.base_url, clock=clock, backoff_base_s=0.01, timeout_s=2.0, max_retries=0)
    yield Env(stub, client, clock, bars)
    await client.close()
    await stub.close()


async def pull(agen: AsyncIterator[Candle], n: int, timeout: float = 3.0) -> list[Candle]:
    out = []
    for _ in range(n):
        out.append(await asyncio.wait_for(anext(agen), timeout))
    return out


async def still_waiting(task: asyncio.Task[Any], seconds: float = 0.1) -> bool:
    await asyncio.sleep(seconds)
    return not task.done()


async def test_closed_candles_in_order_once_with_rest_values(env: Env) -> None:
    feed = env.feed()
    assert isinstance(feed, Feed)
    await feed.open()
    agen = feed.candles()
    task = asyncio.create_task(anext(agen))
    await env.stub.wait_for(lambda: env.stub.ws_subscribed >= 1)
    env.stub.push_kline(env.junk(K))
    assert await still_waiting(task)  # bar K is still forming

    env.at(K + 1, 500)  # closed on the clock but within the grace ...
    env.stub.push_kline(env.junk(K + 1))  # ... and the stream shows bar K+1 opening: closed now
    assert await asyncio.wait_for(task, 3) == env.bars[K]  # the exchange's final values, not the stream's

    task = asyncio.create_task(anext(agen))
    env.stub.push_kline(env.junk(K))  # stale updates on the stream change nothing
    env.stub.push_kline(env.junk(K + 1))
    assert await still_waiting(task)
    env.at(K + 2, 2_100)  # no stream message at all: the clock passes close + grace
    assert await asyncio.wait_for(task, 3) == env.bars[K + 1]

    env.at(K + 3, 2_100)
    assert await pull(agen, 1) == [env.bars[K + 2]]
    d = feed.describe()
    assert (d["emitted"], d["last_emitted_ts"], d["backfilled"], d["gaps_passed"]) == (3, env.bars[K + 2].ts, 0, 0)
    assert d["connected"] is True and d["stalled"] is False
    await agen.aclose()
    assert env.stub.calls(HIST) == []  # single closed bars come from the recent klines


async def test_dropped_connection_reconnects_and_backfills_before_the_next_live_bar(env: Env) -> None:
    feed = env.feed(grace_s=1200.0)  # only the stream can close bars here: the clock rule is far away
    agen = feed.candles()
    task = asyncio.create_task(anext(agen))
    await env.stub.wait_for(lambda: env.stub.ws_subscribed >= 1)
    env.at(K + 1)
    env.stub.push_kline(env.junk(K + 1))
    assert await asyncio.wait_for(task, 3) == env.bars[K]

    env.stub.ws_accept = False  # the connection drops and cannot come back for now
    env.stub.drop_ws()
    await env.stub.wait_for(lambda: feed.describe()["connected"] is False)
    env.at(K + 5)  # four bars close while we are blind
    task = asyncio.create_task(anext(agen))
    assert await still_waiting(task, 0.2)

    env.stub.ws_accept = True
    await env.stub.wait_for(lambda: env.stub.ws_subscribed >= 2)
    assert feed.describe()["reconnects"] >= 1
    env.stub.push_kline(env.junk(K + 5))  # first message after the reconnect: bar K+5 is open
    got = [await asyncio.wait_for(task, 3), *await pull(agen, 3)]
    assert got == env.bars[K + 1 : K + 5]
    hist = env.stub.calls(HIST)
    assert hist and int(hist[0].params["startTime"]) == env.bars[K + 1].ts

    env.at(K + 6)
    env.stub.push_kline(env.junk(K + 6))
    assert await pull(agen, 1) == [env.bars[K + 5]]  # the next live bar comes after the back-fill
    assert feed.describe()["backfilled"] == 4 and feed.emitted == 6
    await agen.aclose()


async def test_silent_stream_is_detected_reported_and_recovered(env: Env) -> None:
    feed = env.feed(silence_s=0.3, grace_s=600.0, stall_poll_s=0.05)  # the clock rule cannot fire here
    agen = feed.candles()
    task = asyncio.create_task(anext(agen))
    await env.stub.wait_for(lambda: env.stub.ws_subscribed >= 1)
    # the server acked, then says nothing: no data, no ping
    await env.stub.wait_for(lambda: env.stub.ws_subscribed >= 2, timeout=3)  # dropped and re-subscribed
    assert feed.describe()["silences"] >= 1
    await env.stub.wait_for(lambda: feed.describe()["stalled"] is True, timeout=3)
    age = feed.last_message_age_s()
    assert age is not None and age > 0.3

    env.at(K + 1)  # a bar closes while the stream is silent: the REST probe of the forming bar sees it
    assert await asyncio.wait_for(task, 3) == env.bars[K]
    assert feed.describe()["stall_probes"] >= 1

    env.stub.push_ping()  # the stream speaks again
    await env.stub.wait_for(lambda: any(m.get("method") == "PONG" for m in env.stub.ws_received))
    pong = next(m for m in env.stub.ws_received if m.get("method") == "PONG")
    assert isinstance(pong["id"], str) and pong["id"].isdigit()
    assert feed.describe()["stalled"] is False
    await agen.aclose()


async def test_warmup_history_comes_from_rest_in_open(env: Env) -> None:
    env.stub.server_offset_ms = 7_000
    feed = env.feed(warmup_bars=250)
    await feed.open()
    assert feed.now_ms() == int(env.clock() * 1000) + 7_000  # wall time corrected by the server's offset
    assert feed.history(env.bars[K].ts, 250) == env.bars[K - 250 : K]
    assert feed.history(env.bars[K - 10].ts, 5) == env.bars[K - 15 : K - 10]
    assert feed.history(env.bars[K].ts, 0) == []
    pages = env.stub.calls(HIST)
    assert len(pages) == 3
    assert all((int(p.params["endTime"]) - int(p.params["startTime"])) // BAR + 1 <= 100 for p in pages)
    assert env.stub.ws_connections == 0  # no waiting for live bars


async def test_resume_after_start_after_ts_backfills_what_was_missed(env: Env) -> None:
    last_decided = env.bars[K - 6].ts
    odd = env.feed(start_after_ts=last_decided + 7)  # a misaligned resume point still resumes at the next bar
    await odd.open()
    assert odd.describe()["next_ts"] == env.bars[K - 5].ts
    feed = env.feed(start_after_ts=last_decided, warmup_bars=20)
    await feed.open()
    assert feed.history(last_decided + 1, 20) == env.bars[K - 25 : K - 5]  # as the daemon asks after a restart
    agen = feed.candles()
    assert await pull(agen, 5) == env.bars[K - 5 : K]  # everything after the last decided bar, in order
    await env.stub.wait_for(lambda: env.stub.ws_subscribed >= 1)
    env.at(K + 1)
    env.stub.push_kline(env.junk(K + 1))
    assert await pull(agen, 1) == [env.bars[K]]
    await agen.aclose()


async def test_real_exchange_gap_is_passed_through(env: Env) -> None:
    del env.stub.candles[env.bars[K + 1].ts]  # the exchange never had this bar
    feed = env.feed()
    await feed.open()  # the first bar delivered is the one forming now (K)
    agen = feed.candles()
    env.at(K + 1, 2_100)
    assert await pull(agen, 1) == [env.bars[K]]
    task = asyncio.create_task(anext(agen))
    env.at(K + 2, 2_100)
    assert await still_waiting(task, 0.2)  # REST has nothing for K+1 yet: wait, do not invent
    env.at(K + 3, 2_100)
    assert await asyncio.wait_for(task, 3) == env.bars[K + 2]  # the gap reaches the daemon as a gap
    d = feed.describe()
    assert (d["gaps_passed"], d["bars_missing"]) == (1, 1)
    assert int(str(d["empty_polls"])) >= 1
    await agen.aclose()


async def test_rest_errors_are_retried_and_counted_never_papered_over(env: Env) -> None:
    feed = env.feed()
    await feed.open()  # the first bar delivered is the one forming now (K)
    failures = iter([(503, {"msg": "busy"}), (502, b"bad gateway")])
    env.stub.route("GET", KLINES, lambda s, r: next(failures, None))
    agen = feed.candles()
    env.at(K + 1, 2_100)
    assert await pull(agen, 1) == [env.bars[K]]
    assert feed.describe()["rest_errors"] == 2
    await agen.aclose()


async def test_open_fails_loudly_when_the_exchange_is_unreachable(env: Env) -> None:
    def down(s: WeexStub, r: Recorded) -> tuple[int, Any]:
        return 503, {"msg": "maintenance"}

    env.stub.route("GET", "/capi/v3/market/time", down)
    with pytest.raises(FeedError, match="cannot start"):
        await env.feed().open()


async def test_rest_that_still_shows_the_bar_forming_is_waited_for(env: Env) -> None:
    """The stream says bar K+1 opened, but REST's klines still end with K (it lags): K's values there may be
    partial, so nothing is delivered until REST shows a later bar."""
    feed = env.feed(grace_s=600.0)
    await feed.open()
    lagging = True

    def klines(s: WeexStub, r: Recorded) -> tuple[int, Any] | None:
        if not lagging:
            return None
        from tests.weex_stub import kline_row

        return 200, [kline_row(c) for c in s.closed()[-2:]] + [kline_row(s.forming())]

    env.stub.route("GET", KLINES, klines)
    env.stub.server_offset_ms = -BAR  # REST's view: still inside bar K (serves K as the forming bar)
    agen = feed.candles()
    task = asyncio.create_task(anext(agen))
    await env.stub.wait_for(lambda: env.stub.ws_subscribed >= 1)
    env.at(K + 1)
    env.stub.push_kline(env.junk(K + 1))
    assert await still_waiting(task, 0.2)
    assert feed.describe()["empty_polls"] >= 1
    lagging = False
    env.stub.server_offset_ms = 0
    assert await asyncio.wait_for(task, 3) == env.bars[K]
    await agen.aclose()


async def test_fast_replay_market_clock_ahead_of_server_clock(env: Env) -> None:
    """On the fake exchange's fast replay the market runs ahead of /market/time: bars close at the
    stream's pace, not our clock's."""
    env.stub.market_ahead_ms = 3 * BAR
    feed = env.feed(warmup_bars=10)
    await feed.open()
    assert feed.describe()["next_ts"] == env.bars[K + 3].ts  # the exchange's forming bar, not our clock's
    assert feed.history(env.bars[K + 3].ts, 10) == env.bars[K - 7 : K + 3]
    agen = feed.candles()
    task = asyncio.create_task(anext(agen))
    await env.stub.wait_for(lambda: env.stub.ws_subscribed >= 1)
    for i in range(4, 7):
        env.stub.market_ahead_ms = i * BAR + 100  # market time moves; our clock does not
        env.stub.push_kline(env.junk(K + i))
        assert await asyncio.wait_for(task, 3) == env.bars[K + i - 1]
        task = asyncio.create_task(anext(agen))
    task.cancel()
    await agen.aclose()


async def test_long_backfill_in_batches_passes_over_an_outage(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    import alphapulse.exchange.weex.feed as feed_mod

    monkeypatch.setattr(feed_mod, "MAX_BATCH_BARS", 50)
    for b in env.bars[K - 200 : K - 120]:  # 80 bars the exchange never had: more than a whole batch
        del env.stub.candles[b.ts]
    feed = env.feed(start_after_ts=env.bars[K - 251].ts)
    agen = feed.candles()
    got = await pull(agen, 250 - 80)
    assert got == env.bars[K - 250 : K - 200] + env.bars[K - 120 : K]
    d = feed.describe()
    assert (d["gaps_passed"], d["bars_missing"], d["backfilled"]) == (1, 80, 170)
    await agen.aclose()


async def test_stream_reconnects_when_subscription_is_not_acked(env: Env) -> None:
    env.stub.ws_ack = False
    stream = KlineStream(lambda: env.client.session, env.stub.ws_url, "BTCUSDT", "5m", ack_timeout_s=0.1,
                         backoff_initial_s=0.02, backoff_max_s=0.05)
    await env.client.start()
    got: list[Candle] = []

    async def consume() -> None:
        async for u in stream.updates():
            got.append(u.candle)

    task = asyncio.create_task(consume())
    await env.stub.wait_for(lambda: env.stub.ws_subscribed >= 3)
    assert stream.reconnects >= 2 and not stream.connected and "ack" in str(stream.last_error)
    sub = next(m for m in env.stub.ws_received if m.get("method") == "SUBSCRIBE")
    assert sub["params"] == ["BTCUSDT@kline_5m_LAST_PRICE"] and isinstance(sub["id"], str)
    env.stub.ws_ack = True
    await env.stub.wait_for(lambda: stream.connected)
    env.stub.push_kline(env.bars[K])
    await env.stub.wait_for(lambda: got == [env.bars[K]])
    await stream.close()
    await asyncio.wait_for(task, 2)


async def test_a_second_iteration_resumes_after_the_first(env: Env) -> None:
    """Like ReplayFeed: a consumer that stops and iterates again continues after the last candle handed out,
    with a fresh stream (the first one was closed when the first iteration ended)."""
    feed = env.feed()
    await feed.open()
    agen = feed.candles()
    env.at(K + 1, 2_100)
    assert await pull(agen, 1) == [env.bars[K]]
    await agen.aclose()
    assert feed.describe()["connected"] is False
    env.at(K + 3, 2_100)
    agen = feed.candles()
    assert await pull(agen, 2) == env.bars[K + 1 : K + 3]
    await env.stub.wait_for(lambda: feed.describe()["connected"] is True)
    await agen.aclose()


async def test_hanging_handshake_times_out_and_is_retried(env: Env) -> None:
    env.stub.ws_hang_s = 5.0
    stream = KlineStream(lambda: env.client.session, env.stub.ws_url, "BTCUSDT", "5m", ack_timeout_s=0.2,
                         backoff_initial_s=0.02, backoff_max_s=0.05)
    await env.client.start()
    task = asyncio.create_task(anext(stream.updates()))
    await env.stub.wait_for(lambda: env.stub.ws_attempts >= 2)  # the first attempt was abandoned, not waited out
    env.stub.ws_hang_s = 0.0
    await env.stub.wait_for(lambda: stream.connected)
    env.stub.push_kline(env.bars[K])
    assert (await asyncio.wait_for(task, 2)).candle == env.bars[K]
    await stream.close()


# -- warm-up prefetch over the fake exchange (1h bars, a trend_v1-sized warm-up) -------------------------------


@pytest.mark.parametrize("restart", [False, True], ids=["fresh-start", "restart-after-a-bar"])
async def test_prefetch_returns_exactly_n_closed_bars_before_the_next_bar(restart: bool) -> None:
    """The long warm-up of a ``trend_v1`` model (2,161 1h bars) comes from ``historyKlines`` in pages of 100:
    exactly N consecutive closed bars, the last one right before the first bar the feed will deliver, with the
    file's values, and neither the forming bar nor a partial value among them."""
    import gzip
    import math
    from pathlib import Path

    from alphapulse.exchange.weex.fake import FakeWeex
    from alphapulse.features import TREND_WARMUP_BARS

    data = Path(__file__).resolve().parent.parent / "alphapulse" / "data" / "BTC_USDT_USDT-1h.csv.gz"
    with gzip.open(data, "rt") as f:  # the file itself, parsed apart from the fake
        rows = [ln.split(",") for ln in f.read().splitlines()[1:] if ln]
    bars = [Candle(int(r[0]), float(r[1]), float(r[2]), float(r[3]), float(r[4]), float(r[5])) for r in rows]
    hour, n, forming = 3_600_000, TREND_WARMUP_BARS, 2400
    assert n == 2161 and forming > n + 100  # the file has more history than the warm-up asks for
    fake = FakeWeex(data, speed=1.0, warmup_bars=forming)
    await fake.start()
    client = WeexClient(fake.url, timeout_s=5.0, max_retries=0)
    try:
        fake.advance(hour // 2)  # half-way into the forming bar: its klines row carries partial values
        start_after = bars[forming - 40].ts if restart else None
        nxt = forming - 39 if restart else forming  # index of the first bar the feed will deliver
        feed = WeexFeed(client, fake.ws_url, "BTCUSDT", "1h", start_after_ts=start_after, warmup_bars=n)
        await feed.open()  # fixes the next bar and prefetches the warm-up
        pages_at_open = fake.count("GET", HIST)
        assert pages_at_open == math.ceil(n / 100) == 22  # 100 bars a page, no page asked twice
        got = feed.history(bars[nxt].ts, n + 500)  # everything it holds before the next bar
        assert len(got) == n
        assert got == bars[nxt - n : nxt]  # the file's closed bars, ending right before the next one
        assert all(b.ts - a.ts == hour for a, b in zip(got, got[1:]))  # no gap
        assert got[-1].ts + hour == bars[nxt].ts
        assert bars[forming] not in got and all(c.ts < bars[forming].ts for c in got)  # no forming bar
        # asked again (directly), the same N bars, in the same number of pages
        again = await feed.prefetch_history(n)
        assert again == got and fake.count("GET", HIST) == 2 * pages_at_open
        short = await feed.prefetch_history(150)  # a partial last page: still exactly N, two pages
        assert short == bars[nxt - 150 : nxt] and fake.count("GET", HIST) == 2 * pages_at_open + 2
    finally:
        await client.close()
        await fake.stop()
