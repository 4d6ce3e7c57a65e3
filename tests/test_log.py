"""Tests for alphapulse.log: the JSON file, the day switch, the console formats, redaction, crash repair.

Console formats and crash behaviour are checked on real subprocesses, because what matters there
is what a real process writes to its real stderr and files (and what ``kill -9`` leaves behind).
"""

from __future__ import annotations

import asyncio
import calendar
import gzip
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
import structlog

from alphapulse import log
from alphapulse.domain import Candle, TradingState

REPO = Path(__file__).resolve().parent.parent
BUNDLED = REPO / "alphapulse" / "data" / "BTC_USDT_USDT-5m.csv.gz"
TS_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
ANSI = "\x1b["

# 2025-03-01 23:59:59.250 UTC and 0.5 s later, just past midnight.
BEFORE_MIDNIGHT = calendar.timegm((2025, 3, 1, 23, 59, 59)) + 0.25
AFTER_MIDNIGHT = BEFORE_MIDNIGHT + 0.9


def first_candle() -> Candle:
    """The first real bar of the bundled BTC replay file, to log a realistic domain object."""
    with gzip.open(BUNDLED, "rt") as fh:
        fh.readline()
        ts, o, h, low, c, v = fh.readline().strip().split(",")
    return Candle(int(ts), float(o), float(h), float(low), float(c), float(v))


def read_records(path: Path) -> list[dict[str, object]]:
    """Every line of a log file parsed; fails if the file does not end with a newline."""
    raw = path.read_bytes()
    assert raw == b"" or raw.endswith(b"\n"), "log file must end with a complete line"
    return [json.loads(line) for line in raw.splitlines()]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No systemd markers (the test run itself may be under systemd), and a reset after each test."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    yield
    log.close_logging()
    structlog.reset_defaults()


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "INVOCATION_ID", "NO_COLOR")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


CHILD_CONSOLE = textwrap.dedent(
    """
    import logging, sys
    from pathlib import Path
    from alphapulse import log
    log.configure_logging(Path(sys.argv[1]), level="DEBUG")
    log.register_secrets(["Child-Secret-Token-42"])
    L = log.get_logger("alphapulse.child")
    L.debug("dbg_line", n=1)
    L.info("info_line", symbol="BTCUSDT", note="two words")
    L.warning("warn_line", token="Child-Secret-Token-42")
    L.error("error_line", detail="uses Child-Secret-Token-42 here")
    try:
        raise RuntimeError("boom with Child-Secret-Token-42")
    except RuntimeError:
        L.exception("exc_line")
    logging.getLogger("aiohttp.server").warning("stdlib_line")
    L.info("multi\\nline")
    log.close_logging()
    """
)


def run_console_child(tmp_path: Path, **env: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD_CONSOLE, str(tmp_path / "logs")],
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Child-Secret-Token-42" not in proc.stderr
    return proc.stderr.splitlines()


# ----------------------------------------------------------------------------------------------------
# JSON file
# ----------------------------------------------------------------------------------------------------


def test_json_lines_are_valid_and_carry_the_fields(
    tmp_path: Path, clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(log, "_now", lambda: BEFORE_MIDNIGHT)
    log.configure_logging(tmp_path, level="INFO", console=False)
    path = log.current_log_file()
    assert path == tmp_path / "alphapulse_20250301.log"

    candle = first_candle()
    lg = log.get_logger("alphapulse.market")
    lg.info("bar_closed", candle=candle, state=TradingState.ACTIVE, equity=Decimal("10000.25"), n=3, ok=True)
    lg.debug("hidden_debug")
    lg.warning('quote with "quotes" and\nnewline')

    records = read_records(path)
    assert [r["event"] for r in records] == ["bar_closed", 'quote with "quotes" and\nnewline']
    first = records[0]
    assert list(first)[:4] == ["timestamp", "level", "logger", "event"]
    assert first["timestamp"] == "2025-03-01T23:59:59.250Z"
    assert TS_RE.match(str(first["timestamp"]))
    assert first["level"] == "info"
    assert first["logger"] == "alphapulse.market"
    assert first["candle"] == {
        "ts": candle.ts,
        "open": candle.open,
        "high": candle.high,
        "low": candle.low,
        "close": candle.close,
        "volume": candle.volume,
    }
    assert first["state"] == "ACTIVE"
    assert first["equity"] == "10000.25"
    assert first["n"] == 3 and first["ok"] is True
    assert records[1]["level"] == "warning"


def test_timestamp_has_milliseconds_and_z(tmp_path: Path, clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(log, "_now", lambda: calendar.timegm((2024, 12, 31, 23, 59, 59)) + 0.9994)
    log.configure_logging(tmp_path, console=False)
    log.get_logger("t").info("x")
    (record,) = read_records(tmp_path / "alphapulse_20241231.log")
    assert record["timestamp"] == "2024-12-31T23:59:59.999Z"


def test_day_switch_opens_the_next_file(tmp_path: Path, clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [BEFORE_MIDNIGHT]
    monkeypatch.setattr(log, "_now", lambda: clock[0])
    log.configure_logging(tmp_path, console=False)
    lg = log.get_logger("alphapulse.clock")
    lg.info("last_of_day")
    assert log.current_log_file() == tmp_path / "alphapulse_20250301.log"

    clock[0] = AFTER_MIDNIGHT
    lg.info("first_of_day")
    lg.info("second_of_day")
    assert log.current_log_file() == tmp_path / "alphapulse_20250302.log"

    day1 = read_records(tmp_path / "alphapulse_20250301.log")
    day2 = read_records(tmp_path / "alphapulse_20250302.log")
    assert [r["event"] for r in day1] == ["last_of_day"]
    assert [r["event"] for r in day2] == ["first_of_day", "second_of_day"]
    assert day2[0]["timestamp"] == "2025-03-02T00:00:00.150Z"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alphapulse_20250301.log", "alphapulse_20250302.log"]


def test_level_filter_and_bad_level(tmp_path: Path, clean_env: None) -> None:
    log.configure_logging(tmp_path, level="warning", console=False)
    lg = log.get_logger("lvl")
    lg.info("dropped")
    lg.warning("kept")
    lg.critical("kept_too")
    path = log.current_log_file()
    assert path is not None
    assert [(r["event"], r["level"]) for r in read_records(path)] == [("kept", "warning"), ("kept_too", "critical")]
    with pytest.raises(ValueError, match="unknown log level"):
        log.configure_logging(tmp_path, level="loud")


def _open_fd_targets() -> set[str]:
    targets = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return targets


def test_reconfigure_moves_to_new_dir_and_closes_old_fd(tmp_path: Path, clean_env: None) -> None:
    lg = log.get_logger("alphapulse.early")  # made before configuration, as module-level loggers are
    log.configure_logging(tmp_path / "a", console=False)
    first = log.current_log_file()
    lg.info("to_a")
    log.configure_logging(tmp_path / "b", level="DEBUG", console=False)
    second = log.current_log_file()
    lg.debug("to_b")
    assert first is not None and second is not None
    assert first.parent == tmp_path / "a" and second.parent == tmp_path / "b"
    assert [r["event"] for r in read_records(first)] == ["to_a"]
    assert [r["event"] for r in read_records(second)] == ["to_b"]
    assert str(first) not in _open_fd_targets()
    assert str(second) in _open_fd_targets()
    log.close_logging()
    assert log.current_log_file() is None
    assert str(second) not in _open_fd_targets()
    lg.info("after_close")  # must not raise, must not write
    assert [r["event"] for r in read_records(second)] == ["to_b"]


# ----------------------------------------------------------------------------------------------------
# Crash repair
# ----------------------------------------------------------------------------------------------------


def test_torn_tail_is_cut_on_start(tmp_path: Path, clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(log, "_now", lambda: BEFORE_MIDNIGHT)
    path = tmp_path / "alphapulse_20250301.log"
    good = b'{"timestamp":"2025-03-01T10:00:00.000Z","level":"info","logger":"x","event":"before_crash"}\n'
    torn = b'{"timestamp":"2025-03-01T10:00:01.000Z","level":"info","logg'
    path.write_bytes(good + torn)

    log.configure_logging(tmp_path, console=False)
    log.get_logger("alphapulse.daemon").info("after_restart")

    raw = path.read_bytes()
    assert raw.startswith(good)
    assert torn not in raw
    records = read_records(path)
    assert [r["event"] for r in records] == ["before_crash", "log_tail_repaired", "after_restart"]
    assert records[1]["removed_bytes"] == len(torn)
    assert records[1]["level"] == "warning"


def test_file_that_is_all_torn_is_emptied(tmp_path: Path, clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(log, "_now", lambda: BEFORE_MIDNIGHT)
    path = tmp_path / "alphapulse_20250301.log"
    path.write_bytes(b"x" * 70_000)  # longer than one 64 KiB read-back chunk, no newline at all
    log.configure_logging(tmp_path, console=False)
    records = read_records(path)
    assert [r["event"] for r in records] == ["log_tail_repaired"]
    assert records[0]["removed_bytes"] == 70_000


CHILD_FLOOD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from alphapulse import log
    log._now = lambda: float(sys.argv[2])
    log.configure_logging(Path(sys.argv[1]), console=False)
    L = log.get_logger("alphapulse.flood")
    blob = "y" * int(sys.argv[3])
    print("ready", flush=True)
    i = 0
    while True:
        L.info("flood", i=i, blob=blob)
        i += 1
    """
)


@pytest.mark.parametrize("blob_size", [300, 200_000])
def test_kill_9_then_restart_leaves_only_whole_lines(tmp_path: Path, clean_env: None, blob_size: int) -> None:
    """A real process flooding the log is SIGKILLed; after the next start every line is valid JSON.

    One ``os.write`` per line means at most the *last* line can be torn (Linux checks for a fatal signal
    between page-cache pages, so a write straddling a page boundary can stop half-way, rarely for small
    lines, often for lines of many pages); the repair on start cuts it.
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD_FLOOD, str(tmp_path), str(BEFORE_MIDNIGHT), str(blob_size)],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        path = tmp_path / "alphapulse_20250301.log"
        deadline = time.monotonic() + 30
        while (not path.exists() or path.stat().st_size < 5_000_000) and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    raw = path.read_bytes()
    was_torn = not raw.endswith(b"\n")
    # Only the last line can be torn (Linux may stop even a small write() that straddles a page-cache page on
    # SIGKILL); every earlier line is whole, and the repair below removes the torn tail.
    for line in raw.split(b"\n")[:-1]:
        json.loads(line)

    log._now = lambda: BEFORE_MIDNIGHT
    try:
        log.configure_logging(tmp_path, console=False)
        log.get_logger("alphapulse.daemon").info("restarted")
    finally:
        log._now = time.time
    records = read_records(path)
    floods = [r for r in records if r["event"] == "flood"]
    assert len(floods) >= 20
    assert [r["i"] for r in floods] == list(range(len(floods)))
    assert all(len(str(r["blob"])) == blob_size for r in floods)
    assert [r["event"] for r in records[len(floods) :]] == (["log_tail_repaired"] if was_torn else []) + ["restarted"]


# ----------------------------------------------------------------------------------------------------
# Redaction
# ----------------------------------------------------------------------------------------------------

API_KEY = "wx_live_5f1e2d3c4b5a69788"
SECRET_KEY = "SeCrEt/key+with=specials&chars"
PASSPHRASE = "correct horse battery"
CONTROL_TOKEN = "ctl-7d8e9f0a1b2c3d4e"
KEY_ONLY = "value-only-hidden-by-its-key-name"


def test_redaction_of_keys_and_registered_values(tmp_path: Path, clean_env: None) -> None:
    log.configure_logging(tmp_path, console=False)
    log.register_secrets([API_KEY, SECRET_KEY, PASSPHRASE, CONTROL_TOKEN, None, "short"])
    lg = log.get_logger("alphapulse.exchange")
    headers = {"ACCESS-KEY": KEY_ONLY, "ACCESS-SIGN": KEY_ONLY, "ACCESS-PASSPHRASE": KEY_ONLY, "Accept": "json"}
    nested = {
        "request": {"headers": headers, "url": f"https://api.example/v1?apiKey={API_KEY}"},
        "call": {"Authorization": f"Bearer {CONTROL_TOKEN}"},
        "list": [f"prefix {PASSPHRASE} suffix", {"Secret_Key": KEY_ONLY}],
    }
    lg.info(f"connecting with key {API_KEY} and passphrase {PASSPHRASE}", context=nested, signal="long")
    lg.info("creds", api_key=KEY_ONLY, API_SECRET=KEY_ONLY, password=KEY_ONLY, control_token=KEY_ONLY)
    lg.info(
        "encoded",
        query="sign=" + SECRET_KEY.replace("/", "%2F").replace("+", "%2B").replace("=", "%3D").replace("&", "%26"),
    )
    lg.info("shortish", text="a short value stays visible")
    try:
        try:
            raise ConnectionError(f"401 for key {API_KEY}")
        except ConnectionError as inner:
            raise RuntimeError(f"login failed, secret={SECRET_KEY}") from inner
    except RuntimeError:
        lg.exception("login_failed")

    path = log.current_log_file()
    assert path is not None
    raw = path.read_text()
    for secret in (API_KEY, SECRET_KEY, PASSPHRASE, CONTROL_TOKEN, KEY_ONLY, "SeCrEt%2Fkey"):
        assert secret not in raw, f"{secret!r} leaked into the log file"
    assert "short value" in raw  # values under 6 chars are not registered
    records = read_records(path)
    first = records[0]
    assert first["event"] == "connecting with key *** and passphrase ***"
    ctx = first["context"]
    assert isinstance(ctx, dict)
    assert ctx["request"]["headers"] == {
        "ACCESS-KEY": "***",
        "ACCESS-SIGN": "***",
        "ACCESS-PASSPHRASE": "***",
        "Accept": "json",
    }
    assert ctx["request"]["url"] == "https://api.example/v1?apiKey=***"
    assert ctx["call"] == {"Authorization": "***"}
    assert ctx["list"] == ["prefix *** suffix", {"Secret_Key": "***"}]
    assert first["signal"] == "long"  # "signal" is not "sign"
    assert headers["ACCESS-KEY"] == KEY_ONLY  # the caller's own dict is left alone
    assert {k: records[1][k] for k in ("api_key", "API_SECRET", "password", "control_token")} == dict.fromkeys(
        ("api_key", "API_SECRET", "password", "control_token"), "***"
    )
    assert records[2]["query"] == "sign=***"
    exc = records[-1]
    assert exc["level"] == "error"
    text = str(exc["exception"])
    assert "Traceback (most recent call last)" in text
    assert "RuntimeError: login failed, secret=***" in text
    assert "ConnectionError: 401 for key ***" in text


def test_numpy_values_and_secret_dict_keys(tmp_path: Path, clean_env: None) -> None:
    """Policy features arrive as numpy; they must stay numbers in JSON, and a secret used as a key is masked."""
    import numpy as np

    log.configure_logging(tmp_path, console=False)
    log.register_secrets([CONTROL_TOKEN])
    close = np.float64(first_candle().close)
    log.get_logger("alphapulse.policy").info(
        "decision",
        prob=np.float32(0.25),
        action=np.int64(2),
        obs=np.array([1.5, close]),
        big=np.zeros(10_000),
        sessions={CONTROL_TOKEN: "operator"},
    )
    path = log.current_log_file()
    assert path is not None
    (record,) = read_records(path)
    assert record["prob"] == 0.25 and record["action"] == 2
    assert record["obs"] == [1.5, float(close)]
    assert record["big"] == "<ndarray shape=(10000,) dtype=float64>"
    assert record["sessions"] == {"***": "operator"}


def test_values_shorter_than_six_are_ignored(tmp_path: Path, clean_env: None) -> None:
    log.configure_logging(tmp_path, console=False)
    log.register_secrets(["abcde"])
    log.get_logger("x").info("abcde stays")
    path = log.current_log_file()
    assert path is not None
    assert read_records(path)[0]["event"] == "abcde stays"


# ----------------------------------------------------------------------------------------------------
# Console
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("marker", [{"JOURNAL_STREAM": "8:123456"}, {"INVOCATION_ID": "0123456789abcdef"}])
def test_sd_daemon_prefixes_under_systemd(tmp_path: Path, marker: dict[str, str]) -> None:
    lines = run_console_child(tmp_path, **marker)
    by_event = {line.split(": ", 1)[1].split(" ", 1)[0]: line for line in lines}
    assert by_event["dbg_line"].startswith("<7>alphapulse.child: ")
    assert by_event["info_line"] == '<6>alphapulse.child: info_line symbol=BTCUSDT note="two words"'
    assert by_event["warn_line"] == "<4>alphapulse.child: warn_line token=***"
    assert by_event["error_line"].startswith("<3>alphapulse.child: error_line")
    assert by_event["exc_line"].startswith("<3>alphapulse.child: exc_line exc=")
    assert "RuntimeError: boom with ***" in by_event["exc_line"]
    assert by_event["stdlib_line"] == "<4>aiohttp.server: stdlib_line"
    assert by_event["multi\\nline"].startswith("<6>")  # one journal entry, not two
    assert len(lines) == 7, lines  # the traceback stays in the file: one console line per record
    for line in lines:
        assert re.match(r"^<[2-7]>", line), line
        assert ANSI not in line
        assert not re.search(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}", line), "journald adds timestamps itself"
    (file,) = (tmp_path / "logs").iterdir()
    raw = file.read_text()
    assert "Child-Secret-Token-42" not in raw
    assert "Traceback (most recent call last)" in raw


def test_plain_console_outside_systemd(tmp_path: Path) -> None:
    lines = run_console_child(tmp_path)
    assert len(lines) == 7, lines
    for line in lines:
        assert not re.match(r"^<\d>", line), line
        assert ANSI not in line, "stderr is a pipe here, so no colours"
        assert TS_RE.match(line.split(" ", 1)[0]), line
    joined = "\n".join(lines)
    assert "[info     ] info_line" in joined
    assert "[warning  ] warn_line" in joined
    assert "[error    ] exc_line" in joined
    assert "RuntimeError: boom with ***" in joined
    assert "[aiohttp.server]" in joined


# ----------------------------------------------------------------------------------------------------
# stdlib logging bridge
# ----------------------------------------------------------------------------------------------------


async def test_stdlib_warnings_and_asyncio_errors_arrive_in_the_file(tmp_path: Path, clean_env: None) -> None:
    log.configure_logging(tmp_path, console=False)
    log.register_secrets([CONTROL_TOKEN])
    logging.getLogger("aiohttp.client").warning("connection reset by peer %s (token %s)", "127.0.0.1", CONTROL_TOKEN)
    logging.getLogger("aiohttp.access").info("GET /status 200")  # below WARNING: not routed
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("old api", DeprecationWarning, stacklevel=1)

    loop = asyncio.get_running_loop()
    try:
        raise OSError(f"socket died with {CONTROL_TOKEN}")
    except OSError as exc:
        loop.call_exception_handler({"message": "Task exception was never retrieved", "exception": exc})

    path = log.current_log_file()
    assert path is not None
    assert CONTROL_TOKEN not in path.read_text()
    records = read_records(path)
    by_logger = {str(r["logger"]): r for r in records}
    assert "aiohttp.access" not in by_logger
    client = by_logger["aiohttp.client"]
    assert client["level"] == "warning"
    assert client["event"] == "connection reset by peer 127.0.0.1 (token ***)"
    assert "DeprecationWarning: old api" in str(by_logger["py.warnings"]["event"])
    task = by_logger["asyncio"]
    assert task["level"] == "error"
    assert "Task exception was never retrieved" in str(task["event"])
    assert "OSError: socket died with ***" in str(task["exception"])


# ----------------------------------------------------------------------------------------------------
# Cost
# ----------------------------------------------------------------------------------------------------


def test_info_log_costs_tens_of_microseconds(tmp_path: Path, clean_env: None) -> None:
    log.configure_logging(tmp_path, console=False)
    log.register_secrets([API_KEY, SECRET_KEY])
    lg = log.get_logger("alphapulse.bench")
    candle = first_candle()
    n = 3000
    start = time.perf_counter()
    for i in range(n):
        lg.info("bar_closed", symbol="BTCUSDT", close=candle.close, i=i)
    per_info = (time.perf_counter() - start) / n
    start = time.perf_counter()
    for i in range(n):
        lg.debug("bar_closed", symbol="BTCUSDT", close=candle.close, i=i)
    per_debug = (time.perf_counter() - start) / n
    path = log.current_log_file()
    assert path is not None
    assert len(read_records(path)) == n
    assert per_info < 150e-6, f"{per_info * 1e6:.1f} µs per info log"
    assert per_debug < 20e-6, f"{per_debug * 1e6:.1f} µs per filtered debug log"
