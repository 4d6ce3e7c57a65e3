"""Offline PPO training of the trading policy (needs the ``train`` extra: torch, stable-baselines3, gymnasium).

* :mod:`alphapulse.training.data` - candle files -> time-split, contiguous segments with features;
* :mod:`alphapulse.training.env` - a gymnasium environment that trades through the daemon's Engine;
* :mod:`alphapulse.training.train` - the CLI (``python -m alphapulse.training.train --config quick``);
* :mod:`alphapulse.training.export` - the trained actor, with its observation normalisation, as an ONNX model
  that :meth:`alphapulse.policy.Policy.load` accepts.

Nothing is imported here, so ``import alphapulse.training.data`` works without torch installed.
"""
