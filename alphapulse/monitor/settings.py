"""The monitor's settings: ``config/monitoring.yaml`` (thresholds) plus the daemon's own configuration.

The monitor reads the same environment file and configuration directory as the daemon, so it finds the
daemon's control API, token, state and log directories exactly where the daemon put them; only the thresholds
and its own port are its own.  Validation follows alphapulse/config.py: the first problem raises
:class:`ConfigError` (exit 78, one line naming file, key and problem).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alphapulse.config import (
    ConfigError,
    Settings,
    default_config_dir,
    in_range,
    load_settings,
    load_yaml_file,
)
from alphapulse.monitor.delivery_config import DeliveryConfig

MONITORING_FILE = "monitoring.yaml"
PORT_ENV = "ALPHAPULSE_MONITOR_PORT"
DEFAULT_PORT = 8081
DB_NAME = "monitor.db"
LOG_PREFIX = "monitor_"  # its own daily JSON log next to the daemon's alphapulse_YYYYMMDD.log


def _pair(lo: float, hi: float) -> dict[str, Any]:
    return {"warning": (float, lo, in_range(0, lo_open=True)), "critical": (float, hi, in_range(0, lo_open=True))}


MONITORING_SCHEMA: dict[str, Any] = {
    "scrape_interval_s": (float, 5.0, in_range(0.1, 3600)),
    "scrape_timeout_s": (float, 2.0, in_range(0.05, 600)),
    "retention_days": (float, 14.0, in_range(0, 3650, lo_open=True)),
    "hysteresis_pct": (float, 5.0, in_range(0, 50)),
    "rules": {
        "daily_loss_pct": _pair(2.0, 3.0),
        "drawdown_pct": _pair(9.0, 12.0),
        "cpu_pct": _pair(80.0, 90.0),
        "memory_pct": _pair(80.0, 90.0),
        "disk_pct": _pair(80.0, 90.0),
        "model_confidence_min": (float, 0.60, in_range(0, 1)),
        "api_error_rate_max": (float, 0.10, in_range(0, 1)),
        "inference_ms": _pair(500.0, 1000.0),
        "api_response_ms": _pair(1000.0, 5000.0),
        "stale_data_bars": (float, 2.0, in_range(0, 1000, lo_open=True)),
    },
}

PAIRED_RULES = ("daily_loss_pct", "drawdown_pct", "cpu_pct", "memory_pct", "disk_pct", "inference_ms",
                "api_response_ms")
PERCENT_RULES = ("daily_loss_pct", "drawdown_pct", "cpu_pct", "memory_pct", "disk_pct")


@dataclass(frozen=True)
class Thresholds:
    """The rule thresholds of monitoring.yaml; pairs are (warning, critical)."""

    daily_loss_pct: tuple[float, float] = (2.0, 3.0)
    drawdown_pct: tuple[float, float] = (9.0, 12.0)
    cpu_pct: tuple[float, float] = (80.0, 90.0)
    memory_pct: tuple[float, float] = (80.0, 90.0)
    disk_pct: tuple[float, float] = (80.0, 90.0)
    model_confidence_min: float = 0.60
    api_error_rate_max: float = 0.10
    inference_ms: tuple[float, float] = (500.0, 1000.0)
    api_response_ms: tuple[float, float] = (1000.0, 5000.0)
    stale_data_bars: float = 2.0
    hysteresis_pct: float = 5.0


@dataclass(frozen=True)
class MonitorSettings:
    """Everything ``alphapulse monitor`` runs on."""

    daemon: Settings  # the daemon's validated configuration (control port and token, directories, timeframe)
    config_file: Path | None  # the monitoring.yaml read, None when built-in defaults were used
    host: str
    port: int
    scrape_interval_s: float
    scrape_timeout_s: float
    retention_days: float
    thresholds: Thresholds
    delivery: dict[str, Any] = field(default_factory=dict)  # the raw `delivery:` section
    delivery_config: DeliveryConfig = field(default_factory=DeliveryConfig)  # validated by its owner's module

    @property
    def db_path(self) -> Path:
        return self.daemon.data_dir / DB_NAME

    @property
    def daemon_url(self) -> str:
        return f"http://{self.daemon.control_host}:{self.daemon.control_port}"


def _port(env: Mapping[str, str]) -> int:
    raw = env.get(PORT_ENV, "")
    if raw == "":
        return DEFAULT_PORT
    try:
        port = int(raw.strip())
    except ValueError:
        raise ConfigError("environment", PORT_ENV, f"must be an integer, got {raw!r}") from None
    if not 1 <= port <= 65535:
        raise ConfigError("environment", PORT_ENV, f"must be in 1..65535, got {port}")
    return port


def load_monitor_settings(config_dir: Path | None = None, env: Mapping[str, str] | None = None) -> MonitorSettings:
    """Validate the daemon's configuration, then monitoring.yaml and the monitor's port; first problem raises."""
    env = os.environ if env is None else env
    if config_dir is None:
        config_dir = default_config_dir(env)
    daemon = load_settings(config_dir, env)
    path = (config_dir / MONITORING_FILE) if config_dir is not None else None
    if path is None:
        local = Path("config") / MONITORING_FILE  # like the daemon: ./config when nothing else is said
        path = local if local.exists() else None
    if path is not None and not path.exists():
        path = None
    values, extra = load_yaml_file(path, MONITORING_SCHEMA, opaque=("delivery",))
    source = str(path) if path is not None else MONITORING_FILE
    if values["scrape_timeout_s"] > values["scrape_interval_s"]:
        raise ConfigError(source, "scrape_timeout_s", f"must be <= scrape_interval_s "
                          f"({values['scrape_interval_s']}), got {values['scrape_timeout_s']}")
    rules = values["rules"]
    for name in PAIRED_RULES:
        w, c = rules[name]["warning"], rules[name]["critical"]
        if w > c:
            raise ConfigError(source, f"rules.{name}.warning", f"must be <= rules.{name}.critical ({c}), got {w}")
    for name in PERCENT_RULES:
        if rules[name]["critical"] > 100:
            raise ConfigError(source, f"rules.{name}.critical", f"must be <= 100, got {rules[name]['critical']}")
    pair = {name: (float(rules[name]["warning"]), float(rules[name]["critical"])) for name in PAIRED_RULES}
    thresholds = Thresholds(
        **pair,
        model_confidence_min=rules["model_confidence_min"],
        api_error_rate_max=rules["api_error_rate_max"],
        stale_data_bars=rules["stale_data_bars"],
        hysteresis_pct=values["hysteresis_pct"],
    )
    # the delivery section is validated by the module that owns it, here, so a mistake there exits 78 too
    delivery_config = DeliveryConfig.from_mapping(extra.get("delivery"), source, env)
    return MonitorSettings(
        daemon=daemon,
        config_file=path,
        host=daemon.control_host,  # loopback, like the control API (no TLS, no auth on GETs)
        port=_port(env),
        scrape_interval_s=values["scrape_interval_s"],
        scrape_timeout_s=values["scrape_timeout_s"],
        retention_days=values["retention_days"],
        thresholds=thresholds,
        delivery=extra.get("delivery", {}),
        delivery_config=delivery_config,
    )
