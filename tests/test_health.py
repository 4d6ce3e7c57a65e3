"""``alphapulse health`` against a real daemon process, a real monitor stand-in and real files.

One daemon (replaying real 5m candles slowly, so it is still running throughout) serves the whole module.
The monitor is a stand-in HTTP server on an ephemeral port answering ``GET /health`` like the monitor service
(branch mon-core) does; the backup is a file in the backup directory until ``alphapulse backup`` exists.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from alphapulse.config import load_settings
from alphapulse.ops import health
from tests.daemon_harness import REPO, DaemonProc, free_port, slice_bundled

CHECKS = {"service", "control", "monitor", "feed", "model", "store", "disk", "clock", "backup"}


class _MonitorHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        code = 200 if self.path == "/health" else 404
        body = json.dumps({"status": "ok"} if code == 200 else {"error": "not found"}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        return


@pytest.fixture(scope="module")
def monitor() -> Iterator[int]:
    """A real HTTP server on 127.0.0.1 standing in for ``alphapulse monitor``'s GET /health."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _MonitorHandler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def _make_backup(d: DaemonProc) -> None:
    """A fresh backup where health looks for one, made by the backup tool itself."""
    rc = subprocess.run([sys.executable, "-m", "alphapulse", "backup", "create", "--type", "data"], env=d.env,
                        cwd=d.root, capture_output=True, text=True, timeout=120)
    assert rc.returncode == 0, rc.stderr


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    root = tmp_path_factory.mktemp("health-daemon")
    replay = slice_bundled(root / "replay.csv", 3000)
    d = DaemonProc(root, replay_file=replay, speed="600")  # a 5m bar every 0.5 s: still running at the end
    d.start()
    try:
        d.wait_ready(60)
        d.wait_metric(lambda m: m["market"]["candles_processed"] >= 3, timeout=30)
        _make_backup(d)
        yield d
    finally:
        d.stop()
        d.close()


def run_health(d: DaemonProc, *args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any], str]:
    e = dict(d.env)
    e.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "alphapulse", "health", "--json", *args], env=e, cwd=d.root,
                          capture_output=True, text=True, timeout=120)
    out = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {}
    return proc.returncode, out, proc.stderr


def by_name(out: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {c["name"]: c for c in out["checks"]}


def test_running_daemon_is_healthy(daemon: DaemonProc, monitor: int) -> None:
    rc, out, err = run_health(daemon, "--skip", "service", "--monitor-port", str(monitor))
    checks = by_name(out)
    assert rc == 0, (out, err)
    assert out["status"] == "healthy" and out["exit_code"] == 0
    assert set(checks) == CHECKS - {"service"} and out["skipped"] == ["service"]
    assert {c["status"] for c in checks.values()} == {"ok"}, checks
    assert "integrity_check ok" in checks["store"]["detail"]
    assert "baseline" in checks["model"]["detail"] or "5m" in checks["model"]["detail"]
    assert checks["clock"]["detail"].startswith("n/a")
    assert "replay" in checks["feed"]["detail"]


def test_monitor_env_variable_is_read(daemon: DaemonProc, monitor: int) -> None:
    rc, out, err = run_health(daemon, "--skip", "service", env={"ALPHAPULSE_MONITOR_PORT": str(monitor)})
    assert rc == 0, (out, err)
    assert f":{monitor}/health" in by_name(out)["monitor"]["detail"]


def test_no_monitor_is_degraded(daemon: DaemonProc) -> None:
    rc, out, _ = run_health(daemon, "--skip", "service", "--monitor-port", str(free_port()))
    checks = by_name(out)
    assert rc == 1 and out["status"] == "degraded"
    assert checks["monitor"]["status"] == "degraded" and "no monitor answers" in checks["monitor"]["detail"]
    assert all(c["status"] == "ok" for n, c in checks.items() if n != "monitor"), checks


@pytest.mark.skipif(Path("/run/systemd/system").is_dir(), reason="systemd is PID 1 here: the service is asked")
def test_service_without_systemd_is_unknown_and_degraded(daemon: DaemonProc, monitor: int) -> None:
    rc, out, _ = run_health(daemon, "--monitor-port", str(monitor))
    service = by_name(out)["service"]
    assert rc == 1 and service["status"] == "degraded" and service["detail"].startswith("unknown")


def test_corrupted_store_copy_is_failing(daemon: DaemonProc, monitor: int, tmp_path: Path) -> None:
    copy = tmp_path / "data"
    copy.mkdir()
    src = sqlite3.connect(daemon.data_dir / "alphapulse.db", timeout=10)  # a consistent copy while it writes
    dst = sqlite3.connect(copy / "alphapulse.db")
    src.backup(dst)
    src.close()
    dst.execute("PRAGMA journal_mode=DELETE")
    dst.close()
    env = {"ALPHAPULSE_DATA_DIR": str(copy)}
    rc, out, _ = run_health(daemon, "--skip", "service", "--skip", "backup", "--monitor-port", str(monitor),
                            env=env)
    assert rc == 0 and by_name(out)["store"]["status"] == "ok", out  # the intact copy passes first

    db = copy / "alphapulse.db"
    size = db.stat().st_size
    page = 4096
    assert size >= 4 * page, size
    with open(db, "r+b") as f:  # scribble over the b-tree pages after the schema page, header intact
        for off in range(page, size, page):
            f.seek(off + 8)
            f.write(b"\xa5" * 64)
    rc, out, _ = run_health(daemon, "--skip", "service", "--skip", "backup", "--monitor-port", str(monitor),
                            env=env)
    store = by_name(out)["store"]
    assert rc == 2 and out["status"] == "failing", out
    assert store["status"] == "failing" and str(db) in store["detail"]
    assert by_name(out)["control"]["status"] == "ok"  # the daemon itself still answers


def test_json_shape(daemon: DaemonProc, monitor: int) -> None:
    rc, out, _ = run_health(daemon, "--monitor-port", str(monitor))
    assert set(out) == {"status", "exit_code", "time", "checks", "skipped"}
    assert out["exit_code"] == rc and out["status"] in ("healthy", "degraded", "failing")
    assert [c["name"] for c in out["checks"]] == list(health.CHECK_NAMES)
    for c in out["checks"]:
        assert set(c) == {"name", "status", "detail"} and c["status"] in ("ok", "degraded", "failing")
        assert c["detail"] and "\n" not in c["detail"]


def test_table_output_names_every_check(daemon: DaemonProc, monitor: int) -> None:
    proc = subprocess.run([sys.executable, "-m", "alphapulse", "health", "--skip", "service", "--monitor-port",
                           str(monitor)], env=daemon.env, cwd=daemon.root, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert [ln.split()[0] for ln in lines[:-1]] == [n for n in health.CHECK_NAMES if n != "service"]
    assert lines[-1] == "overall: healthy (skipped: service)"


def test_halted_then_stopped_daemon(tmp_path: Path, monitor: int) -> None:
    d = DaemonProc(tmp_path, replay_file=slice_bundled(tmp_path / "r.csv", 120), speed="max")
    d.start()
    try:
        d.wait_ready(60)
        _make_backup(d)
        status, body, _ = d.http("POST", "/emergency_stop", token=d.token(), body=b'{"reason": "health test"}')
        assert status == 200, body
        rc, out, _ = run_health(d, "--skip", "service", "--monitor-port", str(monitor))
        control = by_name(out)["control"]
        assert rc == 1 and control["status"] == "degraded" and "EMERGENCY_STOP" in control["detail"], out
        assert d.stop() == 0
    finally:
        d.close()
    rc, out, _ = run_health(d, "--skip", "service", "--monitor-port", str(monitor))
    checks = by_name(out)
    assert rc == 2 and out["status"] == "failing"
    assert checks["control"]["status"] == "failing" and "no daemon answers" in checks["control"]["detail"]
    assert checks["feed"]["status"] == "failing"
    assert checks["store"]["status"] == "ok"  # the state survived the stop; only the process is missing


def test_invalid_config_exits_78_with_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALPHAPULSE_", "TRADING_MODE", "WEEX_"))}
    env.update({"ALPHAPULSE_CONTROL_PORT": "99999", "PYTHONPATH": str(REPO)})
    proc = subprocess.run([sys.executable, "-m", "alphapulse", "health"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 78
    assert proc.stderr.strip().splitlines() == [
        "alphapulse: config error: environment: control.port: must be <= 65535, got 99999"]
    env["ALPHAPULSE_CONTROL_PORT"] = "8080"
    env["ALPHAPULSE_MONITOR_PORT"] = "eighty"
    proc = subprocess.run([sys.executable, "-m", "alphapulse", "health"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 78
    assert proc.stderr.strip() == ("alphapulse: config error: environment: ALPHAPULSE_MONITOR_PORT: must be an "
                                   "integer, got 'eighty'")


# ---- the verdicts of single checks on real files --------------------------------------------------------


def _settings(tmp_path: Path, **env: str) -> Any:
    base = {"ALPHAPULSE_DATA_DIR": str(tmp_path / "data"), "ALPHAPULSE_LOG_DIR": str(tmp_path / "log")}
    base.update(env)
    return load_settings(None, base)


def test_backup_age_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Backups made by alphapulse.ops.backup itself, dated an hour and over two days back."""
    from alphapulse.ops.backup import Roots, create_backup

    env = {"ALPHAPULSE_BACKUP_DIR": str(tmp_path / "backups")}
    s = _settings(tmp_path, **env)
    opts = health.HealthOptions(backup_dir=tmp_path / "backups")
    r = health.check_backup(s, opts)
    assert r.status == "degraded" and r.detail.startswith("no backup in")
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / "trades.csv").write_text("timestamp,symbol\n")
    roots = Roots.from_settings(s, env)
    create_backup(roots, "logs", now=time.time() - 2 * 86400 - 600)
    r = health.check_backup(s, opts)
    assert r.status == "degraded" and "older than 2 days" in r.detail
    create_backup(roots, "logs", now=time.time() - 3600)
    r = health.check_backup(s, opts)
    assert r.status == "ok" and "1.0 h old" in r.detail
    # the default directory is the backup tool's: ALPHAPULSE_BACKUP_DIR, read the same way
    monkeypatch.setenv("ALPHAPULSE_BACKUP_DIR", env["ALPHAPULSE_BACKUP_DIR"])
    assert health.check_backup(s, health.HealthOptions()).status == "ok"


def test_missing_and_broken_model_fail(tmp_path: Path) -> None:
    missing = tmp_path / "nope.onnx"
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file")
    s = _settings(tmp_path)
    for path, words in ((missing, "missing"), (broken, str(broken))):
        r = health.check_model(dataclasses.replace(s, model_path=path))
        assert r.status == "failing" and words in r.detail, r
    assert health.check_model(s).status == "ok"  # the shipped model, 1h like the default timeframe


def test_live_feed_freshness_from_metrics(tmp_path: Path) -> None:
    """A live feed's last candle against the wall clock, through a real HTTP /metrics."""
    candle = {"time": "2026-01-01T10:00:00.000Z", "close": 1.0}
    payload: dict[str, Any] = {"market": {"last_candle": candle}, "trading": {"timeframe": "1h"},
                               "system": {"uptime_s": 4000.0}}

    class Handler(_MonitorHandler):
        def do_GET(self) -> None:
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        s = _settings(tmp_path, ALPHAPULSE_FEED="weex", ALPHAPULSE_CONTROL_PORT=str(server.server_address[1]))
        opts = health.HealthOptions()
        closed = health._parse_iso_ms(candle["time"]) + 3600
        assert health.check_feed(s, opts, now=lambda: closed + 30).status == "ok"
        assert health.check_feed(s, opts, now=lambda: closed + 5400).status == "degraded"
        r = health.check_feed(s, opts, now=lambda: closed + 3 * 3600)
        assert r.status == "failing" and "no trading" in r.detail
        payload["market"]["last_candle"] = None  # no bar since start: fine right after a restart, not later
        payload["system"]["uptime_s"] = 30.0
        r = health.check_feed(s, opts)
        assert r.status == "ok" and "has not closed yet" in r.detail
        payload["system"]["uptime_s"] = 2 * 3600.0
        assert health.check_feed(s, opts).status == "degraded"
    finally:
        server.shutdown()
        server.server_close()


def test_service_verdicts_from_systemctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With systemd as PID 1 the answer of ``systemctl is-active`` decides.  systemd is not PID 1 here, so a
    stand-in systemctl on PATH answers, and a directory stands in for /run/systemd/system."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    answer = tmp_path / "answer"
    tool = bin_dir / "systemctl"
    tool.write_text(f'#!/bin/sh\n[ "$1 $2" = "is-active alphapulse-trading" ] || exit 9\ncat {answer}\n')
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    run_dir = tmp_path / "run-systemd-system"
    run_dir.mkdir()
    opts = health.HealthOptions()
    for state, verdict in (("active", "ok"), ("activating", "degraded"), ("failed", "failing"),
                           ("inactive", "failing")):
        answer.write_text(state + "\n")
        r = health.check_service(opts, systemd_dir=run_dir)
        assert (r.status, r.detail) == (verdict, f"alphapulse-trading.service is {state}")
    r = health.check_service(opts, systemd_dir=tmp_path / "absent")
    assert r.status == "degraded" and r.detail.startswith("unknown: systemd is not running as PID 1")


def test_clock_skew_against_the_exchange_time_endpoint(tmp_path: Path) -> None:
    """Live mode asks the exchange's time endpoint through the real WEEX client; here a real HTTP server on
    127.0.0.1 answers ``GET /capi/v3/market/time`` with a clock offset the test chooses."""
    skew_ms = {"value": 0}

    class Exchange(_MonitorHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/capi/v3/market/time":
                self.send_response(404)
                self.end_headers()
                return
            body = json.dumps({"serverTime": int(time.time() * 1000) + skew_ms["value"]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Exchange)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        live = _settings(tmp_path, TRADING_MODE="live", WEEX_API_KEY="k" * 8, WEEX_SECRET_KEY="s" * 8,
                         WEEX_PASSPHRASE="p" * 8, WEEX_REST_URL=url)
        opts = health.HealthOptions(timeout_s=5)
        for skew, verdict in ((0, "ok"), (5_000, "degraded"), (-45_000, "failing")):
            skew_ms["value"] = skew
            r = asyncio.run(health.check_clock(live, opts))
            assert r.status == verdict, r
            assert url in r.detail
            if skew:
                assert ("behind" if skew > 0 else "ahead of") in r.detail
        # the command line in live mode: stdout is the one JSON object, the client's log lines stay off it
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ALPHAPULSE_", "TRADING_MODE", "WEEX_"))}
        env.update({"TRADING_MODE": "live", "WEEX_API_KEY": "k" * 8, "WEEX_SECRET_KEY": "s" * 8,
                    "WEEX_PASSPHRASE": "p" * 8, "WEEX_REST_URL": url, "PYTHONPATH": str(REPO),
                    "ALPHAPULSE_DATA_DIR": str(tmp_path / "data"), "ALPHAPULSE_LOG_DIR": str(tmp_path / "log"),
                    "ALPHAPULSE_LOG_LEVEL": "DEBUG"})
        proc = subprocess.run([sys.executable, "-m", "alphapulse", "health", "--json", "--skip", "service"],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        out = json.loads(proc.stdout)
        assert by_name(out)["clock"]["status"] == "failing" and proc.returncode == 2
        assert "s" * 8 not in proc.stdout + proc.stderr and "p" * 8 not in proc.stdout + proc.stderr
        server.shutdown()
        r = asyncio.run(health.check_clock(live, opts))  # the exchange unreachable: cannot tell, degraded
        assert r.status == "degraded" and "cannot read the exchange's time" in r.detail
        paper = asyncio.run(health.check_clock(_settings(tmp_path), opts))
        assert paper.status == "ok" and paper.detail.startswith("n/a")
    finally:
        server.server_close()


def test_disk_thresholds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The free-space rules; the filesystem's figures are set, since a full disk cannot be made safely here."""
    s = _settings(tmp_path)
    mib = 1048576
    usage_t = collections.namedtuple("usage_t", "total used free")
    for free_mb, total_mb, verdict in ((50_000, 100_000, "ok"), (900, 10_000, "degraded"),
                                       (4_000, 100_000, "degraded"), (90, 100_000, "failing"),
                                       (500, 100_000, "failing")):
        usage = usage_t(total_mb * mib, (total_mb - free_mb) * mib, free_mb * mib)
        monkeypatch.setattr(health.shutil, "disk_usage", lambda _p, u=usage: u)
        r = health.check_disk(s)
        assert r.status == verdict, (free_mb, r)
        assert f"{free_mb:,} MiB free" in r.detail
    assert health.check_disk(s).detail.count("dir") == 2  # data and log directories both named


def test_monitor_port_is_the_monitors() -> None:
    from alphapulse.monitor import settings as monitor_settings

    assert health.DEFAULT_MONITOR_PORT == monitor_settings.DEFAULT_PORT
    assert health.MONITOR_PORT_ENV == monitor_settings.PORT_ENV
