"""WEEX public WebSocket kline stream: subscribe, answer pings, detect silence, reconnect with back-off.

The stream is a *hint*, not the source of truth: the live feed uses it to learn quickly that a bar has
closed (a newer bar's open time appears) and fetches the closed bar's authoritative values over REST.
So this module only has to be robust, not complete: it never raises out of :meth:`KlineStream.updates`
for network trouble, it reconnects (jittered exponential back-off, reset after a healthy connection),
and it counts what happened for /health.

Protocol (see the reference notes): ``{"id": "1", "method": "SUBSCRIBE", "params": ["BTCUSDT@kline_1h_LAST_PRICE"]}``
acked by ``{"result": true, "id": "1"}``; kline messages ``{"e": "kline", "s": "BTCUSDT", "d": [{t,o,h,l,c,v,i}]}``;
server pings ``{"event": "ping", ...}`` answered with ``{"id": "N", "method": "PONG"}``.  Commands go out as
text frames (a server may ignore binary ones).  A connection on
which neither data nor a ping arrives for ``silence_timeout_s`` is treated as dead.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from alphapulse.domain import Candle
from alphapulse.exchange.weex.client import parse_kline_row
from alphapulse.log import get_logger

log = get_logger(__name__)

CLOSE_TIMEOUT_S = 3.0  # closing a connection never takes longer (the server's close frame included)


@dataclass(frozen=True, slots=True)
class KlineUpdate:
    """One kline message entry: the bar's state so far (``candle.ts`` = its open time)."""

    symbol: str
    interval: str
    candle: Candle


class StreamError(RuntimeError):
    """One connection failed (refused, no ack, closed, silent); the stream reconnects after it."""


class KlineStream:
    """Reconnecting kline stream for one symbol/interval on a shared aiohttp session.

    ``session`` is a callable returning the session (so the stream always uses the client's live one).
    Iterate :meth:`updates` from one task; :meth:`close` (or cancelling that task) ends it.
    """

    def __init__(
        self,
        session: Callable[[], aiohttp.ClientSession],
        ws_url: str,
        symbol: str,
        interval: str,
        *,
        price_type: str = "LAST_PRICE",
        silence_timeout_s: float = 30.0,
        ack_timeout_s: float = 10.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._session = session
        self.ws_url = ws_url
        self.symbol = symbol
        self.interval = interval
        self.channel = f"{symbol}@kline_{interval}_{price_type}"
        self.silence_timeout_s = silence_timeout_s
        self.ack_timeout_s = ack_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._rng = rng
        self._next_id = 1
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._closed = False
        # counters and state for /health
        self.connected = False
        self.connects = 0
        self.reconnects = 0  # connections after the first
        self.silences = 0  # connections dropped because nothing arrived for silence_timeout_s
        self.messages = 0
        self.pings = 0
        self.last_error: str | None = None
        # time.monotonic() of the last data frame or ping.  Acks do not count: a stream that reconnects,
        # is acked and then says nothing again is still stalled.
        self.last_message_mono: float | None = None

    def _id(self) -> str:
        out = str(self._next_id)
        self._next_id += 1
        return out

    def last_message_age_s(self) -> float | None:
        """Seconds since the last data frame or ping; None before the first one."""
        if self.last_message_mono is None:
            return None
        return time.monotonic() - self.last_message_mono

    async def close(self) -> None:
        """Close the connection, bounded: aiohttp's ``close()`` from another task first waits, without a timeout,
        for the task inside ``receive()`` to take the closing message, and a shutdown must not hang on that."""
        self._closed = True
        ws = self._ws
        if ws is not None and not ws.closed:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await ws.close()
            except TimeoutError:
                log.warning("weex_ws_close_timed_out", channel=self.channel, timeout_s=CLOSE_TIMEOUT_S)

    async def updates(self) -> AsyncIterator[KlineUpdate]:
        """Kline updates for ever, across reconnects (ends only after :meth:`close`; a later call starts again)."""
        self._closed = False
        failures = 0
        while not self._closed:
            try:
                session = self._session()
            except RuntimeError as exc:  # the client was closed under us: nothing left to reconnect with
                log.info("weex_ws_stopped", channel=self.channel, reason=str(exc))
                return
            healthy = False
            try:
                async for update in self._one_connection(session):
                    healthy = True
                    yield update
            except StreamError as exc:
                if self._closed:  # we closed it ourselves
                    break
                self.last_error = str(exc)
                log.warning("weex_ws_lost", channel=self.channel, error=str(exc), reconnects=self.reconnects)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("weex_ws_lost", channel=self.channel, error=self.last_error, reconnects=self.reconnects)
            finally:
                self.connected = False
                ws, self._ws = self._ws, None
                if ws is not None and not ws.closed:
                    await ws.close()
            if self._closed:
                break
            failures = 0 if healthy else failures + 1
            ceiling = min(self.backoff_max_s, self.backoff_initial_s * (2 ** min(failures, 16)))
            await asyncio.sleep(ceiling * (0.5 + 0.5 * self._rng()))

    async def _one_connection(self, session: aiohttp.ClientSession) -> AsyncIterator[KlineUpdate]:
        """Connect, subscribe, and yield updates until the connection ends (raises :class:`StreamError`)."""
        kwargs: dict[str, Any] = {}
        if hasattr(aiohttp, "ClientWSTimeout"):  # aiohttp >= 3.10: do not wait 10 s for a dead server's close
            kwargs["timeout"] = aiohttp.ClientWSTimeout(ws_close=2.0)
        async with asyncio.timeout(self.ack_timeout_s):  # the handshake must not hang on the session's 5 min
            ws = await session.ws_connect(self.ws_url, autoping=True, heartbeat=None, **kwargs)
        self._ws = ws
        self.connects += 1
        if self.connects > 1:
            self.reconnects += 1
        sub_id = self._id()
        await ws.send_str(orjson.dumps({"id": sub_id, "method": "SUBSCRIBE", "params": [self.channel]}).decode())
        acked = False
        deadline = time.monotonic() + self.ack_timeout_s
        while True:
            timeout = self.silence_timeout_s if acked else max(0.0, deadline - time.monotonic())
            try:
                msg = await ws.receive(timeout=timeout)
            except TimeoutError:
                if not acked:
                    raise StreamError(f"no SUBSCRIBE ack within {self.ack_timeout_s}s") from None
                self.silences += 1
                raise StreamError(f"silent for {self.silence_timeout_s}s (no data, no ping)") from None
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                raise StreamError(f"closed by server (code {ws.close_code})")
            if msg.type == aiohttp.WSMsgType.ERROR:
                raise StreamError(f"websocket error: {ws.exception()!r}")
            if msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                continue
            self.messages += 1
            try:
                data: Any = orjson.loads(msg.data)
            except orjson.JSONDecodeError:
                log.warning("weex_ws_bad_frame", channel=self.channel, frame=str(msg.data)[:200])
                continue
            if not isinstance(data, dict):
                continue
            if data.get("event") == "ping" or data.get("type") == "ping":
                self.pings += 1
                self.last_message_mono = time.monotonic()
                await ws.send_str(orjson.dumps({"id": self._id(), "method": "PONG"}).decode())
                continue
            if "result" in data and str(data.get("id")) == sub_id:
                if data.get("result") is not True and data.get("result") is not None:
                    raise StreamError(f"SUBSCRIBE refused: {data!r}")
                if not acked:
                    acked = True
                    self.connected = True
                    log.info("weex_ws_subscribed", channel=self.channel, reconnects=self.reconnects)
                continue
            if data.get("e") == "kline":
                self.last_message_mono = time.monotonic()
                for update in self._parse_kline(data):
                    yield update

    def _parse_kline(self, data: dict[str, Any]) -> list[KlineUpdate]:
        symbol = str(data.get("s", self.symbol))
        if symbol != self.symbol:
            return []
        rows = data.get("d")
        if isinstance(rows, dict):
            rows = [rows]
        out: list[KlineUpdate] = []
        for row in rows if isinstance(rows, list) else []:
            try:
                candle = parse_kline_row(row)
            except (TypeError, ValueError, IndexError, KeyError):
                log.warning("weex_ws_bad_kline", channel=self.channel, row=str(row)[:200])
                continue
            interval = str(row.get("i", self.interval)) if isinstance(row, dict) else self.interval
            out.append(KlineUpdate(symbol, interval, candle))
        return out
