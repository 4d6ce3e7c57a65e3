#!/usr/bin/env python3
"""AlphaPulse-RL benchmark: tick-to-order and live decision-to-ack latency against their floors, start-up, memory.

Run with ``make bench`` (= ``.venv/bin/python scripts/bench.py``).  One run measures, on this machine:

1. **tick-to-order latency** - candle in -> order acknowledged by the paper broker *and* durably committed
   to SQLite - exactly as the daemon measures it per candle (``Daemon._run_engine``), read from the real
   daemon process's ``GET /metrics`` after a max-speed replay of >= 100,000 real candles.  The process is
   what a user runs (uvloop, control server, logging), so the number is not flattered by a lab harness.
   Median over 3 daemon runs.  One extra in-process run drives the same ``Daemon`` code path to split the
   latency into candles that produced an order and candles that did not (the process exposes only the total).
2. **the floor** - a bare loop of the same ONNX call (``Policy.decide`` on real observations) plus one
   SQLite WAL commit (``synchronous=NORMAL``, one small insert) per candle, over the same number of
   candles.  The ratio to the floor says how much the pipeline adds over what cannot be avoided.
   Median over 3 runs.
3. **start-up** - ``Popen`` to the ``READY=1`` datagram on a ``NOTIFY_SOCKET`` this script binds, as
   systemd would see it.  Median of 3, each with a fresh data directory.
4. **memory** - RSS sampled every ~0.5 s while the real daemon replays >= 500,000 candles at max speed;
   ``rss_growth_mb`` is RSS at 100 % minus RSS at 10 % of the replay (a leak of even a few bytes per
   candle shows here; the allocator's start-up growth does not).  One run (it is the long one).
5. **decision-to-acknowledgement** - a fresh ``alphapulse fake-weex`` (the bundled 5m candles, 3000x) and the
   real daemon in live mode against it on 127.0.0.1 (the 5m baseline model with a confidence threshold of
   0.3, so that it trades every few bars; the shipped config otherwise) until 300 orders are acknowledged.
   The number is the daemon's own: ``GET /metrics`` -> ``exchange.broker.decision_to_ack_us``, per order
   the time from the engine's ``broker.submit`` (inside the candle's step, so it includes the rest of the
   step, the durable commit of the intent, the broker task's wake-up, the client's limiter and signing) to
   the exchange's answer to the order's first leg.  The floor runs in the same minutes on a twin fake (same
   candles, same speed): signed ``POST /capi/v3/order`` with plain aiohttp (uvloop, one session), one each time
   that fake's WebSocket pushes a closed bar, timed from signing to the parsed answer: the daemon's situation
   (both processes just woken by the push after ~100 ms of quiet) without the daemon's work.  Measured side by
   side, a hiccup of the shared machine falls on both rather than on one (run one after the other, the ratio of
   the same code moved 0.3-3x).  Ratio = daemon p99 / floor p99 of the same run; median of 3 runs.  Then, the
   daemon stopped, the same requests on its fake back to back (a hot loop: caches warm, nothing run in between,
   about 0.5-1 ms faster than any request that follows an event) and 10 ms apart, reported, not the target.

Latency quantiles everywhere use :class:`alphapulse.metrics.LatencyHistogram` (bucket upper edges, about
4 % wide), the daemon's own estimator, so the daemon and the floor are compared like for like; the floor
also reports exact sample quantiles.

Targets (PASS/FAIL is printed, but the exit status is 0 either way: timing on a shared machine is noisy;
only a benchmark that could not run exits 1): tick-to-order p99 <= 3x floor p99 and < 1 ms, READY < 2 s,
RSS < 150 MB, RSS growth <= 5 MB, backtest >= 0.5x the bare ONNX loop, decision-to-ack p99 <= 2x the bare
signed request's p99 (sent on the same candle push).

Model: every per-candle measurement (1, 2, 4 and the backtest ratio) runs ``alphapulse/models/ppo_1h.onnx``
(:data:`BENCH_MODEL`), not the daemon's default.  The default (``gated_rule_1h.onnx``) decides once a day, so on 23
of 24 candles it would not call ONNX at all: its tick-to-order would measure a pipeline with the model left out,
and its floor (an ONNX call per candle) would no longer be the floor of the same work.  The PPO model has the same
contract and decides on every bar, which is the worst case of the pipeline and what these numbers are for.
Start-up (3) runs the default model with the shipped config, as a user starts it; the live run (5) the 5m baseline.

Data: real candles only, of the shipped config's timeframe (1h): ``BTC_USDT-1h.csv.gz`` from the project's
shared data directory (``--shared-data``, ``$BENCH_SHARED_DATA`` or ``<repo>/../shared/data``; or a file given
with ``--data``); on a machine without it, the
bundled replay file of that timeframe; either repeated time-shifted as often as needed to reach the counts
(the output says which).  A repeat is shifted by the file's span plus one bar, so timestamps stay strictly
increasing and aligned to the bar.

Output: a table on stdout (or only the JSON with ``--json``) and ``.bench/latest.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gzip
import json
import math
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import orjson

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python scripts/bench.py` from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))

from alphapulse.domain import TIMEFRAME_MS  # noqa: E402
from alphapulse.metrics import LatencyHistogram  # noqa: E402
from alphapulse.policy import MODELS_DIR  # noqa: E402
from alphapulse.store import INSERT_DECISION, SCHEMA, connect  # noqa: E402


def _shipped_timeframe() -> str:
    """The timeframe the shipped config (and so the shipped model) trades: the bench measures the product."""
    from alphapulse.config import load_settings

    return load_settings(REPO / "config", env={}).timeframe


TIMEFRAME = _shipped_timeframe()
BAR_MS = TIMEFRAME_MS[TIMEFRAME]
SHARED_NAME = f"BTC_USDT-{TIMEFRAME}.csv.gz"
BUNDLED = REPO / "alphapulse" / "data" / f"BTC_USDT_USDT-{TIMEFRAME}.csv.gz"
HEADER = "timestamp,open,high,low,close,volume"
OUT_DIR = REPO / ".bench"
SHARED_ENV = "BENCH_SHARED_DATA"  # the shared data directory, when not <repo>/../shared/data
# The model of every per-candle measurement: one that decides on every bar (see the module docstring).
BENCH_MODEL = MODELS_DIR / "ppo_1h.onnx"

FULL = {"latency": 100_000, "memory": 500_000, "reps": 3, "live_orders": 300, "live_reps": 3}
QUICK = {"latency": 20_000, "memory": 60_000, "reps": 3, "live_orders": 40, "live_reps": 1}

TARGET_RATIO = 3.0
TARGET_P99_US = 1000.0
TARGET_READY_S = 2.0
TARGET_RSS_MB = 150.0
TARGET_GROWTH_MB = 5.0
TARGET_ACK_RATIO = 2.0

# Environment that would configure the daemon behind the benchmark's back (or make it think it runs
# under systemd); the benchmark sets what it needs explicitly.
_ENV_DROP = ("ALPHAPULSE_", "TRADING_MODE", "WEEX_", "NOTIFY_SOCKET", "WATCHDOG_", "JOURNAL_STREAM",
             "INVOCATION_ID", "LISTEN_")
# Loopback only, never through a proxy configured in the environment.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))

_PR_SET_PDEATHSIG = 1


class BenchError(Exception):
    """A phase that could not produce a number (the daemon failed to start, crashed or timed out)."""


# ---- progress ----------------------------------------------------------------------------------------

_quiet = False


def note(msg: str) -> None:
    """Progress on stderr, so stdout carries only the table (or only the JSON)."""
    if not _quiet:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ---- child processes ---------------------------------------------------------------------------------

_children: list[subprocess.Popen[bytes]] = []


def _load_prctl() -> Callable[..., int] | None:
    try:
        fn: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None
    return fn


# Resolved here, not in the child: between fork and exec only the call itself should run.
_prctl = _load_prctl()


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the benchmark dies (even by SIGKILL, e.g. a test timeout).

    A max-speed daemon left behind would otherwise serve and hold its port forever.
    """
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def spawn(cmd: Sequence[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        p = subprocess.Popen(list(cmd), env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out,
                             stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    _children.append(p)
    return p


def stop(p: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
    """SIGTERM (the daemon's clean shutdown), then SIGKILL if it does not exit in time; the exit code."""
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
    if p in _children:
        _children.remove(p)
    return int(p.returncode)


def kill_children() -> None:
    for p in list(_children):
        with contextlib.suppress(Exception):
            stop(p, timeout=5.0)


def daemon_cmd() -> list[str]:
    """The console script a user runs when installed next to this interpreter, else ``python -m alphapulse``."""
    script = Path(sys.executable).parent / "alphapulse"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script), "run"]
    return [sys.executable, "-m", "alphapulse", "run"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def daemon_env(root: Path, port: int, replay: Path | None, speed: str | None,
               model: Path | None = BENCH_MODEL) -> dict[str, str]:
    """The caller's environment minus daemon settings, plus the shipped config and a private state dir; ``model``
    (default :data:`BENCH_MODEL`, which decides every bar) overrides the config's model, ``None`` keeps it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_DROP)}
    env.update({
        "ALPHAPULSE_CONFIG_DIR": str(REPO / "config"),
        "ALPHAPULSE_DATA_DIR": str(root / "data"),
        "ALPHAPULSE_LOG_DIR": str(root / "log"),
        "ALPHAPULSE_CONTROL_PORT": str(port),
        "TRADING_MODE": "paper",
        "PYTHONUNBUFFERED": "1",
        # the code of this checkout, whatever else the interpreter has installed (another checkout, editable)
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    })
    if model is not None:
        env["ALPHAPULSE_MODEL_PATH"] = str(model)
    if replay is not None:
        env["ALPHAPULSE_REPLAY_FILE"] = str(replay)
    if speed is not None:
        env["ALPHAPULSE_REPLAY_SPEED"] = speed
    return env


def http_json(port: int, path: str, timeout: float = 2.0) -> dict[str, Any] | None:
    try:
        with _HTTP.open(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            body = json.loads(r.read())
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def proc_status_mb(pid: int, key: str) -> float | None:
    """``VmRSS``/``VmHWM`` of a process from /proc, in MiB (None when gone or not Linux)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


def log_tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no output)"


# ---- data ----------------------------------------------------------------------------------------------


@dataclass
class Source:
    path: Path
    kind: str  # "shared" | "bundled" | "given"
    rows: list[str]  # data lines without the header, in file order

    @property
    def label(self) -> str:
        return f"{self.kind}: {self.path}"


def shared_dir(option: str | None) -> Path | None:
    """The project's shared data directory: ``--shared-data``, else ``$BENCH_SHARED_DATA``, else
    ``<repo>/../shared/data`` when it exists (a checkout next to the shared data), else None (a user's machine).
    A directory that was named explicitly but does not exist is an error, not a silent fallback."""
    named = option or os.environ.get(SHARED_ENV) or None
    if named is not None:
        path = Path(named).expanduser()
        if not path.is_dir():
            how = "--shared-data" if option else f"${SHARED_ENV}"
            raise BenchError(f"{how}: {path} is not a directory")
        return path
    default = REPO.parent / "shared" / "data"
    return default if default.is_dir() else None


def find_source(given: str | None, bundled_only: bool, shared: Path | None) -> Source:
    """The long real file of the shipped timeframe from the shared data when present, else the bundled replay
    file (always shipped)."""
    if given:
        path, kind = Path(given), "given"
    else:
        found = None if bundled_only or shared is None else shared / SHARED_NAME
        path, kind = (found, "shared") if found is not None and found.is_file() else (BUNDLED, "bundled")
    rows = read_rows(path)
    check_rows(path, rows)
    return Source(path, kind, rows)


def read_rows(path: Path) -> list[str]:
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="ascii") as f:
        header = f.readline().strip()
        if header != HEADER:
            raise BenchError(f"{path}: header {header!r}, expected {HEADER!r}")
        return [line for line in f.read().splitlines() if line]


def check_rows(path: Path, rows: list[str]) -> None:
    """The daemon runs the shipped config: refuse data it would reject wholesale."""
    if len(rows) < 1000:
        raise BenchError(f"{path}: only {len(rows)} rows")
    for row in (rows[0], rows[len(rows) // 2], rows[-1]):
        if int(row.split(",", 1)[0]) % BAR_MS:
            raise BenchError(f"{path}: timestamps are not aligned to {TIMEFRAME} bars; use {TIMEFRAME} candles")


def shifted_rows(rows: list[str], n: int) -> Iterator[str]:
    """``n`` rows: the last ``n`` of ``rows`` when it has enough, else all of them followed by copies
    shifted by whole spans (span + 1 bar each time), so timestamps stay strictly increasing and aligned."""
    if n <= len(rows):
        yield from rows[len(rows) - n:]
        return
    first = int(rows[0].split(",", 1)[0])
    last = int(rows[-1].split(",", 1)[0])
    span = last - first + BAR_MS
    left, k = n, 0
    while left > 0:
        chunk = rows[:left]
        if k == 0:
            yield from chunk
        else:
            shift = k * span
            for row in chunk:
                ts, rest = row.split(",", 1)
                yield f"{int(ts) + shift},{rest}"
        left -= len(chunk)
        k += 1


def write_replay(rows: list[str], n: int, dest: Path) -> int:
    """Write a plain CSV replay file of ``n`` rows (see :func:`shifted_rows`); returns the row count."""
    count = 0
    with open(dest, "w", encoding="ascii") as f:
        f.write(HEADER + "\n")
        for row in shifted_rows(rows, n):
            f.write(row + "\n")
            count += 1
    return count


def repeats_needed(available: int, n: int) -> int:
    return max(1, math.ceil(n / available))


def describe_rows(available: int, n: int) -> str:
    if n <= available:
        return f"last {n:,} rows"
    return f"all {available:,} rows + {n - available:,} time-shifted repeats"


# ---- 1. tick-to-order latency: the real daemon process ------------------------------------------------


@dataclass
class ReplayRun:
    metrics: dict[str, Any]
    samples: list[tuple[float, int, float]] = field(default_factory=list)  # (s since start, processed, rss MiB)
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    exit_code: int = 0


def replay_daemon(root: Path, replay: Path, rows: int, timeout_s: float, interval_s: float) -> ReplayRun:
    """Run the real daemon over ``replay`` at max speed and return its /metrics once every candle is through.

    The daemon runs without ``--exit-at-end`` so the final /metrics can be read without racing its exit;
    it is then stopped with SIGTERM, which must be a clean exit 0.
    """
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    out = root / "daemon.out"
    t0 = time.monotonic()
    p = spawn(daemon_cmd(), daemon_env(root, port, replay, "max"), out)
    samples: list[tuple[float, int, float]] = []
    final: dict[str, Any] | None = None
    peak = 0.0
    try:
        while final is None:
            if p.poll() is not None:
                raise BenchError(f"daemon exited with {p.returncode} during the replay:\n{log_tail(out)}")
            if time.monotonic() - t0 > timeout_s:
                raise BenchError(f"replay of {rows:,} candles did not finish in {timeout_s:.0f} s")
            m = http_json(port, "/metrics")
            rss = proc_status_mb(p.pid, "VmRSS")
            if m is not None:
                mk = m["market"]
                processed = int(mk["candles_processed"])
                rss_now = rss if rss is not None else float(m["system"]["rss_mb"])
                samples.append((time.monotonic() - t0, processed, rss_now))
                if mk["feed"]["finished"] and processed + int(mk["rejected_candles"]) >= int(mk["candles_in"]) \
                        and int(m["system"]["queue_depth"]) == 0:
                    final = m
                    break
            time.sleep(interval_s)
        wall = time.monotonic() - t0
        peak = proc_status_mb(p.pid, "VmHWM") or 0.0
    finally:
        code = stop(p)
    if code != 0:
        raise BenchError(f"daemon exited with {code} on SIGTERM (expected a clean 0):\n{log_tail(out)}")
    processed = int(final["market"]["candles_processed"])
    if processed < 0.99 * rows:
        raise BenchError(f"daemon processed {processed:,} of {rows:,} candles "
                         f"(rejected: {final['market']['rejected_by_reason']})")
    return ReplayRun(final, samples, wall, peak, code)


def latency_reps(tmp: Path, replay: Path, rows: int, reps: int) -> dict[str, Any]:
    runs = []
    for i in range(reps):
        run = replay_daemon(tmp / f"latency{i}", replay, rows, timeout_s=max(90.0, rows / 1500), interval_s=0.5)
        shutil.rmtree(tmp / f"latency{i}", ignore_errors=True)  # ~0.5 KB of state and logs per candle
        t2o = run.metrics["system"]["tick_to_order_us"]
        inf = run.metrics["model"]["inference_us"]
        runs.append({"tick_to_order_us": t2o, "inference_us": inf,
                     "candles": run.metrics["market"]["candles_processed"],
                     "orders": run.metrics["trading"]["orders"], "wall_s": round(run.wall_s, 2)})
        note(f"  daemon run {i + 1}/{reps}: p50 {t2o['p50']:.1f} us, p99 {t2o['p99']:.1f} us over "
             f"{t2o['count']:,} candles ({run.metrics['trading']['orders']} orders) in {run.wall_s:.1f} s")
    return {
        "p50": med(r["tick_to_order_us"]["p50"] for r in runs),
        "p99": med(r["tick_to_order_us"]["p99"] for r in runs),
        "mean": med(r["tick_to_order_us"]["mean"] for r in runs),
        "max": med(r["tick_to_order_us"]["max"] for r in runs),
        "worst_max": max(r["tick_to_order_us"]["max"] for r in runs),
        "inference_p50": med(r["inference_us"]["p50"] for r in runs),
        "inference_p99": med(r["inference_us"]["p99"] for r in runs),
        "candles": int(runs[0]["candles"]),
        "orders": int(runs[0]["orders"]),
        "candles_per_s": round(med(r["candles"] / r["wall_s"] for r in runs)),
        "reps": runs,
    }


def med(values: Iterator[float] | Sequence[float]) -> float:
    return round(float(statistics.median(list(values))), 2)


# ---- 1b. the same code path in-process, split by "produced an order" --------------------------------------


class SplitLatency:
    """A :class:`alphapulse.daemon.StepObserver`: the daemon's own per-candle sample (step + durable commit), filed
    under "produced an order" or not, and each stage on its own."""

    def __init__(self) -> None:
        self.all = LatencyHistogram()
        self.with_order = LatencyHistogram()
        self.no_order = LatencyHistogram()
        self.stages = {"engine_step": LatencyHistogram(), "store_commit": LatencyHistogram(),
                       "operator_files": LatencyHistogram()}

    def __call__(self, res: Any, start_ns: int, stepped_ns: int, committed_ns: int, published_ns: int) -> None:
        us = (committed_ns - start_ns) / 1000  # exactly the sample the daemon adds to tick_to_order_us
        self.all.add(us)
        (self.with_order if res.orders else self.no_order).add(us)
        st = self.stages
        st["engine_step"].add((stepped_ns - start_ns) / 1000)
        st["store_commit"].add((committed_ns - stepped_ns) / 1000)
        st["operator_files"].add((published_ns - committed_ns) / 1000)


def inprocess_split(root: Path, replay: Path) -> dict[str, Any]:
    """Run ``Daemon.run`` (its real ``_run_engine`` loop) in this process with a :class:`SplitLatency` as its public
    ``step_observer`` hook.  Console logging is off here (the JSON log file is on, as in the daemon)."""
    import uvloop

    from alphapulse.config import check_paths, load_settings
    from alphapulse.daemon import Daemon
    from alphapulse.log import close_logging, configure_logging

    env = {"ALPHAPULSE_DATA_DIR": str(root / "data"), "ALPHAPULSE_LOG_DIR": str(root / "log"),
           "ALPHAPULSE_CONTROL_PORT": str(free_port()), "ALPHAPULSE_REPLAY_FILE": str(replay),
           "ALPHAPULSE_REPLAY_SPEED": "max", "TRADING_MODE": "paper", "ALPHAPULSE_MODEL_PATH": str(BENCH_MODEL)}
    settings = load_settings(REPO / "config", env=env)
    check_paths(settings)
    configure_logging(settings.log_dir, settings.log_level, console=False)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    split = SplitLatency()

    async def main() -> int:
        return await Daemon(settings, exit_at_end=True, step_observer=split).run()

    t0 = time.monotonic()
    try:
        code = uvloop.run(main())
    finally:
        close_logging()
        for s, h in saved.items():
            signal.signal(s, h)
    if code != 0:
        raise BenchError(f"in-process daemon run exited with {code}")
    return {"all": split.all.summary(), "with_order": split.with_order.summary(),
            "without_order": split.no_order.summary(),
            "stages": {k: h.summary() for k, h in split.stages.items()}, "wall_s": round(time.monotonic() - t0, 2)}


# ---- 2. the floor -------------------------------------------------------------------------------------------


def bench_policy() -> Any:
    """:data:`BENCH_MODEL` loaded, refusing a model that would not make these numbers mean what they say: one that
    skips bars (its tick-to-order would leave ONNX out) or reads other features than the observations built here."""
    from alphapulse.policy import Policy

    policy = Policy.load(BENCH_MODEL)
    meta = policy.meta
    if meta.decision_every_bars != 1 or meta.feature_set_name != "short_v1" or meta.timeframe != TIMEFRAME:
        raise BenchError(f"{BENCH_MODEL.name}: the bench needs a {TIMEFRAME} short_v1 model deciding every bar, "
                         f"got {meta.timeframe} {meta.feature_set_name} every {meta.decision_every_bars} bars")
    return policy


def observations(rows: list[str], n: int) -> list[list[float]]:
    """Real model inputs: :data:`BENCH_MODEL`'s feature set (``short_v1``, checked in :func:`bench_policy`) over the
    same candles (flat, no position)."""
    from alphapulse.domain import Candle
    from alphapulse.features import StreamingFeatures, observation

    feats = StreamingFeatures()
    out: list[list[float]] = []
    for row in shifted_rows(rows, n):
        ts, o, h, lo, c, v = row.split(",")
        market = feats.update(Candle(int(ts), float(o), float(h), float(lo), float(c), float(v)))
        if market is not None:
            out.append(observation(market, 0.0, 0.0))
    return out


def floor_state() -> str:
    """The state snapshot the daemon stores with each decision (a fresh engine's, as JSON)."""
    from decimal import Decimal

    from alphapulse.portfolio import Portfolio

    snap = {"portfolio": Portfolio.new("BTCUSDT", Decimal(10_000)).snapshot(), "trading_state": "ACTIVE",
            "state_reason": "", "last_candle_ts": 1_735_603_200_000, "equity": "10000.00000000", "seq": 1}
    return orjson.dumps(snap).decode()


def floor_once(db_path: Path, obs: list[list[float]], n: int) -> dict[str, Any]:
    """``n`` x (the daemon's ONNX call + one SQLite WAL commit of the row the daemon commits), each timed.

    Checkpoints run every 10,000 commits outside the timed section, as the daemon runs them off the hot
    path (in a thread); automatic checkpoints are off, as in the daemon's store.
    """
    import numpy as np

    policy = bench_policy()  # the daemon runs' model (daemon_env), so the ratio compares like with like
    policy.warmup(200)  # the shipped config's model.warmup_runs; also picks the faster binding
    db = connect(db_path)  # the daemon's writing connection: WAL, synchronous=NORMAL, no automatic checkpoints
    try:
        db.executescript(SCHEMA)  # the daemon's own tables: the floor commits the row the daemon commits
        hist = LatencyHistogram()
        raw = np.empty(n, dtype=np.float64)
        perf = time.perf_counter_ns
        execute = db.execute
        decide = policy.decide
        insert = INSERT_DECISION
        dumps = orjson.dumps
        state = floor_state()
        m = len(obs)
        for i in range(n):
            x = obs[i % m]
            ts = i * BAR_MS
            t0 = perf()
            d = decide(x, ts, "BTCUSDT")
            execute(insert, (ts, "BTCUSDT", ts, dumps(d.probabilities).decode(), d.action, d.target, d.confidence, 0,
                             "below_confidence_threshold", None, d.inference_us, "10000", "0", i, state))
            us = (perf() - t0) / 1000
            hist.add(us)
            raw[i] = us
            if i % 10_000 == 9_999:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    s = hist.summary()
    s["exact_p50"] = round(float(np.percentile(raw, 50)), 2)
    s["exact_p99"] = round(float(np.percentile(raw, 99)), 2)
    return s


def floor_reps(tmp: Path, rows: list[str], n: int, reps: int) -> dict[str, Any]:
    obs = observations(rows, n)
    runs = []
    for i in range(reps):
        db = tmp / f"floor{i}.db"
        s = floor_once(db, obs, n)
        for suffix in ("", "-wal", "-shm"):
            Path(str(db) + suffix).unlink(missing_ok=True)
        runs.append(s)
        note(f"  floor run {i + 1}/{reps}: p50 {s['p50']:.1f} us, p99 {s['p99']:.1f} us over {s['count']:,} candles")
    return {"p50": med(r["p50"] for r in runs), "p99": med(r["p99"] for r in runs),
            "exact_p50": med(r["exact_p50"] for r in runs), "exact_p99": med(r["exact_p99"] for r in runs),
            "candles": n, "reps": runs}


# ---- 3. start-up to READY ---------------------------------------------------------------------------------


def ready_once(root: Path, timeout_s: float = 30.0) -> float:
    """Seconds from ``Popen`` to the READY=1 datagram, with the shipped config and bundled replay."""
    root.mkdir(parents=True, exist_ok=True)
    sock_path = root / "notify.sock"
    out = root / "daemon.out"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        env = daemon_env(root, free_port(), None, None, model=None)  # the default model, as a user starts it
        env["NOTIFY_SOCKET"] = str(sock_path)
        t0 = time.perf_counter()
        p = spawn(daemon_cmd(), env, out)
        try:
            deadline = t0 + timeout_s
            while True:
                left = deadline - time.perf_counter()
                if left <= 0:
                    raise BenchError(f"no READY=1 within {timeout_s:.0f} s:\n{log_tail(out)}")
                sock.settimeout(min(left, 0.5))
                try:
                    msg = sock.recv(4096)
                except TimeoutError:
                    if p.poll() is not None:
                        raise BenchError(f"daemon exited with {p.returncode} before READY:\n{log_tail(out)}") \
                            from None
                    continue
                if b"READY=1" in msg.split(b"\n"):
                    elapsed = time.perf_counter() - t0
                    break
        finally:
            code = stop(p)
    if code != 0:
        raise BenchError(f"daemon exited with {code} on SIGTERM after READY:\n{log_tail(out)}")
    return elapsed


def ready_reps(tmp: Path, reps: int) -> dict[str, Any]:
    values = []
    for i in range(reps):
        root = tmp / f"ready{i}"
        values.append(ready_once(root))
        shutil.rmtree(root, ignore_errors=True)
        note(f"  start {i + 1}/{reps}: READY after {values[-1]:.3f} s")
    return {"median": round(statistics.median(values), 3), "reps": [round(v, 3) for v in values]}


# ---- 4. memory -----------------------------------------------------------------------------------------------


def rss_at(samples: list[tuple[float, int, float]], candles: float) -> tuple[float, float]:
    """RSS when ``candles`` had been processed, interpolated between the bracketing samples.

    Returns (rss MiB, candles actually used): the first sample past the point when none precedes it.
    """
    prev: tuple[float, int, float] | None = None
    for s in samples:
        if s[1] >= candles:
            if prev is None or s[1] == prev[1]:
                return s[2], float(s[1])
            frac = (candles - prev[1]) / (s[1] - prev[1])
            return prev[2] + frac * (s[2] - prev[2]), candles
        prev = s
    last = samples[-1]
    return last[2], float(last[1])


def memory_run(tmp: Path, replay: Path, rows: int) -> dict[str, Any]:
    root = tmp / "memory"
    try:
        run = replay_daemon(root, replay, rows, timeout_s=max(120.0, rows / 1500), interval_s=0.5)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    samples = [s for s in run.samples if s[1] > 0] or run.samples
    total = int(run.metrics["market"]["candles_processed"])
    end_rss = samples[-1][2]
    at10, at10_candles = rss_at(samples, 0.10 * total)
    return {
        "rss_mb": round(end_rss, 2),
        "rss_at_10pct_mb": round(at10, 2),
        "rss_10pct_at_candles": int(at10_candles),
        "rss_growth_mb": round(end_rss - at10, 2),
        "rss_peak_mb": round(run.peak_rss_mb, 2),
        "candles": total,
        "wall_s": round(run.wall_s, 2),
        "candles_per_s": round(total / run.wall_s),
        "tick_to_order_us": run.metrics["system"]["tick_to_order_us"],
        "samples": len(samples),
        "rss_curve": [[n, round(r, 2)] for _, n, r in samples[:: max(1, len(samples) // 20)]],
    }


# ---- 5. decision-to-acknowledgement: the live daemon against the fake WEEX on loopback -----------------------

# Credentials of the fake exchange (it checks them like the real one; nothing here is a secret).
FAKE_KEY, FAKE_SECRET, FAKE_PASSPHRASE = "bench-key", "bench-secret", "bench-passphrase"
FAKE_SPEED = 3000.0  # market clock x wall time: a 5m bar every 100 ms, so the daemon trades every few bars
LIVE_TIMEFRAME = "5m"  # the baseline model's: the fake replays the bundled 5m candles
# The target's floor sends each request when the fake pushes a closed bar, as the daemon does.  Back to back, the
# same request costs ~0.9-1.2 ms at p50 on this kind of machine against ~1.8 ms on the push (and ~2.6 ms 10 ms
# apart): a hot loop is not a situation the daemon is ever in, so it is reported beside the target, not used for it.
BARE_PACED_GAP_S = 0.01


def fake_cmd(port: int, data: Path) -> list[str]:
    return [sys.executable, "-m", "alphapulse", "fake-weex", "--port", str(port), "--data", str(data),
            "--timeframe", LIVE_TIMEFRAME, "--speed", str(FAKE_SPEED), "--api-key", FAKE_KEY,
            "--secret-key", FAKE_SECRET, "--passphrase", FAKE_PASSPHRASE, "--seed", "7"]


def live_config(dest: Path) -> Path:
    """The shipped configuration with the three changes a live run on the fake needs: the 5m baseline model and
    its timeframe, and a confidence threshold of 0.3 so that it trades often (as the live tests run it)."""
    import yaml

    from alphapulse.policy import baseline_model_path

    dest.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((REPO / "config" / "trading_params.yaml").read_text())
    params.update({"timeframe": LIVE_TIMEFRAME, "confidence_threshold": 0.3})
    (dest / "trading_params.yaml").write_text(yaml.safe_dump(params))
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    base.setdefault("model", {})["path"] = str(baseline_model_path())
    (dest / "config.yaml").write_text(yaml.safe_dump(base))
    return dest


def wait_http(port: int, path: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if http_json(port, path, timeout=1.0) is not None:
            return
        if proc.poll() is not None:
            what = " ".join(map(str, list(proc.args)[2:4])) if isinstance(proc.args, list) else str(proc.args)
            raise BenchError(f"{what} exited with {proc.returncode}:\n{log_tail(log)}")
        time.sleep(0.05)
    raise BenchError(f"no answer on 127.0.0.1:{port}{path} within {timeout_s:.0f} s:\n{log_tail(log)}")


def live_daemon_acks(root: Path, fake_port: int, orders: int, timeout_s: float) -> dict[str, Any]:
    """The real daemon, live against the fake, until ``orders`` orders are acknowledged; its /metrics then."""
    port = free_port()
    env = daemon_env(root, port, None, None, model=None)  # live_config names the 5m baseline
    env.update({"ALPHAPULSE_CONFIG_DIR": str(live_config(root / "config")), "TRADING_MODE": "live",
                "WEEX_API_KEY": FAKE_KEY, "WEEX_SECRET_KEY": FAKE_SECRET, "WEEX_PASSPHRASE": FAKE_PASSPHRASE,
                "WEEX_REST_URL": f"http://127.0.0.1:{fake_port}", "WEEX_WS_URL": f"ws://127.0.0.1:{fake_port}/v3/ws"})
    out = root / "daemon.out"
    t0 = time.monotonic()
    p = spawn(daemon_cmd(), env, out)
    final: dict[str, Any] | None = None
    try:
        while final is None:
            if p.poll() is not None:
                raise BenchError(f"live daemon exited with {p.returncode}:\n{log_tail(out)}")
            if time.monotonic() - t0 > timeout_s:
                raise BenchError(f"live daemon: {orders} acknowledged orders not reached in {timeout_s:.0f} s:\n"
                                 f"{log_tail(out)}")
            m = http_json(port, "/metrics")
            ex = (m or {}).get("exchange") or {}
            broker = ex.get("broker") or {}
            if int((broker.get("decision_to_ack_us") or {}).get("count", 0)) >= orders:
                final = m
                break
            # a /metrics call takes ~1-2 ms, partly on the daemon's loop: ask rarely, so it seldom lands on an order
            time.sleep(1.0)
        wall = time.monotonic() - t0
    finally:
        code = stop(p)
    if code != 0:
        raise BenchError(f"live daemon exited with {code} on SIGTERM (expected a clean 0):\n{log_tail(out)}")
    assert final is not None  # the loop above leaves only with it, or raises
    b = final["exchange"]["broker"]
    return {"decision_to_ack_us": b["decision_to_ack_us"], "decision_to_last_ack_us": b["decision_to_last_ack_us"],
            "acked_legs": b["acked"], "sent_legs": b["sent"], "rejected": b["rejected"], "errors": b["errors"],
            "recovered": b["recovered"], "client": b["client"],
            "stages_us": b.get("decision_to_ack_stages_us"), "candles": final["market"]["candles_processed"],
            "tick_to_order_us": final["system"]["tick_to_order_us"], "wall_s": round(wall, 2)}


class _BareClient:
    """Plain aiohttp on one session, no daemon code but the signing function: the floor's order sender.

    Market orders of the minimum size, opening and closing a long in turn (the closing one reduce-only, as the
    broker sends it); each timed from signing to the parsed answer."""

    def __init__(self, session: Any, port: int, prefix: str) -> None:
        self.session, self.base, self.prefix = session, f"http://127.0.0.1:{port}", prefix
        self.offset = 0
        self.tag = f"{int(time.time() * 1000) % 10**9}"
        self.hist = LatencyHistogram()
        self.raw: list[float] = []

    async def sync_time(self) -> None:
        """The client's clock sync, untimed (as the daemon's client does it at start)."""
        t0 = time.time()
        async with self.session.get(self.base + "/capi/v3/market/time") as r:
            server = int((await r.json())["serverTime"])
        self.offset = server - int((t0 + time.time()) * 500)

    async def order(self) -> None:
        from alphapulse.exchange.weex.signing import signed_headers

        i, path = len(self.raw), "/capi/v3/order"
        opening = i % 2 == 0
        body: dict[str, Any] = {"symbol": "BTCUSDT", "side": "BUY" if opening else "SELL", "quantity": "0.001",
                                "type": "MARKET", "positionSide": "LONG",
                                "newClientOrderId": f"{self.prefix}-{self.tag}-{i}"}
        if not opening:
            body["reduceOnly"] = True
        start = time.perf_counter_ns()
        text = orjson.dumps(body).decode()
        headers = signed_headers(FAKE_KEY, FAKE_SECRET, FAKE_PASSPHRASE, int(time.time() * 1000) + self.offset,
                                 "POST", path, "", text)
        async with self.session.post(self.base + path, data=text.encode(), headers=headers) as resp:
            payload = orjson.loads(await resp.read())
            status = resp.status
        us = (time.perf_counter_ns() - start) / 1000
        if status != 200 or not isinstance(payload, dict) or payload.get("success") is not True:
            raise BenchError(f"bare order {i} refused by the fake: HTTP {status} {payload!r}")
        self.hist.add(us)
        self.raw.append(us)

    def summary(self) -> dict[str, Any]:
        s: dict[str, Any] = self.hist.summary()
        s["exact_p50"] = round(float(np.percentile(self.raw, 50)), 2)
        s["exact_p99"] = round(float(np.percentile(self.raw, 99)), 2)
        return s


async def bare_orders(port: int, n: int, gap_s: float) -> dict[str, Any]:
    """``n`` bare signed ``POST /capi/v3/order``, ``gap_s`` apart (0: back to back)."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        c = _BareClient(session, port, "bb" if not gap_s else "bp")
        await c.sync_time()
        for _ in range(n):
            if gap_s:
                await asyncio.sleep(gap_s)
            await c.order()
    return c.summary()


async def bare_on_candle(port: int, channel: str, done: threading.Event, max_orders: int) -> dict[str, Any]:
    """Bare signed orders, one each time the fake's WebSocket pushes a closed bar, until ``done`` is set: the
    daemon's situation without the daemon (both processes just woken by the push, the request after ~100 ms of
    quiet), so the difference to the daemon's number is the daemon's own work.  The target's floor.

    The order goes once the push is complete (the forming bar's message follows the closed one in the same tick),
    not on the closed bar's message itself: sent at once it would queue behind the fake's second message, a wait
    the daemon, busy deciding meanwhile, seldom has, and the floor would be slower than it need be."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        c = _BareClient(session, port, "bc")
        await c.sync_time()
        ws = await session.ws_connect(f"ws://127.0.0.1:{port}/v3/ws")
        await ws.send_str(orjson.dumps({"id": "1", "method": "SUBSCRIBE", "params": [channel]}).decode())
        last_closed: int | None = None
        pending = False
        while not done.is_set() and len(c.raw) < max_orders:
            msg = await ws.receive(timeout=10.0)
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise BenchError(f"bare on-candle: the fake's stream ended ({msg.type!r})")
            data = orjson.loads(msg.data)
            if data.get("event") == "ping":
                await ws.send_str(orjson.dumps({"id": "p", "method": "PONG"}).decode())
                continue
            if data.get("e") != "kline":
                continue
            bar = data["d"][0]
            if int(bar["T"]) <= int(data["E"]):  # a closed bar
                if last_closed is None or int(bar["t"]) > last_closed:
                    last_closed, pending = int(bar["t"]), True
            elif pending:  # the forming bar: the push is complete
                pending = False
                await c.order()
        await ws.close()
    if not c.raw:
        raise BenchError("bare on-candle: no order was sent")
    return c.summary()


class FloorThread(threading.Thread):
    """:func:`bare_on_candle` on its own uvloop (the daemon's event loop) in a thread of this script, so the floor
    runs in the same minutes as the daemon: a hiccup of this shared machine then falls on both, not on one."""

    def __init__(self, port: int, channel: str, max_orders: int) -> None:
        super().__init__(name="bare-on-candle", daemon=True)
        self.port, self.channel, self.max_orders = port, channel, max_orders
        self.done = threading.Event()
        self.result: dict[str, Any] | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        import uvloop

        try:
            self.result = uvloop.run(bare_on_candle(self.port, self.channel, self.done, self.max_orders))
        except BaseException as e:  # handed to the main thread by finish()
            self.error = e

    def finish(self) -> dict[str, Any]:
        self.done.set()
        self.join(30.0)
        if self.error is not None:
            raise BenchError(f"bare on-candle floor failed: {self.error!r}") from self.error
        if self.result is None:
            raise BenchError("bare on-candle floor did not finish within 30 s")
        return self.result


def live_once(root: Path, orders: int) -> dict[str, Any]:
    """One run: two fresh fakes of the same candles; the live daemon trades on one until ``orders``
    acknowledgements while the floor (:class:`FloorThread`) trades on the other, on every closed bar, in the same
    minutes.  Then, the daemon stopped, as many bare requests on the daemon's fake back to back and 10 ms apart
    (reported, not the target)."""
    import uvloop

    from alphapulse.market.replay import default_replay_file

    root.mkdir(parents=True, exist_ok=True)
    env = daemon_env(root, free_port(), None, None)
    data = default_replay_file(LIVE_TIMEFRAME)
    fake_port, floor_port = free_port(), free_port()
    fake_log, floor_log = root / "fake.out", root / "fake-floor.out"
    fake = spawn(fake_cmd(fake_port, data), env, fake_log)
    floor_fake = spawn(fake_cmd(floor_port, data), env, floor_log)
    try:
        wait_http(fake_port, "/capi/v3/market/time", fake, fake_log, 30.0)
        wait_http(floor_port, "/capi/v3/market/time", floor_fake, floor_log, 30.0)
        floor = FloorThread(floor_port, f"BTCUSDT@kline_{LIVE_TIMEFRAME}_LAST_PRICE", max_orders=orders * 50)
        floor.start()
        try:
            daemon = live_daemon_acks(root / "daemon", fake_port, orders, timeout_s=max(120.0, orders * 1.5))
        finally:
            on_candle = floor.finish()
        n = int(daemon["decision_to_ack_us"]["count"])
        bare = uvloop.run(bare_orders(fake_port, n, 0.0))
        paced = uvloop.run(bare_orders(fake_port, n, BARE_PACED_GAP_S))
        state = http_json(fake_port, "/fake/state", timeout=10.0) or {}
    finally:
        stop(floor_fake)
        stop(fake)
    d = daemon["decision_to_ack_us"]

    def ratio(q: str, base: dict[str, Any]) -> float:
        return round(d[q] / base[q], 3) if base[q] > 0 else float("inf")

    return {"daemon": daemon, "bare_on_candle": on_candle, "bare": bare, "bare_paced": paced, "orders": n,
            "ratio_p99": ratio("p99", on_candle), "ratio_p50": ratio("p50", on_candle),
            "ratio_p99_back_to_back": ratio("p99", bare), "ratio_p50_back_to_back": ratio("p50", bare),
            "fake_orders": len(state.get("orders", []))}


def live_reps(tmp: Path, orders: int, reps: int) -> dict[str, Any]:
    runs = []
    for i in range(reps):
        r = live_once(tmp / f"live{i}", orders)
        shutil.rmtree(tmp / f"live{i}", ignore_errors=True)
        runs.append(r)
        d, c, b = r["daemon"]["decision_to_ack_us"], r["bare_on_candle"], r["bare"]
        note(f"  live run {i + 1}/{reps}: {r['orders']} orders in {r['daemon']['wall_s']:.0f} s; decision->ack "
             f"p50 {d['p50']:.0f} us, p99 {d['p99']:.0f} us; bare POST on the candle p50 {c['p50']:.0f} us, "
             f"p99 {c['p99']:.0f} us (p99 ratio {r['ratio_p99']:.2f}x); back to back p50 {b['p50']:.0f} us, "
             f"p99 {b['p99']:.0f} us ({r['ratio_p99_back_to_back']:.2f}x)")

    def m(key: str, q: str) -> float:
        return med(r["daemon"][key][q] for r in runs)

    return {
        "p50": m("decision_to_ack_us", "p50"), "p99": m("decision_to_ack_us", "p99"),
        "max": m("decision_to_ack_us", "max"),
        "last_leg_p50": m("decision_to_last_ack_us", "p50"), "last_leg_p99": m("decision_to_last_ack_us", "p99"),
        "two_leg_orders": med(r["daemon"]["acked_legs"] - r["orders"] for r in runs),
        "bare_on_candle_p50": med(r["bare_on_candle"]["p50"] for r in runs),
        "bare_on_candle_p99": med(r["bare_on_candle"]["p99"] for r in runs),
        "bare_p50": med(r["bare"]["p50"] for r in runs), "bare_p99": med(r["bare"]["p99"] for r in runs),
        "bare_exact_p50": med(r["bare"]["exact_p50"] for r in runs),
        "bare_exact_p99": med(r["bare"]["exact_p99"] for r in runs),
        "bare_paced_p50": med(r["bare_paced"]["p50"] for r in runs),
        "bare_paced_p99": med(r["bare_paced"]["p99"] for r in runs),
        "ratio_p99": med(r["ratio_p99"] for r in runs), "ratio_p50": med(r["ratio_p50"] for r in runs),
        "ratio_p99_back_to_back": med(r["ratio_p99_back_to_back"] for r in runs),
        "ratio_p50_back_to_back": med(r["ratio_p50_back_to_back"] for r in runs),
        "stages_us": {k: {q: med(r["daemon"]["stages_us"][k][q] for r in runs) for q in ("p50", "p99")}
                      for k in runs[0]["daemon"]["stages_us"] or {}},
        "orders": int(statistics.median(r["orders"] for r in runs)),
        "errors": sum(int(r["daemon"]["errors"]) for r in runs),
        "reps": runs,
    }


# ---- report -----------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import onnxruntime

    from alphapulse import __version__

    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        import uvloop
        uv = uvloop.__version__
    except ImportError:  # pragma: no cover - uvloop is a core dependency
        uv = "absent"
    return {"cores": os.cpu_count() or 0, "cpu": cpu, "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "sqlite": sqlite3.sqlite_version, "uvloop": uv,
            "platform": platform.platform(), "alphapulse": __version__}


def backtest_throughput(reps: int, quick: bool, shared: Path | None) -> dict[str, Any]:
    """Backtest candles/s (the engine's full per-candle path, no output files) against a bare loop of the same
    ONNX call (Policy.decide) over the same observations; median of ``reps`` runs each, on the bundled candles."""
    import gc

    from alphapulse.backtest import run_backtest, select
    from alphapulse.config import load_settings
    from alphapulse.domain import TIMEFRAME_MS
    from alphapulse.features import batch_market_features, observation
    from alphapulse.market.replay import default_replay_file, load_candles
    settings = load_settings(REPO / "config", env={})
    policy = bench_policy()  # a model that decides every bar, on candles of its own timeframe
    policy.warmup(200)
    tf = policy.meta.timeframe
    long_file = None if shared is None else shared / f"BTC_USDT-{tf}.csv.gz"
    source = long_file if long_file is not None and long_file.is_file() else default_replay_file(tf)
    cols = select(load_candles(source), None, None, TIMEFRAME_MS[tf])
    cols = {k: v[-(20_000 if quick else 70_000):] for k, v in cols.items()}
    n = len(cols["ts"])
    market = batch_market_features(cols["open"], cols["high"], cols["low"], cols["close"], cols["volume"])
    obs = [observation(row, 0.0, 0.0) for row in market[~np.isnan(market[:, 0])].tolist()]
    bt, loop = [], []
    for _ in range(reps):
        gc.collect()
        t0 = time.perf_counter()
        run_backtest(policy, cols, settings, symbol="BTCUSDT", timeframe=tf)
        bt.append(n / (time.perf_counter() - t0))
        decide = policy.decide
        t0 = time.perf_counter()
        for x in obs:
            decide(x, 0, "BTCUSDT")
        loop.append(len(obs) / (time.perf_counter() - t0))
    b, o = statistics.median(bt), statistics.median(loop)
    return {"backtest_candles_per_s": round(b), "onnx_loop_per_s": round(o), "ratio": round(b / o, 3),
            "candles": n, "model": policy.meta.version, "data": str(source),
            "runs_backtest": [round(x) for x in bt], "runs_onnx_loop": [round(x) for x in loop]}


def targets(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    t = r["tick_to_order_us"]["p99"]
    rows = {
        "tick_to_order_p99_vs_floor": (r["ratio_p99"], TARGET_RATIO, r["ratio_p99"] <= TARGET_RATIO, "x floor p99"),
        "tick_to_order_p99_under_1ms": (t, TARGET_P99_US, t < TARGET_P99_US, "us"),
        "ready_s": (r["ready_s"], TARGET_READY_S, r["ready_s"] < TARGET_READY_S, "s"),
        "rss_mb": (r["rss_mb"], TARGET_RSS_MB, r["rss_mb"] < TARGET_RSS_MB, "MB"),
        "rss_growth_mb": (r["rss_growth_mb"], TARGET_GROWTH_MB, r["rss_growth_mb"] <= TARGET_GROWTH_MB, "MB"),
        "backtest_vs_onnx_loop": (r["backtest"]["ratio"], 0.5, r["backtest"]["ratio"] >= 0.5, "x onnx loop rate"),
        "decision_to_ack_p99_vs_bare": (r["decision_to_ack_us"]["ratio_p99"], TARGET_ACK_RATIO,
                                        r["decision_to_ack_us"]["ratio_p99"] <= TARGET_ACK_RATIO, "x bare POST p99"),
    }
    return {k: {"value": v, "limit": lim, "unit": unit, "pass": bool(ok)} for k, (v, lim, ok, unit) in rows.items()}


def table(r: dict[str, Any]) -> str:
    t, f, m, sp = r["tick_to_order_us"], r["floor_us"], r["memory"], r.get("tick_to_order_split_us")
    tg = r["targets"]

    def verdict(key: str) -> str:
        return "PASS" if tg[key]["pass"] else "FAIL"

    lines: list[tuple[str, str, str, str]] = [
        (f"tick-to-order p50  (daemon, {r['candles']:,} candles, median of 3)", f"{t['p50']:.1f} us", "", ""),
        ("tick-to-order p99", f"{t['p99']:.1f} us", "< 1000 us", verdict("tick_to_order_p99_under_1ms")),
        ("tick-to-order max  (single worst candle, worst run)", f"{t['worst_max']:,.0f} us", "", ""),
        ("  ONNX inference p50 / p99 (inside it)", f"{t['inference_p50']:.1f} / {t['inference_p99']:.1f} us", "",
         ""),
    ]
    if sp:
        lines += [
            (f"  candles with an order ({sp['with_order']['count']:,}, in-process, 1 run) p50 / p99",
             f"{sp['with_order']['p50']:.1f} / {sp['with_order']['p99']:.1f} us", "", ""),
            (f"  candles without ({sp['without_order']['count']:,}) p50 / p99",
             f"{sp['without_order']['p50']:.1f} / {sp['without_order']['p99']:.1f} us", "", ""),
        ]
        st = sp["stages"]
        lines.append(("  worst single SQLite commit (in-process run)", f"{st['store_commit']['max']:,.0f} us", "",
                      ""))
        for q in ("p50", "p99"):
            lines.append((f"  {q} of engine step / SQLite commit / operator files",
                          " / ".join(f"{st[k][q]:.1f}" for k in ("engine_step", "store_commit", "operator_files"))
                          + " us", "", ""))
    lines += [
        ("floor p50  (ONNX call + 1 WAL commit, median of 3)", f"{f['p50']:.1f} us", "", ""),
        ("floor p99", f"{f['p99']:.1f} us", "", ""),
        ("ratio tick-to-order p99 / floor p99", f"{r['ratio_p99']:.2f}x", "<= 3x",
         verdict("tick_to_order_p99_vs_floor")),
        ("start -> READY=1  (median of 3)", f"{r['ready_s']:.3f} s", "< 2 s", verdict("ready_s")),
        (f"RSS at end of {r['memory_candles']:,}-candle replay", f"{r['rss_mb']:.1f} MB", "< 150 MB",
         verdict("rss_mb")),
        ("RSS growth 10% -> 100% of the replay", f"{r['rss_growth_mb']:+.2f} MB", "<= 5 MB", verdict("rss_growth_mb")),
        ("  peak RSS / replay throughput", f"{m['rss_peak_mb']:.1f} MB / {m['candles_per_s']:,} candles/s", "", ""),
        (f"backtest, full per-candle path ({r['backtest']['candles']:,} candles, {r['backtest']['model']}, "
         "median of 3)",
         f"{r['backtest']['backtest_candles_per_s']:,} /s", "", ""),
        ("bare ONNX loop (Policy.decide) over the same observations", f"{r['backtest']['onnx_loop_per_s']:,} /s",
         "", ""),
        ("ratio backtest / ONNX loop", f"{r['backtest']['ratio']:.2f}x", ">= 0.5x", verdict("backtest_vs_onnx_loop")),
    ]
    a = r["decision_to_ack_us"]
    runs = f"median of {len(a['reps'])}" if len(a["reps"]) > 1 else "1 run"
    lines += [
        (f"decision-to-ack p50  (live daemon vs fake WEEX, loopback, {a['orders']} orders, {runs})",
         f"{a['p50']:,.0f} us", "", ""),
        ("decision-to-ack p99", f"{a['p99']:,.0f} us", "", ""),
        ("bare signed aiohttp POST /capi/v3/order on each candle push p50 / p99  (a twin fake, same minutes)",
         f"{a['bare_on_candle_p50']:,.0f} / {a['bare_on_candle_p99']:,.0f} us", "", ""),
        ("ratio decision-to-ack p99 / bare-on-the-candle p99  (each run's own, median)", f"{a['ratio_p99']:.2f}x",
         "<= 2x", verdict("decision_to_ack_p99_vs_bare")),
        ("  bare POST back to back (a hot loop, no candle between) p50 / p99",
         f"{a['bare_p50']:,.0f} / {a['bare_p99']:,.0f} us", "", ""),
        ("  ratio decision-to-ack p99 / back-to-back p99  (not the target)",
         f"{a['ratio_p99_back_to_back']:.2f}x", "", ""),
        (f"  to the last leg's ack p50 / p99  ({a['two_leg_orders']:.0f} of the orders crossed zero: 2 legs)",
         f"{a['last_leg_p50']:,.0f} / {a['last_leg_p99']:,.0f} us", "", ""),
        ("  bare POST paced 10 ms apart (both sides idle before each) p50 / p99",
         f"{a['bare_paced_p50']:,.0f} / {a['bare_paced_p99']:,.0f} us", "", ""),
    ]
    for stage, q in a.get("stages_us", {}).items():
        lines.append((f"  daemon stage {stage.replace('_', ' ')} p50 / p99", f"{q['p50']:,.0f} / {q['p99']:,.0f} us",
                      "", ""))
    w0 = max(len(x[0]) for x in lines)
    w1 = max(len(x[1]) for x in lines)
    w2 = max(len(x[2]) for x in lines)
    mc = r["machine"]
    head = (f"AlphaPulse-RL benchmark  {r['date']}  {mc['cores']} cores ({mc['cpu'] or 'cpu?'}), "
            f"Python {mc['python']}, "
            f"onnxruntime {mc['onnxruntime']}, SQLite {mc['sqlite']}\n"
            f"data: {r['data']['description']}" + ("  [--quick]" if r["quick"] else ""))
    out = [head, "", f"{'metric':<{w0}}  {'value':>{w1}}  {'target':<{w2}}  result",
           "-" * (w0 + w1 + w2 + 12)]
    out += [f"{a:<{w0}}  {b:>{w1}}  {c:<{w2}}  {d}".rstrip() for a, b, c, d in lines]
    out.append("")
    out.append(f"{sum(v['pass'] for v in tg.values())}/{len(tg)} targets met; took {r['duration_s']:.0f} s; "
               f"wrote {r['json_path']}")
    return "\n".join(out)


# ---- main ---------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    counts = QUICK if args.quick else FULL
    n_lat, n_mem, reps = counts["latency"], counts["memory"], counts["reps"]
    started = time.monotonic()
    shared = None if args.bundled else shared_dir(args.shared_data)
    src = find_source(args.data, args.bundled, shared)
    tmp = Path(tempfile.mkdtemp(prefix="alphapulse-bench-"))
    try:
        lat_file, mem_file = tmp / "latency.csv", tmp / "memory.csv"
        n_lat = write_replay(src.rows, n_lat, lat_file)
        n_mem = write_replay(src.rows, n_mem, mem_file)
        rep_lat, rep_mem = repeats_needed(len(src.rows), n_lat), repeats_needed(len(src.rows), n_mem)
        desc = f"{src.label} ({len(src.rows):,} real {TIMEFRAME} candles)"
        if src.kind == "bundled":
            desc += (" - shared data not found (--shared-data, $BENCH_SHARED_DATA or <repo>/../shared/data), "
                     "using the bundled replay file") if not args.bundled else " (--bundled)"
        desc += f"; latency: {describe_rows(len(src.rows), n_lat)}; memory: {describe_rows(len(src.rows), n_mem)}"
        note(f"data: {desc}")

        note(f"start-up to READY ({reps} starts)")
        ready = ready_reps(tmp, reps)
        note(f"tick-to-order: real daemon, {n_lat:,} candles at max speed, {reps} runs")
        lat = latency_reps(tmp, lat_file, n_lat, reps)
        note("tick-to-order split by order / no order: the same Daemon code path in-process, 1 run")
        split: dict[str, Any] | None = None
        try:
            split = inprocess_split(tmp / "inproc", lat_file)
        finally:
            shutil.rmtree(tmp / "inproc", ignore_errors=True)
        note(f"floor: ONNX call + WAL commit, {n_lat:,} candles, {reps} runs")
        floor = floor_reps(tmp, src.rows, n_lat, reps)
        note(f"backtest throughput vs a bare ONNX loop, {reps} runs")
        bt = backtest_throughput(reps, args.quick, shared)
        note(f"  {bt['backtest_candles_per_s']:,} candles/s vs {bt['onnx_loop_per_s']:,} decisions/s "
             f"({bt['ratio']:.2f}x)")
        note(f"memory: real daemon, {n_mem:,} candles at max speed, RSS every 0.5 s")
        mem = memory_run(tmp, mem_file, n_mem)
        note(f"  RSS {mem['rss_mb']:.1f} MB at end, {mem['rss_growth_mb']:+.2f} MB since 10 %, "
             f"{mem['candles_per_s']:,} candles/s")
        n_live, live_reps_n = counts["live_orders"], counts["live_reps"]
        note(f"decision-to-ack: live daemon vs fake WEEX on loopback, {n_live} orders, then as many bare signed "
             f"POSTs, {live_reps_n} run(s)")
        live = live_reps(tmp, n_live, live_reps_n)
    finally:
        kill_children()
        shutil.rmtree(tmp, ignore_errors=True)

    result: dict[str, Any] = {
        "tick_to_order_us": lat,
        "tick_to_order_split_us": split,
        "floor_us": floor,
        "ratio_p99": round(lat["p99"] / floor["p99"], 3) if floor["p99"] > 0 else float("inf"),
        "ready_s": ready["median"],
        "ready_s_reps": ready["reps"],
        "rss_mb": mem["rss_mb"],
        "rss_growth_mb": mem["rss_growth_mb"],
        "candles": lat["candles"],
        "backtest": bt,
        "backtest_candles_per_s": bt["backtest_candles_per_s"],
        "onnx_loop_per_s": bt["onnx_loop_per_s"],
        "memory_candles": mem["candles"],
        "memory": mem,
        "decision_to_ack_us": live,
        "model": {"per_candle": BENCH_MODEL.name, "ready": "the config's default"},
        "data": {"source": str(src.path), "kind": src.kind, "rows": len(src.rows), "description": desc,
                 "latency_repeats": rep_lat, "memory_repeats": rep_mem},
        "repetitions": {"tick_to_order": reps, "floor": reps, "ready": reps, "memory": 1, "split": 1,
                        "decision_to_ack": counts["live_reps"]},
        "method": {
            "tick_to_order": "real daemon process (uvloop), ALPHAPULSE_REPLAY_SPEED=max, GET /metrics "
                             ".system.tick_to_order_us after the last candle: Engine.step + durable SQLite commit "
                             "+ operator files per candle; median over runs of each quantile",
            "floor": "Policy.decide (BENCH_MODEL, same session options) on real observations + one autocommit "
                     "INSERT in WAL mode, synchronous=NORMAL; checkpoints untimed",
            "quantiles": "alphapulse.metrics.LatencyHistogram bucket upper edges (~4 % wide), as the daemon reports",
            "ready": "Popen -> READY=1 datagram on a bound NOTIFY_SOCKET; shipped config, bundled replay, "
                     "fresh data dir",
            "memory": "VmRSS from /proc every 0.5 s with candles_processed from /metrics; growth = RSS(100 %) - "
                      "RSS(10 %), interpolated",
            "decision_to_ack": "fresh `alphapulse fake-weex` (bundled 5m candles, speed 3000) and the real daemon live "
                               "against it (5m baseline model, confidence_threshold 0.3, shipped config otherwise) "
                               "until N orders are acknowledged; GET /metrics .exchange.broker.decision_to_ack_us: "
                               "per order, Engine.step's broker.submit -> the exchange's answer to the order's first "
                               "leg, measured in the daemon (time.monotonic), its LatencyHistogram",
            "bare": "bare_on_candle_* (the target's floor): a second fake of the same candles and speed, started with "
                    "the daemon's; while the daemon trades, a thread of the benchmark (uvloop, plain aiohttp, one "
                    "session) sends a signed POST /capi/v3/order (market, min size, open/close long in turn) each "
                    "time that fake's WebSocket completes a closed-bar push, timed from signing to the parsed JSON "
                    "answer; same LatencyHistogram; ratio = daemon p99 / floor p99 of the same run, median over "
                    "runs. bare_* / bare_paced_*: then, daemon stopped, N such requests on the daemon's fake back "
                    "to back / 10 ms apart (neither is the target)",
        },
        "command": daemon_cmd(),
        "machine": machine(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017 (runs on 3.10)
        "quick": bool(args.quick),
    }
    result["targets"] = targets(result)
    result["all_targets_pass"] = all(v["pass"] for v in result["targets"].values())
    result["duration_s"] = round(time.monotonic() - started, 1)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    global _quiet
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 20k latency candles, 60k memory candles, 40 live orders in one run")
    ap.add_argument("--json", action="store_true", help="print only the JSON result")
    ap.add_argument("--data", help=f"a {TIMEFRAME} candle file to use instead of the shared {SHARED_NAME}")
    ap.add_argument("--bundled", action="store_true", help="use only the bundled replay file (as on a user's machine)")
    ap.add_argument("--shared-data", metavar="DIR",
                    help=f"the shared data directory (default: ${SHARED_ENV}, else <repo>/../shared/data if present)")
    ap.add_argument("--out", default=str(OUT_DIR / "latest.json"),
                    help="where to write the JSON (default: %(default)s)")
    args = ap.parse_args(argv)
    _quiet = args.json

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # run the finally blocks: children stopped, temp dirs removed

    signal.signal(signal.SIGTERM, on_term)
    try:
        result = run(args)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    finally:
        kill_children()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result["json_path"] = str(out)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
