"""The fake WEEX exchange over real HTTP and WebSocket on 127.0.0.1, driven by the bundled real 1h candles.

Every expectation is computed from the candle file itself (the bar a fill must use, the bar a limit order must
fill on, the mark price at a funding time), never copied from the fake's own answers, so a wrong clock, fill
rule or booking fails here.  Clocks are moved with ``FakeWeex.advance`` where exact bars matter and run at high
``speed`` where only "time passes" matters, so every test takes well under 10 s.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl

from alphapulse.domain import Candle
from alphapulse.exchange.weex import signing
from alphapulse.exchange.weex.fake import FakeWeex
from alphapulse.exchange.weex.fake_faults import parse_spec

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parent.parent
DATA_1H = REPO / "alphapulse" / "data" / "BTC_USDT_USDT-1h.csv.gz"
HOUR = 3_600_000
Q8 = Decimal("0.00000001")


def money(x: Decimal) -> Decimal:
    return x.quantize(Q8, rounding=ROUND_HALF_EVEN)


@pytest.fixture(scope="module")
def candles() -> list[Candle]:
    """The bundled real BTCUSDT perpetual 1h candles (2024-12-31 .. 2025-08-31), parsed independently of the fake."""
    with gzip.open(DATA_1H, "rt") as f:
        assert f.readline().strip() == "timestamp,open,high,low,close,volume"
        rows = [line.strip().split(",") for line in f if line.strip()]
    return [Candle(int(r[0]), float(r[1]), float(r[2]), float(r[3]), float(r[4]), float(r[5])) for r in rows]


def bar_index(candles: list[Candle], t: int) -> int:
    return next(i for i, c in enumerate(candles) if c.ts <= t < c.ts + HOUR)


def px(x: float) -> Decimal:
    return Decimal(repr(x)).quantize(Decimal("0.1"))


async def _body(r: aiohttp.ClientResponse) -> Any:
    """JSON from the API; the text of a gateway error page (5xx/429 faults) otherwise."""
    text = await r.text()
    return json.loads(text) if r.content_type == "application/json" else text


class Api:
    """A minimal signed client built on our signing module (the one the daemon's client uses)."""

    def __init__(self, fake: FakeWeex, session: aiohttp.ClientSession) -> None:
        self.fake = fake
        self.session = session

    async def public(self, path: str, **params: Any) -> tuple[int, Any]:
        query = signing.encode_query(params.items())
        url = yarl.URL(self.fake.url + path + (f"?{query}" if query else ""), encoded=True)
        async with self.session.get(url) as r:
            return r.status, await _body(r)

    async def call(self, method: str, path: str, params: dict[str, Any] | None = None, body: Any = None, *,
                   ts: int | None = None, key: str | None = None, secret: str | None = None,
                   passphrase: str | None = None, drop: tuple[str, ...] = (), headers: dict[str, str] | None = None,
                   timeout: float | None = None) -> tuple[int, Any]:
        query = signing.encode_query((params or {}).items())
        text = json.dumps(body, separators=(",", ":")) if body is not None else ""
        f = self.fake
        h = signing.signed_headers(key or f.api_key, secret or f.secret_key, passphrase or f.passphrase,
                                   ts if ts is not None else f.server_time_ms(), method, path, query, text)
        for name in drop:
            h.pop(name)
        h.update(headers or {})
        url = yarl.URL(f.url + path + (f"?{query}" if query else ""), encoded=True)
        tmo = aiohttp.ClientTimeout(total=timeout) if timeout else None
        async with self.session.request(method, url, data=text or None, headers=h, timeout=tmo) as r:
            return r.status, await _body(r)

    async def order(self, **body: Any) -> tuple[int, Any]:
        body.setdefault("symbol", "BTCUSDT")
        return await self.call("POST", "/capi/v3/order", body=body)

    async def ok(self, method: str, path: str, params: dict[str, Any] | None = None, body: Any = None) -> Any:
        status, data = await self.call(method, path, params, body)
        assert status == 200, data
        return data


@pytest.fixture
async def fake() -> Any:
    f = FakeWeex(DATA_1H, speed=1.0, seed=1, ping_interval_s=0.3)
    await f.start()
    yield f
    await f.stop()


@pytest.fixture
async def api(fake: FakeWeex) -> Any:
    async with aiohttp.ClientSession() as session:
        yield Api(fake, session)


# -- clock and market data -------------------------------------------------------------------------------


async def test_clock_starts_after_warmup_and_runs_at_speed(candles: list[Candle]) -> None:
    f = FakeWeex(DATA_1H, speed=7200.0)
    assert f.start_ms == candles[200].ts  # 200 closed bars are available for warm-up
    await f.start()
    try:
        async with aiohttp.ClientSession() as s:
            api = Api(f, s)

            async def clocks() -> tuple[int, int]:
                _, t = await api.public("/capi/v3/market/time")
                _, rows = await api.public("/capi/v3/market/klines", symbol="BTCUSDT", interval="1h", limit=1)
                return t["serverTime"], rows[-1][0]  # server clock, open time of the forming bar

            (s0, bar0), w0 = await clocks(), time.monotonic()
            await asyncio.sleep(0.5)
            (s1, bar1), wall = await clocks(), time.monotonic() - w0
        assert bar0 == candles[200].ts
        # market time ran 7200x: >= 0.5 s of wall time is >= 1 market hour, so the forming bar moved on
        assert bar1 - bar0 in (HOUR, 2 * HOUR)
        # the server's signing clock runs at wall pace from start_ms (7200x would be ~3.6e6 ms here)
        assert abs((s1 - s0) - wall * 1000) < 400
        assert s0 >= candles[200].ts
    finally:
        await f.stop()


async def test_market_clock_speed_is_exact_in_state(candles: list[Candle]) -> None:
    f = FakeWeex(candles, speed=36_000.0)
    await f.start()
    try:
        async with aiohttp.ClientSession() as s:
            w0 = time.monotonic()
            async with s.get(f.url + "/fake/state") as r:
                a = await r.json()
            await asyncio.sleep(0.4)
            async with s.get(f.url + "/fake/state") as r:
                b = await r.json()
            wall = time.monotonic() - w0  # an upper bound of the wall time between the two readings
        assert 0.4 * 36_000_000 <= b["now_ms"] - a["now_ms"] <= wall * 36_000_000
        # exactly the bars whose close the clock passed in between were closed
        passed = sum(1 for c in candles if a["now_ms"] < c.ts + HOUR <= b["now_ms"])
        assert b["closed_bars"] - a["closed_bars"] == passed >= 4
    finally:
        await f.stop()


async def test_klines_serve_closed_bars_and_the_forming_bar(api: Api, fake: FakeWeex, candles: list[Candle]) -> None:
    fake.advance(HOUR // 2)  # half-way through bar 200
    status, rows = await api.public("/capi/v3/market/klines", symbol="BTCUSDT", interval="1h", limit=5)
    assert status == 200 and len(rows) == 5
    assert [r[0] for r in rows] == [c.ts for c in candles[196:201]]
    for row, c in zip(rows[:4], candles[196:200]):  # closed bars are the file's bars
        assert [Decimal(x) for x in row[1:5]] == [px(c.open), px(c.high), px(c.low), px(c.close)]
    forming, real = rows[4], candles[200]
    assert Decimal(forming[1]) == px(real.open)
    assert px(real.low) <= Decimal(forming[3]) <= Decimal(forming[4]) <= Decimal(forming[2]) <= px(real.high)
    assert Decimal(forming[5]) < Decimal(repr(real.volume))  # partial volume
    status, err = await api.public("/capi/v3/market/klines", symbol="BTCUSDT", interval="1h", limit=1001)
    assert status == 400 and err["code"] == -1140
    status, err = await api.public("/capi/v3/market/klines", symbol="ETHUSDT", interval="1h", limit=5)
    assert status == 400 and err["code"] == -1121


async def test_history_klines_page_back_through_closed_bars_only(api: Api, fake: FakeWeex,
                                                                candles: list[Candle]) -> None:
    now = fake.now_ms()
    got: list[list[Any]] = []
    end = now
    while len(got) < 200:  # page backwards, at most 100 rows a call
        start = end - 100 * HOUR
        status, rows = await api.public("/capi/v3/market/historyKlines", symbol="BTCUSDT", interval="1h",
                                        startTime=start, endTime=end)
        assert status == 200 and 0 < len(rows) <= 100
        got = rows + got
        end = rows[0][0] - 1
    assert [r[0] for r in got] == [c.ts for c in candles[:200]]
    assert Decimal(got[-1][4]) == px(candles[199].close)
    # asking for the future returns nothing the clock has not closed
    status, rows = await api.public("/capi/v3/market/historyKlines", symbol="BTCUSDT", interval="1h",
                                    startTime=now, endTime=now + 50 * HOUR)
    assert status == 200 and rows == []
    status, err = await api.public("/capi/v3/market/historyKlines", symbol="BTCUSDT", interval="1h",
                                   startTime=now, endTime=now - HOUR)
    assert err["code"] == -1171


async def test_exchange_info_ticker_premium_and_funding_history(api: Api, fake: FakeWeex) -> None:
    _, info = await api.public("/capi/v3/market/exchangeInfo")
    (sym,) = info["symbols"]
    assert sym["symbol"] == "BTCUSDT" and sym["minOrderSize"] == "0.001" and sym["quantityPrecision"] == "3"
    assert sym["takerFeeRate"] == "0.0006"
    _, ticker = await api.public("/capi/v3/market/ticker/24hr", symbol="BTCUSDT")
    assert Decimal(ticker["lastPrice"]) > 0
    _, prem = await api.public("/capi/v3/market/premiumIndex", symbol="BTCUSDT")
    assert prem["nextFundingTime"] % (8 * HOUR) == 0 and prem["nextFundingTime"] > fake.now_ms() - 1000
    _, hist = await api.public("/capi/v3/market/fundingRate", symbol="BTCUSDT", limit=3)
    assert len(hist) == 3 and all(h["fundingTime"] % (8 * HOUR) == 0 for h in hist)
    assert hist[-1]["fundingTime"] <= fake.now_ms()
    assert await api.public("/api/v3/coins") == (200, [])
    assert await api.public("/api/v3/exchangeInfo") == (200, {"symbols": []})
    status, err = await api.public("/capi/v3/market/nothingHere")
    assert (status, err["code"]) == (404, -1000)


async def test_wrong_method_and_batch_orders(api: Api, fake: FakeWeex) -> None:
    status, err = await api.call("GET", "/capi/v3/account/income")  # income is a POST
    assert (status, err["code"]) == (405, -1150)
    status, err = await api.call("POST", "/capi/v3/batchOrders", body={"batchOrders": []})
    assert (status, err["code"]) == (405, -1150)  # as the real venue: batch placement is not supported
    _, a = await api.order(side="BUY", positionSide="LONG", type="LIMIT", price="1000.0", quantity="0.010")
    result = await api.ok("DELETE", "/capi/v3/batchOrders", body={"orderIdList": [str(a["orderId"]), "42"]})
    assert [o["orderId"] for o in result["orderList"]] == [a["orderId"]]
    assert result["orderList"][0]["status"] == "CANCELED"
    assert result["failedList"] == [{"orderId": "42", "errorCode": "-3200", "errorMsg": "Order does not exist."}]


# -- authentication --------------------------------------------------------------------------------------


async def test_signed_request_is_accepted(api: Api) -> None:
    (bal,) = await api.ok("GET", "/capi/v3/account/balance")
    assert bal == {"asset": "USDT", "balance": "10000.00000000", "availableBalance": "10000.00000000",
                   "frozen": "0", "unrealizePnl": "0"}


@pytest.mark.parametrize("change, code, http", [
    ({"drop": ("ACCESS-KEY",)}, -1040, 401),
    ({"drop": ("ACCESS-SIGN",)}, -1041, 401),
    ({"drop": ("ACCESS-TIMESTAMP",)}, -1042, 401),
    ({"headers": {"ACCESS-TIMESTAMP": "yesterday"}}, -1043, 401),
    ({"key": "someone-else"}, -1044, 401),
    ({"secret": "wrong-secret"}, -1047, 401),
    ({"passphrase": "wrong-pass"}, -1049, 401),
    ({"headers": {"ACCESS-TIMESTAMP": "1"}}, -1046, 400),
])
async def test_each_auth_failure_has_its_code(api: Api, change: dict[str, Any], code: int, http: int) -> None:
    status, body = await api.call("GET", "/capi/v3/account/balance", {"symbol": "BTCUSDT"}, **change)
    assert (status, body["code"]) == (http, code), body


async def test_timestamp_window_and_tampered_query(api: Api, fake: FakeWeex) -> None:
    now = fake.server_time_ms()
    for offset, ok in ((-29_000, True), (29_000, True), (-31_000, False), (31_000, False)):
        status, body = await api.call("GET", "/capi/v3/account/balance", ts=now + offset)
        assert (status == 200) is ok, (offset, body)
        if not ok:
            assert body["code"] == -1046
    # a signature over one query does not authorise another
    ts = fake.server_time_ms()
    h = signing.signed_headers(fake.api_key, fake.secret_key, fake.passphrase, ts, "GET", "/capi/v3/openOrders",
                               "symbol=BTCUSDT")
    async with api.session.get(fake.url + "/capi/v3/openOrders?symbol=ETHUSDT", headers=h) as r:
        assert r.status == 401 and (await r.json())["code"] == -1047
    # POST must be JSON
    status, body = await api.call("POST", "/capi/v3/order", body={"symbol": "BTCUSDT"},
                                  headers={"Content-Type": "text/plain"})
    assert body["code"] == -1045


# -- orders, fills, positions, balance ---------------------------------------------------------------------


async def test_market_order_fills_at_bar_open_with_fee_position_and_balance(api: Api, fake: FakeWeex,
                                                                           candles: list[Candle]) -> None:
    fake.advance(HOUR + 20 * 60_000)  # 20 minutes into bar 201
    bar = candles[bar_index(candles, fake.now_ms())]
    assert bar.ts == candles[201].ts
    reply = await api.ok("POST", "/capi/v3/order", body={"symbol": "BTCUSDT", "side": "BUY", "positionSide": "LONG",
                                                         "type": "MARKET", "quantity": "0.025",
                                                         "newClientOrderId": "ap-open-1"})
    assert reply["success"] is True and reply["clientOrderId"] == "ap-open-1"
    price = px(bar.open)
    fee = money(Decimal("0.025") * price * Decimal("0.0006"))
    order = await api.ok("GET", "/capi/v3/order", {"orderId": reply["orderId"]})
    assert order["status"] == "FILLED" and Decimal(order["avgPrice"]) == price and order["executedQty"] == "0.025"
    (trade,) = await api.ok("GET", "/capi/v3/userTrades", {"symbol": "BTCUSDT"})
    assert Decimal(trade["price"]) == price and Decimal(trade["commission"]) == fee
    assert trade["qty"] == "0.025" and trade["realizedPnl"] == "0" and trade["orderId"] == reply["orderId"]
    assert trade["time"] == fake.fills[0].time and bar.ts <= trade["time"] < bar.ts + HOUR
    (pos,) = await api.ok("GET", "/capi/v3/account/position/allPosition")
    assert pos["side"] == "LONG" and pos["size"] == "0.025" and pos["marginType"] == "CROSSED"
    assert Decimal(pos["openValue"]) == money(Decimal("0.025") * price)
    (bal,) = await api.ok("GET", "/capi/v3/account/balance")
    assert Decimal(bal["balance"]) == Decimal("10000") - fee
    assert Decimal(bal["frozen"]) == money(Decimal("0.025") * price / 20)


async def test_slippage_moves_market_fills_against_the_taker_and_ioc_limits_do_not_rest(
        candles: list[Candle]) -> None:
    f = FakeWeex(DATA_1H, slippage_bps=Decimal("10"))
    await f.start()
    try:
        async with aiohttp.ClientSession() as s:
            api = Api(f, s)
            await api.ok("POST", "/capi/v3/order", body={"symbol": "BTCUSDT", "side": "BUY", "positionSide": "LONG",
                                                         "type": "MARKET", "quantity": "0.010"})
            await api.ok("POST", "/capi/v3/order", body={"symbol": "BTCUSDT", "side": "SELL", "positionSide": "LONG",
                                                         "type": "MARKET", "quantity": "0.010"})
            opened = px(candles[bar_index(candles, f.fills[0].time)].open)
            assert [fill.price for fill in f.fills] == [(opened * Decimal("1.001")).quantize(Decimal("0.1")),
                                                        (opened * Decimal("0.999")).quantize(Decimal("0.1"))]
            assert f.fills[1].realized_pnl < 0  # a round trip through slippage loses money
            ioc = await api.ok("POST", "/capi/v3/order", body={"symbol": "BTCUSDT", "side": "BUY",
                                                               "positionSide": "LONG", "type": "LIMIT",
                                                               "price": "1000.0", "quantity": "0.010",
                                                               "timeInForce": "IOC"})
            order = await api.ok("GET", "/capi/v3/order", {"orderId": ioc["orderId"]})
            assert order["status"] == "CANCELED" and order["executedQty"] == "0.000"
            assert await api.ok("GET", "/capi/v3/openOrders") == []
    finally:
        await f.stop()


@pytest.mark.parametrize("side", ["LONG", "SHORT"])
async def test_reduce_only_close_realizes_pnl_and_balance_reconciles_to_the_cent(
        api: Api, fake: FakeWeex, candles: list[Candle], side: str) -> None:
    open_side, close_side = ("BUY", "SELL") if side == "LONG" else ("SELL", "BUY")
    qty = Decimal("0.137")
    i0 = bar_index(candles, fake.now_ms())
    await api.ok("POST", "/capi/v3/order", body={"symbol": "BTCUSDT", "side": open_side, "positionSide": side,
                                                 "type": "MARKET", "quantity": str(qty)})
    fake.advance(30 * HOUR)  # crosses at least three funding times
    i1 = bar_index(candles, fake.now_ms())
    reply = await api.ok("POST", "/capi/v3/order", body={"symbol": "BTCUSDT", "side": close_side,
                                                         "positionSide": side, "type": "MARKET",
                                                         "quantity": str(qty), "reduceOnly": True})
    p0, p1 = px(candles[i0].open), px(candles[i1].open)
    realized = (p1 - p0) * qty if side == "LONG" else (p0 - p1) * qty
    fees = money(qty * p0 * Decimal("0.0006")) + money(qty * p1 * Decimal("0.0006"))
    (_, close_fill) = await api.ok("GET", "/capi/v3/userTrades", {"symbol": "BTCUSDT"})
    assert close_fill["orderId"] == reply["orderId"] and Decimal(close_fill["realizedPnl"]) == realized
    funding_items = (await api.ok("POST", "/capi/v3/account/income", body={"incomeType": "position_funding"}))["items"]
    assert len(funding_items) >= 3
    funding = sum(Decimal(i["income"]) for i in funding_items)
    assert (funding < 0) == (side == "LONG")  # positive rate: longs pay, shorts receive
    (bal,) = await api.ok("GET", "/capi/v3/account/balance")
    assert Decimal(bal["balance"]) == Decimal("10000") - fees + realized + funding
    assert await api.ok("GET", "/capi/v3/account/position/allPosition") == []
    # the income history alone explains the balance too
    items = (await api.ok("POST", "/capi/v3/account/income", body={"limit": 100}))["items"]
    assert Decimal("10000") + sum(Decimal(i["income"]) + Decimal(i["fillFee"]) for i in items) == Decimal(
        bal["balance"])


async def test_same_client_order_id_never_creates_a_second_order(api: Api, fake: FakeWeex) -> None:
    body = {"symbol": "BTCUSDT", "side": "BUY", "positionSide": "LONG", "type": "MARKET", "quantity": "0.010",
            "newClientOrderId": "ap-dup-1"}
    first = await api.ok("POST", "/capi/v3/order", body=body)
    second = await api.ok("POST", "/capi/v3/order", body=body | {"quantity": "0.500"})
    assert second["orderId"] == first["orderId"] and second["clientOrderId"] == "ap-dup-1"
    assert len(fake.orders) == 1 and len(fake.fills) == 1 and fake.engine.duplicate_client_ids == 1
    (pos,) = await api.ok("GET", "/capi/v3/account/position/allPosition")
    assert pos["size"] == "0.010"


async def test_limit_order_rests_is_found_by_client_id_and_cancels(api: Api, fake: FakeWeex) -> None:
    reply = await api.ok("POST", "/capi/v3/order", body={"symbol": "BTCUSDT", "side": "BUY", "positionSide": "LONG",
                                                         "type": "LIMIT", "price": "1000.0", "quantity": "0.010",
                                                         "timeInForce": "GTC", "newClientOrderId": "ap-limit-1"})
    order = await api.ok("GET", "/capi/v3/order", {"origClientOrderId": "ap-limit-1"})
    assert order["orderId"] == reply["orderId"] and order["status"] == "NEW" and order["price"] == "1000.0"
    assert [o["orderId"] for o in await api.ok("GET", "/capi/v3/openOrders", {"symbol": "BTCUSDT"})] == [
        reply["orderId"]]
    (bal,) = await api.ok("GET", "/capi/v3/account/balance")
    assert Decimal(bal["frozen"]) == Decimal("0.5")  # 0.01 * 1000 / 20 reserved for the order
    cancelled = await api.ok("DELETE", "/capi/v3/order", {"origClientOrderId": "ap-limit-1"})
    assert cancelled["status"] == "CANCELED"
    status, err = await api.call("DELETE", "/capi/v3/order", {"orderId": reply["orderId"]})
    assert status == 400 and err["code"] == -3200
    status, err = await api.call("GET", "/capi/v3/order", {"origClientOrderId": "never-sent"})
    assert status == 400 and err["code"] == -3200
    assert await api.ok("GET", "/capi/v3/openOrders") == []
    (hist,) = await api.ok("GET", "/capi/v3/order/history", {"symbol": "BTCUSDT"})
    assert hist["status"] == "CANCELED"


async def test_limit_order_fills_on_the_first_later_bar_trading_through(api: Api, fake: FakeWeex,
                                                                        candles: list[Candle]) -> None:
    i0 = bar_index(candles, fake.now_ms())
    limit = px(candles[i0].open) - Decimal("1500")
    j = next(j for j in range(i0 + 1, len(candles)) if px(candles[j].low) <= limit)
    reply = await api.ok("POST", "/capi/v3/order", body={"symbol": "BTCUSDT", "side": "BUY", "positionSide": "LONG",
                                                         "type": "LIMIT", "price": str(limit), "quantity": "0.010"})
    fake.advance(candles[j].ts - fake.now_ms() + HOUR - 5_000)  # 5 s (at speed 1) before bar j closes
    assert (await api.ok("GET", "/capi/v3/order", {"orderId": reply["orderId"]}))["status"] == "NEW"
    fake.advance(5_000)
    order = await api.ok("GET", "/capi/v3/order", {"orderId": reply["orderId"]})
    expected = min(limit, px(candles[j].open))
    assert order["status"] == "FILLED" and Decimal(order["avgPrice"]) == expected
    (trade,) = await api.ok("GET", "/capi/v3/userTrades", {"orderId": reply["orderId"]})
    assert trade["maker"] is True and Decimal(trade["commission"]) == money(Decimal("0.01") * expected *
                                                                           Decimal("0.0002"))
    assert trade["time"] == candles[j].ts + HOUR


@pytest.mark.parametrize("body, code", [
    ({"quantity": "0.0101"}, -1160),
    ({"quantity": "0.000"}, -1142),
    ({"quantity": "5000"}, -3007),
    ({"symbol": "ETHUSDT"}, -1121),
    ({"side": "HOLD"}, -1117),
    ({"type": "STOP"}, -1116),
    ({"type": "LIMIT", "price": "90000.0", "timeInForce": "DAY"}, -1115),
    ({"type": "LIMIT", "price": "90000.05"}, -1160),
    ({"side": "SELL"}, -1142),  # closes a LONG position that does not exist
    ({"quantity": "100"}, -1054),  # far more than 10000 USDT at 20x
    ({"reduceOnly": True}, -1128),  # BUY LONG only opens
    ({"newClientOrderId": "x" * 37}, -1180),
])
async def test_invalid_orders_are_rejected_with_the_reference_codes(api: Api, fake: FakeWeex, body: dict[str, Any],
                                                                    code: int) -> None:
    base = {"symbol": "BTCUSDT", "side": "BUY", "positionSide": "LONG", "type": "MARKET", "quantity": "0.010"}
    status, err = await api.call("POST", "/capi/v3/order", body=base | body)
    assert status == 400 and err["code"] == code, err
    assert fake.orders == []


async def test_quantity_below_min_order_size_is_rejected() -> None:
    f = FakeWeex(DATA_1H, min_order_size=Decimal("0.005"))
    await f.start()
    try:
        async with aiohttp.ClientSession() as s:
            status, err = await Api(f, s).order(side="BUY", positionSide="LONG", type="MARKET", quantity="0.004")
            assert (status, err["code"]) == (400, -1142) and "minOrderSize" in err["msg"]
            status, _ = await Api(f, s).order(side="BUY", positionSide="LONG", type="MARKET", quantity="0.005")
            assert status == 200
    finally:
        await f.stop()


async def test_funding_is_charged_at_each_funding_time_at_the_mark(api: Api, fake: FakeWeex,
                                                                   candles: list[Candle]) -> None:
    await api.ok("POST", "/capi/v3/order", body={"symbol": "BTCUSDT", "side": "BUY", "positionSide": "LONG",
                                                 "type": "MARKET", "quantity": "0.500"})
    t0 = fake.now_ms()
    fake.advance(24 * HOUR)
    items = (await api.ok("POST", "/capi/v3/account/income", body={"incomeType": "position_funding"}))["items"]
    times = [int(i["time"]) for i in items]
    assert times == [t for t in range((t0 // (8 * HOUR) + 1) * 8 * HOUR, t0 + 24 * HOUR + 1, 8 * HOUR)]
    for item in items:
        mark = px(candles[bar_index(candles, int(item["time"]))].open)
        assert Decimal(item["income"]) == -money(Decimal("0.5") * mark * Decimal("0.0001"))
    (pos,) = await api.ok("GET", "/capi/v3/account/position/allPosition")
    assert Decimal(pos["fundingFee"]) == sum(Decimal(i["income"]) for i in items)


async def test_funding_rates_come_from_a_funding_file(tmp_path: Path, candles: list[Candle]) -> None:
    start = candles[200].ts
    first = (start // (8 * HOUR) + 1) * 8 * HOUR
    path = tmp_path / "funding.csv"
    path.write_text(f"timestamp,funding_rate\n{first},0.0003\n{first + 4 * HOUR},-0.0002\n")
    f = FakeWeex(candles, speed=1.0, funding_file=path)
    await f.start()
    try:
        f.plant_position("SHORT", "1.000", entry_price="90000")
        f.advance(first + 4 * HOUR - f.now_ms())
        incomes = [i for i in f.engine.incomes if i.income_type == "position_funding"]
        m1 = px(candles[bar_index(candles, first)].open)
        m2 = px(candles[bar_index(candles, first + 4 * HOUR)].open)
        assert [(i.time, i.income) for i in incomes] == [(first, money(m1 * Decimal("0.0003"))),
                                                         (first + 4 * HOUR, -money(m2 * Decimal("0.0002")))]
    finally:
        await f.stop()


async def test_close_positions_and_settings_endpoints(api: Api, fake: FakeWeex) -> None:
    assert (await api.ok("POST", "/capi/v3/account/leverage", body={"symbol": "BTCUSDT", "marginType": "CROSSED",
                                                                    "crossLeverage": "5"}))["msg"] == "success"
    status, err = await api.call("POST", "/capi/v3/account/leverage", body={"symbol": "BTCUSDT", "leverage": 5})
    assert err["code"] == -1141  # there is no plain "leverage" field
    status, err = await api.call("POST", "/capi/v3/account/leverage", body={"symbol": "BTCUSDT",
                                                                            "crossLeverage": 1000})
    assert err["code"] == -3313
    (cfg,) = await api.ok("GET", "/capi/v3/account/symbolConfig", {"symbol": "BTCUSDT"})
    assert cfg["crossLeverage"] == "5.00"
    fees = await api.ok("GET", "/capi/v3/account/commissionRate", {"symbol": "BTCUSDT"})
    assert fees["takerCommissionRate"] == "0.0006"
    await api.ok("POST", "/capi/v3/order", body={"symbol": "BTCUSDT", "side": "BUY", "positionSide": "LONG",
                                                 "type": "MARKET", "quantity": "0.010"})
    (pos,) = await api.ok("GET", "/capi/v3/account/position/singlePosition", {"symbol": "BTCUSDT"})
    assert pos["leverage"] == "5.00"
    status, err = await api.call("POST", "/capi/v3/account/marginType", body={"symbol": "BTCUSDT",
                                                                              "marginType": "ISOLATED"})
    assert status == 400  # not with an open position
    (closed,) = await api.ok("POST", "/capi/v3/closePositions", body={"symbol": "BTCUSDT"})
    assert closed["success"] is True and closed["positionId"] == pos["id"]
    assert await api.ok("GET", "/capi/v3/account/position/allPosition") == []
    assert len(fake.fills) == 2


# -- WebSocket ---------------------------------------------------------------------------------------------


async def _recv_json(ws: aiohttp.ClientWebSocketResponse, timeout: float = 3.0) -> Any:
    msg = await ws.receive(timeout=timeout)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    return json.loads(msg.data)


async def _next_kline(ws: aiohttp.ClientWebSocketResponse) -> Any:
    """The next kline message, answering server pings on the way as a live client does."""
    while True:
        m = await _recv_json(ws)
        if m.get("event") == "ping":
            await ws.send_json({"id": "p", "method": "PONG"})
            continue
        return m


async def test_ws_subscribe_ack_and_kline_pushes(candles: list[Candle]) -> None:
    f = FakeWeex(DATA_1H, speed=36_000.0, ping_interval_s=30)  # 10 bars per wall second
    await f.start()
    try:
        async with aiohttp.ClientSession() as s, s.ws_connect(f.url + "/v3/ws") as ws:
            await ws.send_json({"id": "7", "method": "SUBSCRIBE", "params": ["ETHUSDT@kline_1h_LAST_PRICE"]})
            nack = await _recv_json(ws)
            assert nack["result"] is False and nack["id"] == "7"
            await ws.send_json({"id": "1", "method": "SUBSCRIBE", "params": ["BTCUSDT@kline_1h_LAST_PRICE"]})
            assert await _recv_json(ws) == {"result": True, "id": "1"}
            by_ts = {c.ts: c for c in candles}
            closed_seen = forming_seen = 0
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and (closed_seen < 3 or forming_seen < 3):
                m = await _recv_json(ws)
                assert m["e"] == "kline" and m["s"] == "BTCUSDT"
                (k,) = m["d"]
                assert k["i"] == "1h" and k["t"] + HOUR == k["T"]
                real = by_ts[k["t"]]
                if m["E"] >= k["T"]:  # a closed bar carries the real bar
                    assert (Decimal(k["o"]), Decimal(k["h"]), Decimal(k["l"]), Decimal(k["c"])) == (
                        px(real.open), px(real.high), px(real.low), px(real.close))
                    closed_seen += 1
                else:
                    assert Decimal(k["o"]) == px(real.open) and px(real.low) <= Decimal(k["l"])
                    assert Decimal(k["h"]) <= px(real.high)
                    forming_seen += 1
            assert closed_seen >= 3 and forming_seen >= 3
    finally:
        await f.stop()


async def test_ws_ping_pong_keeps_a_client_and_silence_drops_it() -> None:
    f = FakeWeex(DATA_1H, speed=1.0, ping_interval_s=0.2, pong_timeout_s=0.5)
    await f.start()
    try:
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(f.ws_url) as good:
                pings = 0
                while pings < 4:  # four rounds: longer than a ping interval plus the pong timeout
                    m = await _recv_json(good)
                    if m.get("event") == "ping":
                        assert int(m["time"]) > 0
                        pings += 1
                        await good.send_json({"id": str(pings), "method": "PONG"})
                assert not good.closed
            async with s.ws_connect(f.ws_url) as bad:
                m = await _recv_json(bad)
                assert m["event"] == "ping"
                closing = await bad.receive(timeout=2)  # never answered
                assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
                assert bad.close_code == 1008
        assert f.ws_stats["dropped_no_pong"] == 1 and f.ws_stats["pongs"] >= 4
    finally:
        await f.stop()


async def test_ws_private_handshake_auth_and_order_fill_pushes(candles: list[Candle]) -> None:
    f = FakeWeex(DATA_1H, speed=1.0, ping_interval_s=0.3, pong_timeout_s=1.0)
    await f.start()
    try:
        async with aiohttp.ClientSession() as s:
            ts = f.server_time_ms()
            good = {"ACCESS-KEY": f.api_key, "ACCESS-SIGN": signing.sign_ws_login(f.secret_key, ts),
                    "ACCESS-TIMESTAMP": str(ts), "ACCESS-PASSPHRASE": f.passphrase}
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await s.ws_connect(f.url + "/v3/ws/private",
                                   headers=good | {"ACCESS-SIGN": signing.sign_ws_login("wrong", ts)})
            assert err.value.status == 401
            async with s.ws_connect(f.url + "/v3/ws/private", headers=good) as ws:
                await ws.send_json({"id": "1", "method": "SUBSCRIBE", "params": ["orders", "fill"]})
                assert await _recv_json(ws) == {"result": True, "id": "1"}
                _, reply = await Api(f, s).order(side="BUY", positionSide="LONG", type="MARKET", quantity="0.050",
                                                 newClientOrderId="ws-1")
                got: dict[str, Any] = {}
                while len(got) < 2:
                    m = await _recv_json(ws)
                    if m.get("type") == "ping":  # the private stream pings with "type"
                        await ws.send_json({"id": "p", "method": "PONG"})
                        continue
                    got[m["e"]] = m["d"]
                (order,) = got["orders"]
                (fill,) = got["fill"]
                price = px(candles[bar_index(candles, f.fills[0].time)].open)
                assert order["id"] == str(reply["orderId"]) and order["status"] == "FILLED"
                assert order["clientOrderId"] == "ws-1" and order["cumFillSize"] == "0.050"
                assert fill["orderId"] == str(reply["orderId"]) and Decimal(fill["fillValue"]) == money(
                    Decimal("0.05") * price)
                assert Decimal(fill["fillFee"]) == money(Decimal("0.05") * price * Decimal("0.0006"))
                assert fill["direction"] == "TAKER" and fill["positionSide"] == "LONG"
    finally:
        await f.stop()


# -- fault injection ---------------------------------------------------------------------------------------


async def test_fault_latency_and_timeout_are_targeted(api: Api, fake: FakeWeex) -> None:
    (rule,) = fake.set_faults("latency=300ms@/capi/v3/market/time")
    t = time.monotonic()
    await api.public("/capi/v3/market/time")
    assert time.monotonic() - t >= 0.3
    await api.public("/capi/v3/market/exchangeInfo")
    assert (rule.seen, rule.fired) == (1, 1)  # other endpoints are not even considered
    fake.set_faults([{"kind": "timeout", "count": 1, "endpoint": "GET /capi/v3/account/balance"}])
    with pytest.raises(asyncio.TimeoutError):
        await api.call("GET", "/capi/v3/account/balance", timeout=0.3)
    assert (await api.call("GET", "/capi/v3/account/balance", timeout=2))[0] == 200  # next one is fine


async def test_fault_5xx_next_n_and_429_via_admin_endpoint(api: Api, fake: FakeWeex) -> None:
    async with api.session.post(fake.url + "/fake/faults",
                                json={"clear": True, "spec": "error5xx=x2:status=502@/capi/v3/market/*"}) as r:
        assert r.status == 200 and (await r.json())["rules"][0]["count"] == 2
    statuses = [(await api.public("/capi/v3/market/time"))[0] for _ in range(3)]
    assert statuses == [502, 502, 200]
    async with api.session.post(fake.url + "/fake/faults", json={"clear": True, "faults": [
            {"kind": "ratelimit", "probability": 1.0, "endpoint": "POST /capi/v3/order"}]}) as r:
        assert r.status == 200
    status, body = await api.order(side="BUY", positionSide="LONG", type="MARKET", quantity="0.010")
    assert status == 429 and "Too Many Requests" in body and fake.orders == []  # a rejected request is not executed
    async with api.session.get(fake.url + "/fake/faults") as r:
        rule = (await r.json())["rules"][0]
        assert rule["kind"] == "ratelimit" and rule["fired"] == 1
    async with api.session.delete(fake.url + "/fake/faults") as r:
        assert (await r.json())["rules"] == []
    assert (await api.order(side="BUY", positionSide="LONG", type="MARKET", quantity="0.010"))[0] == 200


async def test_fault_draws_are_reproducible_with_a_seed() -> None:
    async def run() -> list[int]:
        f = FakeWeex(DATA_1H, faults="error5xx=0.5", seed=42)
        await f.start()
        try:
            async with aiohttp.ClientSession() as s:
                return [(await Api(f, s).public("/capi/v3/market/time"))[0] for _ in range(20)]
        finally:
            await f.stop()

    first, second = await run(), await run()
    assert first == second and 503 in first and 200 in first


async def test_fault_lost_response_creates_the_order_and_a_retry_is_idempotent(api: Api, fake: FakeWeex) -> None:
    fake.set_faults("lost_response=x1:mode=close@POST/capi/v3/order")
    body = {"side": "BUY", "positionSide": "LONG", "type": "MARKET", "quantity": "0.010", "newClientOrderId": "ap-l1"}
    with pytest.raises(aiohttp.ClientError):
        await api.order(**body)
    order = await api.ok("GET", "/capi/v3/order", {"origClientOrderId": "ap-l1"})
    assert order["status"] == "FILLED"  # the order exists although the client never heard of it
    status, reply = await api.order(**body)  # the retry finds it instead of buying twice
    assert status == 200 and reply["orderId"] == order["orderId"] and len(fake.fills) == 1
    fake.set_faults("lost_response=x1:mode=5xx")
    status, _ = await api.order(**(body | {"newClientOrderId": "ap-l2"}))
    assert status == 500 and len(fake.orders) == 2


async def test_fault_partial_fill_fills_a_market_order_over_time(api: Api, fake: FakeWeex) -> None:
    fake.engine.partial_fill_interval_s = 0.15
    fake.set_faults("partial_fill=x1:parts=3@POST/capi/v3/order")
    reply = await api.order(side="BUY", positionSide="LONG", type="MARKET", quantity="0.100", newClientOrderId="pf")
    order = await api.ok("GET", "/capi/v3/order", {"orderId": reply[1]["orderId"]})
    assert order["status"] == "PARTIALLY_FILLED" and order["executedQty"] == "0.033"
    assert [o["orderId"] for o in await api.ok("GET", "/capi/v3/openOrders")] == [order["orderId"]]
    await asyncio.sleep(0.4)
    order = await api.ok("GET", "/capi/v3/order", {"orderId": order["orderId"]})
    assert order["status"] == "FILLED" and order["executedQty"] == "0.100"
    trades = await api.ok("GET", "/capi/v3/userTrades", {"orderId": order["orderId"]})
    assert [t["qty"] for t in trades] == ["0.033", "0.033", "0.034"]


async def test_fault_clock_skew_rejects_a_client_that_does_not_sync(api: Api, fake: FakeWeex) -> None:
    local = fake.now_ms()
    fake.set_faults("clock_skew=120s")
    _, t = await api.public("/capi/v3/market/time")
    assert t["serverTime"] - local >= 120_000
    status, body = await api.call("GET", "/capi/v3/account/balance", ts=fake.now_ms())  # unsynced client clock
    assert body["code"] == -1046
    status, _ = await api.call("GET", "/capi/v3/account/balance", ts=t["serverTime"])  # synced with /market/time
    assert status == 200


async def test_fault_ws_drop_and_silent_stream() -> None:
    f = FakeWeex(DATA_1H, speed=36_000.0, ping_interval_s=0.2, pong_timeout_s=0.5)
    await f.start()
    try:
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(f.ws_url) as ws:
                await ws.send_json({"id": "1", "method": "SUBSCRIBE", "params": ["BTCUSDT@kline_1h_LAST_PRICE"]})
                assert (await _recv_json(ws))["result"] is True
                assert (await _next_kline(ws))["e"] == "kline"
                f.set_faults("ws_silent=1")
                await asyncio.sleep(0.25)  # let in-flight messages drain
                while True:
                    try:
                        await ws.receive(timeout=0.05)
                    except TimeoutError:
                        break
                with pytest.raises(asyncio.TimeoutError):  # connected, but neither klines nor pings
                    await ws.receive(timeout=0.8)
                assert not ws.closed
                f.set_faults(None)  # the silence ends with the rule
                assert (await _next_kline(ws))["e"] == "kline"
                f.set_faults("ws_drop=x1")
                while True:
                    msg = await ws.receive(timeout=2)
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        break
                    if json.loads(msg.data).get("event") == "ping":
                        await ws.send_json({"id": "9", "method": "PONG"})
                assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED) and ws.close_code == 1011
        assert f.ws_stats["dropped_by_fault"] == 1
    finally:
        await f.stop()


async def test_foreign_position_and_order_planted_through_admin(api: Api, fake: FakeWeex) -> None:
    async with api.session.post(fake.url + "/fake/plant", json={"type": "position", "side": "SHORT", "size": "0.2",
                                                                "entryPrice": "95000"}) as r:
        assert r.status == 200
    async with api.session.post(fake.url + "/fake/plant", json={
            "type": "order", "order": {"side": "BUY", "positionSide": "LONG", "type": "LIMIT", "quantity": "0.010",
                                       "price": "1000.0", "newClientOrderId": "someone-else"}}) as r:
        assert r.status == 200, await r.text()
    (planted,) = await api.ok("GET", "/capi/v3/openOrders", {"symbol": "BTCUSDT"})
    assert planted["clientOrderId"] == "someone-else" and planted["status"] == "NEW"
    (pos,) = await api.ok("GET", "/capi/v3/account/position/allPosition")
    assert pos["side"] == "SHORT" and pos["size"] == "0.200" and pos["openValue"] == "19000.00000000"
    async with api.session.get(fake.url + "/fake/state") as r:
        state = await r.json()
    assert state["positions"][0]["origin"] == "foreign" and state["total_fees"] == "0"
    assert state["request_counts"]["GET /capi/v3/account/position/allPosition"] == 1


def test_fault_spec_parser_rejects_nonsense() -> None:
    rules = parse_spec("latency=200ms,error5xx=0.1@/capi/v3/market/*,lost_response=x1:mode=5xx@POST/capi/v3/order")
    assert [(r.kind, r.ms, r.probability, r.count, r.endpoint, r.mode) for r in rules] == [
        ("latency", 200, 1.0, None, None, "close"),
        ("error5xx", 0, 0.1, None, "/capi/v3/market/*", "close"),
        ("lost_response", 0, 1.0, 1, "POST/capi/v3/order", "5xx")]
    assert rules[2].matches("POST", "/capi/v3/order") and not rules[2].matches("GET", "/capi/v3/order")
    for bad in ("explode=1", "error5xx=2", "latency=fast", "partial_fill=x1:parts=1", "error5xx=1:colour=red"):
        with pytest.raises(ValueError):
            parse_spec(bad)


# -- CLI ---------------------------------------------------------------------------------------------------


def test_cli_rejects_a_bad_fault_spec_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    from alphapulse.exchange.weex.fake import main

    assert main(["--data", str(DATA_1H), "--faults", "explode=1"]) == 2
    assert "unknown fault kind 'explode'" in capsys.readouterr().err


def test_cli_runs_as_a_process_answers_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "alphapulse.exchange.weex.fake", "--port", "0", "--data",
                             str(DATA_1H), "--speed", "60", "--faults", "latency=1ms"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() else "")
        url = line.split("listening on ")[1].split()[0]
        import urllib.request

        with urllib.request.urlopen(url + "/capi/v3/market/time", timeout=5) as r:
            assert json.loads(r.read())["serverTime"] > 1_700_000_000_000
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
