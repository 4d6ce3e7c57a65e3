"""Runs the real daemon as a child process and plays systemd: a NOTIFY_SOCKET, WATCHDOG_USEC, signals.

Used by the process tests; everything talks to 127.0.0.1 only and every wait is bounded.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from alphapulse.policy import baseline_model_path

REPO = Path(__file__).resolve().parent.parent
BUNDLED = REPO / "alphapulse" / "data" / "BTC_USDT_USDT-5m.csv.gz"
BASELINE_MODEL = baseline_model_path()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env() -> dict[str, str]:
    """The test runner's environment minus anything that would configure the daemon behind our back."""
    drop = ("ALPHAPULSE_", "TRADING_MODE", "WEEX_", "NOTIFY_SOCKET", "WATCHDOG_", "JOURNAL_STREAM", "INVOCATION_ID")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def slice_bundled(dest: Path, n: int, start: int = 0) -> Path:
    """Write rows [start, start+n) of the bundled real candles as a plain CSV replay file."""
    with gzip.open(BUNDLED, "rt") as f:
        header = f.readline()
        rows = f.read().splitlines()[start:start + n]
    dest.write_text(header + "\n".join(rows) + "\n")
    return dest


class DaemonProc:
    command = "run"  # the alphapulse sub-command this harness starts (MonitorProc: "monitor")

    def __init__(self, root: Path, *, replay_file: Path | None = None, speed: str = "max",
                 service: dict[str, Any] | None = None, env: dict[str, str] | None = None,
                 watchdog_usec: int | None = None, args: tuple[str, ...] = (),
                 trading: dict[str, Any] | None = None, shipped_defaults: bool = False) -> None:
        """A daemon on the 5m baseline model and 5m candles unless told otherwise: the process tests are
        about plumbing, and the 70k bundled 5m candles give them plenty of real data to slice."""
        self.root = root
        self.data_dir = root / "data"
        self.log_dir = root / "log"
        self.config_dir = root / "config"
        self.port = free_port()
        self.config_dir.mkdir(parents=True, exist_ok=True)
        params = yaml.safe_load((REPO / "config" / "trading_params.yaml").read_text())
        if not shipped_defaults:
            params.update({"timeframe": "5m"})
        params.update(trading or {})
        (self.config_dir / "trading_params.yaml").write_text(yaml.safe_dump(params))
        base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
        if not shipped_defaults:
            base.setdefault("model", {})["path"] = str(BASELINE_MODEL)
        for section, values in (service or {}).items():
            if isinstance(values, dict):
                base.setdefault(section, {}).update(values)
            else:
                base[section] = values
        (self.config_dir / "config.yaml").write_text(yaml.safe_dump(base))
        self.env = clean_env()
        self.env.update({
            "ALPHAPULSE_CONFIG_DIR": str(self.config_dir),
            "ALPHAPULSE_DATA_DIR": str(self.data_dir),
            "ALPHAPULSE_LOG_DIR": str(self.log_dir),
            "ALPHAPULSE_CONTROL_PORT": str(self.port),
            "ALPHAPULSE_REPLAY_SPEED": speed,
            "PYTHONUNBUFFERED": "1",
        })
        if replay_file is not None:
            self.env["ALPHAPULSE_REPLAY_FILE"] = str(replay_file)
        if watchdog_usec is not None:
            self.env["WATCHDOG_USEC"] = str(watchdog_usec)
        self.env.update(env or {})
        self.args = args
        self.sock_path = root / "notify.sock"
        self.sock: socket.socket | None = None
        self.messages: list[tuple[float, str]] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    # ---- process --------------------------------------------------------------------------
    def start(self) -> DaemonProc:
        if self.sock is None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            if self.sock_path.exists():
                self.sock_path.unlink()
            self.sock.bind(str(self.sock_path))
            self.sock.settimeout(0.05)
        self.env["NOTIFY_SOCKET"] = str(self.sock_path)
        self.messages = []
        self.stderr_path = self.root / f"stderr-{int(time.time() * 1000)}.txt"
        self._stderr = open(self.stderr_path, "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "alphapulse", self.command, *self.args], env=self.env,
                                     cwd=self.root, stdin=subprocess.DEVNULL, stdout=self._stderr,
                                     stderr=self._stderr)
        return self

    def poll_messages(self, duration: float = 0.0) -> None:
        assert self.sock is not None
        end = time.monotonic() + duration
        while True:
            try:
                data = self.sock.recv(4096)
                for line in data.decode().splitlines():
                    self.messages.append((time.monotonic(), line))
                continue
            except (TimeoutError, BlockingIOError):
                pass
            if time.monotonic() >= end:
                return

    def wait_message(self, prefix: str, timeout: float = 30.0) -> tuple[float, str]:
        end = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < end:
            self.poll_messages(0.05)
            for t, m in self.messages[seen:]:
                if m.startswith(prefix):
                    return t, m
            seen = len(self.messages)
            if self.proc is not None and self.proc.poll() is not None:
                self.poll_messages(0.1)
                for t, m in self.messages:
                    if m.startswith(prefix):
                        return t, m
                raise AssertionError(f"daemon exited with {self.proc.returncode} before {prefix!r}:\n{self.stderr()}")
        raise AssertionError(f"no {prefix!r} within {timeout}s; got {[m for _, m in self.messages][-10:]}\n"
                             f"{self.stderr()[-3000:]}")

    def wait_ready(self, timeout: float = 30.0) -> None:
        self.wait_message("READY=1", timeout)

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except (OSError, AttributeError):
            return ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout)
        finally:
            self._stderr.close()
        return rc

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self._stderr.close()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    # ---- HTTP -----------------------------------------------------------------------------
    def token(self) -> str:
        return (self.data_dir / "control_token").read_text().strip()

    def http(self, method: str, path: str, *, token: str | None = None, body: bytes | None = None,
             headers: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[int, Any, dict[str, str]]:
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method, headers=h,
                                     data=body if body is not None else (b"" if method == "POST" else None))
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw, status, hdrs = resp.read(), resp.status, dict(resp.headers)
        except urllib.error.HTTPError as e:
            raw, status, hdrs = e.read(), e.code, dict(e.headers)
        ctype = hdrs.get("Content-Type", "")
        return status, (json.loads(raw) if "json" in ctype else raw.decode()), hdrs

    def metrics(self) -> dict[str, Any]:
        status, body, _ = self.http("GET", "/metrics")
        assert status == 200, body
        return body  # type: ignore[no-any-return]

    def wait_metric(self, pred: Any, timeout: float = 30.0) -> dict[str, Any]:
        end = time.monotonic() + timeout
        m: dict[str, Any] = {}
        while time.monotonic() < end:
            m = self.metrics()
            if pred(m):
                return m
            time.sleep(0.05)
        raise AssertionError(f"condition not met within {timeout}s; last metrics: {json.dumps(m)[:2000]}")


class MonitorProc(DaemonProc):
    """``alphapulse monitor`` next to a :class:`DaemonProc` (started or not): the same configuration directory,
    data and log directories and environment, its own port, notify socket and ``monitoring.yaml``."""

    command = "monitor"

    def __init__(self, daemon: DaemonProc, monitoring: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None, watchdog_usec: int | None = None) -> None:
        self.daemon = daemon
        self.root = daemon.root / "monitor"
        self.root.mkdir(parents=True, exist_ok=True)
        self.data_dir, self.log_dir, self.config_dir = daemon.data_dir, daemon.log_dir, daemon.config_dir
        self.port = free_port()
        doc = yaml.safe_load((REPO / "config" / "monitoring.yaml").read_text())
        doc.update({"scrape_interval_s": 0.5, "scrape_timeout_s": 0.4})
        doc.update(monitoring or {})
        (self.config_dir / "monitoring.yaml").write_text(yaml.safe_dump(doc))
        self.env = {k: v for k, v in daemon.env.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        self.env["ALPHAPULSE_MONITOR_PORT"] = str(self.port)
        if watchdog_usec is not None:
            self.env["WATCHDOG_USEC"] = str(watchdog_usec)
        self.env.update(env or {})
        self.args = ()
        self.sock_path = self.root / "notify.sock"
        self.sock = None
        self.messages = []
        self.proc = None
        self.started = 0.0

    def alerts(self) -> dict[str, Any]:
        status, body, _ = self.http("GET", "/api/alerts")
        assert status == 200, body
        return body  # type: ignore[no-any-return]

    def active(self) -> dict[str, dict[str, Any]]:
        """Unresolved alerts by rule."""
        return {a["rule"]: a for a in self.alerts()["active_alerts"]}

    def wait_alerts(self, pred: Any, timeout: float = 30.0) -> dict[str, Any]:
        end = time.monotonic() + timeout
        body: dict[str, Any] = {}
        while time.monotonic() < end:
            body = self.alerts()
            if pred(body):
                return body
            time.sleep(0.05)
        raise AssertionError(f"alert condition not met within {timeout}s; last: {json.dumps(body)[:3000]}")

    def log_records(self) -> list[dict[str, Any]]:
        """The monitor's own JSON log lines (monitor_YYYYMMDD.log in the shared log directory)."""
        out = []
        for path in sorted(self.log_dir.glob("monitor_*.log")):
            out += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return out
