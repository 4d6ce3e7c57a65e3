"""Configuration: defaults, the shipped files, environment overrides, and every class of error.

A trading daemon must never half-start on a typo, so each error class is checked for the exact
``source``/``key``/``problem`` it reports, and the process contract (exit status 78, one line on
stderr) is checked on a real ``python -m alphapulse`` subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from alphapulse.config import (
    EX_CONFIG,
    SERVICE_SCHEMA,
    TRADING_SCHEMA,
    ConfigError,
    Settings,
    check_paths,
    load_settings,
)
from alphapulse.risk import RiskLimits


def _leaves(schema: dict[str, object], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for k, v in schema.items():
        out |= _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return out


def _yaml_leaves(data: dict[str, object], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for k, v in data.items():
        out |= _yaml_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return out


def _write(dir_: Path, name: str, text: str) -> Path:
    p = dir_ / name
    p.write_text(text, encoding="utf-8")
    return p


def _err(config_dir: Path | None, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        load_settings(config_dir, env={} if env is None else env)
    return ei.value


# ---- defaults and shipped files ---------------------------------------------------------------


def test_defaults_load_from_an_empty_config_dir(tmp_path: Path) -> None:
    s = load_settings(tmp_path, env={})
    assert s.mode == "paper"
    assert (s.control_host, s.control_port, s.control_token) == ("127.0.0.1", 8080, None)
    assert s.replay_speed == 72000.0 and s.replay_file is None and s.model_path is None
    assert s.symbol == "BTCUSDT" and s.timeframe == "1h" and s.bar_ms == 3_600_000
    assert s.initial_equity == Decimal("10000.0") and s.lot_size == Decimal("0.001")
    assert s.taker_fee == Decimal("0.0006") and s.slippage_bps == Decimal("2.0")
    assert s.confidence_threshold == 0.6
    # Percent in the file, fractions in RiskLimits: the defaults must be the same limits RiskLimits documents.
    assert s.risk == RiskLimits()
    assert s.api_key is None and s.secrets() == []


def test_shipped_yaml_files_load_and_document_every_key(repo_dir: Path) -> None:
    cfg = repo_dir / "config"
    s = load_settings(cfg, env={})
    assert isinstance(s, Settings)
    assert s.config_dir == cfg
    service = yaml.safe_load((cfg / "config.yaml").read_text())
    trading = yaml.safe_load((cfg / "trading_params.yaml").read_text())
    # The shipped files are the operator's documentation: every key of the schema appears in them.
    assert _yaml_leaves(service) == _leaves(SERVICE_SCHEMA)
    assert _yaml_leaves(trading) == _leaves(TRADING_SCHEMA)
    assert s.control_port == service["control"]["port"]
    assert s.risk.max_drawdown_frac == trading["risk"]["max_drawdown_pct"] / 100
    assert s.risk.daily_loss_limit_frac == trading["risk"]["daily_loss_limit_pct"] / 100
    assert s.risk.max_position_frac == trading["risk"]["max_position_pct"] / 100
    assert s.taker_fee == Decimal(str(trading["fees"]["taker_fee"]))


def test_env_example_is_loadable_and_names_only_known_variables(repo_dir: Path) -> None:
    """The example env file must not carry a typo that would make the daemon refuse to start."""
    active: dict[str, str] = {}
    commented: dict[str, str] = {}  # name -> the example value written after it (before any comment)
    for line in (repo_dir / "config" / "alphapulse.env.example").read_text().splitlines():
        text = line.strip()
        if not text:
            continue
        if text.startswith("#"):
            body = text.lstrip("#").strip()
            name, _, rest = body.partition("=")
            if "=" in body and name.isupper() and " " not in name:
                commented[name] = rest.split("#", 1)[0].strip()
            continue
        name, value = text.split("=", 1)
        active[name] = value
    assert "TRADING_MODE" in active and len(commented) >= 5
    s = load_settings(repo_dir / "config", env=active)
    assert s.mode == "paper"
    for name, example in commented.items():  # uncommenting any documented variable must be accepted
        value = {"ALPHAPULSE_CONFIG_DIR": str(repo_dir / "config"), "ALPHAPULSE_CONTROL_PORT": "8081"}.get(
            name, example or "x")
        load_settings(repo_dir / "config", env={**active, name: value})


# ---- environment overrides ---------------------------------------------------------------------


def test_env_overrides_win_over_yaml(tmp_path: Path) -> None:
    _write(tmp_path, "config.yaml", "control:\n  port: 9000\nfeed:\n  replay_speed: '50'\n")
    assert load_settings(tmp_path, env={}).control_port == 9000
    s = load_settings(tmp_path, env={"ALPHAPULSE_CONTROL_PORT": "9100", "TRADING_MODE": "paper",
                                     "ALPHAPULSE_DATA_DIR": str(tmp_path / "d"), "ALPHAPULSE_LOG_LEVEL": "DEBUG"})
    assert s.control_port == 9100
    assert s.mode == "paper"
    assert s.data_dir == tmp_path / "d"
    assert s.log_level == "DEBUG"
    assert s.replay_speed == 50.0


@pytest.mark.parametrize(("value", "expected"), [("max", None), ("600", 600.0), ("0.5", 0.5)])
def test_replay_speed_env(tmp_path: Path, value: str, expected: float | None) -> None:
    s = load_settings(tmp_path, env={"ALPHAPULSE_REPLAY_SPEED": value})
    assert s.replay_speed == expected
    assert s.replay_speed is None or isinstance(s.replay_speed, float)


def test_empty_env_value_keeps_the_file_value(tmp_path: Path) -> None:
    """systemd EnvironmentFile lines like ``WEEX_API_KEY=`` are empty, not overrides."""
    _write(tmp_path, "config.yaml", "control:\n  port: 9000\n")
    s = load_settings(tmp_path, env={"ALPHAPULSE_CONTROL_PORT": "", "WEEX_API_KEY": ""})
    assert s.control_port == 9000 and s.api_key is None


def test_control_token_is_a_secret(tmp_path: Path) -> None:
    s = load_settings(tmp_path, env={"ALPHAPULSE_CONTROL_TOKEN": "s3cret-token"})
    assert s.control_token == "s3cret-token"
    assert "s3cret-token" in s.secrets()


def test_explicit_env_mapping_is_the_only_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    _write(broken, "config.yaml", "nonsense_key: 1\n")
    monkeypatch.setenv("ALPHAPULSE_CONFIG_DIR", str(broken))
    monkeypatch.chdir(tmp_path)  # no ./config here
    s = load_settings(None, env={})  # the process environment must not leak into an explicit mapping
    assert s.config_dir is None
    e = _err(None, {"ALPHAPULSE_CONFIG_DIR": str(broken)})  # ... while the mapping's own value is used
    assert e.key == "nonsense_key"


# ---- each error class names source, key and problem ---------------------------------------------


@pytest.mark.parametrize(
    ("file", "text", "key", "problem"),
    [
        ("config.yaml", "modee: paper\n", "modee", "unknown key"),
        ("config.yaml", "control:\n  prot: 8080\n", "control.prot", "unknown key"),
        ("trading_params.yaml", "risk:\n  max_drawdown: 12\n", "risk.max_drawdown", "unknown key"),
        ("config.yaml", "control:\n  port: abc\n", "control.port", "must be an integer, got 'abc'"),
        ("config.yaml", "control:\n  port: true\n", "control.port", "must be an integer"),
        ("config.yaml", "control:\n  - 8080\n  - 8081\n", "control", "must be a mapping, got list"),
        ("config.yaml", "- a\n- b\n", "(top level)", "must be a mapping, got list"),
        ("config.yaml", "control:\n  port: 70000\n", "control.port", "must be <= 65535, got 70000"),
        ("config.yaml", "control:\n  port: 0\n", "control.port", "must be >= 1"),
        ("config.yaml", "control:\n  host: 0.0.0.0\n", "control.host", "loopback"),
        ("config.yaml", "mode: lve\n", "mode", "must be one of paper, live"),
        ("config.yaml", "feed:\n  replay_speed: fast\n", "feed.replay_speed", "positive number or 'max'"),
        ("config.yaml", "feed:\n  replay_speed: -3\n", "feed.replay_speed", "positive number or 'max'"),
        ("config.yaml", "logging:\n  console: maybe\n", "logging.console", "must be true or false"),
        ("trading_params.yaml", "risk:\n  max_drawdown_pct: 150\n", "risk.max_drawdown_pct", "must be <= 100, got 150"),
        ("trading_params.yaml", "risk:\n  max_drawdown_pct: 0\n", "risk.max_drawdown_pct", "must be > 0"),
        ("trading_params.yaml", "fees:\n  taker_fee: -0.0006\n", "fees.taker_fee", "must be >= 0, got -0.0006"),
        ("trading_params.yaml", "fees:\n  slippage_bps: .nan\n", "fees.slippage_bps", "finite"),
        ("trading_params.yaml", "timeframe: 7m\n", "timeframe", "must be one of"),
        ("trading_params.yaml", "initial_equity: -5\n", "initial_equity", "must be > 0"),
        ("trading_params.yaml", "risk:\n  max_orders_per_minute: 2.5\n", "risk.max_orders_per_minute",
         "must be an integer"),
        ("trading_params.yaml", "risk:\n  target_vol_pct: -10\n", "risk.target_vol_pct", "must be >= 0, got -10"),
        ("trading_params.yaml", "risk:\n  target_vol_pct: ten\n", "risk.target_vol_pct", "number"),
        ("config.yaml", "control:\n  port: [8080\n", "line ", "invalid YAML"),
        ("trading_params.yaml", "risk:\n  max_leverage: 3\n   daily: 1\n", "line ", "invalid YAML"),
    ],
)
def test_file_errors_name_source_key_problem(tmp_path: Path, file: str, text: str, key: str, problem: str) -> None:
    path = _write(tmp_path, file, text)
    e = _err(tmp_path)
    assert e.source == str(path)
    if key.endswith(" "):
        assert e.key.startswith(key) and e.key[len(key):].isdigit(), e.key
    else:
        assert e.key == key
    assert problem in e.problem
    assert str(e) == f"{e.source}: {e.key}: {e.problem}"
    assert "\n" not in str(e)


def test_cross_field_check_position_above_leverage(tmp_path: Path) -> None:
    _write(tmp_path, "trading_params.yaml", "risk:\n  max_position_pct: 400\n  max_leverage: 3\n")
    e = _err(tmp_path)
    assert "trading_params.yaml" in e.source
    assert e.key == "risk.max_position_pct"
    assert "exceeds max_leverage" in e.problem


def test_config_dir_that_is_not_a_directory(tmp_path: Path) -> None:
    e = _err(tmp_path / "missing")
    assert (e.source, e.key) == ("environment", "ALPHAPULSE_CONFIG_DIR")
    assert "not a directory" in e.problem


@pytest.mark.parametrize(
    ("env", "key", "problem"),
    [
        ({"ALPHAPULSE_CONTROL_PROT": "8080"}, "ALPHAPULSE_CONTROL_PROT", "unknown variable"),
        ({"ALPHAPULSE_CONTROL_PORT": "abc"}, "control.port", "must be an integer, got 'abc'"),
        ({"ALPHAPULSE_CONTROL_PORT": "70000"}, "control.port", "must be <= 65535"),
        ({"ALPHAPULSE_REPLAY_SPEED": "0"}, "feed.replay_speed", "positive number or 'max'"),
        ({"TRADING_MODE": "papr"}, "mode", "must be one of paper, live"),
        ({"ALPHAPULSE_LOG_LEVEL": "VERBOSE"}, "logging.level", "must be one of"),
    ],
)
def test_env_errors(tmp_path: Path, env: dict[str, str], key: str, problem: str) -> None:
    e = _err(tmp_path, env)
    assert e.source == "environment"
    assert e.key == key
    assert problem in e.problem


def test_non_alphapulse_env_is_ignored(tmp_path: Path) -> None:
    assert load_settings(tmp_path, env={"PATH": "/bin", "HOME": "/root", "XALPHAPULSE_X": "1"}).mode == "paper"


@pytest.mark.parametrize(
    ("secrets", "missing"),
    [
        ({}, "WEEX_API_KEY"),
        ({"WEEX_API_KEY": "k"}, "WEEX_SECRET_KEY"),
        ({"WEEX_API_KEY": "k", "WEEX_SECRET_KEY": "s"}, "WEEX_PASSPHRASE"),
        ({"WEEX_API_KEY": "k", "WEEX_SECRET_KEY": "", "WEEX_PASSPHRASE": "p"}, "WEEX_SECRET_KEY"),
    ],
)
def test_live_mode_without_keys_names_the_missing_variable(tmp_path: Path, secrets: dict[str, str],
                                                           missing: str) -> None:
    e = _err(tmp_path, {"TRADING_MODE": "live", **secrets})
    assert e.source == "environment"
    assert e.key == missing
    assert f"missing: {missing}" in e.problem


def test_live_mode_with_keys_trades_the_exchange_feed(tmp_path: Path) -> None:
    env = {"TRADING_MODE": "live", "WEEX_API_KEY": "key-7f3a", "WEEX_SECRET_KEY": "sec-91bc",
           "WEEX_PASSPHRASE": "pass-55d0"}
    s = load_settings(tmp_path, env=env)
    assert (s.mode, s.feed_source) == ("live", "weex")  # live orders need live prices
    assert set(s.secrets()) >= {"key-7f3a", "sec-91bc", "pass-55d0"}
    e = _err(tmp_path, {**env, "ALPHAPULSE_REPLAY_FILE": "/some/candles.csv.gz"})
    assert (e.source, e.key) == ("environment", "ALPHAPULSE_REPLAY_FILE")
    # the secrets are never echoed in the message
    assert not any(v in str(e) for v in ("key-7f3a", "sec-91bc", "pass-55d0"))


def test_live_mode_in_yaml_is_checked_too(tmp_path: Path) -> None:
    _write(tmp_path, "config.yaml", "mode: live\n")
    assert _err(tmp_path).key == "WEEX_API_KEY"


def test_check_paths_missing_replay_file(tmp_path: Path) -> None:
    s = load_settings(tmp_path, env={"ALPHAPULSE_REPLAY_FILE": str(tmp_path / "nope.csv.gz"),
                                     "ALPHAPULSE_DATA_DIR": str(tmp_path / "data"),
                                     "ALPHAPULSE_LOG_DIR": str(tmp_path / "log")})
    with pytest.raises(ConfigError) as ei:
        check_paths(s)
    assert ei.value.key == "feed.replay_file" and "file not found" in ei.value.problem


def test_target_vol_and_funding_file_keys(tmp_path: Path) -> None:
    """Vol targeting is off by default (today's fixed fraction); on, it is a fraction like the other limits.  The
    paper funding file is optional, and a configured one must exist."""
    assert load_settings(tmp_path, env={}).risk.target_vol == 0.0
    assert load_settings(tmp_path, env={}).funding_file is None
    _write(tmp_path, "trading_params.yaml", "risk:\n  target_vol_pct: 10\n")
    _write(tmp_path, "config.yaml", f"feed:\n  funding_file: {tmp_path / 'rates.csv.gz'}\n")
    s = load_settings(tmp_path, env={"ALPHAPULSE_DATA_DIR": str(tmp_path / "data"),
                                     "ALPHAPULSE_LOG_DIR": str(tmp_path / "log")})
    assert s.risk.target_vol == pytest.approx(0.10) and s.funding_file == tmp_path / "rates.csv.gz"
    with pytest.raises(ConfigError) as ei:
        check_paths(s)
    assert ei.value.key == "feed.funding_file" and "file not found" in ei.value.problem


def test_check_paths_creates_directories(tmp_path: Path) -> None:
    s = load_settings(tmp_path, env={"ALPHAPULSE_DATA_DIR": str(tmp_path / "a" / "data"),
                                     "ALPHAPULSE_LOG_DIR": str(tmp_path / "b" / "log")})
    check_paths(s)
    assert (tmp_path / "a" / "data").is_dir() and (tmp_path / "b" / "log").is_dir()


# ---- the process contract: exit 78, one line on stderr -------------------------------------------


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith(("ALPHAPULSE_", "WEEX_")) or k == "TRADING_MODE")}
    env.update(extra)
    return env


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "alphapulse", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=60)


BROKEN_CASES = [
    # (file, text, extra env, must appear in the one stderr line)
    ("config.yaml", "control:\n  prot: 8080\n", {}, ["config.yaml", "control.prot", "unknown key"]),
    ("config.yaml", "control:\n  port: abc\n", {}, ["config.yaml", "control.port", "must be an integer"]),
    ("config.yaml", "control:\n  port: 70000\n", {}, ["config.yaml", "control.port", "must be <= 65535"]),
    ("trading_params.yaml", "risk:\n  max_drawdown_pct: 150\n", {},
     ["trading_params.yaml", "risk.max_drawdown_pct", "must be <= 100"]),
    ("trading_params.yaml", "fees:\n  taker_fee: -1\n", {}, ["trading_params.yaml", "fees.taker_fee", "must be >= 0"]),
    ("config.yaml", "control:\n  port: [8080\n", {}, ["config.yaml", "line ", "invalid YAML"]),
    ("config.yaml", "mode: paper\n", {"ALPHAPULSE_CONTROL_PROT": "1"},
     ["environment", "ALPHAPULSE_CONTROL_PROT", "unknown variable"]),
    ("config.yaml", "mode: live\n", {}, ["environment", "WEEX_API_KEY", "missing: WEEX_API_KEY"]),
    ("config.yaml", "mode: paper\n", {"ALPHAPULSE_REPLAY_FILE": "/nonexistent/candles.csv.gz"},
     ["config.yaml", "feed.replay_file", "file not found: /nonexistent/candles.csv.gz"]),
]


@pytest.mark.parametrize(("file", "text", "extra", "needles"), BROKEN_CASES,
                         ids=[f"{c[0]}:{c[3][1].strip()}" for c in BROKEN_CASES])
def test_run_with_broken_config_exits_78_with_one_line(tmp_path: Path, file: str, text: str,
                                                       extra: dict[str, str], needles: list[str]) -> None:
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    _write(cfg, file, text)
    env = _clean_env(ALPHAPULSE_CONFIG_DIR=str(cfg), ALPHAPULSE_DATA_DIR=str(tmp_path / "data"),
                     ALPHAPULSE_LOG_DIR=str(tmp_path / "log"), **extra)
    proc = _cli(["run", "--exit-at-end"], env, tmp_path)
    assert proc.returncode == EX_CONFIG, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert proc.stderr.endswith("\n")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    # nothing was started: no database, no log files
    assert not (tmp_path / "data" / "alphapulse.db").exists()
    assert not (tmp_path / "log").exists() or not any((tmp_path / "log").iterdir())


def test_check_config_ok_on_shipped_config(tmp_path: Path, repo_dir: Path) -> None:
    env = _clean_env(ALPHAPULSE_CONFIG_DIR=str(repo_dir / "config"), ALPHAPULSE_DATA_DIR=str(tmp_path / "data"),
                     ALPHAPULSE_LOG_DIR=str(tmp_path / "log"))
    proc = _cli(["check-config"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("config ok: mode=paper symbol=BTCUSDT timeframe=1h")
    assert proc.stderr == ""
    assert (tmp_path / "data").is_dir() and (tmp_path / "log").is_dir()


def test_check_config_78_on_broken_config(tmp_path: Path) -> None:
    _write(tmp_path, "trading_params.yaml", "risk:\n  max_drawdown_pct: 150\n")
    env = _clean_env(ALPHAPULSE_DATA_DIR=str(tmp_path / "data"), ALPHAPULSE_LOG_DIR=str(tmp_path / "log"))
    proc = _cli(["--config-dir", str(tmp_path), "check-config"], env, tmp_path)
    assert proc.returncode == EX_CONFIG
    lines = proc.stderr.splitlines()
    assert len(lines) == 1
    assert "trading_params.yaml" in lines[0] and "risk.max_drawdown_pct" in lines[0] and "<= 100" in lines[0]
    assert proc.stdout == ""
