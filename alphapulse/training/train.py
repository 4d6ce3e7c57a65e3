"""Train the PPO trading policy and export it as the daemon's ONNX model.

Usage::

    .venv/bin/python -m alphapulse.training.train --config quick          # ~1-2 min, committed data
    .venv/bin/python -m alphapulse.training.train --config ppo_1h         # ../shared/data, ~20 min
    .venv/bin/python -m alphapulse.training.train --config production     # the rule-gated policy (walkforward.py)
    ... --out models/my.onnx --seed 7 --timesteps 100000 --data-dir /path/to/candles

What a run does, and why:

1. **Seeds everything** (python, numpy, torch, every env, the action space), one torch thread and
   deterministic algorithms: the same config and seed give the same weights bit for bit on the same
   machine and library versions, so a model can be rebuilt from its metadata.
2. **Loads the data** (:mod:`alphapulse.training.data`): time split with the same cut dates for every pair.
3. **Trains** SB3 PPO (MlpPolicy) on :class:`~alphapulse.training.env.TradingEnv`, which trades through the
   daemon's engine with the fees and limits of ``config/trading_params.yaml``; observations are normalised by
   VecNormalize during training and the final statistics are baked into the exported graph.
4. **Evaluates on the validation split** through the same environment, deterministically, twice: the argmax
   action at full confidence (what the agent was trained to do), and the exported ONNX model through
   :class:`alphapulse.policy.Policy` with the engine's confidence threshold (what the daemon will do).  Both
   go into the model's metadata; the test split is never touched.
5. **Exports** (:mod:`alphapulse.training.export`): ONNX vs PyTorch on real observations, onnx.checker and
   :meth:`Policy.load` must pass, else nothing is written.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import random
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from alphapulse.config import ConfigError, Settings, load_settings
from alphapulse.domain import TIMEFRAME_MS, Decision
from alphapulse.policy import Policy
from alphapulse.training.data import DataError, Dataset, Segment, SplitDates, load_dataset, parse_utc
from alphapulse.training.env import ACTION_TARGETS, EnvConfig, TradingEnv, action_decision
from alphapulse.training.export import (
    ExportActor,
    ExportError,
    actor_from_sb3,
    check_actor_matches_sb3,
    contract_metadata,
    export_policy,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "config" / "training.yaml"
PROFILES = ("quick", "production", "ppo_1h")
#: Observations from random-action rollouts on the training data added to the export check, so that
#: position and PnL features are exercised even if the trained policy never leaves "flat" on validation.
RANDOM_CHECK_STEPS = 512


class TrainingConfigError(Exception):
    """A problem in config/training.yaml or the command line: the run does not start."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PPOParams:
    n_envs: int = 4
    learning_rate: float = 3e-4
    n_steps: int = 512
    batch_size: int = 256
    n_epochs: int = 5
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_range: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    net_arch: tuple[int, ...] = (64, 64)
    clip_obs: float = 10.0


@dataclass(frozen=True)
class TrainingConfig:
    profile: str
    data_dir: Path
    pairs: tuple[str, ...]
    timeframe: str
    file_pattern: str
    max_gap_bars: int
    dates: SplitDates
    episode_length: int
    total_timesteps: int
    seed: int
    trading_config_dir: Path
    output_dir: Path
    drawdown_penalty: float = 0.0
    turnover_penalty: float = 0.0
    ppo: PPOParams = field(default_factory=PPOParams)
    feature_set: str = "short_v1"
    decision_every_bars: int = 1
    decision_hour_utc: int | None = None
    reward: str = "log_return"
    target_vol: float = 0.10

    def env_config(self, episode_length: int | None = -1) -> EnvConfig:
        return EnvConfig(self.timeframe, self.episode_length if episode_length == -1 else episode_length,
                         self.drawdown_penalty, self.turnover_penalty, self.feature_set, self.decision_every_bars,
                         self.decision_hour_utc, self.reward, self.target_vol)


_TOP_KEYS = {"data_dir", "pairs", "timeframe", "file_pattern", "max_gap_bars", "splits", "episode_length",
             "total_timesteps", "seed", "trading_config_dir", "output_dir", "reward", "ppo", "features",
             "cadence"}
_SPLIT_KEYS = {"train_start", "validation_start", "test_start", "test_end"}
_REWARD_KEYS = {"drawdown_penalty", "turnover_penalty", "kind", "target_vol"}
_FEATURE_KEYS = {"feature_set"}
_CADENCE_KEYS = {"decision_every_bars", "decision_hour_utc"}


def _deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def _check_keys(section: str, data: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise TrainingConfigError(f"{section}: must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise TrainingConfigError(f"{section}: unknown key(s) {unknown} (known: {sorted(allowed)})")
    return data


def _number(section: str, key: str, value: Any, typ: type, lo: float | None = None) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (typ is int and not isinstance(value, int)):
        kind = "an integer" if typ is int else "a number"
        raise TrainingConfigError(f"{section}.{key}: must be {kind}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise TrainingConfigError(f"{section}.{key}: must be finite, got {value!r}")
    if lo is not None and value < lo:
        raise TrainingConfigError(f"{section}.{key}: must be >= {lo}, got {value!r}")
    return typ(value)


def _ppo_params(section: str, data: Any) -> PPOParams:
    defaults = PPOParams()
    raw = _check_keys(section, data, set(asdict(defaults)))
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "net_arch":
            if not isinstance(value, list) or not value or not all(isinstance(x, int) and x > 0 for x in value):
                raise TrainingConfigError(f"{section}.net_arch: must be a list of positive integers, got {value!r}")
            values[key] = tuple(value)
        else:
            typ = type(getattr(defaults, key))
            values[key] = _number(section, key, value, typ, 1 if typ is int else 0.0)
    params = replace(defaults, **values)
    if params.batch_size > params.n_envs * params.n_steps:
        raise TrainingConfigError(f"{section}: batch_size {params.batch_size} exceeds n_envs * n_steps")
    return params


def _resolve(root: Path, value: Any, key: str) -> Path:
    if not isinstance(value, str) or not value:
        raise TrainingConfigError(f"{key}: must be a non-empty path string, got {value!r}")
    p = Path(value).expanduser()
    return (p if p.is_absolute() else root / p).resolve()


def load_training_config(profile: str, path: Path = DEFAULT_CONFIG, root: Path = REPO_ROOT) -> TrainingConfig:
    """Profile ``profile`` of ``path`` (``common`` merged with ``profiles.<profile>``), validated strictly."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise TrainingConfigError(f"{path}: cannot read: {exc}") from None
    _check_keys(str(path), doc, {"common", "profiles", "walk_forward"})
    profiles = doc.get("profiles") or {}
    if not isinstance(profiles, dict) or profile not in profiles:
        raise TrainingConfigError(f"{path}: no profile {profile!r} (available: {sorted(profiles)})")
    merged = _deep_merge(doc.get("common") or {}, profiles[profile] or {})
    sec = f"{path.name}:{profile}"
    raw = _check_keys(sec, merged, _TOP_KEYS)
    missing = sorted(_TOP_KEYS - {"reward", "ppo", "file_pattern", "max_gap_bars", "features", "cadence"} - set(raw))
    if missing:
        raise TrainingConfigError(f"{sec}: missing key(s) {missing}")
    timeframe = raw["timeframe"]
    if timeframe not in TIMEFRAME_MS:
        raise TrainingConfigError(f"{sec}.timeframe: unknown timeframe {timeframe!r}")
    pairs = raw["pairs"]
    if not isinstance(pairs, list) or not pairs or not all(isinstance(p, str) and p for p in pairs):
        raise TrainingConfigError(f"{sec}.pairs: must be a non-empty list of pair names, got {pairs!r}")
    splits = _check_keys(f"{sec}.splits", raw["splits"], _SPLIT_KEYS)
    if "validation_start" not in splits or "test_start" not in splits:
        raise TrainingConfigError(f"{sec}.splits: validation_start and test_start are required")
    try:
        dates = SplitDates(
            validation_start=parse_utc(splits["validation_start"]),
            test_start=parse_utc(splits["test_start"]),
            train_start=parse_utc(splits["train_start"]) if splits.get("train_start") else None,
            test_end=parse_utc(splits["test_end"]) if splits.get("test_end") else None,
        )
    except DataError as exc:
        raise TrainingConfigError(f"{sec}.splits: {exc}") from None
    reward = _check_keys(f"{sec}.reward", raw.get("reward") or {}, _REWARD_KEYS)
    features = _check_keys(f"{sec}.features", raw.get("features") or {}, _FEATURE_KEYS)
    cadence = _check_keys(f"{sec}.cadence", raw.get("cadence") or {}, _CADENCE_KEYS)
    hour = cadence.get("decision_hour_utc")
    extra_env = {
        "feature_set": str(features.get("feature_set", "short_v1")),
        "decision_every_bars": _number(f"{sec}.cadence", "decision_every_bars",
                                       cadence.get("decision_every_bars", 1), int, 1),
        "decision_hour_utc": None if hour is None else _number(f"{sec}.cadence", "decision_hour_utc", hour, int, 0),
        "reward": str(reward.get("kind", "log_return")),
        "target_vol": _number(f"{sec}.reward", "target_vol", reward.get("target_vol", 0.10), float, 0.0),
    }
    try:
        EnvConfig(timeframe, 1, reward.get("drawdown_penalty", 0.0), 0.0, **extra_env)
    except (KeyError, ValueError) as exc:
        raise TrainingConfigError(f"{sec}: {exc}") from None
    return TrainingConfig(
        profile=profile,
        data_dir=_resolve(root, raw["data_dir"], f"{sec}.data_dir"),
        pairs=tuple(pairs),
        timeframe=timeframe,
        file_pattern=str(raw.get("file_pattern", "{pair}-{timeframe}.csv.gz")),
        max_gap_bars=_number(sec, "max_gap_bars", raw.get("max_gap_bars", 12), int, 0),
        dates=dates,
        episode_length=_number(sec, "episode_length", raw["episode_length"], int, 1),
        total_timesteps=_number(sec, "total_timesteps", raw["total_timesteps"], int, 1),
        seed=_number(sec, "seed", raw["seed"], int, 0),
        trading_config_dir=_resolve(root, raw["trading_config_dir"], f"{sec}.trading_config_dir"),
        output_dir=_resolve(root, raw["output_dir"], f"{sec}.output_dir"),
        drawdown_penalty=_number(f"{sec}.reward", "drawdown_penalty", reward.get("drawdown_penalty", 0.0), float, 0.0),
        turnover_penalty=_number(f"{sec}.reward", "turnover_penalty", reward.get("turnover_penalty", 0.0), float, 0.0),
        ppo=_ppo_params(f"{sec}.ppo", raw.get("ppo") or {}),
        **extra_env,
    )


def trading_settings(cfg: TrainingConfig) -> Settings:
    """The daemon's trading parameters (fees, slippage, limits, lot size, equity) from trading_params.yaml.

    The process environment is deliberately not consulted: it configures the *service* (ports, paths, mode),
    none of which applies to training, and a daemon's TRADING_MODE=live must not stop a training run.
    """
    if not cfg.trading_config_dir.is_dir():
        raise TrainingConfigError(f"trading_config_dir is not a directory: {cfg.trading_config_dir}")
    try:
        return load_settings(cfg.trading_config_dir, env={})
    except ConfigError as exc:
        raise TrainingConfigError(str(exc)) from None


# --------------------------------------------------------------------------------------------
# Determinism, progress
# --------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed python/numpy/torch, one intra-op thread, deterministic kernels (warn, not fail, where none exist)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)


class _ProgressBar(BaseCallback):
    """Plain-tqdm progress bar (SB3's own ``progress_bar=True`` needs ``rich`` as well)."""

    def __init__(self) -> None:
        super().__init__()
        self._bar: Any = None

    def _on_training_start(self) -> None:
        from tqdm import tqdm

        total = int(self.locals["total_timesteps"]) - int(self.model.num_timesteps)
        self._bar = tqdm(total=total, unit="step", desc="training", dynamic_ncols=True, file=sys.stderr,
                         mininterval=0.5 if sys.stderr.isatty() else 10.0)

    def _on_step(self) -> bool:
        if self._bar is not None:
            self._bar.update(self.training_env.num_envs)
        return True

    def _on_training_end(self) -> None:
        if self._bar is not None:
            self._bar.close()


def code_revision(root: Path = REPO_ROOT) -> str:
    """``git rev-parse HEAD`` (+ ``-dirty`` with uncommitted changes), or ``unknown`` outside a checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}-dirty" if head and dirty else head or "unknown"


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

DecideFn = Callable[[np.ndarray, int, str], Decision]


def annualisation(timeframe: str) -> float:
    return math.sqrt(365.0 * 86_400_000 / TIMEFRAME_MS[timeframe])


def _max_drawdown(log_returns: np.ndarray) -> float:
    if log_returns.size == 0:
        return 0.0
    curve = np.exp(np.concatenate(([0.0], np.cumsum(log_returns))))
    return float(np.max(1.0 - curve / np.maximum.accumulate(curve)))


def evaluate(segments: Sequence[Segment], settings: Settings, env_cfg: EnvConfig, decide: DecideFn,
             collect_obs: list[np.ndarray] | None = None) -> dict[str, Any]:
    """Run ``decide`` over every segment from its first complete bar to its end, through the env.

    Per pair: total return (compounded over its segments, each starting from the initial equity), annualised
    Sharpe of the per-bar log returns, max drawdown, fills, time in market, whether the engine halted, and
    buy-and-hold over the same bars for context.  ``collect_obs`` receives every observation seen.
    """
    env = TradingEnv(segments, settings, replace(env_cfg, episode_length=None))
    per_pair: dict[str, dict[str, Any]] = {}
    rets: dict[str, list[float]] = {}
    for i, seg in enumerate(segments):
        obs, _ = env.reset(options={"segment": i, "start": seg.first_obs_index, "length": None})
        pair = per_pair.setdefault(seg.pair, {"bars": 0, "fills": 0, "bars_in_market": 0, "halted": False,
                                              "buy_hold_log": 0.0})
        pair_rets = rets.setdefault(seg.pair, [])
        done = False
        while not done:
            if collect_obs is not None:
                collect_obs.append(obs)
            decision = decide(obs, int(seg.ts[env.t]), seg.symbol)
            obs, _r, terminated, truncated, info = env.step_decision(decision)
            done = terminated or truncated
            pair_rets.append(float(info["log_return"]))
            pair["bars"] += 1
            pair["fills"] += int(info["fills"])
            pair["bars_in_market"] += int(info["position_qty"] != 0.0)
            pair["halted"] = pair["halted"] or info["state"] == "HALTED"
        pair["buy_hold_log"] += math.log(float(seg.close[-1]) / float(seg.close[seg.first_obs_index]))
    ann = annualisation(env_cfg.timeframe)
    out: dict[str, Any] = {}
    for name, p in per_pair.items():
        r = np.asarray(rets[name])
        std = float(r.std())
        out[name] = {
            "bars": p["bars"],
            "total_return": round(math.expm1(float(r.sum())), 6),
            "sharpe": round(float(r.mean()) / std * ann, 4) if std > 0 else 0.0,
            "max_drawdown": round(_max_drawdown(r), 6),
            "fills": p["fills"],
            "time_in_market": round(p["bars_in_market"] / max(1, p["bars"]), 4),
            "halted": p["halted"],
            "buy_hold_return": round(math.expm1(p["buy_hold_log"]), 6),
        }
    return {
        "mean_total_return": round(float(np.mean([v["total_return"] for v in out.values()])), 6),
        "mean_sharpe": round(float(np.mean([v["sharpe"] for v in out.values()])), 4),
        "pairs": out,
    }


def argmax_decider(actor: ExportActor) -> DecideFn:
    """The trained agent's deterministic action at full confidence (as during training)."""

    def decide(obs: np.ndarray, ts: int, symbol: str) -> Decision:
        probs = actor.probabilities(obs[None, :])[0]
        return action_decision(int(np.argmax(probs)), ts, symbol)

    return decide


def policy_decider(policy: Policy) -> DecideFn:
    """The daemon's decision path: the ONNX model through Policy.decide (the engine applies the threshold)."""

    def decide(obs: np.ndarray, ts: int, symbol: str) -> Decision:
        return policy.decide(obs.tolist(), ts, symbol)

    return decide


def random_rollout_obs(segments: Sequence[Segment], settings: Settings, env_cfg: EnvConfig, seed: int,
                       steps: int = RANDOM_CHECK_STEPS) -> list[np.ndarray]:
    """Real observations with varied positions: random actions through the env on the training data."""
    env = TradingEnv(segments, settings, env_cfg)
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    out = [obs]
    for _ in range(steps - 1):
        obs, _r, terminated, truncated, _info = env.step(int(rng.integers(len(ACTION_TARGETS))))
        out.append(obs)
        if terminated or truncated:
            obs, _ = env.reset()
            out.append(obs)
    return out


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass
class TrainingResult:
    model: PPO
    vecnorm: VecNormalize
    actor: ExportActor
    path: Path
    metadata: dict[str, str]
    validation: dict[str, Any]
    seconds: float


def _describe_range(ds: Dataset, pairs: Sequence[str]) -> str:
    return (f"{','.join(pairs)} {ds.timeframe}; train {ds.date_range('train')}; "
            f"validation {ds.date_range('validation')}; test {ds.date_range('test')} (held out)")


def build_model(cfg: TrainingConfig, segments: Sequence[Segment], settings: Settings) -> tuple[PPO, VecNormalize]:
    """A seeded PPO on ``n_envs`` environments (env i seeded ``seed + i``) behind VecNormalize."""
    p = cfg.ppo
    env_cfg = cfg.env_config()

    def make(_i: int) -> Callable[[], TradingEnv]:
        return lambda: TradingEnv(segments, settings, env_cfg)

    venv = VecNormalize(DummyVecEnv([make(i) for i in range(p.n_envs)]), norm_obs=True, norm_reward=True,
                        clip_obs=p.clip_obs, gamma=p.gamma)
    model = PPO(
        "MlpPolicy", venv, learning_rate=p.learning_rate, n_steps=p.n_steps, batch_size=p.batch_size,
        n_epochs=p.n_epochs, gamma=p.gamma, gae_lambda=p.gae_lambda, clip_range=p.clip_range, ent_coef=p.ent_coef,
        vf_coef=p.vf_coef, max_grad_norm=p.max_grad_norm,
        policy_kwargs={"net_arch": {"pi": list(p.net_arch), "vf": list(p.net_arch)}},
        seed=cfg.seed, device="cpu", verbose=0,
    )
    return model, venv


def run_training(cfg: TrainingConfig, out: Path | None = None, *, progress: bool = False,
                 log: Callable[[str], None] = print) -> TrainingResult:
    """Train, evaluate on validation, export; returns everything (tests inspect the torch weights)."""
    started = time.monotonic()
    seed_everything(cfg.seed)
    settings = trading_settings(cfg)
    ds = load_dataset(cfg.data_dir, cfg.pairs, cfg.timeframe, cfg.dates,
                      episode_length=cfg.episode_length * cfg.decision_every_bars,
                      max_gap_bars=cfg.max_gap_bars, file_pattern=cfg.file_pattern, feature_set_name=cfg.feature_set)
    for split in ("train", "validation", "test"):
        log(f"{split}: {len(ds.segments[split])} segments, {ds.bars(split)} bars, {ds.date_range(split)}"
            + (f" ({ds.dropped_short[split]} short runs dropped)" if ds.dropped_short[split] else ""))
    train_segs, val_segs = ds.segments["train"], ds.segments["validation"]

    model, venv = build_model(cfg, train_segs, settings)
    log(f"training PPO for {cfg.total_timesteps} timesteps (seed {cfg.seed}, {cfg.ppo.n_envs} envs)")
    model.learn(total_timesteps=cfg.total_timesteps, callback=_ProgressBar() if progress else None)
    venv.training = False
    actor = actor_from_sb3(model, venv)

    # Validation, as trained: argmax at full confidence.  Its observations double as the export check set.
    env_cfg = cfg.env_config()
    val_obs: list[np.ndarray] = []
    argmax_metrics = evaluate(val_segs, settings, env_cfg, argmax_decider(actor), collect_obs=val_obs)
    check = np.stack(val_obs + random_rollout_obs(train_segs, settings, env_cfg, cfg.seed)).astype(np.float32)
    sb3_diff = check_actor_matches_sb3(actor, model, venv, check)

    created = dt.datetime.now(dt.UTC)
    hyper = {**asdict(cfg.ppo), "total_timesteps": cfg.total_timesteps, "episode_length": cfg.episode_length,
             "drawdown_penalty": cfg.drawdown_penalty, "turnover_penalty": cfg.turnover_penalty,
             **({} if cfg.reward == "log_return" else {"reward": cfg.reward, "target_vol": cfg.target_vol}),
             **({} if cfg.feature_set == "short_v1" else {"feature_set": cfg.feature_set}),
             **({} if cfg.env_config().cadence.every_bar else {"decision_every_bars": cfg.decision_every_bars,
                                                               "decision_hour_utc": cfg.decision_hour_utc}),
             "algorithm": "PPO (stable-baselines3 MlpPolicy)", "obs_normalisation": "VecNormalize, baked into graph"}
    trading = {"taker_fee": str(settings.taker_fee), "slippage_bps": str(settings.slippage_bps),
               "lot_size": str(settings.lot_size), "initial_equity": str(settings.initial_equity),
               "confidence_threshold": settings.confidence_threshold, "risk": asdict(settings.risk)}
    # Date and seed alone name two different runs of the same day alike (candidates differing only in their
    # hyper-parameters); a fingerprint of everything that shapes the weights tells them apart.
    fingerprint = hashlib.sha256(json.dumps(
        {"hyper": hyper, "trading": trading, "pairs": list(cfg.pairs), "split": ds.dates.describe(),
         "timeframe": cfg.timeframe, "seed": cfg.seed}, sort_keys=True, default=str).encode()).hexdigest()[:8]
    version = f"ppo-{cfg.timeframe}-{created:%Y%m%d}-s{cfg.seed}-{fingerprint}"
    path = out if out is not None else cfg.output_dir / "models" / f"{version}.onnx"
    extra: dict[str, Any] = {
        "seed": str(cfg.seed),
        "config_fingerprint": fingerprint,
        "code_revision": code_revision(),
        "profile": cfg.profile,
        "pairs": list(cfg.pairs),
        "data_split": ds.dates.describe(),
        "hyperparameters": hyper,
        "trading_params": trading,
        "description": f"PPO policy trained by alphapulse.training ({cfg.profile} profile)",
    }

    def metadata(validation: Mapping[str, Any]) -> dict[str, str]:
        return contract_metadata(version=version, timeframe=cfg.timeframe,
                                 training_data_range=_describe_range(ds, cfg.pairs),
                                 created=created.strftime("%Y-%m-%dT%H:%M:%SZ"),
                                 extra={**extra, "validation_metrics": validation},
                                 # short_v1 every bar: no keys, byte-identical metadata to models before them
                                 feature_set_name=None if cfg.feature_set == "short_v1" else cfg.feature_set,
                                 decision_every_bars=None if cfg.env_config().cadence.every_bar
                                 else cfg.decision_every_bars,
                                 decision_hour_utc=cfg.decision_hour_utc)

    # Validation as the daemon will trade it: the exported ONNX model through Policy, confidence threshold on.
    probe = path.with_name(f".{path.stem}.probe.onnx")
    try:
        export_policy(actor, check, probe, metadata({"pending": True}))
        daemon_metrics = evaluate(val_segs, settings, env_cfg, policy_decider(Policy.load(probe)))
    finally:
        probe.unlink(missing_ok=True)
    validation = {
        "split": ds.date_range("validation"),
        "daemon": daemon_metrics,  # ONNX via Policy.decide, confidence threshold applied by the engine
        "argmax": argmax_metrics,  # argmax action at full confidence, as during training
        "confidence_threshold": settings.confidence_threshold,
    }
    meta = metadata(validation)
    report = export_policy(actor, check, path, meta)
    seconds = time.monotonic() - started
    log(f"export check: ONNX vs torch max |diff| {report.max_abs_diff:.2e}, wrapper vs SB3 {sb3_diff:.2e} "
        f"on {report.n_checked} real observations")
    return TrainingResult(model, venv, actor, report.path, meta, validation, seconds)


def _summary_lines(res: TrainingResult) -> list[str]:
    lines = []
    for kind in ("argmax", "daemon"):
        m = res.validation[kind]
        per = ", ".join(f"{k} {v['total_return']:+.2%} (sharpe {v['sharpe']:+.2f}, {v['fills']} fills, "
                        f"buy&hold {v['buy_hold_return']:+.2%})" for k, v in m["pairs"].items())
        lines.append(f"validation [{kind}]: mean return {m['mean_total_return']:+.2%}, "
                     f"mean sharpe {m['mean_sharpe']:+.2f}; {per}")
    return lines


def train_main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit status (0 ok, 2 bad config/data, 1 export refused).

    ``--sweep`` (Ray) and ``--walk-forward`` (local process pool) run the walk-forward of the rule-gated policy
    instead (:func:`alphapulse.training.walkforward.sweep_main`)."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    if "--sweep" in args_in or "--walk-forward" in args_in:
        from alphapulse.training.walkforward import sweep_main

        return sweep_main(args_in)
    from alphapulse.training.walkforward import WalkForwardError, gated_profile, production_main

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default="quick")
    pre.add_argument("--config-file", type=Path, default=DEFAULT_CONFIG)
    pre.add_argument("--out", type=Path)
    known, _rest = pre.parse_known_args(args_in)
    try:
        gate = gated_profile(known.config, known.config_file)
    except WalkForwardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if gate is not None:  # the rule-gated policy (the shipped model): pinned fold, configuration and seed
        return production_main(gate, known.config_file, known.out)
    ap = argparse.ArgumentParser(prog="alphapulse train", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="quick", help="profile in the training config: quick | production")
    ap.add_argument("--config-file", type=Path, default=DEFAULT_CONFIG, help="training config YAML")
    ap.add_argument("--out", type=Path, help="model path (default: <output_dir>/models/<version>.onnx)")
    ap.add_argument("--seed", type=int, help="override the profile's seed")
    ap.add_argument("--timesteps", type=int, help="override the profile's total_timesteps")
    ap.add_argument("--data-dir", type=Path, help="override the profile's data directory")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--sweep", action="store_true", help="walk-forward seeds x folds x configurations of the "
                    "rule-gated policy on Ray (see alphapulse train --sweep --help)")
    ap.add_argument("--walk-forward", action="store_true", help="the same on a local process pool")
    args = ap.parse_args(argv)
    try:
        cfg = load_training_config(args.config, args.config_file)
        overrides: dict[str, Any] = {}
        if args.seed is not None:
            overrides["seed"] = _number("--seed", "seed", args.seed, int, 0)
        if args.timesteps is not None:
            overrides["total_timesteps"] = _number("--timesteps", "timesteps", args.timesteps, int, 1)
        if args.data_dir is not None:
            overrides["data_dir"] = args.data_dir.expanduser().resolve()
        cfg = replace(cfg, **overrides)
        print(f"profile {cfg.profile}: data {cfg.data_dir}, pairs {', '.join(cfg.pairs)}, {cfg.timeframe}")
        res = run_training(cfg, args.out, progress=not args.no_progress)
    except (TrainingConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ExportError as exc:
        print(f"error: export refused, no model written: {exc}", file=sys.stderr)
        return 1
    for line in _summary_lines(res):
        print(line)
    print(f"wrote {res.path} ({res.metadata['alphapulse.version']}) in {res.seconds:.0f} s")
    print(json.dumps({"model": str(res.path), "validation": res.validation}, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(train_main())
