"""WebSockets of the fake WEEX exchange: SUBSCRIBE/ack, kline pushes, private order/fill/position/account pushes,
server pings, and stream faults.

The private stream (``/v3/ws/private``) is authenticated at the handshake with the four ``ACCESS-*`` headers,
``ACCESS-SIGN`` covering ``timestamp + "/v3/ws/private"``; a bad handshake is answered with the REST error body
and HTTP 401/400 instead of an upgrade.  Its pushes are computed by diffing the engine's orders and fills every
tick, so every state change a REST call or the clock causes is pushed once, after the client subscribed.

A mixin of :class:`~alphapulse.exchange.weex.fake.FakeWeex`.  Pushes are driven by one broadcaster task that
looks at the market clock every ``ws_tick_s``: each closed bar is pushed once (carrying the real bar), and the
forming bar whenever its partial values change.  Each connection gets its own pinger; a client that has not
answered a ping with ``{"method": "PONG"}`` within ``pong_timeout_s`` is closed (code 1008), as the real server
drops dead clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from alphapulse.exchange.weex import signing
from alphapulse.exchange.weex.fake_engine import Engine, WeexError, fmt
from alphapulse.exchange.weex.fake_faults import Faults
from alphapulse.exchange.weex.fake_market import CandleSeries, MarketSpec

PRIVATE_CHANNELS = ("orders", "fill", "positions", "account")


@dataclass(eq=False)
class _WsConn:
    ws: web.WebSocketResponse
    path: str
    subscriptions: set[str] = field(default_factory=set)
    last_closed: int = 0  # closed bars already pushed (count), per connection
    last_forming: tuple[Any, ...] | None = None
    awaiting_pong: bool = False
    pongs: int = 0
    silent_rules: set[int] = field(default_factory=set)
    drawn_rules: set[int] = field(default_factory=set)
    messages_sent: int = 0
    private: bool = False
    fills_seen: int = 0  # private: engine fills already pushed
    orders_seen: dict[int, tuple[Any, ...]] = field(default_factory=dict)  # private: order state last pushed
    seq: int = 0


class PublicStreams:
    """``/v3/ws/public`` (and ``/v3/ws``) and ``/v3/ws/private``."""

    series: CandleSeries
    engine: Engine
    api_key: str
    secret_key: str
    passphrase: str
    auth_window_ms: int
    market: MarketSpec
    faults: Faults
    timeframe: str
    ws_tick_s: float
    ping_interval_s: float
    pong_timeout_s: float
    ws_stats: Counter[str]
    _ws_conns: set[_WsConn]

    def _sync(self) -> int:
        raise NotImplementedError

    def server_time_ms(self) -> int:
        raise NotImplementedError

    def _kline_row(self, row: tuple[int, float, float, float, float, float]) -> list[Any]:
        raise NotImplementedError

    async def _ws_public(self, request: web.Request) -> web.StreamResponse:
        return await self._ws_serve(request, private=False)

    async def _ws_private(self, request: web.Request) -> web.StreamResponse:
        h = request.headers
        key, sig = h.get(signing.HEADER_KEY), h.get(signing.HEADER_SIGN)
        ts_text, passphrase = h.get(signing.HEADER_TIMESTAMP), h.get(signing.HEADER_PASSPHRASE)
        if not key or not sig or not ts_text:
            raise WeexError(-1040 if not key else -1041 if not sig else -1042, "ACCESS headers are required.", 401)
        if key != self.api_key:
            raise WeexError(-1044, "Invalid ACCESS_KEY.", 401)
        try:
            ts = int(ts_text)
        except ValueError:
            raise WeexError(-1043, "Invalid ACCESS_TIMESTAMP.", 401) from None
        if abs(ts - self.server_time_ms()) > self.auth_window_ms:
            raise WeexError(-1046, "Request timestamp expired.", 400)
        if passphrase != self.passphrase:
            raise WeexError(-1049, "API key or passphrase incorrect.", 401)
        if not hmac.compare_digest(signing.sign_ws_login(self.secret_key, ts_text).encode(), sig.encode()):
            raise WeexError(-1047, "API authentication failed.", 401)
        return await self._ws_serve(request, private=True)

    async def _ws_serve(self, request: web.Request, private: bool) -> web.StreamResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        conn = _WsConn(ws, request.path, private=private)
        self._ws_conns.add(conn)
        self.ws_stats["connected"] += 1
        pinger = asyncio.create_task(self._ws_pinger(conn))
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    data = json.loads(msg.data)
                except json.JSONDecodeError:
                    await self._ws_send(conn, {"result": False, "id": None, "msg": "INVALID_ARGUMENT: invalid JSON"})
                    continue
                await self._ws_command(conn, data)
        finally:
            pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pinger
            self._ws_conns.discard(conn)
        return ws

    async def _ws_command(self, conn: _WsConn, data: Any) -> None:
        if not isinstance(data, dict):
            return
        method = str(data.get("method", "")).upper()
        msg_id = data.get("id")
        if method == "PONG":
            conn.awaiting_pong = False
            conn.pongs += 1
            self.ws_stats["pongs"] += 1
            return
        if method in ("SUBSCRIBE", "UNSUBSCRIBE"):
            channels = data.get("params") or []
            valid = PRIVATE_CHANNELS if conn.private else (self._kline_channel(),)
            bad = [c for c in channels if c not in valid]
            if method == "SUBSCRIBE" and (bad or not channels):
                await self._ws_send(conn, {"result": False, "id": msg_id,
                                           "msg": f"INVALID_ARGUMENT: invalid channel : {','.join(map(str, bad))}"})
                return
            if method == "SUBSCRIBE":
                conn.subscriptions.update(channels)
                conn.last_closed = self.series.closed_count(self._sync())
                conn.last_forming = None
                if conn.private:  # push what changes from now on
                    conn.fills_seen = len(self.engine.fills)
                    conn.orders_seen = {o.order_id: self._order_key(o) for o in self.engine.orders.values()}
            else:
                conn.subscriptions.difference_update(channels)
            await self._ws_send(conn, {"result": True, "id": msg_id})
            return
        await self._ws_send(conn, {"result": False, "id": msg_id, "msg": f"INVALID_ARGUMENT: unknown method {method}"})

    def _kline_channel(self) -> str:
        return f"{self.market.symbol}@kline_{self.timeframe}_LAST_PRICE"

    async def _ws_send(self, conn: _WsConn, payload: dict[str, Any]) -> None:
        if conn.ws.closed:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            await conn.ws.send_str(json.dumps(payload, separators=(",", ":")))
            conn.messages_sent += 1

    def _ws_faults(self, conn: _WsConn) -> str | None:
        """Draw each WebSocket rule once per connection; returns "drop", "silent" or None."""
        live = {r.rule_id for r in self.faults.rules if r.kind == "ws_silent"}
        conn.silent_rules &= live  # removing the rule ends the silence
        for rule in self.faults.rules:
            if rule.kind not in ("ws_drop", "ws_silent") or rule.rule_id in conn.drawn_rules:
                continue
            if not rule.matches("GET", conn.path):
                continue
            conn.drawn_rules.add(rule.rule_id)
            if self.faults.draw(rule):
                if rule.kind == "ws_drop":
                    return "drop"
                conn.silent_rules.add(rule.rule_id)
        return "silent" if conn.silent_rules else None

    async def _ws_broadcaster(self) -> None:
        """Push kline updates to subscribers as the clock moves; apply WebSocket faults."""
        while True:
            await asyncio.sleep(self.ws_tick_s)
            now = self._sync()
            for conn in list(self._ws_conns):
                fault = self._ws_faults(conn)
                if fault == "drop":
                    self.ws_stats["dropped_by_fault"] += 1
                    with contextlib.suppress(Exception):
                        await conn.ws.close(code=1011, message=b"fault: dropped")
                    continue
                if fault == "silent" or not conn.subscriptions:
                    continue
                if conn.private:
                    await self._push_private(conn, now)
                else:
                    await self._push_klines(conn, now)

    async def _push_klines(self, conn: _WsConn, now: int) -> None:
        s = self.series
        k = s.closed_count(now)
        if k > conn.last_closed:
            for i in range(max(conn.last_closed, k - 10), k):
                await self._ws_send(conn, self._kline_message(s.row(i), now))
            conn.last_closed = k
        forming = s.index_at(now)
        if forming is not None:
            row = s.partial(forming, now)
            message = self._kline_message(row, now)
            key = tuple(message["d"][0][x] for x in ("t", "o", "h", "l", "c"))
            if key != conn.last_forming:
                conn.last_forming = key
                await self._ws_send(conn, message)

    def _kline_message(self, row: tuple[int, float, float, float, float, float], now: int) -> dict[str, Any]:
        r = self._kline_row(row)
        return {"e": "kline", "E": now, "s": self.market.symbol, "p": "LAST_PRICE", "d": [{
            "t": r[0], "T": r[0] + self.series.bar_ms, "s": self.market.symbol, "i": self.timeframe,
            "o": r[1], "c": r[4], "h": r[2], "l": r[3], "v": r[5], "n": 0, "q": r[7], "V": "0", "Q": "0"}]}

    async def _ws_pinger(self, conn: _WsConn) -> None:
        """Ping every ``ping_interval_s``; a client that has not answered ``pong_timeout_s`` later is dropped."""
        while not conn.ws.closed:
            await asyncio.sleep(self.ping_interval_s)
            if conn.silent_rules:
                continue
            conn.awaiting_pong = True
            ping_key = "type" if conn.private else "event"  # the private stream pings with "type"
            await self._ws_send(conn, {ping_key: "ping", "time": str(self.server_time_ms())})
            self.ws_stats["pings"] += 1
            await asyncio.sleep(self.pong_timeout_s)
            if conn.awaiting_pong and not conn.silent_rules:
                self.ws_stats["dropped_no_pong"] += 1
                await conn.ws.close(code=1008, message=b"pong timeout")
                return

    # -- private pushes ------------------------------------------------------------------------

    @staticmethod
    def _order_key(o: Any) -> tuple[Any, ...]:
        return (o.status, o.executed_qty, o.update_time)

    def _private_message(self, conn: _WsConn, event: str, data: list[dict[str, Any]], now: int) -> dict[str, Any]:
        conn.seq += 1
        return {"e": event, "E": now, "v": conn.seq, "msgEvent": "OrderUpdate", "d": data}

    async def _push_private(self, conn: _WsConn, now: int) -> None:
        e, m = self.engine, self.market
        new_fills = e.fills[conn.fills_seen:]
        conn.fills_seen = len(e.fills)
        changed = [o for o in e.orders.values() if conn.orders_seen.get(o.order_id) != self._order_key(o)]
        for o in changed:
            conn.orders_seen[o.order_id] = self._order_key(o)
        if changed and "orders" in conn.subscriptions:
            fees: dict[int, Any] = {}
            last_price: dict[int, Any] = {}
            for f in e.fills:
                fees[f.order_id] = fees.get(f.order_id, 0) + f.fee
                last_price[f.order_id] = f.price
            await self._ws_send(conn, self._private_message(conn, "orders", [{
                "id": str(o.order_id), "symbol": o.symbol, "baseCoin": m.base, "quoteCoin": m.quote,
                "orderSide": o.side, "positionSide": o.position_side,
                "price": fmt(o.price, m.price_precision) if o.price is not None else "0",
                "size": fmt(o.orig_qty, m.quantity_precision), "clientOrderId": o.client_order_id, "type": o.type,
                "timeInForce": o.time_in_force or "IOC", "reduceOnly": o.reduce_only or o.closing, "status": o.status,
                "latestFillPrice": str(last_price.get(o.order_id, "0")),
                "cumFillSize": fmt(o.executed_qty, m.quantity_precision), "cumFillValue": format(o.cum_quote, "f"),
                "cumFillFee": format(fees.get(o.order_id, 0), "f"),
                "createdTime": str(o.time), "updatedTime": str(o.update_time)} for o in changed], now))
        if new_fills and "fill" in conn.subscriptions:
            await self._ws_send(conn, self._private_message(conn, "fill", [{
                "id": str(f.trade_id), "coin": m.quote, "symbol": f.symbol, "orderId": str(f.order_id),
                "marginMode": e.margin_type, "separatedMode": "COMBINED", "separatedOpenOrderId": "0",
                "positionSide": f.position_side, "orderSide": f.side, "fillSize": fmt(f.qty, m.quantity_precision),
                "fillValue": format(f.quote_qty, "f"), "fillFee": format(f.fee, "f"), "liquidateFee": "0",
                "realizePnl": format(f.realized_pnl, "f"), "direction": "MAKER" if f.maker else "TAKER",
                "createdTime": str(f.time), "updatedTime": str(f.time)} for f in new_fills], now))
        if new_fills and "positions" in conn.subscriptions:
            await self._ws_send(conn, self._private_message(
                conn, "positions", [e.position_json(p, now) for p in e.positions.values()], now))
        if (new_fills or changed) and "account" in conn.subscriptions:
            await self._ws_send(conn, self._private_message(conn, "account", e.balance_json(now), now))
