"""The real daemon in live mode against our fake WEEX, both as child processes on 127.0.0.1.

The fake runs as ``python -m alphapulse fake-weex`` (what an operator would run) and is driven through its
admin endpoints (faults, planted positions, state); the daemon is :class:`tests.daemon_harness.DaemonProc` with
the WEEX variables pointing at it.  :func:`book_check` compares the two sides' books after a run: the figures the
fault tests assert on (duplicate orders, lost fills, unreconciled positions) come from here.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from tests.daemon_harness import BUNDLED, DaemonProc, clean_env, free_port

KEY, SECRET, PASSPHRASE = "test-key-4c1d", "test-secret-9e2a", "test-pass-77b0"
D = Decimal


class FakeProc:
    """``alphapulse fake-weex`` as a child process."""

    def __init__(self, root: Path, *, speed: float = 3000.0, data: Path = BUNDLED, timeframe: str = "5m",
                 faults: str = "", seed: int = 7, extra: tuple[str, ...] = ()) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = ["--port", str(self.port), "--data", str(data), "--timeframe", timeframe, "--speed", str(speed),
                "--api-key", KEY, "--secret-key", SECRET, "--passphrase", PASSPHRASE, "--seed", str(seed),
                "--ping-interval", "1", *extra]
        if faults:
            args += ["--faults", faults]
        self.log_path = root / "fake.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "alphapulse", "fake-weex", *args], env=clean_env(),
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)
        end = time.monotonic() + 30
        while time.monotonic() < end:
            try:
                self.admin("GET", "/capi/v3/market/time")
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise AssertionError(f"fake-weex exited: {self.log_path.read_text()}") from None
                time.sleep(0.05)
        raise AssertionError("fake-weex did not answer within 30 s")

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, method=method, data=data,
                                     headers={"Content-Type": "application/json"} if data else {})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read() or b"null")

    def state(self) -> dict[str, Any]:
        return self.admin("GET", "/fake/state")  # type: ignore[no-any-return]

    def faults(self, spec: str, *, clear: bool = True) -> Any:
        return self.admin("POST", "/fake/faults", {"spec": spec, "clear": clear})

    def clear_faults(self) -> Any:
        return self.admin("DELETE", "/fake/faults")

    def plant(self, body: dict[str, Any]) -> Any:
        return self.admin("POST", "/fake/plant", body)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def live_daemon(root: Path, fake: FakeProc, *, env: dict[str, str] | None = None,
                trading: dict[str, Any] | None = None, service: dict[str, Any] | None = None) -> DaemonProc:
    """A live daemon on the 5m baseline model (it trades often: plenty of orders to check) against ``fake``."""
    base_env = {"TRADING_MODE": "live", "WEEX_API_KEY": KEY, "WEEX_SECRET_KEY": SECRET, "WEEX_PASSPHRASE": PASSPHRASE,
                "WEEX_REST_URL": fake.url, "WEEX_WS_URL": f"ws://127.0.0.1:{fake.port}/v3/ws"}
    svc = {"exchange": {"reconcile_interval_s": 2, "timeout_s": 3}}
    for k, v in (service or {}).items():
        svc.setdefault(k, {}).update(v)
    return DaemonProc(root, env={**base_env, **(env or {})}, service=svc,
                      trading={"confidence_threshold": 0.3, **(trading or {})})


@dataclass
class Books:
    """The figures of one run: what both sides' books say, and how they differ."""

    exchange_orders: int
    exchange_fills: int
    our_fills: int
    duplicate_orders: int  # decisions with more exchange orders than legs, or a client id reused
    lost_fills: int  # exchange executions missing from our books
    phantom_fills: int  # fills in our books the exchange never made
    position_diff: Decimal  # exchange net position - ours
    balance_diff: Decimal  # exchange wallet balance - our cash
    ours_qty: Decimal
    exchange_qty: Decimal


def _net_position(state: dict[str, Any]) -> Decimal:
    net = D(0)
    for p in state["positions"]:
        size = D(str(p["size"]))
        net += size if p["side"] == "LONG" else -size
    return net


def book_check(daemon: DaemonProc, fake: FakeProc) -> Books:
    """Compare the stopped daemon's store with the fake's state (call after the daemon stopped)."""
    st = fake.state()
    db = sqlite3.connect(daemon.data_dir / "alphapulse.db")
    try:
        ours = {r[0]: r for r in db.execute("SELECT trade_id, client_order_id, qty, price, fee FROM fills "
                                             "WHERE trade_id IS NOT NULL AND side IN ('buy', 'sell')")}
        row = db.execute("SELECT value FROM meta WHERE key='state'").fetchone()
        dec = db.execute("SELECT state FROM decisions ORDER BY seq DESC LIMIT 1").fetchone()
    finally:
        db.close()
    states = [json.loads(x[0]) for x in (row, dec) if x is not None]
    snap = max(states, key=lambda s: s.get("seq", 0))["portfolio"]
    theirs = {str(f["id"]): f for f in st["fills"] if f.get("origin", "client") != "foreign"}
    client_orders = [o for o in st["orders"] if o.get("origin", "client") == "client"]
    per_decision = Counter(o["clientOrderId"].removesuffix("-c").removesuffix("-o") for o in client_orders)
    duplicates = sum(1 for n in per_decision.values() if n > 2)
    ids = Counter(o["clientOrderId"] for o in client_orders)
    duplicates += sum(n - 1 for n in ids.values() if n > 1)
    lost = sum(1 for t in theirs if t not in ours)
    phantom = sum(1 for t in ours if t not in theirs)
    ex_qty = _net_position(st)
    return Books(len(client_orders), len(theirs), len(ours), duplicates, lost, phantom, ex_qty - D(snap["qty"]),
                 D(st["balance"]["balance"]) - D(snap["cash"]), D(snap["qty"]), ex_qty)


def settle_and_stop(d: DaemonProc) -> dict[str, Any]:
    """End a live run with books that can be compared: flatten and pause, let reconciliation book the funding
    the exchange charged meanwhile, then stop.  (The fake's clock runs on after the daemon stops: a position
    still open would keep paying funding the stopped daemon can never book.)  Returns the last metrics."""
    token = d.token()
    assert d.http("POST", "/maintenance_mode", token=token)[0] == 200
    assert d.http("POST", "/flatten_positions", token=token)[0] == 200
    m = d.wait_metric(lambda m: not m["portfolio"]["positions"] and m["trading"]["open_orders"] == 0, timeout=60)
    runs = m["exchange"]["reconciliation"]["runs"]
    m = d.wait_metric(lambda m: m["exchange"]["reconciliation"]["runs"] >= runs + 2, timeout=60)
    assert d.stop() == 0
    return m
