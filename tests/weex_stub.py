"""A small WEEX-shaped HTTP + WebSocket server on 127.0.0.1 for the client and feed tests.

Not the project's fake exchange (that one simulates trading): this stub records every request exactly
as it arrived (raw query string, body bytes, headers), checks signatures, serves real candles according
to a clock the test controls, and lets each test script the answers that matter to it (errors, delays,
dropped WebSocket connections).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from alphapulse.domain import Candle
from alphapulse.exchange.weex import signing

API_KEY = "stub-api-key-7f3a91"
SECRET = "stub-secret-0c55e2d1"
PASSPHRASE = "stub-passphrase-42ab"
WS_PATH = "/v3/ws/public"


class FakeClock:
    """Wall clock in seconds that only moves when the test says so (shared by client and stub)."""

    def __init__(self, start_s: float) -> None:
        self.t = start_s

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds

    def set_ms(self, ms: int) -> None:
        self.t = ms / 1000


@dataclass
class Recorded:
    method: str
    path: str
    query: str  # raw, exactly as received
    body: str
    headers: dict[str, str]
    mono: float
    signature_ok: bool | None  # None: unsigned

    @property
    def params(self) -> dict[str, str]:
        from urllib.parse import parse_qsl

        return dict(parse_qsl(self.query, keep_blank_values=True))


Reply = tuple[int, Any] | tuple[int, Any, dict[str, str]]
Handler = Callable[["WeexStub", Recorded], Awaitable[Reply | None] | Reply | None]


def kline_row(c: Candle) -> list[Any]:
    """A REST kline row as WEEX sends it: open time as a number, prices and volume as strings."""
    return [c.ts, repr(c.open), repr(c.high), repr(c.low), repr(c.close), repr(c.volume), c.ts + 1, "0"]


@dataclass
class WeexStub:
    """The server.  ``clock`` gives server time (seconds) unless ``server_offset_ms`` shifts it."""

    clock: Callable[[], float] = time.time
    bar_ms: int = 300_000
    server_offset_ms: int = 0
    market_ahead_ms: int = 0  # the fake exchange's fast replay: its market clock runs ahead of its server clock
    candles: dict[int, Candle] = field(default_factory=dict)  # the exchange's bars by open time
    routes: dict[tuple[str, str], Handler] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    # WebSocket behaviour
    ws_ack: bool = True
    ws_accept: bool = True  # False: the handshake is refused with 503 (the stream cannot reconnect)
    ws_hang_s: float = 0.0  # the handshake hangs this long before being answered
    ws_attempts: int = 0
    ws_outbox: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    ws_received: list[dict[str, Any]] = field(default_factory=list)
    ws_connections: int = 0
    ws_subscribed: int = 0
    _runner: web.AppRunner | None = None
    base_url: str = ""
    ws_url: str = ""

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> WeexStub:
        app = web.Application()
        app.router.add_get(WS_PATH, self._ws)
        app.router.add_route("*", "/{tail:.*}", self._http)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}{WS_PATH}"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- helpers for tests -----------------------------------------------------------------

    def server_ms(self) -> int:
        return int(self.clock() * 1000) + self.server_offset_ms

    def add_candles(self, rows: Iterable[Candle]) -> None:
        for c in rows:
            self.candles[c.ts] = c

    def route(self, method: str, path: str, handler: Handler) -> None:
        self.routes[(method.upper(), path)] = handler

    def calls(self, path: str, method: str | None = None) -> list[Recorded]:
        return [r for r in self.requests if r.path == path and (method is None or r.method == method.upper())]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 3.0) -> None:
        end = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > end:
                raise AssertionError("condition not reached in time")
            await asyncio.sleep(0.005)

    def push_kline(self, c: Candle, symbol: str = "BTCUSDT", interval: str = "5m") -> None:
        self.ws_outbox.put_nowait({"e": "kline", "s": symbol, "d": [{
            "t": c.ts, "o": str(c.open), "h": str(c.high), "l": str(c.low), "c": str(c.close),
            "v": str(c.volume), "i": interval}]})

    def push_ping(self) -> None:
        self.ws_outbox.put_nowait({"event": "ping", "time": self.server_ms()})

    def drop_ws(self) -> None:
        """Close the current WebSocket connection from the server side."""
        self.ws_outbox.put_nowait("CLOSE")

    # -- market data -----------------------------------------------------------------------

    def market_ms(self) -> int:
        return self.server_ms() + self.market_ahead_ms

    def closed(self) -> list[Candle]:
        now = self.market_ms()
        return [self.candles[ts] for ts in sorted(self.candles) if ts + self.bar_ms <= now]

    def forming(self) -> Candle:
        """A bar for the current period with values no real bar has: it must never be delivered."""
        ts = self.market_ms() // self.bar_ms * self.bar_ms
        return Candle(ts, 1.0, 1.0, 1.0, 1.0, 0.0)

    # -- handlers --------------------------------------------------------------------------

    async def _http(self, request: web.Request) -> web.StreamResponse:
        raw_path = request.raw_path
        path, _, query = raw_path.partition("?")
        body = (await request.read()).decode()
        headers = dict(request.headers)
        sig = headers.get(signing.HEADER_SIGN)
        ok: bool | None = None
        if sig is not None:
            ok = (headers.get(signing.HEADER_KEY) == API_KEY and headers.get(signing.HEADER_PASSPHRASE) == PASSPHRASE
                  and signing.verify(SECRET, sig, headers.get(signing.HEADER_TIMESTAMP, ""), request.method, path,
                                     query, body))
        rec = Recorded(request.method, path, query, body, headers, time.monotonic(), ok)
        self.requests.append(rec)
        handler = self.routes.get((request.method, path))
        reply: Reply | None = None
        if handler is not None:
            out = handler(self, rec)
            reply = await out if asyncio.iscoroutine(out) else out  # type: ignore[assignment]
        if reply is None:
            if ok is False:
                reply = (200, {"code": -1043, "msg": "invalid signature"})
            else:
                reply = self._default(rec)
        status, payload = reply[0], reply[1]
        extra = reply[2] if len(reply) > 2 else {}  # type: ignore[misc]
        raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        return web.Response(status=status, body=raw, content_type="application/json", headers=extra)

    def _default(self, rec: Recorded) -> Reply:
        p = rec.params
        if rec.path == "/capi/v3/market/time":
            return 200, {"serverTime": self.server_ms()}
        if rec.path == "/capi/v3/market/klines":
            limit = int(p.get("limit", "100"))
            rows = [*self.closed(), self.forming()][-limit:]
            return 200, [kline_row(c) for c in rows]
        if rec.path == "/capi/v3/market/historyKlines":
            start, end = int(p["startTime"]), int(p["endTime"])
            rows = [c for c in self.closed() if start <= c.ts <= end][:100]
            return 200, [kline_row(c) for c in rows]
        return 404, {"code": -1000, "msg": f"no route {rec.method} {rec.path}"}

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        self.ws_attempts += 1
        if self.ws_hang_s:
            await asyncio.sleep(self.ws_hang_s)
        if not self.ws_accept:
            raise web.HTTPServiceUnavailable()
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self.ws_connections += 1

        async def reader() -> None:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:  # like the real server: commands are text frames
                    continue
                data = orjson.loads(msg.data)
                self.ws_received.append(data)
                if data.get("method") == "SUBSCRIBE":
                    self.ws_subscribed += 1
                    if self.ws_ack:
                        await ws.send_str(orjson.dumps({"result": True, "id": data["id"]}).decode())

        task = asyncio.create_task(reader())
        try:
            while not ws.closed:
                getter = asyncio.ensure_future(self.ws_outbox.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    break
                item = getter.result()
                if item == "CLOSE":
                    await ws.close()
                    break
                await ws.send_str(orjson.dumps(item).decode())
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return ws
