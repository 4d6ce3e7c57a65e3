"""Out-of-sample evaluation of a model against simple baselines, and model-file validation.

``alphapulse evaluate`` runs the policy and the baselines (buy-and-hold, always flat, SMA crossover and the
volatility-targeted time-series momentum rule, TSMOM) through :func:`alphapulse.backtest.run_backtest` on the
same evaluated bars, costs (fees, slippage, funding) and position size, and reports the metrics of
:mod:`alphapulse.performance` side by side.  Each strategy runs on its own feature set (SMA on ``short_v1``,
TSMOM on ``trend_v1``, the policy on its model's), warmed up on the candles *before* the evaluated period, so
every row covers the same bars; a strategy whose warm-up the file cannot supply is reported as not run.
``--validate`` checks a model file and names every
problem it finds.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from alphapulse.backtest import DEFAULT_FUNDING_SOURCE, BacktestError, infer_market, parse_time, run_backtest, select
from alphapulse.baselines import TsMomentum, baselines, trend_baselines
from alphapulse.builder import policy_cadence, policy_feature_set
from alphapulse.config import ConfigError, Settings, load_settings, report_config_error
from alphapulse.domain import TIMEFRAME_MS
from alphapulse.engine import Cadence
from alphapulse.funding import FundingError, FundingSchedule
from alphapulse.market.feed import FeedError
from alphapulse.market.replay import load_candles
from alphapulse.performance import summarize
from alphapulse.policy import ModelError, Policy, default_model_path, read_model_meta
from alphapulse.store import iso_ms

PERIODS = {"7d": 7 * 86_400_000, "30d": 30 * 86_400_000, "all": None}
QUICK_BARS = 2_000
METRIC_KEYS = ("total_return", "sharpe", "sortino", "max_drawdown", "calmar", "win_rate", "profit_factor", "trades",
               "exposure", "turnover", "fees")
DATA_DIR = Path(__file__).resolve().parent / "data"


class EvaluationError(Exception):
    pass


def default_data_file(timeframe: str) -> Path:
    """The bundled candles of the model's timeframe."""
    matches = sorted(DATA_DIR.glob(f"*-{timeframe}*.csv.gz"))
    if not matches:
        raise EvaluationError(f"no bundled data for timeframe {timeframe}; pass --data FILE")
    return matches[0]


def _test_split(policy: Policy) -> tuple[int | None, int | None]:
    """The model's test split from its metadata, if it records one."""
    raw = policy.meta.extra.get("alphapulse.data_split")
    if not raw:
        return None, None
    try:
        splits = orjson.loads(raw)
        return parse_time(splits["test_start"], "splits"), parse_time(splits["test_end"], "splits")
    except (orjson.JSONDecodeError, KeyError, BacktestError, TypeError):
        return None, None


def not_enough_history(ts: np.ndarray, warmup_bars: int, first_i: int) -> str:
    """Why a strategy cannot run on these bars, and the earliest ``--from`` at which it can.

    A long warm-up (TSMOM: 90 days) comes from the candles before the evaluated period; when the period starts too
    near the start of the file (the bundled 1h file with the model's test split), the way out is a later start,
    named here as a date so the user need not count bars."""
    head = f"not enough history (needs {warmup_bars} bars, {first_i + 1} up to the first evaluated bar; "
    if len(ts) < warmup_bars:
        return head + f"the file has {len(ts)}: pass a --data file that starts earlier)"
    day = 86_400_000
    earliest = int(ts[warmup_bars - 1])  # the first bar whose warm-up the file holds
    start = -(-earliest // day) * day  # that bar's UTC day, or the next one when it starts later in the day
    if start > int(ts[-1]):
        return head + f"the first bar it can evaluate is {iso_ms(earliest)}: evaluate from there with --from)"
    day_text = iso_ms(start)[:10]
    return head + f"evaluate from {day_text} or later with --from {day_text}, or a shorter --period)"


def _plain(settings: Settings) -> Settings:
    """The baselines' settings: the daemon's costs and position size, but no halts and fixed-fraction sizing.

    No daily-loss or drawdown halt, which would otherwise stop buy-and-hold at its first 12 % dip and flatter the
    comparison; no engine vol targeting (TSMOM sizes itself, the others are the plain fixed-size strategies)."""
    return dataclasses.replace(settings, risk=dataclasses.replace(
        settings.risk, daily_loss_limit_frac=1.0, max_drawdown_frac=1.0, target_vol=0.0))


def run_baseline(strat: Any, full: dict[str, np.ndarray], first_i: int, end_i: int, plain: Settings, *,
                 symbol: str, timeframe: str, funding: FundingSchedule | None, funding_source: str | None,
                 keep_curve: bool = False) -> dict[str, Any]:
    """One baseline over bars ``first_i .. end_i - 1`` of ``full`` (valid candles), warmed up on the bars before.

    Returns the metrics of :data:`METRIC_KEYS` (plus ``final_equity``, ``funding``; with ``keep_curve`` the
    evaluated ``equity`` array too), or ``{"skipped": reason}``.  Shared by ``evaluate`` and the walk-forward
    (:mod:`alphapulse.training.walkforward`), so both measure the baselines the same way."""
    bar_ms = TIMEFRAME_MS[timeframe]
    fs = policy_feature_set(strat)
    if fs.timeframe is not None and fs.timeframe != timeframe:
        return {"skipped": f"needs {fs.timeframe} candles ({fs.name} features)"}
    lo = first_i - (fs.warmup_bars - 1)
    if lo < 0:
        return {"skipped": not_enough_history(full["ts"], fs.warmup_bars, first_i)}
    cadence = policy_cadence(strat)
    if isinstance(strat, TsMomentum):  # the rule decides once a day, so the engine asks it once a day
        strat.reset()
        cadence = Cadence(86_400_000 // bar_ms, strat.decision_hour_utc)
    sub = {k: v[lo:end_i] for k, v in full.items()}
    res = run_backtest(strat, sub, plain, symbol=symbol, timeframe=timeframe, funding=funding,
                       funding_source=funding_source, cadence=cadence)
    skip = fs.warmup_bars - 1
    m = summarize(res.equity[skip:], res.position[skip:], res.fills, bar_ms)
    out: dict[str, Any] = {k: m[k] for k in METRIC_KEYS} | {"final_equity": float(res.final_equity),
                                                            "funding": float(res.funding)}
    if keep_curve:
        out["equity"] = res.equity[skip:]
    return out


def evaluate(policy: Policy, data: Path, settings: Settings, *, period: str = "all", quick: bool = False,
             use_test_split: bool = False, start_ms: int | None = None, end_ms: int | None = None,
             funding: FundingSchedule | None = None, funding_source: str | None = None) -> dict[str, Any]:
    """Run the policy and the baselines over the same candles; returns the JSON-ready result.

    ``funding`` defaults to the default rate (:class:`FundingSchedule`), booked for every strategy alike."""
    try:
        cols = load_candles(data)
    except FeedError as e:
        raise EvaluationError(str(e)) from None
    symbol, timeframe = infer_market(data, cols["ts"])
    if policy.meta.timeframe and timeframe != policy.meta.timeframe:
        raise EvaluationError(f"{data} holds {timeframe} candles but model {policy.meta.version} was trained on "
                              f"{policy.meta.timeframe}; pass a {policy.meta.timeframe} file")
    if funding is None:
        funding, funding_source = FundingSchedule(), DEFAULT_FUNDING_SOURCE
    bar_ms = TIMEFRAME_MS[timeframe]
    full = cols = select(cols, None, None, bar_ms)
    warmup = policy_feature_set(policy).warmup_bars
    start, end = _test_split(policy) if use_test_split else (start_ms, end_ms)
    if start is not None or end is not None:
        lo = -(2**62) if start is None else start - (warmup - 1) * bar_ms  # warm up before the period
        keep = (cols["ts"] >= lo) & (cols["ts"] < (end if end is not None else 2**62))
        if keep.sum() > warmup * 2 or not use_test_split:
            cols = {k: v[keep] for k, v in cols.items()}
    span = PERIODS[period]
    if span is not None and len(cols["ts"]):
        cols = {k: v[cols["ts"] >= cols["ts"][-1] + bar_ms - span - (warmup - 1) * bar_ms]
                for k, v in cols.items()}
    if quick:
        cols = {k: v[-(QUICK_BARS + warmup - 1):] for k, v in cols.items()}
    if len(cols["ts"]) <= warmup:
        raise EvaluationError(f"{data}: only {len(cols['ts'])} valid candles in the period; need more than "
                              f"{warmup}")
    strategies: dict[str, Any] = {}
    first = warmup - 1  # the first bar with a decision: metrics cover the decided bars only
    # Where the evaluated bars lie in the whole (valid) file: each baseline warms up on the candles before them.
    first_i = int(np.searchsorted(full["ts"], cols["ts"][first]))
    end_i = int(np.searchsorted(full["ts"], cols["ts"][-1], side="right"))
    plain = _plain(settings)
    tsmom_tv = settings.risk.target_vol if settings.risk.target_vol > 0 else 0.10
    runs: dict[str, Any] = {"policy": policy, **baselines(),
                            **trend_baselines(target_vol=tsmom_tv, max_position_frac=settings.risk.max_position_frac)}
    for name, strat in runs.items():
        if name == "policy":
            res = run_backtest(strat, cols, settings, symbol=symbol, timeframe=timeframe, funding=funding,
                               funding_source=funding_source)
            m = summarize(res.equity[first:], res.position[first:], res.fills, bar_ms)
            strategies[name] = {k: m[k] for k in METRIC_KEYS} | {"final_equity": float(res.final_equity),
                                                                 "funding": float(res.funding)}
            continue
        strategies[name] = run_baseline(strat, full, first_i, end_i, plain, symbol=symbol, timeframe=timeframe,
                                        funding=funding, funding_source=funding_source)
    return {
        "data": {"file": str(data), "symbol": symbol, "timeframe": timeframe,
                 "from": iso_ms(int(cols["ts"][first])), "to": iso_ms(int(cols["ts"][-1]) + bar_ms),
                 "candles": int(len(cols["ts"]) - first)},
        "model": {"path": str(policy.path), "version": policy.meta.version, "kind": policy.meta.kind,
                  "training_data_range": policy.meta.training_data_range,
                  "feature_set": policy.meta.feature_set_name, "warmup_bars": warmup,
                  "decision_every_bars": policy.meta.decision_every_bars,
                  "decision_hour_utc": policy.meta.decision_hour_utc},
        "costs": {"taker_fee": float(settings.taker_fee), "slippage_bps": float(settings.slippage_bps),
                  "max_position_pct": settings.risk.max_position_frac * 100,
                  "confidence_threshold": settings.confidence_threshold,
                  "funding": funding_source,
                  "policy_limits": "daemon's (daily loss, drawdown halt)", "baseline_limits": "no halts",
                  "tsmom_target_vol": tsmom_tv},
        "strategies": strategies,
    }


def format_table(result: dict[str, Any]) -> str:
    d = result["data"]
    lines = [f"{d['symbol']} {d['timeframe']}  {d['from']} -> {d['to']}  ({d['candles']} candles)  "
             f"model {result['model']['version']}",
             f"costs: taker fee {result['costs']['taker_fee'] * 100:.3f}%, slippage {result['costs']['slippage_bps']}"
             f" bps; max position {result['costs']['max_position_pct']:.0f}% of equity; the policy trades under the "
             "daemon's risk limits, the baselines without halts",
             f"funding: {result['costs']['funding']}"]
    mdl = result["model"]
    if mdl.get("warmup_bars", 0) > 1:  # say where the period starts, so a later --from than asked is no surprise
        hour = mdl["decision_hour_utc"]
        cadence = "every bar" if mdl["decision_every_bars"] == 1 else f"every {mdl['decision_every_bars']} bars" + (
            f", on the bar closing at {hour:02d}:00 UTC" if hour is not None else "")
        lines.append(f"warm-up: {mdl['warmup_bars']} {d['timeframe']} bars of {mdl['feature_set']} features up to "
                     f"{d['from']}, from the file before it; the policy decides {cadence}")
    lines.append("")
    head = f"{'strategy':<17}{'return':>9}{'sharpe':>8}{'sortino':>9}{'max dd':>8}{'calmar':>8}{'win':>7}" \
           f"{'pf':>7}{'trades':>8}{'expo':>7}{'turn':>8}{'fees':>10}"
    lines += [head, "-" * len(head)]
    for name, m in result["strategies"].items():
        if "skipped" in m:
            lines.append(f"{name:<17}{m['skipped']}")
            continue
        lines.append(f"{name:<17}{m['total_return'] * 100:>8.2f}%{m['sharpe']:>8.2f}{m['sortino']:>9.2f}"
                     f"{m['max_drawdown'] * 100:>7.2f}%{m['calmar']:>8.2f}{m['win_rate'] * 100:>6.1f}%"
                     f"{min(m['profit_factor'], 999):>7.2f}{m['trades']:>8.0f}{m['exposure'] * 100:>6.1f}%"
                     f"{m['turnover']:>8.2f}{m['fees']:>10.2f}")
    return "\n".join(lines)


# ---- model validation ---------------------------------------------------------------------------------


def validate_model(path: Path) -> list[str]:
    """Every problem found in a model file (empty when it is fit to trade)."""
    problems: list[str] = []
    if not path.is_file():
        return [f"{path}: no such file"]
    try:
        import onnx

        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:  # the checker raises many types; each becomes one named problem
        problems.append(f"onnx checker: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    try:
        meta = read_model_meta(path)
    except ModelError as e:
        problems.append(f"metadata: {e.problem}")
        return problems
    for key in ("version", "timeframe", "training_data_range"):
        if not getattr(meta, key):
            problems.append(f"metadata: alphapulse.{key} is empty")
    try:
        policy = Policy.load(path)
    except ModelError as e:
        problems.append(f"contract: {e.problem}")
        return problems
    rng = np.random.default_rng(0)
    obs = rng.normal(0, 0.01, size=(64, meta.obs_size)).astype(np.float32)
    a, b = policy.predict_batch(obs), policy.predict_batch(obs)
    if not np.array_equal(a, b):
        problems.append("output is not deterministic: two runs on the same input differ")
    if not np.all(np.isfinite(a)) or not np.allclose(a.sum(axis=1), 1.0, atol=1e-4):
        problems.append("output is not a probability distribution (rows must be finite and sum to 1)")
    one = policy.decide(obs[0].tolist(), 0, "CHECK")
    if not np.allclose(np.array(one.probabilities), a[0], atol=1e-6):
        problems.append("single-row and batch inference disagree")
    if list(meta.feature_names) != list(meta.feature_set.feature_names):
        problems.append(f"feature names differ from feature set {meta.feature_set_name}'s")
    return problems


def evaluate_main(argv: Sequence[str] | None = None, settings: Settings | None = None) -> int:
    p = argparse.ArgumentParser(prog="alphapulse evaluate",
                                description="out-of-sample results of a model against buy-and-hold, flat, SMA "
                                "and TSMOM")
    p.add_argument("--model", type=Path, help="ONNX model (default: the shipped model)")
    p.add_argument("--data", type=Path, help="candle file in the shared/data format (default: the model's test "
                   "split of the bundled candles)")
    p.add_argument("--period", choices=tuple(PERIODS), default="all", help="keep the last 7 or 30 days")
    p.add_argument("--from", dest="start", help="first bar to evaluate (ISO date/time, UTC)")
    p.add_argument("--to", dest="end", help="end of the evaluated period, exclusive (ISO date/time, UTC)")
    p.add_argument("--quick", action="store_true", help=f"at most the last {QUICK_BARS} candles")
    p.add_argument("--funding", type=Path, help="funding rates (timestamp,funding_rate csv[.gz]) booked for every "
                   "strategy (default: 0.01 %% per 8 h at 00/08/16 UTC)")
    p.add_argument("--validate", action="store_true", help="check the model file and exit")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    model = args.model or default_model_path()
    if args.validate:
        problems = validate_model(model)
        if args.json:
            print(orjson.dumps({"model": str(model), "ok": not problems, "problems": problems}).decode())
        else:
            for prob in problems:
                print(f"{model}: {prob}", file=sys.stderr)
            if not problems:
                print(f"{model}: ok")
        return 1 if problems else 0
    try:
        settings = settings or load_settings()
        policy = Policy.load(model)
        data = args.data or default_data_file(policy.meta.timeframe)
        start = parse_time(args.start, "--from") if args.start else None
        end = parse_time(args.end, "--to") if args.end else None
        from alphapulse.backtest_cli import load_funding

        funding, funding_source = load_funding(args.funding)
        result = evaluate(policy, data, settings, period=args.period, quick=args.quick,
                          use_test_split=args.data is None and start is None and end is None,
                          start_ms=start, end_ms=end, funding=funding, funding_source=funding_source)
    except ConfigError as e:
        return report_config_error(e)
    except (ModelError, EvaluationError, BacktestError, FundingError) as e:
        print(f"alphapulse evaluate: {e}", file=sys.stderr)
        return 1
    print(orjson.dumps(result).decode() if args.json else format_table(result))
    return 0
