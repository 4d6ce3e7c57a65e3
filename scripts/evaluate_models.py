"""Evaluate a model on several pairs and disjoint out-of-sample periods, against the baselines.

    .venv/bin/python scripts/evaluate_models.py [--model M] [--data-dir ../shared/data] [--markdown]

Every cell is ``alphapulse evaluate`` (same engine, costs and limits) on one pair and one period of the
model's held-out test split, plus a falling-market window; the last rows aggregate.  The model was chosen
on the validation split only: these numbers were not used to pick it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from alphapulse.backtest import parse_time  # noqa: E402
from alphapulse.config import load_settings  # noqa: E402
from alphapulse.evaluation import EvaluationError, evaluate  # noqa: E402
from alphapulse.policy import Policy, default_model_path  # noqa: E402

PAIRS = ("BTC_USDT", "ETH_USDT", "SOL_USDT", "BNB_USDT")
PERIODS = (
    ("test split", "2024-07-01", "2025-09-01"),
    ("2024 H2 (rising)", "2024-07-01", "2025-01-01"),
    ("2025 Jan-Apr (falling)", "2025-01-20", "2025-04-10"),
    ("2025 Apr-Aug", "2025-04-10", "2025-09-01"),
)
STRATS = ("policy", "buy_and_hold", "sma_crossover", "flat")


def run(model: Path, data_dir: Path) -> list[dict[str, Any]]:
    settings = load_settings(REPO / "config", env={})
    policy = Policy.load(model)
    tf = policy.meta.timeframe
    rows = []
    for pair in PAIRS:
        path = data_dir / f"{pair}-{tf}.csv.gz"
        if not path.exists():
            print(f"skip {pair}: {path} missing", file=sys.stderr)
            continue
        for label, start, end in PERIODS:
            try:
                out = evaluate(policy, path, settings, start_ms=parse_time(start, "from"),
                               end_ms=parse_time(end, "to"))
            except EvaluationError as e:
                print(f"skip {pair} {label}: {e}", file=sys.stderr)
                continue
            rows.append({"pair": pair, "period": label, "from": start, "to": end, **out})
    return rows


def markdown(rows: list[dict[str, Any]], model: str) -> str:
    lines = [f"Model `{model}`; each cell: total return / Sharpe / max drawdown, after fees and slippage.", "",
             "| pair | period | policy | buy & hold | SMA crossover | policy beats both (Sharpe) |",
             "| --- | --- | --- | --- | --- | --- |"]
    wins = 0
    for r in rows:
        s = r["strategies"]

        def cell(name: str, s: dict[str, Any] = s) -> str:
            m = s[name]
            return f"{m['total_return'] * 100:+.1f}% / {m['sharpe']:+.2f} / {m['max_drawdown'] * 100:.1f}%"

        beats = s["policy"]["sharpe"] > max(s["buy_and_hold"]["sharpe"], s["sma_crossover"]["sharpe"])
        wins += beats
        lines.append(f"| {r['pair']} | {r['period']} | {cell('policy')} | {cell('buy_and_hold')} | "
                     f"{cell('sma_crossover')} | {'yes' if beats else 'no'} |")
    lines.append("")
    for name in STRATS:
        sh = [r["strategies"][name]["sharpe"] for r in rows]
        dd = [r["strategies"][name]["max_drawdown"] for r in rows]
        if sh:
            lines.append(f"- {name}: median Sharpe {statistics.median(sh):+.2f}, mean {statistics.mean(sh):+.2f}, "
                         f"worst drawdown {max(dd) * 100:.1f}%")
    lines.append(f"- the policy has the best Sharpe of the three in {wins} of {len(rows)} cells")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=default_model_path())
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    args = ap.parse_args()
    rows = run(args.model, args.data_dir)
    print(markdown(rows, args.model.name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
