"""The live broker: the engine's orders on WEEX, with the exchange's fills and funding booked back.

The engine is synchronous and does no I/O, so this broker has two sides:

* the :class:`~alphapulse.execution.Broker` side the engine calls inside a step: ``submit`` only records
  the order (its intent is then committed to the store with the step), ``on_candle`` returns nothing
  (exchange fills arrive between candles), ``cancel_all``/``open_orders`` answer from what is tracked;
* an asyncio task (:meth:`WeexBroker.run`) that sends an order only after the daemon has committed its intent
  (:meth:`release`), follows it to its end, reads every execution back from ``userTrades`` (so prices and fees
  in trades.csv are the exchange's) and funding payments from ``account/income``, and hands them to the
  daemon's :class:`ExecutionSink`, which books them through the engine and commits them.

Idempotency: every exchange order carries a client order id derived from the engine's (``ap-<candle>-<tag>``,
with ``-c``/``-o`` for the closing and opening legs of an order that crosses zero: WEEX holds LONG and SHORT
positions separately, our accounts net them).  After a restart, orders the store still has open are looked up
by those ids: found ones are followed and their missing fills booked; an intent the exchange never received is
closed as cancelled, never sent again (the next decision sees the real position), so a crash between submit
and acknowledgement cannot produce a second order for one decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Protocol

from alphapulse.domain import Candle, Fill, Order, Side
from alphapulse.exchange.weex.client import Balance, Position, WeexClient
from alphapulse.exchange.weex.client import Order as ExchangeOrder
from alphapulse.exchange.weex.errors import (
    AuthError,
    ExchangeUnavailable,
    InvalidOrderError,
    OrderNotFoundError,
    RateLimitError,
    WeexError,
)
from alphapulse.log import get_logger
from alphapulse.metrics import LatencyHistogram
from alphapulse.reconcile import AccountView

log = get_logger(__name__)
ZERO = Decimal(0)
#: Client-id suffixes of the two legs of an order that crosses zero (close the old side, open the new one).
CLOSE_SUFFIX, OPEN_SUFFIX = "-c", "-o"


def is_funding(income_type: str) -> bool:
    """Funding rows of ``account/income`` (``FUNDING_FEE`` in Binance-style APIs, ``position_funding`` in what
    ccxt documents for WEEX): the other rows (realized PnL, fees) are already booked from the fills."""
    return "funding" in income_type.lower()


class ExecutionSink(Protocol):
    """Where the broker's task reports what the exchange did (the daemon: book through the engine, commit)."""

    def on_fills(self, fills: list[Fill]) -> None: ...

    def on_order_status(self, client_order_id: str, status: str, exchange_order_id: str | None, detail: str) -> None:
        ...


@dataclass
class Leg:
    """One exchange order of an engine order (one, or two when the order crosses zero)."""

    client_order_id: str
    side: str  # BUY / SELL
    position_side: str  # LONG / SHORT
    qty: Decimal
    reduce_only: bool
    state: str = "new"  # new -> sent -> done | rejected; "unknown" after a restart until looked up
    exchange_order_id: str | None = None
    filled: Decimal = ZERO
    trade_ids: set[str] = field(default_factory=set)
    sent_ms: int = 0
    acked_ms: int = 0


@dataclass
class Tracked:
    order: Order
    legs: list[Leg]
    released: bool = False
    cancel_requested: bool = False
    booked: Decimal = ZERO  # quantity of the fills handed to the sink
    submitted_mono: float = field(default_factory=time.monotonic)
    released_mono: float = 0.0  # when the daemon's commit let it go (0: not yet)

    @property
    def done(self) -> bool:
        return all(leg.state in ("done", "rejected") for leg in self.legs)


def plan_legs(order: Order, position_qty: Decimal) -> list[Leg]:
    """The exchange orders that move a net position ``position_qty`` by ``order`` (pure).

    Same direction (or flat): one opening leg.  Against the position: a reduce-only leg that closes up to the
    position, then an opening leg for the rest when the order crosses zero.
    """
    delta = order.qty if order.side is Side.BUY else -order.qty
    side = "BUY" if delta > 0 else "SELL"
    if position_qty == 0 or (position_qty > 0) == (delta > 0):
        return [Leg(order.client_order_id, side, "LONG" if delta > 0 else "SHORT", order.qty, False)]
    close = min(abs(delta), abs(position_qty))
    rest = abs(delta) - close
    held = "LONG" if position_qty > 0 else "SHORT"
    if rest == 0:
        return [Leg(order.client_order_id, side, held, close, True)]
    return [Leg(order.client_order_id + CLOSE_SUFFIX, side, held, close, True),
            Leg(order.client_order_id + OPEN_SUFFIX, side, "LONG" if delta > 0 else "SHORT", rest, False)]


def net_position(positions: list[Position], symbol: str) -> tuple[Decimal, Decimal]:
    """(signed net quantity, entry price) of a symbol from WEEX's LONG/SHORT positions."""
    long_q = sum((p.size for p in positions if p.symbol == symbol and p.side == "LONG"), ZERO)
    short_q = sum((p.size for p in positions if p.symbol == symbol and p.side == "SHORT"), ZERO)
    net = long_q - short_q
    held = [p for p in positions if p.symbol == symbol and p.size > 0 and p.side == ("LONG" if net > 0 else "SHORT")]
    value = sum((p.open_value for p in held), ZERO)
    size = sum((p.size for p in held), ZERO)
    return net, (value / size if size else ZERO)


class WeexBroker:
    """Live execution on WEEX (see the module docstring)."""

    kind = "weex"

    def __init__(self, client: WeexClient, symbol: str, *, margin_asset: str = "USDT", leverage: int = 3,
                 margin_type: str = "CROSSED", poll_interval_s: float = 0.2, idle_poll_s: float = 5.0,
                 funding_poll_s: float = 60.0) -> None:
        self.client = client
        self.symbol = symbol
        self.margin_asset = margin_asset
        self.leverage = leverage
        self.margin_type = margin_type
        self.poll_interval_s = poll_interval_s
        self.idle_poll_s = idle_poll_s
        self.funding_poll_s = funding_poll_s
        self._orders: dict[str, Tracked] = {}
        self._position: Callable[[], Decimal] = lambda: ZERO
        self._wake = asyncio.Event()
        self._answered = asyncio.Event()  # a first leg got its answer (see wait_answered)
        self._booked_trades: set[str] = set()
        self.funding_since_ms: int | None = None
        self._last_funding_poll = 0.0
        # counters for /metrics and the fault tests
        self.sent = 0
        self.acked = 0
        self.rejected = 0
        self.recovered = 0  # orders found by client id after a lost answer or a restart
        self.not_sent = 0  # restored intents the exchange never received (closed, never re-sent)
        self.errors = 0
        self.activity = 0  # bumped by every submit and every booking: reconciliation skips a moving account
        # Decision to acknowledgement, per order, in µs: from the engine's submit (inside the candle's step) to the
        # exchange's answer to the order's first leg (the exchange has the decision), and to its last leg's answer
        # (the same for a one-leg order; after the closing leg was also followed for one that crosses zero).
        self.decision_to_ack = LatencyHistogram()
        self.decision_to_last_ack = LatencyHistogram()
        # Where that time goes, for the first leg: the step and its commit (decision -> release), the wait for this
        # task's turn on the loop (release -> send), and the request itself (send -> ack).
        self.stage_us = {"decision_to_release": LatencyHistogram(), "release_to_send": LatencyHistogram(),
                         "send_to_ack": LatencyHistogram()}

    # ---- wiring --------------------------------------------------------------------------------
    def bind(self, position_qty: Callable[[], Decimal]) -> None:
        """The engine's current net position, which decides how an order splits into legs."""
        self._position = position_qty

    async def start(self) -> None:
        """Check the symbol, the credentials and the clock; set leverage and margin mode (before READY)."""
        await self.client.start()
        await self.client.sync_time()
        infos = await self.client.exchange_info(self.symbol)
        if not any(i.symbol == self.symbol for i in infos):
            raise WeexError(-1121, f"symbol {self.symbol} is not listed on the exchange", 200, "exchangeInfo")
        with contextlib.suppress(InvalidOrderError):  # "no change needed" answers are not failures
            await self._settle(lambda: self.client.set_margin_type(self.symbol, self.margin_type))
        await self._settle(lambda: self.client.set_leverage(self.symbol, self.leverage, self.margin_type))

    async def _settle(self, call: Callable[[], Awaitable[object]], attempts: int = 5) -> None:
        """A setting that is safe to send again (leverage, margin mode): retry a passing failure with back-off
        instead of failing the start-up on one 5xx or 429 (found by the soak, whose faults start with it)."""
        delay = self.poll_interval_s
        for attempt in range(attempts):
            try:
                await call()
                return
            except (ExchangeUnavailable, RateLimitError) as e:
                if attempt == attempts - 1:
                    raise
                log.warning("exchange setting failed; retrying", error=str(e), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    # ---- the engine's side (synchronous, inside a step) ----------------------------------------
    def _projected(self) -> Decimal:
        """The position once every tracked order has filled: what the next order moves from."""
        pos = self._position()
        for t in self._orders.values():
            if t.order.symbol == self.symbol:
                remaining = sum((leg.qty - leg.filled for leg in t.legs if leg.state not in ("done", "rejected")),
                                ZERO)
                pos += remaining if t.order.side is Side.BUY else -remaining
        return pos

    def submit(self, order: Order) -> bool:
        if order.qty <= 0:
            raise ValueError(f"order qty must be > 0, got {order.qty}")
        if order.client_order_id in self._orders:
            return False
        self._orders[order.client_order_id] = Tracked(order, plan_legs(order, self._projected()))
        self.activity += 1
        return True

    async def wait_answered(self, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until every released order's first leg has the exchange's answer.

        The daemon calls it after a commit that released orders and before writing the operator files, so that its
        own bookkeeping does not hold the loop while the acknowledgement is on its way back.  Returns False on
        time-out (an exchange that is slow or down): the caller goes on, the order is followed as ever."""
        try:
            async with asyncio.timeout(timeout_s):
                while any(t.released and t.legs and t.legs[0].state in ("new", "unknown")
                          for t in self._orders.values()):
                    self._answered.clear()
                    await self._answered.wait()
        except TimeoutError:
            return False
        return True

    def release(self) -> None:
        """The daemon committed the orders' intents: they may now leave for the exchange."""
        now = time.monotonic()
        for t in self._orders.values():
            if not t.released:
                t.released, t.released_mono = True, now
        self._wake.set()

    def on_candle(self, candle: Candle) -> list[Fill]:
        return []  # exchange fills arrive between candles, through the sink

    def cancel_all(self) -> list[Order]:
        """Drop intents not sent yet (returned, the store marks them cancelled); ask to cancel the rest."""
        dropped = []
        for coid, t in list(self._orders.items()):
            if all(leg.state == "new" for leg in t.legs):
                dropped.append(t.order)
                del self._orders[coid]
            else:
                t.cancel_requested = True
        self._wake.set()
        return dropped

    def open_orders(self) -> list[Order]:
        return [t.order for t in self._orders.values()]

    def restore(self, orders: list[Order]) -> None:
        """Orders the store had open at the last stop: look them up by client id before anything else."""
        for o in orders:
            legs = [Leg(o.client_order_id + suffix, "", "", ZERO, False, state="unknown")
                    for suffix in ("", CLOSE_SUFFIX, OPEN_SUFFIX)]
            self._orders[o.client_order_id] = Tracked(o, legs, released=True)
        self._wake.set()

    def restore_booked(self, booked: dict[str, list[tuple[Decimal, str | None]]]) -> None:
        """Fills the store already has for the restored orders (trade ids are never booked twice)."""
        for coid, fills in booked.items():
            t = self._orders.get(coid)
            if t is None:
                continue
            for qty, trade_id in fills:
                t.booked += qty
                if trade_id:
                    self._booked_trades.add(trade_id)

    # ---- the task --------------------------------------------------------------------------------
    async def run(self, sink: ExecutionSink) -> None:
        """Send, follow and book orders; poll funding. Runs until cancelled; transient errors back off."""
        backoff = self.poll_interval_s
        while True:
            busy = any(t.released for t in self._orders.values())
            # asyncio.timeout, not wait_for: on 3.11 wait_for wraps the wait in a task of its own, so a release()
            # reached this task two loop turns later, behind whatever the daemon's loop did in between.
            try:
                async with asyncio.timeout(self.poll_interval_s if busy else self.idle_poll_s):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.work(sink)
                if time.monotonic() - self._last_funding_poll >= self.funding_poll_s:
                    await self.poll_funding(sink)
                backoff = self.poll_interval_s
            except AuthError:
                raise  # revoked keys: the daemon stops rather than trade blind
            except WeexError as e:
                self.errors += 1
                log.warning("exchange call failed; will retry", error=str(e), code=e.code, retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    async def work(self, sink: ExecutionSink) -> None:
        """One pass over the tracked orders: resolve, send, follow, cancel; report what changed."""
        for coid, t in list(self._orders.items()):
            if not t.released:
                continue
            for leg in t.legs:
                if leg.state == "unknown":
                    await self._look_up(t, leg, sink)
                elif leg.state == "new":
                    if t.cancel_requested:
                        leg.state = "rejected"
                        continue
                    await self._send(t, leg, sink)
                elif leg.state == "sent":
                    if t.cancel_requested:
                        with contextlib.suppress(OrderNotFoundError, InvalidOrderError):
                            await self.client.cancel_order(self.symbol, order_id=leg.exchange_order_id)
                    await self._follow(t, leg, sink)
                if leg.state == "new":
                    break  # legs go in order: the opening leg only after the closing one is sent
            if t.done:
                del self._orders[coid]
                for leg in t.legs:  # only unfinished orders need their trade ids: memory stays bounded
                    self._booked_trades.difference_update(leg.trade_ids)
                self._finish(t, sink)
        self._answered.set()  # waiters re-check their condition

    def _finish(self, t: Tracked, sink: ExecutionSink) -> None:
        legs = [leg for leg in t.legs if leg.state != "rejected" or leg.exchange_order_id]
        ex_ids = ",".join(leg.exchange_order_id for leg in legs if leg.exchange_order_id) or None
        if t.booked >= t.order.qty:
            status = "filled"
        elif t.booked > 0:
            status = "cancelled"  # partly filled, then cancelled or expired: the rest will never fill
        elif any(leg.state == "rejected" and leg.exchange_order_id is None and leg.qty > 0 for leg in t.legs):
            status = "rejected"
        else:
            status = "cancelled"
        if status != "filled":
            sink.on_order_status(t.order.client_order_id, status, ex_ids, "booked " + str(t.booked))

    async def _send(self, t: Tracked, leg: Leg, sink: ExecutionSink) -> None:
        leg.sent_ms = int(time.time() * 1000)
        self.sent += 1
        send_mono = time.monotonic()
        try:
            ack = await self.client.place_order(self.symbol, leg.side, leg.position_side, leg.qty, leg.client_order_id,
                                                reduce_only=leg.reduce_only)
        except InvalidOrderError as e:
            leg.state = "rejected"
            self.rejected += 1
            log.warning("order rejected by the exchange", order_id=leg.client_order_id, code=e.code, error=e.msg)
            sink.on_order_status(t.order.client_order_id, "rejected", None, f"{e.code}: {e.msg}")
            for other in t.legs:  # nothing after a rejected leg is sent
                if other.state == "new":
                    other.state = "rejected"
            self._answered.set()
            return
        except (ExchangeUnavailable, RateLimitError):
            raise  # outcome unknown even after the client's own recovery: stays "new", retried with the same id
        leg.state, leg.exchange_order_id, leg.acked_ms = "sent", ack.order_id, int(time.time() * 1000)
        self.acked += 1
        if ack.recovered:
            self.recovered += 1
        acked_mono = time.monotonic()
        us = (acked_mono - t.submitted_mono) * 1e6
        if leg is t.legs[0]:
            self.decision_to_ack.add(us)
            if t.released_mono:
                st = self.stage_us
                st["decision_to_release"].add((t.released_mono - t.submitted_mono) * 1e6)
                st["release_to_send"].add((send_mono - t.released_mono) * 1e6)
                st["send_to_ack"].add((acked_mono - send_mono) * 1e6)
        if leg is t.legs[-1]:
            self.decision_to_last_ack.add(us)
        sink.on_order_status(t.order.client_order_id, "open", ack.order_id, "acknowledged")
        self._answered.set()
        await self._follow(t, leg, sink)

    async def _look_up(self, t: Tracked, leg: Leg, sink: ExecutionSink) -> None:
        """A restored leg: does the exchange know this client id? (A candidate id it never had is dropped.)"""
        try:
            ex = await self.client.get_order(self.symbol, client_order_id=leg.client_order_id)
        except OrderNotFoundError:
            leg.state = "rejected"  # never existed: nothing to follow, nothing to send
            if all(other.state == "rejected" for other in t.legs):
                self.not_sent += 1
                log.warning("order intent never reached the exchange; closed, not re-sent",
                            order_id=t.order.client_order_id)
            return
        self.recovered += 1
        leg.side, leg.position_side, leg.qty = ex.side, ex.position_side, ex.orig_qty
        leg.state, leg.exchange_order_id = "sent", ex.order_id
        log.info("order found after restart", order_id=leg.client_order_id, status=ex.status,
                 executed=str(ex.executed_qty))
        await self._follow(t, leg, sink, ex)

    async def _follow(self, t: Tracked, leg: Leg, sink: ExecutionSink, ex: ExchangeOrder | None = None) -> None:
        """Book executions of a sent leg that are not booked yet; mark it done when the exchange is."""
        if ex is None:
            ex = await self.client.get_order(self.symbol, order_id=leg.exchange_order_id)
        if ex.executed_qty > leg.filled:
            trades = await self.client.user_trades(self.symbol, order_id=leg.exchange_order_id)
            fills = []
            filled = ZERO
            for tr in sorted(trades, key=lambda x: (x.time, x.id)):
                if tr.order_id and tr.order_id != leg.exchange_order_id:
                    continue
                filled += tr.qty
                leg.trade_ids.add(tr.id)
                if tr.id in self._booked_trades:
                    continue  # booked before (by this run or before a restart)
                self._booked_trades.add(tr.id)
                fills.append(Fill(t.order.client_order_id, self.symbol, t.order.side, tr.qty, tr.price,
                                  abs(tr.commission), tr.time, tr.realized_pnl, trade_id=tr.id))
            leg.filled = max(leg.filled, filled)
            if fills:
                t.booked += sum((f.qty for f in fills), ZERO)
                self.activity += 1
                sink.on_fills(fills)
        if ex.status in ("FILLED", "CANCELED", "EXPIRED", "REJECTED") and leg.filled >= ex.executed_qty:
            leg.state = "done"

    async def poll_funding(self, sink: ExecutionSink) -> None:
        """Book funding payments the exchange reports and the store does not have yet."""
        self._last_funding_poll = time.monotonic()
        start = None if self.funding_since_ms is None else self.funding_since_ms + 1
        rows = await self.client.income(self.symbol, start_ms=start)
        fills: list[Fill] = []
        for r in sorted(rows, key=lambda x: x.time):
            if not is_funding(r.income_type) or (r.symbol and r.symbol != self.symbol):
                continue
            if (self.funding_since_ms is not None and r.time <= self.funding_since_ms) or (
                    fills and fills[-1].ts_ms == r.time):
                continue  # booked already (the store's newest funding time is where we ask from)
            key = f"funding-{self.symbol}-{r.time}"
            fills.append(Fill(f"funding-{r.time}", self.symbol, Side.FUNDING, ZERO, ZERO, ZERO, r.time, r.income, key))
        if fills:
            self.funding_since_ms = max(f.ts_ms for f in fills)
            self.activity += 1
            sink.on_fills(fills)

    # ---- reconciliation's view -----------------------------------------------------------------
    async def account(self) -> AccountView:
        """The exchange's side of the account for this symbol (positions netted, open orders, wallet balance)."""
        positions = await self.client.positions(self.symbol)
        open_orders = await self.client.open_orders(self.symbol)
        balances: list[Balance] = await self.client.balance()
        bal = next((b.balance for b in balances if b.asset == self.margin_asset), ZERO)
        net, entry = net_position(positions, self.symbol)
        return AccountView(self.symbol, net, entry, bal, tuple(o.client_order_id for o in open_orders))

    def order_ids(self) -> list[str]:
        """Client ids of the orders being followed (their legs' ids start with these)."""
        return list(self._orders)

    def in_flight(self) -> bool:
        """True while an order is on its way: a position difference then is not (yet) a mismatch."""
        return bool(self._orders)

    def describe(self) -> dict[str, object]:
        first = self.decision_to_ack
        return {"kind": self.kind, "symbol": self.symbol, "tracked": len(self._orders), "sent": self.sent,
                "acked": self.acked, "rejected": self.rejected, "recovered": self.recovered,
                "not_sent": self.not_sent, "errors": self.errors,
                "ack_ms_p50": round(first.quantile(0.5) / 1000, 3) if first.count else None,
                "decision_to_ack_us": first.summary(), "decision_to_last_ack_us": self.decision_to_last_ack.summary(),
                "decision_to_ack_stages_us": {k: h.summary() for k, h in self.stage_us.items()},
                "client": self.client.describe()}
