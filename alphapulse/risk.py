"""Risk limits and the trading-state machine, as pure functions of the portfolio and the decision.

The daemon, the backtester and the training environment call these same functions, so a limit is
defined exactly once.  Nothing here does I/O: breaches come back as :class:`RiskAlert` values that the
engine logs as ``RISK_LIMIT_EXCEEDED`` and appends to ``risk_alerts.json``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal

from alphapulse.domain import RiskAlert, RiskLimits, TradingState

ZERO = Decimal(0)
ORDER_WINDOW_MS = 60_000


@functools.lru_cache(maxsize=1024)
def _dec(x: float) -> Decimal:
    """Exact decimal of a float's shortest repr; cached because the same limits convert on every order check."""
    return Decimal(repr(x))

# States in which the policy may not open or change risk at all.
BLOCKING_STATES = frozenset({TradingState.HALTED, TradingState.MAINTENANCE, TradingState.EMERGENCY_STOP})


@dataclass(frozen=True, slots=True)
class Verdict:
    """Outcome of :func:`check_order`: the signed quantity to trade (0 for none) and why."""

    qty: Decimal
    allowed: bool
    reason: str
    alerts: tuple[RiskAlert, ...] = ()


# The alert-free rejections, built once: almost every candle ends in one of them (mostly "at_target"), and a
# frozen dataclass costs ~0.4 µs to construct.  Verdicts are immutable, so sharing them is safe.
_REJECT: dict[str, Verdict] = {
    r: Verdict(ZERO, False, r)
    for r in ("at_target", "within_rebalance_band", "reduce_only", "no_equity",
              *(f"state_{s.value.lower()}" for s in BLOCKING_STATES))
}


def next_state(
    state: TradingState,
    *,
    daily_loss: float,
    drawdown: float,
    day_rolled: bool,
    limits: RiskLimits,
    now_ms: int,
) -> tuple[TradingState, tuple[RiskAlert, ...]]:
    """Advance the state machine after a mark-to-market.

    ACTIVE -> REDUCE_ONLY on the daily loss limit; REDUCE_ONLY -> ACTIVE at the next UTC day; any state but
    EMERGENCY_STOP -> HALTED on the drawdown limit.  HALTED, MAINTENANCE and EMERGENCY_STOP only leave by
    an operator's resume (see :func:`resume_state`).
    """
    if (state is TradingState.ACTIVE and drawdown < limits.max_drawdown_frac
            and daily_loss < limits.daily_loss_limit_frac):
        return state, ()  # the per-candle common case
    if state is TradingState.EMERGENCY_STOP:
        return state, ()
    if drawdown >= limits.max_drawdown_frac and state is not TradingState.HALTED:
        alert = RiskAlert(now_ms, "max_drawdown", drawdown, limits.max_drawdown_frac, "HALTED",
                          {"previous_state": state.value})
        return TradingState.HALTED, (alert,)
    if state is TradingState.REDUCE_ONLY and day_rolled and daily_loss < limits.daily_loss_limit_frac:
        return TradingState.ACTIVE, ()
    if state is TradingState.ACTIVE and daily_loss >= limits.daily_loss_limit_frac:
        alert = RiskAlert(now_ms, "daily_loss_limit", daily_loss, limits.daily_loss_limit_frac, "REDUCE_ONLY", {})
        return TradingState.REDUCE_ONLY, (alert,)
    return state, ()


def resume_state(*, daily_loss: float, limits: RiskLimits) -> TradingState:
    """The state an operator's resume leads to: the daily loss limit still holds until the next UTC day."""
    return TradingState.REDUCE_ONLY if daily_loss >= limits.daily_loss_limit_frac else TradingState.ACTIVE


def vol_scale(limits: RiskLimits, realized_vol: float | None) -> float:
    """The volatility-targeting factor ``min(target_vol / realized_vol, 1)`` (1 when targeting is off).

    ``realized_vol`` is the annualised volatility the feature set computes from the same candles the policy
    sees (``vol_30d`` of ``trend_v1``); without an estimate (None, NaN, 0) no position is taken.
    """
    tv = limits.target_vol
    if tv <= 0:
        return 1.0
    if realized_vol is None or not realized_vol > 0.0:
        return 0.0
    return min(tv / realized_vol, 1.0)


def target_qty(target_frac: float, equity: Decimal, price: Decimal, limits: RiskLimits, lot: Decimal,
               realized_vol: float | None = None) -> Decimal:
    """Signed quantity for a target position given as a fraction of the maximum position, rounded toward 0.

    With ``limits.target_vol > 0`` the notional is ``target * min(target_vol / realized_vol, 1) * max position``
    (see :func:`vol_scale`); :func:`check_order` still caps it.
    """
    if equity <= 0 or price <= 0 or target_frac == 0:
        return ZERO
    frac = max(-1.0, min(1.0, target_frac))
    if limits.target_vol > 0:
        frac *= vol_scale(limits, realized_vol)
        if frac == 0:
            return ZERO
    lots = (_dec(abs(frac) * limits.max_position_frac) * equity / (price * lot)).to_integral_value(rounding=ROUND_DOWN)
    return (lots * lot).copy_sign(_dec(frac)) if lots else ZERO


def _cap(qty: Decimal, cap: Decimal, lot: Decimal) -> Decimal:
    if abs(qty) <= cap:
        return qty
    return ((cap / lot).to_integral_value(rounding=ROUND_DOWN) * lot).copy_sign(qty)


def check_order(
    *,
    state: TradingState,
    current_qty: Decimal,
    desired_qty: Decimal,
    equity: Decimal,
    price: Decimal,
    limits: RiskLimits,
    lot: Decimal,
    data_age_ms: int,
    bar_ms: int,
    orders_last_minute: int,
    now_ms: int,
    stream_stalled: bool = False,
) -> Verdict:
    """Decide how much of the move from ``current_qty`` to ``desired_qty`` may be traded now.

    ``stream_stalled``: the live market-data stream is silent (its bars come from REST polling meanwhile), so no
    new risk is taken until it is back; reducing a position stays allowed, as in REDUCE_ONLY."""
    if desired_qty == current_qty:
        return _REJECT["at_target"]
    if state in BLOCKING_STATES:
        return _REJECT[f"state_{state.value.lower()}"]
    max_age = limits.max_data_age_bars * bar_ms
    if data_age_ms > max_age:
        alert = RiskAlert(now_ms, "stale_data", data_age_ms / bar_ms, limits.max_data_age_bars, "rejected",
                          {"data_age_ms": data_age_ms})
        return Verdict(ZERO, False, "stale_data", (alert,))
    if (desired_qty != 0 and current_qty != 0 and (desired_qty > 0) == (current_qty > 0) and price > 0
            and abs(desired_qty - current_qty) * price
            < _dec(limits.rebalance_band * limits.max_position_frac) * max(equity, ZERO)):
        # Equity and price drift every bar; chasing them would pay fees for nothing.
        return _REJECT["within_rebalance_band"]
    alerts: list[RiskAlert] = []
    desired = desired_qty
    if state is TradingState.REDUCE_ONLY or stream_stalled:
        # Only shrink |position|, never cross through zero into new risk.
        if current_qty == 0 or (desired != 0 and (desired > 0) != (current_qty > 0)):
            desired = ZERO
        if abs(desired) >= abs(current_qty):
            if state is TradingState.REDUCE_ONLY:
                return _REJECT["reduce_only"]
            alert = RiskAlert(now_ms, "stream_stalled", 1.0, 0.0, "rejected",
                              {"current_qty": str(current_qty), "desired_qty": str(desired_qty)})
            return Verdict(ZERO, False, "stream_stalled", (alert,))
    if equity <= 0:
        desired = ZERO if state is not TradingState.REDUCE_ONLY else desired
        if abs(desired) >= abs(current_qty):
            return _REJECT["no_equity"]
    increasing = abs(desired) > abs(current_qty) or (desired != 0 and current_qty != 0
                                                      and (desired > 0) != (current_qty > 0))
    if increasing and price > 0 and equity > 0:
        pos_cap = _dec(limits.max_position_frac) * equity / price
        lev_cap = _dec(limits.max_leverage) * equity / price
        cap = min(pos_cap, lev_cap)
        if abs(desired) > cap:
            name = "max_position" if pos_cap <= lev_cap else "max_leverage"
            value = float(abs(desired) * price / equity)
            threshold = limits.max_position_frac if name == "max_position" else limits.max_leverage
            alerts.append(RiskAlert(now_ms, name, value, threshold, "clamped",
                                    {"desired_qty": str(desired), "cap_qty": str(cap)}))
            desired = _cap(desired, cap, lot)
    delta = desired - current_qty
    if delta == 0:
        return Verdict(ZERO, False, "at_cap", tuple(alerts))
    if orders_last_minute >= limits.max_orders_per_minute:
        alerts.append(RiskAlert(now_ms, "max_orders_per_minute", float(orders_last_minute),
                                float(limits.max_orders_per_minute), "rejected", {}))
        return Verdict(ZERO, False, "order_rate", tuple(alerts))
    return Verdict(delta, True, "ok" if not alerts else "clamped", tuple(alerts))
