"""A local fake of WEEX's contract API V3 (REST, public and private WebSocket) for tests, replays and demos.

Why it exists: nothing in the test suite may reach the real exchange, yet the daemon, our client and the stock
ccxt ``weex`` class must be exercised against something that signs, rejects, fills, charges fees and funding and
misbehaves like the real venue.  The fake replays a real candle file on its own clock
(``market time = start_ms + (wall - wall0) * speed``), serves only what that clock has closed, fills orders
against it (rules in :mod:`.fake_engine`) and injects faults on demand (:mod:`.fake_faults`).

Choices where the reference leaves room (each is what a stock client handles):

* A repeated ``newClientOrderId`` does not create a second order: the fake answers 200 with the *existing*
  order's id (the key is an idempotency key; a retry after a lost response must be safe).
* Validation failures answer HTTP 400 with ``{"code", "msg"}``; authentication failures HTTP 401; "order does
  not exist" (-3200) HTTP 400; acknowledgements of settings answer ``{"code": "200", "msg": "success"}``.
* Auth codes: missing key/sign/timestamp -1040/-1041/-1042, unparsable timestamp -1043, unknown key -1044,
  non-JSON content type on POST -1045 (ccxt's reading of that code), timestamp outside +-``auth_window_ms`` of
  the server clock -1046, bad signature -1047, wrong passphrase -1049.
* Two clocks: *market time* (candles, fills, funding) runs at ``speed`` and jumps with ``advance()``; the
  *server time* (``/market/time``, the signature window) runs at wall pace from ``start_ms`` (see
  :meth:`FakeWeex.server_time_ms`).  Stock ccxt therefore needs ``options={"adjustForTimeDifference": True}``,
  which is what it needs against the real exchange from a machine whose clock is off, too.
* Only the data's own interval is served; another ``interval`` is -1140.
* ``/capi/v3/market/klines`` ends with the forming bar (partial values, see :mod:`.fake_engine`);
  ``historyKlines`` returns closed bars only.
* Injected 429 and 5xx answers are a gateway's text/HTML pages, not API error bodies, and the request is not
  executed; a ``lost_response`` fault is the opposite (executed, answer lost, or held back ``ms`` with
  ``mode=hang`` so a test can kill the client between submit and acknowledgement).
* Admin endpoints (unsigned, never subject to faults): ``GET /fake/state``, ``GET|POST|DELETE /fake/faults``,
  ``POST /fake/plant`` (a position or order the client did not make, or a corrupt bar), ``POST /fake/clock``
  (``advance_ms``).

Run it: ``python -m alphapulse.exchange.weex.fake --port 8765 --data FILE.csv.gz --speed 60 --faults SPEC``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import json
import logging
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from aiohttp import web

from alphapulse.costs import money
from alphapulse.domain import Candle
from alphapulse.exchange.weex import signing
from alphapulse.exchange.weex.fake_engine import Engine, Order, WeexError, to_decimal, within
from alphapulse.exchange.weex.fake_faults import FaultRule, Faults, parse_spec, rule_from_json
from alphapulse.exchange.weex.fake_market import CandleSeries, FundingSchedule, MarketSpec
from alphapulse.exchange.weex.fake_public import MarketDataRoutes, _json, _ok
from alphapulse.exchange.weex.fake_ws import PublicStreams, _WsConn
from alphapulse.market.feed import FeedError

log = logging.getLogger("alphapulse.fake_weex")

WS_PUBLIC_PATHS = ("/v3/ws/public", "/v3/ws")
#: The raw body of the request being handled: read once by the middleware (for the request log), then verified
#: and parsed by the handlers.  A context variable because handlers run in the middleware's task.
_BODY: contextvars.ContextVar[str] = contextvars.ContextVar("fake_weex_body", default="")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class RequestRecord:
    """One request as the fake received it: the exact bytes a signature covers, for tests to recompute."""

    method: str
    path: str
    query: str  # raw, as sent
    body: str
    headers: dict[str, str]
    time_ms: int
    status: int = 0


class FakeWeex(MarketDataRoutes, PublicStreams):
    """The fake exchange: ``await start()``, point a client at ``url`` / ``ws_url``, assert on the accessors."""

    def __init__(
        self,
        candles: Sequence[Candle] | str | Path,
        symbol: str = "BTCUSDT",
        timeframe: str = "1h",
        speed: float = 1.0,
        start_ms: int | None = None,
        api_key: str = "fake-api-key",
        secret_key: str = "fake-secret-key",
        passphrase: str = "fake-passphrase",
        initial_balance: Decimal = Decimal("10000"),
        taker_fee: Decimal = Decimal("0.0006"),
        maker_fee: Decimal = Decimal("0.0002"),
        slippage_bps: Decimal = Decimal(0),
        funding_rate: Decimal = Decimal("0.0001"),
        funding_file: str | Path | None = None,
        warmup_bars: int = 200,
        price_precision: int | None = None,
        quantity_precision: int = 3,
        min_order_size: Decimal = Decimal("0.001"),
        default_leverage: int = 20,
        auth_window_ms: int = 30_000,
        ping_interval_s: float = 5.0,
        pong_timeout_s: float | None = None,
        ws_tick_s: float = 0.1,
        faults: str | Sequence[FaultRule | dict[str, Any]] | None = None,
        seed: int | None = None,
        partial_fill_interval_s: float = 0.2,
        max_request_log: int = 5000,
    ) -> None:
        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        self.series = CandleSeries.from_source(candles, timeframe, price_precision)
        quote = "USDT" if symbol.endswith("USDT") else symbol[-4:]
        self.market = MarketSpec(symbol=symbol, base=symbol[: -len(quote)], quote=quote,
                                 price_precision=self.series.price_precision, quantity_precision=quantity_precision,
                                 min_order_size=min_order_size, maker_fee=maker_fee, taker_fee=taker_fee)
        self.timeframe = timeframe
        self.speed = speed
        if start_ms is None:
            start_ms = int(self.series.ts[min(warmup_bars, len(self.series) - 1)])
        self.start_ms = start_ms
        self.api_key, self.secret_key, self.passphrase = api_key, secret_key, passphrase
        self.auth_window_ms = auth_window_ms
        self.ping_interval_s = ping_interval_s
        self.pong_timeout_s = pong_timeout_s if pong_timeout_s is not None else ping_interval_s
        self.ws_tick_s = ws_tick_s
        funding = FundingSchedule.from_file(funding_file) if funding_file else FundingSchedule(rate=funding_rate)
        self.engine = Engine(self.market, self.series, initial_balance=initial_balance, funding=funding,
                             slippage_bps=slippage_bps, default_leverage=default_leverage,
                             partial_fill_interval_s=partial_fill_interval_s, now=start_ms)
        self.faults = Faults(seed=seed)
        if faults:
            self.set_faults(faults, clear=True)
        self.requests: list[RequestRecord] = []
        self.request_counts: Counter[str] = Counter()
        self.max_request_log = max_request_log
        self.ws_stats: Counter[str] = Counter()
        self._ws_conns: set[_WsConn] = set()
        self._wall0: float | None = None
        self._offset_ms = 0
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._host = "127.0.0.1"
        self.port = 0

    # -- clock ---------------------------------------------------------------------------------

    def now_ms(self) -> int:
        """True market time of the fake (before ``start()``: ``start_ms``)."""
        elapsed = 0.0 if self._wall0 is None else (time.monotonic() - self._wall0) * 1000.0 * self.speed
        return self.start_ms + self._offset_ms + int(elapsed)

    def server_time_ms(self) -> int:
        """The exchange's own clock: what ``/market/time`` says, what ping messages carry and what the signature
        window is checked against.  It starts at ``start_ms`` and runs at *wall* pace (plus any clock-skew fault),
        whatever ``speed`` and ``advance()`` do to market time, so a client that synced its signing clock once
        (as the reference says clients must) stays inside the window during a fast replay.  At speed 1 without
        ``advance()`` it equals market time, as on the real exchange."""
        elapsed = 0.0 if self._wall0 is None else (time.monotonic() - self._wall0) * 1000.0
        return self.start_ms + int(elapsed) + self.faults.clock_skew_ms()

    def advance(self, ms: int) -> int:
        """Jump the clock forward by ``ms`` (tests: reach a funding time without waiting); returns the new time."""
        if ms < 0:
            raise ValueError("the clock only moves forward")
        self._offset_ms += ms
        self._sync()
        return self.now_ms()

    def _sync(self) -> int:
        now = self.now_ms()
        self.engine.advance(now, time.monotonic())
        return now

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self._host}:{self.port}/v3/ws/public"

    def build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        r = app.router
        get, post, delete = r.add_get, r.add_post, r.add_delete
        get("/capi/v3/market/time", self._time)
        get("/capi/v3/market/exchangeInfo", self._exchange_info)
        get("/capi/v3/market/klines", self._klines)
        get("/capi/v3/market/historyKlines", self._history_klines)
        get("/capi/v3/market/ticker/24hr", self._ticker)
        get("/capi/v3/market/premiumIndex", self._premium_index)
        get("/capi/v3/market/fundingRate", self._funding_rate)
        get("/api/v3/coins", self._spot_coins)
        get("/api/v3/exchangeInfo", self._spot_exchange_info)
        get("/api/v3/time", self._time)
        get("/capi/v3/account/balance", self._signed(self._balance))
        get("/capi/v3/account/position/allPosition", self._signed(self._all_positions))
        get("/capi/v3/account/position/singlePosition", self._signed(self._single_position))
        post("/capi/v3/account/leverage", self._signed(self._leverage))
        post("/capi/v3/account/marginType", self._signed(self._margin_type))
        get("/capi/v3/account/symbolConfig", self._signed(self._symbol_config))
        get("/capi/v3/account/commissionRate", self._signed(self._commission_rate))
        post("/capi/v3/account/income", self._signed(self._income))
        post("/capi/v3/order", self._signed(self._place_order))
        get("/capi/v3/order", self._signed(self._get_order))
        delete("/capi/v3/order", self._signed(self._cancel_order))
        delete("/capi/v3/allOpenOrders", self._signed(self._cancel_all))
        delete("/capi/v3/batchOrders", self._signed(self._cancel_batch))
        post("/capi/v3/batchOrders", self._batch_place_unsupported)
        get("/capi/v3/openOrders", self._signed(self._open_orders))
        get("/capi/v3/order/history", self._signed(self._order_history))
        get("/capi/v3/userTrades", self._signed(self._user_trades))
        post("/capi/v3/closePositions", self._signed(self._close_positions))
        for path in WS_PUBLIC_PATHS:
            get(path, self._ws_public)
        get(signing.WS_PRIVATE_PATH, self._ws_private)
        get("/fake/state", self._admin_state)
        get("/fake/faults", self._admin_get_faults)
        post("/fake/faults", self._admin_set_faults)
        delete("/fake/faults", self._admin_clear_faults)
        post("/fake/plant", self._admin_plant)
        post("/fake/clock", self._admin_clock)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Bind and start serving; the market clock starts now.  Returns the bound port."""
        self._runner = web.AppRunner(self.build_app(), access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else port
        self._host = host
        self._wall0 = time.monotonic()
        self._tasks.append(asyncio.create_task(self._ws_broadcaster(), name="fake-weex-ws"))
        return self.port

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        for conn in list(self._ws_conns):
            with contextlib.suppress(Exception):
                await conn.ws.close(code=1001, message=b"server shutdown")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeWeex:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- in-process API for tests --------------------------------------------------------------

    def set_faults(self, faults: str | Sequence[FaultRule | dict[str, Any]] | None = None, *, clear: bool = True,
                   seed: int | None = None) -> list[FaultRule]:
        """Replace (or with ``clear=False`` extend) the fault rules; a spec string or rules/dicts."""
        if clear:
            self.faults.clear()
        if seed is not None:
            self.faults.reseed(seed)
        rules: list[FaultRule] = []
        if isinstance(faults, str):
            rules = parse_spec(faults)
        elif faults:
            rules = [f if isinstance(f, FaultRule) else rule_from_json(f) for f in faults]
        return [self.faults.add(r) for r in rules]

    def add_fault(self, kind: str, **kw: Any) -> FaultRule:
        return self.faults.add(FaultRule(kind=kind, **kw))

    def plant_position(self, side: str, size: Decimal | str, entry_price: Decimal | str | None = None) -> None:
        """A position opened by someone else (another session, the web UI): no order, no fill, no fee."""
        now = self._sync()
        price = Decimal(str(entry_price)) if entry_price is not None else None
        self.engine.plant_position(side, Decimal(str(size)), now, price)

    def plant_transfer(self, amount: Decimal) -> None:
        """Money moved in or out of the account by someone else (a deposit, a withdrawal): no trade, no fee."""
        self._sync()
        self.engine.wallet = money(self.engine.wallet + amount)

    def plant_order(self, **params: Any) -> Order:
        """An order the client did not place (``symbol`` defaults to the fake's)."""
        params.setdefault("symbol", self.market.symbol)
        now = self._sync()
        order, _ = self.engine.place_order(params, now, time.monotonic(), origin="foreign")
        return order

    def plant_bad_bar(self) -> int:
        """Corrupt the bar forming now (its high and low swapped) in every answer that serves it, REST and
        WebSocket alike: bad market data from the venue, which the client must reject, never trade on.  Returns
        the bar's open time.  (Fills are priced at bars' opens, which stay right.)"""
        now = self._sync()
        i = self.series.index_at(now)
        if i is None:
            raise ValueError("no bar is forming now")
        c = self.series.cols
        c["high"][i], c["low"][i] = c["low"][i], c["high"][i]
        return int(self.series.ts[i])

    @property
    def orders(self) -> list[Order]:
        return list(self.engine.orders.values())

    @property
    def fills(self) -> list[Any]:
        return list(self.engine.fills)

    @property
    def positions(self) -> dict[str, Any]:
        self._sync()
        return dict(self.engine.positions)

    @property
    def balance(self) -> Decimal:
        """Wallet balance (initial - fees + realized pnl + funding)."""
        self._sync()
        return self.engine.wallet

    def count(self, method: str, path: str) -> int:
        return self.request_counts[f"{method.upper()} {path}"]

    def state(self) -> dict[str, Any]:
        now = self._sync()
        e = self.engine
        return {
            "now_ms": now,
            "server_time_ms": self.server_time_ms(),
            "speed": self.speed,
            "start_ms": self.start_ms,
            "symbol": self.market.symbol,
            "timeframe": self.timeframe,
            "last_price": format(self.series.last_price(now), "f"),
            "closed_bars": self.series.closed_count(now),
            "balance": e.balance_json(now)[0],
            "initial_balance": format(e.initial_balance, "f"),
            "total_fees": format(e.total_fees, "f"),
            "total_realized_pnl": format(e.total_realized, "f"),
            "total_funding": format(e.total_funding, "f"),
            "duplicate_client_order_ids": e.duplicate_client_ids,
            "positions": [e.position_json(p, now) | {"origin": p.origin} for p in e.positions.values()],
            "orders": [e.order_json(o) | {"origin": o.origin} for o in e.orders.values()],
            "fills": [e.fill_json(f) for f in e.fills],
            "funding_events": [{"time": t, "rate": str(r), "markPrice": str(p)} for t, r, p in e.funding_events],
            "request_counts": dict(self.request_counts),
            "ws": {"connections": len(self._ws_conns), **self.ws_stats},
            "faults": self.faults.to_json(),
        }

    # -- HTTP plumbing -------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        method = request.method
        body = await request.text() if request.can_read_body else ""
        raw_path = request.raw_path
        record = RequestRecord(method, raw_path.partition("?")[0], raw_path.partition("?")[2], body,
                               {k: v for k, v in request.headers.items()}, self.now_ms())
        self.request_counts[f"{method} {path}"] += 1
        self.requests.append(record)
        if len(self.requests) > self.max_request_log:
            del self.requests[: len(self.requests) - self.max_request_log]
        _BODY.set(body)
        if not path.startswith("/fake/") and path not in WS_PUBLIC_PATHS and path != signing.WS_PRIVATE_PATH:
            rule = self.faults.fire("latency", method, path)
            if rule is not None:
                await asyncio.sleep(rule.ms / 1000)
            rule = self.faults.fire("timeout", method, path)
            if rule is not None:
                await asyncio.sleep(rule.ms / 1000)
            # Rate limits and 5xx come from the gateway in front of the API, as text, not as an API error body:
            # that is also what lets a stock client classify them (ccxt: RateLimitExceeded, ExchangeNotAvailable).
            rule = self.faults.fire("ratelimit", method, path)
            if rule is not None:
                record.status = 429
                return web.Response(text="429 Too Many Requests", status=429, content_type="text/plain")
            rule = self.faults.fire("error5xx", method, path)
            if rule is not None:
                record.status = rule.status
                return web.Response(text=f"<html><body><h1>{rule.status} Service Unavailable</h1></body></html>",
                                    status=rule.status, content_type="text/html")
        try:
            response = await handler(request)
        except WeexError as exc:
            response = _json(exc.body(), status=exc.http_status)
        except web.HTTPException as exc:
            if exc.status == 404:
                response = _json({"code": -1000, "msg": f"Unknown path {path}."}, status=404)
            elif exc.status == 405:
                response = _json({"code": -1150, "msg": f"Request method '{method}' not supported"}, status=405)
            else:
                raise
        record.status = response.status
        return response

    def _authenticate(self, request: web.Request, body: str) -> None:
        h = request.headers
        key, sig = h.get(signing.HEADER_KEY), h.get(signing.HEADER_SIGN)
        ts_text, passphrase = h.get(signing.HEADER_TIMESTAMP), h.get(signing.HEADER_PASSPHRASE)
        if not key:
            raise WeexError(-1040, "ACCESS_KEY header is required.", 401)
        if not sig:
            raise WeexError(-1041, "ACCESS_SIGN header is required.", 401)
        if not ts_text:
            raise WeexError(-1042, "ACCESS_TIMESTAMP header is required.", 401)
        try:
            ts = int(ts_text)
        except ValueError:
            raise WeexError(-1043, "Invalid ACCESS_TIMESTAMP.", 401) from None
        if key != self.api_key:
            raise WeexError(-1044, "Invalid ACCESS_KEY.", 401)
        if abs(ts - self.server_time_ms()) > self.auth_window_ms:
            raise WeexError(-1046, "Request timestamp expired.", 400)
        if passphrase != self.passphrase:
            raise WeexError(-1049, "API key or passphrase incorrect.", 401)
        if request.method == "POST" and not request.content_type.startswith("application/json"):
            raise WeexError(-1045, "Invalid Content-Type, please use application/json.", 400)
        path, _, query = request.raw_path.partition("?")
        if not signing.verify(self.secret_key, sig, ts_text, request.method, path, query, body):
            raise WeexError(-1047, "API authentication failed.", 401)

    def _signed(self, fn: Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]]) -> Handler:
        """Wrap a private handler: check the signature on the exact bytes received, then parse parameters
        (query for GET/DELETE, plus a JSON body when one was sent)."""

        async def handler(request: web.Request) -> web.StreamResponse:
            body: str = _BODY.get()
            self._authenticate(request, body)
            params: dict[str, Any] = dict(request.query)
            if body.strip():
                try:
                    parsed = json.loads(body)
                except json.JSONDecodeError:
                    raise WeexError(-1135, "Invalid JSON request.") from None
                if not isinstance(parsed, dict):
                    raise WeexError(-1135, "Invalid JSON request.")
                params.update(parsed)
            return await fn(request, params)

        return handler

    # -- account -------------------------------------------------------------------------------

    async def _balance(self, request: web.Request, params: dict[str, Any]) -> web.Response:
        return _json(self.engine.balance_json(self._sync()))

    async def _all_positions(self, request: web.Request, params: dict[str, Any]) -> web.Response:
        now = self._sync()
        return _json([self.engine.position_json(p, now) for p in self.engine.positions.values()])

    async def _single_position(self, request: web.Request, params: dict[str, Any]) -> web.Response:
        self._symbol(params)
        return await self._all_positions(request, params)

    async def _leverage(self, request: web.Request, params: dict[str, Any]) -> web.Response:
        self._symbol(params)
        self._sync()
        e, m = self.engine, self.market
        margin_type = params.get("marginType")
        if margin_type is not None and margin_type not in ("CROSSED", "ISOLATED"):
            raise WeexError(-1142, "Parameter marginType is invalid.")
        fields = {k: params[k] for k in ("crossLeverage", "isolatedLongLeverage", "isolatedShortLeverage")
                  if params.get(k) not in (None, "")}
        if not fields:
            raise WeexError(-1141, "Parameter crossLeverage cannot be empty.")
        values: dict[str, int] = {}
        for k, v in fields.items():
            d = to_decimal(v, k)
            if d != d.to_integral_value() or not m.min_leverage <= d <= m.max_leverage:
                raise WeexError(-3313, "Leverage exceeds maximum limit.")
            values[k] = int(d)
        if "crossLeverage" in values:
            e.cross_leverage = values["crossLeverage"]
        if "isolatedLongLeverage" in values:
            e.isolated_leverage["LONG"] = values["isolatedLongLeverage"]
        if "isolatedShortLeverage" in values:
            e.isolated_leverage["SHORT"] = values["isolatedShortLeverage"]
        for side, pos in e.positions.items():
            pos.leverage = e.leverage_for(side)
        return _json(_ok())

    async def _margin_type(self, request: web.Request, params: dict[str, Any]) -> web.Response:
        self._symbol(params)
        self._sync()
        margin_type = params.get("marginType")
        if margin_type not in ("CROSSED", "ISOLATED"):
            raise WeexError(-1142, "Parameter marginType is invalid.")
        if margin_type != self.engine.margin_type and (self.engine.positions or self.engine.open_orders()):
            raise WeexError(-1142, "Cannot change margin type with open positions or orders.")
        self.engine.margin_type = str(margin_type)
        return _json(_ok())

    async def _symbol_config(self, request: web.Request, params: dict[str, Any]) -> web.Response:
        self._symbol(params, required=False)
        e = self.engine
        return _json([{
            "symbol": self.market.symbol,
            "marginType": e.margin_type,
            "separatedType": "COMBINED",
            "crossLeverage": f"{e.cross_leverage}.00",
            "isolatedLongLeverage": f"{e.isolated_leverage['LONG']}.00",
            "isolatedShortLeverage": f"{e.isolated_leverage['SHORT']}.00",
        }])

    async def _commission_rate(self, request: web.Request, params: dict[str, Any]) -> web.Response:
        self._symbol(params)
        m = self.market
        return _json({"symbol": m.symbol, "makerCommissionRate": format(m.maker_fee, "f"),
                      "takerCommissionRate": format(m.taker_fee, "f")})

    async def _income(self, request: web.Request, params: dict[str, Any]) -> web.Response:
        self._symbol(params, required=False)
        self._sync()
        start, end = self._int(params, "startTime"), self._int(params, "endTime")
        if start is not None and end is not None and start > end:
            raise WeexError(-1171, "startTime cannot be greater than endTime.")
        limit = self._int(params, "limit", 100)
        assert limit is not None
        if not 1 <= limit <= 100:
            raise WeexError(-1140, "Parameter validation failed. limit must be between 1 and 100.")
        kind = params.get("incomeType")
        items = [i for i in within(self.engine.incomes, start, end) if kind in (None, "") or i.income_type == kind]
        return _json({"hasNextPage": len(items) > limit, "nextKey": None,
                      "items": [self.engine.income_json(i) for i in items[:limit]]})

    # -- trading -------------------------------------------------------------------------------

    async def _place_order(self, request: web.Request, params: dict[str, Any]) -> web.StreamResponse:
        now = self._sync()
        partial = self.faults.fire("partial_fill", request.method, request.path)
        order, created = self.engine.place_order(params, now, time.monotonic(),
                                                 partial_parts=partial.parts if partial else 1)
        if created:
            lost = self.faults.fire("lost_response", request.method, request.path)
            if lost is not None:
                if lost.mode == "5xx":
                    return web.Response(text="<html><body><h1>500 Internal Server Error</h1></body></html>",
                                        status=500, content_type="text/html")
                if lost.mode == "hang":  # executed, the answer held back ``ms``: time to kill the client
                    await asyncio.sleep((lost.ms or 60_000) / 1000)
                if request.transport is not None:
                    request.transport.close()  # the order exists; the client never hears about it
                raise asyncio.CancelledError
        return _json({"orderId": order.order_id, "clientOrderId": order.client_order_id, "success": True,
                      "errorCode": "", "errorMessage": ""})

    async def _get_order(self, request: web.Request, params: dict[str, Any]) -> web.Response:
        self._sync()
        order = self.engine.find_order(params.get("orderId"), params.get("origClientOrderId"))
        return _json(self.engine.order_json(order))

    async def _cancel_order(self, request: web.Request, params: dict[str, Any]) -> web.Response:
        now = self._sync()
        order = self.engine.find_order(params.get("orderId"), params.get("origClientOrderId"))
        self.engine.cancel(order, now)
        return _json(self.engine.order_json(order))

    async def _cancel_all(self, request: web.Request, params: dict[str, Any]) -> web.Response:
        self._symbol(params, required=False)
        now = self._sync()
        out = []
        for order in self.engine.open_orders():
            self.engine.cancel(order, now)
            out.append({"orderId": order.order_id, "success": True, "errorMessage": ""})
        return _json(out)

    async def _cancel_batch(self, request: web.Request, params: dict[str, Any]) -> web.Response:
        """``DELETE /capi/v3/batchOrders`` with a JSON body (``orderIdList`` or ``origClientOrderIdList``): the one
        DELETE whose body is signed.  Cancelled orders come back in ``orderList``; ids that are unknown or no longer
        open in ``failedList`` (the fake's choice: the reference does not show the failure shape)."""
        now = self._sync()
        ids, client_ids = params.get("orderIdList"), params.get("origClientOrderIdList")
        if not ids and not client_ids:
            raise WeexError(-1141, "Parameter orderIdList cannot be empty.")
        values = ids or client_ids
        if not isinstance(values, list):
            raise WeexError(-1142, "Parameter orderIdList is invalid.")
        done, failed = [], []
        for value in values:
            try:
                order = self.engine.find_order(value if ids else None, None if ids else value)
                self.engine.cancel(order, now)
                done.append(self.engine.order_json(order))
            except WeexError as exc:
                failed.append({"orderId" if ids else "origClientOrderId": value, "errorCode": str(exc.code),
                               "errorMsg": exc.msg})
        return _json({"orderList": done, "failedList": failed})

    async def _batch_place_unsupported(self, request: web.Request) -> web.Response:
        """The real venue answers batch placement like this (ccxt's notes); clients must place one by one."""
        return _json({"code": -1150, "msg": "Request method 'POST' not supported"}, status=405)

    async def _open_orders(self, request: web.Request, params: dict[str, Any]) -> web.Response:
        self._symbol(params, required=False)
        self._sync()
        return _json([self.engine.order_json(o) for o in self.engine.open_orders()])

    async def _order_history(self, request: web.Request, params: dict[str, Any]) -> web.Response:
        self._symbol(params, required=False)
        self._sync()
        start, end = self._int(params, "startTime"), self._int(params, "endTime")
        limit = self._int(params, "limit", 100)
        assert limit is not None
        done = [o for o in within(self.engine.orders.values(), start, end) if o.status not in ("NEW",
                                                                                             "PARTIALLY_FILLED")]
        done.sort(key=lambda o: o.time, reverse=True)
        return _json([self.engine.order_json(o) for o in done[:limit]])

    async def _user_trades(self, request: web.Request, params: dict[str, Any]) -> web.Response:
        self._symbol(params, required=False)
        self._sync()
        start, end = self._int(params, "startTime"), self._int(params, "endTime")
        order_id = self._int(params, "orderId")
        limit = self._int(params, "limit", 500)
        assert limit is not None
        fills = [f for f in within(self.engine.fills, start, end) if order_id is None or f.order_id == order_id]
        return _json([self.engine.fill_json(f) for f in fills[-limit:]])

    async def _close_positions(self, request: web.Request, params: dict[str, Any]) -> web.Response:
        self._symbol(params, required=False)
        now = self._sync()
        closed = self.engine.close_positions(now, time.monotonic())
        return _json([{"positionId": pos.position_id, "successOrderId": order.order_id, "errorMessage": "",
                       "success": True} for pos, order in closed])

    # -- admin ---------------------------------------------------------------------------------

    async def _admin_state(self, request: web.Request) -> web.Response:
        return _json(self.state())

    async def _admin_get_faults(self, request: web.Request) -> web.Response:
        return _json(self.faults.to_json())

    async def _admin_set_faults(self, request: web.Request) -> web.Response:
        try:
            payload = json.loads(_BODY.get() or "{}")
            self.faults.apply_json(payload)
        except (ValueError, TypeError) as exc:
            return _json({"code": -1142, "msg": str(exc)}, status=400)
        return _json(self.faults.to_json())

    async def _admin_clear_faults(self, request: web.Request) -> web.Response:
        self.faults.clear(request.query.get("kind"))
        return _json(self.faults.to_json())

    async def _admin_plant(self, request: web.Request) -> web.Response:
        """``{"type": "position", "side": "LONG", "size": "0.01", "entryPrice"?}``, ``{"type": "order", "order":
        {...the parameters of POST /capi/v3/order...}}`` or ``{"type": "transfer", "amount": "-50"}``: state the
        client did not create, for reconciliation tests; ``{"type": "bad_bar"}``: the forming bar served corrupt
        (see :meth:`plant_bad_bar`)."""
        payload = json.loads(_BODY.get() or "{}")
        kind = payload.pop("type", None)
        if kind == "position":
            self.plant_position(payload["side"], payload["size"], payload.get("entryPrice"))
        elif kind == "order":
            order = self.plant_order(**payload.get("order", {}))
            return _json(self.engine.order_json(order))
        elif kind == "transfer":
            self.plant_transfer(Decimal(str(payload["amount"])))
            return _json(self.state()["balance"])
        elif kind == "bad_bar":
            try:
                return _json({"ts": self.plant_bad_bar()})
            except ValueError as e:
                return _json({"code": -1142, "msg": str(e)}, status=400)
        else:
            return _json({"code": -1142, "msg": "type must be position, order, transfer or bad_bar"}, status=400)
        return _json(self.state()["positions"])

    async def _admin_clock(self, request: web.Request) -> web.Response:
        payload = json.loads(_BODY.get() or "{}")
        now = self.advance(int(payload.get("advance_ms", 0)))
        return _json({"now_ms": now})


# -- CLI ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fake-weex`` (also used by ``alphapulse fake-weex``)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port (0 = any free port; the URL is logged)")
    parser.add_argument("--data", default=None,
                        help="candle file timestamp,open,high,low,close,volume (.csv or .csv.gz); "
                             "default: the bundled BTCUSDT file of --timeframe")
    parser.add_argument("--speed", type=float, default=1.0, help="market-clock speed (x wall time)")
    parser.add_argument("--symbol", default="BTCUSDT")
    parser.add_argument("--timeframe", default="1h")
    parser.add_argument("--start-ms", type=int, default=None, help="market time at start (default: after warm-up)")
    parser.add_argument("--api-key", default="fake-api-key")
    parser.add_argument("--secret-key", default="fake-secret-key")
    parser.add_argument("--passphrase", default="fake-passphrase")
    parser.add_argument("--initial-balance", type=Decimal, default=Decimal("10000"))
    parser.add_argument("--funding-file", default=None, help="timestamp,funding_rate CSV (default: 0.0001 every 8h)")
    parser.add_argument("--faults", default="", help="fault spec, e.g. latency=200ms,error5xx=0.1@/capi/v3/order")
    parser.add_argument("--seed", type=int, default=None, help="seed of the fault draws")
    parser.add_argument("--ping-interval", type=float, default=5.0, help="WebSocket ping interval, seconds")


async def _serve(args: argparse.Namespace) -> int:
    data: str | Path = args.data
    if data is None:
        from alphapulse.market.replay import default_replay_file

        data = default_replay_file(args.timeframe)
    fake = FakeWeex(data, symbol=args.symbol, timeframe=args.timeframe, speed=args.speed, start_ms=args.start_ms,
                    api_key=args.api_key, secret_key=args.secret_key, passphrase=args.passphrase,
                    initial_balance=args.initial_balance, funding_file=args.funding_file, faults=args.faults or None,
                    seed=args.seed, ping_interval_s=args.ping_interval)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    port = await fake.start(args.host, args.port)
    print(f"fake-weex listening on http://{args.host}:{port} ws=ws://{args.host}:{port}/v3/ws/public "
          f"symbol={fake.market.symbol} timeframe={fake.timeframe} speed={fake.speed} start_ms={fake.start_ms}",
          flush=True)
    try:
        await stop.wait()
    finally:
        await fake.stop()
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the fake until SIGINT/SIGTERM; 0 on a clean stop, 2 on a bad option or data file."""
    try:
        return asyncio.run(_serve(args))
    except (ValueError, OSError, FeedError) as exc:
        print(f"fake-weex: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fake-weex", description="Local fake of the WEEX contract API V3.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
