"""The control API over real HTTP on 127.0.0.1: health, metrics (JSON and Prometheus), auth, bad requests."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_harness import DaemonProc, slice_bundled


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    root: Path = tmp_path_factory.mktemp("control")
    replay = slice_bundled(root / "replay.csv", 20_000)
    d = DaemonProc(root / "run", replay_file=replay, speed="30000")
    d.start()
    d.wait_ready()
    d.wait_metric(lambda m: m["model"]["decisions"] > 50)
    yield d
    assert d.stop() == 0
    d.close()


def test_health_reports_component_progress(daemon: DaemonProc) -> None:
    status, body, hdrs = daemon.http("GET", "/health")
    assert status == 200 and hdrs["Content-Type"].startswith("application/json")
    assert body["status"] == "ok" and body["problem"] is None
    for comp in ("feed", "engine", "housekeeping"):
        assert body["components"][comp]["last_progress_age_s"] < 10


def test_metrics_json_has_the_documented_shape(daemon: DaemonProc) -> None:
    m = daemon.metrics()
    p = m["portfolio"]
    for key in ("equity", "cash", "daily_pnl", "drawdown"):
        assert isinstance(p[key], float), key
    assert isinstance(p["positions"], list)
    assert m["trading"]["mode"] == "paper" and m["trading"]["state"] in ("ACTIVE", "REDUCE_ONLY", "HALTED")
    assert m["model"]["version"].startswith("baseline")
    assert 0 < m["model"]["avg_confidence"] <= 1
    assert 0 < m["model"]["inference_us"]["p50"] <= m["model"]["inference_us"]["p99"]
    assert m["risk"]["limits"]["max_drawdown_pct"] == 12.0 and m["risk"]["limits"]["daily_loss_limit_pct"] == 3.0
    assert set(m["risk"]["usage"]) == {"position", "leverage", "daily_loss", "drawdown"}
    assert m["market"]["last_candle"]["time"].endswith("Z") and m["market"]["rejected_candles"] == 0
    assert m["system"]["rss_mb"] > 10 and m["system"]["tick_to_order_us"]["count"] > 0
    # equity is cash plus the unrealized PnL of the positions (to float precision of the JSON view)
    upnl = sum(pos["unrealized_pnl"] for pos in p["positions"])
    assert abs(p["equity"] - (p["cash"] + upnl)) < 1e-6


_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="[^"]*"'
PROM_LINE = re.compile(rf"^[a-zA-Z_:][a-zA-Z0-9_:]*(\{{{_LABEL}(,{_LABEL})*\}})? (-?[0-9.e+-]+|NaN|[+-]Inf)$")


@pytest.mark.parametrize("how", ["accept", "query"])
def test_metrics_prometheus_exposition(daemon: DaemonProc, how: str) -> None:
    if how == "accept":
        status, text, hdrs = daemon.http("GET", "/metrics", headers={"Accept": "text/plain"})
    else:
        status, text, hdrs = daemon.http("GET", "/metrics?format=prometheus")
    assert status == 200 and hdrs["Content-Type"].startswith("text/plain; version=0.0.4")
    names = set()
    for line in text.splitlines():
        if line.startswith("# "):
            assert line.startswith(("# HELP ", "# TYPE "))
            continue
        assert PROM_LINE.match(line), line
        names.add(line.split("{")[0].split(" ")[0])
    assert {"alphapulse_equity", "alphapulse_drawdown_ratio", "alphapulse_trading_state",
            "alphapulse_rejected_candles_total", "alphapulse_tick_to_order_seconds_bucket"} <= names
    assert 'alphapulse_trading_state{state="' in text


def test_bad_requests_get_4xx_json(daemon: DaemonProc) -> None:
    cases = [
        ("GET", "/metrics?format=xml", None, None, 400),
        ("GET", "/nope", None, None, 404),
        ("GET", "/emergency_stop", None, None, 405),
        ("DELETE", "/health", None, None, 405),
        ("POST", "/maintenance_mode", "TOKEN", b"{not json", 400),
        ("POST", "/maintenance_mode", "TOKEN", b"[1,2]", 400),
        ("POST", "/emergency_stop", "TOKEN", b'{"reason": 5}', 400),
        ("POST", "/maintenance_mode", "TOKEN", b"x" * 70_000, 413),
    ]
    token = daemon.token()
    for method, path, tok, body, want in cases:
        status, resp, hdrs = daemon.http(method, path, token=token if tok else None, body=body)
        assert status == want, (method, path, status, resp)
        assert hdrs["Content-Type"].startswith("application/json"), (path, hdrs)
        assert resp["status"] == want and resp["error"]
        assert "Traceback" not in str(resp)
    assert daemon.metrics()["trading"]["state"] == "ACTIVE", "rejected requests must change nothing"


@pytest.mark.parametrize("path", ["/emergency_stop", "/flatten_positions", "/maintenance_mode", "/resume_trading"])
def test_posts_need_the_bearer_token(daemon: DaemonProc, path: str) -> None:
    for headers in ({}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer wrong"},
                    {"Authorization": "Bearer"}):
        status, body, _ = daemon.http("POST", path, headers=headers)
        assert status == 401, headers
        assert "Authorization: Bearer" in body["how"]
    m = daemon.metrics()
    assert m["trading"]["state"] == "ACTIVE"
    # this runs before the flatten test (file order): no flatten order may exist yet
    assert not any(o.endswith("-flatten") for o in _order_ids(daemon)), "no flatten without a token"


def _order_ids(daemon: DaemonProc) -> list[str]:
    lines = (daemon.log_dir / "trades.csv").read_text().splitlines()[1:]
    return [line.split(",")[8] for line in lines]


def test_garbage_on_the_socket_gets_a_400_and_the_daemon_lives(daemon: DaemonProc) -> None:
    """Bytes that are not HTTP never reach a route (aiohttp's parser answers them, as text/plain): the whole
    answer is read, and it must be one short 400 that names no code and closes the connection."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as s:
        s.sendall(b"\x16\x03\x01 NOT HTTP AT ALL\r\n\r\n")
        reply = b""
        while chunk := s.recv(4096):  # the server closes the connection after the error: EOF ends the loop
            reply += chunk
            assert len(reply) < 65_536
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0].startswith(b"HTTP/1.") and b" 400 " in lines[0], reply
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in lines[1:])}
    assert int(headers[b"content-length"]) == len(body) and 0 < len(body) < 2_000
    assert b"Traceback" not in body and b".py" not in body and b"alphapulse" not in body
    assert daemon.http("GET", "/health")[0] == 200


def test_maintenance_blocks_orders_and_resume_restores(daemon: DaemonProc) -> None:
    token = daemon.token()
    status, body, _ = daemon.http("POST", "/maintenance_mode", token=token)
    assert status == 200 and body["state"] == "MAINTENANCE"
    m0 = daemon.metrics()
    orders0, candles0 = m0["trading"]["orders"], m0["market"]["candles_processed"]
    daemon.wait_metric(lambda m: m["market"]["candles_processed"] > candles0 + 300)
    m1 = daemon.metrics()
    assert m1["trading"]["orders"] == orders0, "no new orders in maintenance; data keeps flowing"
    status, body, _ = daemon.http("POST", "/resume_trading", token=token)
    assert status == 200 and body["state"] == "ACTIVE"


def test_flatten_closes_the_position_with_a_reduce_only_order(daemon: DaemonProc) -> None:
    token = daemon.token()
    for _attempt in range(10):
        daemon.wait_metric(lambda m: bool(m["portfolio"]["positions"]), timeout=60)
        status, body, _ = daemon.http("POST", "/maintenance_mode", token=token)  # freeze the policy meanwhile
        assert status == 200
        daemon.wait_metric(lambda m: m["trading"]["open_orders"] == 0, timeout=10)  # a pending order fills first
        if daemon.metrics()["portfolio"]["positions"]:
            break
        assert daemon.http("POST", "/resume_trading", token=token)[0] == 200  # it closed itself: try again
    else:
        pytest.fail("no position to flatten in 10 attempts")
    status, body, _ = daemon.http("POST", "/flatten_positions", token=token)
    assert status == 200 and len(body["orders"]) == 1 and body["orders"][0].endswith("-flatten"), body
    daemon.wait_metric(lambda m: m["portfolio"]["positions"] == [], timeout=10)
    trades = (daemon.log_dir / "trades.csv").read_text().splitlines()
    assert trades[-1].split(",")[8] == body["orders"][0] and trades[-1].endswith(",flatten")
    assert "FLATTEN" in (daemon.log_dir / "incidents.log").read_text()
    assert daemon.http("POST", "/resume_trading", token=token)[0] == 200


def test_debug_endpoints_absent_unless_fault_injection(daemon: DaemonProc) -> None:
    status, body, _ = daemon.http("POST", "/debug/block_loop?seconds=1", token=daemon.token())
    assert status == 404
    t0 = time.monotonic()
    assert daemon.http("GET", "/health")[0] == 200
    assert time.monotonic() - t0 < 1.0


def test_generated_token_is_private_and_only_its_path_is_logged(daemon: DaemonProc) -> None:
    path = daemon.data_dir / "control_token"
    assert path.stat().st_mode & 0o777 == 0o600
    token = daemon.token()
    assert len(token) >= 32
    logs = daemon.stderr() + "".join(p.read_text() for p in daemon.log_dir.glob("alphapulse_*.log"))
    assert str(path) in logs and token not in logs


def test_ctl_command_talks_to_the_daemon(daemon: DaemonProc) -> None:
    import json
    import subprocess
    import sys

    env = daemon.env.copy()
    env.pop("NOTIFY_SOCKET", None)

    def ctl(action: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "alphapulse", "ctl", action], env=env, capture_output=True,
                              text=True, timeout=60)

    r = ctl("health")
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "ok", r.stderr
    r = ctl("maintenance_mode")  # reads the token file from the data directory by itself
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "MAINTENANCE", r.stderr
    r = ctl("resume_trading")
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "ACTIVE", r.stderr
    bad = env | {"ALPHAPULSE_CONTROL_TOKEN": "not-the-token"}
    r = subprocess.run([sys.executable, "-m", "alphapulse", "ctl", "emergency_stop"], env=bad, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "wrong bearer token" in r.stderr, (r.stdout, r.stderr)
    assert daemon.metrics()["trading"]["state"] == "ACTIVE"
