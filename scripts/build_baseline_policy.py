#!/usr/bin/env python3
"""Build ``alphapulse/models/baseline_momentum.onnx``: a hand-set momentum/trend rule as an ONNX graph.

This is a baseline for the plumbing, NOT a money maker.  It exists so the daemon, the replay and
the tests have a real model with the exact contract a trained PPO export will have (input
``obs`` [batch, 20] float32, output ``probs`` [batch, 5] softmax, ``alphapulse.*`` metadata)
before any training has happened.  Its weights are set by hand, not trained; on the bundled
2025 BTC data it loses money after fees (``--stats`` prints the numbers).

The rule, in words:

* **trend score** ``s``: a fixed blend of standardised 12- and 48-bar returns, 48-bar momentum,
  48-bar z-score and RSI, scaled to unit standard deviation on the bundled data;
* **logits** ``l_a = BETA * s * t_a + BIAS_a`` for target positions ``t = [-1, -0.5, 0, 0.5, 1]``:
  a strong up-trend favours long targets, a strong down-trend short ones; the biases make "flat"
  the default and full positions need a clearly stronger trend than half ones;
* **stickiness** ``+ STICKINESS * position_frac * t_a``: fewer flip-flops around the threshold;
* **exit when the trend fades** ``+ EXIT_BONUS * |position_frac|`` on "flat": while a position is
  open, flat gets extra weight, so once ``s`` falls back towards zero the model is confidently
  flat and the engine closes the position (without it, nothing would ever close a position
  except a full reversal, because a linear rule's flat confidence cannot depend on whether a
  position is open);
* ``unrealized_pnl_frac`` and the candle-shape/volume features get weight 0.

Graph: ``obs * FEATURE_SCALE + FEATURE_OFFSET`` (standardise) -> ``MatMul`` [20x5] trend weights
``+ MatMul(Abs(z))`` [20x5] exit weights ``+`` bias -> ``Softmax``.

Tuning target (engine confidence threshold 0.6): confident on roughly 2-10% of bars and "flat" as
the argmax on most of the rest, so a replay shows a few trades per day.  ``--stats`` replays the
rule on the bundled data (positions follow confident decisions, as in the engine) and prints the
fractions; the constants below were chosen with it.

The output bytes are deterministic (fixed constants, fixed ``alphapulse.created``, fixed IR and
opset versions), so ``--check`` can verify the shipped file was built from this script.  The
``onnx`` package is a dev-only dependency; the daemon needs only onnxruntime.

Usage::

    .venv/bin/python scripts/build_baseline_policy.py            # write the model and print stats
    .venv/bin/python scripts/build_baseline_policy.py --check    # exit 1 if the shipped file differs
    .venv/bin/python scripts/build_baseline_policy.py --stats    # stats for the shipped file only
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

from alphapulse.features import FEATURE_NAMES, MARKET_FEATURES, batch_market_features  # noqa: E402
from alphapulse.policy import ACTION_MEANINGS, ACTION_TARGETS, contract_metadata  # noqa: E402

if TYPE_CHECKING:
    import onnx

DEFAULT_OUT = ROOT / "alphapulse" / "models" / "baseline_momentum.onnx"
DATA_FILE = ROOT / "alphapulse" / "data" / "BTC_USDT_USDT-5m.csv.gz"

VERSION = "baseline-momentum-1"
CREATED = "2026-11-25"  # fixed, not "now": the file's bytes must not depend on the build date
TIMEFRAME = "5m"
TRAINING_DATA_RANGE = "none: hand-set weights, not trained"
DESCRIPTION = (
    "Hand-set momentum/trend rule for plumbing tests and demos; NOT trained and NOT a money maker "
    "(loses money after fees on the bundled 2025 BTC data). Built by scripts/build_baseline_policy.py."
)
CONFIDENCE_THRESHOLD = 0.6  # the engine's default; only used here to report/tune the rule
FEE_RATE = 0.0005  # taker fee per unit of turnover, for the rough PnL in --stats only
IR_VERSION = 8  # readable by onnxruntime >= 1.14; pinned so the bytes do not follow the onnx package
OPSET = 17

FLAT = ACTION_MEANINGS.index("flat")

# (centre, typical scale) per feature: rounded medians/standard deviations on the bundled data, so
# that every standardised feature is O(1).  Signed features are centred on exactly 0 so the rule
# has no built-in long/short bias; position features are already in [-1, 1].
FEATURE_STANDARDISATION: dict[str, tuple[float, float]] = {
    "ret_1": (0.0, 0.0014),
    "ret_3": (0.0, 0.0024),
    "ret_6": (0.0, 0.0034),
    "ret_12": (0.0, 0.0048),
    "ret_24": (0.0, 0.0067),
    "ret_48": (0.0, 0.0095),
    "vol_12": (0.00088, 0.00081),
    "vol_48": (0.00098, 0.00076),
    "rsi_14": (0.0, 0.31),
    "mom_12": (0.0, 0.0026),
    "mom_48": (0.0, 0.0054),
    "zscore_48": (0.0, 1.4),
    "range_1": (0.0013, 0.0016),
    "body_1": (0.0, 0.0014),
    "upper_wick_1": (0.00023, 0.00058),
    "lower_wick_1": (0.00023, 0.00059),
    "volume_ratio_12": (0.6, 0.29),
    "volume_ratio_48": (0.55, 0.36),
    "position_frac": (0.0, 1.0),
    "unrealized_pnl_frac": (0.0, 1.0),
}

# Trend score s = sum(w * standardised feature) / TREND_SCORE_STD  (std of the sum on the bundled data,
# rounded), so s is in "standard deviations of trend".
TREND_WEIGHTS: dict[str, float] = {
    "ret_12": 0.5,
    "ret_48": 1.0,
    "mom_48": 1.0,
    "zscore_48": 0.5,
    "rsi_14": 0.5,
}
TREND_SCORE_STD = 3.0
BETA = 2.0  # logit slope per unit of s and of target position
ACTION_BIAS: tuple[float, ...] = (-2.5, -1.0, 0.0, -1.0, -2.5)  # flat by default; full needs a stronger trend
STICKINESS = 1.0  # position_frac * target: prefer staying on the side already held
EXIT_BONUS = 1.0  # |position_frac| -> flat: leave once the trend has faded


def parameters() -> dict[str, np.ndarray]:
    """The graph's constants as float32 arrays, derived from the hand-set values above."""
    names = list(FEATURE_NAMES)
    if set(FEATURE_STANDARDISATION) != set(names):
        raise SystemExit(
            f"FEATURE_STANDARDISATION does not match FEATURE_NAMES: {sorted(set(names) ^ set(FEATURE_STANDARDISATION))}"
        )
    targets = np.asarray(ACTION_TARGETS, dtype=np.float64)
    scale = np.array([1.0 / FEATURE_STANDARDISATION[n][1] for n in names])
    offset = np.array([-FEATURE_STANDARDISATION[n][0] / FEATURE_STANDARDISATION[n][1] for n in names])
    trend = np.zeros((len(names), len(targets)))
    for name, w in TREND_WEIGHTS.items():
        trend[names.index(name)] = BETA * w / TREND_SCORE_STD * targets
    trend[names.index("position_frac")] = STICKINESS * targets
    exit_w = np.zeros((len(names), len(targets)))
    exit_w[names.index("position_frac"), FLAT] = EXIT_BONUS
    return {
        "feature_scale": scale.astype(np.float32),
        "feature_offset": offset.astype(np.float32),
        "trend_weights": trend.astype(np.float32),
        "exit_weights": exit_w.astype(np.float32),
        "action_bias": np.asarray(ACTION_BIAS, dtype=np.float32),
    }


def metadata() -> dict[str, str]:
    return contract_metadata(kind="baseline", version=VERSION, timeframe=TIMEFRAME,
                             training_data_range=TRAINING_DATA_RANGE, created=CREATED,
                             extra={"description": DESCRIPTION})


def build_model() -> onnx.ModelProto:
    """The baseline as an ONNX model, checked with onnx.checker (onnx is imported here: dev-only dependency)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    params = parameters()
    n_obs, n_act = len(FEATURE_NAMES), len(ACTION_TARGETS)
    nodes = [
        helper.make_node("Mul", ["obs", "feature_scale"], ["obs_scaled"], name="standardise_scale"),
        helper.make_node("Add", ["obs_scaled", "feature_offset"], ["z"], name="standardise_centre"),
        helper.make_node("MatMul", ["z", "trend_weights"], ["trend_logits"], name="trend_rule"),
        helper.make_node("Abs", ["z"], ["z_abs"], name="abs_features"),
        helper.make_node("MatMul", ["z_abs", "exit_weights"], ["exit_logits"], name="exit_rule"),
        helper.make_node("Add", ["trend_logits", "exit_logits"], ["rule_logits"], name="combine_rules"),
        helper.make_node("Add", ["rule_logits", "action_bias"], ["logits"], name="action_bias"),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "baseline_momentum",
        [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["batch", n_obs])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", n_act])],
        initializer=[numpy_helper.from_array(arr, name) for name, arr in params.items()],
        doc_string=DESCRIPTION,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="alphapulse/scripts/build_baseline_policy.py",
        producer_version=VERSION,
        doc_string=DESCRIPTION,
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(model, metadata())
    onnx.checker.check_model(model, full_check=True)
    return model


def model_bytes() -> bytes:
    return bytes(build_model().SerializeToString(deterministic=True))


# ------------------------------------------------------------------------------------------
# Replay statistics on the real bundled data
# ------------------------------------------------------------------------------------------


def load_bundled(path: Path = DATA_FILE) -> tuple[np.ndarray, np.ndarray]:
    """``(market features, close)`` for every complete bar of the bundled candle file (warm-up rows dropped)."""
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",", skiprows=1, dtype=np.float64)
    feats = batch_market_features(data[:, 1], data[:, 2], data[:, 3], data[:, 4], data[:, 5])
    keep = ~np.isnan(feats).any(axis=1)
    return feats[keep], data[keep, 4]


def replay_stats(
    model_path: Path, market: np.ndarray, close: np.ndarray | None = None, threshold: float = CONFIDENCE_THRESHOLD
) -> dict[str, float]:
    """Replay the model like the engine: act only on confident decisions, feed the position back.

    position_frac is taken as the last confident target (price drift of the open position is
    ignored) and unrealized_pnl_frac as 0 (the rule gives it weight 0).  Positions take only the
    5 target values, so the model is evaluated once per value over the whole history and the
    sequential part is plain indexing.  With ``close``, also a rough PnL: the sum of
    ``target * next-bar log return`` and the same minus ``FEE_RATE`` per unit of turnover.
    """
    from alphapulse.policy import Policy

    policy = Policy.load(model_path)
    targets = policy.meta.action_targets
    n = market.shape[0]
    pos_col = FEATURE_NAMES.index("position_frac")
    obs = np.zeros((n, len(FEATURE_NAMES)), dtype=np.float32)
    obs[:, : len(MARKET_FEATURES)] = market
    argmax, conf = [], []
    for target in targets:
        obs[:, pos_col] = target
        probs = policy.predict_batch(obs)
        argmax.append(probs.argmax(axis=1))
        conf.append(probs.max(axis=1))
    state = targets.index(0.0)
    held = np.empty(n)
    confident = flat_argmax = trades = 0
    for i in range(n):
        a = int(argmax[state][i])
        flat_argmax += targets[a] == 0.0
        if conf[state][i] >= threshold:
            confident += 1
            if a != state:
                trades += 1
                state = a
        held[i] = targets[state]
    stats = {
        "bars": float(n),
        "confident_frac": confident / n,
        "flat_argmax_frac": flat_argmax / n,
        "trades_per_day": trades / (n / 288.0),
        "time_in_market_frac": float(np.mean(held != 0.0)),
    }
    if close is not None:
        gross = float(np.sum(held[:-1] * np.diff(np.log(close))))
        turnover = float(np.sum(np.abs(np.diff(held, prepend=0.0))))
        stats["gross_log_return"] = gross
        stats["net_log_return"] = gross - FEE_RATE * turnover
    return stats


def _print_stats(model_path: Path) -> dict[str, float]:
    market, close = load_bundled()
    stats = replay_stats(model_path, market, close)
    print(
        f"{model_path.name} on {DATA_FILE.name} ({int(stats['bars'])} bars, threshold {CONFIDENCE_THRESHOLD}): "
        f"confident {stats['confident_frac']:.1%}, flat argmax {stats['flat_argmax_frac']:.1%}, "
        f"{stats['trades_per_day']:.1f} trades/day, in market {stats['time_in_market_frac']:.1%}, "
        f"log return {stats['gross_log_return']:+.3f} before fees, {stats['net_log_return']:+.3f} after "
        f"{FEE_RATE:.2%} per unit of turnover"
    )
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output path (default: the shipped model)")
    ap.add_argument("--check", action="store_true", help="do not write; exit 1 if --out differs from a fresh build")
    ap.add_argument("--stats", action="store_true", help="do not build; print replay stats of --out")
    args = ap.parse_args(argv)

    if args.stats:
        _print_stats(args.out)
        return 0
    data = model_bytes()
    if args.check:
        current = args.out.read_bytes() if args.out.exists() else b""
        if current != data:
            print(f"{args.out} differs from a fresh build ({len(current)} vs {len(data)} bytes)", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date ({len(data)} bytes)")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".onnx.tmp")
    tmp.write_bytes(data)
    tmp.replace(args.out)
    print(f"wrote {args.out} ({len(data)} bytes)")
    stats = _print_stats(args.out)
    if not 0.02 <= stats["confident_frac"] <= 0.10:
        print("WARNING: confident fraction outside the 2-10% target; retune the constants", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
