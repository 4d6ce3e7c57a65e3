"""kill -9 at random moments while the real daemon trades: nothing acknowledged is lost, nothing doubles,
no operator file has a torn line, and the end result equals an uninterrupted run's, trade for trade."""

from __future__ import annotations

import json
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

from tests.daemon_harness import DaemonProc, slice_bundled

N_CANDLES = 12_000
KILLS = 6
#: A tight daily loss limit, so the run also writes risk alerts and incidents that the kills must not lose.
TRADING = {"risk": {"daily_loss_limit_pct": 0.5}}


def _db_rows(data_dir: Path) -> dict[str, Any]:
    con = sqlite3.connect(data_dir / "alphapulse.db")
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        fills = con.execute("SELECT client_order_id, side, qty, price, fee, realized_pnl, ts_ms FROM fills "
                            "ORDER BY fill_id").fetchall()
        orders = con.execute("SELECT client_order_id, side, qty, status FROM orders ORDER BY created_ms").fetchall()
        # whole decision rows, not just their candle: what was decided, allowed, ordered, and the books then
        decisions = con.execute("SELECT candle_ts, probabilities, action, target, allowed, reason, order_id, "
                                "equity, position FROM decisions ORDER BY candle_ts").fetchall()
        alerts = con.execute("SELECT ts_ms, limit_name, value, threshold, action, detail FROM risk_alerts "
                             "ORDER BY alert_id").fetchall()
        incidents = con.execute("SELECT ts_ms, kind, detail FROM incidents ORDER BY incident_id").fetchall()
        state = con.execute("SELECT value FROM meta WHERE key='state'").fetchone()
    finally:
        con.close()
    return {"fills": fills, "orders": orders, "decisions": decisions, "alerts": alerts, "incidents": incidents,
            "state": json.loads(state[0]) if state else None}


def _check_files_whole(log_dir: Path, *, after_kill: bool = False) -> None:
    """Every line of every operator file parses.

    Right after a kill the *last* line may be torn (Linux can stop even a small write() that straddles a
    page-cache page on SIGKILL); the next start cuts it, so after a start every file ends with a newline.
    """
    def whole_lines(name: str) -> list[str]:
        raw = (log_dir / name).read_bytes()
        if raw and not after_kill:
            assert raw.endswith(b"\n"), f"torn last line in {name} after a start"
        return raw.decode(errors="replace").split("\n")[:-1]

    if (log_dir / "trades.csv").exists():
        lines = whole_lines("trades.csv")
        assert not lines or lines[0].startswith("timestamp,symbol,side,qty,price,fee,pnl")
        for ln in lines[1:]:
            assert len(ln.split(",")) == 11, f"torn trades.csv line: {ln!r}"
    for name in ("ai_decisions.json", "risk_alerts.json"):
        if (log_dir / name).exists():
            for ln in whole_lines(name):
                json.loads(ln)


def _lines(path: Path) -> list[str]:
    """A file's records without wall-clock fields (the alert and incident records carry market time only)."""
    return path.read_text().splitlines() if path.exists() else []


def _simulate_crash_between_commit_and_append(log_dir: Path) -> None:
    """The narrow window a random kill rarely hits: rows committed, lines not yet (or half) appended."""
    for name, keep in (("trades.csv", 3), ("ai_decisions.json", 5)):
        p = log_dir / name
        lines = p.read_bytes().splitlines(keepends=True)
        cut = lines[:-keep] if len(lines) > keep + 1 else lines[:1]
        p.write_bytes(b"".join(cut) + lines[-1][: len(lines[-1]) // 2])  # and a torn tail


def test_kill9_at_random_moments_loses_nothing_and_doubles_nothing(tmp_path: Path) -> None:
    replay = slice_bundled(tmp_path / "replay.csv", N_CANDLES)

    ref = DaemonProc(tmp_path / "ref", replay_file=replay, args=("--exit-at-end",), trading=TRADING)
    try:
        ref.start()
        assert ref.wait_exit(timeout=120) == 0, ref.stderr()
    finally:
        ref.close()
    want = _db_rows(ref.data_dir)
    assert len(want["fills"]) >= 10, "the reference run should trade"
    assert len(want["alerts"]) >= 5 and len(want["incidents"]) >= 5, "and breach its daily loss limit"
    assert len(want["decisions"]) == N_CANDLES - 48

    rng = random.Random(20261125)
    crash = DaemonProc(tmp_path / "crash", replay_file=replay, trading=TRADING)
    kills_mid_run = 0
    try:
        for i in range(KILLS):
            crash.start()
            if i == 2:  # during start-up: the file repair and the warm-up, before READY
                time.sleep(rng.uniform(0.05, 0.3))
            else:
                crash.wait_ready(timeout=30)
                time.sleep(rng.uniform(0.02, 0.5))
            before = crash.proc.poll() if crash.proc else None
            crash.kill9()
            if before is None:
                kills_mid_run += 1
            got = _db_rows(crash.data_dir)
            _check_files_whole(crash.log_dir, after_kill=True)
            # what was committed is a prefix of the uninterrupted run: same orders, same fills, same prices
            n = len(got["fills"])
            assert got["fills"] == want["fills"][:n], f"kill {i}: fills diverged from the reference run"
            assert got["decisions"] == want["decisions"][:len(got["decisions"])], f"kill {i}: decisions diverged"
            assert got["alerts"] == want["alerts"][:len(got["alerts"])], f"kill {i}: alerts diverged"
            assert got["incidents"] == want["incidents"][:len(got["incidents"])], f"kill {i}: incidents diverged"
            # every order belongs to exactly one committed decision (or is a halt/flatten close): none repeated
            ordered = [d[6] for d in got["decisions"] if d[6]]
            assert len(ordered) == len(set(ordered))
            assert {o[0] for o in got["orders"]} - set(ordered) <= {o[0] for o in want["orders"]
                                                                     if not o[0].endswith("-p")}
            print(f"kill {i}: {len(got['decisions'])} decisions, {n} fills committed")
            if i == 1:
                _simulate_crash_between_commit_and_append(crash.log_dir)
            if len(got["decisions"]) == len(want["decisions"]):
                break
        crash.args = ("--exit-at-end",)
        crash.start()
        assert crash.wait_exit(timeout=120) == 0, crash.stderr()
    finally:
        crash.close()
    assert kills_mid_run >= 3, "the kills should land while the daemon trades"

    got = _db_rows(crash.data_dir)
    assert got["fills"] == want["fills"]
    assert got["orders"] == want["orders"]
    assert got["decisions"] == want["decisions"], "a candle was skipped, decided twice or decided differently"
    assert got["alerts"] == want["alerts"] and got["incidents"] == want["incidents"]
    assert got["state"]["portfolio"] == want["state"]["portfolio"], "equity/positions differ after restarts"
    assert got["state"]["trading_state"] == want["state"]["trading_state"]

    # the operator files were repaired and completed from the database: identical trades, one decision per candle
    _check_files_whole(crash.log_dir)
    assert (crash.log_dir / "trades.csv").read_text() == (ref.log_dir / "trades.csv").read_text()
    times = [json.loads(ln)["candle_time"] for ln in (crash.log_dir / "ai_decisions.json").read_text().splitlines()]
    ref_times = [json.loads(ln)["candle_time"] for ln in (ref.log_dir / "ai_decisions.json").read_text().splitlines()]
    assert times == ref_times
    for name in ("risk_alerts.json", "incidents.log"):  # the alert and incident files were completed too
        assert _lines(crash.log_dir / name) == _lines(ref.log_dir / name), name
    for log_file in crash.log_dir.glob("alphapulse_*.log"):
        for ln in log_file.read_text().splitlines():
            json.loads(ln)  # no torn JSON line in the daily log either
