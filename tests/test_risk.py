"""Risk limits and the trading-state machine (pure functions).

Prices and equities are real: BTCUSDT perpetual closes from the bundled file, so lot rounding and
caps are exercised at the magnitudes the daemon actually sees.
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from alphapulse.domain import Candle, RiskAlert, TradingState
from alphapulse.risk import BLOCKING_STATES, RiskLimits, Verdict, check_order, next_state, resume_state, target_qty

S = TradingState
LIM = RiskLimits()  # 50 % position, 3x leverage, 3 % daily loss, 12 % drawdown, 10 orders/min, 2 bars
LOT = Decimal("0.001")
BAR = 300_000
EQ = Decimal("10000.00000000")
NOW = 1_735_603_500_000


@pytest.fixture(scope="module")
def price(btc_candles: list[Candle]) -> Decimal:
    """A real BTCUSDT close (2025-01-01 00:00 bar)."""
    return Decimal(repr(btc_candles[288].close))


def _ns(state: TradingState, *, dl: float = 0.0, dd: float = 0.0, rolled: bool = False,
        limits: RiskLimits = LIM) -> tuple[TradingState, tuple[RiskAlert, ...]]:
    return next_state(state, daily_loss=dl, drawdown=dd, day_rolled=rolled, limits=limits, now_ms=NOW)


def _check(state: TradingState = S.ACTIVE, *, cur: str | Decimal = "0", want: str | Decimal = "0",
           price: Decimal, equity: Decimal = EQ, age_ms: int = 0, orders: int = 0,
           limits: RiskLimits = LIM, stalled: bool = False) -> Verdict:
    return check_order(state=state, current_qty=Decimal(cur), desired_qty=Decimal(want), equity=equity, price=price,
                       limits=limits, lot=LOT, data_age_ms=age_ms, bar_ms=BAR, orders_last_minute=orders, now_ms=NOW,
                       stream_stalled=stalled)


# ---- next_state ----------------------------------------------------------------------------------


def test_active_stays_active_below_limits() -> None:
    assert _ns(S.ACTIVE, dl=0.0299, dd=0.1199) == (S.ACTIVE, ())


def test_active_to_reduce_only_at_daily_loss_limit() -> None:
    state, alerts = _ns(S.ACTIVE, dl=0.03)  # exactly at the limit counts
    assert state is S.REDUCE_ONLY
    (a,) = alerts
    assert (a.limit, a.value, a.threshold, a.action, a.ts_ms) == ("daily_loss_limit", 0.03, 0.03, "REDUCE_ONLY", NOW)
    state, alerts = _ns(S.ACTIVE, dl=0.0412)
    assert state is S.REDUCE_ONLY and alerts[0].value == 0.0412


def test_reduce_only_stays_within_the_day_and_lifts_on_a_new_utc_day() -> None:
    assert _ns(S.REDUCE_ONLY, dl=0.01, rolled=False) == (S.REDUCE_ONLY, ())  # recovered, same day: still reduce
    assert _ns(S.REDUCE_ONLY, dl=0.0, rolled=True) == (S.ACTIVE, ())
    # a new day that itself starts beyond the limit (cannot happen with a fresh day reference, but must not lift)
    assert _ns(S.REDUCE_ONLY, dl=0.05, rolled=True)[0] is S.REDUCE_ONLY


@pytest.mark.parametrize("state", [S.ACTIVE, S.REDUCE_ONLY, S.MAINTENANCE])
def test_any_state_but_emergency_stop_halts_at_max_drawdown(state: TradingState) -> None:
    new, alerts = _ns(state, dl=0.05, dd=0.12, rolled=True)
    assert new is S.HALTED
    (a,) = alerts
    assert (a.limit, a.value, a.threshold, a.action) == ("max_drawdown", 0.12, 0.12, "HALTED")
    assert a.detail == {"previous_state": state.value}


def test_drawdown_takes_priority_over_daily_loss() -> None:
    new, alerts = _ns(S.ACTIVE, dl=0.2, dd=0.2)
    assert new is S.HALTED and [a.limit for a in alerts] == ["max_drawdown"]


def test_halted_stays_halted_without_new_alerts() -> None:
    for dd, dl, rolled in ((0.2, 0.1, False), (0.0, 0.0, True), (0.5, 0.0, True)):
        assert _ns(S.HALTED, dl=dl, dd=dd, rolled=rolled) == (S.HALTED, ())


def test_emergency_stop_is_sticky() -> None:
    for dd, dl, rolled in ((0.5, 0.5, True), (0.0, 0.0, True), (0.13, 0.0, False)):
        assert _ns(S.EMERGENCY_STOP, dl=dl, dd=dd, rolled=rolled) == (S.EMERGENCY_STOP, ())


def test_maintenance_does_not_leave_by_itself() -> None:
    assert _ns(S.MAINTENANCE, dl=0.0, rolled=True) == (S.MAINTENANCE, ())
    assert _ns(S.MAINTENANCE, dl=0.05) == (S.MAINTENANCE, ())


def test_custom_limits_are_used() -> None:
    tight = RiskLimits(daily_loss_limit_frac=0.01, max_drawdown_frac=0.02)
    assert _ns(S.ACTIVE, dl=0.011, limits=tight)[0] is S.REDUCE_ONLY
    assert _ns(S.ACTIVE, dd=0.021, limits=tight)[0] is S.HALTED
    assert _ns(S.ACTIVE, dd=0.021)[0] is S.ACTIVE


def test_resume_state() -> None:
    assert resume_state(daily_loss=0.0, limits=LIM) is S.ACTIVE
    assert resume_state(daily_loss=0.0299, limits=LIM) is S.ACTIVE
    assert resume_state(daily_loss=0.03, limits=LIM) is S.REDUCE_ONLY
    assert resume_state(daily_loss=0.08, limits=LIM) is S.REDUCE_ONLY


# ---- target_qty -----------------------------------------------------------------------------------


def test_target_qty_full_long_is_max_position_fraction_rounded_down(price: Decimal) -> None:
    q = target_qty(1.0, EQ, price, LIM, LOT)
    raw = Decimal("0.5") * EQ / price
    assert q > 0 and q % LOT == 0
    assert q <= raw < q + LOT
    assert q * price <= Decimal("0.5") * EQ


def test_target_qty_short_rounds_toward_zero(price: Decimal) -> None:
    long_q = target_qty(0.5, EQ, price, LIM, LOT)
    short_q = target_qty(-0.5, EQ, price, LIM, LOT)
    assert short_q == -long_q  # toward zero, symmetric: not floor (which would make the short bigger)
    raw = Decimal("0.25") * EQ / price
    assert abs(short_q) <= raw < abs(short_q) + LOT


def test_target_qty_clamps_fraction_and_handles_zero(price: Decimal) -> None:
    assert target_qty(3.0, EQ, price, LIM, LOT) == target_qty(1.0, EQ, price, LIM, LOT)
    assert target_qty(-7.0, EQ, price, LIM, LOT) == target_qty(-1.0, EQ, price, LIM, LOT)
    assert target_qty(0.0, EQ, price, LIM, LOT) == 0
    assert target_qty(1.0, Decimal(0), price, LIM, LOT) == 0
    assert target_qty(1.0, Decimal(-5), price, LIM, LOT) == 0
    assert target_qty(1.0, EQ, Decimal(0), LIM, LOT) == 0


def test_target_qty_below_one_lot_is_zero(price: Decimal) -> None:
    # 0.5 * 100 USDT / ~93,500 = 0.00053 BTC < one 0.001 lot
    assert target_qty(1.0, Decimal(100), price, LIM, LOT) == 0
    assert target_qty(-1.0, Decimal(100), price, LIM, LOT) == 0


def test_target_qty_exact_lots_by_hand() -> None:
    # 0.5 * 10000 / 2500 = exactly 2.000 lots-worth -> exactly 2.000
    assert target_qty(1.0, EQ, Decimal("2500"), LIM, LOT) == Decimal("2.000")
    # 0.5 * 10000 / 2501 = 1.99920..., rounded toward zero to the lot
    assert target_qty(1.0, EQ, Decimal("2501"), LIM, LOT) == Decimal("1.999")
    assert target_qty(-1.0, EQ, Decimal("2501"), LIM, LOT) == Decimal("-1.999")


# ---- check_order ----------------------------------------------------------------------------------


def test_at_target_is_no_order(price: Decimal) -> None:
    v = _check(cur="0.05", want="0.05", price=price)
    assert (v.qty, v.allowed, v.reason, v.alerts) == (0, False, "at_target", ())


def test_normal_order_trades_the_difference(price: Decimal) -> None:
    v = _check(cur="0.010", want="0.030", price=price)
    assert (v.qty, v.allowed, v.reason, v.alerts) == (Decimal("0.020"), True, "ok", ())
    v = _check(cur="0.030", want="-0.020", price=price)  # flip within the cap
    assert v.allowed and v.qty == Decimal("-0.050")


@pytest.mark.parametrize("state", [s for s in TradingState if s in BLOCKING_STATES])
def test_blocking_states_refuse_every_order(state: TradingState, price: Decimal) -> None:
    for cur, want in (("0", "0.01"), ("0.02", "0"), ("0.02", "0.01"), ("-0.02", "0")):
        v = _check(state, cur=cur, want=want, price=price)
        assert (v.qty, v.allowed, v.reason) == (0, False, f"state_{state.value.lower()}")


def test_stale_data_is_rejected_with_an_alert(price: Decimal) -> None:
    ok = _check(cur="0", want="0.01", price=price, age_ms=2 * BAR)  # exactly the limit is still fresh
    assert ok.allowed
    v = _check(cur="0", want="0.01", price=price, age_ms=2 * BAR + 1)
    assert (v.qty, v.allowed, v.reason) == (0, False, "stale_data")
    (a,) = v.alerts
    assert a.limit == "stale_data" and a.threshold == 2.0 and a.value == pytest.approx(2.0 + 1 / BAR)
    assert a.detail == {"data_age_ms": 2 * BAR + 1} and a.action == "rejected"


@pytest.mark.parametrize(
    ("cur", "want", "qty", "reason"),
    [
        ("0.040", "0.010", "-0.030", "ok"),  # shrink a long
        ("0.040", "0", "-0.040", "ok"),  # close a long
        ("0.040", "-0.040", "-0.040", "ok"),  # would cross zero: stops at flat
        ("-0.040", "0.020", "0.040", "ok"),  # short side: stops at flat
        ("-0.040", "-0.015", "0.025", "ok"),
        ("0.040", "0.050", "0", "reduce_only"),  # grow: refused
        ("0.040", "0.040", "0", "at_target"),
        ("-0.040", "-0.060", "0", "reduce_only"),
        ("0", "0.010", "0", "reduce_only"),  # open from flat: refused
        ("0", "-0.010", "0", "reduce_only"),
    ],
)
def test_reduce_only_only_shrinks_and_never_crosses_zero(price: Decimal, cur: str, want: str, qty: str,
                                                         reason: str) -> None:
    v = _check(S.REDUCE_ONLY, cur=cur, want=want, price=price)
    assert v.qty == Decimal(qty) and v.reason == reason and v.allowed is (reason == "ok")
    after = Decimal(cur) + v.qty
    assert abs(after) <= abs(Decimal(cur))
    assert after == 0 or (after > 0) == (Decimal(cur) > 0)


@pytest.mark.parametrize(
    ("cur", "want", "qty", "reason"),
    [
        ("0.040", "0.010", "-0.030", "ok"),  # shrink a long: allowed, no alert
        ("0.040", "-0.040", "-0.040", "ok"),  # a flip stops at flat
        ("-0.040", "0", "0.040", "ok"),  # close a short
        ("0.040", "0.050", "0", "stream_stalled"),  # grow: refused, with an alert
        ("0", "0.010", "0", "stream_stalled"),  # open from flat: refused
        ("0", "-0.010", "0", "stream_stalled"),
        ("0.040", "0.040", "0", "at_target"),
    ],
)
def test_a_stalled_stream_allows_no_new_risk(price: Decimal, cur: str, want: str, qty: str, reason: str) -> None:
    v = _check(cur=cur, want=want, price=price, stalled=True)
    assert v.qty == Decimal(qty) and v.reason == reason and v.allowed is (reason == "ok")
    assert abs(Decimal(cur) + v.qty) <= abs(Decimal(cur))
    if reason == "stream_stalled":
        (a,) = v.alerts
        assert a.limit == "stream_stalled" and a.action == "rejected" and a.detail["desired_qty"] == want
    else:
        assert not v.alerts
    healthy = _check(cur=cur, want=want, price=price)  # the same move with the stream healthy
    if reason == "stream_stalled":
        assert healthy.allowed and healthy.qty == Decimal(want) - Decimal(cur)


def test_reduce_only_state_keeps_its_own_reason_when_the_stream_is_stalled_too(price: Decimal) -> None:
    v = _check(S.REDUCE_ONLY, cur="0", want="0.010", price=price, stalled=True)
    assert not v.allowed and v.reason == "reduce_only" and not v.alerts


def test_position_cap_clamps_with_an_alert(price: Decimal) -> None:
    want = Decimal("1.000")  # ~93.5k USDT notional on 10k equity: far above 50 %
    v = _check(cur="0", want=want, price=price)
    cap = Decimal("0.5") * EQ / price
    assert v.allowed and v.reason == "clamped"
    assert 0 < v.qty <= cap < v.qty + LOT and v.qty % LOT == 0
    (a,) = v.alerts
    assert a.limit == "max_position" and a.action == "clamped" and a.threshold == 0.5
    assert a.value == pytest.approx(float(want * price / EQ))
    assert Decimal(a.detail["desired_qty"]) == want  # type: ignore[arg-type]


def test_position_cap_clamps_a_short_toward_zero(price: Decimal) -> None:
    v = _check(cur="0.010", want="-1", price=price)
    cap = Decimal("0.5") * EQ / price
    after = Decimal("0.010") + v.qty
    assert after < 0 and abs(after) <= cap < abs(after) + LOT
    assert v.alerts[0].limit == "max_position"


def test_leverage_cap_when_it_is_the_tighter_limit(price: Decimal) -> None:
    limits = RiskLimits(max_position_frac=5.0, max_leverage=2.0)
    v = _check(cur="0", want="1.000", price=price, limits=limits)
    (a,) = v.alerts
    assert a.limit == "max_leverage" and a.threshold == 2.0
    assert v.qty * price <= 2 * EQ < (v.qty + LOT) * price


def test_shrinking_is_never_capped(price: Decimal) -> None:
    # An oversized position (e.g. after equity fell) may always be reduced, even if still above the cap.
    v = _check(cur="1.000", want="0.900", price=price)
    assert v.allowed and v.qty == Decimal("-0.100") and v.alerts == ()


def test_already_at_cap_is_no_order(price: Decimal) -> None:
    cap_qty = target_qty(1.0, EQ, price, LIM, LOT)
    v = _check(cur=cap_qty, want=Decimal("5"), price=price)
    assert (v.qty, v.allowed, v.reason) == (0, False, "at_cap")
    assert v.alerts and v.alerts[0].limit == "max_position"


def test_order_rate_limit(price: Decimal) -> None:
    assert _check(cur="0", want="0.01", price=price, orders=9).allowed
    v = _check(cur="0", want="0.01", price=price, orders=10)
    assert (v.qty, v.allowed, v.reason) == (0, False, "order_rate")
    (a,) = v.alerts
    assert (a.limit, a.value, a.threshold, a.action) == ("max_orders_per_minute", 10.0, 10.0, "rejected")


def test_no_equity_only_allows_reducing(price: Decimal) -> None:
    v = _check(cur="0", want="0.01", price=price, equity=Decimal("-1"))
    assert not v.allowed and v.reason == "no_equity"
    # Without equity an ACTIVE engine closes the whole position rather than keep any risk ...
    v = _check(cur="0.02", want="0.01", price=price, equity=Decimal("0"))
    assert v.allowed and v.qty == Decimal("-0.02")
    # ... while REDUCE_ONLY trades exactly the requested reduction.
    v = _check(S.REDUCE_ONLY, cur="0.02", want="0.01", price=price, equity=Decimal("0"))
    assert v.allowed and v.qty == Decimal("-0.01")


def test_rebalance_band_skips_small_same_side_resizes() -> None:
    """Equity and price drift every bar; a constant target must not re-trade every bar (fees for nothing)."""
    limits = RiskLimits(max_position_frac=0.5, rebalance_band=0.1)
    common = dict(state=S.ACTIVE, equity=Decimal("10000"), price=Decimal("100"), limits=limits, lot=Decimal("0.001"),
                  data_age_ms=0, bar_ms=300_000, orders_last_minute=0, now_ms=1)
    # max position = 5000 notional = 50 units; the band is 10 % of it = 5 units
    small = check_order(current_qty=Decimal("48"), desired_qty=Decimal("50"), **common)  # type: ignore[arg-type]
    assert (small.allowed, small.reason, small.qty) == (False, "within_rebalance_band", 0)
    big = check_order(current_qty=Decimal("44"), desired_qty=Decimal("50"), **common)  # type: ignore[arg-type]
    assert big.allowed and big.qty == Decimal("6")
    # closing or flipping is never held back by the band
    close = check_order(current_qty=Decimal("2"), desired_qty=Decimal("0"), **common)  # type: ignore[arg-type]
    assert close.allowed and close.qty == Decimal("-2")
    flip = check_order(current_qty=Decimal("2"), desired_qty=Decimal("-2"), **common)  # type: ignore[arg-type]
    assert flip.allowed and flip.qty == Decimal("-4")
    off = check_order(current_qty=Decimal("48"), desired_qty=Decimal("50"),  # type: ignore[arg-type]
                      **{**common, "limits": RiskLimits(max_position_frac=0.5, rebalance_band=0.0)})
    assert off.allowed and off.qty == Decimal("2")
