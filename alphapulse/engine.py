"""One step of the pipeline for one candle: the code the daemon, the backtester and training share.

``Engine.step`` is synchronous and does no I/O: fills of pending orders at this candle's open, funding (paper
accounts), mark to market, the trading-state machine, features, policy, risk and order submission.

Three things come from the model (its metadata, through :mod:`alphapulse.builder`) and are honoured here, so
every driver gets them the same way:

* the **feature set** (``short_v1``, ``trend_v1``): the engine builds the set's observation from the market
  vector its :class:`FeatureSource` returns;
* the **decision cadence** (:class:`Cadence`): on a bar that is not a decision time the engine still fills,
  books funding, marks, runs the state machine (daily loss, drawdown halt, flatten on halt) - but asks no
  policy and records *no* decision, so ``ai_decisions.json`` stays one line per decision;
* **volatility targeting** (``RiskLimits.target_vol``): the realised volatility is the feature set's own
  volatility feature (``vol_30d``) after this candle - one definition, the one the policy sees.

**Funding**: with a :class:`~alphapulse.funding.FundingSchedule` the engine books, for every funding time in
``(open, close]`` of a candle, ``-funding_payment(position, close, rate)`` as a ``Side.FUNDING`` cash-flow fill
through :meth:`book_fills` (the position is the one held during the bar, after this candle's open fills); a
funding time in a hole of the data, ``(previous close, open]``, is paid on the position held through the hole
(before this candle's fills) at this candle's open.  Only
a paper account gets a schedule: a live exchange books its own funding (the WEEX broker reports it).  It returns a
:class:`StepResult` that the driver persists (SQLite, operator files) *before* acting on it further, so
a crash between candles loses nothing that was acknowledged.  Operator actions (emergency stop, flatten,
maintenance, resume) are methods here too, so they follow the same rules in every driver.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

__all__ = ["Cadence", "DecisionPolicy", "Engine", "EngineConfig", "StateConflict", "StepResult"]

from alphapulse.costs import funding_payment
from alphapulse.domain import (
    Candle,
    Decision,
    DecisionRecord,
    Fill,
    Incident,
    Order,
    RiskAlert,
    RiskLimits,
    Side,
    StateConflict,
    StepResult,
    TradingState,
)
from alphapulse.execution import Broker
from alphapulse.features import FeatureSet, FeatureSource, feature_set, position_fractions
from alphapulse.funding import FundingSchedule
from alphapulse.portfolio import Portfolio
from alphapulse.reconcile import Resolution
from alphapulse.risk import ORDER_WINDOW_MS, check_order, next_state, resume_state, target_qty


class DecisionPolicy(Protocol):
    def decide(self, obs: Sequence[float], candle_ts: int, symbol: str) -> Decision: ...


@dataclass(frozen=True)
class Cadence:
    """When the policy is asked: every ``every_bars`` bars, on the bars whose *close* is ``hour_utc`` o'clock
    UTC plus a multiple of ``every_bars`` bars (``hour_utc`` None: multiples counted from the epoch).

    ``Cadence()`` (every bar) is what every model without cadence metadata gets.  ``Cadence(24, 0)`` on 1h bars
    decides on the candle that closes at 00:00 UTC, once a day.
    """

    every_bars: int = 1
    hour_utc: int | None = None

    def __post_init__(self) -> None:
        if self.every_bars < 1:
            raise ValueError(f"decision_every_bars must be >= 1, got {self.every_bars}")
        if self.hour_utc is not None and not 0 <= self.hour_utc < 24:
            raise ValueError(f"decision_hour_utc must be in 0..23, got {self.hour_utc}")

    @property
    def every_bar(self) -> bool:
        return self.every_bars == 1 and self.hour_utc is None

    def is_decision_time(self, candle_ts: int, bar_ms: int) -> bool:
        if self.every_bar:
            return True
        offset = 0 if self.hour_utc is None else self.hour_utc * 3_600_000
        return (candle_ts + bar_ms - offset) % (self.every_bars * bar_ms) == 0


EVERY_BAR = Cadence()


@dataclass(frozen=True)
class EngineConfig:
    symbol: str
    bar_ms: int
    lot_size: Decimal
    confidence_threshold: float
    limits: RiskLimits


def _default_feature_set() -> FeatureSet:
    return feature_set(None)


class Engine:
    def __init__(
        self,
        cfg: EngineConfig,
        policy: DecisionPolicy,
        broker: Broker,
        portfolio: Portfolio,
        state: TradingState = TradingState.ACTIVE,
        features: FeatureSource | None = None,
        last_candle_ts: int | None = None,
        *,
        feature_set: FeatureSet | None = None,
        cadence: Cadence = EVERY_BAR,
        funding: FundingSchedule | None = None,
    ) -> None:
        self.cfg = cfg
        self.policy = policy
        self.broker = broker
        self.portfolio = portfolio
        self.state = state
        self.feature_set = feature_set if feature_set is not None else _default_feature_set()
        self.features = features if features is not None else self.feature_set.streaming()
        self.cadence = cadence
        self.funding = funding
        self._vol_index = self.feature_set.vol_index
        if cfg.limits.target_vol > 0 and self._vol_index is None:
            raise ValueError(f"volatility targeting (target_vol_pct) needs a feature set with a volatility feature; "
                             f"{self.feature_set.name} has none")
        self.realized_vol: float | None = None  # the feature set's volatility after the last candle
        self.last_candle_ts = last_candle_ts
        self.state_reason = ""
        self._order_times: deque[int] = deque(maxlen=max(1, cfg.limits.max_orders_per_minute))
        self.decisions = 0
        self.orders_sent = 0
        self._price = Decimal(0)

    # ---- helpers ----------------------------------------------------------------------------
    def _orders_last_minute(self, now_ms: int) -> int:
        """Orders in the rate window; expired times are dropped (times only grow, so the oldest go first)."""
        times = self._order_times
        while times and now_ms - times[0] >= ORDER_WINDOW_MS:
            times.popleft()
        return len(times)

    def _set_state(self, new: TradingState, reason: str, res: StepResult, now_ms: int) -> None:
        if new is self.state:
            return
        old, self.state, self.state_reason = self.state, new, reason
        res.state_changed = True
        if new in (TradingState.HALTED, TradingState.EMERGENCY_STOP, TradingState.REDUCE_ONLY) or old in (
            TradingState.HALTED,
            TradingState.EMERGENCY_STOP,
        ):
            res.incidents.append(Incident(now_ms, new.value, {
                "from": old.value, "reason": reason, "equity": str(self.portfolio.equity),
                "drawdown": round(self.portfolio.drawdown, 6), "daily_loss": round(self.portfolio.daily_loss, 6),
                "market_time_ms": self.last_candle_ts,
            }))

    def close_position_order(self, tag: str, now_ms: int) -> Order | None:
        """A reduce-only market order that closes the whole position (None when flat)."""
        qty = self.portfolio.position.qty
        if qty == 0:
            return None
        ref = self.last_candle_ts if self.last_candle_ts is not None else now_ms
        side = Side.SELL if qty > 0 else Side.BUY
        return Order(f"ap-{ref}-{tag}", self.cfg.symbol, side, abs(qty), True, now_ms, tag)

    def position_features(self, equity: Decimal | None = None) -> tuple[float, float]:
        """(position as a fraction of the maximum position, unrealized PnL as a fraction of equity)."""
        pf = self.portfolio
        eq = float(pf.equity if equity is None else equity)
        qty = pf.position.qty
        if qty == 0:
            return 0.0, 0.0  # position_fractions(0, max, 0, equity), without the arithmetic
        return position_fractions(float(qty * pf.mark_price), eq * self.cfg.limits.max_position_frac,
                                  float(pf.unrealized_pnl), eq)

    def snapshot(self) -> dict[str, Any]:
        """Everything a restart needs, as the store persists it with every step."""
        return {
            "portfolio": self.portfolio.snapshot(),
            "trading_state": self.state.value,
            "state_reason": self.state_reason,
            "last_candle_ts": self.last_candle_ts,
            "equity": str(self.portfolio.equity),
        }

    # ---- the per-candle step ----------------------------------------------------------------
    def is_decision_time(self, candle_ts: int) -> bool:
        """True when the policy is asked at this candle's close (the model's cadence)."""
        return self.cadence.is_decision_time(candle_ts, self.cfg.bar_ms)

    def step(self, candle: Candle, now_ms: int | None = None, stream_stalled: bool = False) -> StepResult:
        """Process one validated candle; ``now_ms`` is the driver's clock (None: the candle's close time);
        ``stream_stalled``: the live feed's stream is silent, so the risk checks allow no new risk."""
        res, obs = self.observe(candle)
        if obs is not None and self.cadence.is_decision_time(candle.ts, self.cfg.bar_ms):
            decision = self.policy.decide(obs, candle.ts, self.cfg.symbol)
            self.act(res, decision, candle, now_ms, stream_stalled)
        return res

    def book_funding(self, res: StepResult, t0: int, t1: int, price: Decimal) -> None:
        """Book the funding events in ``(t0, t1]`` on the position held now, at ``price``."""
        assert self.funding is not None
        qty = self.portfolio.position.qty
        if qty == 0 or t1 <= t0:
            return
        events = self.funding.events_between(t0, t1)
        if events:
            self.book_fills(res, [
                Fill(f"funding-{e.ts}", self.cfg.symbol, Side.FUNDING, Decimal(0), price, Decimal(0), e.ts,
                     -funding_payment(qty, price, e.rate))
                for e in events])

    def observe(self, candle: Candle) -> tuple[StepResult, list[float] | None]:
        """First half of a step: fills at this candle's open, mark to market, state machine, features.

        Returns the step's record so far and the observation (None while the features warm up).  The
        training environment calls this and :meth:`act` directly, with the agent choosing in between.
        """
        cfg, pf = self.cfg, self.portfolio
        close_ms = candle.ts + cfg.bar_ms
        res = StepResult(candle.ts)
        funding = self.funding
        if funding is not None and self.last_candle_ts is not None:
            # funding times in a hole of the data (none when bars are contiguous): the position held through
            # the hole is the one before this candle's fills, valued at the first price after it
            self.book_funding(res, self.last_candle_ts + cfg.bar_ms, candle.ts, Decimal(repr(candle.open)))
        fills = self.broker.on_candle(candle)
        if fills:
            self.book_fills(res, fills)
        self._price = Decimal(repr(candle.close))
        if funding is not None:  # the position held during this bar pays the funding times inside it
            self.book_funding(res, candle.ts, close_ms, self._price)
        rolled = pf.mark(self._price, close_ms)
        self.last_candle_ts = candle.ts

        equity = pf.equity
        daily_loss, drawdown = pf.loss_fractions(equity)
        new_state, alerts = next_state(self.state, daily_loss=daily_loss, drawdown=drawdown, day_rolled=rolled,
                                       limits=cfg.limits, now_ms=close_ms)
        if new_state is not self.state:
            res.alerts.extend(alerts)
            was = self.state
            self._set_state(new_state, alerts[0].limit if alerts else "new_utc_day", res, close_ms)
            if new_state is TradingState.HALTED and was is not TradingState.HALTED and cfg.limits.flatten_on_halt:
                order = self.close_position_order("halt", close_ms)
                if order is not None and self.broker.submit(order):
                    res.orders.append(order)
                    self.orders_sent += 1

        market = self.features.update(candle)
        if market is None:
            return res, None
        if self._vol_index is not None:
            self.realized_vol = market[self._vol_index]
        if res.orders:  # a halt just queued a close; equity is unchanged until it fills
            equity = pf.equity
        pos_frac, upnl_frac = self.position_features(equity) if pf.position.qty else (0.0, 0.0)
        return res, self.feature_set.observation(market, pos_frac, upnl_frac)

    def act(self, res: StepResult, decision: Decision, candle: Candle, now_ms: int | None = None,
            stream_stalled: bool = False) -> None:
        """Second half of a step: confidence threshold, risk checks and the order, recorded into ``res``."""
        cfg, pf = self.cfg, self.portfolio
        close_ms = candle.ts + cfg.bar_ms
        now = close_ms if now_ms is None else now_ms
        price = self._price
        self.decisions += 1
        order_id = None
        if decision.confidence < cfg.confidence_threshold:
            allowed, reason = False, "below_confidence_threshold"
        elif self.broker.open_orders():
            # An order still on its way (a slow or failing exchange): sizing against the position without it
            # would order the same delta again each bar and overshoot every limit once they all fill.
            allowed, reason = False, "order_pending"
        else:
            current = pf.position.qty
            desired = target_qty(decision.target, pf.equity, price, cfg.limits, cfg.lot_size, self.realized_vol)
            verdict = check_order(
                state=self.state, current_qty=current, desired_qty=desired, equity=pf.equity, price=price,
                limits=cfg.limits, lot=cfg.lot_size, data_age_ms=now - close_ms, bar_ms=cfg.bar_ms,
                orders_last_minute=self._orders_last_minute(now), now_ms=now, stream_stalled=stream_stalled,
            )
            res.alerts.extend(verdict.alerts)
            allowed, reason = verdict.allowed, verdict.reason
            if verdict.allowed:
                delta = verdict.qty
                reduce_only = abs(current + delta) < abs(current) and (current + delta == 0 or
                                                                      (current + delta > 0) == (current > 0))
                order = Order(f"ap-{candle.ts}-p", cfg.symbol, Side.BUY if delta > 0 else Side.SELL, abs(delta),
                              reduce_only, now, "policy")
                if self.broker.submit(order):
                    res.orders.append(order)
                    self._order_times.append(now)
                    self.orders_sent += 1
                    order_id = order.client_order_id
                else:
                    allowed, reason = False, "duplicate_order"
        res.decision = DecisionRecord(decision, allowed, reason, order_id, now)

    def book_fills(self, res: StepResult, fills: Sequence[Fill]) -> None:
        """Book fills into the portfolio and record them (as booked, with realized PnL) into ``res``.

        The one place a fill reaches the accounts, whether the paper broker made it at a candle's open or an
        exchange reported it between candles.
        """
        apply = self.portfolio.apply_fill
        res.fills.extend(apply(f) for f in fills)

    def close_out(self, ts_ms: int, price: float, tag: str) -> StepResult:
        """Close the whole position at ``price`` now, with the broker's costs, and book it (end of a backtest).

        Goes through the same order, broker and booking path as any other close, so the final trade pays the
        same fee and slippage as every other; only the price is given instead of the next candle's open.
        """
        res = StepResult(None)
        order = self.close_position_order(tag, ts_ms)
        if order is not None and self.broker.submit(order):
            res.orders.append(order)
            self.orders_sent += 1
            self.book_fills(res, self.broker.on_candle(Candle(ts_ms, price, price, price, price, 0.0)))
        return res

    def apply_reconciliation(self, resolution: Resolution, now_ms: int) -> StepResult:
        """Apply what :func:`alphapulse.reconcile.reconcile` decided: alerts, the exchange's position and
        balance adopted, and a halt when something the daemon did not make is on the account."""
        res = StepResult(None)
        for m in resolution.mismatches:
            res.alerts.append(RiskAlert(now_ms, f"reconciliation_{m.kind}", 1.0, 0.0, m.action, m.as_detail()))
        if resolution.adopt_position is not None:
            qty, entry = resolution.adopt_position
            self.portfolio.adopt_position(qty, entry)
        if resolution.balance_adjustment:
            self.book_fills(res, [Fill(f"reconcile-{now_ms}", self.cfg.symbol, Side.ADJUSTMENT, Decimal(0),
                                       Decimal(0), Decimal(0), now_ms, resolution.balance_adjustment)])
        if resolution.halt:
            self._set_state(TradingState.HALTED, "reconciliation_mismatch", res, now_ms)
        if resolution.mismatches:
            res.incidents.append(Incident(now_ms, "RECONCILIATION", {
                "mismatches": [m.as_detail() for m in resolution.mismatches], "halted": resolution.halt,
                "state": self.state.value}))
        res.state_changed = bool(resolution.mismatches)
        return res

    # ---- operator actions -------------------------------------------------------------------
    def emergency_stop(self, now_ms: int, reason: str = "operator") -> StepResult:
        res = StepResult(None)
        res.cancelled.extend(self.broker.cancel_all())
        if self.state is not TradingState.EMERGENCY_STOP:
            self._set_state(TradingState.EMERGENCY_STOP, reason, res, now_ms)
        res.state_changed = True
        return res

    def flatten(self, now_ms: int) -> StepResult:
        """Reduce-only market close of the whole position; allowed in every state (it only removes risk)."""
        res = StepResult(None)
        pending = [o for o in self.broker.open_orders() if o.reason == "flatten"]
        if pending:  # idempotent: a flatten already waits for the next price
            order: Order | None = pending[0]
        else:
            res.cancelled.extend(self.broker.cancel_all())
            order = self.close_position_order("flatten", now_ms)
            if order is not None and self.broker.submit(order):
                res.orders.append(order)
                self.orders_sent += 1
        res.incidents.append(Incident(now_ms, "FLATTEN", {
            "position_qty": str(self.portfolio.position.qty), "order_id": order.client_order_id if order else None,
            "state": self.state.value}))
        return res

    def maintenance(self, now_ms: int) -> StepResult:
        res = StepResult(None)
        if self.state in (TradingState.EMERGENCY_STOP, TradingState.HALTED):
            raise StateConflict(f"cannot enter maintenance from {self.state.value}; resume first")
        self._set_state(TradingState.MAINTENANCE, "operator", res, now_ms)
        res.incidents.append(Incident(now_ms, "MAINTENANCE", {"reason": "operator"}))
        return res

    def resume(self, now_ms: int) -> StepResult:
        res = StepResult(None)
        was = self.state
        if was is TradingState.HALTED:
            self.portfolio.reset_peak()  # otherwise the same drawdown would halt again at once
        new = resume_state(daily_loss=self.portfolio.daily_loss, limits=self.cfg.limits)
        self._set_state(new, "operator_resume", res, now_ms)
        res.incidents.append(Incident(now_ms, "RESUME", {"from": was.value, "to": new.value}))
        return res
