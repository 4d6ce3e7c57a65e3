"""``alphapulse backtest``: argument handling and output for :mod:`alphapulse.backtest`."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import orjson

from alphapulse.backtest import (
    DEFAULT_FUNDING_SOURCE,
    BacktestError,
    infer_market,
    parse_time,
    run_backtest,
    select,
)
from alphapulse.builder import policy_feature_set
from alphapulse.config import ConfigError, load_settings, report_config_error
from alphapulse.domain import TIMEFRAME_MS
from alphapulse.funding import FundingError, FundingSchedule
from alphapulse.market.feed import FeedError
from alphapulse.market.replay import default_replay_file, load_candles
from alphapulse.policy import ModelError, Policy, default_model_path


def load_funding(path: Path | None) -> tuple[FundingSchedule, str]:
    """The funding schedule of ``--funding FILE`` (the default rate outside its coverage), or the default rate."""
    if path is None:
        return FundingSchedule(), DEFAULT_FUNDING_SOURCE
    return FundingSchedule.from_file(path), f"file {path} (default rate outside its coverage)"


def backtest_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="alphapulse backtest",
                                description="replay stored candles through the daemon's own pipeline step")
    p.add_argument("--model", type=Path, help="ONNX model (default: the shipped model)")
    p.add_argument("--data", type=Path, help="candle file in the shared/data format (default: the bundled replay)")
    p.add_argument("--from", dest="start", help="first bar (ISO date/time, UTC)")
    p.add_argument("--to", dest="end", help="end of the period, exclusive (ISO date/time, UTC)")
    p.add_argument("--out", type=Path, help="directory for trades.csv, ai_decisions.json, equity.csv, summary.json "
                   "(default: var/backtests/<symbol>-<timeframe>-<time>)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--streaming-features", action="store_true", help="compute features candle by candle as the "
                   "daemon does (slower; the default batch form is identical to 1e-9)")
    p.add_argument("--funding", type=Path, help="funding rates (timestamp,funding_rate csv[.gz]) booked on the "
                   "position at each funding time (default: 0.01 %% per 8 h at 00/08/16 UTC)")
    args = p.parse_args(argv)
    try:
        settings = load_settings()
        funding, funding_source = load_funding(args.funding)
        policy = Policy.load(args.model or default_model_path())
        data = args.data or default_replay_file(policy.meta.timeframe or settings.timeframe)
        cols = load_candles(data)
        symbol, timeframe = infer_market(data, cols["ts"])
        if policy.meta.timeframe and policy.meta.timeframe != timeframe:
            raise BacktestError(f"{data} holds {timeframe} candles but the model was trained on "
                                f"{policy.meta.timeframe}")
        bar_ms = TIMEFRAME_MS[timeframe]
        start = parse_time(args.start, "--from") if args.start else None
        end = parse_time(args.end, "--to") if args.end else None
        if start is not None and end is not None and end <= start:
            raise BacktestError("--to must be after --from")
        # the features warm up on the bars before --from, so the first bar of the period is decided
        warmup = policy_feature_set(policy).warmup_bars
        cols = select(cols, None if start is None else start - (warmup - 1) * bar_ms, end, bar_ms)
        out = args.out or Path("var/backtests") / f"{symbol}-{timeframe}-{time.strftime('%Y%m%dT%H%M%S')}"
        if out.exists() and any(out.iterdir()):
            raise BacktestError(f"--out {out} is not empty; choose a new directory")
        result = run_backtest(policy, cols, settings, symbol=symbol, timeframe=timeframe, out_dir=out,
                              action_meanings=policy.meta.action_meanings,
                              streaming_features=args.streaming_features, funding=funding,
                              funding_source=funding_source)
    except ConfigError as e:
        return report_config_error(e)
    except (ModelError, FeedError, BacktestError, FundingError) as e:
        print(f"alphapulse backtest: {e}", file=sys.stderr)
        return 1
    summary = result.summary()
    if args.json:
        print(orjson.dumps(summary).decode())
        return 0
    m = summary["metrics"]
    print(f"{symbol} {timeframe} {summary['from']} -> {summary['to']}  {result.candles} candles  "
          f"({summary['candles_per_s']:.0f} candles/s)")
    print(f"equity {summary['initial_equity']} -> {summary['final_equity']}  pnl {summary['pnl']}  fees "
          f"{summary['fees']}  funding {summary['funding']}")
    print(f"funding: {summary['funding_source']}")
    print(f"return {m['total_return'] * 100:.2f}%  sharpe {m['sharpe']:.2f}  sortino {m['sortino']:.2f}  "
          f"max drawdown {m['max_drawdown'] * 100:.2f}%  trades {m['trades']:.0f}  win rate "
          f"{m['win_rate'] * 100:.1f}%")
    print(f"files: {out}")
    return 0
