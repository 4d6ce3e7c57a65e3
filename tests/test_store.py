"""The store as an exchange needs it: fills in parts, cash flows in the ledger, and old databases migrated."""

from __future__ import annotations

import sqlite3
from decimal import Decimal
from pathlib import Path

import pytest

from alphapulse.domain import Fill, Order, Side, StepResult
from alphapulse.portfolio import Portfolio
from alphapulse.store import OperatorFiles, Store

D = Decimal
SYM = "BTCUSDT"

V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE orders (
    client_order_id TEXT PRIMARY KEY, symbol TEXT NOT NULL, side TEXT NOT NULL, qty TEXT NOT NULL,
    reduce_only INTEGER NOT NULL, created_ms INTEGER NOT NULL, reason TEXT NOT NULL, status TEXT NOT NULL);
CREATE TABLE fills (
    fill_id INTEGER PRIMARY KEY, client_order_id TEXT NOT NULL UNIQUE REFERENCES orders(client_order_id),
    symbol TEXT NOT NULL, side TEXT NOT NULL, qty TEXT NOT NULL, price TEXT NOT NULL, fee TEXT NOT NULL,
    realized_pnl TEXT NOT NULL, ts_ms INTEGER NOT NULL);
INSERT INTO orders VALUES ('ap-1-p', 'BTCUSDT', 'buy', '0.5', 0, 1, 'policy', 'filled');
INSERT INTO fills VALUES (1, 'ap-1-p', 'BTCUSDT', 'buy', '0.5', '100', '0.03', '0', 2);
"""


def _step(pf: Portfolio, *, orders: list[Order] = (), fills: list[Fill] = ()) -> StepResult:  # type: ignore[assignment]
    res = StepResult(None)
    res.orders.extend(orders)
    res.fills.extend(pf.apply_fill(f) for f in fills)
    return res


def _state(pf: Portfolio) -> dict[str, object]:
    return {"portfolio": pf.snapshot(), "trading_state": "ACTIVE", "state_reason": "", "last_candle_ts": None,
            "equity": str(pf.equity)}


def test_a_version_1_database_is_migrated_and_keeps_its_fills(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "alphapulse.db")
    db.executescript(V1_SCHEMA)
    db.close()
    store = Store(tmp_path)
    rows = list(store.fills_after(0))
    assert rows == [(1, "ap-1-p", SYM, "buy", "0.5", "100", "0.03", "0", 2, None)]
    assert store.order_status("ap-1-p") == ("filled", None)
    store.close()
    Store(tmp_path).close()  # a second open finds the new schema and leaves it alone


def test_partial_fills_keep_the_order_open_until_complete(tmp_path: Path) -> None:
    store = Store(tmp_path)
    pf = Portfolio.new(SYM, D("10000"))
    order = Order("ap-5-p", SYM, Side.BUY, D("0.003"), False, 5, "policy")
    store.commit_step(_step(pf, orders=[order]), _state(pf))
    assert store.load().open_orders == [order]  # type: ignore[union-attr]
    part = Fill("ap-5-p", SYM, Side.BUY, D("0.001"), D("100"), D("0.00006"), 6, trade_id="t1")
    store.commit_step(_step(pf, fills=[part]), _state(pf))
    assert store.order_status("ap-5-p") == ("partially_filled", None)
    assert store.load().open_orders == [order]  # type: ignore[union-attr]  # a restart still tracks it
    rest = Fill("ap-5-p", SYM, Side.BUY, D("0.002"), D("101"), D("0.0001212"), 7, trade_id="t2")
    store.commit_step(_step(pf, fills=[rest]), _state(pf))
    assert store.order_status("ap-5-p") == ("filled", None)
    assert store.load().open_orders == []  # type: ignore[union-attr]
    assert store.order_fills(["ap-5-p"]) == {"ap-5-p": [(D("0.001"), "t1"), (D("0.002"), "t2")]}
    # the exchange's trade id is unique: the same execution cannot be booked twice
    again = Fill("ap-5-p", SYM, Side.BUY, D("0.001"), D("100"), D("0.00006"), 6, trade_id="t1")
    with pytest.raises(sqlite3.IntegrityError):
        store.commit_step(_step(Portfolio.new(SYM, D("1")), fills=[again]), _state(pf))
    store.mark_order("ap-5-p", "filled", "ex-77")
    assert store.order_status("ap-5-p") == ("filled", "ex-77")
    store.close()


def test_funding_and_adjustments_reconcile_in_trades_csv(tmp_path: Path) -> None:
    """pnl in trades.csv sums to the equity change with trades, funding and a balance correction."""
    store = Store(tmp_path / "data")
    files = OperatorFiles(tmp_path / "log")
    pf = Portfolio.new(SYM, D("10000"))
    buy = Order("ap-1-p", SYM, Side.BUY, D("0.1"), False, 1, "policy")
    sell = Order("ap-9-p", SYM, Side.SELL, D("0.1"), True, 9, "policy")
    steps = [
        _step(pf, orders=[buy]),
        _step(pf, fills=[Fill("ap-1-p", SYM, Side.BUY, D("0.1"), D("95000.5"), D("5.70003"), 2)]),
        _step(pf, fills=[Fill("funding-3", SYM, Side.FUNDING, D(0), D("95100"), D(0), 3, D("-0.951"), "f-3")]),
        _step(pf, orders=[sell]),
        _step(pf, fills=[Fill("ap-9-p", SYM, Side.SELL, D("0.1"), D("96000.25"), D("5.760015"), 10)]),
        _step(pf, fills=[Fill("funding-11", SYM, Side.FUNDING, D(0), D("96000"), D(0), 11, D("0.12345678"), "f-11")]),
        _step(pf, fills=[Fill("reconcile-12", SYM, Side.ADJUSTMENT, D(0), D(0), D(0), 12, D("-0.01"), None)]),
    ]
    for res in steps:
        files.write(store.commit_step(res, _state(pf)), {"ap-1-p": "policy", "ap-9-p": "policy"}, (), 3_600_000)
    files.close()
    lines = (tmp_path / "log" / "trades.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    assert [r["side"] for r in rows] == ["buy", "funding", "sell", "funding", "adjustment"]
    assert sum(D(r["pnl"]) for r in rows) == pf.cash - pf.initial_equity == pf.equity - pf.initial_equity
    assert pf.funding == D("-0.951") + D("0.12345678") and pf.adjustments == D("-0.01")
    assert store.last_cash_flow_ms("funding") == 11
    restored = Portfolio.restore(pf.snapshot())
    assert (restored.funding, restored.adjustments, restored.cash) == (pf.funding, pf.adjustments, pf.cash)
    store.close()


def test_paper_funding_does_not_move_where_live_funding_is_asked_from(tmp_path: Path) -> None:
    """Simulated funding (paper, no exchange id) is in the ledger, but only the exchange's own rows tell a live
    broker from when to ask the exchange for funding."""
    store = Store(tmp_path)
    pf = Portfolio.new(SYM, D("10000"))
    paper = Fill("funding-28800000", SYM, Side.FUNDING, D(0), D("95000"), D(0), 28_800_000, D("-0.95"))
    store.commit_step(_step(pf, fills=[paper]), _state(pf))
    assert store.last_cash_flow_ms("funding") is None
    live = Fill("funding-57600000", SYM, Side.FUNDING, D(0), D(0), D(0), 57_600_000, D("-0.5"), "f-57600000")
    store.commit_step(_step(pf, fills=[live]), _state(pf))
    assert store.last_cash_flow_ms("funding") == 57_600_000
    store.close()
