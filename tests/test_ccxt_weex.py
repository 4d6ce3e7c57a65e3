"""The stock ccxt ``weex`` class (pinned in the ``ccxt`` extra) trading against the fake on 127.0.0.1.

Why: the fake is only worth something if a third-party client that was written against the real exchange works
against it unchanged; and ccxt's request signing is an independent implementation to check ours against.  ccxt
is configured exactly as the reference says any server needs: ``urls`` pointed at it, ``defaultType: swap``, and
``adjustForTimeDifference`` because the fake's clock is the replay's, not this machine's.
"""

from __future__ import annotations

import gzip
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from alphapulse.exchange.weex import signing
from alphapulse.exchange.weex.fake import FakeWeex

ccxt = pytest.importorskip("ccxt.async_support", reason="install the ccxt extra: pip install -e '.[ccxt]'")
ccxt_errors = pytest.importorskip("ccxt.base.errors")

pytestmark = pytest.mark.timeout(30)

DATA_1H = Path(__file__).resolve().parent.parent / "alphapulse" / "data" / "BTC_USDT_USDT-1h.csv.gz"
SYMBOL = "BTC/USDT:USDT"
PINNED = "4.5.90"


def test_ccxt_version_is_the_pinned_one() -> None:
    import ccxt as ccxt_sync

    assert ccxt_sync.__version__ == PINNED  # early releases sign differently: the extra pins one version
    setup = (Path(__file__).resolve().parent.parent / "setup.cfg").read_text()
    assert f"ccxt=={PINNED}" in setup


@pytest.fixture
async def fake() -> Any:
    f = FakeWeex(DATA_1H, speed=1.0, seed=3)
    await f.start()
    yield f
    await f.stop()


def make_exchange(fake: FakeWeex, **overrides: Any) -> Any:
    config = {"apiKey": fake.api_key, "secret": fake.secret_key, "password": fake.passphrase,
              "options": {"defaultType": "swap", "adjustForTimeDifference": True}, "timeout": 5000,
              "enableRateLimit": False}  # the fake does not rate-limit unless told to; keep tests fast
    config.update(overrides)
    ex = ccxt.weex(config)
    ex.urls["api"] = {name: fake.url for name in ("public", "private", "contract", "contractPrivate")}
    return ex


@pytest.fixture
async def exchange(fake: FakeWeex) -> Any:
    ex = make_exchange(fake)
    yield ex
    await ex.close()


def file_rows() -> dict[int, list[float]]:
    with gzip.open(DATA_1H, "rt") as f:
        f.readline()
        return {int(r[0]): [float(x) for x in r[1:]] for r in (line.strip().split(",") for line in f)}


async def test_ccxt_loads_markets_and_candles_from_the_fake(exchange: Any, fake: FakeWeex) -> None:
    markets = await exchange.load_markets()
    assert list(markets) == [SYMBOL]
    m = markets[SYMBOL]
    assert m["swap"] and m["linear"] and m["settle"] == "USDT" and m["limits"]["amount"]["min"] == 0.001
    assert m["taker"] == 0.0006
    # what load_markets needs from any server: spot coins and markets (empty here), contracts, and the clock
    assert {k: fake.count(*k.split(" ")) for k in ("GET /api/v3/coins", "GET /api/v3/exchangeInfo",
                                                   "GET /capi/v3/market/exchangeInfo", "GET /capi/v3/market/time")} \
        == dict.fromkeys(("GET /api/v3/coins", "GET /api/v3/exchangeInfo", "GET /capi/v3/market/exchangeInfo",
                          "GET /capi/v3/market/time"), 1)
    candles = await exchange.fetch_ohlcv(SYMBOL, "1h", limit=50)
    real = file_rows()
    assert len(candles) == 50
    for ts, o, h, lo, c, _v in candles[:-1]:  # closed bars: exactly the file's
        assert [o, h, lo, c] == real[ts][:4]
    assert candles[-1][0] == fake.start_ms and candles[-1][1] == real[fake.start_ms][0]  # forming bar's open
    history = await exchange.fetch_ohlcv(SYMBOL, "1h", since=fake.start_ms - 150 * 3_600_000, limit=100,
                                         params={"historical": True})
    assert [c[0] for c in history] == [fake.start_ms - (150 - i) * 3_600_000 for i in range(100)]


async def test_ccxt_trades_a_full_cycle(exchange: Any, fake: FakeWeex) -> None:
    await exchange.load_markets()
    balance = await exchange.fetch_balance()
    assert balance["USDT"]["total"] == 10000.0 and balance["USDT"]["free"] == 10000.0

    order = await exchange.create_order(SYMBOL, "market", "buy", 0.02, params={"clientOrderId": "ccxt-open-1"})
    assert order["clientOrderId"] == "ccxt-open-1"
    fetched = await exchange.fetch_order(order["id"], SYMBOL)
    real_open = file_rows()[fake.start_ms][0]
    assert fetched["status"] == "closed" and fetched["filled"] == 0.02 and fetched["average"] == real_open
    assert fetched["side"] == "buy" and fetched["type"] == "market"
    (engine_order,) = fake.orders
    assert str(engine_order.order_id) == order["id"] and engine_order.position_side == "LONG"

    (pos,) = await exchange.fetch_positions()
    assert pos["side"] == "long" and pos["contracts"] == 0.02 and pos["entryPrice"] == real_open
    assert pos["marginMode"] == "cross" and pos["leverage"] == 20.0

    limit = await exchange.create_order(SYMBOL, "limit", "buy", 0.01, 50000)
    (open_order,) = await exchange.fetch_open_orders(SYMBOL)
    assert open_order["id"] == limit["id"] and open_order["status"] == "open" and open_order["price"] == 50000.0
    cancelled = await exchange.cancel_order(limit["id"], SYMBOL)
    assert cancelled["status"] == "canceled"
    assert await exchange.fetch_open_orders(SYMBOL) == []
    assert [o.status for o in fake.orders] == ["FILLED", "CANCELED"]

    # ccxt's reduceOnly sell closes the long (side=SELL, positionSide=LONG in hedge mode)
    close = await exchange.create_order(SYMBOL, "market", "sell", 0.02, params={"reduceOnly": True})
    assert fake.engine.orders[int(close["id"])].position_side == "LONG"
    assert await exchange.fetch_positions() == []
    trades = await exchange.fetch_my_trades(SYMBOL)
    assert [t["side"] for t in trades] == ["buy", "sell"]
    fee_total = sum(Decimal(str(t["fee"]["cost"])) for t in trades)
    balance = await exchange.fetch_balance()
    assert Decimal(str(balance["USDT"]["total"])) == Decimal("10000") - fee_total  # same bar: no pnl, no funding
    assert fake.balance == Decimal("10000") - fake.engine.total_fees


async def test_ccxt_signatures_agree_with_ours(exchange: Any, fake: FakeWeex) -> None:
    await exchange.load_markets()
    await exchange.fetch_balance()
    order = await exchange.create_order(SYMBOL, "limit", "buy", 0.01, 50000)
    await exchange.fetch_order(order["id"], SYMBOL)
    await exchange.cancel_order(order["id"], SYMBOL)
    a = await exchange.create_order(SYMBOL, "limit", "buy", 0.01, 50000)
    b = await exchange.create_order(SYMBOL, "limit", "sell", 0.01, 150000, params={"positionSide": "SHORT"})
    cancelled = await exchange.cancel_orders([a["id"], b["id"]], SYMBOL)  # DELETE with a signed JSON body
    assert sorted(o["id"] for o in cancelled) == sorted([a["id"], b["id"]])
    assert all(o["status"] == "canceled" for o in cancelled) and fake.engine.open_orders() == []
    signed = [r for r in fake.requests if signing.HEADER_SIGN in r.headers]
    methods = {r.method for r in signed}
    assert methods == {"GET", "POST", "DELETE"} and any(r.query for r in signed) and any(r.body for r in signed)
    assert any(r.method == "DELETE" and r.body for r in signed)
    for r in signed:
        ts = r.headers[signing.HEADER_TIMESTAMP]
        ours = signing.sign_request(fake.secret_key, ts, r.method, r.path, r.query, r.body)
        assert ours == r.headers[signing.HEADER_SIGN], (r.method, r.path, r.query, r.body)
        assert r.status == 200
    # and a body we sign the way our client does is byte-identical to ccxt's prehash for the same request
    post = next(r for r in signed if r.method == "POST")
    assert signing.prehash(post.headers[signing.HEADER_TIMESTAMP], "POST", "/capi/v3/order", "", post.body) == (
        post.headers[signing.HEADER_TIMESTAMP] + "POST/capi/v3/order" + post.body)


async def test_ccxt_maps_the_fakes_errors_to_its_exception_classes(fake: FakeWeex) -> None:
    bad = make_exchange(fake, secret="not-the-secret")
    try:
        await bad.load_markets()
        with pytest.raises(ccxt_errors.AuthenticationError):
            await bad.fetch_balance()
    finally:
        await bad.close()
    ex = make_exchange(fake)
    try:
        await ex.load_markets()
        with pytest.raises(ccxt_errors.InvalidOrder):  # -3200: ccxt maps it to InvalidOrder, as the reference says
            await ex.fetch_order("123", SYMBOL)
        fake.set_faults("ratelimit=x1@/capi/v3/account/balance")
        with pytest.raises(ccxt_errors.RateLimitExceeded):
            await ex.fetch_balance()
        fake.set_faults("error5xx=x1@/capi/v3/account/balance")
        with pytest.raises(ccxt_errors.ExchangeNotAvailable):
            await ex.fetch_balance()
        fake.set_faults("timeout=x1:ms=3000@/capi/v3/account/balance")
        ex.timeout = 300
        with pytest.raises(ccxt_errors.RequestTimeout):
            await ex.fetch_balance()
        with pytest.raises(ccxt_errors.InsufficientFunds):  # "available amount not enough"
            await ex.create_order(SYMBOL, "market", "buy", 100)
    finally:
        await ex.close()
