"""State and matching engine of the fake WEEX exchange: candles, clock-driven fills, positions, funding.

Pure apart from the time the caller passes in, so it can be unit-tested without sockets and the aiohttp layer
(:mod:`alphapulse.exchange.weex.fake`) stays a thin translation of HTTP into method calls.  Every money amount
is a ``Decimal`` booked at 1e-8 USDT through :mod:`alphapulse.costs`, so ``initial - fees + realized pnl +
funding == wallet balance`` holds exactly, which is what the daemon's reconciliation is tested against.

Pricing model (documented because tests depend on it):

* A MARKET order fills at the *open* of the bar containing the clock time (the last price known for sure),
  moved against the taker by ``slippage_bps``.
* The forming bar is served with partial values: open = its open, close = open + (close - open) * f,
  high/low = open + (high/low - open) * f, volume = volume * f, where f is the elapsed fraction of the bar;
  so it converges to the real bar, never leaves the real bar's range, and high/low only widen.  That partial
  close is the "last price" used for unrealized PnL and tickers.
* A LIMIT order that is marketable when placed fills at once like a market order (taker fee).  Otherwise it
  rests and fills (maker fee) when a later bar, one that opens at or after the order's time, trades through
  its price, at the limit price or the better bar open if the bar gapped through it; the fill is booked at the
  bar's close time, the moment the fake "learns" it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal, InvalidOperation
from typing import Any

from alphapulse.costs import BPS, money
from alphapulse.exchange.weex.fake_market import CandleSeries, FundingSchedule, MarketSpec

ZERO = Decimal(0)

# Order statuses as WEEX V3 returns them.
NEW, PARTIALLY_FILLED, FILLED, CANCELED = "NEW", "PARTIALLY_FILLED", "FILLED", "CANCELED"
OPEN_STATUSES = (NEW, PARTIALLY_FILLED)


class WeexError(Exception):
    """An exchange-side rejection: becomes a Binance-style ``{"code", "msg"}`` body with ``http_status``."""

    def __init__(self, code: int, msg: str, http_status: int = 400) -> None:
        super().__init__(f"{code}: {msg}")
        self.code = code
        self.msg = msg
        self.http_status = http_status

    def body(self) -> dict[str, Any]:
        return {"code": self.code, "msg": self.msg}


def fmt(value: Decimal, places: int) -> str:
    """Fixed-point text with exactly ``places`` decimals, as WEEX writes prices and quantities."""
    return format(value.quantize(Decimal(1).scaleb(-places)), "f")


def to_decimal(value: object, field_name: str) -> Decimal:
    """Parse a number a client sent as a string or JSON number; -1142 (PARAM_ERROR) otherwise."""
    if isinstance(value, bool) or value is None:
        raise WeexError(-1142, f"Parameter {field_name} is invalid.")
    try:
        d = Decimal(str(value))
    except InvalidOperation:
        raise WeexError(-1142, f"Parameter {field_name} is invalid.") from None
    if not d.is_finite():
        raise WeexError(-1142, f"Parameter {field_name} is invalid.")
    return d


def to_bool(value: object) -> bool:
    """``reduceOnly`` arrives as a JSON boolean (ccxt) or the strings ``true``/``false`` (query strings)."""
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    text = str(value).lower()
    if text in ("true", "1"):
        return True
    if text in ("false", "0", ""):
        return False
    raise WeexError(-1142, "Parameter reduceOnly is invalid.")


@dataclass
class Order:
    order_id: int
    client_order_id: str
    symbol: str
    side: str  # BUY / SELL
    position_side: str  # LONG / SHORT
    type: str  # MARKET / LIMIT
    orig_qty: Decimal
    price: Decimal | None
    time_in_force: str
    reduce_only: bool
    time: int
    update_time: int
    status: str = NEW
    executed_qty: Decimal = ZERO
    cum_quote: Decimal = ZERO
    origin: str = "client"  # "foreign": planted through the admin API
    pending_parts: list[Decimal] = field(default_factory=list)
    next_part_wall: float = 0.0

    @property
    def closing(self) -> bool:
        """Hedge mode: SELL on LONG and BUY on SHORT reduce a position; the other two open one."""
        return (self.side == "SELL") == (self.position_side == "LONG")

    @property
    def avg_price(self) -> Decimal:
        return self.cum_quote / self.executed_qty if self.executed_qty else ZERO


@dataclass(frozen=True)
class Fill:
    trade_id: int
    order_id: int
    symbol: str
    side: str
    position_side: str
    price: Decimal
    qty: Decimal
    quote_qty: Decimal
    fee: Decimal
    realized_pnl: Decimal
    maker: bool
    time: int


@dataclass
class Position:
    position_id: int
    symbol: str
    side: str  # LONG / SHORT
    leverage: int
    margin_type: str
    created_time: int
    updated_time: int
    size: Decimal = ZERO
    open_value: Decimal = ZERO
    open_fee: Decimal = ZERO
    funding_fee: Decimal = ZERO
    cum_open_size: Decimal = ZERO
    cum_open_value: Decimal = ZERO
    cum_close_size: Decimal = ZERO
    cum_close_value: Decimal = ZERO
    cum_close_fee: Decimal = ZERO
    origin: str = "client"

    def unrealized(self, price: Decimal) -> Decimal:
        value = self.size * price
        return money(value - self.open_value if self.side == "LONG" else self.open_value - value)


@dataclass(frozen=True)
class Income:
    bill_id: int
    symbol: str
    income_type: str
    income: Decimal  # realized pnl of a fill, or the funding amount (signed)
    fill_fee: Decimal  # minus the fee of a fill (0 for funding)
    balance: Decimal  # wallet balance after this bill
    time: int


class Engine:
    """One account trading one contract against a candle series; the caller supplies market time ``now``."""

    _ids = itertools.count(737_191_855_967_437_160)

    def __init__(self, market: MarketSpec, candles: CandleSeries, *, initial_balance: Decimal = Decimal("10000"),
                 funding: FundingSchedule | None = None, slippage_bps: Decimal = ZERO, default_leverage: int = 20,
                 partial_fill_interval_s: float = 0.2, now: int = 0) -> None:
        self.market = market
        self.candles = candles
        self.initial_balance = money(initial_balance)
        self.wallet = self.initial_balance
        self.funding = funding or FundingSchedule()
        self.slippage_bps = slippage_bps
        self.partial_fill_interval_s = partial_fill_interval_s
        self.margin_type = "CROSSED"
        self.cross_leverage = default_leverage
        self.isolated_leverage = {"LONG": default_leverage, "SHORT": default_leverage}
        self.orders: dict[int, Order] = {}
        self.by_client_id: dict[str, int] = {}
        self.fills: list[Fill] = []
        self.positions: dict[str, Position] = {}  # by side, one symbol
        self.incomes: list[Income] = []
        self.funding_events: list[tuple[int, Decimal, Decimal]] = []  # (time, rate, mark price)
        self.total_fees = ZERO
        self.total_realized = ZERO
        self.total_funding = ZERO
        self.duplicate_client_ids = 0
        self._processed_to = now  # market time up to which bar closes and funding are booked

    # -- queries -------------------------------------------------------------------------------

    def leverage_for(self, side: str) -> int:
        return self.cross_leverage if self.margin_type == "CROSSED" else self.isolated_leverage[side]

    def unrealized(self, now: int) -> Decimal:
        price = self.candles.last_price(now)
        return sum((p.unrealized(price) for p in self.positions.values()), ZERO)

    def position_margin(self) -> Decimal:
        return sum((money(p.open_value / p.leverage) for p in self.positions.values()), ZERO)

    def order_margin(self) -> Decimal:
        total = ZERO
        for o in self.orders.values():
            if o.status in OPEN_STATUSES and not o.closing and o.price is not None:
                total += money((o.orig_qty - o.executed_qty) * o.price / self.leverage_for(o.position_side))
        return total

    def available(self, now: int) -> Decimal:
        return self.wallet + self.unrealized(now) - self.position_margin() - self.order_margin()

    def balance_json(self, now: int) -> list[dict[str, Any]]:
        frozen = self.position_margin() + self.order_margin()
        return [{
            "asset": self.market.quote,
            "balance": format(self.wallet, "f"),
            "availableBalance": format(money(self.available(now)), "f"),
            "frozen": format(frozen, "f"),
            "unrealizePnl": format(self.unrealized(now), "f"),
        }]

    def find_order(self, order_id: object = None, client_order_id: object = None) -> Order:
        """By ``orderId`` or ``origClientOrderId``; -3200 (contract order does not exist) otherwise."""
        if order_id in (None, "") and client_order_id in (None, ""):
            raise WeexError(-1140, "Either orderId or origClientOrderId must be sent.")
        oid: int | None = None
        if order_id not in (None, ""):
            try:
                oid = int(str(order_id))
            except ValueError:
                raise WeexError(-1142, "Parameter orderId is invalid.") from None
        elif client_order_id is not None:
            oid = self.by_client_id.get(str(client_order_id))
        order = self.orders.get(oid) if oid is not None else None
        if order is None:
            raise WeexError(-3200, "Order does not exist.")
        return order

    # -- orders --------------------------------------------------------------------------------

    def place_order(self, params: dict[str, Any], now: int, wall: float = 0.0, partial_parts: int = 1,
                    origin: str = "client") -> tuple[Order, bool]:
        """Validate and place an order; returns (order, created).  ``created`` is False for a repeated
        ``newClientOrderId``: the existing order is returned and nothing else happens (idempotent retries)."""
        self.advance(now, wall)
        m = self.market
        symbol = params.get("symbol")
        if not symbol:
            raise WeexError(-1141, "Parameter symbol cannot be empty.")
        if symbol != m.symbol:
            raise WeexError(-1121, "Invalid symbol.")
        client_id = params.get("newClientOrderId")
        client_id = None if client_id in (None, "") else str(client_id)
        if client_id is not None:
            if len(client_id) > 36:
                raise WeexError(-1180, "newClientOrderId length must not exceed 36.")
            existing = self.by_client_id.get(client_id)
            if existing is not None:
                self.duplicate_client_ids += 1
                return self.orders[existing], False
        side = str(params.get("side", "")).upper()
        if side not in ("BUY", "SELL"):
            raise WeexError(-1117, "Invalid side.")
        position_side = str(params.get("positionSide", "")).upper()
        if position_side not in ("LONG", "SHORT"):
            raise WeexError(-1142, "Parameter positionSide is invalid.")
        otype = str(params.get("type", "")).upper()
        if otype not in ("MARKET", "LIMIT"):
            raise WeexError(-1116, "Invalid order type.")
        if params.get("quantity") in (None, ""):
            raise WeexError(-1141, "Parameter quantity cannot be empty.")
        qty = to_decimal(params["quantity"], "quantity")
        if qty <= 0:
            raise WeexError(-1142, "Parameter quantity is invalid.")
        if qty != qty.quantize(m.step, rounding=ROUND_DOWN):
            raise WeexError(-1160, f"Decimal precision error: quantity allows {m.quantity_precision} decimals.")
        if qty < m.min_order_size:
            raise WeexError(-1142, f"Parameter quantity is invalid: less than minOrderSize {m.min_order_size}.")
        if qty > m.max_order_size:
            raise WeexError(-3007, "Maximum contract order quantity exceeded.")
        price: Decimal | None = None
        tif = str(params.get("timeInForce") or ("GTC" if otype == "LIMIT" else "")).upper()
        if otype == "LIMIT":
            if params.get("price") in (None, ""):
                raise WeexError(-1141, "Parameter price cannot be empty.")
            price = to_decimal(params["price"], "price")
            if price <= 0:
                raise WeexError(-1142, "Parameter price is invalid.")
            if price != price.quantize(m.tick, rounding=ROUND_DOWN):
                raise WeexError(-1160, f"Decimal precision error: price allows {m.price_precision} decimals.")
            if tif not in ("GTC", "IOC", "FOK"):
                raise WeexError(-1115, "Invalid timeInForce.")
        reduce_only = to_bool(params.get("reduceOnly"))
        order = Order(order_id=next(self._ids), client_order_id=client_id or f"fake-{next(self._ids)}",
                      symbol=m.symbol, side=side, position_side=position_side, type=otype, orig_qty=qty, price=price,
                      time_in_force=tif, reduce_only=reduce_only, time=now, update_time=now, origin=origin)
        if reduce_only and not order.closing:
            raise WeexError(-1128, "Combination of optional parameters invalid: reduceOnly opens a position.")
        ref = self._fill_price(side, now)
        if order.closing:
            held = self.positions.get(position_side)
            if held is None or held.size < qty:
                raise WeexError(-1142, f"Parameter quantity is invalid: exceeds the {position_side} position.")
        else:
            margin = qty * (price if price is not None else ref) / self.leverage_for(position_side)
            fee = qty * ref * m.taker_fee
            if margin + fee > self.available(now):
                raise WeexError(-1054, "FAILED_PRECONDITION: available amount not enough for this order.")
        self.orders[order.order_id] = order
        self.by_client_id[order.client_order_id] = order.order_id
        marketable = price is None or (side == "BUY" and price >= ref) or (side == "SELL" and price <= ref)
        if otype == "MARKET" and partial_parts > 1:
            parts = _split(qty, partial_parts, m.step)
            self._fill(order, parts[0], ref, now, maker=False)
            order.pending_parts = parts[1:]
            order.next_part_wall = wall + self.partial_fill_interval_s
        elif marketable:
            self._fill(order, qty, ref, now, maker=False)
        elif tif in ("IOC", "FOK"):
            order.status = CANCELED
        return order, True

    def cancel(self, order: Order, now: int) -> Order:
        if order.status not in OPEN_STATUSES:
            raise WeexError(-3200, f"Order is not open (status {order.status}).")
        order.status = CANCELED
        order.pending_parts = []
        order.update_time = now
        return order

    def open_orders(self) -> list[Order]:
        return [o for o in self.orders.values() if o.status in OPEN_STATUSES]

    def close_positions(self, now: int, wall: float = 0.0) -> list[tuple[Position, Order]]:
        """``POST /capi/v3/closePositions``: a market order against every open position."""
        self.advance(now, wall)
        out = []
        for side, pos in list(self.positions.items()):
            order, _ = self.place_order({"symbol": self.market.symbol, "side": "SELL" if side == "LONG" else "BUY",
                                         "positionSide": side, "type": "MARKET",
                                         "quantity": format(pos.size, "f")}, now, wall)
            out.append((pos, order))
        return out

    def plant_position(self, side: str, size: Decimal, now: int, entry_price: Decimal | None = None) -> Position:
        """A position the client did not open (someone else traded on the account): no fill, no fee."""
        side = side.upper()
        if side not in ("LONG", "SHORT"):
            raise WeexError(-1142, "Parameter side is invalid.")
        price = entry_price if entry_price is not None else self.candles.reference_price(now)
        pos = self._position(side, now)
        pos.origin = "foreign"
        pos.size += size
        pos.open_value += money(size * price)
        pos.cum_open_size += size
        pos.cum_open_value += money(size * price)
        return pos

    # -- time ----------------------------------------------------------------------------------

    def advance(self, now: int, wall: float = 0.0) -> None:
        """Book what happened up to market time ``now``: due partial fills, resting-limit fills on closed bars,
        funding events; in time order, fills at a bar's close before a funding event at the same time."""
        for order in list(self.orders.values()):
            while order.pending_parts and order.status in OPEN_STATUSES and wall >= order.next_part_wall:
                part = order.pending_parts.pop(0)
                held = self.positions.get(order.position_side)
                if order.closing and (held is None or held.size < part):
                    order.pending_parts = []
                    order.status = CANCELED
                    break
                self._fill(order, part, self._fill_price(order.side, now), now, maker=False)
                order.next_part_wall += self.partial_fill_interval_s
        if now <= self._processed_to:
            return
        start = self._processed_to
        events: list[tuple[int, int, Any]] = []
        resting = [o for o in self.orders.values() if o.status in OPEN_STATUSES and o.type == "LIMIT"
                   and not o.pending_parts]
        if resting:
            c = self.candles
            first = c.closed_count(start)
            last = c.closed_count(now)
            for i in range(first, last):
                events.append((int(c.ts[i]) + c.bar_ms, 0, i))
        for t, rate in self.funding.between(start, now):
            events.append((t, 1, rate))
        events.sort(key=lambda e: (e[0], e[1]))
        for t, kind, payload in events:
            if kind == 0:
                self._match_bar(int(payload), t)
            else:
                self._apply_funding(t, payload)
        self._processed_to = now

    def _match_bar(self, i: int, close_time: int) -> None:
        bar_ts, o, h, lo, _c, _v = self.candles.row(i)
        dec = self.candles.dec
        for order in self.orders.values():
            if order.status not in OPEN_STATUSES or order.type != "LIMIT" or order.price is None:
                continue
            if bar_ts < order.time:
                continue
            limit = order.price
            if order.side == "BUY" and dec(lo) <= limit:
                fill_price = min(limit, dec(o))
            elif order.side == "SELL" and dec(h) >= limit:
                fill_price = max(limit, dec(o))
            else:
                continue
            qty = order.orig_qty - order.executed_qty
            held = self.positions.get(order.position_side)
            if order.closing and (held is None or held.size < qty):
                order.status = CANCELED  # reduce-only would increase the position: the exchange expires it
                order.update_time = close_time
                continue
            self._fill(order, qty, fill_price, close_time, maker=True)

    def _apply_funding(self, t: int, rate: Decimal) -> None:
        mark = self.candles.reference_price(t)
        self.funding_events.append((t, rate, mark))
        for side, pos in self.positions.items():
            amount = money(pos.size * mark * rate)
            income = -amount if side == "LONG" else amount
            pos.funding_fee += income
            self.wallet += income
            self.total_funding += income
            self.incomes.append(Income(next(self._ids), self.market.symbol, "position_funding", income, ZERO,
                                       self.wallet, t))

    # -- booking -------------------------------------------------------------------------------

    def _fill_price(self, side: str, now: int) -> Decimal:
        ref = self.candles.reference_price(now)
        adj = ref * self.slippage_bps / BPS
        return self.market.price(ref + adj if side == "BUY" else ref - adj)

    def _position(self, side: str, now: int) -> Position:
        pos = self.positions.get(side)
        if pos is None:
            pos = Position(next(self._ids), self.market.symbol, side, self.leverage_for(side), self.margin_type,
                           now, now)
            self.positions[side] = pos
        return pos

    def _fill(self, order: Order, qty: Decimal, price: Decimal, now: int, maker: bool) -> Fill:
        m = self.market
        quote = money(qty * price)
        fee = money(qty * price * (m.maker_fee if maker else m.taker_fee))
        realized = ZERO
        pos = self._position(order.position_side, now)
        if order.closing:
            removed = pos.open_value if qty == pos.size else money(pos.open_value * qty / pos.size)
            realized = quote - removed if pos.side == "LONG" else removed - quote
            pos.open_value -= removed
            pos.size -= qty
            pos.cum_close_size += qty
            pos.cum_close_value += quote
            pos.cum_close_fee += fee
        else:
            pos.size += qty
            pos.open_value += quote
            pos.open_fee += fee
            pos.cum_open_size += qty
            pos.cum_open_value += quote
        pos.updated_time = now
        if pos.size == 0:
            del self.positions[pos.side]
        self.wallet += realized - fee
        self.total_fees += fee
        self.total_realized += realized
        order.executed_qty += qty
        order.cum_quote += quote
        order.update_time = now
        order.status = FILLED if order.executed_qty >= order.orig_qty else PARTIALLY_FILLED
        fill = Fill(next(self._ids), order.order_id, order.symbol, order.side, order.position_side, price, qty, quote,
                    fee, realized, maker, now)
        self.fills.append(fill)
        kind = ("position_close_" if order.closing else "position_open_") + order.position_side.lower()
        self.incomes.append(Income(next(self._ids), order.symbol, kind, realized, -fee, self.wallet, now))
        return fill

    # -- JSON views ----------------------------------------------------------------------------

    def order_json(self, o: Order) -> dict[str, Any]:
        m = self.market
        return {
            "avgPrice": fmt(o.avg_price, m.price_precision + 2),
            "clientOrderId": o.client_order_id,
            "cumQuote": format(o.cum_quote, "f"),
            "executedQty": fmt(o.executed_qty, m.quantity_precision),
            "orderId": o.order_id,
            "origQty": fmt(o.orig_qty, m.quantity_precision),
            "price": fmt(o.price if o.price is not None else ZERO, m.price_precision),
            "reduceOnly": o.reduce_only or o.closing,
            "side": o.side,
            "positionSide": o.position_side,
            "status": o.status,
            "stopPrice": "0",
            "symbol": o.symbol,
            "time": o.time,
            "timeInForce": o.time_in_force or "GTC",
            "type": o.type,
            "updateTime": o.update_time,
            "workingType": "CONTRACT_PRICE",
        }

    def position_json(self, p: Position, now: int) -> dict[str, Any]:
        price = self.candles.last_price(now)
        m = self.market
        return {
            "id": p.position_id,
            "asset": m.quote,
            "symbol": p.symbol,
            "side": p.side,
            "marginType": p.margin_type,
            "separatedMode": "COMBINED",
            "separatedOpenOrderId": 0,
            "leverage": f"{p.leverage}.00",
            "size": fmt(p.size, m.quantity_precision),
            "openValue": format(p.open_value, "f"),
            "openFee": format(p.open_fee, "f"),
            "fundingFee": format(p.funding_fee, "f"),
            "marginSize": format(money(p.open_value / p.leverage), "f"),
            "isolatedMargin": format(money(p.open_value / p.leverage), "f") if p.margin_type == "ISOLATED" else "0",
            "isAutoAppendIsolatedMargin": False,
            "cumOpenSize": fmt(p.cum_open_size, m.quantity_precision),
            "cumOpenValue": format(p.cum_open_value, "f"),
            "cumCloseSize": fmt(p.cum_close_size, m.quantity_precision),
            "cumCloseValue": format(p.cum_close_value, "f"),
            "cumCloseFee": format(p.cum_close_fee, "f"),
            "createdTime": p.created_time,
            "updatedTime": p.updated_time,
            "unrealizePnl": format(p.unrealized(price), "f"),
            "liquidatePrice": "0",
        }

    def fill_json(self, f: Fill) -> dict[str, Any]:
        m = self.market
        return {
            "id": f.trade_id,
            "orderId": f.order_id,
            "symbol": f.symbol,
            "buyer": f.side == "BUY",
            "commission": format(f.fee, "f"),
            "commissionAsset": m.quote,
            "maker": f.maker,
            "price": fmt(f.price, m.price_precision),
            "qty": fmt(f.qty, m.quantity_precision),
            "quoteQty": format(f.quote_qty, "f"),
            "realizedPnl": format(f.realized_pnl, "f"),
            "side": f.side,
            "positionSide": f.position_side,
            "time": f.time,
        }

    def income_json(self, i: Income) -> dict[str, Any]:
        return {
            "billId": str(i.bill_id),
            "asset": self.market.quote,
            "symbol": i.symbol,
            "income": format(i.income, "f"),
            "incomeType": i.income_type,
            "balance": format(i.balance, "f"),
            "fillFee": format(i.fill_fee, "f"),
            "time": str(i.time),
            "transferReason": "UNKNOWN_TRANSFER_REASON",
        }


def _split(qty: Decimal, parts: int, step: Decimal) -> list[Decimal]:
    """``qty`` in up to ``parts`` chunks on the quantity grid, the last taking the remainder."""
    chunk = (qty / parts).quantize(step, rounding=ROUND_DOWN)
    if chunk <= 0:
        return [qty]
    out = [chunk] * (parts - 1)
    out.append(qty - chunk * (parts - 1))
    return [p for p in out if p > 0]


def within(items: Iterable[Any], start: int | None, end: int | None, key: str = "time") -> list[Any]:
    """Items whose ``key`` attribute lies in [start, end] (either bound optional)."""
    out = []
    for it in items:
        t = getattr(it, key)
        if start is not None and t < start:
            continue
        if end is not None and t > end:
            continue
        out.append(it)
    return out
