"""Portfolio accounting: PnL by hand, fees, equity, daily roll-over, drawdown, persistence, and
reconciliation to the cent on real BTCUSDT prices (in memory and through ``trades.csv``).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from alphapulse.costs import money, price_with_slippage, taker_fee
from alphapulse.domain import Candle, Decision, Fill, Order, Side, TradingState, timeframe_ms
from alphapulse.engine import Engine, EngineConfig, StepResult
from alphapulse.execution.paper import PaperBroker
from alphapulse.portfolio import DAY_MS, Portfolio, realized_on_fill, utc_day
from alphapulse.risk import RiskLimits
from alphapulse.store import OperatorFiles, Store

SYM = "BTCUSDT"
INITIAL = Decimal("10000")
FEE = Decimal("0.0006")
SLIP = Decimal("2")
BAR = timeframe_ms("5m")
D = Decimal
ZERO_D = Decimal(0)


def _fill(side: Side, qty: str, price: Decimal, fee: Decimal | None = None, ts: int = 0, oid: str = "o") -> Fill:
    q = D(qty)
    return Fill(oid, SYM, side, q, price, taker_fee(q, price, FEE) if fee is None else fee, ts)


@pytest.fixture(scope="module")
def px(btc_candles: list[Candle]) -> list[Decimal]:
    """Five real consecutive-hour BTCUSDT opens, as booked prices."""
    return [D(repr(btc_candles[288 + 12 * i].open)) for i in range(5)]


# ---- fills, by hand --------------------------------------------------------------------------------


def test_open_add_partial_close_full_close(px: list[Decimal]) -> None:
    p1, p2, p3, p4 = px[:4]
    pf = Portfolio.new(SYM, INITIAL)
    f = pf.apply_fill(_fill(Side.BUY, "0.040", p1))
    assert f.realized_pnl == 0
    assert pf.position.qty == D("0.040") and pf.position.entry_price == p1
    assert pf.cash == INITIAL - f.fee

    pf.apply_fill(_fill(Side.BUY, "0.020", p2))  # add: weighted average entry
    entry = (D("0.040") * p1 + D("0.020") * p2) / D("0.060")
    assert pf.position.qty == D("0.060") and pf.position.entry_price == entry

    f3 = pf.apply_fill(_fill(Side.SELL, "0.025", p3))  # partial close: entry unchanged
    assert f3.realized_pnl == money(D("0.025") * (p3 - entry))
    assert pf.position.qty == D("0.035") and pf.position.entry_price == entry

    f4 = pf.apply_fill(_fill(Side.SELL, "0.035", p4))  # full close
    assert f4.realized_pnl == money(D("0.035") * (p4 - entry))
    assert pf.position.is_flat and pf.position.entry_price == 0
    assert pf.realized_pnl == f3.realized_pnl + f4.realized_pnl
    fees = sum((taker_fee(D(q), p, FEE) for q, p in (("0.040", p1), ("0.020", p2), ("0.025", p3), ("0.035", p4))),
               D(0))
    assert pf.fees_paid == fees
    assert pf.cash == INITIAL + pf.realized_pnl - fees
    assert pf.fills == 4


def test_flip_long_to_short_and_short_pnl(px: list[Decimal]) -> None:
    p1, p2, p3 = px[:3]
    pf = Portfolio.new(SYM, INITIAL)
    pf.apply_fill(_fill(Side.BUY, "0.030", p1))
    f = pf.apply_fill(_fill(Side.SELL, "0.080", p2))
    assert f.realized_pnl == money(D("0.030") * (p2 - p1))  # only the closed part realizes
    assert pf.position.qty == D("-0.050") and pf.position.entry_price == p2  # remainder opens at the fill price
    f = pf.apply_fill(_fill(Side.BUY, "0.050", p3))
    assert f.realized_pnl == money(D("0.050") * (p2 - p3))  # short gains when the price falls
    assert pf.position.is_flat


def test_flip_short_to_long() -> None:
    pos, pnl = realized_on_fill(realized_on_fill(Portfolio.new(SYM, INITIAL).position, D("-2"), D("100"))[0],
                                D("5"), D("90"))
    assert pnl == D("20.00000000") and pos.qty == D("3") and pos.entry_price == D("90")


def test_pnl_by_hand_with_round_numbers() -> None:
    pf = Portfolio.new(SYM, D("1000"))
    pf.apply_fill(Fill("a", SYM, Side.BUY, D("1"), D("100"), D("0.06"), 0))
    pf.apply_fill(Fill("b", SYM, Side.BUY, D("1"), D("110"), D("0.066"), 0))
    assert pf.position.entry_price == D("105")
    f = pf.apply_fill(Fill("c", SYM, Side.SELL, D("0.5"), D("120"), D("0.036"), 0))
    assert f.realized_pnl == D("7.5")
    assert pf.cash == D("1000") + D("7.5") - D("0.06") - D("0.066") - D("0.036")
    pf.mark(D("100"), 0)
    assert pf.unrealized_pnl == D("1.5") * (D("100") - D("105"))
    assert pf.equity == pf.cash + pf.unrealized_pnl == D("999.838")  # 1000 + 7.5 - 0.162 fees - 7.5 unrealized


def test_paper_costs_by_hand() -> None:
    assert price_with_slippage(Side.BUY, D("100000"), SLIP) == D("100020.00000000")
    assert price_with_slippage(Side.SELL, D("100000"), SLIP) == D("99980.00000000")
    assert taker_fee(D("-0.5"), D("100020"), FEE) == D("30.006")  # fee is on |qty|, never negative


# ---- marks: equity, day roll-over, peak and drawdown ----------------------------------------------------


def test_equity_is_cash_plus_unrealized(px: list[Decimal]) -> None:
    pf = Portfolio.new(SYM, INITIAL)
    pf.apply_fill(_fill(Side.SELL, "0.050", px[0]))
    assert pf.mark_price == px[0]  # first fill seeds the mark so equity is defined at once
    pf.mark(px[1], 1)
    u = money(D("-0.050") * (px[1] - px[0]))
    assert pf.unrealized_pnl == u
    assert pf.equity == pf.cash + u
    assert pf.notional == D("0.050") * px[1]
    assert pf.leverage == pytest.approx(float(pf.notional / pf.equity))


def test_daily_rollover_at_utc_midnight(px: list[Decimal]) -> None:
    midnight = 1_735_689_600_000  # 2025-01-01T00:00:00Z
    assert midnight % DAY_MS == 0 and utc_day(midnight) - utc_day(midnight - 1) == 1
    pf = Portfolio.new(SYM, INITIAL)
    assert pf.mark(px[0], midnight - 3 * BAR) is True  # first mark starts a day
    pf.apply_fill(_fill(Side.BUY, "0.050", px[0]))
    start = pf.day_start_equity
    assert start == INITIAL
    assert pf.mark(px[0] * D("0.98"), midnight - 1) is False  # 23:59:59.999 is still the old day
    loss_eq = pf.equity
    assert pf.daily_pnl == loss_eq - start < 0
    assert pf.daily_loss == pytest.approx(float((start - loss_eq) / start))
    assert pf.mark(px[0] * D("0.97"), midnight) is True  # midnight rolls
    assert pf.day == utc_day(midnight)
    assert pf.day_start_equity == pf.equity  # the new day's reference is the first mark of the day
    assert pf.daily_pnl == 0 and pf.daily_loss == 0.0
    assert pf.mark(px[0] * D("0.96"), midnight + BAR) is False
    assert pf.daily_loss > 0


def test_peak_and_drawdown(px: list[Decimal]) -> None:
    pf = Portfolio.new(SYM, INITIAL)
    pf.apply_fill(_fill(Side.BUY, "0.050", px[0]))
    assert pf.peak_equity == INITIAL
    pf.mark(px[0] * D("1.04"), 1)
    peak = pf.equity
    assert peak > INITIAL and pf.peak_equity == peak and pf.drawdown == 0.0
    pf.mark(px[0] * D("0.95"), 2)
    assert pf.peak_equity == peak  # the peak never falls
    assert pf.drawdown == pytest.approx(float(1 - pf.equity / peak))
    assert pf.drawdown > 0.04
    pf.reset_peak()
    assert pf.peak_equity == pf.equity and pf.drawdown == 0.0


def test_cached_valuation_follows_every_change(px: list[Decimal]) -> None:
    """Equity and the loss fractions are memoised by identity; every kind of change must show at once."""

    def fresh(p: Portfolio) -> tuple[Decimal, Decimal, float, float]:
        upnl = ZERO_D if p.position.qty == 0 else money(p.position.qty * (p.mark_price - p.position.entry_price))
        eq = p.cash + upnl
        return upnl, eq, p.daily_loss_at(eq), p.drawdown_at(eq)

    pf = Portfolio.new(SYM, INITIAL)
    pf.mark(px[0], 1)
    seen: list[Decimal] = []
    steps = [
        lambda: pf.mark(px[0], 2),  # same price again: nothing changes
        lambda: pf.apply_fill(_fill(Side.BUY, "0.050", px[0])),  # fee paid: cash and position replaced
        lambda: pf.mark(px[1], 3),  # mark replaced
        lambda: pf.mark(px[1] * D("0.9"), 4),  # a loss: drawdown and daily loss move
        lambda: pf.apply_fill(_fill(Side.SELL, "0.020", px[2])),  # partial close: realized PnL into cash
        lambda: pf.reset_peak(),  # peak replaced: drawdown back to 0
        lambda: pf.mark(px[2], DAY_MS + 5),  # new day: the day's reference replaced
        lambda: pf.apply_fill(_fill(Side.SELL, "0.030", px[3])),  # flat again
    ]
    for change in steps:
        change()
        for _ in range(2):  # a cold and a warm read give the same answer
            upnl, eq, daily, dd = fresh(pf)
            assert pf.unrealized_pnl == upnl and pf.equity == eq
            assert pf.loss_fractions(pf.equity) == (daily, dd) == (pf.daily_loss, pf.drawdown)
        seen.append(pf.equity)
    assert len(set(seen)) >= 5  # the sequence really moved equity
    assert pf.equity is pf.cash  # flat: equity is cash itself
    with pytest.raises(AttributeError):
        pf.position.qty = D(1)  # type: ignore[misc]  # frozen: a fill must replace it, which the cache sees


def test_snapshot_restore_round_trip(px: list[Decimal]) -> None:
    pf = Portfolio.new(SYM, INITIAL)
    pf.mark(px[0], 1_735_689_600_000)
    pf.apply_fill(_fill(Side.BUY, "0.031", px[0]))
    pf.apply_fill(_fill(Side.BUY, "0.007", px[1]))  # non-terminating average entry
    pf.mark(px[2], 1_735_689_600_000 + BAR)
    snap = pf.snapshot()
    back = Portfolio.restore(orjson.loads(orjson.dumps(snap)))  # as the store persists it
    assert back.snapshot() == snap
    for attr in ("cash", "equity", "unrealized_pnl", "realized_pnl", "fees_paid", "peak_equity", "day",
                 "day_start_equity", "fills", "drawdown", "daily_loss", "mark_price"):
        assert getattr(back, attr) == getattr(pf, attr), attr
    assert back.position == pf.position


# ---- reconciliation on real prices ---------------------------------------------------------------------

# Signed target positions in BTC, visited in turn: opens, adds, partial closes, full closes and flips.
TARGETS = [D(x) for x in ("0.050", "0.080", "0.030", "0", "-0.040", "-0.090", "-0.020", "0.060", "0.061",
                          "-0.075", "-0.075", "0.010", "0")]


def test_reconcile_to_the_cent_on_real_prices(btc_candles: list[Candle]) -> None:
    """Trade every 37th real candle at its open through the paper broker; the books must balance exactly."""
    broker = PaperBroker(FEE, SLIP)
    pf = Portfolio.new(SYM, INITIAL)
    fills: list[Fill] = []
    kinds: set[str] = set()
    candles = btc_candles[:37 * 400]
    for i, c in enumerate(candles):
        for f in broker.on_candle(c):  # orders fill at this candle's open
            before = pf.position.qty
            booked = pf.apply_fill(f)
            fills.append(booked)
            after = pf.position.qty
            kinds.add("flip" if before * after < 0 else "close" if after == 0 else
                      "open" if before == 0 else "add" if abs(after) > abs(before) else "partial")
        pf.mark(D(repr(c.close)), c.ts + BAR)
        want = TARGETS[(i // 37) % len(TARGETS)] if i % 37 == 36 and i < len(candles) - 37 else None
        if i == len(candles) - 2:
            want = D(0)  # flatten at the last open
        if want is not None and want != pf.position.qty:
            delta = want - pf.position.qty
            broker.submit(Order(f"o{i}", SYM, Side.BUY if delta > 0 else Side.SELL, abs(delta), False, c.ts))
    assert kinds == {"open", "add", "partial", "close", "flip"}
    assert len(fills) > 300
    assert pf.position.is_flat

    realized = sum((f.realized_pnl for f in fills), D(0))
    fees = sum((f.fee for f in fills), D(0))
    assert pf.cash - pf.initial_equity == realized - fees  # exactly, not approximately
    assert pf.equity == pf.initial_equity + sum((f.realized_pnl - f.fee for f in fills), D(0))
    assert pf.fees_paid == fees and pf.realized_pnl == realized
    # Independent check: for a book that ends flat, average-cost PnL equals the cash flow of the trades.
    cash_flow = sum((-f.signed_qty * f.price for f in fills), D(0))
    assert abs(cash_flow - realized) < D("0.01")
    # every fill price is the real open moved 2 bps against the order
    opens = {c.ts: D(repr(c.open)) for c in candles}
    for f in fills:
        assert f.price == price_with_slippage(f.side, opens[f.ts_ms], SLIP)
        assert f.fee == taker_fee(f.qty, f.price, FEE) > 0


class CyclePolicy:
    """Stub policy: a fixed cycle of targets, one step every ``hold`` decisions, always confident."""

    def __init__(self, targets: Sequence[float], hold: int) -> None:
        self.targets, self.hold, self.n = list(targets), hold, 0

    def decide(self, obs: Sequence[float], candle_ts: int, symbol: str) -> Decision:
        t = self.targets[(self.n // self.hold) % len(self.targets)]
        self.n += 1
        return Decision(candle_ts, symbol, (1.0,), 0, t, 1.0, 1.0)


def test_trades_csv_pnl_column_sums_to_equity_change(tmp_path: Path, btc_candles: list[Candle]) -> None:
    """Engine + Store + operator files, persisted as the daemon does: trades.csv alone explains the equity."""
    limits = RiskLimits()
    cfg = EngineConfig(SYM, BAR, D("0.001"), 0.6, limits)
    eng = Engine(cfg, CyclePolicy([1.0, 0.5, -0.25, -1.0, 0.0, 0.75, -0.5], hold=9), PaperBroker(FEE, SLIP),
                 Portfolio.new(SYM, INITIAL))
    store = Store(tmp_path / "data")
    files = OperatorFiles(tmp_path / "log")

    def persist(res: StepResult) -> None:
        p = store.commit_step(res, eng.snapshot())
        reasons = {o.client_order_id: o.reason for o in res.orders}
        reasons.update(store.fill_reasons(r[1] for r in p.fills if r[1] not in reasons))
        files.write(p, reasons, ("x",), BAR)

    candles = btc_candles[5000:6500]
    for c in candles[:-1]:
        persist(eng.step(c))
    persist(eng.flatten(candles[-1].ts))
    persist(eng.step(candles[-1]))
    files.close()
    store.close()
    pf = eng.portfolio
    assert eng.state is TradingState.ACTIVE
    assert pf.position.is_flat and pf.fills > 100

    with open(tmp_path / "log" / "trades.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == pf.fills
    assert [int(r["fill_id"]) for r in rows] == list(range(1, pf.fills + 1))
    pnl = sum((D(r["pnl"]) for r in rows), D(0))
    assert pnl == pf.equity - pf.initial_equity  # to the cent, in fact to the 1e-8 USDT booked
    assert round(pnl, 2) == round(pf.equity - INITIAL, 2)
    assert sum((D(r["fee"]) for r in rows), D(0)) == pf.fees_paid
    assert all(D(r["pnl"]) == D(r["realized_pnl"]) - D(r["fee"]) for r in rows)
    assert rows[-1]["reason"] == "flatten" and {r["reason"] for r in rows} == {"policy", "flatten"}
    assert {r["side"] for r in rows} == {"buy", "sell"}
