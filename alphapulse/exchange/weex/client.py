"""Async client for WEEX's contract REST API (V3): signing, server time, rate limits, retries, typed results.

Design points, and why:

* **One encoding.**  A query string and a JSON body are encoded once (:func:`signing.encode_query`,
  compact ``orjson``) and those exact bytes are both signed and sent (``yarl.URL(..., encoded=True)``),
  so no library can re-order or re-quote what the signature covers.
* **Server time.**  Private calls carry a timestamp that must sit inside the server's window.  The
  offset to ``GET /capi/v3/market/time`` is measured (half the round trip), re-measured every
  ``time_sync_interval_s`` and at once after a -1045/-1046 answer, after which that request is sent
  again, once, with a fresh timestamp (the server refused it before acting, so this is always safe).
* **Rate limits.**  Two token buckets (request weight ~500 per 10 s; order placement ~10 per s).  A
  caller that would exceed them *waits* (``asyncio.sleep``) in FIFO order, so bursts are smoothed
  rather than answered with 429s.  A 429 empties the bucket and pauses every caller (``Retry-After``
  when sent, else an exponential, jittered pause), and retries are bounded: no retry storm.
* **Retries only where repeating is harmless.**  GETs (and read-only POSTs such as ``income``) are
  retried on 5xx, connection errors and timeouts with jittered exponential back-off.  Writes are not,
  except :meth:`WeexClient.place_order`, which always carries ``newClientOrderId``: after an unknown
  outcome it first *looks the order up by that id* and only re-sends (with the same id) if the
  exchange has no such order, so a lost response never becomes two positions.
* **No secrets in logs.**  Credentials are registered with :func:`alphapulse.log.register_secrets`;
  request logs carry method, path, status, latency and weight only, never headers or signatures.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from types import TracebackType
from typing import Any

import aiohttp
import orjson
import yarl

from alphapulse.domain import Candle, timeframe_ms
from alphapulse.exchange.weex import signing
from alphapulse.exchange.weex.errors import (
    ExchangeUnavailable,
    OrderNotFoundError,
    RateLimitError,
    TimestampError,
    WeexError,
    error_for_code,
    raise_for_body,
)
from alphapulse.log import get_logger, register_secrets
from alphapulse.metrics import LatencyHistogram

log = get_logger(__name__)

PATH_TIME = "/capi/v3/market/time"
PATH_EXCHANGE_INFO = "/capi/v3/market/exchangeInfo"
PATH_KLINES = "/capi/v3/market/klines"
PATH_HISTORY_KLINES = "/capi/v3/market/historyKlines"
PATH_BALANCE = "/capi/v3/account/balance"
PATH_ALL_POSITIONS = "/capi/v3/account/position/allPosition"
PATH_SINGLE_POSITION = "/capi/v3/account/position/singlePosition"
PATH_LEVERAGE = "/capi/v3/account/leverage"
PATH_MARGIN_TYPE = "/capi/v3/account/marginType"
PATH_ORDER = "/capi/v3/order"
PATH_ALL_OPEN_ORDERS = "/capi/v3/allOpenOrders"
PATH_OPEN_ORDERS = "/capi/v3/openOrders"
PATH_USER_TRADES = "/capi/v3/userTrades"
PATH_INCOME = "/capi/v3/account/income"
PATH_COMMISSION = "/capi/v3/account/commissionRate"

#: historyKlines answers at most this many rows a call.
HISTORY_PAGE_ROWS = 100
#: Request weight budget: ~500 per 10 s per key/IP (the bucket refills continuously).
WEIGHT_CAPACITY, WEIGHT_PER_S = 500.0, 50.0
#: Order placement budget: ~10 per second per account.
ORDER_CAPACITY, ORDER_PER_S = 10.0, 10.0
#: Longest pause after a 429 without Retry-After (the pause doubles with each consecutive 429).
MAX_429_PAUSE_S = 30.0
MAX_CLIENT_ORDER_ID = 36


def kline_weight(limit: int) -> int:
    """Weight of a kline call by its ``limit`` (the Binance-style scale WEEX follows: big pages cost more)."""
    if limit < 100:
        return 1
    if limit < 500:
        return 2
    if limit <= 1000:
        return 5
    return 10


def depth_weight(limit: int) -> int:
    """Weight of an order-book call by depth."""
    if limit <= 50:
        return 2
    if limit <= 100:
        return 5
    if limit <= 500:
        return 10
    return 20


# --------------------------------------------------------------------------------------------------
# Rate limiting
# --------------------------------------------------------------------------------------------------


class TokenBucket:
    """An async token bucket: ``acquire(w)`` waits until ``w`` tokens are there, then takes them.

    Waiters are served one at a time in arrival order (an ``asyncio.Lock`` is FIFO), so a burst of
    callers becomes a steady trickle instead of all of them waking at once.  ``pause(s)`` empties the
    bucket and holds every caller for ``s`` seconds (a 429).  ``monotonic``/``sleep`` are injectable so
    tests can check the spacing on a fake clock.
    """

    def __init__(self, capacity: float, per_s: float, *, monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        if capacity <= 0 or per_s <= 0:
            raise ValueError("capacity and per_s must be > 0")
        self.capacity = float(capacity)
        self.per_s = float(per_s)
        self._monotonic = monotonic
        self._sleep = sleep
        self._tokens = float(capacity)
        self._stamp = monotonic()
        self._paused_until = 0.0
        self._lock = asyncio.Lock()
        self.waited_s = 0.0  # total time callers spent waiting (for describe/health)

    def _refill(self, now: float) -> None:
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.per_s)
        self._stamp = now

    @property
    def tokens(self) -> float:
        self._refill(self._monotonic())
        return self._tokens

    async def acquire(self, weight: float = 1.0) -> float:
        """Take ``weight`` tokens (capped at the capacity), sleeping as needed; returns the seconds waited."""
        weight = min(float(weight), self.capacity)
        waited = 0.0
        async with self._lock:
            while True:
                now = self._monotonic()
                if now < self._paused_until:
                    delay = self._paused_until - now
                else:
                    self._refill(now)
                    if self._tokens >= weight - 1e-9:  # float dust must not cause an endless tiny sleep
                        self._tokens -= weight
                        self.waited_s += waited
                        return waited
                    delay = (weight - self._tokens) / self.per_s
                await self._sleep(delay)
                waited += delay

    def paused_for(self) -> float:
        """Seconds left of the current pause (0 when not paused)."""
        return max(0.0, self._paused_until - self._monotonic())

    def pause(self, seconds: float) -> None:
        """Hold every caller for ``seconds`` and start again from an empty bucket (after a 429)."""
        now = self._monotonic()
        self._paused_until = max(self._paused_until, now + max(0.0, seconds))
        self._tokens = 0.0
        self._stamp = max(now, self._paused_until)


# --------------------------------------------------------------------------------------------------
# Typed results
# --------------------------------------------------------------------------------------------------


def _dec(value: Any, default: Decimal | None = Decimal(0)) -> Decimal | None:
    """Decimal from an exchange number (string or JSON number, via ``str`` so floats keep their text)."""
    if value is None or value == "":
        return default
    try:
        return Decimal(str(value))
    except (InvalidOperation, ValueError):
        return default


def _d(value: Any) -> Decimal:
    out = _dec(value)
    assert out is not None
    return out


def _first(raw: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if k in raw and raw[k] is not None:
            return raw[k]
    return default


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        try:
            return int(Decimal(str(value)))
        except (InvalidOperation, ValueError):
            return default


@dataclass(frozen=True, slots=True)
class SymbolInfo:
    symbol: str
    base_asset: str
    quote_asset: str
    margin_asset: str
    price_precision: int
    quantity_precision: int
    contract_val: Decimal
    min_leverage: int
    max_leverage: int
    min_order_size: Decimal
    max_order_size: Decimal
    maker_fee_rate: Decimal
    taker_fee_rate: Decimal
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def parse(cls, r: dict[str, Any]) -> SymbolInfo:
        return cls(str(r.get("symbol", "")), str(r.get("baseAsset", "")), str(r.get("quoteAsset", "")),
                   str(r.get("marginAsset", "")), _int(r.get("pricePrecision")), _int(r.get("quantityPrecision")),
                   _d(r.get("contractVal")), _int(r.get("minLeverage"), 1), _int(r.get("maxLeverage"), 1),
                   _d(r.get("minOrderSize")), _d(r.get("maxOrderSize")), _d(r.get("makerFeeRate")),
                   _d(r.get("takerFeeRate")), r)


@dataclass(frozen=True, slots=True)
class Balance:
    asset: str
    balance: Decimal
    available: Decimal
    frozen: Decimal
    unrealized_pnl: Decimal
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def parse(cls, r: dict[str, Any]) -> Balance:
        return cls(str(r.get("asset", "")), _d(r.get("balance")), _d(r.get("availableBalance")),
                   _d(r.get("frozen")), _d(_first(r, "unrealizePnl", "unrealizedPnl")), r)


@dataclass(frozen=True, slots=True)
class Position:
    id: str
    symbol: str
    side: str  # LONG / SHORT
    size: Decimal
    open_value: Decimal
    leverage: Decimal
    margin_type: str  # CROSSED / ISOLATED
    unrealized_pnl: Decimal
    liquidation_price: Decimal
    created_time: int
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def entry_price(self) -> Decimal:
        """openValue / size (WEEX does not send an entry price); 0 for an empty position."""
        return self.open_value / self.size if self.size else Decimal(0)

    @classmethod
    def parse(cls, r: dict[str, Any]) -> Position:
        return cls(str(r.get("id", "")), str(r.get("symbol", "")), str(r.get("side", "")).upper(),
                   _d(r.get("size")), _d(r.get("openValue")), _d(r.get("leverage")),
                   str(r.get("marginType", "")), _d(_first(r, "unrealizePnl", "unrealizedPnl")),
                   _d(_first(r, "liquidatePrice", "liquidationPrice")), _int(r.get("createdTime")), r)


#: Some clients send/read PARTIAL_FILL; we normalise to the documented name.
_STATUS_ALIASES = {"PARTIAL_FILL": "PARTIALLY_FILLED", "CANCELLED": "CANCELED"}


@dataclass(frozen=True, slots=True)
class Order:
    order_id: str
    client_order_id: str
    symbol: str
    side: str
    position_side: str
    type: str
    orig_qty: Decimal
    price: Decimal
    executed_qty: Decimal
    avg_price: Decimal
    cum_quote: Decimal
    status: str  # NEW, PARTIALLY_FILLED, FILLED, CANCELED (others passed through)
    time: int
    update_time: int
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def parse(cls, r: dict[str, Any]) -> Order:
        status = str(r.get("status", "")).upper()
        return cls(str(r.get("orderId", "")), str(r.get("clientOrderId", "")), str(r.get("symbol", "")),
                   str(r.get("side", "")), str(r.get("positionSide", "")), str(r.get("type", "")),
                   _d(r.get("origQty")), _d(r.get("price")), _d(r.get("executedQty")), _d(r.get("avgPrice")),
                   _d(r.get("cumQuote")), _STATUS_ALIASES.get(status, status), _int(r.get("time")),
                   _int(r.get("updateTime")), r)


@dataclass(frozen=True, slots=True)
class OrderAck:
    """Result of :meth:`WeexClient.place_order`.

    ``recovered`` is True when the submit's answer was lost and the order was found by its client id
    instead (then ``raw`` is the order as :meth:`WeexClient.get_order` returned it).
    """

    order_id: str
    client_order_id: str
    recovered: bool
    raw: dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Trade:
    id: str
    order_id: str
    symbol: str
    side: str
    position_side: str
    price: Decimal
    qty: Decimal
    quote_qty: Decimal
    commission: Decimal
    commission_asset: str
    realized_pnl: Decimal
    maker: bool
    time: int
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def parse(cls, r: dict[str, Any]) -> Trade:
        return cls(str(r.get("id", "")), str(r.get("orderId", "")), str(r.get("symbol", "")),
                   str(r.get("side", "")), str(r.get("positionSide", "")), _d(r.get("price")),
                   _d(r.get("qty")), _d(r.get("quoteQty")), _d(r.get("commission")),
                   str(r.get("commissionAsset", "")), _d(r.get("realizedPnl")), bool(r.get("maker", False)),
                   _int(r.get("time")), r)


@dataclass(frozen=True, slots=True)
class Income:
    symbol: str
    income_type: str  # e.g. FUNDING_FEE
    income: Decimal  # signed: negative = paid
    asset: str
    time: int
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def parse(cls, r: dict[str, Any]) -> Income:
        return cls(str(r.get("symbol", "")), str(r.get("incomeType", "")), _d(r.get("income")),
                   str(r.get("asset", "")), _int(r.get("time")), r)


@dataclass(frozen=True, slots=True)
class CommissionRate:
    symbol: str
    maker: Decimal
    taker: Decimal
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def parse(cls, r: dict[str, Any], symbol: str) -> CommissionRate:
        return cls(str(r.get("symbol", symbol)), _d(_first(r, "makerCommissionRate", "makerFeeRate", "maker")),
                   _d(_first(r, "takerCommissionRate", "takerFeeRate", "taker")), r)


def parse_kline_row(row: Any) -> Candle:
    """A REST kline row ``[openTime, open, high, low, close, volume, ...]`` (strings) as a :class:`Candle`.

    Dict rows (``t/o/h/l/c/v``, as on the WebSocket) are accepted too.  Unparseable numbers become NaN
    rather than an exception: the daemon's validator rejects and counts them.
    """
    values: list[Any]
    if isinstance(row, Mapping):
        values = [row.get(k) for k in ("t", "o", "h", "l", "c", "v")]
    else:
        values = list(row[:6])

    def f(x: Any) -> float:
        try:
            return float(x)
        except (TypeError, ValueError):
            return float("nan")

    return Candle(int(values[0]), f(values[1]), f(values[2]), f(values[3]), f(values[4]), f(values[5]))


def _rows(data: Any) -> list[Any]:
    """The list inside an answer (a bare list, or wrapped in ``data``/``list``/``rows``/``items``)."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        for key in ("data", "list", "rows", "items", "symbols"):
            if isinstance(data.get(key), list):
                return list(data[key])
        return [data]
    return []


# --------------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------------


class WeexClient:
    """Async WEEX contract REST client (one aiohttp session; use ``async with`` or ``start``/``close``).

    ``clock`` is the wall clock in seconds (``time.time``); timestamps sent are ``clock() + offset``.
    Public calls need no credentials; private calls raise :class:`WeexError` without them.
    """

    def __init__(
        self,
        rest_url: str,
        api_key: str | None = None,
        secret_key: str | None = None,
        passphrase: str | None = None,
        *,
        timeout_s: float = 10.0,
        max_retries: int = 3,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.time,
        time_sync_interval_s: float = 300.0,
        backoff_base_s: float = 0.25,
        backoff_max_s: float = 8.0,
        weight_limiter: TokenBucket | None = None,
        order_limiter: TokenBucket | None = None,
        rng: Callable[[], float] = random.random,
        max_rate_limit_pause_s: float = MAX_429_PAUSE_S,
    ) -> None:
        self.rest_url = rest_url.rstrip("/")
        self._path_prefix = yarl.URL(self.rest_url).path.rstrip("/")
        self._api_key = api_key
        self._secret = secret_key
        self._passphrase = passphrase
        register_secrets([api_key, secret_key, passphrase])
        self.timeout_s = timeout_s
        self.max_retries = max(0, int(max_retries))
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session = session
        self._own_session = session is None
        self._clock = clock
        self.time_sync_interval_s = time_sync_interval_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._weights = weight_limiter or TokenBucket(WEIGHT_CAPACITY, WEIGHT_PER_S)
        self._orders = order_limiter or TokenBucket(ORDER_CAPACITY, ORDER_PER_S)
        self._rng = rng
        self.max_rate_limit_pause_s = max_rate_limit_pause_s
        self.offset_ms = 0  # server time - local clock
        self._synced_at: float | None = None  # time.monotonic() of the last sync
        self._sync_lock = asyncio.Lock()
        self._consecutive_429 = 0
        # counters for /health, Prometheus and tests
        self.requests = 0
        self.errors = 0  # requests not answered with success (timeout, connection error, HTTP error, error body)
        self.retries = 0
        self.rate_limited = 0
        self.time_syncs = 0
        self.latency = LatencyHistogram()  # µs per request, sent to answered or failed (the API response time)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the session on the running loop if none was given (idempotent)."""
        if self._session is None or (self._own_session and self._session.closed):
            self._session = aiohttp.ClientSession()
            self._own_session = True

    async def close(self) -> None:
        """Close the session if we created it (a session passed in belongs to the caller)."""
        if self._session is not None and self._own_session and not self._session.closed:
            await self._session.close()

    async def __aenter__(self) -> WeexClient:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        """The live session (for the WebSocket stream, which shares it); :meth:`start` first."""
        if self._session is None or self._session.closed:
            raise RuntimeError("WeexClient is not started")
        return self._session

    @property
    def has_credentials(self) -> bool:
        return bool(self._api_key and self._secret and self._passphrase)

    # -- time ------------------------------------------------------------------------------

    def now_ms(self) -> int:
        """Wall time corrected by the measured server offset, in ms."""
        return int(self._clock() * 1000) + self.offset_ms

    async def server_time(self) -> int:
        """The exchange's time in ms (one call; does not change the kept offset)."""
        data = await self._request("GET", PATH_TIME)
        return _int(data.get("serverTime") if isinstance(data, dict) else None)

    async def sync_time(self) -> int:
        """Measure and keep ``offset_ms`` (server - local, at the midpoint of the round trip); returns it."""
        async with self._sync_lock:
            t0 = self._clock()
            server = await self.server_time()
            t1 = self._clock()
            self.offset_ms = server - int((t0 + t1) * 500)
            self._synced_at = time.monotonic()
            self.time_syncs += 1
            log.debug("weex_time_synced", offset_ms=self.offset_ms, rtt_ms=round((t1 - t0) * 1000, 1))
            return self.offset_ms

    def _sync_due(self) -> bool:
        return self._synced_at is None or time.monotonic() - self._synced_at >= self.time_sync_interval_s

    # -- transport -------------------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        """Full-jitter exponential back-off: uniform in [base*2^attempt / 2, base*2^attempt], capped."""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * (2**attempt))
        return ceiling * (0.5 + 0.5 * self._rng())

    def _on_rate_limited(self, err: RateLimitError) -> float:
        """Pause every caller: Retry-After when the server sent it, else an exponential, jittered pause."""
        self.rate_limited += 1
        if self._weights.paused_for() > 0 and err.retry_after_s is None:
            # Another caller's 429 from the same burst already paused everyone: one episode, one step.
            return self._weights.paused_for()
        self._consecutive_429 += 1
        if err.retry_after_s is not None:
            pause = min(err.retry_after_s, self.max_rate_limit_pause_s)
        else:
            pause = min(self.max_rate_limit_pause_s, self.backoff_base_s * (2 ** (self._consecutive_429 - 1)))
            pause *= 0.5 + 0.5 * self._rng()
        self._weights.pause(pause)
        log.warning("weex_rate_limited", endpoint=err.endpoint, pause_s=round(pause, 3),
                    consecutive=self._consecutive_429)
        return pause

    async def _request(
        self,
        method: str,
        path: str,
        params: Iterable[tuple[str, object]] | None = None,
        body: Mapping[str, Any] | None = None,
        *,
        signed: bool = False,
        weight: int = 1,
        order: bool = False,
        retry: bool | None = None,
    ) -> Any:
        """Send one logical request; returns the parsed JSON body or raises a :class:`WeexError`.

        ``retry`` (default: only for GET) allows re-sending after 5xx/connection errors/timeouts and
        429s, at most ``max_retries`` times.  A timestamp error re-syncs and re-sends once whatever
        ``retry`` says, because the server refused the request before acting on it.
        """
        method = method.upper()
        if retry is None:
            retry = method == "GET"
        query = signing.encode_query(params or ())
        body_text = orjson.dumps(body).decode() if body is not None else ""
        resynced = False
        attempt = 0
        while True:
            try:
                result = await self._send_once(method, path, query, body_text, signed, weight, order, attempt)
                self._consecutive_429 = 0
                return result
            except TimestampError:
                if not signed or resynced:
                    raise
                resynced = True
                log.warning("weex_timestamp_rejected_resyncing", endpoint=f"{method} {path}",
                            offset_ms=self.offset_ms)
                await self.sync_time()
                continue
            except RateLimitError as err:
                self._on_rate_limited(err)  # the limiter's pause is the back-off for every caller
                if not retry or attempt >= self.max_retries:
                    raise
            except ExchangeUnavailable as err:
                if not retry or attempt >= self.max_retries:
                    raise
                delay = self._backoff(attempt)
                log.info("weex_retry", endpoint=err.endpoint, attempt=attempt + 1, delay_s=round(delay, 3),
                         error=err.msg, status=err.http_status)
                await asyncio.sleep(delay)
            attempt += 1
            self.retries += 1

    async def _send_once(self, method: str, path: str, query: str, body_text: str, signed: bool, weight: int,
                         order: bool, attempt: int) -> Any:
        endpoint = f"{method} {path}"
        if self._session is None or (self._own_session and self._session.closed):
            await self.start()  # lazily, on the running loop
        session = self.session
        headers: dict[str, str] = {}
        if signed and not (self._api_key and self._secret and self._passphrase):
            raise WeexError(None, "private endpoint needs api_key, secret_key and passphrase", None, endpoint)
        if path != PATH_TIME and (signed or self._synced_at is not None) and self._sync_due():
            # Periodic re-sync, for public calls too once a sync happened (the live feed's clock relies on it).
            # Only the very first sync of a signed call is fatal; later ones keep the last offset on failure.
            try:
                await self.sync_time()
            except WeexError as exc:
                if self._synced_at is None and signed:
                    raise
                self._synced_at = time.monotonic()  # keep the old offset; try again one interval later
                log.warning("weex_time_resync_failed", error=str(exc), offset_ms=self.offset_ms)
        await self._weights.acquire(weight)
        if order:
            await self._orders.acquire(1)
        if signed:
            assert self._api_key and self._secret and self._passphrase
            headers = signing.signed_headers(self._api_key, self._secret, self._passphrase, self.now_ms(), method,
                                             self._path_prefix + path, query, body_text)
        elif body_text:
            headers["Content-Type"] = "application/json"
        url = yarl.URL(self.rest_url + path + (f"?{query}" if query else ""), encoded=True)
        self.requests += 1
        t0 = time.monotonic()
        try:
            body = await self._exchange_once(session, method, path, url, body_text, headers, weight, attempt,
                                             endpoint, t0)
        except asyncio.CancelledError:
            raise  # we stopped waiting (shutdown): neither an answer nor the exchange's error
        except Exception:
            self.latency.add((time.monotonic() - t0) * 1e6)
            self.errors += 1
            raise
        self.latency.add((time.monotonic() - t0) * 1e6)
        return body

    async def _exchange_once(self, session: aiohttp.ClientSession, method: str, path: str, url: yarl.URL,
                             body_text: str, headers: dict[str, str], weight: int, attempt: int, endpoint: str,
                             t0: float) -> Any:
        """One HTTP round trip and its answer, parsed or raised as a :class:`WeexError`."""
        try:
            async with session.request(method, url, data=body_text.encode() if body_text else None,
                                       headers=headers, timeout=self._timeout, allow_redirects=False) as resp:
                raw = await resp.read()
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
        except TimeoutError as exc:
            log.debug("weex_request", method=method, path=path, status=None, weight=weight, attempt=attempt,
                      latency_ms=round((time.monotonic() - t0) * 1000, 1), error="timeout")
            raise ExchangeUnavailable(None, f"timeout after {self.timeout_s}s", None, endpoint) from exc
        except aiohttp.ClientError as exc:
            log.debug("weex_request", method=method, path=path, status=None, weight=weight, attempt=attempt,
                      latency_ms=round((time.monotonic() - t0) * 1000, 1), error=type(exc).__name__)
            raise ExchangeUnavailable(None, f"{type(exc).__name__}: {exc}", None, endpoint) from exc
        log.debug("weex_request", method=method, path=path, status=status, weight=weight, attempt=attempt,
                  latency_ms=round((time.monotonic() - t0) * 1000, 1))
        try:
            body = orjson.loads(raw) if raw.strip() else None
        except orjson.JSONDecodeError:
            body = None
            if 200 <= status < 300:
                raise ExchangeUnavailable(None, f"unparseable body: {raw[:200]!r}", status, endpoint) from None
        raise_for_body(status, body, endpoint, retry_after)
        return body

    # -- market data -----------------------------------------------------------------------

    async def exchange_info(self, symbol: str | None = None) -> list[SymbolInfo]:
        """Contract specs; with ``symbol``, only that one (an empty list if the exchange has none)."""
        data = await self._request("GET", PATH_EXCHANGE_INFO, [("symbol", symbol)])
        rows = data.get("symbols", []) if isinstance(data, dict) else _rows(data)
        out = [SymbolInfo.parse(r) for r in rows if isinstance(r, dict)]
        return [s for s in out if s.symbol == symbol] if symbol else out

    async def klines(self, symbol: str, interval: str, limit: int = 100) -> list[Candle]:
        """The most recent ``limit`` bars (the last one is usually still forming), oldest first."""
        limit = max(1, min(int(limit), 1000))
        data = await self._request("GET", PATH_KLINES, [("symbol", symbol), ("interval", interval), ("limit", limit)],
                                   weight=kline_weight(limit))
        return sorted((parse_kline_row(r) for r in _rows(data)), key=lambda c: c.ts)

    async def history_klines(self, symbol: str, interval: str, start_ms: int, end_ms: int) -> list[Candle]:
        """Bars with open time in ``[start_ms, end_ms]``, at most 100 (one historyKlines call), oldest first."""
        data = await self._request("GET", PATH_HISTORY_KLINES, [("symbol", symbol), ("interval", interval),
                                                                ("startTime", int(start_ms)), ("endTime", int(end_ms))],
                                   weight=kline_weight(HISTORY_PAGE_ROWS))
        return sorted((parse_kline_row(r) for r in _rows(data)), key=lambda c: c.ts)

    async def history(self, symbol: str, interval: str, start_ms: int, end_ms: int,
                      closed_by_ms: int | None = None) -> list[Candle]:
        """Every *closed* bar with open time in ``[start_ms, end_ms]``: pages of 100, de-duplicated, sorted.

        Pages are windows of exactly 100 bar slots, so the result is the same whether the server returns
        the oldest or the newest rows of an over-long window; a window the exchange has no data for
        (an outage) just yields nothing, and the next window is asked anyway.  "Closed" means
        ``ts + bar <= closed_by_ms``, by default the server-corrected clock (a caller that knows more,
        such as the live feed that saw the next bar open on the stream, passes a later time).
        """
        bar = timeframe_ms(interval)
        first = -(-int(start_ms) // bar) * bar  # first aligned open time >= start_ms
        now = self.now_ms() if closed_by_ms is None else int(closed_by_ms)
        last = min(int(end_ms), now - bar)
        by_ts: dict[int, Candle] = {}
        cursor = first
        while cursor <= last:
            page_end = min(last, cursor + HISTORY_PAGE_ROWS * bar - 1)
            for c in await self.history_klines(symbol, interval, cursor, page_end):
                if first <= c.ts <= last and c.ts + bar <= now:
                    by_ts[c.ts] = c
            cursor += HISTORY_PAGE_ROWS * bar
        return [by_ts[ts] for ts in sorted(by_ts)]

    # -- account ---------------------------------------------------------------------------

    async def balance(self) -> list[Balance]:
        data = await self._request("GET", PATH_BALANCE, signed=True, weight=5)
        return [Balance.parse(r) for r in _rows(data) if isinstance(r, dict)]

    async def positions(self, symbol: str | None = None) -> list[Position]:
        """Open positions (all, or one symbol's); an empty list when flat."""
        if symbol:
            data = await self._request("GET", PATH_SINGLE_POSITION, [("symbol", symbol)], signed=True, weight=2)
        else:
            data = await self._request("GET", PATH_ALL_POSITIONS, signed=True, weight=5)
        return [Position.parse(r) for r in _rows(data) if isinstance(r, dict) and r]

    async def set_leverage(self, symbol: str, leverage: int | Decimal | str, margin_type: str = "CROSSED") -> Any:
        """Set the leverage: ``crossLeverage`` for CROSSED, both isolated sides for ISOLATED (no plain field)."""
        lev = str(leverage)
        body: dict[str, Any] = {"symbol": symbol, "marginType": margin_type}
        if margin_type.upper() == "ISOLATED":
            body.update(isolatedLongLeverage=lev, isolatedShortLeverage=lev)
        else:
            body["crossLeverage"] = lev
        return await self._request("POST", PATH_LEVERAGE, body=body, signed=True)

    async def set_margin_type(self, symbol: str, margin_type: str = "CROSSED") -> Any:
        return await self._request("POST", PATH_MARGIN_TYPE, body={"symbol": symbol, "marginType": margin_type},
                                   signed=True)

    async def commission_rate(self, symbol: str) -> CommissionRate:
        data = await self._request("GET", PATH_COMMISSION, [("symbol", symbol)], signed=True)
        rows = _rows(data)
        return CommissionRate.parse(rows[0] if rows and isinstance(rows[0], dict) else {}, symbol)

    async def income(self, symbol: str | None = None, start_ms: int | None = None,
                     income_type: str | None = None) -> list[Income]:
        """Funding and other income. A POST on WEEX, but a read: retried like a GET."""
        body: dict[str, Any] = {}
        if symbol:
            body["symbol"] = symbol
        if income_type:
            body["incomeType"] = income_type
        if start_ms is not None:
            body["startTime"] = int(start_ms)
        data = await self._request("POST", PATH_INCOME, body=body, signed=True, weight=5, retry=True)
        return [Income.parse(r) for r in _rows(data) if isinstance(r, dict)]

    # -- orders ----------------------------------------------------------------------------

    async def place_order(
        self,
        symbol: str,
        side: str,
        position_side: str,
        quantity: Decimal | str,
        client_order_id: str,
        order_type: str = "MARKET",
        price: Decimal | str | None = None,
        reduce_only: bool = False,
        time_in_force: str = "GTC",
    ) -> OrderAck:
        """Submit an order, idempotently by ``client_order_id``.

        When the outcome is unknown (timeout, dropped connection, 5xx), the order is looked up by its
        client id first; only if the exchange has none is the *same* body (same id) sent again, after a
        back-off.  A 429 is a refusal, so the same body is sent again after the limiter's pause.  If the
        look-up itself fails (exchange unreachable), :class:`ExchangeUnavailable` is raised: the order's fate is
        unknown and the caller must reconcile (``get_order`` by the same client id) before deciding again.
        """
        if not client_order_id or len(client_order_id) > MAX_CLIENT_ORDER_ID:
            raise ValueError(f"client_order_id must be 1..{MAX_CLIENT_ORDER_ID} chars")
        order_type = order_type.upper()
        body: dict[str, Any] = {"symbol": symbol, "side": side.upper(), "quantity": str(quantity), "type": order_type,
                                "positionSide": position_side.upper(), "newClientOrderId": client_order_id}
        if order_type == "LIMIT":
            if price is None:
                raise ValueError("a LIMIT order needs a price")
            body["price"] = str(price)
            body["timeInForce"] = time_in_force
        if reduce_only:
            body["reduceOnly"] = True
        attempt = 0
        while True:
            try:
                data = await self._request("POST", PATH_ORDER, body=body, signed=True, order=True, retry=False)
                self._consecutive_429 = 0
                break
            except RateLimitError:
                if attempt >= self.max_retries:
                    raise
            except ExchangeUnavailable as err:
                if attempt >= self.max_retries:
                    raise
                log.warning("weex_submit_outcome_unknown", client_order_id=client_order_id, error=err.msg,
                            status=err.http_status, attempt=attempt + 1)
                await asyncio.sleep(self._backoff(attempt))
                try:
                    found = await self.get_order(symbol, client_order_id=client_order_id)
                except OrderNotFoundError:
                    log.info("weex_submit_not_found_resending", client_order_id=client_order_id)
                else:
                    log.info("weex_submit_recovered", client_order_id=client_order_id, order_id=found.order_id)
                    return OrderAck(found.order_id, found.client_order_id or client_order_id, True, found.raw)
            attempt += 1
            self.retries += 1
        row = data if isinstance(data, dict) else {}
        if row.get("success") is False:
            raise error_for_code(row.get("errorCode"), str(row.get("errorMessage", "order rejected")), 200,
                                 f"POST {PATH_ORDER}")
        return OrderAck(str(row.get("orderId", "")), str(row.get("clientOrderId") or client_order_id), False, row)

    @staticmethod
    def _order_ref(symbol: str, order_id: str | int | None, client_order_id: str | None) -> list[tuple[str, object]]:
        if order_id is None and not client_order_id:
            raise ValueError("need order_id or client_order_id")
        params: list[tuple[str, object]] = [("symbol", symbol)]
        if order_id is not None:
            params.append(("orderId", order_id))
        else:
            params.append(("origClientOrderId", client_order_id))
        return params

    async def get_order(self, symbol: str, order_id: str | int | None = None,
                        client_order_id: str | None = None) -> Order:
        """One order by exchange id or client id; :class:`OrderNotFoundError` if the exchange has none."""
        data = await self._request("GET", PATH_ORDER, self._order_ref(symbol, order_id, client_order_id),
                                   signed=True)
        rows = _rows(data)
        if not rows or not isinstance(rows[0], dict) or not rows[0]:
            raise OrderNotFoundError(None, "empty answer", 200, f"GET {PATH_ORDER}")
        return Order.parse(rows[0])

    async def cancel_order(self, symbol: str, order_id: str | int | None = None,
                           client_order_id: str | None = None) -> Any:
        """Cancel one order (not retried: a second cancel would answer "not found" and hide the first)."""
        return await self._request("DELETE", PATH_ORDER, self._order_ref(symbol, order_id, client_order_id),
                                   signed=True)

    async def cancel_all(self, symbol: str) -> Any:
        return await self._request("DELETE", PATH_ALL_OPEN_ORDERS, [("symbol", symbol)], signed=True)

    async def open_orders(self, symbol: str) -> list[Order]:
        data = await self._request("GET", PATH_OPEN_ORDERS, [("symbol", symbol)], signed=True, weight=2)
        return [Order.parse(r) for r in _rows(data) if isinstance(r, dict) and r]

    async def user_trades(self, symbol: str, order_id: str | int | None = None,
                          start_ms: int | None = None) -> list[Trade]:
        """Fills (real price and fee) for a symbol, optionally one order's or since ``start_ms``."""
        data = await self._request("GET", PATH_USER_TRADES, [("symbol", symbol), ("orderId", order_id),
                                                              ("startTime", start_ms)], signed=True, weight=5)
        return [Trade.parse(r) for r in _rows(data) if isinstance(r, dict)]

    def describe(self) -> dict[str, object]:
        """JSON-able counters for /health and /metrics (the monitor's API error-rate and response-time rules)."""
        lat = self.latency.summary()
        return {"rest_url": self.rest_url, "offset_ms": self.offset_ms, "requests": self.requests,
                "retries": self.retries, "rate_limited": self.rate_limited, "time_syncs": self.time_syncs,
                "errors": self.errors,
                "latency_ms": {"count": lat["count"], "p50": round(lat["p50"] / 1000, 3),
                               "p99": round(lat["p99"] / 1000, 3), "max": round(lat["max"] / 1000, 3)},
                "weight_tokens": round(self._weights.tokens, 1), "limiter_waited_s": round(self._weights.waited_s, 3)}
