"""Gymnasium environment that trades through the daemon's own engine.

A policy trained on a simplified market model (fills at the close, no lot rounding, no risk limits) learns
habits the daemon then punishes: trades that the risk checks reject, positions the lot size cannot hold,
edges that fees eat.  So this environment simulates nothing itself.  Every step is the daemon's step, split
in two around the agent's choice:

1. ``Engine.observe(candle_t)`` - fills of the previous decision at this candle's open (with the configured
   slippage and taker fee, :class:`~alphapulse.execution.paper.PaperBroker`), mark to market, the trading-state
   machine (daily-loss REDUCE_ONLY, drawdown HALT), and the observation;
2. the agent picks an action -> a :class:`~alphapulse.domain.Decision` ->
   ``Engine.act(...)``: confidence threshold, risk checks, lot rounding, the order.

Costs, limits, lot size and initial equity come from :class:`~alphapulse.config.Settings`
(``config/trading_params.yaml``), the same values the daemon runs with.

Features: each segment's market features (the feature set of :attr:`EnvConfig.feature_set`, which must be the
segments' own) are computed once by the set's batch form and replayed through
:class:`~alphapulse.features.PrecomputedFeatures` (the streaming interface the engine calls).  Per candle that
is an index instead of ~10 µs of Python arithmetic, and training makes millions of steps; the batch and
streaming forms agree to 1e-9 (tests/test_features.py, and the env test compares against a streaming engine).
Because a segment's features depend only on earlier candles of that segment, an episode can start anywhere
after the warm-up without replaying it.

Cadence: with ``decision_every_bars``/``decision_hour_utc`` the engine gets the model's :class:`Cadence`; one
env step is one *decision*: the agent decides at a decision bar, then the engine runs the bars up to the next
decision bar without asking (fills, funding, marks, the state machine - exactly what the daemon does between
decisions) and the reward covers the whole interval.

Funding: the engine books the default funding rate (0.01 %/8 h) on the position, as the paper daemon and the
backtester do (``funding=False`` turns it off; pass a :class:`FundingSchedule` for a rate file).

Reward (``EnvConfig.reward``):

* ``"log_return"`` (default): ``log(equity_{t+1} / equity_t)`` - the decision at close *t* fills at the open of
  *t+1*, so this is exactly what the decision earned after costs and funding - minus optional penalties on the
  increase in drawdown and on traded notional;
* ``"vol_scaled"``: the symmetric, cost-aware reward ``(equity_{t+1} - equity_t) / equity_t / sigma_step``:
  the position's return minus the explicit costs (fees, slippage) and funding, which the equity already
  includes, divided by the target volatility over one decision interval (``target_vol * sqrt(interval /
  year)``), so a position at the target volatility earns rewards of about unit scale; a simple return (gains and
  losses weigh the same) and no drawdown term (a drawdown penalty is refused with it).

``terminated`` when the engine HALTs (the drawdown limit: in production nothing trades
until an operator resumes, so it is a true end of the episode); ``truncated`` at the end of the episode's
window or of the segment (the market goes on, so PPO should bootstrap the value there, not treat it as 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np

from alphapulse.builder import build_engine
from alphapulse.config import Settings
from alphapulse.domain import Decision, TradingState, timeframe_ms
from alphapulse.engine import Cadence, Engine, StepResult
from alphapulse.features import PrecomputedFeatures, feature_set
from alphapulse.funding import FundingSchedule
from alphapulse.policy import ACTION_TARGETS, decision_for_action
from alphapulse.training.data import Segment

#: Target positions (fraction of the maximum position) of the discrete actions, in model output order.
FLAT_ACTION = ACTION_TARGETS.index(0.0)
#: Reward for a step that wipes out the account (log of a non-positive ratio is undefined).
RUIN_REWARD = -10.0
REWARDS = ("log_return", "vol_scaled")
_YEAR_MS = 365 * 86_400_000


@dataclass(frozen=True)
class EnvConfig:
    """Episode shape and reward shaping; everything about money comes from :class:`Settings` instead."""

    timeframe: str = "1h"
    episode_length: int | None = 336  # decisions per episode; None: to the end of the segment
    drawdown_penalty: float = 0.0  # per unit of increase in drawdown from peak equity
    turnover_penalty: float = 0.0  # per unit of traded notional / equity
    feature_set: str = "short_v1"  # must match the segments' (training.data.load_dataset(feature_set_name=...))
    decision_every_bars: int = 1  # the cadence the exported model's metadata will carry
    decision_hour_utc: int | None = None
    reward: str = "log_return"  # or "vol_scaled", see the module docstring
    target_vol: float = 0.10  # annualised; the scale of the "vol_scaled" reward

    def __post_init__(self) -> None:
        timeframe_ms(self.timeframe)
        if self.episode_length is not None and self.episode_length < 1:
            raise ValueError(f"episode_length must be >= 1 or None, got {self.episode_length}")
        if self.drawdown_penalty < 0 or self.turnover_penalty < 0:
            raise ValueError("reward penalties must be >= 0")
        feature_set(self.feature_set)  # KeyError naming the known sets
        self.cadence  # noqa: B018 - validates every_bars and hour
        if self.reward not in REWARDS:
            raise ValueError(f"reward must be one of {REWARDS}, got {self.reward!r}")
        if self.reward == "vol_scaled":
            if not self.target_vol > 0:
                raise ValueError(f"target_vol must be > 0 for the vol_scaled reward, got {self.target_vol}")
            if self.drawdown_penalty:
                raise ValueError("the vol_scaled reward has no drawdown term; drawdown_penalty must be 0")

    @property
    def cadence(self) -> Cadence:
        return Cadence(self.decision_every_bars, self.decision_hour_utc)

    @property
    def bars_per_episode(self) -> int | None:
        """Bars an episode spans: ``episode_length`` decisions, ``decision_every_bars`` bars each."""
        return None if self.episode_length is None else self.episode_length * self.decision_every_bars


class _NoPolicy:
    """The engine's own policy is never called: the agent decides between observe() and act()."""

    def decide(self, obs: Sequence[float], candle_ts: int, symbol: str) -> Decision:
        raise RuntimeError("TradingEnv drives Engine.observe/act directly; Engine.step must not be used")


# The agent's discrete action as the daemon's Decision: one-hot probabilities, full confidence.
action_decision = decision_for_action


class TradingEnv(gym.Env[np.ndarray, np.int64]):
    """Episodes over one or more segments (pairs x contiguous runs); see the module docstring.

    ``reset(options={"segment": i, "start": s, "length": n})`` pins an episode (evaluation, tests); without
    options the segment and start are drawn from ``self.np_random`` with every admissible start equally
    likely, so longer segments are sampled proportionally more often.
    """

    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012 - gymnasium's class attribute

    def __init__(self, segments: Sequence[Segment], settings: Settings, cfg: EnvConfig | None = None,
                 funding: FundingSchedule | bool = True) -> None:
        super().__init__()
        self.cfg = cfg or EnvConfig()
        self.settings = settings
        self.bar_ms = timeframe_ms(self.cfg.timeframe)
        self.segments = list(segments)
        if not self.segments:
            raise ValueError("TradingEnv needs at least one segment")
        self.feature_set = feature_set(self.cfg.feature_set)
        wrong = [s.describe() for s in self.segments if s.feature_set_name != self.feature_set.name]
        if wrong:
            raise ValueError(f"segments {wrong[:3]} carry other features than {self.feature_set.name}")
        self.cadence = self.cfg.cadence
        self.funding: FundingSchedule | None = (FundingSchedule() if funding is True else
                                                None if funding is False else funding)
        self._sigma_step = self.cfg.target_vol * math.sqrt(
            self.cfg.decision_every_bars * self.bar_ms / _YEAR_MS)
        self.action_space = gym.spaces.Discrete(len(ACTION_TARGETS))
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(self.feature_set.obs_size,),
                                                dtype=np.float32)
        self._weights = self._start_weights()
        self.engine: Engine | None = None
        self.segment: Segment = self.segments[0]
        self.t = 0  # index in the segment of the candle whose close the agent is deciding at
        self.end = 0  # index of the last candle of the episode (no decision is taken there)
        self.steps = 0
        self._res: StepResult | None = None
        self._equity = 0.0
        self._drawdown = 0.0

    # ---- episode sampling ---------------------------------------------------------------------
    def _length(self, length: int | None) -> int | None:
        """Bars of an episode of ``length`` decisions (the configured length when None)."""
        if length is None:
            return self.cfg.bars_per_episode
        return length * self.cfg.decision_every_bars

    def _start_weights(self) -> np.ndarray:
        n = self.cfg.bars_per_episode or 1
        starts = np.array([max(0, len(s) - n - s.first_obs_index) for s in self.segments], dtype=np.float64)
        if starts.sum() <= 0:
            raise ValueError(f"no segment is long enough for warm-up plus an episode of {n} bars")
        return starts / starts.sum()

    def _sample_start(self) -> tuple[int, int]:
        i = int(self.np_random.choice(len(self.segments), p=self._weights))
        seg = self.segments[i]
        n = self.cfg.bars_per_episode or 1
        hi = len(seg) - n  # exclusive: start + n must still be a candle of the segment
        return i, int(self.np_random.integers(seg.first_obs_index, hi))

    # ---- gymnasium API ------------------------------------------------------------------------
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        opts = options or {}
        if "segment" in opts:
            index = int(opts["segment"])
            seg = self.segments[index]
            start = int(opts.get("start", seg.first_obs_index))
        else:
            index, start = self._sample_start()
            seg = self.segments[index]
        if not seg.first_obs_index <= start < len(seg) - 1:
            raise ValueError(f"start {start} outside [{seg.first_obs_index}, {len(seg) - 1}) for {seg.describe()}")
        length = self._length(opts.get("length"))
        self.segment = seg
        self.end = len(seg) - 1 if length is None else min(start + length, len(seg) - 1)
        self.t = start
        self.steps = 0
        # The engine sees this episode's candles only; rows start..end of the segment's precomputed features.
        features = PrecomputedFeatures(seg.features[start : self.end + 1])
        self.engine = build_engine(self.settings, _NoPolicy(), symbol=seg.symbol, timeframe=self.cfg.timeframe,
                                   features=features, feature_set=self.feature_set, cadence=self.cadence,
                                   funding=self.funding)
        res, obs = self.engine.observe(seg.candle(start))
        if obs is None:  # cannot happen for start >= first_obs_index; guards a broken segment
            raise RuntimeError(f"no observation at bar {start} of {seg.describe()}")
        # the first decision is at the first decision bar of the episode (every bar without a cadence)
        while not self.engine.is_decision_time(int(seg.ts[self.t])) and self.t < self.end - 1:
            self.t += 1
            res, obs = self.engine.observe(seg.candle(self.t))
            if obs is None:
                raise RuntimeError(f"no observation at bar {self.t} of {seg.describe()}")
        self._res = res
        self._equity = float(self.engine.portfolio.equity)
        self._drawdown = self.engine.portfolio.drawdown
        return self._obs(obs), self._info(res, 0.0, 0.0)

    def step(self, action: int | np.integer[Any]) -> tuple[np.ndarray, SupportsFloat, bool, bool, dict[str, Any]]:
        a = int(action)
        if not 0 <= a < len(ACTION_TARGETS):
            raise ValueError(f"action must be in [0, {len(ACTION_TARGETS)}), got {action!r}")
        return self.step_decision(action_decision(a, int(self.segment.ts[self.t]), self.segment.symbol))

    def step_decision(self, decision: Decision) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """One step with a ready-made Decision (evaluation passes the model's real probabilities and
        confidence here, so the engine's confidence threshold applies exactly as in the daemon)."""
        engine, res = self.engine, self._res
        if engine is None or res is None:
            raise RuntimeError("call reset() before step()")
        if self.t >= self.end:
            raise RuntimeError("episode is over; call reset()")
        engine.act(res, decision, self.segment.candle(self.t))
        self.steps += 1
        traded_d = Decimal(0)
        fills = 0
        # to the next decision bar: the bars between are the daemon's too (fills, funding, marks, halts)
        while True:
            self.t += 1
            res, obs = engine.observe(self.segment.candle(self.t))
            if obs is None:
                raise RuntimeError(f"no observation at bar {self.t} of {self.segment.describe()}")
            traded_d += sum((f.qty * f.price for f in res.fills), Decimal(0))
            fills += len(res.fills)
            if (self.t >= self.end or engine.state is TradingState.HALTED
                    or engine.is_decision_time(int(self.segment.ts[self.t]))):
                break
        self._res = res
        pf = engine.portfolio
        equity = float(pf.equity)
        traded = float(traded_d)
        turnover = traded / self._equity if self._equity > 0 else 0.0
        if equity > 0 and self._equity > 0:
            log_ret = math.log(equity / self._equity)
            if self.cfg.reward == "vol_scaled":
                reward = (equity - self._equity) / self._equity / self._sigma_step
            else:
                reward = log_ret
        else:
            log_ret = reward = RUIN_REWARD
        drawdown = pf.drawdown
        reward -= self.cfg.drawdown_penalty * max(0.0, drawdown - self._drawdown)
        reward -= self.cfg.turnover_penalty * turnover
        self._equity, self._drawdown = equity, drawdown
        terminated = engine.state is TradingState.HALTED or equity <= 0
        truncated = not terminated and self.t >= self.end
        info = self._info(res, log_ret, turnover)
        info["fills"] = fills
        return self._obs(obs), float(reward), terminated, truncated, info

    # ---- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _obs(obs: Sequence[float]) -> np.ndarray:
        arr = np.asarray(obs, dtype=np.float32)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"non-finite observation {arr.tolist()}")
        return arr

    def _info(self, res: StepResult, log_ret: float, turnover: float) -> dict[str, Any]:
        assert self.engine is not None
        pf = self.engine.portfolio
        return {
            "pair": self.segment.pair,
            "ts": int(self.segment.ts[self.t]),
            "equity": self._equity,
            "log_return": log_ret,
            "turnover": turnover,
            "fills": len(res.fills),
            "position_qty": float(pf.position.qty),
            "state": self.engine.state.value,
        }
