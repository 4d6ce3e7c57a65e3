"""Policy stage: an ONNX Runtime session mapping one observation to probabilities over target positions.

The model file is the whole contract between training and the daemon, so everything the daemon
must agree on travels inside it as ``metadata_props`` (feature names and order, observation size,
the discrete target positions and their names, timeframe, provenance).  :meth:`Policy.load`
refuses a model that disagrees with the running feature pipeline *before* the daemon reports
READY: a silently reordered feature vector would trade on garbage while every health check
stays green.

Model contract (the hand-set baseline and a trained PPO export follow the same one):

* input ``obs``: float32 ``[batch, obs_size]`` with a dynamic batch dimension;
* output ``probs``: float32 ``[batch, n_actions]``, a softmax (rows sum to 1);
* metadata (strings, JSON where structured): ``alphapulse.feature_names``, ``alphapulse.obs_size``,
  ``alphapulse.action_targets``, ``alphapulse.action_meanings``, ``alphapulse.version``,
  ``alphapulse.kind``, ``alphapulse.timeframe``, ``alphapulse.training_data_range``,
  ``alphapulse.created``.
* optional metadata: ``alphapulse.feature_set`` (a name in :data:`alphapulse.features.FEATURE_SETS`; absent:
  ``short_v1``, the set every model before the registry was trained on), ``alphapulse.decision_every_bars``
  (decide every N bars; absent: 1) and ``alphapulse.decision_hour_utc`` (the UTC hour at which a decision
  bar *closes*; absent: any, i.e. every N bars counted from the epoch).  The engine reads all three, so the
  daemon, the backtester and the training environment follow the same features and cadence.

The confidence threshold is deliberately *not* applied here: the engine applies it, so the
decision log can record both what the model wanted and why the engine held.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from alphapulse.domain import Decision, timeframe_ms
from alphapulse.features import DEFAULT_FEATURE_SET, FEATURE_SETS, FeatureSet, feature_set

INPUT_NAME = "obs"
OUTPUT_NAME = "probs"
META_PREFIX = "alphapulse."
KNOWN_KINDS = ("baseline", "ppo", "gated_rule")
#: Metadata keys every model must carry; ``alphapulse.created`` is kept in ``ModelMeta.extra``.
REQUIRED_META_KEYS = (
    "alphapulse.feature_names",
    "alphapulse.obs_size",
    "alphapulse.action_targets",
    "alphapulse.action_meanings",
    "alphapulse.version",
    "alphapulse.kind",
    "alphapulse.timeframe",
    "alphapulse.training_data_range",
    "alphapulse.created",
)
META_FEATURE_SET = "alphapulse.feature_set"
META_EVERY_BARS = "alphapulse.decision_every_bars"
META_HOUR_UTC = "alphapulse.decision_hour_utc"
_PARSED_KEYS = frozenset(REQUIRED_META_KEYS) - {"alphapulse.created"}
#: A softmax row sums to 1 within float32 rounding; anything further off is not a probability output.
_PROB_SUM_TOLERANCE = 1e-3
_BINDING_IOBINDING = "iobinding"
_BINDING_RUN = "run"


class ModelError(Exception):
    """A model file that cannot be used: missing, corrupt, or disagreeing with the running pipeline.

    The message always names the file and the problem, so an operator reading a failed start
    knows which file to replace and why, without an ONNX Runtime traceback.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"model {self.path}: {problem}")


@dataclass(frozen=True)
class ModelMeta:
    """The model's self-description, parsed and validated from its ``metadata_props``."""

    version: str
    kind: str
    feature_names: tuple[str, ...]
    obs_size: int
    action_targets: tuple[float, ...]
    action_meanings: tuple[str, ...]
    timeframe: str
    training_data_range: str
    extra: dict[str, str] = field(default_factory=dict)  # every other metadata prop, full key names

    @property
    def n_actions(self) -> int:
        return len(self.action_targets)

    @property
    def created(self) -> str:
        return self.extra.get("alphapulse.created", "")

    @property
    def feature_set_name(self) -> str:
        """The model's feature set (``short_v1`` when its metadata names none)."""
        return self.extra.get(META_FEATURE_SET, DEFAULT_FEATURE_SET)

    @property
    def feature_set(self) -> FeatureSet:
        return feature_set(self.feature_set_name)

    @property
    def decision_every_bars(self) -> int:
        return int(self.extra.get(META_EVERY_BARS, "1"))

    @property
    def decision_hour_utc(self) -> int | None:
        raw = self.extra.get(META_HOUR_UTC)
        return None if raw is None or raw == "null" else int(raw)


# The action space of every model: target positions as a fraction of the maximum position.
ACTION_TARGETS: tuple[float, ...] = (-1.0, -0.5, 0.0, 0.5, 1.0)
ACTION_MEANINGS: tuple[str, ...] = ("short_full", "short_half", "flat", "long_half", "long_full")


def contract_metadata(*, kind: str, version: str, timeframe: str, training_data_range: str, created: str,
                      extra: Mapping[str, Any] | None = None, feature_set_name: str | None = None,
                      decision_every_bars: int | None = None, decision_hour_utc: int | None = None,
                      action_targets: Sequence[float] = ACTION_TARGETS,
                      action_meanings: Sequence[str] = ACTION_MEANINGS) -> dict[str, str]:
    """The ``alphapulse.*`` metadata a model file must carry (what :func:`parse_model_meta` checks), plus
    provenance: ``extra`` keys get the ``alphapulse.`` prefix, non-string values are stored as JSON.
    Both the baseline builder and the PPO exporter write their metadata through this one function.

    ``feature_set_name`` (default: none written, i.e. ``short_v1``) sets the feature names and writes
    ``alphapulse.feature_set``; ``decision_every_bars``/``decision_hour_utc`` write the decision cadence.
    ``action_targets``/``action_meanings`` default to the five targets of every PPO model; a model whose output
    is a finer grid of targets (the rule-gated policy of :mod:`alphapulse.training.gate`) names its own."""
    if len(action_targets) != len(action_meanings):
        raise ValueError(f"{len(action_targets)} action targets but {len(action_meanings)} meanings")
    names = feature_set(feature_set_name).feature_names
    meta = {
        "alphapulse.feature_names": json.dumps(list(names)),
        "alphapulse.obs_size": str(len(names)),
        "alphapulse.action_targets": json.dumps([float(t) for t in action_targets]),
        "alphapulse.action_meanings": json.dumps(list(action_meanings)),
        "alphapulse.version": version,
        "alphapulse.kind": kind,
        "alphapulse.timeframe": timeframe,
        "alphapulse.training_data_range": training_data_range,
        "alphapulse.created": created,
    }
    if feature_set_name is not None:
        meta[META_FEATURE_SET] = feature_set_name
    if decision_every_bars is not None:
        meta[META_EVERY_BARS] = str(decision_every_bars)
    if decision_hour_utc is not None:
        meta[META_HOUR_UTC] = str(decision_hour_utc)
    for key, value in (extra or {}).items():
        full = key if key.startswith("alphapulse.") else "alphapulse." + key
        if full in meta:
            raise ValueError(f"metadata key {full!r} is part of the contract; set it through its argument")
        meta[full] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return meta


def decision_for_action(action: int, candle_ts: int, symbol: str) -> Decision:
    """A fully confident decision for ``action`` (baselines, and the training agent's sampled action)."""
    probs = tuple(1.0 if i == action else 0.0 for i in range(len(ACTION_TARGETS)))
    return Decision(candle_ts, symbol, probs, action, ACTION_TARGETS[action], 1.0, 0.0)


MODELS_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_MODEL_NAME = "gated_rule_1h.onnx"


def default_model_path() -> Path:
    """The model the daemon trades with by default; shipped inside the package (works from a checkout or a wheel)."""
    return MODELS_DIR / DEFAULT_MODEL_NAME


def baseline_model_path() -> Path:
    """The hand-set 5m momentum baseline: the model contract's reference, used by the plumbing tests."""
    return MODELS_DIR / "baseline_momentum.onnx"


def _session_options() -> ort.SessionOptions:
    """One intra-op and one inter-op thread, sequential: a 20x5 MatMul gains nothing from a thread pool.

    A pool would only add wake-up latency and jitter on the hot path and compete with the event
    loop for the (few) cores of a small VPS.
    """
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: load problems are reported through ModelError instead
    return so


def _short(exc: BaseException) -> str:
    """First line of an ONNX Runtime error, without its bracketed status prefix noise."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]


def _open_session(path: Path) -> ort.InferenceSession:
    """Create the CPU session, turning every failure into a ModelError that names the file."""
    if not path.exists():
        raise ModelError(path, "file does not exist")
    if not path.is_file():
        raise ModelError(path, "is not a regular file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(path, f"cannot be read ({exc.strerror or exc})") from None
    if not data:
        raise ModelError(path, "file is empty")
    try:
        return ort.InferenceSession(data, sess_options=_session_options(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises several pybind exception types (InvalidProtobuf, Fail, ...)
        raise ModelError(path, f"not a loadable ONNX model: {_short(exc)}") from None


def _json_list(path: Path, meta: Mapping[str, str], key: str) -> list[Any]:
    raw = meta[key]
    try:
        value = json.loads(raw)
    except ValueError:
        raise ModelError(path, f"metadata {key!r} is not valid JSON: {raw[:80]!r}") from None
    if not isinstance(value, list) or not value:
        raise ModelError(path, f"metadata {key!r} must be a non-empty JSON list, got {raw[:80]!r}")
    return value


def parse_model_meta(path: str | Path, props: Mapping[str, str]) -> ModelMeta:
    """Validate raw ``metadata_props`` into a ModelMeta; every problem becomes a ModelError naming the key."""
    p = Path(path)
    missing = [k for k in REQUIRED_META_KEYS if k not in props]
    if missing:
        raise ModelError(p, f"missing metadata {', '.join(missing)} (is this an AlphaPulse policy export?)")

    names = _json_list(p, props, "alphapulse.feature_names")
    if not all(isinstance(n, str) and n for n in names):
        raise ModelError(p, "metadata 'alphapulse.feature_names' must list non-empty strings")
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ModelError(p, f"metadata 'alphapulse.feature_names' has duplicates: {dupes}")

    raw_size = props["alphapulse.obs_size"]
    try:
        obs_size = int(raw_size)
    except ValueError:
        raise ModelError(p, f"metadata 'alphapulse.obs_size' is not an integer: {raw_size!r}") from None
    if obs_size != len(names):
        raise ModelError(
            p, f"metadata 'alphapulse.obs_size' is {obs_size} but 'alphapulse.feature_names' lists {len(names)} names"
        )

    targets = _json_list(p, props, "alphapulse.action_targets")
    if not all(
        isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and -1.0 <= t <= 1.0
        for t in targets
    ):
        raise ModelError(p, f"metadata 'alphapulse.action_targets' must be numbers in [-1, 1], got {targets}")
    meanings = _json_list(p, props, "alphapulse.action_meanings")
    if not all(isinstance(m, str) and m for m in meanings):
        raise ModelError(p, "metadata 'alphapulse.action_meanings' must list non-empty strings")
    if len(meanings) != len(targets):
        raise ModelError(
            p,
            f"metadata lists {len(targets)} action targets but {len(meanings)} action meanings",
        )

    kind = props["alphapulse.kind"]
    if kind not in KNOWN_KINDS:
        raise ModelError(p, f"metadata 'alphapulse.kind' is {kind!r}, expected one of {list(KNOWN_KINDS)}")
    timeframe = props["alphapulse.timeframe"]
    try:
        timeframe_ms(timeframe)
    except ValueError:
        raise ModelError(p, f"metadata 'alphapulse.timeframe' is not a known timeframe: {timeframe!r}") from None
    version = props["alphapulse.version"]
    if not version.strip():
        raise ModelError(p, "metadata 'alphapulse.version' is empty")
    fs_name = props.get(META_FEATURE_SET, DEFAULT_FEATURE_SET)
    if fs_name not in FEATURE_SETS:
        raise ModelError(p, f"metadata {META_FEATURE_SET!r} is {fs_name!r}, known: {sorted(FEATURE_SETS)}")
    fs = FEATURE_SETS[fs_name]
    if fs.timeframe is not None and fs.timeframe != timeframe:
        raise ModelError(p, f"feature set {fs_name} is defined on {fs.timeframe} bars, the model on {timeframe}")
    every = props.get(META_EVERY_BARS, "1")
    if not every.isdigit() or int(every) < 1:
        raise ModelError(p, f"metadata {META_EVERY_BARS!r} must be an integer >= 1, got {every!r}")
    hour = props.get(META_HOUR_UTC)
    if hour is not None and hour != "null" and not (hour.isdigit() and 0 <= int(hour) < 24):
        raise ModelError(p, f"metadata {META_HOUR_UTC!r} must be an hour 0..23, got {hour!r}")

    return ModelMeta(
        version=version,
        kind=kind,
        feature_names=tuple(names),
        obs_size=obs_size,
        action_targets=tuple(float(t) for t in targets),
        action_meanings=tuple(meanings),
        timeframe=timeframe,
        training_data_range=props["alphapulse.training_data_range"],
        extra={k: v for k, v in sorted(props.items()) if k not in _PARSED_KEYS},
    )


def read_model_meta(path: str | Path) -> ModelMeta:
    """Read and validate a model's metadata (ModelError on a missing/corrupt file or bad metadata)."""
    p = Path(path)
    sess = _open_session(p)
    return parse_model_meta(p, sess.get_modelmeta().custom_metadata_map)


def describe_feature_mismatch(model: Sequence[str], expected: Sequence[str]) -> str | None:
    """Human-readable difference between two feature lists, or None when they are identical.

    Names the missing/unexpected features, or for a pure reordering the first position that
    differs, because "features differ" alone sends the operator diffing 20-element lists by hand.
    """
    model_t, expected_t = tuple(model), tuple(expected)
    if model_t == expected_t:
        return None
    missing = [n for n in expected_t if n not in model_t]
    unexpected = [n for n in model_t if n not in expected_t]
    parts: list[str] = []
    if len(model_t) != len(expected_t):
        parts.append(f"model has {len(model_t)} features, the pipeline produces {len(expected_t)}")
    if missing:
        parts.append(f"missing from the model: {missing}")
    if unexpected:
        parts.append(f"unknown to the pipeline: {unexpected}")
    if not missing and not unexpected and len(model_t) == len(expected_t):
        i = next(i for i, (a, b) in enumerate(zip(model_t, expected_t, strict=True)) if a != b)
        parts.append(f"feature order differs: position {i} is {model_t[i]!r} in the model, {expected_t[i]!r} expected")
    return "; ".join(parts) or f"model features {list(model_t)} != expected {list(expected_t)}"


def _dim(d: object) -> int | None:
    """A static ONNX dimension as int; None for a symbolic/unknown one."""
    return d if isinstance(d, int) and not isinstance(d, bool) else None


def _check_io(path: Path, sess: ort.InferenceSession, meta: ModelMeta) -> None:
    """The graph's input/output signature must match the metadata, so the two cannot drift apart."""
    inputs = sess.get_inputs()
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        got = [i.name for i in inputs]
        raise ModelError(path, f"expected exactly one input named {INPUT_NAME!r}, model has {got}")
    inp = inputs[0]
    if inp.type != "tensor(float)":
        raise ModelError(path, f"input {INPUT_NAME!r} has type {inp.type}, expected tensor(float)")
    if len(inp.shape) != 2:
        raise ModelError(path, f"input {INPUT_NAME!r} has shape {inp.shape}, expected [batch, {meta.obs_size}]")
    if _dim(inp.shape[0]) is not None:
        raise ModelError(path, f"input {INPUT_NAME!r} has a fixed batch size {inp.shape[0]}; the batch must be dynamic")
    if _dim(inp.shape[1]) != meta.obs_size:
        raise ModelError(
            path,
            f"input {INPUT_NAME!r} has {inp.shape[1]} features per row but metadata obs_size is {meta.obs_size}",
        )

    outputs = {o.name: o for o in sess.get_outputs()}
    if OUTPUT_NAME not in outputs:
        raise ModelError(path, f"no output named {OUTPUT_NAME!r}; model outputs are {list(outputs)}")
    out = outputs[OUTPUT_NAME]
    if out.type != "tensor(float)":
        raise ModelError(path, f"output {OUTPUT_NAME!r} has type {out.type}, expected tensor(float)")
    if len(out.shape) != 2:
        raise ModelError(path, f"output {OUTPUT_NAME!r} has shape {out.shape}, expected [batch, {meta.n_actions}]")
    n_out = _dim(out.shape[1])
    if n_out is not None and n_out != meta.n_actions:
        raise ModelError(
            path, f"output {OUTPUT_NAME!r} has {n_out} columns but metadata lists {meta.n_actions} actions"
        )


class Policy:
    """A loaded, validated policy.  Use :meth:`load`; call :meth:`warmup` before reporting READY.

    :meth:`decide` reuses preallocated input/output buffers, so one Policy must not be used from
    two threads at once (the daemon calls it from one place; give each thread its own Policy).
    """

    def __init__(self, path: Path, session: ort.InferenceSession, meta: ModelMeta) -> None:
        self.path = path
        self.meta = meta
        self._sess = session
        self._n_actions = meta.n_actions
        self._targets = meta.action_targets
        self._action_range = range(meta.n_actions)
        # Hot-path buffers: decide() writes one row into _obs and reads _out; nothing is allocated per call
        # on the IOBinding path, since both buffers are bound once and ORT reads/writes them in place.
        self._obs = np.zeros((1, meta.obs_size), dtype=np.float32)
        self._out = np.zeros((1, meta.n_actions), dtype=np.float32)
        self._feed = {INPUT_NAME: self._obs}
        self._output_names = [OUTPUT_NAME]
        self._binding = session.io_binding()
        self._binding.bind_cpu_input(INPUT_NAME, self._obs)
        self._binding.bind_ortvalue_output(OUTPUT_NAME, ort.OrtValue.ortvalue_from_numpy(self._out))
        self.binding_mode = _BINDING_IOBINDING  # warmup() measures both and keeps the faster
        self.timings_us: dict[str, float] = {}

    @classmethod
    def load(
        cls,
        path: str | Path,
        expected_features: Sequence[str] | None = None,
        expected_timeframe: str | None = None,
    ) -> Policy:
        """Open ``path`` and refuse it (ModelError naming the difference) unless it fits this pipeline.

        ``expected_features`` defaults to the feature names of the set the model's metadata names (``short_v1``
        when it names none): a model must list exactly the features that set produces, in its order."""
        p = Path(path)
        sess = _open_session(p)
        meta = parse_model_meta(p, sess.get_modelmeta().custom_metadata_map)
        expected = meta.feature_set.feature_names if expected_features is None else expected_features
        diff = describe_feature_mismatch(meta.feature_names, expected)
        if diff is not None:
            raise ModelError(p, f"feature mismatch: {diff}")
        if expected_timeframe is not None and meta.timeframe != expected_timeframe:
            raise ModelError(p, f"model is for timeframe {meta.timeframe!r}, the daemon runs {expected_timeframe!r}")
        _check_io(p, sess, meta)
        policy = cls(p, sess, meta)
        policy._probe()
        return policy

    def _probe(self) -> None:
        """Run the model once on zeros: the output must be one finite probability row of the declared width.

        Catches what static shapes cannot (symbolic output width, a missing Softmax) at load time
        rather than on the first live candle.
        """
        try:
            out = self._sess.run(self._output_names, {INPUT_NAME: np.zeros((2, self.meta.obs_size), np.float32)})[0]
        except Exception as exc:
            raise ModelError(self.path, f"test inference failed: {_short(exc)}") from None
        if out.shape != (2, self._n_actions):
            raise ModelError(
                self.path,
                f"output {OUTPUT_NAME!r} has shape {list(out.shape)} for 2 rows, expected [2, {self._n_actions}]",
            )
        sums = out.sum(axis=1)
        if not np.all(np.isfinite(out)) or np.any(out < 0) or np.any(np.abs(sums - 1.0) > _PROB_SUM_TOLERANCE):
            raise ModelError(
                self.path, f"output {OUTPUT_NAME!r} is not a probability distribution (row sums {sums.tolist()})"
            )

    def _infer_iobinding(self) -> None:
        self._sess.run_with_iobinding(self._binding)

    def _infer_run(self) -> None:
        self._out[...] = self._sess.run(self._output_names, self._feed)[0]

    def warmup(self, n: int = 200) -> None:
        """Run the session ``n`` times per call path, keep the faster path, and check both agree.

        Warm caches and allocator pools before READY so the first live candle is not the slow one;
        which path wins (IOBinding or plain ``run``) depends on the ORT build and the machine, so it
        is measured here rather than assumed.
        """
        if n <= 0:
            return
        results: dict[str, np.ndarray] = {}
        rng = np.random.default_rng(0)
        probe = rng.normal(0.0, 0.01, self.meta.obs_size).astype(np.float32)
        for mode, fn in ((_BINDING_IOBINDING, self._infer_iobinding), (_BINDING_RUN, self._infer_run)):
            self._obs[0, :] = probe
            samples = []
            for _ in range(n):
                t0 = time.perf_counter_ns()
                fn()
                samples.append(time.perf_counter_ns() - t0)
            results[mode] = self._out.copy()
            self.timings_us[mode] = float(np.median(samples)) / 1000.0
        if not np.array_equal(results[_BINDING_IOBINDING], results[_BINDING_RUN]):
            # Should not happen; if it does, trust the plain path, which has no buffer aliasing.
            self.binding_mode = _BINDING_RUN
        else:
            self.binding_mode = min(self.timings_us, key=self.timings_us.__getitem__)
        self._obs[0, :] = 0.0

    def decide(self, obs: Sequence[float], candle_ts: int, symbol: str) -> Decision:
        """Argmax action for one observation; ``inference_us`` times only the ORT call."""
        if len(obs) != self.meta.obs_size:
            raise ValueError(f"observation has {len(obs)} values, model {self.path.name} expects {self.meta.obs_size}")
        self._obs[0, :] = obs
        if self.binding_mode == _BINDING_IOBINDING:
            t0 = time.perf_counter_ns()
            self._sess.run_with_iobinding(self._binding)
            t1 = time.perf_counter_ns()
        else:
            t0 = time.perf_counter_ns()
            self._out[...] = self._sess.run(self._output_names, self._feed)[0]
            t1 = time.perf_counter_ns()
        probs = tuple(self._out[0].tolist())
        if not math.isfinite(sum(probs)):
            bad = [self.meta.feature_names[i] for i, v in enumerate(self._obs[0].tolist()) if not math.isfinite(v)]
            raise ValueError(f"non-finite model output for candle {candle_ts}; non-finite features: {bad}")
        action = max(self._action_range, key=probs.__getitem__)
        return Decision(
            candle_ts=candle_ts,
            symbol=symbol,
            probabilities=probs,
            action=action,
            target=self._targets[action],
            confidence=probs[action],
            inference_us=(t1 - t0) / 1000.0,
        )

    def predict_batch(self, obs: np.ndarray) -> np.ndarray:
        """Probabilities ``[n, n_actions]`` for ``n`` observation rows (backtests, evaluation)."""
        arr = np.ascontiguousarray(obs, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[1] != self.meta.obs_size:
            raise ValueError(f"expected observations of shape [n, {self.meta.obs_size}], got {list(arr.shape)}")
        if arr.shape[0] == 0:
            return np.zeros((0, self._n_actions), dtype=np.float32)
        out: np.ndarray = self._sess.run(self._output_names, {INPUT_NAME: arr})[0]
        return out

    def __repr__(self) -> str:
        return f"Policy(path={str(self.path)!r}, kind={self.meta.kind!r}, version={self.meta.version!r})"
