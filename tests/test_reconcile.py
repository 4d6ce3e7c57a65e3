"""The reconciliation rule (alphapulse/reconcile.py) as a pure function: what is adopted, booked, reported and
halted on, including a foreign order that stays open across runs (reported and halted on once)."""

from __future__ import annotations

from decimal import Decimal as D

import pytest

from alphapulse.reconcile import AccountView, Mismatch, reconcile

SYM = "BTCUSDT"


def view(qty: str = "0", entry: str = "0", balance: str = "1000", orders: tuple[str, ...] = ()) -> AccountView:
    return AccountView(SYM, D(qty), D(entry), D(balance), orders)


def kinds(ms: tuple[Mismatch, ...]) -> list[tuple[str, str]]:
    return [(m.kind, m.exchange) for m in ms]


def test_equal_books_are_clean() -> None:
    r = reconcile(view("0.01", "60000", orders=("ap-1-a",)), view("0.01", "60000", orders=("ap-1-a",)), ["ap-1-a"])
    assert r.clean and not r.halt and r.adopt_position is None and r.balance_adjustment == 0
    assert r.foreign_orders == frozenset()


def test_position_difference_is_adopted_and_halts_unless_expected() -> None:
    r = reconcile(view("0"), view("0.02", "61000"), [])
    assert kinds(r.mismatches) == [("position", "0.02@61000")]
    assert r.adopt_position == (D("0.02"), D("61000")) and r.halt
    expected = reconcile(view("0"), view("0.02", "61000"), [], halt_on_position=False)
    assert expected.adopt_position == (D("0.02"), D("61000")) and not expected.halt
    within = reconcile(view("0.01"), view("0.0104"), [], qty_tolerance=D("0.0005"))
    assert within.clean and within.adopt_position is None


def test_balance_difference_is_booked_beyond_a_cent() -> None:
    r = reconcile(view(balance="1000"), view(balance="1000.37"), [])
    assert kinds(r.mismatches) == [("balance", "1000.37")] and r.balance_adjustment == D("0.37") and not r.halt
    assert reconcile(view(balance="1000"), view(balance="1000.01"), []).clean


@pytest.mark.parametrize("coid", ["manual-123", "ap-999-x"])
def test_foreign_open_order_is_reported_and_halts(coid: str) -> None:
    r = reconcile(view(), view(orders=("ap-1-a", coid)), ["ap-1-a"])
    assert kinds(r.mismatches) == [("foreign_order", coid)] and r.halt
    assert r.foreign_orders == frozenset({coid})


def test_foreign_order_already_reported_is_neither_reported_nor_halted_on_again() -> None:
    first = reconcile(view(), view(orders=("manual-1",)), [])
    assert first.halt and kinds(first.mismatches) == [("foreign_order", "manual-1")]
    again = reconcile(view(), view(orders=("manual-1",)), [], reported_foreign=first.foreign_orders)
    assert again.clean and not again.halt and again.foreign_orders == frozenset({"manual-1"})
    # a new foreign order next to the known one: only the new one is reported, and it halts
    more = reconcile(view(), view(orders=("manual-1", "manual-2")), [], reported_foreign=again.foreign_orders)
    assert kinds(more.mismatches) == [("foreign_order", "manual-2")] and more.halt
    assert more.foreign_orders == frozenset({"manual-1", "manual-2"})
    # gone and back: an order that was cancelled and reappears is reported again
    gone = reconcile(view(), view(), [], reported_foreign=more.foreign_orders)
    assert gone.clean and gone.foreign_orders == frozenset()
    back = reconcile(view(), view(orders=("manual-1",)), [], reported_foreign=gone.foreign_orders)
    assert back.halt and kinds(back.mismatches) == [("foreign_order", "manual-1")]


def test_known_foreign_order_does_not_mask_a_position_halt() -> None:
    r = reconcile(view("0"), view("0.01", "60000", orders=("manual-1",)), [], reported_foreign=frozenset({"manual-1"}))
    assert kinds(r.mismatches) == [("position", "0.01@60000")] and r.halt


def test_other_symbol_is_refused() -> None:
    with pytest.raises(ValueError, match="ETHUSDT"):
        reconcile(view(), AccountView("ETHUSDT", D(0), D(0), D(1000)), [])
