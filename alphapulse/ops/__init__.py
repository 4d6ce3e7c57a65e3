"""Operator tooling around the daemon: health checks, backups and model rollout (not on the trading path)."""
