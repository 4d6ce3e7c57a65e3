"""Policy stage: the shipped model, the Decision it produces, and refusal of models that do not fit.

Observations come from the real bundled candles (alphapulse/data/BTC_USDT_USDT-5m.csv.gz) through
the real feature pipeline, so these tests exercise the numbers the daemon will actually see.
Models with deliberately wrong contracts are built with the ``onnx`` package (dev/test extra);
those tests skip when it is not installed.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from alphapulse.domain import Decision
from alphapulse.features import FEATURE_NAMES, batch_market_features, observation
from alphapulse.policy import ModelError, ModelMeta, Policy, baseline_model_path, read_model_meta

ROOT = Path(__file__).resolve().parents[1]
DATA_FILE = ROOT / "alphapulse" / "data" / "BTC_USDT_USDT-5m.csv.gz"
BUILD_SCRIPT = ROOT / "scripts" / "build_baseline_policy.py"
TARGETS = [-1.0, -0.5, 0.0, 0.5, 1.0]
MEANINGS = ["short_full", "short_half", "flat", "long_half", "long_full"]


# ------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def candles() -> np.ndarray:
    with gzip.open(DATA_FILE, "rt") as f:
        return np.loadtxt(f, delimiter=",", skiprows=1, dtype=np.float64)


@pytest.fixture(scope="module")
def market(candles: np.ndarray) -> np.ndarray:
    feats = batch_market_features(candles[:, 1], candles[:, 2], candles[:, 3], candles[:, 4], candles[:, 5])
    return feats[~np.isnan(feats).any(axis=1)]


@pytest.fixture(scope="module")
def real_obs(market: np.ndarray) -> np.ndarray:
    """3,000 real observations spread over the whole file, with every position state and some PnL."""
    rows = market[np.linspace(0, market.shape[0] - 1, 3000).astype(int)]
    rng = np.random.default_rng(7)
    positions = np.array(TARGETS)[np.arange(rows.shape[0]) % len(TARGETS)]
    pnl = np.where(positions != 0.0, rng.normal(0.0, 0.01, rows.shape[0]), 0.0)
    return np.array([observation(r, p, u) for r, p, u in zip(rows, positions, pnl, strict=True)], dtype=np.float64)


@pytest.fixture(scope="module")
def policy() -> Iterator[Policy]:
    p = Policy.load(baseline_model_path())
    p.warmup(50)
    yield p


def _onnx() -> Any:
    return pytest.importorskip("onnx", reason="the onnx package (dev/test extra) is needed to build test models")


def _load_build_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_baseline_policy", BUILD_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def good_metadata(**overrides: str) -> dict[str, str]:
    meta = {
        "alphapulse.feature_names": json.dumps(list(FEATURE_NAMES)),
        "alphapulse.obs_size": str(len(FEATURE_NAMES)),
        "alphapulse.action_targets": json.dumps(TARGETS),
        "alphapulse.action_meanings": json.dumps(MEANINGS),
        "alphapulse.version": "test-1",
        "alphapulse.kind": "ppo",
        "alphapulse.timeframe": "5m",
        "alphapulse.training_data_range": "2025-01-01..2025-06-30",
        "alphapulse.created": "2026-01-01T00:00:00Z",
        "alphapulse.note": "built by tests/test_policy.py",
    }
    meta.update(overrides)
    return meta


def write_model(
    path: Path,
    *,
    metadata: dict[str, str] | None = None,
    drop: tuple[str, ...] = (),
    n_in: int = len(FEATURE_NAMES),
    n_out: int = len(TARGETS),
    input_name: str = "obs",
    output_name: str = "probs",
    batch_dim: str | int = "batch",
    softmax: bool = True,
    seed: int = 0,
) -> Path:
    """A small linear+softmax policy with a chosen (possibly wrong) contract, written with the onnx package."""
    onnx = _onnx()
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).normal(0.0, 0.5, (n_in, n_out)).astype(np.float32)
    nodes = [helper.make_node("MatMul", [input_name, "w"], ["logits" if softmax else output_name])]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], [output_name], axis=1))
    graph = helper.make_graph(
        nodes,
        "test_policy",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch_dim, n_in])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch_dim, n_out])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    props = {k: v for k, v in (metadata if metadata is not None else good_metadata()).items() if k not in drop}
    helper.set_model_props(model, props)
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def assert_clean_model_error(excinfo: pytest.ExceptionInfo[ModelError], path: Path, *fragments: str) -> None:
    """A ModelError naming the file and the problem, not a chained ONNX Runtime exception."""
    err = excinfo.value
    msg = str(err)
    assert str(path) in msg, msg
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    assert type(err) is ModelError
    assert err.__cause__ is None
    assert err.__context__ is None or err.__suppress_context__


# ------------------------------------------------------------------------------------------
# the shipped model
# ------------------------------------------------------------------------------------------


def test_shipped_model_metadata(policy: Policy) -> None:
    path = baseline_model_path()
    assert path.is_file() and path.name == "baseline_momentum.onnx"
    assert path.stat().st_size < 20_000
    meta = read_model_meta(path)
    assert meta == policy.meta
    assert policy.path == path
    assert meta.kind == "baseline"
    assert meta.feature_names == FEATURE_NAMES
    assert meta.obs_size == len(FEATURE_NAMES) == 20
    assert meta.action_targets == tuple(TARGETS)
    assert meta.action_meanings == tuple(MEANINGS)
    assert meta.timeframe == "5m"
    assert meta.training_data_range == "none: hand-set weights, not trained"
    assert meta.version
    assert meta.created == meta.extra["alphapulse.created"] != ""
    assert "not a money maker" in meta.extra["alphapulse.description"].lower()


def test_decide_returns_valid_decision(policy: Policy, real_obs: np.ndarray) -> None:
    obs = real_obs[123].tolist()
    d = policy.decide(obs, candle_ts=1_735_603_200_000, symbol="BTC/USDT:USDT")
    assert isinstance(d, Decision)
    assert d.candle_ts == 1_735_603_200_000 and d.symbol == "BTC/USDT:USDT"
    assert len(d.probabilities) == 5
    assert all(isinstance(p, float) and 0.0 <= p <= 1.0 for p in d.probabilities)
    assert math.isclose(sum(d.probabilities), 1.0, abs_tol=1e-5)
    assert d.action == max(range(5), key=d.probabilities.__getitem__)
    assert d.confidence == max(d.probabilities) == d.probabilities[d.action]
    assert d.target == TARGETS[d.action]
    assert 0.0 < d.inference_us < 100_000.0


def test_decide_accepts_numpy_row(policy: Policy, real_obs: np.ndarray) -> None:
    a = policy.decide(real_obs[5], 1, "X")
    b = policy.decide(real_obs[5].tolist(), 1, "X")
    assert a.probabilities == b.probabilities


def test_decide_is_deterministic(policy: Policy, real_obs: np.ndarray) -> None:
    first = [policy.decide(row.tolist(), i, "BTC") for i, row in enumerate(real_obs[:200])]
    # Interleave other inputs so stale buffers would show up as a difference.
    policy.decide(real_obs[-1].tolist(), 0, "BTC")
    second = [policy.decide(row.tolist(), i, "BTC") for i, row in enumerate(real_obs[:200])]
    assert [d.probabilities for d in first] == [d.probabilities for d in second]
    assert [d.action for d in first] == [d.action for d in second]
    # And a second, independently loaded session agrees bit for bit.
    other = Policy.load(baseline_model_path())
    assert [other.decide(r.tolist(), 0, "BTC").probabilities for r in real_obs[:200]] == [
        d.probabilities for d in first
    ]


def test_predict_batch_matches_decide_row_by_row(policy: Policy, real_obs: np.ndarray) -> None:
    batch = policy.predict_batch(real_obs)
    assert batch.shape == (real_obs.shape[0], 5) and batch.dtype == np.float32
    np.testing.assert_allclose(batch.sum(axis=1), 1.0, atol=1e-5)
    single = np.array([policy.decide(row.tolist(), 0, "BTC").probabilities for row in real_obs], dtype=np.float32)
    np.testing.assert_allclose(batch, single, rtol=0, atol=1e-6)
    # Argmax agrees except possibly on exact near-ties.
    gap = np.sort(single, axis=1)[:, -1] - np.sort(single, axis=1)[:, -2]
    clear = gap > 1e-5
    assert np.array_equal(batch.argmax(axis=1)[clear], single.argmax(axis=1)[clear])
    # The real observations exercise more than one action.
    assert len(set(single.argmax(axis=1).tolist())) >= 3


def test_both_inference_paths_agree(real_obs: np.ndarray) -> None:
    p = Policy.load(baseline_model_path())
    p.warmup(20)
    assert p.binding_mode in ("iobinding", "run")
    assert set(p.timings_us) == {"iobinding", "run"} and all(t > 0 for t in p.timings_us.values())
    results = {}
    for mode in ("iobinding", "run"):
        p.binding_mode = mode
        results[mode] = [p.decide(r.tolist(), 0, "BTC").probabilities for r in real_obs[:300]]
    assert results["iobinding"] == results["run"]


def test_decide_latency(policy: Policy, real_obs: np.ndarray) -> None:
    """Median decide() is ~10 us on the dev machine; the bound is loose so a busy CI box does not flake."""
    rows = [r.tolist() for r in real_obs[:500]]
    totals = []
    for row in rows * 4:
        t0 = time.perf_counter_ns()
        policy.decide(row, 0, "BTC")
        totals.append(time.perf_counter_ns() - t0)
    assert statistics.median(totals) / 1000.0 < 200.0


def test_decide_rejects_bad_observations(policy: Policy, real_obs: np.ndarray) -> None:
    with pytest.raises(ValueError, match="19 values"):
        policy.decide(real_obs[0].tolist()[:19], 0, "BTC")
    bad = real_obs[0].tolist()
    bad[FEATURE_NAMES.index("vol_48")] = float("nan")
    with pytest.raises(ValueError, match="vol_48"):
        policy.decide(bad, 0, "BTC")
    # The buffer is not poisoned for the next call.
    d = policy.decide(real_obs[0].tolist(), 0, "BTC")
    assert math.isclose(sum(d.probabilities), 1.0, abs_tol=1e-5)


def test_predict_batch_shapes(policy: Policy, real_obs: np.ndarray) -> None:
    assert policy.predict_batch(np.zeros((0, 20))).shape == (0, 5)
    with pytest.raises(ValueError, match=r"\[n, 20\]"):
        policy.predict_batch(real_obs[:, :19])
    with pytest.raises(ValueError):
        policy.predict_batch(real_obs[0])


def test_baseline_trades_rarely_on_real_data(market: np.ndarray) -> None:
    """With threshold 0.6 the baseline is confident on 2-10% of bars and mostly flat otherwise."""
    stats = _load_build_script().replay_stats(baseline_model_path(), market)
    assert 0.02 <= stats["confident_frac"] <= 0.10, stats
    assert stats["flat_argmax_frac"] >= 0.5, stats
    assert 0.5 <= stats["trades_per_day"] <= 20.0, stats
    assert 0.0 < stats["time_in_market_frac"] < 0.5, stats


def test_shipped_model_is_a_fresh_build() -> None:
    _onnx()
    script = _load_build_script()
    assert script.model_bytes() == baseline_model_path().read_bytes()
    assert script.model_bytes() == script.model_bytes()


# ------------------------------------------------------------------------------------------
# metadata round-trip and refusal of models that do not fit
# ------------------------------------------------------------------------------------------


def test_metadata_round_trip(tmp_path: Path) -> None:
    onnx = _onnx()
    path = write_model(tmp_path / "m.onnx")
    meta = read_model_meta(path)
    assert meta == ModelMeta(
        version="test-1",
        kind="ppo",
        feature_names=FEATURE_NAMES,
        obs_size=20,
        action_targets=tuple(TARGETS),
        action_meanings=tuple(MEANINGS),
        timeframe="5m",
        training_data_range="2025-01-01..2025-06-30",
        extra={"alphapulse.created": "2026-01-01T00:00:00Z", "alphapulse.note": "built by tests/test_policy.py"},
    )
    # And the shipped model's parsed metadata matches what the onnx package reads from the file.
    raw = {p.key: p.value for p in onnx.load(str(baseline_model_path())).metadata_props}
    shipped = read_model_meta(baseline_model_path())
    assert json.loads(raw["alphapulse.feature_names"]) == list(shipped.feature_names)
    assert json.loads(raw["alphapulse.action_targets"]) == list(shipped.action_targets)
    assert raw["alphapulse.kind"] == shipped.kind and raw["alphapulse.version"] == shipped.version
    p = Policy.load(path)
    assert p.decide([0.0] * 20, 0, "BTC").target in TARGETS


def test_expected_features_argument(tmp_path: Path) -> None:
    names = [f"f{i}" for i in range(4)]
    path = write_model(
        tmp_path / "small.onnx",
        n_in=4,
        metadata=good_metadata(**{"alphapulse.feature_names": json.dumps(names), "alphapulse.obs_size": "4"}),
    )
    p = Policy.load(path, expected_features=names)
    assert p.meta.obs_size == 4 and len(p.decide([0.1, 0.2, 0.3, 0.4], 0, "BTC").probabilities) == 5
    with pytest.raises(ModelError) as ei:
        Policy.load(path)  # default: the daemon's FEATURE_NAMES
    assert_clean_model_error(ei, path, "feature mismatch", "model has 4 features, the pipeline produces 20")


_renamed = list(FEATURE_NAMES)
_renamed[3] = "ret_12_typo"
_reordered = list(FEATURE_NAMES)
_reordered[1], _reordered[2] = _reordered[2], _reordered[1]

MISMATCHES: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    (
        "renamed feature",
        {"metadata": good_metadata(**{"alphapulse.feature_names": json.dumps(_renamed)})},
        ("missing from the model: ['ret_12']", "unknown to the pipeline: ['ret_12_typo']"),
    ),
    (
        "reordered features",
        {"metadata": good_metadata(**{"alphapulse.feature_names": json.dumps(_reordered)})},
        ("feature order differs", "position 1 is 'ret_6'", "'ret_3' expected"),
    ),
    (
        "obs_size disagrees with names",
        {"metadata": good_metadata(**{"alphapulse.obs_size": "21"})},
        ("'alphapulse.obs_size' is 21", "lists 20 names"),
    ),
    (
        "graph input narrower than metadata",
        {"n_in": 19},
        ("input 'obs' has 19 features per row", "obs_size is 20"),
    ),
    ("missing metadata", {"drop": ("alphapulse.feature_names",)}, ("missing metadata alphapulse.feature_names",)),
    ("no metadata at all", {"metadata": {}}, ("missing metadata", "alphapulse.obs_size")),
    (
        "output width vs action list",
        {"n_out": 4},
        ("output 'probs' has 4 columns", "5 actions"),
    ),
    (
        "meanings vs targets",
        {"metadata": good_metadata(**{"alphapulse.action_meanings": json.dumps(MEANINGS[:3])})},
        ("5 action targets but 3 action meanings",),
    ),
    (
        "target out of range",
        {"metadata": good_metadata(**{"alphapulse.action_targets": json.dumps([-2, -0.5, 0, 0.5, 1])})},
        ("'alphapulse.action_targets' must be numbers in [-1, 1]",),
    ),
    (
        "invalid JSON",
        {"metadata": good_metadata(**{"alphapulse.feature_names": "ret_1,ret_3"})},
        ("'alphapulse.feature_names' is not valid JSON",),
    ),
    ("unknown kind", {"metadata": good_metadata(**{"alphapulse.kind": "magic"})}, ("'alphapulse.kind' is 'magic'",)),
    (
        "unknown timeframe",
        {"metadata": good_metadata(**{"alphapulse.timeframe": "7m"})},
        ("not a known timeframe: '7m'",),
    ),
    ("wrong input name", {"input_name": "x"}, ("expected exactly one input named 'obs'", "['x']")),
    ("wrong output name", {"output_name": "logits_out"}, ("no output named 'probs'", "['logits_out']")),
    ("fixed batch", {"batch_dim": 1}, ("fixed batch size 1", "must be dynamic")),
    ("no softmax", {"softmax": False}, ("not a probability distribution",)),
]


@pytest.mark.parametrize(("case", "kwargs", "fragments"), MISMATCHES, ids=[m[0] for m in MISMATCHES])
def test_mismatched_model_is_refused(
    tmp_path: Path, case: str, kwargs: dict[str, Any], fragments: tuple[str, ...]
) -> None:
    path = write_model(tmp_path / "bad.onnx", **kwargs)
    with pytest.raises(ModelError) as ei:
        Policy.load(path)
    assert_clean_model_error(ei, path, *fragments)


def test_metadata_problems_are_found_by_read_model_meta(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m.onnx", drop=("alphapulse.action_targets", "alphapulse.version"))
    with pytest.raises(ModelError) as ei:
        read_model_meta(path)
    assert_clean_model_error(ei, path, "alphapulse.action_targets", "alphapulse.version")


def test_timeframe_mismatch_is_refused(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m.onnx")
    assert Policy.load(path, expected_timeframe="5m").meta.timeframe == "5m"
    with pytest.raises(ModelError) as ei:
        Policy.load(path, expected_timeframe="1h")
    assert_clean_model_error(ei, path, "timeframe '5m'", "'1h'")


def test_corrupt_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(np.random.default_rng(1).bytes(4096))
    for load in (Policy.load, read_model_meta):
        with pytest.raises(ModelError) as ei:
            load(path)
        assert_clean_model_error(ei, path, "not a loadable ONNX model")
    assert "Traceback" not in str(ei.value)


def test_truncated_shipped_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "truncated.onnx"
    path.write_bytes(baseline_model_path().read_bytes()[:500])
    with pytest.raises(ModelError) as ei:
        Policy.load(path)
    assert_clean_model_error(ei, path)


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [("missing", "does not exist"), ("empty", "file is empty"), ("directory", "not a regular file")],
)
def test_unreadable_paths_are_refused(tmp_path: Path, setup: str, fragment: str) -> None:
    path = tmp_path / "model.onnx"
    if setup == "empty":
        path.write_bytes(b"")
    elif setup == "directory":
        path.mkdir()
    with pytest.raises(ModelError) as ei:
        Policy.load(path)
    assert_clean_model_error(ei, path, fragment)
