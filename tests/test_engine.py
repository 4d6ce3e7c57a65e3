"""The per-candle engine on real candles: fill timing, the confidence threshold, the crash test the
product requires, operator actions, and a Store round-trip.

The crash test replays the real ETHUSDT perpetual crash of 2025-01-31 .. 2025-02-03 (-39 % high to
low, ``tests/data``) with a stub policy that insists on the maximum long position all the way down,
the worst case, and checks that every limit in ``config/trading_params.yaml`` holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path

import pytest

from alphapulse.config import Settings, load_settings
from alphapulse.costs import money, price_with_slippage, taker_fee
from alphapulse.domain import Candle, Decision, Fill, Order, RiskAlert, Side, TradingState
from alphapulse.engine import Engine, EngineConfig, StateConflict, StepResult
from alphapulse.execution.paper import PaperBroker
from alphapulse.features import WARMUP_BARS, StreamingFeatures
from alphapulse.policy import Policy, baseline_model_path
from alphapulse.portfolio import Portfolio, utc_day
from alphapulse.risk import RiskLimits, target_qty
from alphapulse.store import Store

S = TradingState
D = Decimal
REDUCING_STATES = (S.REDUCE_ONLY, S.HALTED)


@pytest.fixture(scope="module")
def settings(repo_dir: Path) -> Settings:
    """The shipped configuration: the limits under test are the ones operators get."""
    return load_settings(repo_dir / "config", env={})


@pytest.fixture(scope="module")
def shipped_policy() -> Policy:
    return Policy.load(baseline_model_path())


class ScriptPolicy:
    """Stub policy: ``script[candle_ts] = (target, confidence)``; elsewhere an unconfident hold."""

    def __init__(self, script: dict[int, tuple[float, float]] | None = None, default: tuple[float, float] = (0.0, 0.0)):
        self.script = script or {}
        self.default = default
        self.calls = 0

    def decide(self, obs: Sequence[float], candle_ts: int, symbol: str) -> Decision:
        assert len(obs) == 20 and all(math.isfinite(x) for x in obs)
        self.calls += 1
        target, conf = self.script.get(candle_ts, self.default)
        return Decision(candle_ts, symbol, (1 - conf, conf), 1, target, conf, 1.0)


def max_long() -> ScriptPolicy:
    """The worst case for a crash: always the full long target, always fully confident."""
    return ScriptPolicy(default=(1.0, 1.0))


def make_engine(settings: Settings, policy: object, *, symbol: str = "BTCUSDT", limits: RiskLimits | None = None,
                portfolio: Portfolio | None = None, state: TradingState = S.ACTIVE) -> Engine:
    cfg = EngineConfig(symbol, settings.bar_ms, settings.lot_size, settings.confidence_threshold,
                       limits or settings.risk)
    return Engine(cfg, policy, PaperBroker(settings.taker_fee, settings.slippage_bps),  # type: ignore[arg-type]
                  portfolio or Portfolio.new(symbol, settings.initial_equity), state=state)


def run(eng: Engine, candles: Sequence[Candle]) -> list[StepResult]:
    return [eng.step(c) for c in candles]


# ---- (a) fills at the next candle's open ----------------------------------------------------------------


def test_order_fills_at_next_open_with_slippage_and_fee(settings: Settings, btc_candles: list[Candle]) -> None:
    candles = btc_candles[:140]
    buy_at, sell_at = candles[100], candles[120]
    eng = make_engine(settings, ScriptPolicy({buy_at.ts: (1.0, 0.9), sell_at.ts: (0.0, 0.9)}))
    run(eng, candles[:100])
    assert eng.portfolio.position.is_flat and eng.broker.open_orders() == []

    res = eng.step(buy_at)
    (order,) = res.orders
    expected_qty = target_qty(1.0, settings.initial_equity, D(repr(buy_at.close)), settings.risk, settings.lot_size)
    assert order.side is Side.BUY and order.qty == expected_qty > 0
    assert order.client_order_id == f"ap-{buy_at.ts}-p" and not order.reduce_only
    assert res.fills == [] and eng.portfolio.position.is_flat  # nothing trades on the decision candle's prices
    assert res.decision is not None and res.decision.allowed and res.decision.order_id == order.client_order_id

    nxt = candles[101]
    res = eng.step(nxt)
    (fill,) = res.fills
    buy_px = money(D(repr(nxt.open)) * (1 + settings.slippage_bps / 10_000))
    assert fill.price == buy_px == price_with_slippage(Side.BUY, D(repr(nxt.open)), settings.slippage_bps)
    assert fill.price > D(repr(nxt.open))
    assert fill.fee == money(expected_qty * buy_px * settings.taker_fee)
    assert (fill.ts_ms, fill.client_order_id, fill.qty) == (nxt.ts, order.client_order_id, expected_qty)
    assert eng.portfolio.position.qty == expected_qty and eng.portfolio.position.entry_price == buy_px
    assert eng.portfolio.cash == settings.initial_equity - fill.fee
    assert eng.broker.open_orders() == []

    run(eng, candles[102:120])
    res = eng.step(sell_at)
    (close,) = res.orders
    assert close.side is Side.SELL and close.qty == expected_qty and close.reduce_only
    res = eng.step(candles[121])
    (sfill,) = res.fills
    sell_px = price_with_slippage(Side.SELL, D(repr(candles[121].open)), settings.slippage_bps)
    assert sfill.price == sell_px < D(repr(candles[121].open))
    assert sfill.realized_pnl == money(expected_qty * (sell_px - buy_px))
    fees = fill.fee + taker_fee(expected_qty, sell_px, settings.taker_fee)
    assert eng.portfolio.position.is_flat
    assert eng.portfolio.equity == settings.initial_equity + sfill.realized_pnl - fees


def test_no_decision_before_feature_warmup(settings: Settings, btc_candles: list[Candle]) -> None:
    pol = max_long()
    eng = make_engine(settings, pol)
    results = run(eng, btc_candles[:WARMUP_BARS])
    assert all(r.decision is None and not r.orders for r in results[:-1])
    assert results[-1].decision is not None and pol.calls == 1


# ---- (b) confidence threshold --------------------------------------------------------------------------


def test_confidence_threshold_with_the_shipped_policy(settings: Settings, shipped_policy: Policy,
                                                     btc_candles: list[Candle]) -> None:
    eng = make_engine(settings, shipped_policy)
    held = acted = 0
    for c in btc_candles[:2000]:
        res = eng.step(c)
        d = res.decision
        if d is None:
            continue
        if d.decision.confidence < settings.confidence_threshold:
            held += 1
            assert d.reason == "below_confidence_threshold" and not d.allowed and d.order_id is None
            assert res.orders == []
        else:
            acted += 1
            assert d.reason != "below_confidence_threshold"
            assert bool(res.orders) == d.allowed
    assert held > 100 and acted > 10  # both branches really happen on real data
    assert eng.orders_sent > 0 and eng.portfolio.fills > 0


@pytest.mark.parametrize(("conf", "allowed"), [(0.5999, False), (0.6, True), (0.61, True)])
def test_confidence_threshold_boundary(settings: Settings, btc_candles: list[Candle], conf: float,
                                       allowed: bool) -> None:
    candles = btc_candles[:60]
    eng = make_engine(settings, ScriptPolicy({candles[-1].ts: (1.0, conf)}))
    res = run(eng, candles)[-1]
    assert res.decision is not None and res.decision.allowed is allowed
    assert bool(res.orders) is allowed
    if not allowed:
        assert res.decision.reason == "below_confidence_threshold"


def test_stale_data_blocks_orders_with_an_alert(settings: Settings, btc_candles: list[Candle]) -> None:
    candles = btc_candles[:60]
    bar = settings.bar_ms
    eng = make_engine(settings, max_long())
    run(eng, candles[:-1])
    eng.broker.cancel_all()
    eng.portfolio = Portfolio.new("BTCUSDT", settings.initial_equity)  # flat, so max long wants an order
    last = candles[-1]
    res = eng.step(last, now_ms=last.ts + bar + 2 * bar + 1)  # the candle closed more than 2 bars ago
    assert res.orders == [] and res.decision is not None and res.decision.reason == "stale_data"
    (a,) = res.alerts
    assert a.limit == "stale_data" and a.threshold == settings.risk.max_data_age_bars and a.value > a.threshold


def test_order_rate_limit_in_the_engine(settings: Settings, btc_candles: list[Candle]) -> None:
    """A burst of candles handled within one minute (e.g. a catch-up after a reconnect) is rate limited."""
    candles = btc_candles[:60]
    script = {candles[57].ts: (1.0, 1.0), candles[58].ts: (-1.0, 1.0), candles[59].ts: (-1.0, 1.0)}
    eng = make_engine(settings, ScriptPolicy(script), limits=replace(settings.risk, max_orders_per_minute=1))
    run(eng, candles[:57])
    now = candles[58].ts + settings.bar_ms + 1_000  # both candles are processed within the same second
    first = eng.step(candles[57], now_ms=now)
    assert len(first.orders) == 1 and first.decision is not None and first.decision.allowed
    second = eng.step(candles[58], now_ms=now + 500)
    assert second.orders == [] and second.decision is not None and second.decision.reason == "order_rate"
    assert [a.limit for a in second.alerts] == ["max_orders_per_minute"]
    third = eng.step(candles[59], now_ms=now + 60_000)  # a minute later the window has room again
    (o,) = third.orders
    assert o.side is Side.SELL and eng.portfolio.position.qty > 0 and o.qty > eng.portfolio.position.qty


# ---- (c) the crash test -----------------------------------------------------------------------------------


@dataclass
class Audit:
    """What one step did, measured from outside the engine."""

    candle: Candle
    before: TradingState
    after: TradingState
    qty_at_open: Decimal  # position after this candle's fills: what was held through the bar
    res: StepResult
    equity: Decimal
    peak: Decimal
    drawdown: float
    daily_loss: float
    leverage: float
    rolled: bool


def audited_run(eng: Engine, candles: Sequence[Candle]) -> list[Audit]:
    out: list[Audit] = []
    pf = eng.portfolio
    for c in candles:
        before, day_before = eng.state, pf.day
        res = eng.step(c)
        qty_now = pf.position.qty  # orders never fill inside the step that places them
        out.append(Audit(c, before, eng.state, qty_now, res, pf.equity, pf.peak_equity, pf.drawdown,
                         pf.daily_loss, pf.leverage, pf.day != day_before))
    return out


def peak_to_trough(candles: Sequence[Candle]) -> float:
    peak, worst = 0.0, 0.0
    for c in candles:
        peak = max(peak, c.high)
        worst = max(worst, 1 - c.low / peak)
    return worst


def check_limits_hold(audit: list[Audit], limits: RiskLimits, slippage_bps: Decimal) -> dict[str, object]:
    """Every invariant of the crash test; returns measurements for the caller's expectations."""
    dd_limit, dl_limit = limits.max_drawdown_frac, limits.daily_loss_limit_frac
    alerts: list[RiskAlert] = [a for s in audit for a in s.res.alerts]
    for a in alerts:  # every alert carries real numbers
        assert math.isfinite(a.value) and math.isfinite(a.threshold) and a.ts_ms > 0 and a.action

    for i, s in enumerate(audit):
        # the leverage limit holds at every mark
        assert s.leverage <= limits.max_leverage, (i, s.leverage)

        # every breach produced an alert with the measured value and the configured threshold
        if s.after is not s.before and s.after in (S.REDUCE_ONLY, S.HALTED):
            name = "daily_loss_limit" if s.after is S.REDUCE_ONLY else "max_drawdown"
            (a,) = [a for a in s.res.alerts if a.limit == name]
            assert a.threshold == (dl_limit if name == "daily_loss_limit" else dd_limit)
            assert a.value >= a.threshold
            assert a.value == pytest.approx(s.daily_loss if name == "daily_loss_limit" else s.drawdown)
        # and a breach is never missed: the state machine reacts on the very mark that crosses a limit
        if s.before is S.ACTIVE and s.daily_loss >= dl_limit:
            assert s.after in (S.REDUCE_ONLY, S.HALTED), i
        if s.before is not S.HALTED and s.drawdown >= dd_limit:
            assert s.after is S.HALTED, i
        if s.before is S.REDUCE_ONLY and s.after is S.ACTIVE:
            assert s.rolled, f"REDUCE_ONLY lifted at step {i} without a new UTC day"

        for o in s.res.orders:
            signed = o.qty if o.side is Side.BUY else -o.qty
            after = s.qty_at_open + signed
            if s.after in REDUCING_STATES:
                # no order increases exposure in REDUCE_ONLY/HALTED, nor crosses zero
                assert o.reduce_only, (i, o)
                assert abs(after) < abs(s.qty_at_open) and (after == 0 or (after > 0) == (s.qty_at_open > 0)), (i, o)
            if o.reason == "policy" and abs(after) > abs(s.qty_at_open):
                # position notional <= max_position_pct of equity at the time of the order
                price = D(repr(s.candle.close))
                assert abs(after) * price <= D(repr(limits.max_position_frac)) * s.equity, (i, o)
        d = s.res.decision
        if d is not None and s.after in REDUCING_STATES and s.before is s.after:
            # the max-long policy is only ever allowed to trade here when its target shrinks the position
            allowed_reasons = ("reduce_only", "state_halted", "at_target", "ok", "within_rebalance_band")
            assert d.reason in allowed_reasons, (i, d.reason)
            assert not d.allowed or all(o.reduce_only for o in s.res.orders), (i, d)

    out: dict[str, object] = {"alerts": alerts, "max_dd": max(s.drawdown for s in audit)}
    halts = [i for i, s in enumerate(audit) if s.after is S.HALTED and s.before is not S.HALTED]
    out["halt"] = halts[0] if halts else None
    if not halts:
        assert all(s.drawdown < dd_limit for s in audit)
        return out
    assert len(halts) == 1
    h = halts[0]
    hs = audit[h]
    assert all(s.drawdown < dd_limit for s in audit[:h])  # the halt is not late
    assert all(s.after is S.HALTED for s in audit[h:])  # and HALTED stays HALTED
    if not limits.flatten_on_halt:
        return out
    (close,) = hs.res.orders
    assert close.reason == "halt" and close.reduce_only and close.qty == abs(hs.qty_at_open)
    assert close.side is (Side.SELL if hs.qty_at_open > 0 else Side.BUY)
    # the flatten fills at the next open, and no position remains
    nxt = audit[h + 1]
    (ffill,) = [f for f in nxt.res.fills if f.client_order_id == close.client_order_id]
    assert ffill.price == price_with_slippage(close.side, D(repr(nxt.candle.open)), slippage_bps)
    assert nxt.qty_at_open == 0
    for s in audit[h + 1:]:
        assert s.qty_at_open == 0 and not s.res.orders
    assert all(not s.res.fills for s in audit[h + 2:])
    # Honest bound: the drawdown exceeds the limit by at most what the position held through the breach
    # bar lost between the last close under the limit and the worst of (breach close, flatten fill), plus fees.
    prev = audit[h - 1]
    ref = max([D(repr(prev.candle.close))] + [f.price for f in hs.res.fills])
    q = abs(hs.qty_at_open)
    worst = min(D(repr(hs.candle.close)), ffill.price) if hs.qty_at_open > 0 else max(D(repr(hs.candle.close)),
                                                                                     ffill.price)
    adverse = q * abs(ref - worst)
    fees = sum((f.fee for f in hs.res.fills + nxt.res.fills), D(0))
    bound = dd_limit + float((adverse + fees) / hs.peak)
    max_dd = max(s.drawdown for s in audit)
    assert max_dd <= bound, (max_dd, bound)
    assert prev.drawdown < dd_limit <= hs.drawdown
    # In price terms: the position held through that bar was sized at <= max_position of equity (<= peak) at
    # the previous close (2 % slack for the open gapping above it), so the excess over the limit is at most
    # max_position x the one-bar adverse move, plus fees.
    adverse_move = float(abs(ref - worst) / ref)
    exposure = float(q * ref / hs.peak)
    assert exposure <= limits.max_position_frac * 1.02, exposure
    assert max_dd <= dd_limit + limits.max_position_frac * 1.02 * adverse_move + float(fees / hs.peak)
    out.update(bound=bound, adverse_move=adverse_move, exposure=exposure, final_dd=audit[-1].drawdown)
    return out


def test_crash_replay_limits_hold(settings: Settings, crash_candles: list[Candle]) -> None:
    """THE crash test: real ETH crash, max long all the way down, shipped limits."""
    assert len(crash_candles) == 1728
    fall = peak_to_trough(crash_candles)
    assert fall >= 0.20, fall  # it really is a >= 20 % crash (39.5 % high to low)
    eng = make_engine(settings, max_long(), symbol="ETHUSDT")
    audit = audited_run(eng, crash_candles)
    m = check_limits_hold(audit, settings.risk, settings.slippage_bps)

    # the daily loss limit put the engine in REDUCE_ONLY, and a new UTC day lifted it
    assert any(s.before is S.ACTIVE and s.after is S.REDUCE_ONLY for s in audit)
    assert any(s.before is S.REDUCE_ONLY and s.after is S.ACTIVE for s in audit)
    limits = [a.limit for a in m["alerts"]]  # type: ignore[attr-defined]
    assert "daily_loss_limit" in limits and limits.count("max_drawdown") == 1
    # the drawdown limit halted it and the position was flattened at the next open
    assert m["halt"] is not None and eng.state is S.HALTED and eng.portfolio.position.is_flat
    # a 39 % fall held at max long would have cost ~20 % of equity; the limits kept it near 12 %
    assert m["max_dd"] < 0.15  # type: ignore[operator]
    assert eng.portfolio.equity > settings.initial_equity * D("0.88")
    assert eng.portfolio.equity == eng.portfolio.cash
    # the incidents operators see name the states
    kinds = [i.kind for s in audit for i in s.res.incidents]
    assert "REDUCE_ONLY" in kinds and "HALTED" in kinds


def test_crash_without_flatten_on_halt_keeps_the_position_but_blocks_orders(settings: Settings,
                                                                          crash_candles: list[Candle]) -> None:
    limits = replace(settings.risk, flatten_on_halt=False)
    eng = make_engine(settings, max_long(), symbol="ETHUSDT", limits=limits)
    audit = audited_run(eng, crash_candles)
    m = check_limits_hold(audit, limits, settings.slippage_bps)
    h = m["halt"]
    assert isinstance(h, int)
    held = audit[h].qty_at_open
    assert held > 0 and all(s.qty_at_open == held and not s.res.orders for s in audit[h:])
    assert eng.state is S.HALTED


def linear_fall(base: Sequence[Candle], start: int, length: int, depth: float = 0.20) -> list[Candle]:
    """Real candles with a linear ramp from 1 to ``1 - depth`` over ``length`` bars from ``start``."""
    out = []
    for i, c in enumerate(base):
        f = 1 - depth * min(1.0, max(0.0, (i - start) / length))
        out.append(Candle(c.ts, round(c.open * f, 1), round(c.high * f, 1), round(c.low * f, 1),
                          round(c.close * f, 1), c.volume))
    return out


@pytest.mark.parametrize("max_position_pct", [50.0, 100.0], ids=["shipped-50pct", "aggressive-100pct"])
def test_constructed_linear_fall_limits_hold(settings: Settings, btc_candles: list[Candle],
                                             max_position_pct: float) -> None:
    """Deterministic variant: a calm real BTC window (2025-06-27, 4 days) bent into a 20 % linear fall over 3
    days (crossing two UTC midnights). With the shipped 50 % cap the fall cannot reach the 12 % drawdown
    limit; with a 100 % cap it must halt and flatten."""
    start = 178 * 288  # 2025-06-27 00:00 UTC in the bundled file
    assert btc_candles[start].ts % 86_400_000 == 0
    candles = linear_fall(btc_candles[start:start + 1152], start=144, length=864)
    assert 0.19 <= peak_to_trough(candles) <= 0.23
    limits = replace(settings.risk, max_position_frac=max_position_pct / 100)
    results = []
    for _ in range(2):  # deterministic: two runs agree bit for bit
        eng = make_engine(settings, max_long(), limits=limits)
        audit = audited_run(eng, candles)
        results.append([(s.after, s.equity, s.qty_at_open) for s in audit])
    assert results[0] == results[1]
    m = check_limits_hold(audit, limits, settings.slippage_bps)
    assert any(s.after is S.REDUCE_ONLY for s in audit)
    days = {utc_day(s.candle.ts + settings.bar_ms) for s in audit if s.before is S.REDUCE_ONLY and s.after is S.ACTIVE}
    assert len(days) >= 1
    if max_position_pct == 50.0:
        assert m["halt"] is None and eng.state is not S.HALTED
        assert 0.05 < m["max_dd"] < settings.risk.max_drawdown_frac  # type: ignore[operator]
    else:
        assert m["halt"] is not None and eng.state is S.HALTED and eng.portfolio.position.is_flat
        assert m["max_dd"] <= m["bound"]  # type: ignore[operator]
        assert eng.portfolio.equity > settings.initial_equity * D("0.85")


# ---- (d) operator actions ------------------------------------------------------------------------------------


def _engine_with_position(settings: Settings, candles: Sequence[Candle]) -> Engine:
    eng = make_engine(settings, max_long())
    run(eng, candles[:60])
    assert eng.portfolio.position.qty > 0
    return eng


def test_emergency_stop_cancels_pending_and_blocks_orders(settings: Settings, btc_candles: list[Candle]) -> None:
    candles = btc_candles[:120]
    eng = _engine_with_position(settings, candles)
    eng.policy = ScriptPolicy({candles[60].ts: (-0.5, 1.0)}, default=(1.0, 1.0))
    (pending,) = eng.step(candles[60]).orders  # a sell to a half short is acknowledged, fills next open
    assert eng.broker.open_orders() == [pending]
    qty_before = eng.portfolio.position.qty
    res = eng.emergency_stop(candles[60].ts + 400_000, "operator")
    assert eng.state is S.EMERGENCY_STOP and res.state_changed
    assert res.cancelled == [pending]
    assert eng.broker.open_orders() == []
    assert [i.kind for i in res.incidents] == ["EMERGENCY_STOP"]
    reasons = set()
    for c in candles[61:120]:
        r = eng.step(c)
        assert r.fills == [] and r.orders == []
        assert r.decision is not None and not r.decision.allowed
        reasons.add(r.decision.reason)
    assert reasons == {"state_emergency_stop", "at_target"}  # every wish to trade was refused by the state
    assert eng.portfolio.position.qty == qty_before and eng.state is S.EMERGENCY_STOP
    # a second emergency stop is harmless
    again = eng.emergency_stop(candles[119].ts, "operator")
    assert eng.state is S.EMERGENCY_STOP and again.cancelled == [] and again.incidents == []


def test_emergency_stop_survives_a_drawdown(settings: Settings, btc_candles: list[Candle]) -> None:
    candles = linear_fall(btc_candles[:400], start=60, length=300, depth=0.5)
    limits = RiskLimits(max_position_frac=1.0)
    eng = make_engine(settings, max_long(), limits=limits)
    run(eng, candles[:61])
    eng.emergency_stop(candles[60].ts, "operator")
    run(eng, candles[61:])
    assert eng.portfolio.drawdown > limits.max_drawdown_frac
    assert eng.state is S.EMERGENCY_STOP  # sticky: never silently turned into HALTED


def test_flatten_when_halted_closes_with_a_reduce_only_order(settings: Settings, btc_candles: list[Candle]) -> None:
    candles = btc_candles[:100]
    eng = _engine_with_position(settings, candles)
    eng.state = S.HALTED  # e.g. restored from the store after a drawdown halt, flatten_on_halt off
    qty = eng.portfolio.position.qty
    res = eng.flatten(candles[59].ts + 1000)
    (o,) = res.orders
    assert o.reduce_only and o.side is Side.SELL and o.qty == qty and o.reason == "flatten"
    assert [i.kind for i in res.incidents] == ["FLATTEN"]
    assert res.incidents[0].detail["order_id"] == o.client_order_id
    r = eng.step(candles[60])
    (f,) = r.fills
    assert f.client_order_id == o.client_order_id and f.price == price_with_slippage(
        Side.SELL, D(repr(candles[60].open)), settings.slippage_bps)
    assert eng.portfolio.position.is_flat and eng.state is S.HALTED
    assert r.orders == [] and r.decision is not None and r.decision.reason == "state_halted"
    # flat: a further flatten creates nothing
    assert eng.flatten(candles[60].ts).orders == []


def test_flatten_replaces_pending_policy_orders(settings: Settings, btc_candles: list[Candle]) -> None:
    candles = btc_candles[:100]
    eng = _engine_with_position(settings, candles)
    eng.broker.submit(Order("ap-extra", "BTCUSDT", Side.BUY, D("0.002"), False, candles[59].ts))
    res = eng.flatten(candles[59].ts + 1000)
    assert [o.client_order_id for o in res.cancelled] == ["ap-extra"]
    assert [o.reason for o in eng.broker.open_orders()] == ["flatten"]
    eng.state = S.MAINTENANCE  # keep the policy out of the way
    eng.step(candles[60])
    assert eng.portfolio.position.is_flat


def test_flatten_twice_still_flattens(settings: Settings, btc_candles: list[Candle]) -> None:
    candles = btc_candles[:100]
    eng = _engine_with_position(settings, candles)
    eng.state = S.MAINTENANCE
    (first,) = eng.flatten(candles[59].ts + 1000).orders
    again = eng.flatten(candles[59].ts + 2000)  # the operator clicks again before the next candle
    assert again.orders == [] and again.cancelled == []  # idempotent: the waiting flatten order stands
    assert again.incidents[0].detail["order_id"] == first.client_order_id
    assert eng.broker.open_orders() == [first]
    eng.step(candles[60])
    assert eng.portfolio.position.is_flat


def test_maintenance_blocks_new_orders_and_resume_lifts_it(settings: Settings, btc_candles: list[Candle]) -> None:
    candles = btc_candles[:200]
    eng = make_engine(settings, max_long())
    run(eng, candles[:55])
    res = eng.maintenance(candles[54].ts + 1)
    assert eng.state is S.MAINTENANCE and [i.kind for i in res.incidents] == ["MAINTENANCE"]
    eng.broker.cancel_all()
    qty = eng.portfolio.position.qty
    reasons = set()
    for c in candles[55:100]:
        r = eng.step(c)
        assert r.orders == [] and r.decision is not None and not r.decision.allowed
        reasons.add(r.decision.reason)
    assert reasons == {"state_maintenance", "at_target"}
    assert eng.portfolio.position.qty == qty
    res = eng.resume(candles[99].ts + 1)
    assert eng.state is S.ACTIVE and res.incidents[-1].detail == {"from": "MAINTENANCE", "to": "ACTIVE"}
    eng.policy = ScriptPolicy(default=(-1.0, 1.0))  # now wants a full short: trading resumes at once
    (o,) = eng.step(candles[100]).orders
    assert o.side is Side.SELL and o.qty > qty


@pytest.mark.parametrize("state", [S.HALTED, S.EMERGENCY_STOP])
def test_maintenance_refused_from_blocking_operator_states(settings: Settings, state: TradingState) -> None:
    eng = make_engine(settings, max_long(), state=state)
    with pytest.raises(StateConflict):
        eng.maintenance(1)
    assert eng.state is state


def test_resume_from_halted_resets_the_peak(settings: Settings, crash_candles: list[Candle]) -> None:
    eng = make_engine(settings, max_long(), symbol="ETHUSDT")
    audit = audited_run(eng, crash_candles)
    h = next(i for i, s in enumerate(audit) if s.after is S.HALTED)
    pf = eng.portfolio
    assert eng.state is S.HALTED and pf.drawdown >= settings.risk.max_drawdown_frac
    old_peak = pf.peak_equity
    res = eng.resume(crash_candles[-1].ts + 300_000)
    assert pf.peak_equity == pf.equity < old_peak and pf.drawdown == 0.0
    assert eng.state is (S.REDUCE_ONLY if pf.daily_loss >= settings.risk.daily_loss_limit_frac else S.ACTIVE)
    assert res.incidents[-1].detail["from"] == "HALTED"
    assert h < len(audit) - 1


def test_resume_keeps_reduce_only_while_the_daily_loss_holds(settings: Settings, btc_candles: list[Candle]) -> None:
    pf = Portfolio.new("BTCUSDT", settings.initial_equity)
    pf.mark(D("100000"), 1_735_689_600_000)
    pf.apply_fill(Fill("x", "BTCUSDT", Side.BUY, D("0.05"), D("100000"), D(0), 1_735_689_600_000))
    pf.mark(D("90000"), 1_735_689_600_000 + 300_000)  # -500 USDT: 5 % daily loss and drawdown
    eng = make_engine(settings, max_long(), portfolio=pf, state=S.HALTED)
    eng.resume(1_735_689_600_000 + 400_000)
    assert eng.state is S.REDUCE_ONLY and pf.drawdown == 0.0


# ---- (e) Store round-trip ----------------------------------------------------------------------------------


def _persist(store: Store, eng: Engine, res: StepResult) -> None:
    """As Daemon._persist: one transaction with the step's rows and the engine's state snapshot."""
    store.commit_step(res, eng.snapshot())


def test_store_round_trip_and_restart_equivalence(tmp_path: Path, settings: Settings,
                                                  btc_candles: list[Candle]) -> None:
    candles = btc_candles[10_000:13_000]
    eng = make_engine(settings, Policy.load(baseline_model_path()))
    store = Store(tmp_path)
    stop = None
    for i, c in enumerate(candles):
        res = eng.step(c)
        _persist(store, eng, res)
        if i >= 1999 and res.orders:  # stop with an acknowledged, unfilled order in flight
            stop = i
            break
    assert stop is not None, "the shipped policy placed no order between candle 2000 and 3000"
    assert eng.portfolio.fills > 0 and eng.broker.open_orders()
    counts = {t: store.count(t) for t in ("decisions", "orders", "fills")}
    store.close()

    reopened = Store(tmp_path)
    st = reopened.load()
    assert st is not None
    assert st.portfolio == eng.portfolio.snapshot()
    assert st.trading_state == eng.state.value and st.state_reason == eng.state_reason
    assert st.last_candle_ts == eng.last_candle_ts == candles[stop].ts
    assert st.open_orders == eng.broker.open_orders()
    assert counts == {"decisions": eng.decisions, "orders": eng.orders_sent, "fills": eng.portfolio.fills}
    assert {t: reopened.count(t) for t in counts} == counts

    # A restarted engine built from the store continues exactly as the one that never stopped.
    broker = PaperBroker(settings.taker_fee, settings.slippage_bps)
    broker.restore(st.open_orders)
    feats = StreamingFeatures()
    feats.warmup(candles[: stop + 1])
    cfg = EngineConfig(settings.symbol, settings.bar_ms, settings.lot_size, settings.confidence_threshold,
                       settings.risk)
    twin = Engine(cfg, Policy.load(baseline_model_path()), broker, Portfolio.restore(st.portfolio),
                  TradingState(st.trading_state), feats, st.last_candle_ts)
    for c in candles[stop + 1: stop + 400]:
        a, b = eng.step(c), twin.step(c)
        assert a.fills == b.fills and a.orders == b.orders
        assert eng.portfolio.snapshot() == twin.portfolio.snapshot()
    reopened.close()



class _NeverFills(PaperBroker):
    """A venue that acknowledges and never fills (a slow or failing exchange)."""

    def on_candle(self, candle: Candle) -> list[Fill]:
        return []


def test_no_second_order_while_one_is_pending(btc_candles: list[Candle]) -> None:
    """Sizing against a position that excludes an order still on its way would repeat the order each bar and
    overshoot every limit once they all fill; the engine waits instead."""
    from alphapulse.baselines import ConstantTarget
    from alphapulse.builder import build_engine

    settings = load_settings(None, env={})
    eng = build_engine(settings, ConstantTarget(1.0), timeframe="5m",
                       broker=_NeverFills(settings.taker_fee, settings.slippage_bps))
    reasons = [r.decision.reason for r in (eng.step(c) for c in btc_candles[:80]) if r.decision is not None]
    assert reasons[0] != "order_pending"
    assert eng.orders_sent == 1 and len(eng.broker.open_orders()) == 1
    assert set(reasons[1:]) == {"order_pending"}
