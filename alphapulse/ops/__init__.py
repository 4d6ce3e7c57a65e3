"""Operator tooling around the daemon: backups, health checks, installs and model rollout."""
