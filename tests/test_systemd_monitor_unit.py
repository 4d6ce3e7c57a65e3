"""Checks for systemd/alphapulse-monitor.service, the same three layers as tests/test_systemd_unit.py (whose
helpers it reuses): the unit text carries the monitor's contract and shares the daemon's identity and
directories; ``systemd-analyze verify`` and ``security`` accept it; and the real ``alphapulse monitor`` runs
(READY, watchdog, psutil's host figures, HTTP) under the unit's own seccomp rules.

Missing systemd-analyze: skip, except under CI=true where it fails (see test_systemd_unit.py).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_systemd_unit import (
    MAX_EXPOSURE,
    REPO,
    Unit,
    environment,
    last,
    lines_about,
    parse_exposure,
    parse_unit,
    run_analyze,
    sandbox_config,
    sandboxed,
)

UNIT_NAME = "alphapulse-monitor.service"
UNIT_PATH = REPO / "systemd" / UNIT_NAME
TRADING_PATH = REPO / "systemd" / "alphapulse-trading.service"
SHIPPED_EXEC_START = "/opt/alphapulse-rl/current/venv/bin/alphapulse monitor"  # scripts/install.sh


@pytest.fixture(scope="module")
def unit() -> Unit:
    return parse_unit(UNIT_PATH.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def trading() -> Unit:
    return parse_unit(TRADING_PATH.read_text(encoding="utf-8"))


REQUIRED = {
    "Type": "notify",
    "NotifyAccess": "main",
    "WatchdogSec": "30",
    "ExecStart": SHIPPED_EXEC_START,
    "Restart": "always",
    "RestartPreventExitStatus": "78",
    "KillSignal": "SIGTERM",
    "TimeoutStopSec": "15",
    "User": "alphapulse",  # the trading unit's static system user (scripts/install.sh creates it)
    "UMask": "0077",
    "MemoryMax": "256M",
}


@pytest.mark.parametrize(("key", "expected"), sorted(REQUIRED.items()))
def test_service_setting(unit: Unit, key: str, expected: str) -> None:
    assert last(unit, "Service", key) == expected


SHARED_WITH_TRADING = ("EnvironmentFile", "User", "Group", "StateDirectory", "StateDirectoryMode", "LogsDirectory",
                       "LogsDirectoryMode", "DynamicUser",
                       "ConfigurationDirectory", "NoNewPrivileges", "CapabilityBoundingSet", "ProtectSystem",
                       "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateUsers", "ProtectProc",
                       "MemoryDenyWriteExecute", "RestrictAddressFamilies", "SystemCallArchitectures",
                       "SystemCallErrorNumber", "RestrictNamespaces", "LockPersonality")


@pytest.mark.parametrize("key", SHARED_WITH_TRADING)
def test_same_identity_directories_and_sandbox_as_the_daemon(unit: Unit, trading: Unit, key: str) -> None:
    """One user for both units, so the monitor can own monitor.db and read the daemon's 0600 token."""
    assert unit["Service"].get(key) == trading["Service"].get(key), key
    if key != "DynamicUser":  # set in neither: the static user of scripts/install.sh
        assert last(unit, "Service", key) is not None, key


def test_same_environment_and_syscall_filter_as_the_daemon(unit: Unit, trading: Unit) -> None:
    env, daemon_env = environment(unit), environment(trading)
    for name in ("ALPHAPULSE_DATA_DIR", "ALPHAPULSE_LOG_DIR", "ALPHAPULSE_CONFIG_DIR"):
        assert env[name] == daemon_env[name]
    assert unit["Service"]["SystemCallFilter"] == trading["Service"]["SystemCallFilter"]
    assert last(unit, "Service", "User") == "alphapulse"


def test_monitor_outlives_the_daemon(unit: Unit) -> None:
    """No dependency that would stop or fail the monitor with the daemon: it has to report that."""
    for key in ("Requires", "BindsTo", "PartOf", "Requisite"):
        assert key not in unit["Unit"], key
    assert "alphapulse-trading.service" in unit["Unit"]["After"][-1].split()


def test_psutil_can_see_the_host(unit: Unit) -> None:
    """ProcSubset=pid would hide /proc/stat and /proc/meminfo, and the host rules would silently have no data."""
    assert "ProcSubset" not in unit["Service"]


def runnable_copy(directory: Path, extra_lines: str = "") -> Path:
    script = Path(sys.prefix) / "bin" / "alphapulse"
    binary = script if script.is_file() else Path(sys.executable)
    text = UNIT_PATH.read_text(encoding="utf-8")
    assert f"ExecStart={SHIPPED_EXEC_START}" in text
    text = text.replace(f"ExecStart={SHIPPED_EXEC_START}", f"ExecStart={binary} monitor")
    if extra_lines:
        text = text.replace("[Service]\n", f"[Service]\n{extra_lines}\n", 1)
    copy = directory / UNIT_NAME
    copy.write_text(text, encoding="utf-8")
    return copy


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    copy = runnable_copy(tmp_path)
    result = run_analyze("verify", str(copy))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert lines_about(output, copy) == [], output


def test_verify_check_detects_a_broken_unit(tmp_path: Path) -> None:
    copy = runnable_copy(tmp_path, extra_lines="WatchdogSecs=30")
    result = run_analyze("verify", str(copy))
    assert any("WatchdogSecs" in line for line in lines_about(result.stdout + result.stderr, copy))


def test_security_exposure_stays_at_1_2_or_lower() -> None:
    result = run_analyze("security", "--offline=true", str(UNIT_PATH))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert parse_exposure(output) <= MAX_EXPOSURE, output


def test_monitor_runs_under_the_units_seccomp_rules(unit: Unit, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The real `alphapulse monitor` in the unit's seccomp sandbox: READY, watchdog pings, host figures from
    psutil, its HTTP API, a clean SIGTERM stop."""
    harness = pytest.importorskip("tests.daemon_harness")
    config = sandbox_config(unit)
    real_popen = subprocess.Popen
    argvs: list[list[str]] = []

    def sandboxed_popen(argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        argvs.append(list(argv))
        return real_popen(sandboxed(config, list(argv)), **kwargs)  # type: ignore[call-overload]

    extra = {name: value for name, value in environment(unit).items() if not name.startswith("ALPHAPULSE_")}
    daemon = harness.DaemonProc(tmp_path / "run")  # never started: the monitor must run without it
    mon = harness.MonitorProc(daemon, env=extra, watchdog_usec=2_000_000)
    monkeypatch.setattr(harness.subprocess, "Popen", sandboxed_popen)
    try:
        mon.start()
        monkeypatch.undo()
        mon.wait_ready(60)
        mon.wait_message("WATCHDOG=1", 10)
        mon.wait_alerts(lambda b: b["active_alerts"], 10)
        status, snap, _ = mon.http("GET", "/api/snapshot")
        assert status == 200
        assert all(isinstance(snap["host"][k], float) for k in ("cpu_pct", "memory_pct", "disk_pct")), snap["host"]
        mon.signal(signal.SIGTERM)
        assert mon.wait_exit(15) == 0, mon.stderr()
        mon.wait_message("STOPPING=1", 1)
    finally:
        mon.close()
    assert len(argvs) == 1 and "monitor" in argvs[0]
    assert "Operation not permitted" not in mon.stderr()
