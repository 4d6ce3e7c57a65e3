"""WeexClient against a real HTTP server on 127.0.0.1 (tests/weex_stub.py): signing on the wire, server time,
error mapping, retries only where repeating is harmless, submit recovery by client id, 429 handling, rate
limiting, secret-free logs and history paging."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import structlog

from alphapulse import log as aplog
from alphapulse.domain import Candle
from alphapulse.exchange.weex import signing
from alphapulse.exchange.weex.client import TokenBucket, WeexClient, kline_weight
from alphapulse.exchange.weex.errors import (
    AuthError,
    ExchangeUnavailable,
    InvalidOrderError,
    OrderNotFoundError,
    RateLimitError,
    TimestampError,
    UnknownSymbolError,
    WeexError,
    raise_for_body,
)
from tests.weex_stub import API_KEY, PASSPHRASE, SECRET, FakeClock, Recorded, WeexStub

pytestmark = pytest.mark.timeout(20)

BAL = "/capi/v3/account/balance"
ORDER = "/capi/v3/order"
KLINES = "/capi/v3/market/klines"
HIST = "/capi/v3/market/historyKlines"
TIME = "/capi/v3/market/time"


@pytest.fixture
async def stub(btc_candles: list[Candle]) -> AsyncIterator[WeexStub]:
    s = await WeexStub().start()
    s.add_candles(btc_candles[:50])  # real bars, all long closed on the default (real) clock
    yield s
    await s.close()


def client_for(stub: WeexStub, **kw: Any) -> WeexClient:
    kw.setdefault("backoff_base_s", 0.01)
    kw.setdefault("timeout_s", 2.0)
    return WeexClient(stub.base_url, API_KEY, SECRET, PASSPHRASE, **kw)


def balance_ok(_s: WeexStub, _r: Recorded) -> tuple[int, Any]:
    return 200, [{"asset": "USDT", "balance": "1000.5", "availableBalance": "900.25", "frozen": "100.25",
                  "unrealizePnl": "-1.5"}]


def order_row(client_id: str, status: str = "NEW") -> dict[str, Any]:
    return {"orderId": "9001", "clientOrderId": client_id, "symbol": "BTCUSDT", "side": "BUY", "positionSide": "LONG",
            "type": "MARKET", "origQty": "0.001", "price": "0", "executedQty": "0.0005", "avgPrice": "97000.1",
            "cumQuote": "48.50005", "status": status, "time": 1733011200000, "updateTime": 1733011200500}


# -- signing on the wire --------------------------------------------------------------------------------


async def test_private_calls_signed_over_exact_bytes_public_calls_unsigned(stub: WeexStub) -> None:
    stub.route("GET", BAL, balance_ok)
    stub.route("GET", ORDER, lambda s, r: (200, order_row(r.params["origClientOrderId"], "PARTIAL_FILL")))
    stub.route("POST", ORDER, lambda s, r: (200, {"orderId": "9001", "clientOrderId": "ap-1", "success": True}))
    async with client_for(stub) as c:
        balances = await c.balance()
        await c.klines("BTCUSDT", "5m", limit=3)
        order = await c.get_order("BTCUSDT", client_order_id="ap 1/x")
        ack = await c.place_order("BTCUSDT", "BUY", "LONG", Decimal("0.001"), "ap-1")

    assert balances[0].available == Decimal("900.25") and balances[0].unrealized_pnl == Decimal("-1.5")
    assert order.status == "PARTIALLY_FILLED" and order.avg_price == Decimal("97000.1")
    assert ack.order_id == "9001" and not ack.recovered

    for rec in (stub.calls(BAL)[0], stub.calls(ORDER, "GET")[0], stub.calls(ORDER, "POST")[0]):
        assert rec.signature_ok is True, rec  # the stub verified the signature over the bytes it received
        assert rec.headers[signing.HEADER_KEY] == API_KEY and rec.headers[signing.HEADER_PASSPHRASE] == PASSPHRASE
        assert rec.headers[signing.HEADER_TIMESTAMP].isdigit()
    get = stub.calls(ORDER, "GET")[0]
    assert get.query == "symbol=BTCUSDT&origClientOrderId=ap%201%2Fx"  # order kept, percent-encoded once
    assert "Content-Type" not in get.headers
    post = stub.calls(ORDER, "POST")[0]
    assert post.headers["Content-Type"] == "application/json"
    # the reference's example body, byte for byte: compact JSON, our field order
    assert post.body == ('{"symbol":"BTCUSDT","side":"BUY","quantity":"0.001","type":"MARKET","positionSide":"LONG",'
                         '"newClientOrderId":"ap-1"}')
    for rec in stub.calls(KLINES) + stub.calls(TIME):
        assert not any(h.startswith("ACCESS-") for h in rec.headers), rec.headers


async def test_private_call_without_credentials_fails_before_sending(stub: WeexStub) -> None:
    async with WeexClient(stub.base_url) as c:
        with pytest.raises(WeexError, match="needs api_key"):
            await c.balance()
        assert len(await c.klines("BTCUSDT", "5m", limit=2)) == 2  # public calls work without keys
    assert stub.calls(BAL) == []
    lazy = WeexClient(stub.base_url)  # no start(): the session is created on the first call
    try:
        assert len(await lazy.klines("BTCUSDT", "5m", limit=2)) == 2
    finally:
        await lazy.close()


# -- server time -----------------------------------------------------------------------------------------


async def test_offset_applied_and_resynced_once_after_timestamp_error(stub: WeexStub) -> None:
    clock = FakeClock(1_750_000_000.0)
    stub.clock = clock
    stub.server_offset_ms = 5_000

    def strict_window(s: WeexStub, r: Recorded) -> tuple[int, Any]:
        if abs(int(r.headers[signing.HEADER_TIMESTAMP]) - s.server_ms()) > 1_000:
            return 200, {"code": -1046, "msg": "Timestamp for this request is outside of the recvWindow."}
        return balance_ok(s, r)

    stub.route("GET", BAL, strict_window)
    async with client_for(stub, clock=clock) as c:
        await c.balance()
        assert c.offset_ms == 5_000
        assert int(stub.calls(BAL)[0].headers[signing.HEADER_TIMESTAMP]) == 1_750_000_005_000
        assert len(stub.calls(TIME)) == 1

        stub.server_offset_ms = 65_000  # our clock drifted a minute: the next signed call is refused
        await c.balance()
        assert len(stub.calls(TIME)) == 2  # re-synced at once ...
        assert [int(r.headers[signing.HEADER_TIMESTAMP]) for r in stub.calls(BAL)[1:]] == \
            [1_750_000_005_000, 1_750_000_065_000]  # ... and the request re-sent once with a fresh timestamp
        assert c.offset_ms == 65_000

        stub.route("GET", BAL, lambda s, r: (200, {"code": -1045, "msg": "timestamp"}))
        with pytest.raises(TimestampError):
            await c.balance()
        assert len(stub.calls(BAL)) == 5 and len(stub.calls(TIME)) == 3  # one re-sync, one retry, no loop


async def test_periodic_resync(stub: WeexStub) -> None:
    stub.route("GET", BAL, balance_ok)
    async with client_for(stub, time_sync_interval_s=0.05) as c:
        await c.balance()
        await c.balance()
        assert len(stub.calls(TIME)) == 1
        await asyncio.sleep(0.06)
        await c.balance()
        assert len(stub.calls(TIME)) == 2
        await asyncio.sleep(0.06)
        await c.klines("BTCUSDT", "5m", limit=2)  # public calls keep the offset fresh too (the live feed)
        assert len(stub.calls(TIME)) == 3
        stub.route("GET", TIME, lambda s, r: (503, {"msg": "down"}))
        await asyncio.sleep(0.06)
        await c.balance()  # a failed re-sync keeps the last offset instead of failing the call
        assert len(stub.calls(BAL)) == 4


# -- errors ---------------------------------------------------------------------------------------------


async def test_msg_on_http_200_is_an_error_but_code_200_success_is_not(stub: WeexStub) -> None:
    stub.route("GET", BAL, lambda s, r: (200, {"code": -1121, "msg": "Invalid symbol."}))
    stub.route("POST", "/capi/v3/account/leverage", lambda s, r: (200, {"code": "200", "msg": "success"}))
    async with client_for(stub) as c:
        with pytest.raises(UnknownSymbolError) as ei:
            await c.balance()
        assert (ei.value.code, ei.value.http_status, ei.value.endpoint) == (-1121, 200, f"GET {BAL}")
        assert await c.set_leverage("BTCUSDT", 5) == {"code": "200", "msg": "success"}
    assert stub.calls("/capi/v3/account/leverage")[0].body == \
        '{"symbol":"BTCUSDT","marginType":"CROSSED","crossLeverage":"5"}'


@pytest.mark.parametrize(("status", "body", "cls", "retryable"), [
    (200, {"code": -1040, "msg": "x"}, AuthError, False),
    (401, {"code": "-1043", "msg": "bad sign"}, AuthError, False),
    (200, {"code": -1049, "msg": "x"}, AuthError, False),
    (400, {"code": -1045, "msg": "x"}, TimestampError, True),
    (200, {"code": -1046, "msg": "x"}, TimestampError, True),
    (200, {"code": -1115, "msg": "x"}, InvalidOrderError, False),
    (400, {"code": -1116, "msg": "x"}, InvalidOrderError, False),
    (200, {"code": -1117, "msg": "x"}, InvalidOrderError, False),
    (200, {"code": -3007, "msg": "x"}, InvalidOrderError, False),
    (200, {"code": -2200, "msg": "x"}, OrderNotFoundError, False),
    (400, {"code": -3200, "msg": "x"}, OrderNotFoundError, False),
    (200, {"code": -1121, "msg": "x"}, UnknownSymbolError, False),
    (429, {"code": -1003, "msg": "too many"}, RateLimitError, True),
    (429, None, RateLimitError, True),
    (503, None, ExchangeUnavailable, True),
    (502, {"code": -1000, "msg": "gateway"}, ExchangeUnavailable, True),
    (200, {"code": -9999, "msg": "new"}, WeexError, False),
    (404, None, WeexError, False),
])
def test_each_code_maps_to_its_class(status: int, body: Any, cls: type[WeexError], retryable: bool) -> None:
    with pytest.raises(WeexError) as ei:
        raise_for_body(status, body, "GET /x")
    assert type(ei.value) is cls
    assert ei.value.retryable is retryable


def test_success_bodies_pass() -> None:
    for body in ([], [{"asset": "USDT"}], {"serverTime": 1}, {"code": "200", "msg": "success"}, None):
        raise_for_body(200, body, "GET /x")


# -- retries ----------------------------------------------------------------------------------------------


async def test_get_retried_with_growing_backoff_on_5xx(stub: WeexStub) -> None:
    answers = iter([(503, {"msg": "busy"}), (500, b"<html>oops</html>")])
    stub.route("GET", KLINES, lambda s, r: next(answers, None))
    async with client_for(stub, backoff_base_s=0.05, rng=lambda: 1.0) as c:
        assert len(await c.klines("BTCUSDT", "5m", limit=2)) == 2
    t = [r.mono for r in stub.calls(KLINES)]
    assert len(t) == 3
    assert t[1] - t[0] >= 0.045 and t[2] - t[1] >= 0.095  # 0.05 then 0.1: exponential


async def test_backoff_is_jittered_between_half_and_all_of_its_step(stub: WeexStub) -> None:
    """Clients that fail together must not retry together: each wait is drawn from [step/2, step]."""
    draws = iter([0.0, 0.5])  # the lowest and a middle draw
    answers = iter([(503, {"msg": "busy"}), (503, {"msg": "busy"})])
    stub.route("GET", KLINES, lambda s, r: next(answers, None))
    async with client_for(stub, backoff_base_s=0.2, rng=lambda: next(draws)) as c:
        assert len(await c.klines("BTCUSDT", "5m", limit=2)) == 2
    t = [r.mono for r in stub.calls(KLINES)]
    assert len(t) == 3
    first, second = t[1] - t[0], t[2] - t[1]
    assert 0.095 <= first < 0.19  # step 0.2 s, draw 0 -> 0.1 s
    assert 0.295 <= second < 0.39  # step 0.4 s, draw 0.5 -> 0.3 s
    # the default draw is random.random: 200 waits of one step spread over its upper half, none outside it
    c2 = client_for(stub, backoff_base_s=1.0, backoff_max_s=2.0)
    waits = [c2._backoff(3) for _ in range(200)]  # 8 s capped at 2 s
    assert all(1.0 <= w <= 2.0 for w in waits)
    assert max(waits) - min(waits) > 0.5 and len(set(waits)) > 150


async def test_get_gives_up_after_max_retries(stub: WeexStub) -> None:
    stub.route("GET", KLINES, lambda s, r: (503, {"msg": "down"}))
    async with client_for(stub, max_retries=2) as c:
        with pytest.raises(ExchangeUnavailable):
            await c.klines("BTCUSDT", "5m")
    assert len(stub.calls(KLINES)) == 3


async def test_get_retried_after_timeout(stub: WeexStub) -> None:
    async def slow_once(s: WeexStub, r: Recorded) -> None:
        if len(s.calls(KLINES)) == 1:
            await asyncio.sleep(1.0)

    stub.route("GET", KLINES, slow_once)
    async with client_for(stub, timeout_s=0.2) as c:
        t0 = time.monotonic()
        assert len(await c.klines("BTCUSDT", "5m", limit=2)) == 2
        assert time.monotonic() - t0 < 0.9  # the first call was abandoned at the timeout, not waited out
    assert len(stub.calls(KLINES)) == 2


async def test_requests_errors_and_response_times_are_counted(stub: WeexStub) -> None:
    """What /metrics?format=prometheus exposes as the exchange's request, error and response-time series: a 5xx and
    a timeout are errors, and every request that was answered or gave up is timed."""
    async def answer(s: WeexStub, r: Recorded) -> tuple[int, Any] | None:
        n = len(s.calls(KLINES))
        if n == 1:
            return 503, {"msg": "busy"}
        if n == 2:
            await asyncio.sleep(1.0)
        return None

    stub.route("GET", KLINES, answer)
    async with client_for(stub, timeout_s=0.2) as c:
        assert len(await c.klines("BTCUSDT", "5m", limit=2)) == 2
        assert (c.requests, c.errors, c.retries) == (3, 2, 2)
        assert c.latency.count == 3 and c.latency.max >= 0.2e6  # µs: the timed-out request waited its timeout
        assert c.latency.cumulative()[0][-1] == 3


async def test_writes_are_not_blindly_retried(stub: WeexStub) -> None:
    async def slow(s: WeexStub, r: Recorded) -> None:
        await asyncio.sleep(1.0)

    stub.route("POST", "/capi/v3/account/leverage", lambda s, r: (503, {"msg": "busy"}))
    stub.route("DELETE", ORDER, slow)
    async with client_for(stub, timeout_s=0.2) as c:
        with pytest.raises(ExchangeUnavailable):
            await c.set_leverage("BTCUSDT", 3, "ISOLATED")
        with pytest.raises(ExchangeUnavailable):
            await c.cancel_order("BTCUSDT", order_id=42)
    assert len(stub.calls("/capi/v3/account/leverage")) == 1
    assert len(stub.calls(ORDER, "DELETE")) == 1
    assert stub.calls(ORDER, "DELETE")[0].query == "symbol=BTCUSDT&orderId=42"


async def test_lost_submit_response_is_found_by_client_id_and_not_sent_twice(stub: WeexStub) -> None:
    book: dict[str, dict[str, Any]] = {}

    async def accept_then_lose_reply(s: WeexStub, r: Recorded) -> None:
        import orjson

        body = orjson.loads(r.body)
        book[body["newClientOrderId"]] = order_row(body["newClientOrderId"], "FILLED")
        await asyncio.sleep(1.0)  # the exchange executed it, but the answer never arrives in time

    def lookup(s: WeexStub, r: Recorded) -> tuple[int, Any]:
        row = book.get(r.params.get("origClientOrderId", ""))
        return (200, row) if row else (200, {"code": -2200, "msg": "Order does not exist."})

    stub.route("POST", ORDER, accept_then_lose_reply)
    stub.route("GET", ORDER, lookup)
    async with client_for(stub, timeout_s=0.2) as c:
        ack = await c.place_order("BTCUSDT", "BUY", "LONG", "0.001", "ap-lost-1")
    assert ack.recovered and ack.order_id == "9001" and ack.client_order_id == "ap-lost-1"
    assert len(stub.calls(ORDER, "POST")) == 1
    assert stub.calls(ORDER, "GET")[0].params["origClientOrderId"] == "ap-lost-1"


async def test_submit_that_never_arrived_is_resent_with_the_same_client_id(stub: WeexStub) -> None:
    posts = 0

    def gateway_then_ok(s: WeexStub, r: Recorded) -> tuple[int, Any]:
        nonlocal posts
        posts += 1
        if posts == 1:
            return 502, b"bad gateway"  # dropped before the matching engine saw it
        return 200, {"orderId": "77", "clientOrderId": "ap-2", "success": True}

    stub.route("POST", ORDER, gateway_then_ok)
    stub.route("GET", ORDER, lambda s, r: (200, {"code": -3200, "msg": "order not exist"}))
    async with client_for(stub) as c:
        ack = await c.place_order("BTCUSDT", "SELL", "LONG", "0.002", "ap-2", reduce_only=True)
    assert ack.order_id == "77" and not ack.recovered
    sent = stub.calls(ORDER, "POST")
    assert len(sent) == 2 and sent[0].body == sent[1].body  # same newClientOrderId, same bytes
    assert '"newClientOrderId":"ap-2","reduceOnly":true' in sent[0].body
    assert len(stub.calls(ORDER, "GET")) == 1  # looked up before re-sending


async def test_submit_with_unknown_outcome_and_failed_lookup_is_not_resent(stub: WeexStub) -> None:
    stub.route("POST", ORDER, lambda s, r: (500, b"<html>500</html>"))  # outcome unknown
    stub.route("GET", ORDER, lambda s, r: (503, b"<html>503</html>"))  # and the look-up cannot tell
    async with client_for(stub, max_retries=1) as c:
        with pytest.raises(ExchangeUnavailable):
            await c.place_order("BTCUSDT", "BUY", "LONG", "0.001", "ap-unknown")
    assert len(stub.calls(ORDER, "POST")) == 1  # never re-sent without knowing the first one is absent
    assert len(stub.calls(ORDER, "GET")) == 2  # the look-up (a GET) was retried


async def test_rejected_submit_maps_error_code(stub: WeexStub) -> None:
    stub.route("POST", ORDER, lambda s, r: (200, {"orderId": None, "clientOrderId": "ap-3", "success": False,
                                                  "errorCode": "-1116", "errorMessage": "Invalid orderType."}))
    async with client_for(stub) as c:
        with pytest.raises(InvalidOrderError):
            await c.place_order("BTCUSDT", "BUY", "LONG", "0.001", "ap-3")
    assert len(stub.calls(ORDER, "POST")) == 1


# -- 429 and the rate limiter ------------------------------------------------------------------------------


async def test_429_honours_retry_after_and_is_bounded(stub: WeexStub) -> None:
    stub.route("GET", KLINES, lambda s, r: (429, {"code": -1003, "msg": "Too many requests"}, {"Retry-After": "0.1"}))
    async with client_for(stub, max_retries=2) as c:
        with pytest.raises(RateLimitError) as ei:
            await c.klines("BTCUSDT", "5m")
    assert ei.value.retry_after_s == 0.1
    t = [r.mono for r in stub.calls(KLINES)]
    assert len(t) == 3  # bounded
    assert all(b - a >= 0.095 for a, b in zip(t, t[1:]))  # each retry waited for Retry-After


async def test_429_pauses_all_callers_no_retry_storm(stub: WeexStub) -> None:
    stub.route("GET", KLINES, lambda s, r: (429, {"msg": "Too many requests"}))
    async with client_for(stub, max_retries=1, backoff_base_s=0.1, rng=lambda: 1.0,
                          max_rate_limit_pause_s=0.4) as c:
        t0 = time.monotonic()
        results = await asyncio.gather(*(c.klines("BTCUSDT", "5m") for _ in range(4)), return_exceptions=True)
        elapsed = time.monotonic() - t0
    assert all(isinstance(r, RateLimitError) for r in results)
    t = sorted(r.mono for r in stub.calls(KLINES))
    assert len(t) == 4 * 2  # each caller: one try and one retry, never more
    # the first burst's four 429s are one episode (one 0.1 s pause, not four escalations); after it the
    # retries go out one at a time, each later 429 doubling the shared pause (0.2, 0.4, 0.4)
    assert t[4] - t[3] >= 0.09
    assert all(b - a >= 0.19 for a, b in zip(t[4:], t[5:]))
    assert elapsed < 2.5
    assert c.rate_limited == 8


async def test_429_then_success(stub: WeexStub) -> None:
    answers = iter([(429, {"msg": "slow down"}, {"Retry-After": "0.15"})])
    stub.route("GET", KLINES, lambda s, r: next(answers, None))
    async with client_for(stub) as c:
        t0 = time.monotonic()
        assert len(await c.klines("BTCUSDT", "5m", limit=1)) == 1
        assert time.monotonic() - t0 >= 0.15
        d = c.describe()
        assert (d["rate_limited"], d["retries"], d["requests"]) == (1, 1, 2)


async def test_token_bucket_spaces_requests_on_a_fake_clock() -> None:
    now = [0.0]

    async def fake_sleep(s: float) -> None:
        now[0] += s

    bucket = TokenBucket(10, 10, monotonic=lambda: now[0], sleep=fake_sleep)
    for _ in range(30):
        await bucket.acquire(1)
    assert now[0] == pytest.approx(2.0)  # 10 at once, then 10 per second
    for _ in range(4):
        await bucket.acquire(5)
    assert now[0] == pytest.approx(4.0)  # weight counts
    bucket.pause(3.0)
    await bucket.acquire(1)
    assert now[0] == pytest.approx(7.1)  # paused 3 s, then an empty bucket refills
    assert kline_weight(1000) > kline_weight(499) > kline_weight(99) == 1


async def test_limiter_spaces_real_requests(stub: WeexStub) -> None:
    stub.route("POST", ORDER, lambda s, r: (200, {"orderId": "1", "clientOrderId": "x", "success": True}))
    async with client_for(stub, weight_limiter=TokenBucket(5, 50), order_limiter=TokenBucket(2, 20)) as c:
        await asyncio.gather(*(c.klines("BTCUSDT", "5m", limit=2) for _ in range(15)))
        t = sorted(r.mono for r in stub.calls(KLINES))
        assert t[-1] - t[0] >= 0.18  # 5 in a burst, then 10 more at 50/s
        t0 = time.monotonic()
        await asyncio.gather(*(c.klines("BTCUSDT", "5m", limit=1000) for _ in range(2)))
        assert time.monotonic() - t0 >= 0.18  # weight 5 each: a limit-1000 page costs five small ones
        t0 = time.monotonic()
        await asyncio.gather(*(c.place_order("BTCUSDT", "BUY", "LONG", "0.001", f"o{i}") for i in range(6)))
        assert time.monotonic() - t0 >= 0.18  # order budget 2 then 20/s


# -- logging ----------------------------------------------------------------------------------------------


async def test_requests_logged_without_secrets(stub: WeexStub, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    aplog.configure_logging(tmp_path, level="DEBUG", console=True)
    try:
        stub.route("GET", BAL, balance_ok)
        stub.route("POST", ORDER, lambda s, r: (401, {"code": -1043, "msg": f"bad sign {API_KEY}"}))
        async with client_for(stub) as c:
            await c.balance()
            with pytest.raises(AuthError):
                await c.place_order("BTCUSDT", "BUY", "LONG", "0.001", "ap-log")
            aplog.get_logger("test").info("probe", header=API_KEY, note=f"pass={PASSPHRASE} secret={SECRET}")
    finally:
        aplog.close_logging()
        structlog.reset_defaults()
    text = "".join(p.read_text() for p in tmp_path.glob("*.log")) + capsys.readouterr().err
    assert "weex_request" in text and BAL in text and "latency_ms" in text and "weight" in text
    signatures = [r.headers[signing.HEADER_SIGN] for r in stub.requests if signing.HEADER_SIGN in r.headers]
    assert signatures
    for secret in (API_KEY, SECRET, PASSPHRASE, *signatures):
        assert secret not in text, secret


# -- history paging ----------------------------------------------------------------------------------------


async def test_history_pages_by_100_deduplicated_sorted_closed_only(stub: WeexStub, btc_candles: list[Candle]) -> None:
    bars = btc_candles[1000:1250]
    clock = FakeClock((bars[-1].ts + 300_000) / 1000 + 10)  # every bar closed; a forming one exists
    stub.clock = clock
    stub.add_candles(bars)

    def overlapping_unsorted(s: WeexStub, r: Recorded) -> tuple[int, Any]:
        start, end = int(r.params["startTime"]), int(r.params["endTime"])
        rows = [c for c in s.closed() if start - 2 * s.bar_ms <= c.ts <= end][:100]  # overlaps the last page
        from tests.weex_stub import kline_row

        return 200, [kline_row(c) for c in reversed(rows)]

    stub.route("GET", HIST, overlapping_unsorted)
    async with client_for(stub, clock=clock) as c:
        await c.sync_time()
        got = await c.history("BTCUSDT", "5m", bars[0].ts, bars[-1].ts + 10 * 300_000)
    assert got == bars
    pages = stub.calls(HIST)
    assert len(pages) == 3
    for p in pages:
        span = (int(p.params["endTime"]) - int(p.params["startTime"])) // 300_000 + 1
        assert span <= 100
        assert p.query.startswith("symbol=BTCUSDT&interval=5m&startTime=")


async def test_history_walks_over_an_exchange_outage(stub: WeexStub, btc_candles: list[Candle]) -> None:
    bars = btc_candles[2000:2300]
    kept = bars[:50] + bars[180:]  # 130 bars the exchange never had
    clock = FakeClock((bars[-1].ts + 300_000) / 1000 + 1)
    stub.clock = clock
    stub.add_candles(kept)
    async with client_for(stub, clock=clock) as c:
        got = await c.history("BTCUSDT", "5m", bars[0].ts, bars[-1].ts)
    assert got == kept
    assert len(stub.calls(HIST)) == 3


async def test_account_answers_parse_into_decimals(stub: WeexStub) -> None:
    stub.route("GET", "/capi/v3/account/position/allPosition", lambda s, r: (200, [{
        "id": "p1", "symbol": "BTCUSDT", "side": "LONG", "size": "0.010", "openValue": "940.48", "leverage": "5",
        "marginType": "CROSSED", "unrealizePnl": "-0.171", "liquidatePrice": "0", "createdTime": 1735753206286}]))
    stub.route("POST", "/capi/v3/account/income", lambda s, r: (200, {"hasNextPage": False, "items": [
        {"symbol": "BTCUSDT", "incomeType": "FUNDING_FEE", "income": "-0.0941", "asset": "USDT",
         "time": "1735776000000"}]}))
    stub.route("GET", "/capi/v3/account/commissionRate", lambda s, r: (200, {
        "symbol": "BTCUSDT", "makerCommissionRate": "0.0002", "takerCommissionRate": "0.0006"}))
    stub.route("GET", "/capi/v3/userTrades", lambda s, r: (200, [{
        "id": "t1", "orderId": "9001", "symbol": "BTCUSDT", "side": "BUY", "positionSide": "LONG",
        "price": "94048.0", "qty": "0.010", "quoteQty": "940.48", "commission": "0.564288",
        "commissionAsset": "USDT", "realizedPnl": "0", "maker": False, "time": 1735753206286}]))
    stub.route("GET", "/capi/v3/openOrders", lambda s, r: (200, [order_row("ap-9")]))
    async with client_for(stub) as c:
        [pos] = await c.positions()
        [inc] = await c.income("BTCUSDT", start_ms=1735776000000, income_type="FUNDING_FEE")
        fee = await c.commission_rate("BTCUSDT")
        [fill] = await c.user_trades("BTCUSDT", order_id="9001")
        [open_order] = await c.open_orders("BTCUSDT")
    assert pos.entry_price == Decimal("94048") and pos.unrealized_pnl == Decimal("-0.171")
    assert (inc.income_type, inc.income, inc.time) == ("FUNDING_FEE", Decimal("-0.0941"), 1735776000000)
    assert (fee.maker, fee.taker) == (Decimal("0.0002"), Decimal("0.0006"))
    assert fill.commission == Decimal("0.564288") and fill.raw["id"] == "t1"
    assert open_order.client_order_id == "ap-9"
    assert stub.calls("/capi/v3/account/income")[0].body == \
        '{"symbol":"BTCUSDT","incomeType":"FUNDING_FEE","startTime":1735776000000}'
    assert stub.calls("/capi/v3/userTrades")[0].query == "symbol=BTCUSDT&orderId=9001"


async def test_errors_and_answer_times_are_counted_for_the_monitor(stub: WeexStub) -> None:
    """describe() carries what the monitor's api_error_rate and api_response_time rules read: every attempt that
    failed (a 503 retried, a 429, an error body) and the time of every answer."""
    answers = iter([(503, {"msg": "busy"})])  # then the stub's own klines
    stub.route("GET", KLINES, lambda s, r: next(answers, None))
    stub.route("GET", BAL, lambda s, r: (429, {"msg": "slow down"}))
    async with client_for(stub, max_retries=0) as c:
        with pytest.raises(ExchangeUnavailable):
            await c.klines("BTCUSDT", "5m", limit=2)  # max_retries=0: the 503 is final
        assert len(await c.klines("BTCUSDT", "5m", limit=2)) == 2
        with pytest.raises(RateLimitError):
            await c.balance()
        d = c.describe()
    sent = len(stub.calls(KLINES)) + len(stub.calls(BAL)) + len(stub.calls(TIME))  # a signed call syncs the clock
    assert (d["requests"], d["errors"]) == (sent, 2) and sent == 4
    lat = d["latency_ms"]
    assert isinstance(lat, dict) and lat["count"] == sent and 0 < lat["p50"] <= lat["p99"] < 2000
