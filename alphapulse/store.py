"""Durable state and history: SQLite in WAL mode, plus the operator's files derived from it.

SQLite is the source of truth.  Each candle's effects (decision, orders, fills, alerts, incidents, the
portfolio snapshot and the last processed candle) are one transaction, committed before the daemon moves
on: with ``synchronous=NORMAL`` in WAL mode a committed transaction survives ``kill -9``.  Automatic
checkpoints are off on the writing connection (they cost 4-6 ms); :meth:`Store.checkpoint` runs them from
a worker thread on its own connection so they never stall the event loop.

The operator files (``trades.csv``, ``ai_decisions.json``, ``risk_alerts.json``, ``incidents.log``) are
appended after the commit, one ``os.write`` per line on an ``O_APPEND`` descriptor, so a line is either
whole or absent.  At start a torn tail is cut off and any record the database has but a file lacks
(the process died between commit and append) is written again, so the files never miss a record.

logrotate may rename them under the daemon (``config/logrotate/alphapulse``): :meth:`OperatorFiles.reopen_rotated`
reopens a moved file within a second, and the start-up repair finds the last record in the newest rotated file
(``name.1``, ``name.2.gz``, ...) when the current one is empty, so a rotation neither loses nor repeats lines.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from alphapulse.domain import CASH_FLOW_SIDES, Order, Side, StepResult
from alphapulse.operator_files import (
    ALERT_EVENT,
    ALERTS_FILE,
    DECISIONS_FILE,
    INCIDENTS_FILE,
    TRADES_COLUMNS,
    TRADES_FILE,
    TRADES_HEADER,
    alert_line,
    decision_line,
    incident_line,
    last_incident_id,
    last_record,
    repair_tail,
    trade_line,
)
from alphapulse.timeutil import iso_ms, parse_utc_ms

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS decisions (
    candle_ts INTEGER PRIMARY KEY, symbol TEXT NOT NULL, decided_ms INTEGER NOT NULL, probabilities TEXT NOT NULL,
    action INTEGER NOT NULL, target REAL NOT NULL, confidence REAL NOT NULL, allowed INTEGER NOT NULL,
    reason TEXT NOT NULL, order_id TEXT, inference_us REAL NOT NULL, equity TEXT NOT NULL, position TEXT NOT NULL,
    seq INTEGER NOT NULL, state TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS orders (
    client_order_id TEXT PRIMARY KEY, symbol TEXT NOT NULL, side TEXT NOT NULL, qty TEXT NOT NULL,
    reduce_only INTEGER NOT NULL, created_ms INTEGER NOT NULL, reason TEXT NOT NULL, status TEXT NOT NULL,
    exchange_order_id TEXT);
CREATE TABLE IF NOT EXISTS fills (
    fill_id INTEGER PRIMARY KEY, client_order_id TEXT NOT NULL, symbol TEXT NOT NULL, side TEXT NOT NULL,
    qty TEXT NOT NULL, price TEXT NOT NULL, fee TEXT NOT NULL, realized_pnl TEXT NOT NULL, ts_ms INTEGER NOT NULL,
    trade_id TEXT UNIQUE);
CREATE INDEX IF NOT EXISTS fills_by_order ON fills(client_order_id);
CREATE TABLE IF NOT EXISTS risk_alerts (
    alert_id INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL, limit_name TEXT NOT NULL, value REAL NOT NULL,
    threshold REAL NOT NULL, action TEXT NOT NULL, detail TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS incidents (
    incident_id INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL);
"""

#: The statement the per-candle commit runs for a decision: the row of :func:`build_rows` plus ``seq`` and the state
#: snapshot as JSON.  Public so that a measurement (the benchmark's floor) commits exactly what the daemon commits.
INSERT_DECISION = "INSERT OR REPLACE INTO decisions VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"


@dataclass(frozen=True)
class PersistedState:
    portfolio: dict[str, Any]
    trading_state: str
    state_reason: str
    last_candle_ts: int | None
    open_orders: list[Order]


def connect(path: Path) -> sqlite3.Connection:
    """The writing connection as the daemon opens it: autocommit, WAL, ``synchronous=NORMAL`` (a commit survives
    ``kill -9``), automatic checkpoints off (:meth:`Store.checkpoint` runs them off the event loop), foreign keys on.
    Public so that a measurement (the benchmark's floor) commits with exactly the daemon's settings; the schema is
    :data:`SCHEMA`."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("PRAGMA foreign_keys=ON")
    return db


class Store:
    """SQLite history and state; every method runs on the event-loop thread except :meth:`checkpoint`."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / "alphapulse.db"
        self._db = connect(self.path)
        self._migrate()
        self._db.executescript(SCHEMA)
        self.ids = self._ids_from_db()
        row = self._db.execute("SELECT value FROM meta WHERE key='state'").fetchone()
        meta_seq = orjson.loads(row[0]).get("seq", 0) if row else 0
        self.seq: int = max(meta_seq, self._max_id("decisions", "seq"))
        self._ckpt_lock = threading.Lock()
        self.commits = 0

    def _migrate(self) -> None:
        """Bring a database written by an earlier version to this schema, in one transaction.

        Version 1 allowed one fill per order (``UNIQUE`` on the order id, a foreign key to ``orders``) and had
        no exchange ids: an exchange fills an order in parts, and funding payments are ledger rows without an
        order, so the fills table is rebuilt without those constraints and with the exchange's trade id.
        """
        db = self._db
        cols = {r[1] for r in db.execute("PRAGMA table_info(fills)")}
        if not cols or "trade_id" in cols:
            return
        db.execute("BEGIN")
        try:
            db.execute("ALTER TABLE fills RENAME TO fills_v1")
            db.execute("DROP INDEX IF EXISTS fills_by_order")
            for stmt in SCHEMA.split(";"):
                if "TABLE IF NOT EXISTS fills" in stmt or "fills_by_order" in stmt:
                    db.execute(stmt)
            db.execute("INSERT INTO fills SELECT *, NULL FROM fills_v1")
            db.execute("DROP TABLE fills_v1")
            if "exchange_order_id" not in {r[1] for r in db.execute("PRAGMA table_info(orders)")}:
                db.execute("ALTER TABLE orders ADD COLUMN exchange_order_id TEXT")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _ids_from_db(self) -> RowIds:
        return RowIds(self._max_id("fills", "fill_id") + 1, self._max_id("risk_alerts", "alert_id") + 1,
                      self._max_id("incidents", "incident_id") + 1)

    def _max_id(self, table: str, col: str) -> int:
        row = self._db.execute(f"SELECT COALESCE(MAX({col}), 0) FROM {table}").fetchone()
        return int(row[0])

    def close(self) -> None:
        self.checkpoint("TRUNCATE")
        self._db.close()

    WAL_LIMIT_BYTES = 16 << 20

    def checkpoint(self, mode: str | None = None) -> str:
        """Copy the WAL into the database file; safe to call from a worker thread. Returns the mode used.

        PASSIVE (the periodic one) never makes the writer wait.  But a writer that commits faster than a
        passive checkpoint copies (a replay at full speed) keeps the WAL from ever restarting, so it and its
        shared-memory index would grow without end: past ``WAL_LIMIT_BYTES`` a TRUNCATE checkpoint makes the
        writer wait once and resets it.  A PASSIVE pass goes first so that the TRUNCATE, which holds the write
        lock while it works, finds almost nothing left to copy: alone it copied the whole WAL under the lock
        and stalled the writer's commit for ~0.1 s.  TRUNCATE is also used at close.
        """
        if mode is None:
            try:
                big = os.path.getsize(f"{self.path}-wal") > self.WAL_LIMIT_BYTES
            except OSError:
                big = False
            mode = "TRUNCATE" if big else "PASSIVE"
        assert mode in ("PASSIVE", "TRUNCATE")
        with self._ckpt_lock:
            con = sqlite3.connect(self.path, isolation_level=None)
            try:
                if mode == "TRUNCATE":
                    for _ in range(2):  # the second pass copies what the writer added during the first
                        con.execute("PRAGMA wal_checkpoint(PASSIVE)")
                con.execute(f"PRAGMA wal_checkpoint({mode})")
            finally:
                con.close()
        return mode

    # ---- state ------------------------------------------------------------------------------
    def load(self) -> PersistedState | None:
        """The newest state: the last decision row's or the meta row's (operator actions, warm-up), by seq."""
        candidates = []
        row = self._db.execute("SELECT value FROM meta WHERE key='state'").fetchone()
        if row is not None:
            candidates.append(orjson.loads(row[0]))
        row = self._db.execute("SELECT state FROM decisions ORDER BY seq DESC LIMIT 1").fetchone()
        if row is not None:
            candidates.append(orjson.loads(row[0]))
        if not candidates:
            return None
        st = max(candidates, key=lambda c: c.get("seq", 0))
        orders = [
            Order(r[0], r[1], Side(r[2]), Decimal(r[3]), bool(r[4]), r[5], r[6])
            for r in self._db.execute(
                "SELECT client_order_id, symbol, side, qty, reduce_only, created_ms, reason FROM orders "
                "WHERE status IN ('open', 'partially_filled') ORDER BY created_ms")
        ]
        return PersistedState(st["portfolio"], st["trading_state"], st.get("state_reason", ""),
                              st.get("last_candle_ts"), orders)

    # ---- the per-step transaction -----------------------------------------------------------
    def commit_step(self, res: StepResult, state: dict[str, Any]) -> Persisted:
        """Write one step atomically; returns the rows with their ids for the operator files."""
        db = self._db
        self.seq += 1
        state["seq"] = self.seq
        out = build_rows(res, self.ids, state.get("equity", state["portfolio"]["cash"]), state["portfolio"]["qty"])
        state_json = orjson.dumps(state).decode()
        if out.decision is not None and not (res.orders or res.cancelled or out.fills or out.alerts or out.incidents):
            # The common case, a decision and nothing else: one autocommitted INSERT carries the state too.
            try:
                db.execute(INSERT_DECISION, (*out.decision, self.seq, state_json))
            except BaseException:
                self.seq -= 1
                raise
            self.commits += 1
            return out
        db.execute("BEGIN")
        try:
            for o in res.orders:
                db.execute("INSERT INTO orders VALUES (?,?,?,?,?,?,?, 'open', NULL)",
                           (o.client_order_id, o.symbol, o.side.value, str(o.qty), int(o.reduce_only), o.created_ms,
                            o.reason))
            for o in res.cancelled:
                db.execute("UPDATE orders SET status='cancelled' WHERE client_order_id=?", (o.client_order_id,))
            for f, row in zip(res.fills, out.fills):
                db.execute("INSERT INTO fills VALUES (?,?,?,?,?,?,?,?,?,?)", row)
                if f.side not in CASH_FLOW_SIDES:
                    db.execute("UPDATE orders SET status=? WHERE client_order_id=?",
                               (self._fill_status(f.client_order_id), f.client_order_id))
            if out.alerts:
                db.executemany("INSERT INTO risk_alerts VALUES (?,?,?,?,?,?,?)", out.alerts)
            if out.incidents:
                db.executemany("INSERT INTO incidents VALUES (?,?,?,?)", out.incidents)
            if out.decision is not None:
                db.execute(INSERT_DECISION, (*out.decision, self.seq, state_json))
            else:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('state', ?)", (state_json,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self.seq -= 1
            self.ids = self._ids_from_db()  # ids handed out inside the failed transaction are reused next time
            raise
        self.commits += 1
        return out

    def _fill_status(self, client_order_id: str) -> str:
        """'filled' once the order's fills add up to its quantity, else 'partially_filled' (inside a commit)."""
        row = self._db.execute("SELECT qty FROM orders WHERE client_order_id=?", (client_order_id,)).fetchone()
        if row is None:
            return "filled"
        done = sum((Decimal(q) for (q,) in self._db.execute(
            "SELECT qty FROM fills WHERE client_order_id=?", (client_order_id,))), Decimal(0))
        return "filled" if done >= Decimal(row[0]) else "partially_filled"

    def mark_order(self, client_order_id: str, status: str, exchange_order_id: str | None = None) -> None:
        """Record what the exchange said about an order (acknowledged with its id, rejected, cancelled)."""
        assert status in ("open", "partially_filled", "filled", "cancelled", "rejected")
        self._db.execute("UPDATE orders SET status=?, exchange_order_id=COALESCE(?, exchange_order_id) "
                         "WHERE client_order_id=?", (status, exchange_order_id, client_order_id))
        self.commits += 1

    def order_fills(self, client_order_ids: Iterable[str]) -> dict[str, list[tuple[Decimal, str | None]]]:
        """(qty, trade id) of each booked fill of these orders: what a restarted broker already has."""
        ids = list(client_order_ids)
        out: dict[str, list[tuple[Decimal, str | None]]] = {i: [] for i in ids}
        if ids:
            marks = ",".join("?" * len(ids))
            for coid, qty, trade_id in self._db.execute(
                    f"SELECT client_order_id, qty, trade_id FROM fills WHERE client_order_id IN ({marks})", ids):
                out[coid].append((Decimal(qty), trade_id))
        return out

    def last_cash_flow_ms(self, side: str) -> int | None:
        """Time of the newest cash flow of a kind ('funding') the *exchange* reported: where to ask it from.

        Only rows with an exchange id count: the paper account's simulated funding (no id) says nothing about what
        the exchange has booked, so a paper store going live still asks the exchange from its own start."""
        row = self._db.execute("SELECT MAX(ts_ms) FROM fills WHERE side=? AND trade_id IS NOT NULL",
                               (side,)).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        assert key != "state", "the state row is written by commit_step"
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
        self.commits += 1

    def order_status(self, client_order_id: str) -> tuple[str, str | None] | None:
        row = self._db.execute("SELECT status, exchange_order_id FROM orders WHERE client_order_id=?",
                               (client_order_id,)).fetchone()
        return None if row is None else (row[0], row[1])

    # ---- queries for reconciliation and the API ----------------------------------------------
    def fills_after(self, fill_id: int) -> Iterator[tuple[Any, ...]]:
        yield from self._db.execute("SELECT * FROM fills WHERE fill_id > ? ORDER BY fill_id", (fill_id,))

    def fill_reasons(self, ids: Iterable[str]) -> dict[str, str]:
        ids = list(ids)
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        q = f"SELECT client_order_id, reason FROM orders WHERE client_order_id IN ({marks})"
        return dict(self._db.execute(q, ids).fetchall())

    def decisions_after(self, candle_ts: int) -> Iterator[tuple[Any, ...]]:
        yield from self._db.execute(
            "SELECT candle_ts, symbol, decided_ms, probabilities, action, target, confidence, allowed, reason, "
            "order_id, inference_us, equity, position FROM decisions WHERE candle_ts > ? ORDER BY candle_ts",
            (candle_ts,))

    def alerts_after(self, alert_id: int) -> Iterator[tuple[Any, ...]]:
        yield from self._db.execute("SELECT * FROM risk_alerts WHERE alert_id > ? ORDER BY alert_id", (alert_id,))

    def incidents_after(self, incident_id: int) -> Iterator[tuple[Any, ...]]:
        yield from self._db.execute("SELECT * FROM incidents WHERE incident_id > ? ORDER BY incident_id",
                                    (incident_id,))

    def count(self, table: str) -> int:
        assert table in ("decisions", "orders", "fills", "risk_alerts", "incidents")
        return int(self._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


@dataclass
class Persisted:
    fills: list[tuple[Any, ...]]
    decision: tuple[Any, ...] | None
    alerts: list[tuple[Any, ...]]
    incidents: list[tuple[Any, ...]]


@dataclass
class RowIds:
    """Next ids for the tables whose rows the operator files reference."""

    fill: int = 1
    alert: int = 1
    incident: int = 1


def build_rows(res: StepResult, ids: RowIds, equity: str, position: str) -> Persisted:
    """The database rows of one step (pure; ids advance). The store inserts them; a backtest only formats them."""
    out = Persisted([], None, [], [])
    for f in res.fills:
        out.fills.append((ids.fill, f.client_order_id, f.symbol, f.side.value, str(f.qty), str(f.price), str(f.fee),
                          str(f.realized_pnl), f.ts_ms, f.trade_id))
        ids.fill += 1
    for a in res.alerts:
        out.alerts.append((ids.alert, a.ts_ms, a.limit, a.value, a.threshold, a.action,
                           orjson.dumps(a.detail).decode()))
        ids.alert += 1
    for inc in res.incidents:
        out.incidents.append((ids.incident, inc.ts_ms, inc.kind, orjson.dumps(inc.detail).decode()))
        ids.incident += 1
    if res.decision is not None:
        d = res.decision
        dec = d.decision
        out.decision = (dec.candle_ts, dec.symbol, d.decided_ms, orjson.dumps(dec.probabilities).decode(), dec.action,
                        dec.target, dec.confidence, int(d.allowed), d.reason, d.order_id, dec.inference_us, equity,
                        position)
    return out


# ---------------------------------------------------------------------------------------------
# Operator files
# ---------------------------------------------------------------------------------------------


_FILL_ID_COLUMN = TRADES_COLUMNS.index("fill_id")
# An operator file renamed away (logrotate) is created again by the daemon only if nothing else has after this long.
REOPEN_CREATE_AFTER_S = 5.0


def _fmt_dec(text: str) -> str:
    return format(Decimal(text).normalize(), "f") if "E" in text or "e" in text else text


def _default_reason(side: str) -> str:
    """A fill's reason when its order has none: a cash flow is its own reason (funding, adjustment)."""
    return "policy" if side in ("buy", "sell") else side


class OperatorFiles:
    """Append-only operator files in the log directory, derived from the store's rows."""

    def __init__(self, log_dir: Path, buffered: bool = False) -> None:
        """``buffered`` (backtests): lines collect in memory and go out in large writes; the daemon writes
        every line at once so a crash can cost at most the line being written."""
        log_dir.mkdir(parents=True, exist_ok=True)
        self._buffers: dict[str, bytearray] | None = {} if buffered else None
        self.dir = log_dir
        self.paths = {
            "trades": log_dir / TRADES_FILE,
            "decisions": log_dir / DECISIONS_FILE,
            "alerts": log_dir / ALERTS_FILE,
            "incidents": log_dir / INCIDENTS_FILE,
        }
        self._fds: dict[str, int] = {}
        self._missing_since: dict[str, float] = {}  # files renamed away and not created again yet (monotonic s)
        for key in self.paths:
            self._fds[key] = self._open(key)
        self._reasons: dict[str, str] = {}

    def _open(self, key: str) -> int:
        """Open (or create) one file for appending, cut a torn tail, and give a new ``trades.csv`` its header."""
        fd = os.open(self.paths[key], os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        repair_tail(fd)
        if key == "trades" and os.fstat(fd).st_size == 0:
            os.write(fd, TRADES_HEADER.encode())
        return fd

    def reopen_rotated(self) -> list[str]:
        """Reopen every file that logrotate moved away (its path now names another inode, or nothing).

        Called about once a second from the daemon's housekeeping (a few stat calls, ~25 µs).  Until then the
        daemon appends to the renamed file, which still holds every line whole: with ``delaycompress`` nothing
        reads or removes it before the next rotation, so no line is lost or torn.  Returns the keys reopened."""
        reopened = []
        for key, path in self.paths.items():
            fd = self._fds.get(key)
            if fd is None:
                continue
            try:
                st = os.stat(path)
            except FileNotFoundError:
                # Renamed away, and logrotate's ``create`` has not made the new file yet.  Creating it here would
                # race logrotate, which then puts its own file in place and leaves ours, with every line written
                # meanwhile, unlinked.  The renamed file takes the lines whole until then; only a rotation
                # without ``create`` leaves the path empty for long, and then the daemon creates it.
                since = self._missing_since.setdefault(key, time.monotonic())
                if time.monotonic() - since < REOPEN_CREATE_AFTER_S:
                    continue
            else:
                cur = os.fstat(fd)
                if (st.st_ino, st.st_dev) == (cur.st_ino, cur.st_dev):
                    continue
            self._missing_since.pop(key, None)
            self.flush()
            self._fds[key] = self._open(key)
            os.close(fd)
            reopened.append(key)
        return reopened

    def close(self) -> None:
        self.flush()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def flush(self) -> None:
        if self._buffers:
            for key, buf in self._buffers.items():
                if buf:
                    os.write(self._fds[key], buf)
                    buf.clear()

    def _write(self, key: str, line: bytes) -> None:
        if self._buffers is None:
            os.write(self._fds[key], line)
            return
        buf = self._buffers.setdefault(key, bytearray())
        buf += line
        if len(buf) >= 1 << 20:
            os.write(self._fds[key], buf)
            buf.clear()

    # ---- line formats -------------------------------------------------------------------------
    def trade(self, row: tuple[Any, ...], reason: str) -> None:
        fill_id, coid, symbol, side, qty, price, fee, realized, ts_ms = row[:9]
        pnl = Decimal(realized) - Decimal(fee)
        self._write("trades", trade_line((iso_ms(ts_ms), symbol, side, _fmt_dec(qty), _fmt_dec(price), _fmt_dec(fee),
                                          format(pnl, "f"), _fmt_dec(realized), coid, str(fill_id), reason)))

    def decision(self, row: tuple[Any, ...], action_meanings: tuple[str, ...], bar_ms: int) -> None:
        (candle_ts, symbol, decided_ms, probs, action, target, conf, allowed, reason, order_id, inf_us, equity,
         position) = row
        p = orjson.loads(probs) if isinstance(probs, str) else probs
        self._write("decisions", decision_line((
            iso_ms(decided_ms), iso_ms(candle_ts), symbol,
            {action_meanings[i] if i < len(action_meanings) else str(i): round(v, 6) for i, v in enumerate(p)},
            round(conf, 6), action_meanings[action] if action < len(action_meanings) else str(action), target,
            bool(allowed), reason, order_id, round(inf_us, 2), equity, position)))

    def alert(self, row: tuple[Any, ...]) -> None:
        alert_id, ts_ms, limit, value, threshold, action, detail = row
        self._write("alerts", alert_line((iso_ms(ts_ms), alert_id, ALERT_EVENT, limit, value, threshold, action,
                                          orjson.loads(detail) if isinstance(detail, str) else detail)))

    def incident(self, row: tuple[Any, ...]) -> None:
        incident_id, ts_ms, kind, detail = row
        self._write("incidents", incident_line(ts_ms, kind, detail, incident_id))

    def note(self, ts_ms: int, kind: str, detail: dict[str, Any]) -> None:
        """An incident that is not a row of the store (the model the daemon started on): no ``incident_id``, so
        the crash recovery passes over it."""
        self._write("incidents", incident_line(ts_ms, kind, detail))

    def write(self, p: Persisted, reasons: dict[str, str], action_meanings: tuple[str, ...], bar_ms: int) -> None:
        for row in p.fills:
            self.trade(row, reasons.get(row[1]) or _default_reason(row[3]))
        if p.decision is not None:
            self.decision(p.decision, action_meanings, bar_ms)
        for row in p.alerts:
            self.alert(row)
        for row in p.incidents:
            self.incident(row)

    # ---- reconciliation after a crash ----------------------------------------------------------
    def reconcile(self, store: Store, action_meanings: tuple[str, ...], bar_ms: int) -> dict[str, int]:
        """Append every record the store has and a file lacks; returns how many lines each file gained."""
        added = {"trades": 0, "decisions": 0, "alerts": 0, "incidents": 0}
        last = last_record(self.paths["trades"], header=b"timestamp,")
        last_fill = 0
        if last:
            last_fill = int(last.split(b",")[_FILL_ID_COLUMN])
        rows = list(store.fills_after(last_fill))
        reasons = store.fill_reasons(r[1] for r in rows)
        for row in rows:
            self.trade(row, reasons.get(row[1]) or _default_reason(row[3]))
            added["trades"] += 1
        last = last_record(self.paths["decisions"])
        last_ts = -1
        if last:
            rec = orjson.loads(last)
            last_ts = parse_utc_ms(rec["candle_time"])
        for row in store.decisions_after(last_ts):
            self.decision(row, action_meanings, bar_ms)
            added["decisions"] += 1
        last = last_record(self.paths["alerts"])
        for row in store.alerts_after(orjson.loads(last)["alert_id"] if last else 0):
            self.alert(row)
            added["alerts"] += 1
        # the last line with an id: lines of ``alphapulse model`` (no id, not in the store) may follow it
        for row in store.incidents_after(last_incident_id(self.paths["incidents"])):
            self.incident(row)
            added["incidents"] += 1
        return added
