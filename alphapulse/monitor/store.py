"""The monitor's SQLite (``<data_dir>/monitor.db``, WAL): scraped samples and the alert history.

Every method is synchronous and meant to run in a worker thread (``asyncio.to_thread``); one connection
shared under a lock, so the event loop never waits on a disk write.  Each scrape's sample and the alert
transitions it caused are one transaction: with WAL and ``synchronous=NORMAL`` a committed transaction survives
``kill -9``, so a restarted monitor finds every alert it had raised, with its state.

Retention deletes samples and *resolved* alerts older than ``retention_days``; an unresolved alert is kept
whatever its age.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from alphapulse.monitor.rules import SEVERITIES, OpenAlert, Transition
from alphapulse.store import iso_ms

SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, rule TEXT NOT NULL, severity TEXT NOT NULL, state TEXT NOT NULL,
    message TEXT NOT NULL, value REAL, threshold REAL, opened_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL,
    acknowledged_ms INTEGER, resolved_ms INTEGER, count INTEGER NOT NULL DEFAULT 1);
CREATE INDEX IF NOT EXISTS alerts_by_state ON alerts(state);
CREATE INDEX IF NOT EXISTS alerts_by_updated ON alerts(updated_ms);
CREATE TABLE IF NOT EXISTS samples (
    ts_ms INTEGER PRIMARY KEY, daemon_up INTEGER NOT NULL, series TEXT NOT NULL);
"""
ACTIVE = ("open", "acknowledged")


class AlertNotFound(LookupError):
    pass


class AlertResolved(ValueError):
    pass


def _iso(ms: int | None) -> str | None:
    return None if ms is None else iso_ms(int(ms))


def _row_to_alert(r: sqlite3.Row) -> dict[str, Any]:
    """The alert JSON contract of /api/alerts."""
    return {"id": r["id"], "rule": r["rule"], "severity": r["severity"], "state": r["state"], "message": r["message"],
            "value": r["value"], "threshold": r["threshold"], "opened_at": _iso(r["opened_ms"]),
            "updated_at": _iso(r["updated_ms"]), "acknowledged_at": _iso(r["acknowledged_ms"]),
            "resolved_at": _iso(r["resolved_ms"]), "count": r["count"]}


class MonitorStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- alerts ------------------------------------------------------------------------------------------------
    def open_alerts(self) -> list[OpenAlert]:
        with self._lock:
            rows = self._db.execute("SELECT id, rule, severity, state FROM alerts WHERE state IN (?, ?) ORDER BY id",
                                    ACTIVE).fetchall()
        # one per rule: should a crash ever have left two, the newest wins and the older ones are still listed
        return [OpenAlert(r["id"], r["rule"], r["severity"], r["state"]) for r in rows]

    def record(self, now_ms: int, series: dict[str, Any], daemon_up: bool,
               transitions: Sequence[Transition]) -> list[tuple[str, dict[str, Any]]]:
        """Store one sample and its transitions in one transaction; returns (kind, alert row) per transition."""
        out: list[tuple[str, dict[str, Any]]] = []
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("INSERT OR REPLACE INTO samples VALUES (?,?,?)",
                           (now_ms, 1 if daemon_up else 0, orjson.dumps(series).decode()))
                for t in transitions:
                    alert_id = self._apply(db, now_ms, t)
                    row = db.execute("SELECT * FROM alerts WHERE id = ?", (alert_id,)).fetchone()
                    out.append((t.kind, _row_to_alert(row)))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return out

    @staticmethod
    def _apply(db: sqlite3.Connection, now_ms: int, t: Transition) -> int:
        if t.kind == "opened":
            cur = db.execute("INSERT INTO alerts (rule, severity, state, message, value, threshold, opened_ms, "
                             "updated_ms, count) VALUES (?,?,?,?,?,?,?,?,1)",
                             (t.rule, t.severity, "open", t.message, t.value, t.threshold, now_ms, now_ms))
            return int(cur.lastrowid or 0)
        assert t.alert_id is not None
        if t.kind == "escalated":  # worse than what was acknowledged: it needs a human again
            db.execute("UPDATE alerts SET severity=?, state='open', message=?, value=?, threshold=?, updated_ms=?, "
                       "count=count+1 WHERE id=?", (t.severity, t.message, t.value, t.threshold, now_ms, t.alert_id))
        elif t.kind == "redetected":
            db.execute("UPDATE alerts SET message=?, value=?, updated_ms=?, count=count+1 WHERE id=?",
                       (t.message, t.value, now_ms, t.alert_id))
        elif t.kind == "resolved":
            db.execute("UPDATE alerts SET state='resolved', resolved_ms=?, updated_ms=? WHERE id=?",
                       (now_ms, now_ms, t.alert_id))
        else:
            raise ValueError(f"unknown transition {t.kind!r}")
        return t.alert_id

    def acknowledge(self, alert_id: int, now_ms: int) -> tuple[bool, dict[str, Any]]:
        """Mark an open alert acknowledged; (changed, row). Idempotent for an acknowledged one."""
        with self._lock:
            row = self._db.execute("SELECT * FROM alerts WHERE id = ?", (alert_id,)).fetchone()
            if row is None:
                raise AlertNotFound(alert_id)
            if row["state"] == "resolved":
                raise AlertResolved(alert_id)
            if row["state"] == "acknowledged":
                return False, _row_to_alert(row)
            self._db.execute("UPDATE alerts SET state='acknowledged', acknowledged_ms=?, updated_ms=? WHERE id=?",
                             (now_ms, now_ms, alert_id))
            row = self._db.execute("SELECT * FROM alerts WHERE id = ?", (alert_id,)).fetchone()
            return True, _row_to_alert(row)

    def alerts_body(self, recent: int = 50, now_ms: int | None = None) -> dict[str, Any]:
        """The body of GET /api/alerts: active alerts, the most recently changed ones, statistics."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        with self._lock:
            db = self._db
            active = db.execute("SELECT * FROM alerts WHERE state IN (?, ?) ORDER BY severity, opened_ms",
                                ACTIVE).fetchall()
            latest = db.execute("SELECT * FROM alerts ORDER BY updated_ms DESC, id DESC LIMIT ?",
                                (recent,)).fetchall()
            by_state = dict(db.execute("SELECT state, COUNT(*) FROM alerts GROUP BY state").fetchall())
            last_24h = db.execute("SELECT COUNT(*) FROM alerts WHERE opened_ms >= ?",
                                  (now_ms - 86_400_000,)).fetchone()[0]
            resolved = db.execute("SELECT AVG(resolved_ms - opened_ms) FROM alerts "
                                  "WHERE state='resolved'").fetchone()[0]
        by_severity = {s: 0 for s in SEVERITIES}
        by_rule: dict[str, int] = {}
        for r in active:
            by_severity[r["severity"]] = by_severity.get(r["severity"], 0) + 1
            by_rule[r["rule"]] = by_rule.get(r["rule"], 0) + 1
        return {
            "active_alerts": [_row_to_alert(r) for r in active],
            "recent_alerts": [_row_to_alert(r) for r in latest],
            "statistics": {
                "active": len(active), "open": by_state.get("open", 0),
                "acknowledged": by_state.get("acknowledged", 0), "resolved": by_state.get("resolved", 0),
                "total": sum(by_state.values()), "opened_last_24h": last_24h,
                "active_by_severity": by_severity, "active_by_rule": by_rule,
                "mean_time_to_resolve_s": None if resolved is None else round(resolved / 1000.0, 3),
            },
        }

    def alert(self, alert_id: int) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM alerts WHERE id = ?", (alert_id,)).fetchone()
        return None if row is None else _row_to_alert(row)

    # ---- samples -----------------------------------------------------------------------------------------------
    def samples(self, since_ms: int, max_points: int) -> list[dict[str, Any]]:
        """Samples since ``since_ms``, oldest first, thinned evenly to at most ``max_points``."""
        with self._lock:
            n = self._db.execute("SELECT COUNT(*) FROM samples WHERE ts_ms >= ?", (since_ms,)).fetchone()[0]
            every = max(1, -(-n // max_points))
            rows = self._db.execute(
                "SELECT ts_ms, daemon_up, series FROM (SELECT ts_ms, daemon_up, series, "
                "ROW_NUMBER() OVER (ORDER BY ts_ms DESC) - 1 AS k FROM samples WHERE ts_ms >= ?) "
                "WHERE k % ? = 0 ORDER BY ts_ms", (since_ms, every)).fetchall()
        out = []
        for r in rows:
            point: dict[str, Any] = {"ts": iso_ms(r["ts_ms"]), "daemon_up": bool(r["daemon_up"])}
            point.update(orjson.loads(r["series"]))
            out.append(point)
        return out

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {t: self._db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("samples", "alerts")}

    def prune(self, older_than_ms: int) -> dict[str, int]:
        """Retention: delete samples and resolved alerts older than the cut; returns how many of each."""
        with self._lock:
            s = self._db.execute("DELETE FROM samples WHERE ts_ms < ?", (older_than_ms,)).rowcount
            a = self._db.execute("DELETE FROM alerts WHERE state='resolved' AND resolved_ms < ?",
                                 (older_than_ms,)).rowcount
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        return {"samples": s, "alerts": a}
