"""The daemon as a real process: systemd notify protocol, watchdog honesty, signals, replay end, restarts."""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon_harness import REPO, DaemonProc, slice_bundled


@pytest.fixture
def procs() -> Iterator[list[DaemonProc]]:
    started: list[DaemonProc] = []
    yield started
    for p in started:
        p.close()


def test_notify_ready_status_watchdog_stopping_and_exit_code(tmp_path: Path, procs: list[DaemonProc]) -> None:
    d = DaemonProc(tmp_path, speed="3000", watchdog_usec=1_000_000)
    procs.append(d)
    d.start()
    t_ready, _ = d.wait_message("READY=1")
    # READY only after the control API, state and model are up: the API answers at once.
    status, body, _ = d.http("GET", "/health")
    assert status == 200 and body["status"] == "ok", body
    _, st = d.wait_message("STATUS=")
    assert "paper" in st and "ACTIVE" in st and "equity=" in st

    d.poll_messages(3.5)
    pings = [t for t, m in d.messages if m == "WATCHDOG=1" and t > t_ready]
    assert len(pings) >= 4, d.messages
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    # WatchdogSec = 1 s: the daemon pings every half interval, like sd_watchdog_enabled() advises.
    assert 0.3 <= statistics.median(gaps) <= 0.75, gaps

    t_term = time.monotonic()
    d.signal(signal.SIGTERM)
    d.wait_message("STOPPING=1", timeout=10)
    rc = d.wait_exit(timeout=12)
    assert rc == 0, d.stderr()
    assert time.monotonic() - t_term < 10
    # the graceful stop is logged and the state is durable
    assert "stopped" in d.stderr()
    assert (d.data_dir / "alphapulse.db").exists()


def test_control_port_listens_before_ready_is_sent(tmp_path: Path, procs: list[DaemonProc]) -> None:
    """READY=1 promises the API: stop the daemon the instant READY arrives and the port must already listen
    (the kernel completes the handshake of a listening socket even while its process is stopped)."""
    import os
    import socket

    d = DaemonProc(tmp_path, speed="3000")
    procs.append(d)
    d.start()
    assert d.sock is not None and d.proc is not None
    d.sock.settimeout(30)
    while True:
        msg = d.sock.recv(4096).decode()
        if "READY=1" in msg.splitlines():
            os.kill(d.proc.pid, signal.SIGSTOP)
            break
    try:
        with socket.create_connection(("127.0.0.1", d.port), timeout=2):
            pass
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    assert d.http("GET", "/health")[0] == 200


def test_wedged_engine_task_stops_watchdog_pings(tmp_path: Path, procs: list[DaemonProc]) -> None:
    d = DaemonProc(tmp_path, speed="3000", watchdog_usec=600_000,
                   service={"control": {"fault_injection": True}, "watchdog": {"stall_timeout_s": 1.5}})
    procs.append(d)
    d.start()
    d.wait_ready()
    d.poll_messages(1.0)
    assert any(m == "WATCHDOG=1" for _, m in d.messages)
    status, body, _ = d.http("POST", "/debug/wedge_engine", token=d.token())
    assert status == 200, body
    t_wedge = time.monotonic()
    # while the engine is wedged candles pile up; after the stall timeout the pings stop and /health says 503
    d.wait_metric(lambda m: m["system"]["queue_depth"] > 0, timeout=10)
    end = time.monotonic() + 10
    while time.monotonic() < end:
        status, body, _ = d.http("GET", "/health")
        if status == 503:
            break
        time.sleep(0.1)
    assert status == 503 and "engine" in body["problem"], body
    t_unhealthy = time.monotonic()
    d.poll_messages(3.0)
    late_pings = [t for t, m in d.messages if m == "WATCHDOG=1" and t > t_unhealthy + 0.05]
    assert late_pings == [], "watchdog kept pinging for a wedged pipeline"
    assert t_unhealthy - t_wedge < 8
    assert "watchdog ping withheld" in d.stderr()
    assert d.stop() == 0


def test_blocked_event_loop_stops_watchdog_pings(tmp_path: Path, procs: list[DaemonProc]) -> None:
    d = DaemonProc(tmp_path, speed="3000", watchdog_usec=400_000, service={"control": {"fault_injection": True}})
    procs.append(d)
    d.start()
    d.wait_ready()
    d.poll_messages(1.0)
    import threading

    def block() -> None:
        d.http("POST", "/debug/block_loop?seconds=2.5", token=d.token(), timeout=20)

    th = threading.Thread(target=block)
    th.start()
    d.poll_messages(4.0)
    th.join(20)
    pings = [t for t, m in d.messages if m == "WATCHDOG=1"]
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert max(gaps) >= 2.2, f"pings continued while the loop was blocked: {gaps}"
    # and they resume once the loop is free again
    assert pings[-1] > time.monotonic() - 1.5
    assert d.stop() == 0


def test_replay_end_keeps_serving_then_exit_at_end(tmp_path: Path, procs: list[DaemonProc]) -> None:
    replay = slice_bundled(tmp_path / "short.csv", 400)
    d = DaemonProc(tmp_path / "a", replay_file=replay)
    procs.append(d)
    d.start()
    d.wait_ready()
    # the feed finishes first; the engine drains the queue after it (the race a loaded machine showed)
    m = d.wait_metric(lambda m: m["market"]["feed"].get("finished") and m["market"]["candles_processed"] >= 400,
                      timeout=20)
    assert m["market"]["candles_processed"] == 400
    time.sleep(1.0)
    assert d.proc is not None and d.proc.poll() is None, "daemon must keep serving after the replay"
    status, body, _ = d.http("GET", "/health")
    assert status == 200 and body["status"] == "finished" and body["components"]["feed"]["finished"] is True
    assert "replay finished" in d.stderr()
    assert d.stop() == 0

    e = DaemonProc(tmp_path / "b", replay_file=replay, args=("--exit-at-end",))
    procs.append(e)
    e.start()
    assert e.wait_exit(timeout=30) == 0, e.stderr()
    assert "replay finished" in e.stderr()


def test_emergency_stop_survives_restart_and_resume(tmp_path: Path, procs: list[DaemonProc]) -> None:
    replay = slice_bundled(tmp_path / "r.csv", 3000)
    d = DaemonProc(tmp_path / "run", replay_file=replay, speed="20000")
    procs.append(d)
    d.start()
    d.wait_ready()
    d.wait_metric(lambda m: m["market"]["candles_processed"] > 100)
    status, body, _ = d.http("POST", "/emergency_stop", token=d.token(), body=b'{"reason": "test drill"}',
                             headers={"Content-Type": "application/json"})
    assert status == 200 and body["state"] == "EMERGENCY_STOP", body
    incidents = (d.log_dir / "incidents.log").read_text()
    assert "EMERGENCY_STOP" in incidents and "test drill" in incidents
    orders_before = d.metrics()["trading"]["orders"]
    time.sleep(1.0)
    assert d.metrics()["trading"]["orders"] == orders_before, "orders sent during an emergency stop"
    assert d.stop() == 0

    d.start()
    d.wait_ready()
    m = d.metrics()
    assert m["trading"]["state"] == "EMERGENCY_STOP", "emergency stop must survive a restart"
    status, body, _ = d.http("POST", "/resume_trading", token=d.token())
    assert status == 200 and body["state"] in ("ACTIVE", "REDUCE_ONLY"), body
    assert d.stop() == 0


def test_secrets_never_reach_any_log(tmp_path: Path, procs: list[DaemonProc]) -> None:
    secrets = {"WEEX_API_KEY": "wx-api-key-7f3c9a1b2d", "WEEX_SECRET_KEY": "wx-secret-55aa66bb77cc",
               "WEEX_PASSPHRASE": "correct-horse-battery", "ALPHAPULSE_CONTROL_TOKEN": "ctl-token-0123456789abcdef"}
    replay = slice_bundled(tmp_path / "r.csv", 600)
    d = DaemonProc(tmp_path / "run", replay_file=replay, env=secrets)
    procs.append(d)
    d.start()
    d.wait_ready()
    # use the token, and send a wrong one: neither may be echoed anywhere
    assert d.http("POST", "/maintenance_mode", token=secrets["ALPHAPULSE_CONTROL_TOKEN"])[0] == 200
    assert d.http("POST", "/resume_trading", token="wrong-" + secrets["ALPHAPULSE_CONTROL_TOKEN"])[0] == 401
    d.wait_metric(lambda m: m["market"]["feed"].get("finished"), timeout=20)
    assert d.stop() == 0
    texts = [d.stderr()] + [p.read_text(errors="replace") for p in d.log_dir.iterdir() if p.is_file()]
    assert any("maintenance_mode" in t for t in texts)
    for name, value in secrets.items():
        for t in texts:
            assert value not in t, f"{name} leaked into a log"


def test_invalid_replay_file_is_a_config_error(tmp_path: Path, procs: list[DaemonProc]) -> None:
    d = DaemonProc(tmp_path, replay_file=tmp_path / "missing.csv.gz")
    procs.append(d)
    d.start()
    assert d.wait_exit(timeout=20) == 78
    lines = [ln for ln in d.stderr().splitlines() if ln.strip()]
    assert len(lines) == 1 and "replay_file" in lines[0] and "missing.csv.gz" in lines[0], lines


def test_replay_file_of_another_timeframe_is_a_config_error_before_any_state(tmp_path: Path,
                                                                             procs: list[DaemonProc]) -> None:
    """The bundled 1h file under the 5m configuration: one config error naming both timeframes, at start and in
    check-config, instead of 11 candles in 12 rejected one by one; no database or control token is created."""
    hourly = REPO / "alphapulse" / "data" / "BTC_USDT_USDT-1h.csv.gz"
    d = DaemonProc(tmp_path, replay_file=hourly)
    procs.append(d)
    d.start()
    assert d.wait_exit(timeout=20) == 78
    lines = [ln for ln in d.stderr().splitlines() if ln.startswith("alphapulse: config error")]
    assert len(lines) == 1, d.stderr()
    assert "feed.replay_file" in lines[0] and "1h apart" in lines[0] and "configured timeframe is 5m" in lines[0]
    assert not (d.data_dir / "alphapulse.db").exists() and not (d.data_dir / "control_token").exists()
    check = subprocess.run([sys.executable, "-m", "alphapulse", "check-config"], env=d.env, capture_output=True,
                           text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert check.returncode == 78, check.stdout + check.stderr
    assert check.stderr.count("\n") == 1 and "1h apart" in check.stderr and "timeframe is 5m" in check.stderr


def test_bad_candles_are_rejected_counted_and_never_decided(tmp_path: Path, procs: list[DaemonProc]) -> None:
    src = slice_bundled(tmp_path / "good.csv", 300).read_text().splitlines()
    header, rows = src[0], src[1:]
    bad_ts = []
    for i in (100, 150, 200):  # corrupt three real candles: NaN close, high < low, negative price
        parts = rows[i].split(",")
        bad_ts.append(int(parts[0]))
        if i == 100:
            parts[4] = "nan"
        elif i == 150:
            parts[2], parts[3] = parts[3], str(float(parts[2]) + 10)
        else:
            parts[1] = "-1"
        rows[i] = ",".join(parts)
    rows.insert(250, rows[249])  # duplicate timestamp
    replay = tmp_path / "bad.csv"
    replay.write_text("\n".join([header, *rows]) + "\n")
    d = DaemonProc(tmp_path / "run", replay_file=replay)
    procs.append(d)
    d.start()
    d.wait_ready()
    m = d.wait_metric(lambda m: m["market"]["feed"].get("finished"), timeout=20)
    assert m["market"]["rejected_candles"] == 4, m["market"]
    assert set(m["market"]["rejected_by_reason"]) >= {"non_finite", "duplicate_ts"}
    assert m["market"]["candles_processed"] == 301 - 4  # 300 rows + 1 duplicate, 4 rejected
    status, text, _ = d.http("GET", "/metrics?format=prometheus")
    rejected = {s.labels["reason"]: s.value for f in text_string_to_metric_families(text)
                for s in f.samples if s.name == "alphapulse_rejected_candles_total"}
    assert sum(rejected.values()) == 4 and {r for r, n in rejected.items() if n} == set(
        m["market"]["rejected_by_reason"]), rejected
    assert d.stop() == 0
    decided = {json.loads(ln)["candle_time"] for ln in (d.log_dir / "ai_decisions.json").read_text().splitlines()}
    from alphapulse.store import iso_ms

    assert not decided & {iso_ms(t) for t in bad_ts}, "a rejected candle reached the model"
    assert "candle rejected" in d.stderr()


def test_shipped_defaults_trade_the_bundled_replay(tmp_path: Path, procs: list[DaemonProc]) -> None:
    """What `make run` does: the repository's config, the default model, the bundled replay of its timeframe."""
    d = DaemonProc(tmp_path, shipped_defaults=True, args=("--exit-at-end",))
    procs.append(d)
    d.start()
    assert d.wait_exit(timeout=180) == 0, d.stderr()
    decisions = (d.log_dir / "ai_decisions.json").read_text().splitlines()
    trades = (d.log_dir / "trades.csv").read_text().splitlines()
    from alphapulse.policy import default_model_path, read_model_meta

    meta = read_model_meta(default_model_path())
    # the shipped model decides once a day at 00:00 UTC after its 90-day warm-up: ~150 of the 5,856 bars
    assert len(decisions) > 100, "the bundled replay should be decided day by day after the warm-up"
    assert meta.decision_every_bars == 24 and meta.decision_hour_utc == 0
    assert all(json.loads(line)["candle_time"].endswith("T23:00:00.000Z") for line in decisions)
    assert len(trades) > 5, "the default model should trade the bundled replay"
    first = json.loads(decisions[0])
    assert set(first["probabilities"]) == set(meta.action_meanings)
    assert "replay finished" in d.stderr()
