"""Export a trained PPO actor to the daemon's ONNX model contract (see :mod:`alphapulse.policy`).

The exported graph is ``obs`` (raw features, float32 [batch, 20]) -> observation normalisation with the
training run's final VecNormalize mean/variance and clip -> features extractor -> policy MLP -> action logits
-> softmax -> ``probs`` [batch, 5].  Normalisation lives *inside* the graph so the daemon feeds the raw
feature vector it computes anyway and can never pair a model with the wrong statistics file.

Only the actor is exported: the value head is a training aid the daemon has no use for.

Nothing is written unless the model is provably the trained policy: ``onnx.checker`` passes (full check),
ONNX Runtime's probabilities match PyTorch's on real observations within ``atol`` (1e-5), and the result
satisfies :meth:`alphapulse.policy.Policy.load` (metadata contract, I/O signature, softmax rows).  The file is
written atomically (temp file + rename), so a failed export never leaves a half-written model where the
daemon would pick it up.

Exporter: torch 2.9+ defaults to the dynamo-based exporter, which needs ``onnxscript`` (not a dependency
here); the TorchScript exporter (``dynamo=False``) is still available in torch 2.13 and handles this
static MLP exactly, so it is used with its deprecation warning silenced.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from alphapulse.features import OBS_SIZE
from alphapulse.policy import INPUT_NAME, OUTPUT_NAME, ModelError, Policy
from alphapulse.policy import contract_metadata as policy_contract_metadata

if TYPE_CHECKING:
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import VecNormalize

OPSET = 17
#: Largest allowed |ONNX - PyTorch| difference of any probability.
DEFAULT_ATOL = 1e-5
META_PREFIX = "alphapulse."


class ExportError(Exception):
    """The ONNX model failed a check; nothing was written."""


class ExportActor(nn.Module):
    """The deterministic actor with the observation normalisation baked in: raw obs -> action probabilities."""

    obs_mean: torch.Tensor
    obs_std: torch.Tensor

    def __init__(self, features_extractor: nn.Module, policy_net: nn.Module, action_net: nn.Module,
                 obs_mean: np.ndarray, obs_var: np.ndarray, clip_obs: float, epsilon: float) -> None:
        super().__init__()
        self.features_extractor = features_extractor
        self.policy_net = policy_net
        self.action_net = action_net
        # VecNormalize: clip((obs - mean) / sqrt(var + eps), -clip, clip); std is precomputed in float64.
        self.register_buffer("obs_mean", torch.as_tensor(np.asarray(obs_mean, np.float64).astype(np.float32)))
        std = np.sqrt(np.asarray(obs_var, np.float64) + epsilon)
        self.register_buffer("obs_std", torch.as_tensor(std.astype(np.float32)))
        self.clip_obs = float(clip_obs)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = torch.clamp((obs - self.obs_mean) / self.obs_std, -self.clip_obs, self.clip_obs)
        logits = self.action_net(self.policy_net(self.features_extractor(x)))
        return torch.softmax(logits, dim=-1)

    def probabilities(self, obs: np.ndarray) -> np.ndarray:
        """Probabilities for a batch of raw observations (float32 in, float32 out)."""
        with torch.no_grad():
            out: np.ndarray = self(torch.as_tensor(np.asarray(obs, dtype=np.float32))).numpy()
        return out


def actor_from_sb3(model: PPO, vecnorm: VecNormalize | None) -> ExportActor:
    """Wrap a trained PPO's actor (sharing its modules, in eval mode) with the final normalisation stats.

    Without VecNormalize the normalisation is the identity (mean 0, variance 1 - eps, no effective clip).
    """
    policy = model.policy
    policy.set_training_mode(False)
    if vecnorm is not None and vecnorm.norm_obs:
        rms: Any = vecnorm.obs_rms  # a RunningMeanStd for a Box observation space (a dict only for Dict spaces)
        mean, var = np.asarray(rms.mean), np.asarray(rms.var)
        clip, eps = float(vecnorm.clip_obs), float(vecnorm.epsilon)
    else:
        n_obs = int(policy.observation_space.shape[0]) if policy.observation_space.shape else OBS_SIZE
        mean, var, clip, eps = np.zeros(n_obs), np.ones(n_obs), float(np.finfo(np.float32).max), 0.0
    actor = ExportActor(policy.pi_features_extractor, policy.mlp_extractor.policy_net, policy.action_net,
                        mean, var, clip, eps)
    actor.eval()
    return actor


def sb3_probabilities(model: PPO, vecnorm: VecNormalize | None, obs: np.ndarray) -> np.ndarray:
    """Reference probabilities the way SB3 itself computes them (VecNormalize in numpy, then the policy)."""
    x = np.asarray(obs, dtype=np.float32)
    if vecnorm is not None and vecnorm.norm_obs:
        x = np.asarray(vecnorm.normalize_obs(x), dtype=np.float32)
    model.policy.set_training_mode(False)
    with torch.no_grad():
        tensor, _ = model.policy.obs_to_tensor(x)
        dist: Any = model.policy.get_distribution(tensor).distribution  # Categorical for Discrete actions
        probs: np.ndarray = dist.probs.cpu().numpy()
    return probs


def check_actor_matches_sb3(actor: ExportActor, model: PPO, vecnorm: VecNormalize | None, obs: np.ndarray,
                            atol: float = DEFAULT_ATOL) -> float:
    """Max |actor - SB3| over ``obs``; ExportError above ``atol`` (the wrapper must *be* the trained policy)."""
    diff = float(np.max(np.abs(actor.probabilities(obs) - sb3_probabilities(model, vecnorm, obs))))
    if not diff <= atol:
        raise ExportError(f"export wrapper disagrees with the SB3 policy by {diff:.3g} (> {atol})")
    return diff


def onnx_bytes(actor: nn.Module, n_obs: int | None = None) -> bytes:
    """The actor as a serialized ONNX graph (no metadata): input ``obs`` [batch, n_obs], output ``probs``; the
    width is ``n_obs``, else the actor's ``obs_size`` attribute, else its normalisation vector's (its feature set's
    observation size)."""
    actor.eval()
    buf = io.BytesIO()
    mean = getattr(actor, "obs_mean", None)
    if n_obs is None:
        n_obs = getattr(actor, "obs_size", None)
    if n_obs is None:
        n_obs = int(mean.shape[0]) if isinstance(mean, torch.Tensor) and mean.ndim == 1 else OBS_SIZE
    dummy = torch.zeros((1, n_obs), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "legacy TorchScript-based ONNX export" deprecation; see module docstring
        torch.onnx.export(
            actor, (dummy,), buf,  # type: ignore[arg-type]  # the TorchScript exporter accepts a file object
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=OPSET, dynamo=False,
        )
    return buf.getvalue()


def contract_metadata(*, version: str, timeframe: str, training_data_range: str, created: str,
                      extra: Mapping[str, Any] | None = None, feature_set_name: str | None = None,
                      decision_every_bars: int | None = None, decision_hour_utc: int | None = None
                      ) -> dict[str, str]:
    """The model contract's metadata for a PPO policy (:func:`alphapulse.policy.contract_metadata`)."""
    return policy_contract_metadata(kind="ppo", version=version, timeframe=timeframe,
                                    training_data_range=training_data_range, created=created, extra=extra,
                                    feature_set_name=feature_set_name, decision_every_bars=decision_every_bars,
                                    decision_hour_utc=decision_hour_utc)


def with_metadata(model_bytes: bytes, metadata: Mapping[str, str], doc: str = "") -> onnx.ModelProto:
    model = onnx.load_from_string(model_bytes)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, dict(metadata))
    model.producer_name = "alphapulse.training.export"
    model.producer_version = metadata.get("alphapulse.version", "")
    if doc:
        model.doc_string = doc
    return model


def onnx_probabilities(model_bytes: bytes, obs: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    out: np.ndarray = sess.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(obs, dtype=np.float32)})[0]
    return out


def verify(model_bytes: bytes, actor: nn.Module, obs: np.ndarray, atol: float = DEFAULT_ATOL,
           n_obs: int = OBS_SIZE) -> float:
    """onnx.checker (full) and |ORT - torch| <= ``atol`` on every row of ``obs``; returns the max difference."""
    obs = np.ascontiguousarray(obs, dtype=np.float32)
    if obs.ndim != 2 or obs.shape[1] != n_obs or obs.shape[0] == 0:
        raise ExportError(f"verification needs observations of shape [n>0, {n_obs}], got {list(obs.shape)}")
    if not np.all(np.isfinite(obs)):
        raise ExportError("verification observations contain non-finite values")
    try:
        onnx.checker.check_model(onnx.load_from_string(model_bytes), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected the model: {exc}") from None
    with torch.no_grad():
        expected = actor(torch.as_tensor(obs)).numpy()
    got = onnx_probabilities(model_bytes, obs)
    if got.shape != expected.shape:
        raise ExportError(f"ONNX output shape {list(got.shape)} != torch {list(expected.shape)}")
    diff = float(np.max(np.abs(got - expected)))
    if not diff <= atol:
        raise ExportError(f"ONNX Runtime and PyTorch disagree by {diff:.3g} (> {atol}) on {obs.shape[0]} observations")
    return diff


@dataclass(frozen=True)
class ExportReport:
    path: Path
    max_abs_diff: float
    n_checked: int
    bytes: int


def export_policy(actor: nn.Module, sample_obs: np.ndarray, path: str | Path, metadata: Mapping[str, str],
                  *, atol: float = DEFAULT_ATOL, doc: str = "") -> ExportReport:
    """Export, check and atomically write the model; ExportError (and no file) if any check fails."""
    path = Path(path)
    n_obs = int(metadata.get("alphapulse.obs_size", OBS_SIZE))
    model = with_metadata(onnx_bytes(actor), metadata, doc)
    data = model.SerializeToString(deterministic=True)
    diff = verify(data, actor, sample_obs, atol, n_obs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        try:
            Policy.load(tmp)  # the daemon's own contract check, before the file takes the final name
        except ModelError as exc:
            raise ExportError(f"the daemon would refuse this model: {exc.problem}") from None
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportReport(path, diff, int(np.asarray(sample_obs).shape[0]), len(data))
