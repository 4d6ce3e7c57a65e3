"""Reconciliation with the exchange: the rule, as a pure function of our books and the exchange's account.

The most common complaint of peer bots' operators is a bot whose idea of its position or balance has drifted
from the exchange's after a restart, a lost answer or a manual trade.  The stated rule:

* **The exchange is the truth for positions and balance.**  A position different from ours is adopted
  (quantity and entry price); a balance different from our cash is booked as an ``adjustment`` cash flow,
  so trades.csv still sums to the equity change.
* **What the daemon did not make halts trading** until an operator acts: a position that differs from ours
  (nothing we sent explains it: callers do not reconcile while our own orders are in flight), or an open
  order whose client id is not one of ours.  A foreign order is reported and halted on once: while it stays
  open, later runs (given it in ``reported_foreign``) neither report it again nor halt again, so an operator
  who resumed trading around it is not halted every reconciliation interval.
* Every difference is reported as a :class:`Mismatch`; the daemon logs it, writes it to risk_alerts.json
  and counts it in /metrics.

Symbols are a parameter, never a constant: one :class:`AccountView` per symbol.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from decimal import Decimal

#: Our client order ids start with this (``ap-<candle ms>-<tag>``); any other open order is someone else's.
OUR_ORDER_PREFIX = "ap-"


@dataclass(frozen=True)
class AccountView:
    """One side's view of the account for one symbol."""

    symbol: str
    position_qty: Decimal  # signed net quantity
    entry_price: Decimal
    balance: Decimal  # wallet balance (no unrealized PnL)
    open_order_ids: tuple[str, ...] = ()  # client order ids of open orders


#: Every :attr:`Mismatch.kind` (counted per kind in /metrics; exported as zeros before the first one).
MISMATCH_KINDS: tuple[str, ...] = ("position", "balance", "foreign_order")


@dataclass(frozen=True)
class Mismatch:
    kind: str  # one of MISMATCH_KINDS
    symbol: str
    ours: str
    exchange: str
    action: str  # what the rule does about it

    def as_detail(self) -> dict[str, object]:
        return {"kind": self.kind, "symbol": self.symbol, "ours": self.ours, "exchange": self.exchange,
                "resolution": self.action}


@dataclass(frozen=True)
class Resolution:
    """What to do: adopt a position, book a balance adjustment, halt; and why (the mismatches)."""

    mismatches: tuple[Mismatch, ...]
    adopt_position: tuple[Decimal, Decimal] | None  # (qty, entry price) to take from the exchange
    balance_adjustment: Decimal  # exchange balance - our cash, to book (0: none)
    halt: bool
    #: every foreign open order seen this time, reported now or before: the next run's ``reported_foreign``
    foreign_orders: frozenset[str] = frozenset()

    @property
    def clean(self) -> bool:
        return not self.mismatches


def reconcile(ours: AccountView, exchange: AccountView, our_order_ids: Collection[str], *,
              qty_tolerance: Decimal = Decimal(0), balance_tolerance: Decimal = Decimal("0.01"),
              halt_on_position: bool = True, reported_foreign: frozenset[str] = frozenset()) -> Resolution:
    """Compare ``ours`` with ``exchange`` and resolve by the rule above.

    ``our_order_ids``: client ids of orders the daemon has sent and not finished (an open order among them is
    expected).  ``halt_on_position`` False adopts a different position without halting (the first
    reconciliation after an operator switched a paper store to live trading: the difference is expected).
    ``reported_foreign``: foreign open orders a previous run reported (its :attr:`Resolution.foreign_orders`);
    still open, they are neither reported nor halted on again.
    """
    if ours.symbol != exchange.symbol:
        raise ValueError(f"reconciling {ours.symbol} against {exchange.symbol}")
    sym = ours.symbol
    found: list[Mismatch] = []
    halt = False
    adopt = None
    foreign: set[str] = set()
    for coid in exchange.open_order_ids:
        if not coid.startswith(OUR_ORDER_PREFIX) or not any(coid.startswith(o) for o in our_order_ids):
            foreign.add(coid)
            if coid not in reported_foreign:
                found.append(Mismatch("foreign_order", sym, "none", coid, "halt"))
                halt = True
    if abs(exchange.position_qty - ours.position_qty) > qty_tolerance:
        action = "adopt_exchange_position_and_halt" if halt_on_position else "adopt_exchange_position"
        found.append(Mismatch("position", sym, f"{ours.position_qty}@{ours.entry_price}",
                              f"{exchange.position_qty}@{exchange.entry_price}", action))
        adopt = (exchange.position_qty, exchange.entry_price)
        halt = halt or halt_on_position
    diff = exchange.balance - ours.balance
    if abs(diff) > balance_tolerance:
        found.append(Mismatch("balance", sym, str(ours.balance), str(exchange.balance), "book_adjustment"))
    else:
        diff = Decimal(0)
    return Resolution(tuple(found), adopt, diff, halt, frozenset(foreign))
