"""Walk-forward selection of the rule-gated policy: folds, seeds, configurations, one results table.

Why: one validation split gives a pair's Sharpe a standard error of ~1, so choosing among candidates on it
picks noise (issue 9).  Here every configuration is trained with several seeds on each walk-forward fold
(``walk_forward`` in ``config/training.yaml``): a fold trains only on days whose whole outcome lies before its
validation slice, is validated on that slice, and is tested on the period after it, never used to train or to
choose.  The selection rule is in the config (written before any test fold was run) and reads validation
numbers only; the table reports the chosen configuration's *mean over seeds* on every test pair-fold, with the
market's direction and the baselines (buy-and-hold, flat, SMA 12/48, the TSMOM rule) on the same bars, costs and
funding.

Every run is a pure function of (fold, configuration, seed): data files in, one ONNX model and its metrics out;
the same seed gives the same model bytes (``model_sha256``) and metrics on the same machine and library versions.
Runs execute on a backend: ``serial``, ``process`` (a local process pool) or ``ray`` (local by default, an
existing cluster with ``--address``; the optional ``sweep`` extra).  See :func:`sweep_main`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from alphapulse.backtest import run_backtest, select
from alphapulse.baselines import SmaCrossover, TsMomentum, baselines, trend_baselines
from alphapulse.config import ConfigError, Settings, load_settings
from alphapulse.domain import TIMEFRAME_MS
from alphapulse.evaluation import run_baseline
from alphapulse.features import FEATURE_SET_TREND, feature_set
from alphapulse.filehash import sha256_file
from alphapulse.funding import FundingSchedule
from alphapulse.market.replay import load_candles
from alphapulse.performance import summarize
from alphapulse.policy import Policy, contract_metadata
from alphapulse.training.data import DataError, format_utc, parse_utc
from alphapulse.training.export import export_policy
from alphapulse.training.gate import (
    GATE_SCALES,
    GRID_MEANINGS,
    GRID_TARGETS,
    DailySamples,
    GatedRuleActor,
    GateParams,
    cost_per_notional,
    daily_samples,
    train_gate,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "config" / "training.yaml"
BACKENDS = ("ray", "process", "serial")
SELECTION_RULES = ("best_mean_validation_sharpe_within_limits",)
SHIP_RULES = ("median_validation_seed",)
_DAY_MS = 86_400_000
_HOUR_MS = 3_600_000


class WalkForwardError(Exception):
    """A problem in the walk_forward config, the command line or the data: nothing runs."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fold:
    """Train [train_start, validation_start), validation [validation_start, test_start), test [test_start,
    test_end), epoch ms.  A training day counts only if its whole outcome window ends by validation_start."""

    name: str
    train_start: int
    validation_start: int
    test_start: int
    test_end: int

    def describe(self) -> dict[str, str]:
        return {"train": f"{format_utc(self.train_start)}..{format_utc(self.validation_start)}",
                "validation": f"{format_utc(self.validation_start)}..{format_utc(self.test_start)}",
                "test": f"{format_utc(self.test_start)}..{format_utc(self.test_end)}"}


@dataclass(frozen=True)
class WalkForwardSpec:
    data_dir: Path
    funding_dir: Path
    pairs: tuple[str, ...]
    timeframe: str
    file_pattern: str
    trading_config_dir: Path
    decision_hour_utc: int
    min_test_coverage: float
    min_test_days: int
    seeds: tuple[int, ...]
    configurations: dict[str, GateParams]
    selection: str
    ship: str
    folds: tuple[Fold, ...]
    production_fold: str = ""

    def fold(self, name: str) -> Fold:
        for f in self.folds:
            if f.name == name:
                return f
        raise WalkForwardError(f"no fold {name!r} (folds: {[f.name for f in self.folds]})")


_WF_KEYS = {"data_dir", "funding_dir", "pairs", "timeframe", "file_pattern", "trading_config_dir",
            "decision_hour_utc", "min_test_coverage", "min_test_days", "seeds", "configurations", "selection",
            "folds", "production_fold"}
_FOLD_KEYS = {"name", "train_start", "validation_start", "test_start", "test_end"}
_GATE_KEYS = {f.name for f in dataclasses.fields(GateParams)}


def _mapping(section: str, value: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise WalkForwardError(f"{section}: must be a mapping, got {type(value).__name__}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise WalkForwardError(f"{section}: unknown key(s) {unknown} (known: {sorted(allowed)})")
    return value


def _path(root: Path, value: Any, key: str) -> Path:
    if not isinstance(value, str) or not value:
        raise WalkForwardError(f"{key}: must be a non-empty path string, got {value!r}")
    p = Path(value).expanduser()
    return (p if p.is_absolute() else root / p).resolve()


def parse_folds(raw: Any, section: str = "walk_forward.folds") -> tuple[Fold, ...]:
    """Folds from the config, checked: dates increase inside a fold, names are unique, and no fold's test
    period overlaps another's (each test pair-fold is counted once in the table)."""
    if not isinstance(raw, list) or not raw:
        raise WalkForwardError(f"{section}: must be a non-empty list of folds")
    folds: list[Fold] = []
    for i, item in enumerate(raw):
        sec = f"{section}[{i}]"
        d = _mapping(sec, item, _FOLD_KEYS)
        missing = sorted(_FOLD_KEYS - set(d))
        if missing:
            raise WalkForwardError(f"{sec}: missing key(s) {missing}")
        try:
            f = Fold(str(d["name"]), *(parse_utc(d[k]) for k in ("train_start", "validation_start", "test_start",
                                                                  "test_end")))
        except DataError as exc:
            raise WalkForwardError(f"{sec}: {exc}") from None
        if not f.train_start < f.validation_start < f.test_start < f.test_end:
            raise WalkForwardError(f"{sec} ({f.name}): dates must increase: train_start < validation_start < "
                                   "test_start < test_end")
        folds.append(f)
    names = [f.name for f in folds]
    if len(set(names)) != len(names):
        raise WalkForwardError(f"{section}: fold names must be unique, got {names}")
    by_test = sorted(folds, key=lambda f: f.test_start)
    for a, b in zip(by_test, by_test[1:], strict=False):
        if b.test_start < a.test_end:
            raise WalkForwardError(f"{section}: test periods of folds {a.name} and {b.name} overlap")
    return tuple(folds)


def load_walk_forward(path: Path = DEFAULT_CONFIG, root: Path = REPO_ROOT) -> WalkForwardSpec:
    """The ``walk_forward`` section of the training config, validated strictly."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise WalkForwardError(f"{path}: cannot read: {exc}") from None
    if not isinstance(doc, dict) or "walk_forward" not in doc:
        raise WalkForwardError(f"{path}: no walk_forward section")
    sec = f"{path.name}:walk_forward"
    raw = _mapping(sec, doc["walk_forward"], _WF_KEYS)
    missing = sorted({"data_dir", "pairs", "seeds", "configurations", "selection", "folds"} - set(raw))
    if missing:
        raise WalkForwardError(f"{sec}: missing key(s) {missing}")
    pairs = raw["pairs"]
    if not isinstance(pairs, list) or not pairs or not all(isinstance(p, str) and p for p in pairs):
        raise WalkForwardError(f"{sec}.pairs: must be a non-empty list of pair names, got {pairs!r}")
    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           and s >= 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise WalkForwardError(f"{sec}.seeds: must be a list of distinct integers >= 0, got {seeds!r}")
    confs = _mapping(f"{sec}.configurations", raw["configurations"], set(raw["configurations"] or {}))
    if not confs:
        raise WalkForwardError(f"{sec}.configurations: at least one configuration is needed")
    configurations: dict[str, GateParams] = {}
    for name, body in confs.items():
        body = _mapping(f"{sec}.configurations.{name}", body or {}, _GATE_KEYS)
        try:
            configurations[str(name)] = GateParams(**body)
        except (TypeError, ValueError) as exc:
            raise WalkForwardError(f"{sec}.configurations.{name}: {exc}") from None
    selection = _mapping(f"{sec}.selection", raw["selection"], {"rule", "ship"})
    if selection.get("rule") not in SELECTION_RULES:
        raise WalkForwardError(f"{sec}.selection.rule: must be one of {SELECTION_RULES}, got {selection.get('rule')!r}")
    if selection.get("ship") not in SHIP_RULES:
        raise WalkForwardError(f"{sec}.selection.ship: must be one of {SHIP_RULES}, got {selection.get('ship')!r}")
    timeframe = str(raw.get("timeframe", "1h"))
    if timeframe not in TIMEFRAME_MS:
        raise WalkForwardError(f"{sec}.timeframe: unknown timeframe {timeframe!r}")
    hour = raw.get("decision_hour_utc", 0)
    if not isinstance(hour, int) or not 0 <= hour < 24:
        raise WalkForwardError(f"{sec}.decision_hour_utc: must be an integer in 0..23, got {hour!r}")
    coverage = raw.get("min_test_coverage", 0.7)
    if not isinstance(coverage, (int, float)) or not 0 < coverage <= 1:
        raise WalkForwardError(f"{sec}.min_test_coverage: must be in (0, 1], got {coverage!r}")
    days = raw.get("min_test_days", 150)
    if not isinstance(days, int) or days < 1:
        raise WalkForwardError(f"{sec}.min_test_days: must be an integer >= 1, got {days!r}")
    data_dir = _path(root, raw["data_dir"], f"{sec}.data_dir")
    folds = parse_folds(raw["folds"], f"{sec}.folds")
    production = str(raw.get("production_fold", folds[-1].name))
    spec = WalkForwardSpec(
        data_dir=data_dir,
        funding_dir=_path(root, raw["funding_dir"], f"{sec}.funding_dir") if raw.get("funding_dir") else data_dir,
        pairs=tuple(pairs), timeframe=timeframe,
        file_pattern=str(raw.get("file_pattern", "{pair}-{timeframe}.csv.gz")),
        trading_config_dir=_path(root, raw.get("trading_config_dir", "config"), f"{sec}.trading_config_dir"),
        decision_hour_utc=hour, min_test_coverage=float(coverage), min_test_days=days, seeds=tuple(seeds),
        configurations=configurations, selection=str(selection["rule"]), ship=str(selection["ship"]),
        folds=folds, production_fold=production)
    spec.fold(production)
    return spec


# --------------------------------------------------------------------------------------------
# Data (cached per process: a pool or Ray worker loads each file once)
# --------------------------------------------------------------------------------------------

_CACHE: dict[Any, Any] = {}


def trading_settings(spec: WalkForwardSpec) -> Settings:
    """The daemon's costs and limits (trading_params.yaml, no environment).  The gated model sizes itself, so
    engine vol targeting is off for it (``target_vol`` 0), as the shipped config has it."""
    key = ("settings", spec.trading_config_dir)
    if key not in _CACHE:
        try:
            s = load_settings(spec.trading_config_dir, env={})
        except ConfigError as exc:
            raise WalkForwardError(str(exc)) from None
        _CACHE[key] = dataclasses.replace(s, risk=dataclasses.replace(s.risk, target_vol=0.0))
    settings: Settings = _CACHE[key]
    return settings


def pair_symbol(pair: str) -> str:
    return pair.replace("_", "")


def pair_candles(spec: WalkForwardSpec, pair: str) -> dict[str, np.ndarray]:
    """The pair's valid candles (the daemon's validator), whole file."""
    path = spec.data_dir / spec.file_pattern.format(pair=pair, timeframe=spec.timeframe)
    key = ("candles", path)
    if key not in _CACHE:
        if not path.is_file():
            raise WalkForwardError(f"no candle file for {pair}: {path}")
        _CACHE[key] = select(load_candles(path), None, None, TIMEFRAME_MS[spec.timeframe])
    cols: dict[str, np.ndarray] = _CACHE[key]
    return cols


def pair_funding(spec: WalkForwardSpec, pair: str) -> tuple[FundingSchedule, str]:
    """The pair's funding-rate file if there is one (default rate outside its coverage), else the default rate."""
    path = spec.funding_dir / f"{pair}_USDT-funding_rate.csv.gz"
    key = ("funding", path)
    if key not in _CACHE:
        _CACHE[key] = ((FundingSchedule.from_file(path), f"{path.name} (default 0.01 %/8 h outside it)")
                       if path.is_file() else (FundingSchedule(), "default 0.01 %/8 h"))
    out: tuple[FundingSchedule, str] = _CACHE[key]
    return out


def pair_samples(spec: WalkForwardSpec, pair: str, params: GateParams) -> DailySamples:
    key = ("samples", spec.data_dir, pair, params.target_vol, params.max_position_frac, spec.decision_hour_utc)
    if key not in _CACHE:
        _CACHE[key] = daily_samples(pair, pair_candles(spec, pair), feature_set(FEATURE_SET_TREND),
                                    TIMEFRAME_MS[spec.timeframe], params, pair_funding(spec, pair)[0],
                                    spec.decision_hour_utc)
    samples: DailySamples = _CACHE[key]
    return samples


def training_samples(spec: WalkForwardSpec, fold: Fold, params: GateParams) -> DailySamples:
    """The fold's training days: decided at or after train_start, whole outcome window before validation."""
    return DailySamples.concat([pair_samples(spec, p, params).window(fold.train_start, fold.validation_start)
                                for p in spec.pairs])


@dataclass(frozen=True)
class Window:
    """A pair's evaluated bars [first_i, end_i) in its valid candles, or why it is not evaluated."""

    first_i: int
    end_i: int
    skipped: str | None = None


def eval_window(spec: WalkForwardSpec, pair: str, start_ms: int, end_ms: int, *, test: bool) -> Window:
    cols = pair_candles(spec, pair)
    ts, bar = cols["ts"], TIMEFRAME_MS[spec.timeframe]
    first_i = int(np.searchsorted(ts, start_ms))
    end_i = int(np.searchsorted(ts, end_ms))
    warm = feature_set(FEATURE_SET_TREND).warmup_bars
    n = end_i - first_i
    if n <= 0:
        return Window(first_i, end_i, "no candles in the period")
    if first_i - (warm - 1) < 0 or ts[first_i] - ts[first_i - (warm - 1)] > 2 * (warm - 1) * bar:
        return Window(first_i, end_i, f"no {warm}-bar feature warm-up before the period")
    span = (end_ms - max(start_ms, int(ts[first_i]))) // bar
    coverage = n / max(1, (end_ms - start_ms) // bar)
    if test and (coverage < spec.min_test_coverage or span * bar < spec.min_test_days * _DAY_MS):
        return Window(first_i, end_i, f"{coverage:.0%} of the hours have candles (needs "
                                      f"{spec.min_test_coverage:.0%} and {spec.min_test_days} days)")
    return Window(first_i, end_i)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def worst_day_loss(equity: np.ndarray, ts_close: np.ndarray) -> float:
    """Largest intraday loss against the equity at the start of its UTC day (what the daily-loss limit watches)."""
    if equity.size < 2:
        return 0.0
    day = ts_close // _DAY_MS
    worst = 0.0
    start_eq = float(equity[0])
    cur_day = int(day[0])
    for i in range(1, equity.size):
        d = int(day[i])
        if d != cur_day:
            start_eq, cur_day = float(equity[i - 1]), d
        if start_eq > 0:
            worst = max(worst, 1.0 - float(equity[i]) / start_eq)
    return worst


def run_metrics(equity: np.ndarray, position: np.ndarray, fills: Sequence[Any], ts_close: np.ndarray,
                bar_ms: int) -> dict[str, float]:
    m = summarize(equity, position, fills, bar_ms)
    return {"sharpe": round(m["sharpe"], 6), "total_return": round(m["total_return"], 6),
            "max_drawdown": round(m["max_drawdown"], 6), "worst_day": round(worst_day_loss(equity, ts_close), 6),
            "exposure": round(m["exposure"], 6), "trades": int(m["trades"]), "fees": round(m["fees"], 4)}


def evaluate_model(spec: WalkForwardSpec, model: Path, pair: str, start_ms: int, end_ms: int, *,
                   test: bool) -> dict[str, Any]:
    """The exported model through the daemon's decision path (Policy, confidence threshold, risk limits with
    halts, fees, slippage, funding) over [start, end) of one pair."""
    w = eval_window(spec, pair, start_ms, end_ms, test=test)
    if w.skipped:
        return {"skipped": w.skipped}
    cols, bar = pair_candles(spec, pair), TIMEFRAME_MS[spec.timeframe]
    warm = feature_set(FEATURE_SET_TREND).warmup_bars
    lo = w.first_i - (warm - 1)
    sub = {k: v[lo:w.end_i] for k, v in cols.items()}
    funding, source = pair_funding(spec, pair)
    res = run_backtest(Policy.load(model), sub, trading_settings(spec), symbol=pair_symbol(pair),
                       timeframe=spec.timeframe, funding=funding, funding_source=source)
    skip = warm - 1
    ts_close = np.append(sub["ts"] + bar, sub["ts"][-1] + bar)[skip:]
    return run_metrics(res.equity[skip:], res.position[skip:], res.fills, ts_close, bar)


def buy_hold_return(spec: WalkForwardSpec, pair: str, w: Window) -> float:
    cols = pair_candles(spec, pair)
    return float(cols["close"][w.end_i - 1] / cols["open"][w.first_i] - 1.0)


# --------------------------------------------------------------------------------------------
# Jobs: one (fold, configuration, seed) run, one fold-pair baseline set
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    config_path: str
    root: str
    fold: str
    configuration: str
    seed: int
    out_dir: str
    evaluate_test: bool = True


def model_name(fold: str, configuration: str, seed: int) -> str:
    return f"gate-{fold}-{configuration}-s{seed}"


def export_gate(actor: GatedRuleActor, check_obs: np.ndarray, path: Path, *, version: str, timeframe: str,
                training_range: str, extra: Mapping[str, Any], decision_hour_utc: int, bar_ms: int) -> str:
    """Export through the one exporter (onnx.checker, ONNX vs torch to 1e-5, the daemon's own contract check);
    the metadata's ``created`` is the end of the training data, so the same seed gives the same bytes."""
    meta = contract_metadata(kind="gated_rule", version=version, timeframe=timeframe,
                             training_data_range=training_range, created=extra["training_end"], extra=extra,
                             feature_set_name=FEATURE_SET_TREND, decision_every_bars=_DAY_MS // bar_ms,
                             decision_hour_utc=decision_hour_utc, action_targets=GRID_TARGETS,
                             action_meanings=GRID_MEANINGS)
    export_policy(actor, check_obs, path, meta)
    return sha256_file(path)


def train_fold_model(spec: WalkForwardSpec, fold: Fold, configuration: str, seed: int, path: Path
                     ) -> tuple[GatedRuleActor, dict[str, Any]]:
    """Train and export one model; returns the actor and a description (sha256 of the file, training days)."""
    params = spec.configurations[configuration]
    settings = trading_settings(spec)
    if abs(params.max_position_frac - settings.risk.max_position_frac) > 1e-12:
        raise WalkForwardError(f"configuration {configuration}: max_position_frac {params.max_position_frac} is "
                               f"not risk.max_position_pct/100 = {settings.risk.max_position_frac}")
    train = training_samples(spec, fold, params)
    cost = cost_per_notional(settings.taker_fee, settings.slippage_bps)
    actor = train_gate(train, params, seed, cost)
    check = np.concatenate([train.obs, np.random.default_rng(seed).normal(0, 1.5, train.obs.shape).astype(np.float32)
                            * np.array([1] * 10 + [0.3, 0, 0], np.float32) + np.array([0] * 10 + [0.6, 0, 0],
                                                                                       np.float32)])
    bar = TIMEFRAME_MS[spec.timeframe]
    first, last = (format_utc(int(train.ts.min())), format_utc(int(train.end_ts.max()))) if len(train) else ("", "")
    extra = {
        "seed": str(seed), "configuration": configuration, "fold": fold.name, "fold_dates": fold.describe(),
        "pairs": list(spec.pairs), "gate_params": dataclasses.asdict(params), "gate_scales": list(GATE_SCALES),
        "training_days": len(train), "training_end": format_utc(fold.validation_start),
        "algorithm": "rule-gated policy (alphapulse.training.gate): network gates the TSMOM rule's position",
        "sizing": "in the model: rule target x min(target_vol / max_position_frac / vol_30d, 1); run with "
                  "risk.target_vol_pct 0",
        "description": "trained by alphapulse.training.walkforward",
    }
    sha = export_gate(actor, check, path, version=path.stem, timeframe=spec.timeframe,
                      training_range=f"{','.join(spec.pairs)} {spec.timeframe} decision days {first}..{last}",
                      extra=extra, decision_hour_utc=spec.decision_hour_utc, bar_ms=bar)
    gate_share = np.bincount(np.argmax(actor.gate_probabilities(train.obs), axis=1), minlength=3) / max(1, len(train))
    return actor, {"model": str(path), "model_sha256": sha, "training_days": len(train),
                   "train_gate_share": [round(float(x), 4) for x in gate_share]}


def run_job(job: Job) -> dict[str, Any]:
    """One walk-forward run: train on the fold's past, export, evaluate on its validation and test periods."""
    import torch

    torch.set_num_threads(1)
    started = time.monotonic()
    spec = load_walk_forward(Path(job.config_path), Path(job.root))
    fold = spec.fold(job.fold)
    path = Path(job.out_dir) / "models" / f"{model_name(fold.name, job.configuration, job.seed)}.onnx"
    _actor, info = train_fold_model(spec, fold, job.configuration, job.seed, path)
    out: dict[str, Any] = {"fold": fold.name, "configuration": job.configuration, "seed": job.seed, **info,
                           "validation": {}, "test": {}}
    for pair in spec.pairs:
        out["validation"][pair] = evaluate_model(spec, path, pair, fold.validation_start, fold.test_start, test=False)
        if job.evaluate_test:
            out["test"][pair] = evaluate_model(spec, path, pair, fold.test_start, fold.test_end, test=True)
    out["seconds"] = round(time.monotonic() - started, 1)
    return out


@dataclass(frozen=True)
class BaselineJob:
    config_path: str
    root: str
    fold: str
    pair: str


def run_baseline_job(job: BaselineJob) -> dict[str, Any]:
    """Buy-and-hold, flat, SMA 12/48 and the TSMOM rule on one test pair-fold (no halts, same costs/funding)."""
    spec = load_walk_forward(Path(job.config_path), Path(job.root))
    fold = spec.fold(job.fold)
    w = eval_window(spec, job.pair, fold.test_start, fold.test_end, test=True)
    out: dict[str, Any] = {"fold": fold.name, "pair": job.pair}
    if w.skipped:
        return out | {"skipped": w.skipped}
    settings = trading_settings(spec)
    plain = dataclasses.replace(settings, risk=dataclasses.replace(
        settings.risk, daily_loss_limit_frac=1.0, max_drawdown_frac=1.0, target_vol=0.0))
    cols, bar = pair_candles(spec, job.pair), TIMEFRAME_MS[spec.timeframe]
    funding, source = pair_funding(spec, job.pair)
    ts_close = np.append(cols["ts"][w.first_i:w.end_i] + bar, cols["ts"][w.end_i - 1] + bar)
    strategies: dict[str, Any] = {**baselines(), **trend_baselines(max_position_frac=settings.risk.max_position_frac)}
    out["buy_hold_return"] = round(buy_hold_return(spec, job.pair, w), 6)
    out["direction"] = "falling" if out["buy_hold_return"] < 0 else "rising"
    out["days"] = round((fold.test_end - max(fold.test_start, int(cols["ts"][w.first_i]))) / _DAY_MS, 1)
    for name, strat in strategies.items():
        if isinstance(strat, SmaCrossover | TsMomentum) or name in ("buy_and_hold", "flat"):
            m = run_baseline(strat, cols, w.first_i, w.end_i, plain, symbol=pair_symbol(job.pair),
                             timeframe=spec.timeframe, funding=funding, funding_source=source, keep_curve=True)
            if "skipped" in m:
                out[name] = m
                continue
            eq = m.pop("equity")
            out[name] = {"sharpe": round(m["sharpe"], 6), "total_return": round(m["total_return"], 6),
                         "max_drawdown": round(m["max_drawdown"], 6),
                         "worst_day": round(worst_day_loss(eq, ts_close[: eq.size]), 6)}
    return out


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


def run_jobs(fn: Callable[[Any], dict[str, Any]], jobs: Sequence[Any], backend: str, *, workers: int = 1,
             address: str | None = None) -> list[dict[str, Any]]:
    """Run ``fn`` over ``jobs`` on ``backend``; results in job order (the backend never changes a number)."""
    if backend == "serial" or not jobs:
        return [fn(j) for j in jobs]
    if backend == "process":
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
            return list(pool.map(fn, jobs))
    if backend == "ray":
        try:
            import ray
        except ImportError:
            raise WalkForwardError("the ray backend needs Ray: pip install -e '.[sweep]' (or use --backend "
                                   "process)") from None
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                # local: workers import this checkout (PYTHONPATH), one CPU each, no dashboard
                env = {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(
                    os.pathsep), "OMP_NUM_THREADS": "1"}
                ray.init(num_cpus=max(1, workers), include_dashboard=False, log_to_driver=False,
                         runtime_env={"env_vars": env})
        remote = ray.remote(num_cpus=1)(fn)
        refs = [remote.remote(j) for j in jobs]
        results: list[dict[str, Any]] = ray.get(refs)
        return results
    raise WalkForwardError(f"unknown backend {backend!r} (one of {BACKENDS})")


# --------------------------------------------------------------------------------------------
# Selection and the table
# --------------------------------------------------------------------------------------------


def _mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if xs else float("nan")


def _se(xs: Sequence[float]) -> float:
    return float(np.std(xs, ddof=1) / math.sqrt(len(xs))) if len(xs) > 1 else float("nan")


def validation_score(run: Mapping[str, Any]) -> float:
    """Mean validation Sharpe over the run's evaluated pairs."""
    vals = [m["sharpe"] for m in run["validation"].values() if "skipped" not in m]
    return _mean(vals)


def within_limits(run: Mapping[str, Any], settings: Settings, period: str = "validation") -> bool:
    """No evaluated pair reached the drawdown limit or the daily-loss limit."""
    r = settings.risk
    return all(m["max_drawdown"] <= r.max_drawdown_frac and m["worst_day"] < r.daily_loss_limit_frac
               for m in run[period].values() if "skipped" not in m)


def select_configuration(runs: Sequence[Mapping[str, Any]], fold: str, settings: Settings,
                         rule: str = SELECTION_RULES[0]) -> dict[str, Any]:
    """The selection rule, on validation numbers only: among configurations whose every seed stayed within the
    limits on validation, the one with the best mean (over seeds) validation Sharpe; if none stayed within the
    limits, the best of all (and ``within_limits`` False says so).  Ties go to the configuration named first."""
    if rule not in SELECTION_RULES:
        raise WalkForwardError(f"unknown selection rule {rule!r}")
    by_conf: dict[str, list[Mapping[str, Any]]] = {}
    for r in runs:
        if r["fold"] == fold:
            by_conf.setdefault(r["configuration"], []).append(r)
    if not by_conf:
        raise WalkForwardError(f"no runs for fold {fold}")
    scored = []
    for order, (conf, rs) in enumerate(by_conf.items()):
        ok = all(within_limits(r, settings) for r in rs)
        scored.append((ok, _mean([validation_score(r) for r in rs]), -order, conf))
    ok, score, _o, conf = max(scored, key=lambda t: (t[0], t[1], t[2]))
    return {"fold": fold, "configuration": conf, "validation_sharpe": round(score, 6), "within_limits": ok,
            "candidates": {c: round(s, 6) for _k, s, _o2, c in scored}}


def ship_seed(runs: Sequence[Mapping[str, Any]], fold: str, configuration: str) -> int:
    """The seed whose validation Sharpe is the median of the configuration's seeds (lower median if even)."""
    rs = sorted((r for r in runs if r["fold"] == fold and r["configuration"] == configuration),
                key=lambda r: (validation_score(r), r["seed"]))
    if not rs:
        raise WalkForwardError(f"no runs of {configuration} in fold {fold}")
    return int(rs[(len(rs) - 1) // 2]["seed"])


BASELINE_NAMES = ("buy_and_hold", "flat", "sma_crossover", "tsmom_vol_target")


def build_table(spec: WalkForwardSpec, runs: Sequence[Mapping[str, Any]], base: Sequence[Mapping[str, Any]]
                ) -> dict[str, Any]:
    """Selection per fold, then one row per test pair-fold and the bar's summary."""
    settings = trading_settings(spec)
    selections = {f.name: select_configuration(runs, f.name, settings, spec.selection) for f in spec.folds
                  if any(r["fold"] == f.name for r in runs)}
    base_by = {(b["fold"], b["pair"]): b for b in base}
    rows: list[dict[str, Any]] = []
    skipped = [{"fold": b["fold"], "pair": b["pair"], "reason": b["skipped"]} for b in base if "skipped" in b]
    for f in spec.folds:
        if f.name not in selections:
            continue
        conf = selections[f.name]["configuration"]
        chosen = [r for r in runs if r["fold"] == f.name and r["configuration"] == conf]
        for pair in spec.pairs:
            b = base_by.get((f.name, pair), {})
            per_seed = [r["test"].get(pair, {}) for r in chosen]
            if "skipped" in b or not per_seed or any("skipped" in m or not m for m in per_seed):
                continue
            sh = [m["sharpe"] for m in per_seed]
            row = {"fold": f.name, "pair": pair, "direction": b["direction"], "buy_hold_return": b["buy_hold_return"],
                   "days": b["days"], "configuration": conf, "seeds": len(sh),
                   "policy_sharpe": round(_mean(sh), 4), "policy_sharpe_se": round(_se(sh), 4),
                   "policy_sharpe_by_seed": {str(r["seed"]): r["test"][pair]["sharpe"] for r in chosen},
                   "policy_return": round(_mean([m["total_return"] for m in per_seed]), 6),
                   "policy_max_drawdown": round(max(m["max_drawdown"] for m in per_seed), 6),
                   "policy_worst_day": round(max(m["worst_day"] for m in per_seed), 6),
                   "policy_exposure": round(_mean([m["exposure"] for m in per_seed]), 4)}
            for name in BASELINE_NAMES:
                m = b.get(name, {})
                row[f"{name}_sharpe"] = m.get("sharpe", float("nan"))
                row[f"{name}_max_drawdown"] = m.get("max_drawdown", float("nan"))
                row[f"{name}_worst_day"] = m.get("worst_day", float("nan"))
            rows.append(row)
    return {"selections": selections, "rows": rows, "skipped": skipped, "summary": summarize_rows(rows, settings)}


def summarize_rows(rows: Sequence[Mapping[str, Any]], settings: Settings) -> dict[str, Any]:
    """Means ± s.e. over pair-folds by direction for the policy and every baseline, and the bar's verdict."""
    out: dict[str, Any] = {"n": len(rows), "falling": sum(r["direction"] == "falling" for r in rows),
                           "rising": sum(r["direction"] == "rising" for r in rows)}
    for who in ("policy", *BASELINE_NAMES):
        for group in ("falling", "rising", "all"):
            xs = [r[f"{who}_sharpe"] for r in rows if group == "all" or r["direction"] == group]
            out[f"{who}_{group}"] = [round(_mean(xs), 4), round(_se(xs), 4)]
    dd = [r["policy_max_drawdown"] for r in rows]
    day = [r["policy_worst_day"] for r in rows]
    out["policy_worst_max_drawdown"] = round(max(dd), 6) if dd else float("nan")
    out["policy_worst_day"] = round(max(day), 6) if day else float("nan")
    checks = {
        "falling_mean_sharpe_above_0": out["policy_falling"][0] > 0,
        "rising_mean_sharpe_above_0": out["policy_rising"][0] > 0,
        "mean_sharpe_above_buy_and_hold": out["policy_all"][0] > out["buy_and_hold_all"][0],
        "mean_sharpe_above_sma": out["policy_all"][0] > out["sma_crossover_all"][0],
        "max_drawdown_within_limit_every_pair_fold": bool(dd) and max(dd) <= settings.risk.max_drawdown_frac,
        "daily_loss_limit_never_reached": bool(day) and max(day) < settings.risk.daily_loss_limit_frac,
    }
    out["bar"] = checks
    out["meets_bar"] = bool(rows) and all(checks.values())
    return out


def _f(x: float, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x * 100:.1f}%" if pct else f"{x:+.2f}"


def markdown_table(table: Mapping[str, Any]) -> str:
    """The README table: every test pair-fold, then the summary and the bar."""
    lines = ["| test fold | pair | market (B&H return) | policy Sharpe (mean ± s.e., seeds) "
             "| policy max DD / worst day | TSMOM rule | buy & hold | SMA 12/48 | flat |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in table["rows"]:
        lines.append(
            f"| {r['fold']} | {r['pair']} | {r['direction']} ({r['buy_hold_return'] * 100:+.0f}%) | "
            f"{_f(r['policy_sharpe'])} ± {r['policy_sharpe_se']:.2f} ({r['seeds']}) | "
            f"{_f(r['policy_max_drawdown'], True)} / {_f(r['policy_worst_day'], True)} | "
            f"{_f(r['tsmom_vol_target_sharpe'])} | {_f(r['buy_and_hold_sharpe'])} | {_f(r['sma_crossover_sharpe'])} | "
            f"{_f(r['flat_sharpe'])} |")
    s = table["summary"]
    lines += ["", f"Mean Sharpe over pair-folds (± s.e.), {s['n']} pair-folds ({s['falling']} falling, "
                  f"{s['rising']} rising):", "",
              "| | falling | rising | all |", "|---|---|---|---|"]
    for who, label in (("policy", "policy (selected configuration, mean of seeds)"),
                       ("tsmom_vol_target", "TSMOM rule"), ("buy_and_hold", "buy & hold"),
                       ("sma_crossover", "SMA 12/48"), ("flat", "flat")):
        cells = " | ".join(f"{_f(s[f'{who}_{g}'][0])} ± {s[f'{who}_{g}'][1]:.2f}" for g in ("falling", "rising", "all"))
        lines.append(f"| {label} | {cells} |")
    lines += ["", f"Policy worst max drawdown {_f(s['policy_worst_max_drawdown'], True)}, worst intraday loss vs "
                  f"start of day {_f(s['policy_worst_day'], True)}.", "",
              "Bar (issue 9 part 9): " + "; ".join(f"{k.replace('_', ' ')}: {'yes' if v else 'NO'}"
                                                   for k, v in s["bar"].items())
              + f". **{'Meets the bar' if s['meets_bar'] else 'Does not meet the bar'}.**", "",
              "Selection per fold (mean validation Sharpe of the chosen configuration): " + "; ".join(
                  f"{k}: {v['configuration']} ({_f(v['validation_sharpe'])}"
                  f"{'' if v['within_limits'] else ', outside limits'})" for k, v in table["selections"].items())]
    if table.get("skipped"):
        lines += ["", "Not evaluated (data): " + "; ".join(f"{s['fold']} {s['pair']}: {s['reason']}"
                                                           for s in table["skipped"])]
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: Path, spec: WalkForwardSpec, runs: Sequence[Mapping[str, Any]],
                  base: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """results.json (every run, every baseline, selections, summary), table.csv (one row per test pair-fold) and
    table.md (the README table)."""
    table = build_table(spec, runs, base)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [dict(r, model=os.path.relpath(r["model"], out_dir)) if os.path.isabs(r["model"]) else r for r in runs]
    doc = {"runs": list(runs), "baselines": list(base), **table,
           "folds": {f.name: f.describe() for f in spec.folds}, "seeds": list(spec.seeds),
           "configurations": {k: dataclasses.asdict(v) for k, v in spec.configurations.items()},
           "selection_rule": spec.selection, "ship_rule": spec.ship}
    (out_dir / "results.json").write_text(json.dumps(doc, indent=1, sort_keys=True, default=str))
    cols = [k for k in (table["rows"][0] if table["rows"] else {}) if k != "policy_sharpe_by_seed"]
    csv_lines = [",".join(cols)] + [",".join(str(r[c]) for c in cols) for r in table["rows"]]
    (out_dir / "table.csv").write_text("\n".join(csv_lines) + "\n")
    (out_dir / "table.md").write_text(markdown_table(table))
    return table


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _names(arg: str | None, known: Iterable[str], what: str) -> list[str]:
    known = list(known)
    if not arg:
        return known
    got = [x.strip() for x in arg.split(",") if x.strip()]
    bad = [x for x in got if x not in known]
    if bad:
        raise WalkForwardError(f"--{what}: unknown {bad} (known: {known})")
    return got


def sweep_main(argv: Sequence[str] | None = None, *, default_backend: str = "ray") -> int:
    """``alphapulse train --sweep`` / ``--walk-forward``: seeds x folds x configurations, one table."""
    ap = argparse.ArgumentParser(prog="alphapulse train --sweep",
                                 description="walk-forward runs of the rule-gated policy: seeds x folds x "
                                             "configurations")
    ap.add_argument("--sweep", action="store_true", help="(the mode flag; backend ray unless --backend)")
    ap.add_argument("--walk-forward", action="store_true", help="(the mode flag; backend process unless --backend)")
    ap.add_argument("--config-file", type=Path, default=DEFAULT_CONFIG, help="training config with walk_forward")
    ap.add_argument("--backend", choices=BACKENDS, default=None)
    ap.add_argument("--address", help="an existing Ray cluster (ray backend); default: a local one")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="local parallel runs")
    ap.add_argument("--folds", help="comma-separated fold names (default: all)")
    ap.add_argument("--configs", help="comma-separated configuration names (default: all)")
    ap.add_argument("--seeds", help="comma-separated seeds (default: the config's)")
    ap.add_argument("--out-dir", type=Path, default=Path("var/walkforward"), help="results and models")
    args = ap.parse_args(argv)
    backend = args.backend or ("process" if args.walk_forward and not args.sweep else default_backend)
    try:
        if args.address and backend != "ray":
            raise WalkForwardError("--address needs --backend ray")
        if args.workers < 1:
            raise WalkForwardError(f"--workers: must be >= 1, got {args.workers}")
        spec = load_walk_forward(args.config_file)
        folds = _names(args.folds, [f.name for f in spec.folds], "folds")
        confs = _names(args.configs, spec.configurations, "configs")
        try:
            seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(spec.seeds)
        except ValueError:
            raise WalkForwardError(f"--seeds: comma-separated integers, got {args.seeds!r}") from None
        if any(s < 0 for s in seeds):
            raise WalkForwardError("--seeds: must be >= 0")
        out_dir = args.out_dir.resolve()
        spec_sub = dataclasses.replace(spec, folds=tuple(spec.fold(f) for f in folds),
                                       configurations={c: spec.configurations[c] for c in confs},
                                       seeds=tuple(seeds))
        root = str(REPO_ROOT)
        jobs = [Job(str(args.config_file.resolve()), root, f, c, s, str(out_dir)) for f in folds for c in confs
                for s in seeds]
        bjobs = [BaselineJob(str(args.config_file.resolve()), root, f, p) for f in folds for p in spec.pairs]
        print(f"walk-forward: {len(folds)} folds x {len(confs)} configurations x {len(seeds)} seeds = {len(jobs)} runs "
              f"+ {len(bjobs)} baseline sets on {backend} ({args.workers} workers); selection rule: {spec.selection}",
              flush=True)
        t0 = time.monotonic()
        runs = run_jobs(run_job, jobs, backend, workers=args.workers, address=args.address)
        base = run_jobs(run_baseline_job, bjobs, backend, workers=args.workers, address=args.address)
        table = write_outputs(out_dir, spec_sub, runs, base)
    except (WalkForwardError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(markdown_table(table))
    prod = spec.production_fold
    if prod in table["selections"]:
        conf = table["selections"][prod]["configuration"]
        print(f"ship ({spec.ship}): fold {prod}, configuration {conf}, seed {ship_seed(runs, prod, conf)}")
    print(f"wrote {out_dir / 'results.json'}, table.csv, table.md in {time.monotonic() - t0:.0f} s "
          f"({dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC)")
    return 0


__all__ = ["Fold", "Job", "WalkForwardError", "WalkForwardSpec", "build_table", "load_walk_forward", "run_job",
           "run_jobs", "select_configuration", "ship_seed", "sweep_main", "train_fold_model"]


# --------------------------------------------------------------------------------------------
# The shipped model: a training.yaml profile with ``algorithm: gated_rule``
# --------------------------------------------------------------------------------------------

SHIPPED_MODEL = REPO_ROOT / "alphapulse" / "models" / "gated_rule_1h.onnx"


def gated_profile(profile: str, path: Path = DEFAULT_CONFIG) -> dict[str, Any] | None:
    """``profiles.<profile>`` when it names ``algorithm: gated_rule`` (with ``gate: {fold, configuration, seed}``),
    else None (a PPO profile, for :mod:`alphapulse.training.train`)."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None  # train_main reports the unreadable file itself
    prof = (doc.get("profiles") or {}).get(profile) if isinstance(doc, dict) else None
    if not isinstance(prof, dict) or prof.get("algorithm") != "gated_rule":
        return None
    sec = f"{path.name}:profiles.{profile}"
    _mapping(sec, prof, {"algorithm", "gate"})
    gate = _mapping(f"{sec}.gate", prof.get("gate"), {"fold", "configuration", "seed"})
    if set(gate) != {"fold", "configuration", "seed"}:
        raise WalkForwardError(f"{sec}.gate: needs fold, configuration and seed")
    return gate


def production_main(gate: Mapping[str, Any], path: Path, out: Path | None) -> int:
    """Train the pinned (fold, configuration, seed) on its fold's training days and export it (default: the
    package's shipped model path); the same library versions give the same bytes as the walk-forward run."""
    try:
        spec = load_walk_forward(path)
        fold = spec.fold(str(gate["fold"]))
        conf = str(gate["configuration"])
        if conf not in spec.configurations:
            raise WalkForwardError(f"gate.configuration: unknown {conf!r} (known: {list(spec.configurations)})")
        seed = gate["seed"]
        if not isinstance(seed, int) or seed < 0:
            raise WalkForwardError(f"gate.seed: must be an integer >= 0, got {seed!r}")
        target = out or SHIPPED_MODEL
        name = model_name(fold.name, conf, seed)
        tmp = target.parent / f".{name}.build" / f"{name}.onnx"
        _actor, info = train_fold_model(spec, fold, conf, seed, tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)
        tmp.parent.rmdir()
    except (WalkForwardError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"fold {fold.name} ({fold.describe()['train']} training days: {info['training_days']}), configuration "
          f"{conf}, seed {seed}; gate share on training days (k=0, 1/2, 1): {info['train_gate_share']}")
    print(f"wrote {target} sha256 {info['model_sha256']}")
    return 0
