"""``alphapulse health``: one command that says whether the trading service is fit to trade, and why not.

The manual's ``health_check.py``.  It reads the same configuration and environment as the daemon
(:func:`alphapulse.config.load_settings`), so it looks at the ports, files and model the daemon really uses.
Every check answers ``ok``, ``degraded`` (works, but someone should look) or ``failing`` (trading is at risk),
with one line of detail; the exit status is the worst of them: 0 healthy, 1 degraded, 2 failing (78 for a
configuration error, as everywhere).  ``--json`` prints one JSON object for scripts (``deploy.sh`` gates an
upgrade on the exit status).

Checks: ``service`` (systemd unit active), ``control`` (the daemon's GET /health), ``monitor`` (the monitor
service's GET /health; down is degraded, trading goes on without it), ``feed`` (last candle vs timeframe, from
/metrics), ``model`` (file present, metadata valid, timeframe matches), ``store`` (``PRAGMA integrity_check`` on
a read-only connection), ``disk`` (free space under the data and log directories), ``clock`` (skew against the
exchange's server time; live mode only, the signature window is 30 s) and ``backup`` (age of the newest backup).

The checks are independent and each is bounded by a timeout, so they run concurrently in worker threads: a
dead daemon costs one connection refusal, a hung one at most ``--timeout`` seconds, never their sum.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alphapulse.config import ConfigError, Settings, load_settings, report_config_error

OK, DEGRADED, FAILING = "ok", "degraded", "failing"
EXIT_CODES = {OK: 0, DEGRADED: 1, FAILING: 2}
OVERALL = {OK: "healthy", DEGRADED: "degraded", FAILING: "failing"}
CHECK_NAMES = ("service", "control", "monitor", "feed", "model", "store", "disk", "clock", "backup")

UNIT = "alphapulse-trading"
MONITOR_PORT_ENV = "ALPHAPULSE_MONITOR_PORT"  # alphapulse.monitor.settings.PORT_ENV
DEFAULT_MONITOR_PORT = 8081  # alphapulse.monitor.settings.DEFAULT_PORT
#: A backup older than this is degraded (the issue's rule: a daily backup may miss one day, not two).
BACKUP_MAX_AGE_S = 2 * 86_400
#: Free space: below the first figure degraded, below the second failing (SQLite cannot commit on a full disk).
DISK_DEGRADED_MB, DISK_FAILING_MB = 1024, 100
DISK_DEGRADED_PCT, DISK_FAILING_PCT = 5.0, 1.0
#: Clock skew: above 1 s worth a look; above the exchange's 30 s signature window signed calls fail.
SKEW_DEGRADED_MS, SKEW_FAILING_MS = 1_000, 30_000
STORE_FILE = "alphapulse.db"


@dataclass(frozen=True)
class CheckResult:
    """One check's verdict: ``status`` is ok, degraded or failing; ``detail`` says why, in one line."""

    name: str
    status: str
    detail: str


@dataclass(frozen=True)
class HealthOptions:
    """What the command line can change; defaults are what a production host wants."""

    timeout_s: float = 3.0
    unit: str = UNIT
    monitor_port: int = DEFAULT_MONITOR_PORT
    backup_dir: Path | None = None
    skip: frozenset[str] = frozenset()


def worst(statuses: Sequence[str]) -> str:
    """The most serious of ``statuses`` (ok when there are none)."""
    return max(statuses, key=lambda s: EXIT_CODES[s], default=OK)


# --------------------------------------------------------------------------------------------------
# HTTP to the daemon and the monitor (127.0.0.1 only)
# --------------------------------------------------------------------------------------------------


def _get_json(url: str, timeout_s: float) -> tuple[int, Any]:
    """GET ``url``; (status, parsed JSON or None).  Raises OSError (URLError) when nothing answers."""
    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


def _unreachable(e: BaseException) -> str:
    reason = getattr(e, "reason", None) or e
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason)


def check_service(opts: HealthOptions, systemd_dir: Path = Path("/run/systemd/system")) -> CheckResult:
    """``systemctl is-active``; without systemd as PID 1 (a container) the answer is unknown: degraded."""
    if not systemd_dir.is_dir() or shutil.which("systemctl") is None:
        return CheckResult("service", DEGRADED, f"unknown: systemd is not running as PID 1 here (a container?), "
                           f"so {opts.unit}.service cannot be asked; the control check below still tells "
                           "whether a daemon answers")
    try:
        proc = subprocess.run(["systemctl", "is-active", opts.unit], capture_output=True, text=True,
                              timeout=max(opts.timeout_s, 5.0), check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return CheckResult("service", DEGRADED, f"systemctl is-active {opts.unit} did not answer: {e}")
    state = proc.stdout.strip() or "unknown"
    if state == "active":
        return CheckResult("service", OK, f"{opts.unit}.service is active")
    if state in ("activating", "reloading", "deactivating"):
        return CheckResult("service", DEGRADED, f"{opts.unit}.service is {state}")
    return CheckResult("service", FAILING, f"{opts.unit}.service is {state}")


def check_control(s: Settings, opts: HealthOptions) -> CheckResult:
    """The daemon's own verdict (GET /health): 200 ok, 503 stuck (failing), nothing answering failing."""
    url = f"http://{s.control_host}:{s.control_port}/health"
    try:
        status, body = _get_json(url, opts.timeout_s)
    except (OSError, ValueError) as e:
        return CheckResult("control", FAILING, f"no daemon answers at {url}: {_unreachable(e)}")
    body = body if isinstance(body, dict) else {}
    if status != 200:
        return CheckResult("control", FAILING, f"{url} answered {status}: {body.get('problem') or body}")
    state = body.get("trading_state", "?")
    detail = f"{url} {body.get('status', '?')}, mode {body.get('mode', '?')}, trading state {state}"
    if state in ("HALTED", "EMERGENCY_STOP"):
        return CheckResult("control", DEGRADED, detail + " (an operator must resume trading)")
    return CheckResult("control", OK, detail)


def check_monitor(opts: HealthOptions) -> CheckResult:
    """The monitoring service (alphapulse-monitor): down is degraded, the daemon trades on without it."""
    url = f"http://127.0.0.1:{opts.monitor_port}/health"
    try:
        status, body = _get_json(url, opts.timeout_s)
    except (OSError, ValueError) as e:
        return CheckResult("monitor", DEGRADED, f"no monitor answers at {url}: {_unreachable(e)}")
    if status != 200:
        return CheckResult("monitor", DEGRADED, f"{url} answered {status}: {body}")
    return CheckResult("monitor", OK, f"{url} answered 200")


def _parse_iso_ms(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def check_feed(s: Settings, opts: HealthOptions, now: Callable[[], float] = time.time) -> CheckResult:
    """Is market data flowing?  Live feeds: the last processed candle's close against the wall clock.

    A replay runs on its own clock (its candles are months old by design), so there the verdict is the
    daemon's: the feed component progressing or the replay finished."""
    url = f"http://{s.control_host}:{s.control_port}/metrics"
    try:
        status, metrics = _get_json(url, opts.timeout_s)
    except (OSError, ValueError) as e:
        return CheckResult("feed", FAILING, f"cannot read {url}: {_unreachable(e)}")
    if status != 200 or not isinstance(metrics, dict):
        return CheckResult("feed", FAILING, f"{url} answered {status}")
    market = metrics.get("market") or {}
    last = market.get("last_candle")
    trading = metrics.get("trading") or {}
    timeframe = trading.get("timeframe") or s.timeframe
    from alphapulse.domain import TIMEFRAME_MS

    bar_s = TIMEFRAME_MS.get(timeframe, s.bar_ms) / 1000
    feed = market.get("feed") or {}
    if s.feed_source == "replay":
        where = f"replay, last candle {last['time'] if last else 'none yet'}"
        if feed.get("finished"):
            return CheckResult("feed", OK, f"{where}; the replay has finished (replay clock, not wall time)")
        return CheckResult("feed", OK, f"{where}; {market.get('candles_processed', 0)} candles processed "
                           "(replay clock, not wall time)")
    if not last:
        uptime = float((metrics.get("system") or {}).get("uptime_s") or 0.0)
        if uptime <= bar_s + min(bar_s / 2, 120.0):  # just (re)started: the first bar has not closed yet
            return CheckResult("feed", OK, f"started {uptime:.0f} s ago; the first {timeframe} bar since start "
                               "has not closed yet")
        return CheckResult("feed", DEGRADED, f"no {timeframe} candle processed in the {uptime:.0f} s since the "
                           "daemon started")
    lag = now() - (_parse_iso_ms(last["time"]) + bar_s)  # seconds since that bar closed
    limit_s = s.risk.max_data_age_bars * bar_s
    grace = min(bar_s / 2, 120.0)
    detail = f"last {timeframe} candle {last['time']} closed {lag:.0f} s ago"
    if lag <= bar_s + grace:
        return CheckResult("feed", OK, detail)
    if lag <= limit_s:
        return CheckResult("feed", DEGRADED, detail + f" (a bar is late; trading stops past {limit_s:.0f} s)")
    return CheckResult("feed", FAILING, detail + f" (older than {s.risk.max_data_age_bars:g} bars: no trading)")


def check_model(s: Settings) -> CheckResult:
    """The configured model file exists, its metadata passes the contract, and its timeframe is the daemon's."""
    from alphapulse.policy import ModelError, read_model_meta

    try:
        path, source = _resolve_model(s)
    except (OSError, ValueError, LookupError) as e:  # the model store's pointer unreadable or dangling
        return CheckResult("model", FAILING, f"cannot tell which model the daemon loads: {e}")
    if not path.is_file():
        return CheckResult("model", FAILING, f"model file missing: {path}")
    try:
        meta = read_model_meta(path)
    except ModelError as e:
        return CheckResult("model", FAILING, str(e))
    if meta.timeframe and meta.timeframe != s.timeframe:
        return CheckResult("model", FAILING, f"{path.name} ({meta.version}) is a {meta.timeframe} model but the "
                           f"daemon trades {s.timeframe}")
    return CheckResult("model", OK, f"{path} ({source}) version {meta.version}, {meta.timeframe}, "
                       f"{meta.n_actions} actions")


def _resolve_model(s: Settings) -> tuple[Path, str]:
    """The model file the daemon loads, as the daemon resolves it: with the versioned model store
    (alphapulse.model_store, issue 11 part 5) its active version unless the configuration pins a file;
    without it the configured file or the bundled model."""
    try:
        store = importlib.import_module("alphapulse.model_store")
    except ImportError:
        from alphapulse.policy import default_model_path

        return (s.model_path, "config") if s.model_path is not None else (default_model_path(), "bundled")
    path, source = store.resolve_model(s)
    return Path(path), str(source)


def check_store(s: Settings) -> CheckResult:
    """``PRAGMA integrity_check`` on a read-only connection: never writes, never takes the writer's lock."""
    path = s.data_dir / STORE_FILE
    if not path.is_file():
        return CheckResult("store", FAILING, f"no store at {path} (the daemon creates it at first start)")
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
        try:
            rows = [r[0] for r in con.execute("PRAGMA integrity_check(20)")]
        finally:
            con.close()
    except sqlite3.Error as e:
        return CheckResult("store", FAILING, f"{path}: {e}")
    if rows == ["ok"]:
        return CheckResult("store", OK, f"{path}: integrity_check ok")
    return CheckResult("store", FAILING, f"{path}: integrity_check found {len(rows)} problem(s): {rows[0]}")


def check_disk(s: Settings) -> CheckResult:
    """Free space on the filesystems holding the data and log directories (the smaller one counts)."""
    verdicts: list[tuple[str, str]] = []
    for label, d in (("data", s.data_dir), ("log", s.log_dir)):
        probe = d
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            usage = shutil.disk_usage(probe)
        except OSError as e:
            verdicts.append((FAILING, f"{label} dir {d}: {e.strerror or e}"))
            continue
        free_mb = usage.free / 1048576
        pct = 100.0 * usage.free / usage.total if usage.total else 0.0
        text = f"{label} dir {d}: {free_mb:,.0f} MiB free ({pct:.1f} %)"
        if free_mb < DISK_FAILING_MB or pct < DISK_FAILING_PCT:
            verdicts.append((FAILING, text))
        elif free_mb < DISK_DEGRADED_MB or pct < DISK_DEGRADED_PCT:
            verdicts.append((DEGRADED, text))
        else:
            verdicts.append((OK, text))
    return CheckResult("disk", worst([v for v, _ in verdicts]), "; ".join(t for _, t in verdicts))


async def check_clock(s: Settings, opts: HealthOptions) -> CheckResult:
    """Skew against the exchange's server time (the WEEX client's time endpoint); paper mode signs nothing."""
    if s.mode != "live":
        return CheckResult("clock", OK, "n/a: paper mode signs no exchange request, so skew does not matter")
    from alphapulse.exchange.weex.client import WeexClient
    from alphapulse.exchange.weex.errors import WeexError

    client = WeexClient(s.rest_url, None, None, None, timeout_s=opts.timeout_s, max_retries=0)
    try:
        await client.start()
        offset = await client.sync_time()
    except (TimeoutError, WeexError, OSError) as e:
        return CheckResult("clock", DEGRADED, f"cannot read the exchange's time at {s.rest_url}: {e}")
    finally:
        await client.close()
    side = "behind" if offset > 0 else "ahead of"
    detail = f"local clock {abs(offset)} ms {side} {s.rest_url}"
    if abs(offset) > SKEW_FAILING_MS:
        return CheckResult("clock", FAILING, detail + f" (over the {SKEW_FAILING_MS // 1000} s signature window)")
    if abs(offset) > SKEW_DEGRADED_MS:
        return CheckResult("clock", DEGRADED, detail + " (enable NTP: timedatectl set-ntp true)")
    return CheckResult("clock", OK, detail)


def check_backup(s: Settings, opts: HealthOptions, now: Callable[[], float] = time.time) -> CheckResult:
    """No backup, or one older than two days, is degraded: trading goes on, recovery would lose more."""
    from alphapulse.ops.backup import default_backup_dir, latest_backup_time

    directory = opts.backup_dir or default_backup_dir(s)  # where `alphapulse backup create` puts them
    try:
        t = latest_backup_time(directory)
    except OSError as e:
        return CheckResult("backup", DEGRADED, f"cannot read {directory}: {e.strerror or e}")
    if t is None:
        return CheckResult("backup", DEGRADED, f"no backup in {directory} (alphapulse backup create --type full)")
    age = now() - t
    when = datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    detail = f"newest backup in {directory} from {when} ({age / 3600:.1f} h old)"
    if age > BACKUP_MAX_AGE_S:
        return CheckResult("backup", DEGRADED, detail + f" (older than {BACKUP_MAX_AGE_S // 86400} days)")
    return CheckResult("backup", OK, detail)


# --------------------------------------------------------------------------------------------------
# Running them
# --------------------------------------------------------------------------------------------------


async def run_checks(s: Settings, opts: HealthOptions) -> list[CheckResult]:
    """Every check not skipped, concurrently (blocking ones in threads), in :data:`CHECK_NAMES` order."""
    jobs: dict[str, Any] = {
        "service": asyncio.to_thread(check_service, opts),
        "control": asyncio.to_thread(check_control, s, opts),
        "monitor": asyncio.to_thread(check_monitor, opts),
        "feed": asyncio.to_thread(check_feed, s, opts),
        "model": asyncio.to_thread(check_model, s),
        "store": asyncio.to_thread(check_store, s),
        "disk": asyncio.to_thread(check_disk, s),
        "clock": check_clock(s, opts),
        "backup": asyncio.to_thread(check_backup, s, opts),
    }
    names = [n for n in CHECK_NAMES if n not in opts.skip]
    for n in CHECK_NAMES:
        if n in opts.skip:
            jobs[n].close()  # never awaited: close the coroutine so Python does not warn
    results = await asyncio.gather(*(jobs[n] for n in names), return_exceptions=True)
    out: list[CheckResult] = []
    for name, r in zip(names, results):
        if isinstance(r, BaseException):  # a bug in a check must not hide the others' verdicts
            out.append(CheckResult(name, FAILING, f"the check itself failed: {r!r}"))
        else:
            out.append(r)
    return out


def report(results: Sequence[CheckResult], skipped: Sequence[str]) -> dict[str, Any]:
    """The ``--json`` object: overall status, exit code and every check."""
    status = worst([r.status for r in results])
    return {"status": OVERALL[status], "exit_code": EXIT_CODES[status],
            "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "checks": [asdict(r) for r in results], "skipped": list(skipped)}


def _monitor_port(env: Mapping[str, str]) -> int:
    """The monitor's port as the monitor itself reads it (``ALPHAPULSE_MONITOR_PORT``, default 8081)."""
    from alphapulse.monitor.settings import _port

    return _port(env)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alphapulse health",
        description="Is the trading service fit to trade? Checks the service, control API, monitor, feed, model, "
                    "store, disk, clock and backup with the daemon's own configuration.",
        epilog="Exit status: 0 healthy, 1 degraded, 2 failing, 78 invalid configuration.")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds each network check may take (default 3)")
    p.add_argument("--unit", default=UNIT, help=f"systemd unit of the daemon (default {UNIT})")
    p.add_argument("--monitor-port", type=int, default=None,
                   help=f"the monitor's port (default ${MONITOR_PORT_ENV}, else {DEFAULT_MONITOR_PORT})")
    p.add_argument("--backup-dir", type=Path, default=None,
                   help="where backups are (default: $ALPHAPULSE_BACKUP_DIR, else beside the data directory, "
                        "as for alphapulse backup)")
    p.add_argument("--skip", action="append", default=[], choices=CHECK_NAMES, metavar="CHECK",
                   help=f"leave a check out (repeatable): {', '.join(CHECK_NAMES)}")
    return p


def health_main(argv: Sequence[str] | None = None, config_dir: Path | None = None) -> int:
    """Entry point of ``alphapulse health``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.timeout <= 0 or args.timeout > 120:
        print(f"alphapulse health: --timeout must be in (0, 120] seconds, got {args.timeout}", file=sys.stderr)
        return 2
    if args.monitor_port is not None and not 1 <= args.monitor_port <= 65535:
        print(f"alphapulse health: --monitor-port must be 1..65535, got {args.monitor_port}", file=sys.stderr)
        return 2
    try:
        s = load_settings(config_dir)
        monitor_port = args.monitor_port or _monitor_port(os.environ)
    except ConfigError as e:
        return report_config_error(e)
    from alphapulse.log import configure_logging, register_secrets

    # stdout carries the report (one JSON object with --json): library log lines go to stderr, errors only
    configure_logging(None, "ERROR", console=True)
    register_secrets(s.secrets())
    opts = HealthOptions(timeout_s=args.timeout, unit=args.unit, monitor_port=monitor_port,
                         backup_dir=args.backup_dir, skip=frozenset(args.skip))
    results = asyncio.run(run_checks(s, opts))
    out = report(results, sorted(opts.skip))
    if args.json:
        print(json.dumps(out))
    else:
        width = max((len(r.name) for r in results), default=7)
        for r in results:
            print(f"{r.name:<{width}}  {r.status.upper():<8}  {r.detail}")
        skipped = f" (skipped: {', '.join(out['skipped'])})" if out["skipped"] else ""
        print(f"overall: {out['status']}{skipped}")
    return int(out["exit_code"])
