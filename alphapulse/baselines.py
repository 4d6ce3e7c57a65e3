"""Simple strategies the policy must beat, as policies of the same contract.

They run through the same engine as the policy (same candles, costs, position sizing and risk limits), so
a comparison is about the decisions alone.  All trade the same account: a target of +1 is the maximum
position (``max_position_pct`` of equity), as for the policy.
"""

from __future__ import annotations

from collections.abc import Sequence

from alphapulse.domain import Decision
from alphapulse.features import FEATURE_NAMES
from alphapulse.policy import ACTION_TARGETS, decision_for_action

_MOM_FAST = FEATURE_NAMES.index("mom_12")
_MOM_SLOW = FEATURE_NAMES.index("mom_48")


def _decision(target: float, candle_ts: int, symbol: str) -> Decision:
    return decision_for_action(ACTION_TARGETS.index(target), candle_ts, symbol)


class ConstantTarget:
    """Always the same target: +1 is buy-and-hold (from the first decision), 0 is always flat."""

    def __init__(self, target: float) -> None:
        self.target = target

    def decide(self, obs: Sequence[float], candle_ts: int, symbol: str) -> Decision:
        return _decision(self.target, candle_ts, symbol)


class SmaCrossover:
    """Long when the 12-bar SMA of closes is above the 48-bar SMA, short otherwise.

    Computed from the observation itself: ``mom_n = close / SMA_n - 1``, so SMA_12 > SMA_48 exactly when
    ``mom_48 > mom_12``; no second implementation of the averages.
    """

    def decide(self, obs: Sequence[float], candle_ts: int, symbol: str) -> Decision:
        return _decision(1.0 if obs[_MOM_SLOW] > obs[_MOM_FAST] else -1.0, candle_ts, symbol)


def baselines() -> dict[str, ConstantTarget | SmaCrossover]:
    return {"buy_and_hold": ConstantTarget(1.0), "flat": ConstantTarget(0.0), "sma_crossover": SmaCrossover()}
