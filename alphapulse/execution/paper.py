"""Paper broker: simulated market-order fills on real prices, with the same fee and slippage rules the
backtester and the training environment use (:mod:`alphapulse.costs`).

An order acknowledged while candle *t* closes fills at the open of the next candle, the next price the
market offers; so no decision ever trades on a price it could not have had.
"""

from __future__ import annotations

from collections import OrderedDict
from decimal import Decimal

from alphapulse.costs import price_with_slippage, taker_fee
from alphapulse.domain import Candle, Fill, Order

_RECENT_IDS = 4096  # dedup window kept in memory; the store's primary key covers the rest


class PaperBroker:
    def __init__(self, taker_fee_rate: Decimal, slippage_bps: Decimal) -> None:
        self.taker_fee_rate = taker_fee_rate
        self.slippage_bps = slippage_bps
        self._open: dict[str, Order] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()

    def submit(self, order: Order) -> bool:
        if order.qty <= 0:
            raise ValueError(f"order qty must be > 0, got {order.qty}")
        if order.client_order_id in self._seen or order.client_order_id in self._open:
            return False
        self._seen[order.client_order_id] = None
        if len(self._seen) > _RECENT_IDS:
            self._seen.popitem(last=False)
        self._open[order.client_order_id] = order
        return True

    def release(self) -> None:
        """Nothing leaves the process: paper orders wait for the next candle's open in memory."""

    def restore(self, orders: list[Order]) -> None:
        """Reload orders that were acknowledged but not filled before a restart."""
        for o in orders:
            self._open[o.client_order_id] = o
            self._seen[o.client_order_id] = None

    def on_candle(self, candle: Candle) -> list[Fill]:
        if not self._open:
            return []
        ref = Decimal(repr(candle.open))
        fills = []
        for order in self._open.values():
            price = price_with_slippage(order.side, ref, self.slippage_bps)
            fee = taker_fee(order.qty, price, self.taker_fee_rate)
            fills.append(Fill(order.client_order_id, order.symbol, order.side, order.qty, price, fee, candle.ts))
        self._open.clear()
        return fills

    def cancel_all(self) -> list[Order]:
        cancelled = list(self._open.values())
        self._open.clear()
        return cancelled

    def open_orders(self) -> list[Order]:
        return list(self._open.values())
