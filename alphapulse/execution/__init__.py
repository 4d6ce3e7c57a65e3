"""Order execution: the :class:`Broker` protocol and its implementations (paper, and the exchange's)."""

from __future__ import annotations

from typing import Protocol

from alphapulse.domain import Candle, Fill, Order


class Broker(Protocol):
    """What the engine needs from an execution venue.

    ``submit`` acknowledges an order (idempotent by ``client_order_id``: a retry of the same id returns
    False and creates nothing); fills arrive through ``on_candle`` for the paper broker, which fills market
    orders at the next price it sees.
    """

    def submit(self, order: Order) -> bool: ...

    def on_candle(self, candle: Candle) -> list[Fill]: ...

    def cancel_all(self) -> list[Order]: ...

    def open_orders(self) -> list[Order]: ...

    def release(self) -> None:
        """The driver has made the submitted orders durable: a venue that sends them may do so now."""
        ...

    def restore(self, orders: list[Order]) -> None:
        """Take back orders the store recorded as open (acknowledged, not yet filled) before a restart."""
        ...
