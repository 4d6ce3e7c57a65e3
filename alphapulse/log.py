"""Logging for the daemon: a daily JSON-lines file, a human console, and redaction of secrets.

Why it is built this way:

* structlog with ``make_filtering_bound_logger`` and our own processor chain, not stdlib handlers: a
  disabled level costs one no-op call and an enabled one a few tens of µs, which matters on the
  hot path of an asyncio process that logs every bar and every order.
* One ``os.write`` per JSON line on an ``O_APPEND`` fd: the kernel appends the whole buffer at once,
  so concurrent threads never interleave and a crash leaves at most one torn *last* line, which
  :func:`configure_logging` cuts off the next time the file is opened (so every line stays valid JSON
  for ``jq`` and the log shipper).
* The file name carries the UTC day and switches on the first record after midnight UTC, so no
  renaming is needed; logrotate only enforces retention (``config/logrotate/alphapulse``).  Should
  something move or remove the open file anyway, :func:`reopen_log_file` (the daemon's housekeeping,
  every second) reopens it at its path.
* Under systemd the console lines carry sd-daemon ``<N>`` priority prefixes, so journald stores the
  right priority and ``journalctl -p warning`` works; journald adds its own timestamps, so we do not.
* One redaction processor feeds both outputs, so a secret cannot leak through one of them only:
  values of secret-looking keys become ``***`` and every registered secret value (API key, secret,
  passphrase, control token) is masked inside any string, including messages and tracebacks.
* Warnings from the stdlib ``logging`` module (aiohttp, asyncio "Task exception was never
  retrieved") go through the same chain, so nothing prints a raw traceback outside the format.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import inspect
import logging
import os
import re
import sys
import threading
import time
import traceback
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson
import structlog
from structlog.typing import EventDict, FilteringBoundLogger, WrappedLogger

from alphapulse.operator_files import DAILY_LOG_PREFIX, DAILY_LOG_SUFFIX, daily_log_name, repair_tail

__all__ = [
    "close_logging",
    "configure_logging",
    "current_log_file",
    "get_logger",
    "register_secrets",
    "reopen_log_file",
    "repair_tail",
]

#: Clock for timestamps and the file's day; tests monkeypatch it to cross midnight.
_now: Callable[[], float] = time.time

MASK = "***"
#: Registered values shorter than this are ignored: masking "abc" everywhere would garble the logs.
MIN_SECRET_LEN = 6
FILE_PREFIX = DAILY_LOG_PREFIX  # the names are defined with the other operator files (alphapulse.operator_files)
FILE_SUFFIX = DAILY_LOG_SUFFIX

_LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
#: sd-daemon(3) priorities: 3 = err, 4 = warning, 6 = info, 7 = debug (2 = crit).
_SD_PRIORITY: dict[str, str] = {
    "debug": "<7>",
    "info": "<6>",
    "warning": "<4>",
    "error": "<3>",
    "critical": "<2>",
}

# Key names that hold credentials. Long, distinctive words match anywhere in the name (``x_api_key``,
# ``client_secret``, ``control_token``); short, ambiguous ones only as a whole ``_``-separated word, so
# ``ACCESS-SIGN`` and ``auth`` are masked while ``signal`` and ``author`` are not.
_SECRET_KEY_RE = re.compile(
    r"secret|passphrase|password|passwd|token|signature|authoriz|credential|cookie"
    r"|api_?key|access_?key|private_?key"
    r"|(?:^|_)(?:sign|sig|auth|pwd|pass)(?:_|$)"
)
_MAX_DEPTH = 8
_MAX_ARRAY = 256


# --------------------------------------------------------------------------------------------------
# Redaction
# --------------------------------------------------------------------------------------------------

_secret_values: set[str] = set()
_secret_re: re.Pattern[str] | None = None
_secret_lock = threading.Lock()
_key_cache: dict[str, bool] = {}


def register_secrets(values: Iterable[str | None]) -> None:
    """Mask these values wherever they appear in any logged string, from now on.

    Cumulative (a secret is never "unregistered"), so a second call cannot un-protect the first.
    ``None`` and values shorter than :data:`MIN_SECRET_LEN` are ignored. The percent-encoded form
    is registered too, because secrets also travel in URLs and form bodies.
    """
    global _secret_re
    with _secret_lock:
        for value in values:
            if value is None:
                continue
            for variant in (value, value.strip(), urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value)):
                if len(variant) >= MIN_SECRET_LEN:
                    _secret_values.add(variant)
        if _secret_values:
            # Longest first, so a secret that contains another one is masked whole.
            alternatives = sorted(_secret_values, key=lambda s: (-len(s), s))
            _secret_re = re.compile("|".join(re.escape(s) for s in alternatives))


def is_secret_key(key: object) -> bool:
    """Whether a field called ``key`` holds a credential (case-insensitive, ``-`` same as ``_``)."""
    name = key if isinstance(key, str) else str(key)
    hit = _key_cache.get(name)
    if hit is None:
        hit = _SECRET_KEY_RE.search(name.lower().replace("-", "_")) is not None
        if len(_key_cache) > 4096:  # keys are code constants; this only guards against data-as-keys
            _key_cache.clear()
        _key_cache[name] = hit
    return hit


def _redact_mapping(items: Iterable[tuple[Any, Any]], pattern: re.Pattern[str] | None, depth: int) -> dict[Any, Any]:
    """A new dict (never the caller's object, which must not change) with secret keys masked."""
    out: dict[Any, Any] = {}
    for k, v in items:
        if isinstance(k, str):
            if pattern is not None:
                k = pattern.sub(MASK, k)
        elif not isinstance(k, (int, float, bool)) and k is not None:
            k = str(k)
        out[k] = MASK if is_secret_key(k) else _redact_value(v, pattern, depth + 1)
    return out


def _redact_value(value: Any, pattern: re.Pattern[str] | None, depth: int) -> Any:
    """``value`` made JSON-ready and free of secrets.

    Anything not plainly JSON (objects, exceptions, URLs) is turned into its ``str`` first, because
    the object's own rendering is where a secret would otherwise slip past the string check.
    """
    if value is None or type(value) in (bool, int, float):
        return value
    if type(value) is str:
        return pattern.sub(MASK, value) if pattern is not None else value
    if isinstance(value, enum.Enum):  # before str/int: str(StrEnum member) is "Class.NAME" on 3.11
        return _redact_value(value.value, pattern, depth + 1)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):  # subclasses: orjson would otherwise fall back to a string
        return int(value)
    if isinstance(value, float):  # numpy.float64 is one
        return float(value)
    if isinstance(value, str):
        return pattern.sub(MASK, str(value)) if pattern is not None else str(value)
    if depth >= _MAX_DEPTH:
        return "<too deep>"
    if isinstance(value, Mapping):
        return _redact_mapping(value.items(), pattern, depth)
    if isinstance(value, tuple) and hasattr(value, "_asdict"):  # a NamedTuple (Candle) logs as an object
        return _redact_mapping(value._asdict().items(), pattern, depth)
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_redact_value(v, pattern, depth + 1) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = dataclasses.fields(value)
        return _redact_mapping(((f.name, getattr(value, f.name)) for f in fields), pattern, depth)
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value).decode("utf-8", "replace")
    elif type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        # Scalars become Python numbers, small arrays (a feature vector) JSON lists.
        if getattr(value, "size", 0) <= _MAX_ARRAY:
            return _redact_value(value.tolist(), pattern, depth + 1)
        return f"<ndarray shape={getattr(value, 'shape', '?')} dtype={getattr(value, 'dtype', '?')}>"
    elif isinstance(value, Decimal):
        return str(value)
    else:
        try:
            value = str(value)
        except Exception as exc:  # a broken __str__ must not kill the log call
            value = f"<unprintable {type(value).__name__}: {exc!r}>"
    return pattern.sub(MASK, value) if pattern is not None else value


def redact(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """The one redaction processor: runs before both the file and the console renderers."""
    pattern = _secret_re
    for key, value in event_dict.items():
        if key in ("timestamp", "level"):
            continue
        if key not in ("event", "exception", "_exc_short", "logger") and is_secret_key(key):
            event_dict[key] = MASK
        else:
            event_dict[key] = _redact_value(value, pattern, 0)
    return event_dict


# --------------------------------------------------------------------------------------------------
# Event preparation: timestamp, level, exception
# --------------------------------------------------------------------------------------------------

_ts_cache: tuple[int, str] = (-1, "")


def format_timestamp(t: float) -> str:
    """ISO 8601 UTC with milliseconds and ``Z``; the per-second part is cached (strftime is slow)."""
    global _ts_cache
    sec, ms = divmod(int(t * 1000), 1000)
    cached_sec, prefix = _ts_cache
    if sec != cached_sec:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _ts_cache = (sec, prefix)
    return f"{prefix}.{ms:03d}Z"


ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def _exc_info_tuple(exc_info: Any) -> ExcInfo | None:
    """Normalise structlog's ``exc_info`` (``True``, an exception or a tuple) to a tuple or None."""
    if exc_info is True:
        exc_info = sys.exc_info()
    elif isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    if isinstance(exc_info, tuple) and len(exc_info) == 3 and exc_info[1] is not None:
        return exc_info
    return None


def _exc_short(info: ExcInfo) -> str:
    """One console line for an exception: ``Type: message (at file.py:12 in func)``."""
    exc = info[1]
    text = " | ".join(line.strip() for line in traceback.format_exception_only(exc) if line.strip())
    tb = info[2]
    if tb is not None:
        frames = traceback.extract_tb(tb)
        if frames:
            last = frames[-1]
            text += f" (at {os.path.basename(last.filename)}:{last.lineno} in {last.name})"
    return text


def prepare(_logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Build the ordered record: timestamp, level, logger, event, then the caller's fields."""
    out: EventDict = {
        "timestamp": format_timestamp(_now()),
        "level": method_name,
        "logger": event_dict.pop("logger_name", None) or event_dict.pop("logger", "alphapulse"),
        "event": event_dict.pop("event", ""),
    }
    exc_info = event_dict.pop("exc_info", None)
    event_dict.pop("timestamp", None)
    event_dict.pop("level", None)
    out.update(event_dict)
    if exc_info:
        info = _exc_info_tuple(exc_info)
        if info is not None:
            out["exception"] = "".join(traceback.format_exception(*info)).rstrip("\n")
            out["_exc_short"] = _exc_short(info)
    return out


def redact_text(text: str) -> str:
    """``text`` with every registered secret value replaced by ``***`` (for plain output such as
    ``alphapulse fetch --test``, which prints without going through the log pipeline)."""
    pattern = _secret_re
    return pattern.sub(MASK, text) if pattern is not None else text


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    """Last resort for orjson; redaction has already turned nearly everything into JSON types."""
    return str(obj)


def _dumps(event_dict: EventDict) -> bytes:
    opts = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS
    try:
        return orjson.dumps(event_dict, default=_json_default, option=opts)
    except TypeError:  # e.g. an int beyond 64 bits: keep the record, lose the type
        return orjson.dumps({str(k): str(v) for k, v in event_dict.items()}, option=opts)


class DailyFile:
    """``alphapulse_YYYYMMDD.log`` in ``directory``, reopened when the record's UTC day changes.

    The lock covers the write as well as the switch: otherwise a thread could ``os.write`` to an fd
    number that another thread just closed and the kernel reused for a socket or the database.
    """

    def __init__(self, directory: Path, prefix: str = FILE_PREFIX) -> None:
        self.directory = directory
        self.prefix = prefix  # another process sharing the directory (the monitor) keeps its own files
        self.path: Path | None = None
        self.repaired_bytes = 0
        self.write_errors = 0
        self._day = ""
        self._fd = -1
        self._lock = threading.Lock()
        directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._open(format_timestamp(_now())[:10])

    def _open(self, day: str) -> None:
        """Switch to ``day``'s file (``YYYY-MM-DD``), repairing its tail. Caller holds the lock."""
        path = self.directory / daily_log_name(day, self.prefix)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            self.repaired_bytes += repair_tail(fd)
        except OSError:
            pass  # a read-only tail problem must not stop logging; appends still work
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._day, self.path = fd, day, path

    def write(self, day: str, data: bytes) -> None:
        """Append one line with a single ``os.write`` (opening the next day's file first if due)."""
        with self._lock:
            if self._fd < 0:
                return
            try:
                if day != self._day:
                    self._open(day)
                n = os.write(self._fd, data)
                if n < len(data):  # only on ENOSPC-like trouble; finish the line rather than leave it torn
                    view = memoryview(data)[n:]
                    while view:
                        view = view[os.write(self._fd, view) :]
            except OSError:
                self.write_errors += 1
                if self.write_errors == 1:
                    _emergency(f"alphapulse.log: cannot write {self.path}: {sys.exc_info()[1]}")

    def reopen_if_rotated(self) -> bool:
        """Reopen today's file when something (logrotate, an operator) moved or removed it; True if it did."""
        with self._lock:
            if self._fd < 0 or self.path is None:
                return False
            try:
                st = os.stat(self.path)
                cur = os.fstat(self._fd)
                if (st.st_ino, st.st_dev) == (cur.st_ino, cur.st_dev):
                    return False
            except FileNotFoundError:
                pass
            try:
                self._open(self._day)
            except OSError:
                return False  # keep writing to the old file rather than lose lines
            return True

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
            self._fd = -1


def _emergency(message: str) -> None:
    """Tell the operator about a broken log file without going through the (broken) chain."""
    try:
        sys.stderr.write(f"<3>{message}\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        return  # stderr is gone too: nothing left to tell


def under_systemd(environ: Mapping[str, str] | None = None) -> bool:
    """True when started by systemd, whose journald understands ``<N>`` priority prefixes."""
    env = os.environ if environ is None else environ
    return bool(env.get("JOURNAL_STREAM") or env.get("INVOCATION_ID"))


def _kv(value: Any) -> str:
    """``key=value`` rendering for journal lines: bare when unambiguous, else JSON-quoted."""
    if isinstance(value, str):
        if value and not any(c in value for c in " =\"'\n\r\t\\"):
            return value
        return orjson.dumps(value).decode()
    if isinstance(value, (dict, list)):
        return orjson.dumps(value, default=_json_default, option=orjson.OPT_NON_STR_KEYS).decode()
    return str(value)


def _one_line(event: Any) -> str:
    """The event message with line breaks escaped: one record must stay one console/journal line."""
    return str(event).replace("\r", "\\r").replace("\n", "\\n")


def render_journal_line(event_dict: EventDict, exc_short: str | None) -> str:
    """``<6>logger: event k=v ...``: no colours, no timestamp, one line (journald splits on newlines)."""
    prio = _SD_PRIORITY.get(event_dict.get("level", "info"), "<6>")
    event = _one_line(event_dict.get("event", ""))
    parts = [f"{prio}{event_dict.get('logger', '')}: {event}"]
    for key, value in event_dict.items():
        if key not in ("timestamp", "level", "logger", "event", "exception"):
            parts.append(f"{key}={_kv(value)}")
    if exc_short:
        parts.append(f"exc={_kv(exc_short)}")
    return " ".join(parts) + "\n"


class Console:
    """stderr output: sd-daemon prefixed lines under systemd, ConsoleRenderer lines otherwise."""

    def __init__(self) -> None:
        self.journal = under_systemd()
        colors = _isatty(sys.stderr) and not os.environ.get("NO_COLOR")
        # structlog 26 renamed pad_event to pad_event_to (the old name warns); older releases know only the old one
        pad = "pad_event_to" if "pad_event_to" in inspect.signature(structlog.dev.ConsoleRenderer).parameters \
            else "pad_event"
        pad_kw: dict[str, Any] = {pad: 30}
        self._renderer = structlog.dev.ConsoleRenderer(colors=colors, sort_keys=False, **pad_kw)

    def render(self, event_dict: EventDict, exc_short: str | None) -> str:
        if self.journal:
            return render_journal_line(event_dict, exc_short)
        shown = {k: v for k, v in event_dict.items() if k != "exception"}
        shown["event"] = _one_line(shown.get("event", ""))
        if exc_short:
            shown["exc"] = exc_short
        return str(self._renderer(None, shown.get("level", "info"), shown)) + "\n"

    def write(self, event_dict: EventDict, exc_short: str | None) -> None:
        line = self.render(event_dict, exc_short)
        stream = sys.stderr  # looked up per call: tests and daemons may swap it
        try:
            stream.write(line)
            stream.flush()
        except (OSError, ValueError, AttributeError):
            return  # a closed or full stderr must never take the daemon down


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (OSError, ValueError, AttributeError):
        return False


# --------------------------------------------------------------------------------------------------
# The chain's sink and the stdlib bridge
# --------------------------------------------------------------------------------------------------

_file: DailyFile | None = None
_console: Console | None = None
_handler: logging.Handler | None = None
_config_lock = threading.Lock()


def write_outputs(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Final processor: write the JSON line and the console line, then stop the chain."""
    exc_short = event_dict.pop("_exc_short", None)
    out_file = _file
    if out_file is not None:
        out_file.write(event_dict["timestamp"][:10], _dumps(event_dict))
    console = _console
    if console is not None:
        console.write(event_dict, exc_short)
    raise structlog.DropEvent


class _StdlibBridge(logging.Handler):
    """Feeds stdlib ``logging`` records (aiohttp, asyncio) into the structlog chain."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = max((lv for lv in (10, 20, 30, 40, 50) if lv <= record.levelno), default=10)
            kw: dict[str, Any] = {"logger_name": record.name}
            if record.exc_info and record.exc_info[1] is not None:
                kw["exc_info"] = record.exc_info
            structlog.get_logger().log(level, record.getMessage(), **kw)
        except Exception:  # logging's own contract: report via handleError, never raise
            self.handleError(record)


def _parse_level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    try:
        return _LEVELS[level.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; expected one of {sorted(_LEVELS)}") from None


def configure_logging(
    log_dir: Path | None,
    level: str = "INFO",
    console: bool = True,
    json_file: bool = True,
    file_prefix: str = FILE_PREFIX,
) -> None:
    """Set up (or redo) the outputs; safe to call again, e.g. with another ``log_dir`` in tests.

    The file is opened here, not on the first record, so a torn tail from a crash is repaired at
    start and :func:`current_log_file` names the file at once.
    """
    global _file, _console, _handler
    min_level = _parse_level(level)
    with _config_lock:
        old_file = _file
        _file = DailyFile(Path(log_dir), file_prefix) if (json_file and log_dir is not None) else None
        if old_file is not None:
            old_file.close()
        _console = Console() if console else None
        structlog.configure(
            processors=[prepare, redact, write_outputs],
            wrapper_class=structlog.make_filtering_bound_logger(min_level),
            logger_factory=structlog.ReturnLoggerFactory(),
            context_class=dict,
            cache_logger_on_first_use=False,  # so a reconfigure also reaches loggers made at import
        )
        root = logging.getLogger()
        if _handler is not None:
            root.removeHandler(_handler)
        _handler = _StdlibBridge(level=max(logging.WARNING, min_level))
        root.addHandler(_handler)
        if root.level == logging.NOTSET or root.level > logging.WARNING:
            root.setLevel(logging.WARNING)
        logging.captureWarnings(True)
    if _file is not None and _file.repaired_bytes:
        get_logger(__name__).warning("log_tail_repaired", file=str(_file.path), removed_bytes=_file.repaired_bytes)


def get_logger(name: str) -> FilteringBoundLogger:
    """A structlog logger whose records carry ``logger=name``; cheap to keep at module level."""
    # Bound as ``logger_name`` because ``structlog.get_logger(logger=...)`` collides with its own
    # parameter; :func:`prepare` renames it to ``logger`` in the record.
    logger: FilteringBoundLogger = structlog.get_logger(logger_name=name)
    return logger


def current_log_file() -> Path | None:
    """The JSON-lines file being written now (None when file output is off or closed)."""
    out_file = _file
    return out_file.path if out_file is not None else None


def reopen_log_file() -> bool:
    """Reopen the JSON-lines file if it was rotated away under us (see :meth:`DailyFile.reopen_if_rotated`)."""
    out_file = _file
    return out_file.reopen_if_rotated() if out_file is not None else False


def close_logging() -> None:
    """Close the log file and detach from stdlib ``logging`` (at shutdown, or between tests).

    The console keeps working for structlog loggers, so messages printed during the last moments
    of shutdown are not lost.
    """
    global _file, _handler
    with _config_lock:
        if _file is not None:
            _file.close()
            _file = None
        if _handler is not None:
            logging.getLogger().removeHandler(_handler)
            _handler = None
        logging.captureWarnings(False)
