"""Operator tooling around the daemon: backups, health checks, installs and model rollout (not on the trading path)."""
