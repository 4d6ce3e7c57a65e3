"""The rule-gated policy: a small network that decides how much of the trend rule's position to hold.

Why this design (docs/research/issue9/REPORT.md): a daily, volatility-targeted tanh blend of 7/30/90-day trend
(:class:`alphapulse.baselines.TsMomentum`) meets the issue's bar on 26 walk-forward pair-folds, while plain PPO
on the same features learns "mostly long" and loses in the falling test year.  So the rule is the *prior* and
an *input*, and the network learns only a bounded scaling of it:

* each day at 00:00 UTC the network sees the ``trend_v1`` market features plus the rule's signal and chooses a
  gate ``k`` in :data:`GATE_SCALES` = {0, 1/2, 1}; the target is ``k * rule_target`` (the rule's own vol-targeted
  position, never more: the drawdown and daily-loss limits the rule keeps hold by construction);
* it is trained on the training days of a fold to maximise the expected next-day return of the gated position
  after fees, slippage and funding, with a KL penalty toward a prior that trusts the rule (``prior_full`` on
  ``k = 1``): it moves away from the rule only where the training data pays for it.  Every gate's outcome is known
  for every training day (the gate does not move the market), so the expected reward is computed exactly over
  the three gates instead of sampled: full-batch, deterministic, seconds on one core.

The exported ONNX graph (:class:`GatedRuleActor`) contains the rule and the network, so the daemon's decision
*is* the network's: ``obs`` (the 13 ``trend_v1`` values) -> gate probabilities -> probability mass on the
nearest of :data:`GRID_TARGETS` (41 targets, steps of 0.05 of the maximum position) for each gate's target.
The engine's argmax and confidence threshold then apply unchanged; the model sizes itself (the rule's
``min(target_vol / vol_30d, 1)`` is in the graph), so it runs with ``risk.target_vol_pct: 0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

import numpy as np
import torch
from torch import nn

from alphapulse.features import TREND_FEATURE_NAMES, TREND_MARKET_FEATURES, FeatureSet
from alphapulse.funding import FundingSchedule

GATE_SCALES: tuple[float, ...] = (0.0, 0.5, 1.0)
GRID_STEP = 0.05
GRID_TARGETS: tuple[float, ...] = tuple(round(-1.0 + i * GRID_STEP, 2) for i in range(41))
GRID_MEANINGS: tuple[str, ...] = tuple(f"target_{t:+.2f}" for t in GRID_TARGETS)
RULE_HORIZONS_DAYS: tuple[int, ...] = (7, 30, 90)
_Z_COLS = tuple(TREND_FEATURE_NAMES.index(f"z_{d}d") for d in (1, 3, 7, 14, 30, 60, 90))
_RATIO_COLS = tuple(i for i, n in enumerate(TREND_FEATURE_NAMES) if n.startswith("vol_ratio_"))
_RULE_COLS = tuple(TREND_FEATURE_NAMES.index(f"z_{d}d") for d in RULE_HORIZONS_DAYS)
_VOL_COL = TREND_FEATURE_NAMES.index("vol_30d")
#: Network inputs: 7 trend z's and 3 log vol ratios (clipped), the rule's signal and its size.  vol_30d itself is
#: left out (BTC ~0.5, SOL ~0.9: not pair-neutral); it enters only through the rule's sizing.
N_INPUTS = len(_Z_COLS) + len(_RATIO_COLS) + 2
_DAY_MS = 86_400_000


@dataclass(frozen=True)
class GateParams:
    """Hyper-parameters of one configuration (training.yaml ``walk_forward.configurations``)."""

    hidden: int = 16
    kl_weight: float = 0.1  # weight of KL(pi || prior) against the expected vol-scaled daily reward
    prior_full: float = 0.8  # prior probability of k = 1 (the rule); the rest split over k = 0 and 1/2
    epochs: int = 300
    learning_rate: float = 0.01
    weight_decay: float = 1e-3
    target_vol: float = 0.10  # the rule's annualised target volatility of equity at |signal| = 1
    max_position_frac: float = 0.5  # risk.max_position_pct / 100 the model is sized for

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.epochs < 1:
            raise ValueError("hidden and epochs must be >= 1")
        if not 0.0 < self.prior_full < 1.0:
            raise ValueError(f"prior_full must be in (0, 1), got {self.prior_full}")
        if self.kl_weight < 0 or self.learning_rate <= 0 or self.weight_decay < 0:
            raise ValueError("kl_weight and weight_decay must be >= 0, learning_rate > 0")
        if not (self.target_vol > 0 and 0 < self.max_position_frac <= 10):
            raise ValueError("target_vol must be > 0 and max_position_frac in (0, 10]")

    @property
    def prior(self) -> tuple[float, float, float]:
        rest = (1.0 - self.prior_full) / 2.0
        return (rest, rest, self.prior_full)


def rule_target_np(market: np.ndarray, params: GateParams) -> np.ndarray:
    """The rule's target (fraction of the maximum position) for rows of ``trend_v1`` market features; equal to
    :meth:`alphapulse.baselines.TsMomentum.target_for` (tested)."""
    s = np.mean(np.tanh(market[:, list(_RULE_COLS)]), axis=1)
    vol = market[:, _VOL_COL]
    scale = np.where(vol > 0, np.minimum(params.target_vol / params.max_position_frac / np.where(vol > 0, vol, 1.0),
                                         1.0), 0.0)
    return np.clip(s * scale, -1.0, 1.0)


class GateNet(nn.Module):
    """obs (13 trend_v1 values) -> logits over :data:`GATE_SCALES`."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(N_INPUTS, hidden), nn.Tanh(), nn.Linear(hidden, len(GATE_SCALES)))

    @staticmethod
    def inputs(obs: torch.Tensor) -> torch.Tensor:
        z = torch.clamp(obs[:, list(_Z_COLS)], -5.0, 5.0) / 2.0
        ratios = torch.clamp(obs[:, list(_RATIO_COLS)], -5.0, 5.0)
        s = torch.tanh(obs[:, list(_RULE_COLS)]).mean(dim=1, keepdim=True)
        return torch.cat([z, ratios, s, torch.abs(s)], dim=1)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(self.inputs(obs))
        return out


class GatedRuleActor(nn.Module):
    """The exported policy: obs [batch, 13] -> probabilities over :data:`GRID_TARGETS` [batch, 41]."""

    scales: torch.Tensor
    grid_index: torch.Tensor

    def __init__(self, gate: GateNet, params: GateParams) -> None:
        super().__init__()
        self.gate = gate
        self.obs_size = len(TREND_FEATURE_NAMES)  # the exporter's input width
        self.tv_over_max = float(params.target_vol / params.max_position_frac)
        self.register_buffer("scales", torch.tensor(GATE_SCALES, dtype=torch.float32))
        self.register_buffer("grid_index", torch.arange(len(GRID_TARGETS), dtype=torch.float32))

    def rule_target(self, obs: torch.Tensor) -> torch.Tensor:
        s = torch.tanh(obs[:, list(_RULE_COLS)]).mean(dim=1)
        vol = obs[:, _VOL_COL]
        scale = torch.clamp(self.tv_over_max / torch.clamp(vol, min=1e-12), max=1.0)
        return torch.clamp(torch.where(vol > 0, s * scale, torch.zeros_like(s)), -1.0, 1.0)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        gate_p = torch.softmax(self.gate(obs), dim=-1)  # [B, 3]
        targets = self.rule_target(obs)[:, None] * self.scales[None, :]  # [B, 3]
        idx = torch.round((targets + 1.0) / GRID_STEP)  # [B, 3] in 0..40
        onehot = (idx[:, :, None] == self.grid_index[None, None, :]).to(gate_p.dtype)  # [B, 3, 41]
        return (gate_p[:, :, None] * onehot).sum(dim=1)

    def gate_probabilities(self, obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out: np.ndarray = torch.softmax(self.gate(torch.as_tensor(obs, dtype=torch.float32)), dim=-1).numpy()
        return out

    def probabilities(self, obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out: np.ndarray = self(torch.as_tensor(np.asarray(obs, dtype=np.float32))).numpy()
        return out


# --------------------------------------------------------------------------------------------
# Daily samples
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DailySamples:
    """One row per decision day of one or more pairs: what every gate would have earned until the next one.

    ``ts``: the deciding candle's open time; ``end_ts``: the time the position is replaced (the open of the bar after
    the next decision), i.e. the last moment the row's outcome depends on - a row belongs to a split only if its
    whole window does.  ``obs``: the 13 trend_v1 values (position features 0: the gate is stateless).
    ``rule``: the rule's target; ``prev_rule``: the rule's target the day before (0 after a gap).  ``ret``: the
    asset's return from fill to replacement; ``funding``: the summed funding rate over that window.
    """

    pair: np.ndarray
    ts: np.ndarray
    end_ts: np.ndarray
    obs: np.ndarray
    rule: np.ndarray
    prev_rule: np.ndarray
    ret: np.ndarray
    funding: np.ndarray

    def __len__(self) -> int:
        return int(self.ts.size)

    def where(self, mask: np.ndarray) -> DailySamples:
        return DailySamples(*(getattr(self, f)[mask] for f in self.__dataclass_fields__))

    def window(self, start_ms: int | None, end_ms: int) -> DailySamples:
        """Rows whose decision is at or after ``start_ms`` and whose whole outcome window ends before ``end_ms``
        (strictly: the exit fill at the open of the bar starting at ``end_ms`` already belongs to the next split)."""
        lo = -(2**62) if start_ms is None else start_ms
        return self.where((self.ts >= lo) & (self.end_ts < end_ms))

    @staticmethod
    def concat(parts: Sequence[DailySamples]) -> DailySamples:
        fields = list(DailySamples.__dataclass_fields__)
        return DailySamples(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields))


def daily_samples(pair: str, cols: dict[str, np.ndarray], fs: FeatureSet, bar_ms: int, params: GateParams,
                  funding: FundingSchedule, decision_hour_utc: int = 0) -> DailySamples:
    """Decision days of one pair's valid candles (features computed causally over the whole series)."""
    feats = fs.batch(cols["open"], cols["high"], cols["low"], cols["close"], cols["volume"])
    ts, op = cols["ts"], cols["open"]
    n = ts.size
    per_day = _DAY_MS // bar_ms
    dec = np.flatnonzero(((ts + bar_ms) % _DAY_MS == decision_hour_utc * 3_600_000)
                         & np.all(np.isfinite(feats), axis=1))
    rule_all = rule_target_np(np.nan_to_num(feats[dec]), params)
    rows: list[int] = []
    prev: list[float] = []
    for j, i in enumerate(dec[:-1]):
        k = dec[j + 1]
        if k + 1 >= n or k - i != per_day or ts[k + 1] - ts[i + 1] != per_day * bar_ms:
            continue  # a hole in the data: no clean one-day outcome
        rows.append(j)
        prev.append(float(rule_all[j - 1]) if j > 0 and dec[j] - dec[j - 1] == per_day else 0.0)
    sel = np.asarray(rows, dtype=np.int64)
    i_dec, i_next = dec[sel], dec[sel + 1]
    fill_ts, exit_ts = ts[i_dec + 1], ts[i_next + 1]
    fund = np.array([float(funding.rate_sum(int(a), int(b))) for a, b in zip(fill_ts, exit_ts, strict=True)])
    obs = np.zeros((sel.size, len(TREND_FEATURE_NAMES)), dtype=np.float32)
    obs[:, : len(TREND_MARKET_FEATURES)] = feats[i_dec]
    return DailySamples(
        pair=np.full(sel.size, pair), ts=ts[i_dec].astype(np.int64), end_ts=exit_ts.astype(np.int64), obs=obs,
        rule=rule_all[sel], prev_rule=np.asarray(prev, dtype=np.float64),
        ret=op[i_next + 1] / op[i_dec + 1] - 1.0, funding=fund,
    )


def gate_rewards(s: DailySamples, params: GateParams, cost: float) -> np.ndarray:
    """[n, 3]: each gate's one-day P&L as a fraction of equity, net of fees+slippage (``cost`` per unit of traded
    notional) and funding, over the target's daily volatility (so a full rule position earns rewards of unit
    scale).  The previous position is taken as the same gate on yesterday's rule target."""
    k = np.asarray(GATE_SCALES)[None, :]
    m = params.max_position_frac
    w, w_prev = s.rule[:, None] * k * m, s.prev_rule[:, None] * k * m
    pnl = w * (s.ret[:, None] - s.funding[:, None]) - cost * np.abs(w - w_prev)
    out: np.ndarray = pnl / (params.target_vol / math.sqrt(365.0))
    return out


def train_gate(train: DailySamples, params: GateParams, seed: int, cost: float) -> GatedRuleActor:
    """Fit the gate on ``train`` (deterministic for a seed: seeded init, full-batch Adam, one thread)."""
    if len(train) == 0:
        raise ValueError("no training days: the fold's training window holds no complete decision day")
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    gate = GateNet(params.hidden)
    obs = torch.as_tensor(train.obs, dtype=torch.float32)
    rewards = torch.as_tensor(gate_rewards(train, params, cost), dtype=torch.float32)
    log_prior = torch.log(torch.tensor(params.prior, dtype=torch.float32))[None, :]
    opt = torch.optim.Adam(gate.parameters(), lr=params.learning_rate, weight_decay=params.weight_decay)
    for _ in range(params.epochs):
        opt.zero_grad()
        logp = torch.log_softmax(gate(obs), dim=-1)
        p = logp.exp()
        expected = (p * rewards).sum(dim=1).mean()
        kl = (p * (logp - log_prior)).sum(dim=1).mean()
        loss = -expected + params.kl_weight * kl
        loss.backward()
        opt.step()
    gate.eval()
    actor = GatedRuleActor(gate, params)
    actor.eval()
    return actor


def cost_per_notional(taker_fee: Decimal, slippage_bps: Decimal) -> float:
    """Fees plus slippage per unit of traded notional (the engine's paper broker charges both)."""
    return float(taker_fee) + float(slippage_bps) / 10_000.0
