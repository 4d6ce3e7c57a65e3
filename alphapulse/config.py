"""Typed settings from ``config/config.yaml``, ``config/trading_params.yaml`` and the environment.

Everything is validated before anything starts, so a typo can never half-start a trading bot:
an unknown key, a wrong type or an out-of-range value raises :class:`ConfigError`, which the CLI
turns into exit status 78 (EX_CONFIG, which systemd's ``RestartPreventExitStatus=78`` does not
restart) and one line on stderr naming the file, the key and the problem.

Precedence: built-in defaults < YAML files < environment (as systemd's ``EnvironmentFile=`` passes it).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from alphapulse.domain import TIMEFRAME_MS, RiskLimits

EX_CONFIG = 78
SERVICE_FILE = "config.yaml"
TRADING_FILE = "trading_params.yaml"


class ConfigError(Exception):
    """A configuration problem: ``source`` (file or ``environment``), dotted ``key`` and ``problem``."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        super().__init__(f"{source}: {key}: {problem}")
        self.source = source
        self.key = key
        self.problem = problem


def report_config_error(e: ConfigError) -> int:
    """Print the one stderr line every command prints for a bad configuration; returns :data:`EX_CONFIG`."""
    print(f"alphapulse: config error: {e}", file=sys.stderr)
    return EX_CONFIG


# --------------------------------------------------------------------------------------------
# Schema: one table per file. A spec is (type, default, check) where check returns an error
# string or None. Nested dicts are sections.
# --------------------------------------------------------------------------------------------

Check = Callable[[Any], "str | None"]


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Check:
    def check(v: Any) -> str | None:
        if isinstance(v, float) and not math.isfinite(v):
            return f"must be a finite number, got {v}"
        if lo is not None and (v <= lo if lo_open else v < lo):
            return f"must be {'>' if lo_open else '>='} {lo}, got {v}"
        if hi is not None and v > hi:
            return f"must be <= {hi}, got {v}"
        return None

    return check


def _choice(*options: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in options else f"must be one of {', '.join(options)}, got {v!r}"

    return check


def _speed(v: Any) -> str | None:
    if v == "max":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return f"must be a positive number or 'max', got {v!r}"
    if not math.isfinite(f) or f <= 0:
        return f"must be a positive number or 'max', got {v!r}"
    return None


def _url(*schemes: str) -> Check:
    def check(v: Any) -> str | None:
        scheme, sep, rest = str(v).partition("://")
        if not sep or scheme not in schemes or not rest or rest.startswith("/"):
            return f"must be a {' or '.join(s + '://' for s in schemes)} URL with a host, got {v!r}"
        return None

    return check


def _host(v: Any) -> str | None:
    # The control API has no TLS: it must stay on loopback.
    return None if v in ("127.0.0.1", "localhost", "::1") else f"must be a loopback address, got {v!r}"


SERVICE_SCHEMA: dict[str, Any] = {
    "mode": (str, "paper", _choice("paper", "live")),
    "control": {
        "host": (str, "127.0.0.1", _host),
        "port": (int, 8080, _range(1, 65535)),
        "token": (str, "", None),
        "fault_injection": (bool, False, None),
    },
    "paths": {
        "data_dir": (str, "var/data", None),
        "log_dir": (str, "var/log", None),
    },
    "logging": {
        "level": (str, "INFO", _choice("DEBUG", "INFO", "WARNING", "ERROR")),
        "console": (bool, True, None),
    },
    "feed": {
        "source": (str, "replay", _choice("replay", "weex")),
        "replay_file": (str, "", None),
        "replay_speed": (str, "72000", _speed),
        "funding_file": (str, "", None),
        "queue_size": (int, 1024, _range(1, 1_000_000)),
    },
    "exchange": {
        "rest_url": (str, "https://api-contract.weex.com", _url("http", "https")),
        "ws_url": (str, "wss://ws-contract.weex.com/v3/ws", _url("ws", "wss")),
        "timeout_s": (float, 10.0, _range(0.1, 120)),
        "reconcile_interval_s": (float, 300.0, _range(1, 86_400)),
        "stream_silence_s": (float, 30.0, _range(1, 3600)),
        "leverage": (int, 3, _range(1, 125)),
        "margin_type": (str, "CROSSED", _choice("CROSSED", "ISOLATED")),
    },
    "model": {
        "path": (str, "", None),
        "warmup_runs": (int, 200, _range(0, 100_000)),
    },
    "watchdog": {
        "stall_timeout_s": (float, 60.0, _range(1, 3600)),
    },
}

#: Built-in defaults other tools fall back on when no configuration loads (``alphapulse report`` on a copy of
#: the logs): the same values the schema gives a missing key.
DEFAULT_TIMEFRAME = "1h"
DEFAULT_CONFIDENCE_THRESHOLD = 0.6

TRADING_SCHEMA: dict[str, Any] = {
    "symbol": (str, "BTCUSDT", None),
    "timeframe": (str, DEFAULT_TIMEFRAME, _choice(*TIMEFRAME_MS)),
    "initial_equity": (float, 10_000.0, _range(0, lo_open=True)),
    "lot_size": (float, 0.001, _range(0, lo_open=True)),
    "confidence_threshold": (float, DEFAULT_CONFIDENCE_THRESHOLD, _range(0, 1)),
    "fees": {
        "taker_fee": (float, 0.0006, _range(0, 0.01)),
        "slippage_bps": (float, 2.0, _range(0, 500)),
    },
    "risk": {
        "max_position_pct": (float, 50.0, _range(0, 1000, lo_open=True)),
        "max_leverage": (float, 3.0, _range(0, 125, lo_open=True)),
        "daily_loss_limit_pct": (float, 3.0, _range(0, 100, lo_open=True)),
        "max_drawdown_pct": (float, 12.0, _range(0, 100, lo_open=True)),
        "max_orders_per_minute": (int, 10, _range(1, 10_000)),
        "max_data_age_bars": (float, 2.0, _range(0, 1000, lo_open=True)),
        "flatten_on_halt": (bool, True, None),
        "rebalance_band_pct": (float, 10.0, _range(0, 100)),
        "target_vol_pct": (float, 0.0, _range(0, 1000)),
    },
}

# Environment variables: name -> (file-schema, dotted key) or a special handler name.
ENV_KEYS: dict[str, tuple[str, str]] = {
    "TRADING_MODE": ("service", "mode"),
    "ALPHAPULSE_CONTROL_PORT": ("service", "control.port"),
    "ALPHAPULSE_CONTROL_TOKEN": ("service", "control.token"),
    "ALPHAPULSE_DATA_DIR": ("service", "paths.data_dir"),
    "ALPHAPULSE_LOG_DIR": ("service", "paths.log_dir"),
    "ALPHAPULSE_LOG_LEVEL": ("service", "logging.level"),
    "ALPHAPULSE_FEED": ("service", "feed.source"),
    "ALPHAPULSE_REPLAY_FILE": ("service", "feed.replay_file"),
    "ALPHAPULSE_REPLAY_SPEED": ("service", "feed.replay_speed"),
    "ALPHAPULSE_MODEL_PATH": ("service", "model.path"),
    "WEEX_REST_URL": ("service", "exchange.rest_url"),
    "WEEX_WS_URL": ("service", "exchange.ws_url"),
}
SECRET_ENV = ("WEEX_API_KEY", "WEEX_SECRET_KEY", "WEEX_PASSPHRASE")
# Read by other commands sharing the daemon's environment file (``alphapulse monitor``, ``alphapulse backup``), so
# the daemon must accept them.
OTHER_ENV = ("ALPHAPULSE_CONFIG_DIR", "ALPHAPULSE_MONITOR_PORT", "ALPHAPULSE_BACKUP_DIR", "ALPHAPULSE_BACKUP_KEY")


def _coerce(value: Any, typ: type, source: str, key: str) -> Any:
    """YAML gives typed values, the environment gives strings: accept both, strictly."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(source, key, f"must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(source, key, f"must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(source, key, f"must be an integer, got {value!r}")
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(source, key, f"must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(source, key, f"must be a number, got {value!r}")
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(source, key, f"must be a string, got {value!r}")
    raise AssertionError(typ)


def _defaults(schema: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (_defaults(v) if isinstance(v, dict) else v[1]) for k, v in schema.items()}


def _merge(schema: Mapping[str, Any], target: dict[str, Any], data: Any, source: str, prefix: str = "") -> None:
    """Validate ``data`` against ``schema`` and write it into ``target``."""
    if not isinstance(data, dict):
        raise ConfigError(source, prefix.rstrip(".") or "(top level)", f"must be a mapping, got {type(data).__name__}")
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in schema:
            known = ", ".join(sorted(schema))
            raise ConfigError(source, dotted, f"unknown key (known keys here: {known})")
        spec = schema[key]
        if isinstance(spec, dict):
            _merge(spec, target[key], value if value is not None else {}, source, dotted + ".")
        else:
            typ, _default, check = spec
            v = _coerce(value, typ, source, dotted)
            if check is not None and (err := check(v)):
                raise ConfigError(source, dotted, err)
            target[key] = v


def _set_dotted(schema: Mapping[str, Any], target: dict[str, Any], dotted: str, value: str, source: str) -> None:
    *parents, leaf = dotted.split(".")
    sub_schema, sub_target = schema, target
    for p in parents:
        sub_schema, sub_target = sub_schema[p], sub_target[p]
    typ, _default, check = sub_schema[leaf]
    v = _coerce(value, typ, source, dotted)
    if check is not None and (err := check(v)):
        raise ConfigError(source, dotted, err)
    sub_target[leaf] = v


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(str(path), "(file)", f"cannot read: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(file)"
        raise ConfigError(str(path), where, f"invalid YAML: {getattr(e, 'problem', e)}") from None
    return {} if data is None else data


@dataclass(frozen=True)
class Settings:
    """The validated configuration every component is built from."""

    mode: str
    config_dir: Path | None
    data_dir: Path
    log_dir: Path
    log_level: str
    log_console: bool
    control_host: str
    control_port: int
    control_token: str | None
    fault_injection: bool
    feed_source: str
    replay_file: Path | None  # None: the bundled replay
    replay_speed: float | None  # None: as fast as possible
    funding_file: Path | None  # paper funding rates (timestamp,funding_rate); None: the default rate
    queue_size: int
    rest_url: str  # WEEX contract REST base URL
    ws_url: str  # WEEX contract WebSocket base URL
    exchange_timeout_s: float
    reconcile_interval_s: float
    stream_silence_s: float
    leverage: int
    margin_type: str
    model_path: Path | None  # None: the shipped model
    model_warmup_runs: int
    stall_timeout_s: float
    symbol: str
    timeframe: str
    initial_equity: Decimal
    lot_size: Decimal
    confidence_threshold: float
    taker_fee: Decimal
    slippage_bps: Decimal
    risk: RiskLimits
    api_key: str | None
    secret_key: str | None
    passphrase: str | None

    @property
    def bar_ms(self) -> int:
        return TIMEFRAME_MS[self.timeframe]

    def secrets(self) -> list[str]:
        return [s for s in (self.api_key, self.secret_key, self.passphrase, self.control_token) if s]


def _dec(v: float) -> Decimal:
    return Decimal(repr(v))


# Secrets of the monitor's alert delivery (alphapulse/monitor/delivery_config.py reads them): the daemon and
# the monitor share one environment file, so the daemon must know these names too.
DELIVERY_ENV = ("ALPHAPULSE_WEBHOOK_URL", "ALPHAPULSE_SLACK_WEBHOOK_URL", "ALPHAPULSE_TELEGRAM_TOKEN",
                "ALPHAPULSE_SMTP_PASSWORD")


def default_config_dir(env: Mapping[str, str] | None = None) -> Path | None:
    """``$ALPHAPULSE_CONFIG_DIR``, else ``./config`` when it exists, else built-in defaults only."""
    value = (os.environ if env is None else env).get("ALPHAPULSE_CONFIG_DIR")
    if value:
        return Path(value)
    local = Path("config")
    return local if (local / SERVICE_FILE).exists() or (local / TRADING_FILE).exists() else None


def load_settings(config_dir: Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Build and validate :class:`Settings`; raises :class:`ConfigError` on the first problem."""
    env = os.environ if env is None else env
    if config_dir is None:
        config_dir = default_config_dir(env)
    service = _defaults(SERVICE_SCHEMA)
    trading = _defaults(TRADING_SCHEMA)
    if config_dir is not None:
        if not config_dir.is_dir():
            raise ConfigError("environment", "ALPHAPULSE_CONFIG_DIR", f"not a directory: {config_dir}")
        for name, schema, target in ((SERVICE_FILE, SERVICE_SCHEMA, service), (TRADING_FILE, TRADING_SCHEMA, trading)):
            path = config_dir / name
            if path.exists():
                _merge(schema, target, _read_yaml(path), str(path))

    known_env = set(ENV_KEYS) | set(SECRET_ENV) | set(OTHER_ENV) | set(DELIVERY_ENV)
    for name in env:
        # A typo in an override must not silently fall back to a default.
        if name.startswith("ALPHAPULSE_") and name not in known_env:
            raise ConfigError("environment", name, f"unknown variable (known: {', '.join(sorted(known_env))})")
    for name, (which, dotted) in ENV_KEYS.items():
        if name in env and env[name] != "":
            schema, target = (SERVICE_SCHEMA, service) if which == "service" else (TRADING_SCHEMA, trading)
            _set_dotted(schema, target, dotted, env[name], "environment")

    api_key, secret_key, passphrase = (env.get(k) or None for k in SECRET_ENV)
    if service["mode"] == "live":
        missing = [k for k, v in zip(SECRET_ENV, (api_key, secret_key, passphrase)) if not v]
        if missing:
            raise ConfigError("environment", missing[0], "live mode needs WEEX_API_KEY, WEEX_SECRET_KEY and "
                              f"WEEX_PASSPHRASE; missing: {', '.join(missing)}")
        if service["feed"]["replay_file"]:
            raise ConfigError("environment" if env.get("ALPHAPULSE_REPLAY_FILE") else SERVICE_FILE,
                              "ALPHAPULSE_REPLAY_FILE" if env.get("ALPHAPULSE_REPLAY_FILE") else "feed.replay_file",
                              "live mode trades the exchange's own candles; unset the replay file")
        service["feed"]["source"] = "weex"  # live orders need live prices, whatever feed.source says

    r = trading["risk"]
    risk = RiskLimits(
        max_position_frac=r["max_position_pct"] / 100.0,
        max_leverage=r["max_leverage"],
        daily_loss_limit_frac=r["daily_loss_limit_pct"] / 100.0,
        max_drawdown_frac=r["max_drawdown_pct"] / 100.0,
        max_orders_per_minute=r["max_orders_per_minute"],
        max_data_age_bars=r["max_data_age_bars"],
        flatten_on_halt=r["flatten_on_halt"],
        rebalance_band=r["rebalance_band_pct"] / 100.0,
        target_vol=r["target_vol_pct"] / 100.0,
    )
    if risk.max_position_frac > risk.max_leverage:
        raise ConfigError(TRADING_FILE, "risk.max_position_pct",
                          f"{r['max_position_pct']}% of equity exceeds max_leverage {r['max_leverage']}x")
    speed = service["feed"]["replay_speed"]
    return Settings(
        mode=service["mode"],
        config_dir=config_dir,
        data_dir=Path(service["paths"]["data_dir"]).expanduser(),
        log_dir=Path(service["paths"]["log_dir"]).expanduser(),
        log_level=service["logging"]["level"],
        log_console=service["logging"]["console"],
        control_host=service["control"]["host"],
        control_port=service["control"]["port"],
        control_token=service["control"]["token"] or None,
        fault_injection=service["control"]["fault_injection"],
        feed_source=service["feed"]["source"],
        replay_file=Path(service["feed"]["replay_file"]).expanduser() if service["feed"]["replay_file"] else None,
        replay_speed=None if speed == "max" else float(speed),
        funding_file=Path(service["feed"]["funding_file"]).expanduser() if service["feed"]["funding_file"] else None,
        queue_size=service["feed"]["queue_size"],
        rest_url=service["exchange"]["rest_url"].rstrip("/"),
        ws_url=service["exchange"]["ws_url"].rstrip("/"),
        exchange_timeout_s=service["exchange"]["timeout_s"],
        reconcile_interval_s=service["exchange"]["reconcile_interval_s"],
        stream_silence_s=service["exchange"]["stream_silence_s"],
        leverage=service["exchange"]["leverage"],
        margin_type=service["exchange"]["margin_type"],
        model_path=Path(service["model"]["path"]).expanduser() if service["model"]["path"] else None,
        model_warmup_runs=service["model"]["warmup_runs"],
        stall_timeout_s=service["watchdog"]["stall_timeout_s"],
        symbol=trading["symbol"],
        timeframe=trading["timeframe"],
        initial_equity=_dec(trading["initial_equity"]),
        lot_size=_dec(trading["lot_size"]),
        confidence_threshold=trading["confidence_threshold"],
        taker_fee=_dec(trading["fees"]["taker_fee"]),
        slippage_bps=_dec(trading["fees"]["slippage_bps"]),
        risk=risk,
        api_key=api_key,
        secret_key=secret_key,
        passphrase=passphrase,
    )


def check_paths(settings: Settings) -> None:
    """Fail early, as a config error, when a configured file is missing or a directory cannot be made."""
    for key, path in (("feed.replay_file", settings.replay_file), ("model.path", settings.model_path),
                      ("feed.funding_file", settings.funding_file)):
        if path is not None and not path.is_file():
            raise ConfigError(SERVICE_FILE, key, f"file not found: {path}")
    for key, d in (("paths.data_dir", settings.data_dir), ("paths.log_dir", settings.log_dir)):
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(SERVICE_FILE, key, f"cannot create directory {d}: {e.strerror or e}") from None
        if not os.access(d, os.W_OK):
            raise ConfigError(SERVICE_FILE, key, f"directory not writable: {d}")


#: Public name of the numeric range check, for the schemas of other configuration files (monitoring.yaml).
in_range = _range


def load_yaml_file(path: Path | None, schema: Mapping[str, Any],
                   opaque: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """The schema's defaults overlaid with ``path`` (defaults alone when the file does not exist), validated
    like config.yaml: unknown keys, wrong types and out-of-range values raise :class:`ConfigError`.

    Top-level keys named in ``opaque`` are not checked here: they must be mappings and come back apart, for
    the component that owns them to validate (the monitor's ``delivery:`` section).
    """
    values = _defaults(schema)
    extra: dict[str, Any] = {}
    if path is None or not path.exists():
        return values, extra
    data = _read_yaml(path)
    if isinstance(data, dict):
        data = dict(data)
        for key in opaque:
            if key in data:
                section = data.pop(key)
                if section is None:
                    section = {}
                if not isinstance(section, dict):
                    raise ConfigError(str(path), key, f"must be a mapping, got {type(section).__name__}")
                extra[key] = section
    _merge(schema, values, data, str(path))
    return values, extra
