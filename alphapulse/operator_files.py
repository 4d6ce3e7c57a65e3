"""The operator files, defined once: names, columns, JSON keys, line formats, and their readers.

The daemon (and a backtest) append four files to the log directory for people and tools that never open
the SQLite store: ``trades.csv``, ``ai_decisions.json``, ``risk_alerts.json`` and ``incidents.log``.  Their
writer (:class:`alphapulse.store.OperatorFiles`) and their readers (``alphapulse report``; the health check
and the monitor are meant to do the same) import the names and formats from here, so a column added by the
writer cannot be missed by a reader, and no reader depends on the order in which the writer emits JSON keys.

Line formats (UTF-8, one record per ``\\n``-terminated line, appended with one ``write`` each):

* ``trades.csv``: a header line, then :data:`TRADES_COLUMNS`; readers locate columns by the header's names.
* ``ai_decisions.json``: JSON objects with :data:`DECISION_KEYS`.
* ``risk_alerts.json``: JSON objects with :data:`ALERT_KEYS` (``event`` is always :data:`ALERT_EVENT`).
* ``incidents.log``: ``<timestamp> <KIND> incident_id=<n> <detail JSON>``; lines written outside the daemon
  (model rollout: :func:`append_incident`) have no ``incident_id``, because they are not rows of the store.

Readers are iterators (the files grow by a line per bar forever), decode every line properly, and skip a
line they cannot parse, counting it in an optional ``skipped`` counter under the file's name.  A last line
without its ``\\n`` is a torn write (a crash mid-write, or a line still being written): it is skipped and
counted too, never parsed as a shorter record.

Rotation (``config/logrotate/alphapulse``): logrotate renames a file to ``name.1`` and later compresses it to
``name.2.gz`` ...  Readers read those generations first, oldest first, so a report still sees yesterday after
the midnight rotation; :func:`last_record` and :func:`last_incident_id` look back through them when the
current file has no record yet, so the daemon's crash recovery never appends history twice.
"""

from __future__ import annotations

import csv
import gzip
import math
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import IO, Any

import orjson

from alphapulse.timeutil import iso_ms, parse_utc_ms

__all__ = [
    "ALERTS_FILE", "ALERT_EVENT", "ALERT_KEYS", "DAILY_LOG_GLOB", "DAILY_LOG_PREFIX", "DAILY_LOG_SUFFIX",
    "DECISIONS_FILE", "DECISION_KEYS", "INCIDENTS_FILE", "INCIDENT_FIELDS", "OPERATOR_FILES", "TRADES_COLUMNS",
    "TRADES_FILE", "TRADES_HEADER", "AlertRow", "DecisionRow", "IncidentRow", "TradeRow", "alert_from",
    "alert_line", "append_incident", "daily_log_name", "decision_from", "decision_line", "incident_line",
    "last_incident_id", "last_record", "parse_incident", "read_alerts", "read_decisions", "read_incidents",
    "read_trades", "repair_tail", "rotated_chain", "trade_line",
]

TRADES_FILE = "trades.csv"
DECISIONS_FILE = "ai_decisions.json"
ALERTS_FILE = "risk_alerts.json"
INCIDENTS_FILE = "incidents.log"
OPERATOR_FILES = (TRADES_FILE, DECISIONS_FILE, ALERTS_FILE, INCIDENTS_FILE)

#: The daemon's structlog JSON-lines file, one per UTC day: ``alphapulse_YYYYMMDD.log`` (see alphapulse.log).
DAILY_LOG_PREFIX = "alphapulse_"
DAILY_LOG_SUFFIX = ".log"
DAILY_LOG_GLOB = f"{DAILY_LOG_PREFIX}*{DAILY_LOG_SUFFIX}"

#: ``pnl`` is the fill's realized PnL net of its own fee (so the column sums to the equity change);
#: ``realized_pnl`` is gross (non-zero: the fill closed part of a position).
TRADES_COLUMNS = ("timestamp", "symbol", "side", "qty", "price", "fee", "pnl", "realized_pnl", "order_id",
                  "fill_id", "reason")
TRADES_HEADER = ",".join(TRADES_COLUMNS) + "\n"
DECISION_KEYS = ("timestamp", "candle_time", "symbol", "probabilities", "confidence", "action", "target",
                 "allowed", "reason", "order_id", "inference_us", "equity", "position")
ALERT_EVENT = "RISK_LIMIT_EXCEEDED"
ALERT_KEYS = ("timestamp", "alert_id", "event", "limit", "value", "threshold", "action", "detail")
#: The fields of an incidents.log line, in the order they appear.
INCIDENT_FIELDS = ("timestamp", "kind", "incident_id", "detail")
_INCIDENT_ID = "incident_id="


def daily_log_name(day: str, prefix: str = DAILY_LOG_PREFIX) -> str:
    """The daily log file's name for ``day`` (``YYYY-MM-DD``): ``alphapulse_YYYYMMDD.log`` (the monitor writes its
    own, ``monitor_YYYYMMDD.log``, beside it)."""
    return f"{prefix}{day[0:4]}{day[5:7]}{day[8:10]}{DAILY_LOG_SUFFIX}"


# --------------------------------------------------------------------------------------------------
# Writing: line formats and the tail repair
# --------------------------------------------------------------------------------------------------


def trade_line(values: Sequence[str]) -> bytes:
    """One trades.csv line from the values of :data:`TRADES_COLUMNS`, in that order (already formatted text;
    none contains a comma: symbols, sides, decimal numbers, ids and reason codes)."""
    if len(values) != len(TRADES_COLUMNS):
        raise ValueError(f"trades.csv has {len(TRADES_COLUMNS)} columns, got {len(values)} values")
    return (",".join(values) + "\n").encode()


def decision_line(values: Sequence[Any]) -> bytes:
    """One ai_decisions.json line from the values of :data:`DECISION_KEYS`, in that order."""
    return orjson.dumps(dict(zip(DECISION_KEYS, values, strict=True))) + b"\n"


def alert_line(values: Sequence[Any]) -> bytes:
    """One risk_alerts.json line from the values of :data:`ALERT_KEYS`, in that order."""
    return orjson.dumps(dict(zip(ALERT_KEYS, values, strict=True))) + b"\n"


def incident_line(ts_ms: int, kind: str, detail: Mapping[str, Any] | str, incident_id: int | None = None) -> bytes:
    """One incidents.log line; ``detail`` is a mapping or its JSON text (the store keeps it as text)."""
    if not kind or any(c.isspace() for c in kind):
        raise ValueError(f"an incident kind is one word, got {kind!r}")
    text = detail if isinstance(detail, str) else orjson.dumps(dict(detail)).decode()
    ident = "" if incident_id is None else f"{_INCIDENT_ID}{incident_id} "
    return f"{iso_ms(ts_ms)} {kind} {ident}{text}\n".encode()


def repair_tail(fd: int) -> int:
    """Cut a torn last line (no trailing newline) left by a crash; return the bytes removed.

    The one repair for every append-only file (the daily log, the operator files): ``fd`` open read-write.
    Only the file's own writer calls it, at start, before it appends: another process must not cut a line
    the writer may be in the middle of writing."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return 0
    end = size
    keep = 0
    while end > 0:
        start = max(0, end - 65536)
        chunk = os.pread(fd, end - start, start)
        nl = chunk.rfind(b"\n")
        if nl >= 0:
            keep = start + nl + 1
            break
        end = start
    os.ftruncate(fd, keep)
    return size - keep


def append_incident(log_dir: Path, ts_ms: int, kind: str, detail: Mapping[str, Any]) -> Path:
    """Append one incident line from outside the daemon (``alphapulse model``) and return the file's path.

    One ``write`` on an ``O_APPEND`` descriptor, like the daemon's own lines, so a running daemon's lines and
    this one never interleave.  The line carries no ``incident_id``: it is not a row of the store, and the
    daemon's crash recovery (:func:`last_incident_id`) looks past it.  A torn tail left by a crashed daemon
    is not cut here (only the writer may cut, see :func:`repair_tail`): the line starts on a new line
    instead, and readers skip the torn fragment as malformed.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / INCIDENTS_FILE
    line = incident_line(ts_ms, kind, detail)
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        if created and os.geteuid() == 0:  # sudo: the daemon's user must still open it read-write
            st = os.stat(log_dir)
            os.fchown(fd, st.st_uid, st.st_gid)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        os.write(fd, line)
    finally:
        os.close(fd)
    return path


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TradeRow:
    """One trades.csv line."""

    ts_ms: int
    symbol: str
    side: str
    qty: Decimal
    price: Decimal
    fee: Decimal
    pnl: Decimal  # realized PnL net of this fill's fee
    realized_pnl: Decimal  # gross; != 0 means the fill closed (part of) a position
    order_id: str
    fill_id: str
    reason: str

    @property
    def closing(self) -> bool:
        """A trade that closed (part of) a position; funding and adjustment rows are cash flows, not trades."""
        return self.realized_pnl != 0 and self.side in ("buy", "sell")


@dataclass(frozen=True)
class DecisionRow:
    """One ai_decisions.json line.  ``candle_ms`` is the bar decided on, ``ts_ms`` when (its close)."""

    ts_ms: int
    candle_ms: int
    symbol: str
    confidence: float
    allowed: bool
    reason: str
    action: str = ""
    target: float | None = None
    order_id: str | None = None
    inference_us: float | None = None
    equity: float | None = None  # account equity marked at the bar's close (None: not recorded)
    position: float | None = None
    probabilities: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class AlertRow:
    """One risk_alerts.json line."""

    ts_ms: int
    alert_id: int | None
    limit: str
    value: float | None
    threshold: float | None
    action: str
    detail: dict[str, Any] = field(default_factory=dict)
    event: str = ALERT_EVENT

    @property
    def detail_text(self) -> str:
        """The detail as compact JSON with sorted keys ('' when empty), for tables."""
        return orjson.dumps(self.detail, option=orjson.OPT_SORT_KEYS).decode() if self.detail else ""


@dataclass(frozen=True)
class IncidentRow:
    """One incidents.log line; ``incident_id`` is None for lines written outside the daemon."""

    ts_ms: int
    kind: str
    incident_id: int | None
    detail: dict[str, Any] = field(default_factory=dict)


def rotated_chain(path: Path, limit: int = 400) -> Iterator[Path]:
    """``path`` and then its logrotate generations, newest first: ``name.1`` (kept uncompressed by
    ``delaycompress``), ``name.2.gz``, ... up to the first missing number (config/logrotate/alphapulse)."""
    yield path
    for i in range(1, limit + 1):
        found = False
        for cand in (path.with_name(f"{path.name}.{i}"), path.with_name(f"{path.name}.{i}.gz")):
            if cand.exists():
                found = True
                yield cand
        if not found:
            return


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace", newline="")
    return path.open("r", encoding="utf-8", errors="replace", newline="")


def _complete_lines(path: Path, name: str, skipped: Counter[str] | None) -> Iterator[str]:
    """The whole lines of a possibly huge, possibly being-appended file, one at a time, after those of its
    logrotate generations (oldest first): after a rotation yesterday's records are in ``name.1``.

    Blank lines are ignored; a last line without ``\\n`` is torn and counted as skipped."""
    for p in reversed(list(rotated_chain(path))):
        try:
            f = _open_text(p)
        except FileNotFoundError:
            continue
        with f:
            for line in f:
                if not line.endswith("\n"):
                    if line.strip() and skipped is not None:
                        skipped[name] += 1
                    break
                if line.strip():
                    yield line


def _last_line(path: Path) -> bytes | None:
    """The last non-empty line of one file (plain: read from the end; gzip: streamed)."""
    if path.suffix == ".gz":
        last: bytes | None = None
        with gzip.open(path, "rb") as g:
            for line in g:
                if line.strip():
                    last = line.rstrip(b"\n")
        return last
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return None
        f.seek(max(0, size - 65536))
        lines = f.read().rstrip(b"\n").split(b"\n")
        return lines[-1] if lines and lines[-1] else None


def last_record(path: Path, header: bytes | None = None) -> bytes | None:
    """The last record written to ``path``'s stream: in the file itself or, when logrotate has just moved it
    away (the file is missing, empty or only a header), in the newest rotated generation that has one.
    Without this a restart after a rotation would find "no record" and append the whole history again."""
    for cand in rotated_chain(path):
        try:
            last = _last_line(cand)
        except (OSError, EOFError):
            continue
        if last and not (header is not None and last.startswith(header)):
            return last
    return None


def _dec(text: str) -> Decimal:
    value = Decimal(text)
    if not value.is_finite():
        raise InvalidOperation(text)
    return value


def _num(value: Any) -> float | None:
    """A JSON number as a finite float; None for null, strings that are not numbers, booleans and NaN."""
    if type(value) is float:
        return value if math.isfinite(value) else None
    if isinstance(value, bool) or value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def read_trades(log_dir: Path, skipped: Counter[str] | None = None, *, path: Path | None = None
                ) -> Iterator[TradeRow]:
    """Every well-formed fill of ``<log_dir>/trades.csv`` (or ``path``), in file order.

    Columns are found by the header's names (the file's first line), so a reader keeps working if the
    writer ever adds or moves one; a file without a header is read in :data:`TRADES_COLUMNS` order.
    """
    source = path if path is not None else log_dir / TRADES_FILE
    index = {c: i for i, c in enumerate(TRADES_COLUMNS)}
    names = set(TRADES_COLUMNS)
    width = len(TRADES_COLUMNS)
    for row in csv.reader(_complete_lines(source, TRADES_FILE, skipped)):
        if names <= set(row):  # a header (again, when two files were concatenated)
            index = {c: row.index(c) for c in TRADES_COLUMNS}
            width = len(row)
            continue
        try:
            if len(row) != width:
                raise ValueError(f"{len(row)} fields, the header has {width}")
            g = row.__getitem__
            yield TradeRow(parse_utc_ms(g(index["timestamp"])), g(index["symbol"]), g(index["side"]),
                           _dec(g(index["qty"])), _dec(g(index["price"])), _dec(g(index["fee"])),
                           _dec(g(index["pnl"])), _dec(g(index["realized_pnl"])), g(index["order_id"]),
                           g(index["fill_id"]), g(index["reason"]))
        except (ValueError, InvalidOperation, IndexError):
            if skipped is not None:
                skipped[TRADES_FILE] += 1


def _json_records(path: Path, name: str, skipped: Counter[str] | None) -> Iterator[dict[str, Any]]:
    for line in _complete_lines(path, name, skipped):
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            rec = None
        if isinstance(rec, dict):
            yield rec
        elif skipped is not None:
            skipped[name] += 1


def decision_from(rec: Mapping[str, Any]) -> DecisionRow:
    """A decoded ai_decisions.json object as a row; ValueError/KeyError/TypeError when it is not one."""
    ts = parse_utc_ms(rec["timestamp"])
    candle = rec.get("candle_time")
    conf = _num(rec["confidence"])
    if conf is None:
        raise ValueError(f"confidence is not a number: {rec['confidence']!r}")
    probs = rec.get("probabilities") or {}
    if not isinstance(probs, dict):
        raise TypeError("probabilities is not an object")
    order_id = rec.get("order_id")
    return DecisionRow(
        ts_ms=ts, candle_ms=parse_utc_ms(candle) if candle else ts, symbol=str(rec.get("symbol") or ""),
        confidence=conf, allowed=bool(rec.get("allowed")), reason=str(rec.get("reason") or "unknown"),
        action=str(rec.get("action") or ""), target=_num(rec.get("target")),
        order_id=None if order_id is None else str(order_id), inference_us=_num(rec.get("inference_us")),
        equity=_num(rec.get("equity")), position=_num(rec.get("position")),
        probabilities={str(k): p for k, v in probs.items() if (p := _num(v)) is not None})


def read_decisions(log_dir: Path, skipped: Counter[str] | None = None, *, path: Path | None = None
                   ) -> Iterator[DecisionRow]:
    """Every well-formed decision of ``<log_dir>/ai_decisions.json`` (or ``path``), in file order."""
    for rec in _json_records(path if path is not None else log_dir / DECISIONS_FILE, DECISIONS_FILE, skipped):
        try:
            yield decision_from(rec)
        except (ValueError, KeyError, TypeError):
            if skipped is not None:
                skipped[DECISIONS_FILE] += 1


def alert_from(rec: Mapping[str, Any]) -> AlertRow:
    """A decoded risk_alerts.json object as a row; ValueError/KeyError/TypeError when it is not one."""
    detail = rec.get("detail") or {}
    if not isinstance(detail, dict):
        raise TypeError("detail is not an object")
    alert_id = rec.get("alert_id")
    return AlertRow(parse_utc_ms(rec["timestamp"]), None if alert_id is None else int(alert_id),
                    str(rec.get("limit", "?")), _num(rec.get("value")), _num(rec.get("threshold")),
                    str(rec.get("action", "")), detail, str(rec.get("event") or ALERT_EVENT))


def read_alerts(log_dir: Path, skipped: Counter[str] | None = None, *, path: Path | None = None
                ) -> Iterator[AlertRow]:
    """Every well-formed alert of ``<log_dir>/risk_alerts.json`` (or ``path``), in file order."""
    for rec in _json_records(path if path is not None else log_dir / ALERTS_FILE, ALERTS_FILE, skipped):
        try:
            yield alert_from(rec)
        except (ValueError, KeyError, TypeError):
            if skipped is not None:
                skipped[ALERTS_FILE] += 1


def parse_incident(line: str) -> IncidentRow:
    """One incidents.log line (without or with its ``\\n``) as a row; ValueError when it is not one."""
    parts = line.rstrip("\n").split(" ", 2)
    if len(parts) < 3:
        raise ValueError("an incident line has a timestamp, a kind and a detail")
    ts_text, kind, rest = parts
    incident_id: int | None = None
    if rest.startswith(_INCIDENT_ID):
        ident, _, rest = rest.partition(" ")
        incident_id = int(ident[len(_INCIDENT_ID):])
    try:
        detail = orjson.loads(rest)
    except orjson.JSONDecodeError:
        raise ValueError("the detail is not JSON") from None
    if not isinstance(detail, dict):
        raise ValueError("the detail is not a JSON object")
    return IncidentRow(parse_utc_ms(ts_text), kind, incident_id, detail)


def read_incidents(log_dir: Path, skipped: Counter[str] | None = None, *, path: Path | None = None
                   ) -> Iterator[IncidentRow]:
    """Every well-formed line of ``<log_dir>/incidents.log`` (or ``path``), in file order."""
    for line in _complete_lines(path if path is not None else log_dir / INCIDENTS_FILE, INCIDENTS_FILE, skipped):
        try:
            yield parse_incident(line)
        except ValueError:
            if skipped is not None:
                skipped[INCIDENTS_FILE] += 1


def last_incident_id(path: Path) -> int:
    """:func:`last_incident_id_of` the file or, when it has none (just rotated), of its newest rotated
    generation that has one."""
    for cand in rotated_chain(path):
        if cand.suffix == ".gz":
            found = 0
            for line in _complete_lines_of(cand):
                if _INCIDENT_ID in line:
                    try:
                        row = parse_incident(line)
                    except ValueError:
                        continue
                    if row.incident_id is not None:
                        found = row.incident_id
        else:
            found = last_incident_id_of(cand)
        if found:
            return found
    return 0


def _complete_lines_of(path: Path) -> Iterator[str]:
    with _open_text(path) as f:
        for line in f:
            if line.endswith("\n") and line.strip():
                yield line


def last_incident_id_of(path: Path) -> int:
    """The ``incident_id`` of the last well-formed store line of incidents.log (0 when none), read backwards
    from the end so a long file costs only its tail.

    Lines without an id (model rollout) and malformed fragments are passed over, so the daemon's crash
    recovery re-appends exactly the store's incidents the file lacks."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return 0
    with f:
        end = f.seek(0, os.SEEK_END)
        carry = b""
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            chunk = f.read(end - start) + carry
            lines = chunk.split(b"\n")
            carry = lines[0] if start > 0 else b""
            body = lines[1:] if start > 0 else lines
            for raw in reversed(body):
                if _INCIDENT_ID.encode() not in raw:
                    continue
                try:
                    row = parse_incident(raw.decode("utf-8"))
                except (ValueError, UnicodeDecodeError):
                    continue
                if row.incident_id is not None:
                    return row.incident_id
            end = start
    return 0
