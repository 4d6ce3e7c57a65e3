"""``alphapulse fetch`` (the operations manual's ``weex_fetcher.py``): check the exchange, check stored data, download.

Three jobs, one asyncio loop and one :class:`~alphapulse.exchange.weex.client.WeexClient` each:

* ``--test``: can the daemon work against the configured exchange?  REST reachable (latency), clock skew, the
  symbol listed, the public WebSocket acks a SUBSCRIBE, the keys sign a read, positions and open orders are
  readable.  One line per check (``OK``/``WARN``/``FAIL``/``SKIPPED``, what, the measured value, a hint); exit 0
  when nothing failed.  Keys and signatures are never printed (every line passes :func:`log.redact_text` too).
* ``--validate``: are stored candle files and the state database sound?  Candle rows go through the daemon's own
  validator (:class:`~alphapulse.market.validate.CandleValidator`), so the reject reasons are the daemon's;
  gaps are reported but are not errors unless ``--strict``.  The store gets ``PRAGMA integrity_check``, its
  schema, a readable state row and fills that reference known orders (cash flows excepted).
* ``download``: page through ``historyKlines`` (100 rows a call; the client's token bucket keeps it polite) and
  write the shared/data candle format exactly.  Progress is saved every ``--checkpoint-s`` seconds by writing
  the whole file to a temporary name and renaming it over ``--out`` (fsync'd), so a kill at any moment leaves
  either the previous complete file or the new one, never a torn gzip.  A re-run resumes after the file's
  last bar; every candle kept passed the validator, so the file always reads with zero rejects.

Exit codes: 0 success, 1 a check failed or a runtime error, 2 usage (bad dates, unknown symbol or interval),
78 a configuration error, 130 interrupted (progress up to the last checkpoint is kept).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import signal
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import MAX_EMAX, MIN_EMIN, ROUND_HALF_EVEN, Context, Decimal
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import numpy as np
import orjson

from alphapulse.config import ConfigError, Settings, load_settings, report_config_error
from alphapulse.domain import CASH_FLOW_SIDES, TIMEFRAME_MS, Candle
from alphapulse.exchange.weex.client import HISTORY_PAGE_ROWS, WeexClient
from alphapulse.exchange.weex.errors import AuthError, TimestampError, UnknownSymbolError, WeexError
from alphapulse.log import configure_logging, redact_text
from alphapulse.market.feed import FeedError
from alphapulse.market.replay import HEADER, parse_candle_file
from alphapulse.market.validate import CandleValidator, valid_mask
from alphapulse.timeutil import parse_utc_ms

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: Clock skew above this is worth a warning; above the signature window (WEEX: 30 s) signed calls fail.
SKEW_WARN_MS, SKEW_FAIL_MS = 1_000, 30_000
WS_ACK_TIMEOUT_S = 5.0
STORE_TABLES = ("meta", "decisions", "orders", "fills", "risk_alerts", "incidents")
_EIGHT = Decimal("0.00000001")
#: Enough digits that quantizing any float's text to 8 places is exact (the default 28 fail from 1e20 up).
_WIDE = Context(prec=400, rounding=ROUND_HALF_EVEN, Emax=MAX_EMAX, Emin=MIN_EMIN)


class UsageError(Exception):
    """Bad input from the operator (dates, symbol, interval): exit 2."""


class FetchError(Exception):
    """A runtime failure stated for the operator (exchange unreachable, a damaged file): exit 1."""


def _iso(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str, flag: str) -> int:
    """ISO date or date-time (UTC when no zone given) as ms since the epoch; :class:`UsageError` otherwise."""
    try:
        return parse_utc_ms(text)
    except ValueError as e:
        raise UsageError(f"{flag}: {e}") from None


def format_number(x: float) -> str:
    """A candle number as shared/data writes it: plain decimal, rounded to 8 places, no trailing zeros.

    Exchange numbers arrive as short decimal strings and are parsed to floats by the client; ``repr`` gives back
    the shortest text of that float, which is the exchange's text for up to 15 significant digits.
    """
    d = _WIDE.normalize(_WIDE.quantize(Decimal(repr(float(x))), _EIGHT))
    if d.is_zero():
        return "0"
    return format(d, "f")


def format_row(c: Candle) -> str:
    return f"{int(c.ts)},{format_number(c.open)},{format_number(c.high)},{format_number(c.low)}," \
           f"{format_number(c.close)},{format_number(c.volume)}\n"


# --------------------------------------------------------------------------------------------------
# Output: checks as lines or JSON
# --------------------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    status: str  # OK, WARN, FAIL, SKIPPED
    value: str
    hint: str = ""
    measured: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"

    def line(self) -> str:
        text = f"{self.status:<7} {self.name:<12} {self.value}"
        if self.hint:
            text += f"  -> {self.hint}"
        return redact_text(text)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "value": redact_text(self.value),
                "hint": redact_text(self.hint), "measured": self.measured}


def _print_checks(checks: list[Check], as_json: bool, extra: dict[str, Any] | None = None) -> int:
    failed = [c for c in checks if c.failed]
    code = EXIT_FAIL if failed else EXIT_OK
    if as_json:
        payload = {"ok": not failed, "exit_code": code, "checks": [c.to_json() for c in checks], **(extra or {})}
        print(redact_text(orjson.dumps(payload).decode()))
    else:
        for c in checks:
            print(c.line())
        if failed:
            print(f"result: {len(failed)} of {len(checks)} checks FAILED ({', '.join(c.name for c in failed)})")
        else:
            warned = sum(c.status == "WARN" for c in checks)
            print("result: all checks passed" + (f" ({warned} warning{'s' * (warned != 1)})" if warned else ""))
    sys.stdout.flush()
    return code


def _err(err: BaseException) -> str:
    if isinstance(err, WeexError):
        code = f"code {err.code}: " if err.code is not None else ""
        status = f"HTTP {err.http_status} " if err.http_status is not None else ""
        return f"{status}{code}{err.msg}".strip()
    return f"{type(err).__name__}: {err}"


# --------------------------------------------------------------------------------------------------
# --test
# --------------------------------------------------------------------------------------------------


def make_client(settings: Settings, *, max_retries: int, timeout_s: float | None = None) -> WeexClient:
    return WeexClient(settings.rest_url, settings.api_key, settings.secret_key, settings.passphrase,
                      timeout_s=timeout_s or settings.exchange_timeout_s, max_retries=max_retries)


async def _check_rest(client: WeexClient, url: str) -> Check:
    t0 = time.monotonic()
    try:
        offset = await client.sync_time()
    except WeexError as exc:
        return Check("rest", "FAIL", f"{url} unreachable: {_err(exc)}",
                     "check WEEX_REST_URL, DNS, the firewall and https proxy settings",
                     {"url": url, "error": _err(exc)})
    latency = (time.monotonic() - t0) * 1000
    return Check("rest", "OK", f"{url}/capi/v3/market/time answered in {latency:.0f} ms",
                 measured={"url": url, "latency_ms": round(latency, 1), "offset_ms": offset})


def _check_clock(offset_ms: int) -> Check:
    side = "behind" if offset_ms > 0 else "ahead of"
    value = f"local clock {abs(offset_ms)} ms {side} the server"
    measured = {"skew_ms": offset_ms, "warn_ms": SKEW_WARN_MS, "fail_ms": SKEW_FAIL_MS}
    if abs(offset_ms) > SKEW_FAIL_MS:
        return Check("clock", "FAIL", value + f" (over the {SKEW_FAIL_MS // 1000} s signature window)",
                     "fix the host clock (timedatectl set-ntp true; chronyc tracking)", measured)
    if abs(offset_ms) > SKEW_WARN_MS:
        return Check("clock", "WARN", value + f" (over {SKEW_WARN_MS} ms)",
                     "the client corrects for it, but enable NTP (timedatectl set-ntp true)", measured)
    return Check("clock", "OK", value, measured=measured)


async def _check_symbol(client: WeexClient, symbol: str) -> Check:
    try:
        found = await client.exchange_info(symbol)
    except WeexError as exc:
        return Check("symbol", "FAIL", f"exchangeInfo failed: {_err(exc)}", measured={"error": _err(exc)})
    if not found:
        return Check("symbol", "FAIL", f"{symbol} is not listed on this exchange",
                     "set trading_params.yaml symbol to a listed contract (V3 names like BTCUSDT)")
    s = found[0]
    measured = {"symbol": s.symbol, "price_precision": s.price_precision, "quantity_precision": s.quantity_precision,
                "min_order_size": str(s.min_order_size), "maker_fee": str(s.maker_fee_rate),
                "taker_fee": str(s.taker_fee_rate), "max_leverage": s.max_leverage}
    return Check("symbol", "OK", f"{s.symbol} listed: price precision {s.price_precision}, quantity precision "
                 f"{s.quantity_precision}, min size {s.min_order_size}, fees maker {s.maker_fee_rate} taker "
                 f"{s.taker_fee_rate}, leverage {s.min_leverage}-{s.max_leverage}x", measured=measured)


async def _check_websocket(session: aiohttp.ClientSession, ws_base: str, symbol: str, timeframe: str) -> Check:
    url = ws_base.rstrip("/") + "/public"
    channel = f"{symbol}@kline_{timeframe}_LAST_PRICE"
    measured: dict[str, Any] = {"url": url, "channel": channel}
    t0 = time.monotonic()
    acked_ms: float | None = None
    kwargs: dict[str, Any] = {}
    if hasattr(aiohttp, "ClientWSTimeout"):  # aiohttp >= 3.10: do not wait 10 s for a dead server's close
        kwargs["timeout"] = aiohttp.ClientWSTimeout(ws_close=1.0)
    try:
        async with asyncio.timeout(WS_ACK_TIMEOUT_S):
            async with session.ws_connect(url, autoping=True, heartbeat=None, **kwargs) as ws:
                await ws.send_str(orjson.dumps({"id": "1", "method": "SUBSCRIBE", "params": [channel]}).decode())
                while acked_ms is None:
                    msg = await ws.receive()
                    if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                                    aiohttp.WSMsgType.ERROR):
                        raise ConnectionError(f"closed by the server before the ack (code {ws.close_code})")
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        continue
                    try:
                        data = orjson.loads(msg.data)
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(data, dict) and str(data.get("id")) == "1" and "result" in data:
                        if data.get("result") is not True:
                            raise ConnectionError(f"SUBSCRIBE refused: {str(data)[:200]}")
                        acked_ms = (time.monotonic() - t0) * 1000
    except TimeoutError:
        if acked_ms is None:  # a slow close after the ack is not a failure
            return Check("websocket", "FAIL", f"{url}: no SUBSCRIBE ack within {WS_ACK_TIMEOUT_S:.0f} s",
                         "check WEEX_WS_URL (base URL, '/public' is appended) and that the proxy passes "
                         "WebSockets", measured)
    except (aiohttp.ClientError, ConnectionError, OSError) as exc:
        return Check("websocket", "FAIL", f"{url}: {type(exc).__name__}: {exc}",
                     "check WEEX_WS_URL (base URL, '/public' is appended) and that the proxy passes WebSockets",
                     measured)
    assert acked_ms is not None
    measured["ack_ms"] = round(acked_ms, 1)
    return Check("websocket", "OK", f"{url} acked SUBSCRIBE {channel} in {acked_ms:.0f} ms", measured=measured)


def _credential_state(settings: Settings) -> list[str]:
    return [name for name, v in (("WEEX_API_KEY", settings.api_key), ("WEEX_SECRET_KEY", settings.secret_key),
                                 ("WEEX_PASSPHRASE", settings.passphrase)) if not v]


async def _check_credentials(client: WeexClient, settings: Settings) -> Check:
    missing = _credential_state(settings)
    if len(missing) == 3:
        return Check("credentials", "SKIPPED", "no API keys configured (paper mode and downloads do not need them)",
                     "live mode needs WEEX_API_KEY, WEEX_SECRET_KEY and WEEX_PASSPHRASE")
    if missing:
        return Check("credentials", "FAIL", f"incomplete keys: {', '.join(missing)} not set",
                     "set all three of WEEX_API_KEY, WEEX_SECRET_KEY and WEEX_PASSPHRASE")
    try:
        balances = await client.balance()
    except AuthError as exc:
        return Check("credentials", "FAIL", f"signed read of account/balance rejected: {_err(exc)}",
                     "check the key, secret and passphrase (a contract API key, not a spot one) and the key's "
                     "IP whitelist", {"error_code": exc.code})
    except TimestampError as exc:
        return Check("credentials", "FAIL", f"signed read rejected for its timestamp: {_err(exc)}",
                     "fix the host clock (NTP)", {"error_code": exc.code})
    except WeexError as exc:
        return Check("credentials", "FAIL", f"signed read of account/balance failed: {_err(exc)}",
                     measured={"error_code": exc.code})
    assets = {b.asset: b for b in balances}
    shown = ", ".join(f"{b.asset} available {b.available}" for b in list(assets.values())[:3]) or "no assets"
    return Check("credentials", "OK", f"signed read of account/balance accepted ({shown})",
                 measured={"assets": sorted(assets)})


async def _check_permissions(client: WeexClient, symbol: str) -> Check:
    try:
        positions = await client.positions()
        orders = await client.open_orders(symbol)
    except WeexError as exc:
        return Check("permissions", "FAIL", f"signed reads of positions/open orders failed: {_err(exc)}",
                     "the key needs read permission on contract positions and orders", {"error_code": exc.code})
    extra = ""
    measured: dict[str, Any] = {"positions": len(positions), "open_orders": len(orders)}
    try:
        rate = await client.commission_rate(symbol)
        extra = f", commission rate maker {rate.maker} taker {rate.taker}"
        measured.update(maker=str(rate.maker), taker=str(rate.taker))
    except WeexError as exc:
        extra = f", commissionRate not readable ({_err(exc)})"
    return Check("permissions", "OK", f"read {len(positions)} positions and {len(orders)} open {symbol} orders{extra}",
                 "order permission is not tested (that needs a real order): the daemon's first order proves it",
                 measured)


async def run_test(settings: Settings) -> list[Check]:
    """Every check of ``--test``, in order; later checks are SKIPPED when the REST API is unreachable."""
    client = make_client(settings, max_retries=1, timeout_s=min(settings.exchange_timeout_s, 5.0))
    checks: list[Check] = []
    try:
        await client.start()
        rest = await _check_rest(client, settings.rest_url)
        checks.append(rest)
        if rest.failed:
            for name in ("clock", "symbol"):
                checks.append(Check(name, "SKIPPED", "REST API unreachable"))
        else:
            checks.append(_check_clock(int(rest.measured["offset_ms"])))
            checks.append(await _check_symbol(client, settings.symbol))
        checks.append(await _check_websocket(client.session, settings.ws_url, settings.symbol, settings.timeframe))
        if rest.failed:
            skipped = "REST API unreachable"
            checks.append(Check("credentials", "SKIPPED", skipped))
            checks.append(Check("permissions", "SKIPPED", skipped))
        else:
            cred = await _check_credentials(client, settings)
            checks.append(cred)
            if cred.status == "OK":
                checks.append(await _check_permissions(client, settings.symbol))
            else:
                checks.append(Check("permissions", "SKIPPED", "needs working credentials"))
    finally:
        await client.close()
    return checks


# --------------------------------------------------------------------------------------------------
# --validate
# --------------------------------------------------------------------------------------------------


@dataclass
class CandleReport:
    rows: int = 0
    malformed_lines: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    gaps: int = 0
    missing_bars: int = 0
    longest_gap_bars: int = 0
    longest_gap_after_ts: int | None = None
    first_ts: int | None = None
    last_ts: int | None = None

    @property
    def bad(self) -> int:
        return self.malformed_lines + sum(self.rejected.values())


def scan_candles(columns: dict[str, np.ndarray], bar_ms: int, malformed_lines: int = 0) -> CandleReport:
    """Counts by the validator's reject reasons, and the gaps between accepted candles.

    The clean case (every row accepted, as in every shipped file) is vectorised; otherwise rows go through
    :class:`CandleValidator` one by one, which is the daemon's own gate, so the reasons are its reasons.
    """
    ts = np.asarray(columns["ts"], dtype=np.int64)
    rep = CandleReport(rows=len(ts), malformed_lines=malformed_lines)
    mask = valid_mask(columns, bar_ms)
    if mask.all():
        accepted = ts
    else:
        validator = CandleValidator(bar_ms)
        cols = [columns[k].tolist() for k in ("open", "high", "low", "close", "volume")]
        for i, t in enumerate(ts.tolist()):
            validator.check(Candle(t, cols[0][i], cols[1][i], cols[2][i], cols[3][i], cols[4][i]))
        rep.rejected = validator.rejected
        accepted = ts[mask]
    if len(accepted):
        rep.first_ts, rep.last_ts = int(accepted[0]), int(accepted[-1])
        missing = np.diff(accepted) // bar_ms - 1
        holes = missing > 0
        rep.gaps = int(np.count_nonzero(holes))
        if rep.gaps:
            rep.missing_bars = int(missing[holes].sum())
            i = int(np.argmax(missing))
            rep.longest_gap_bars, rep.longest_gap_after_ts = int(missing[i]), int(accepted[i])
    return rep


def _infer_interval(path: Path, ts: np.ndarray, given: str | None) -> str:
    if given:
        return given
    from alphapulse.backtest import BacktestError, infer_market

    try:
        return infer_market(path, ts)[1]
    except BacktestError as exc:
        raise FetchError(f"{exc}; pass --interval") from None


def validate_file(path: Path, interval: str | None, strict: bool) -> Check:
    name = f"data {path.name}"
    try:
        parsed = parse_candle_file(path)
        tf = _infer_interval(path, parsed.columns["ts"], interval)
    except (FeedError, FetchError) as exc:
        return Check(name, "FAIL", str(exc), measured={"path": str(path)})
    rep = scan_candles(parsed.columns, TIMEFRAME_MS[tf], parsed.malformed_lines)
    measured: dict[str, Any] = {"path": str(path), "interval": tf, "rows": rep.rows,
                                "malformed_lines": rep.malformed_lines, "rejected": dict(rep.rejected),
                                "gaps": rep.gaps, "missing_bars": rep.missing_bars,
                                "longest_gap_bars": rep.longest_gap_bars, "first_ts": rep.first_ts,
                                "last_ts": rep.last_ts}
    span = (f"{_iso(rep.first_ts)} -> {_iso(rep.last_ts)}" if rep.first_ts is not None and rep.last_ts is not None
            else "no valid rows")
    parts = [f"{rep.rows} rows {tf}, {span}"]
    if rep.gaps:
        assert rep.longest_gap_after_ts is not None
        parts.append(f"{rep.gaps} gaps ({rep.missing_bars} missing bars, longest {rep.longest_gap_bars} after "
                     f"{_iso(rep.longest_gap_after_ts)})")
    else:
        parts.append("no gaps")
    if rep.bad:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(rep.rejected.items()))
        if rep.malformed_lines:
            reasons = (reasons + ", " if reasons else "") + f"malformed lines {rep.malformed_lines}"
        parts.append(f"rejected: {reasons}")
        return Check(name, "FAIL", "; ".join(parts), "the daemon would drop these rows; re-download the range "
                     "(alphapulse fetch download ...) or fix the file", measured)
    if rep.gaps and strict:
        return Check(name, "FAIL", "; ".join(parts), "gaps fail under --strict", measured)
    if rep.rows == 0:
        return Check(name, "WARN", "; ".join(parts), "the file holds no candles", measured)
    return Check(name, "OK", "; ".join(parts), measured=measured)


def validate_store(data_dir: Path, explicit: bool) -> Check:
    db_path = data_dir / "alphapulse.db"
    measured: dict[str, Any] = {"path": str(db_path)}
    if not db_path.is_file():
        if explicit:
            return Check("store", "FAIL", f"no database at {db_path}", "pass the daemon's data directory "
                         "(paths.data_dir / ALPHAPULSE_DATA_DIR)", measured)
        return Check("store", "SKIPPED", f"no database at {db_path} (the daemon has not run here yet)",
                     "pass --store DIR to check another state directory", measured)
    problems: list[str] = []
    info: list[str] = []
    try:
        con = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        return Check("store", "FAIL", f"{db_path}: cannot open: {exc}", measured=measured)
    try:
        rows = [r[0] for r in con.execute("PRAGMA integrity_check")]
        if rows != ["ok"]:
            problems.append("integrity_check: " + "; ".join(str(r) for r in rows[:5]))
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        missing = [t for t in STORE_TABLES if t not in tables]
        if missing:
            problems.append(f"schema: missing tables {', '.join(missing)}")
        else:
            counts = {t: int(con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0])
                      for t in ("decisions", "orders", "fills")}
            measured.update(counts)
            info.append(f"{counts['decisions']} decisions, {counts['orders']} orders, {counts['fills']} fills")
            problems += _state_problems(con, info, measured)
            cash = ",".join(f"'{s.value}'" for s in CASH_FLOW_SIDES)
            orphans = int(con.execute(
                f"SELECT COUNT(*) FROM fills f WHERE f.side NOT IN ({cash}) AND NOT EXISTS "
                "(SELECT 1 FROM orders o WHERE o.client_order_id = f.client_order_id)").fetchone()[0])
            measured["orphan_fills"] = orphans
            if orphans:
                problems.append(f"{orphans} fills reference no known order")
    except sqlite3.DatabaseError as exc:
        problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        con.close()
    measured["problems"] = problems
    if problems:
        return Check("store", "FAIL", f"{db_path}: " + "; ".join(problems),
                     "stop the daemon, keep a copy, restore the newest backup (or start a new data_dir and let "
                     "reconciliation rebuild from the exchange)", measured)
    return Check("store", "OK", f"{db_path}: integrity ok, schema ok, " + ", ".join(info), measured=measured)


def _state_problems(con: sqlite3.Connection, info: list[str], measured: dict[str, Any]) -> list[str]:
    """The state the daemon resumes from (the meta row or the newest decision's) must parse and be complete."""
    states = []
    row = con.execute("SELECT value FROM meta WHERE key='state'").fetchone()
    if row is not None:
        states.append(("meta", row[0]))
    row = con.execute("SELECT state FROM decisions ORDER BY seq DESC LIMIT 1").fetchone()
    if row is not None:
        states.append(("decisions", row[0]))
    if not states:
        info.append("no state row yet")
        measured["state"] = None
        return []
    problems = []
    best: dict[str, Any] | None = None
    for where, text in states:
        try:
            st = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            problems.append(f"state row in {where} is not JSON ({exc})")
            continue
        if not isinstance(st, dict) or not isinstance(st.get("portfolio"), dict) or "trading_state" not in st:
            problems.append(f"state row in {where} lacks portfolio/trading_state")
            continue
        if best is None or st.get("seq", 0) > best.get("seq", 0):
            best = st
    if best is not None:
        measured["state"] = {"trading_state": best["trading_state"], "seq": best.get("seq"),
                             "last_candle_ts": best.get("last_candle_ts")}
        last = best.get("last_candle_ts")
        info.append(f"state {best['trading_state']} seq {best.get('seq')}"
                    + (f" last candle {_iso(int(last))}" if isinstance(last, int) else ""))
    return problems


def run_validate(args: argparse.Namespace, settings_loader: Callable[[], Settings]) -> int:
    checks = []
    for f in args.data or []:
        checks.append(validate_file(Path(f), args.interval, args.strict))
    if args.store is not None:
        checks.append(validate_store(Path(args.store), explicit=True))
    else:
        try:
            settings = settings_loader()
        except ConfigError as e:
            return report_config_error(e)
        checks.append(validate_store(settings.data_dir, explicit=False))
    return _print_checks(checks, args.json)


# --------------------------------------------------------------------------------------------------
# download
# --------------------------------------------------------------------------------------------------


class Progress:
    """A one-line bar on a TTY, else a plain line every ``every_s`` seconds (and at the end). On stderr."""

    def __init__(self, total: int, stream: TextIO | None = None, every_s: float = 5.0) -> None:
        self.total = max(1, total)
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = every_s
        self.t0 = time.monotonic()
        self._last = 0.0

    def update(self, done: int, rows: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last < (0.2 if self.tty else self.every_s):
            return
        self._last = now
        frac = min(1.0, done / self.total)
        rate = done / max(1e-9, now - self.t0)
        eta = (self.total - done) / rate if rate > 0 and done < self.total else 0.0
        text = f"{frac * 100:5.1f}% {done}/{self.total} bar slots, {rows} rows, {rate:.0f} slots/s, eta {eta:.0f} s"
        if self.tty:
            width = 24
            filled = int(frac * width)
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}\x1b[K" + ("\n" if final else ""))
        else:
            self.stream.write(f"download: {text}\n")
        self.stream.flush()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit_file(out: Path, new_lines: Sequence[str], have_existing: bool) -> None:
    """Write ``out`` = its current rows + ``new_lines`` as one gzip member, via a temp file and a rename.

    The old rows are copied as text, byte for byte; the gzip header carries no name and mtime 0, so the same
    rows always give the same bytes (a resumed download equals a single one).  ``os.replace`` is atomic and
    both the file and the directory are fsync'd: a crash leaves the old file or the new one, whole.
    """
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as raw:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
                if have_existing and out.exists():
                    last = b"\n"
                    with gzip.open(out, "rb") as old:
                        while chunk := old.read(1 << 20):
                            gz.write(chunk)
                            last = chunk[-1:]
                    if last != b"\n":
                        gz.write(b"\n")
                else:
                    gz.write((",".join(HEADER) + "\n").encode())
                gz.write("".join(new_lines).encode())
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _existing_span(out: Path, bar_ms: int, interval: str) -> tuple[int, int] | None:
    """First and last bar of an existing ``--out``, after checking the whole file as the daemon would; None if it
    holds no rows.  :class:`FetchError` when it is unreadable or holds rows the validator rejects."""
    try:
        parsed = parse_candle_file(out)
    except FeedError as exc:
        raise FetchError(f"cannot resume {out}: {exc}; move it away or choose another --out") from None
    ts = parsed.columns["ts"]
    if len(ts) == 0:
        return None
    mask = valid_mask(parsed.columns, bar_ms)
    bad = parsed.malformed_lines + int(np.count_nonzero(~mask))
    if bad:
        raise FetchError(f"cannot resume {out}: {bad} rows the validator rejects for a {interval} file (see "
                         f"alphapulse fetch --validate --data {out} --interval {interval}); not appending to it")
    if len(ts) >= 3:
        step = int(np.median(np.diff(ts)))
        if step != bar_ms:
            names = {ms: tf for tf, ms in TIMEFRAME_MS.items()}
            raise FetchError(f"cannot resume {out}: its candles are {names.get(step, f'{step} ms')} apart, not "
                             f"{interval}")
    return int(ts[0]), int(ts[-1])


def _remove_stale_temps(out: Path) -> None:
    """Delete temp files a killed run left next to ``out`` (never one whose process still runs)."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
            if pid != os.getpid():
                os.kill(pid, 0)
                continue  # alive: another download into the same file is saving right now
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):
            continue
        tmp.unlink(missing_ok=True)


@dataclass
class DownloadResult:
    rows_written: int = 0
    first_ts: int | None = None
    last_ts: int | None = None
    pages: int = 0
    resumed_after: int | None = None
    rejected: Counter[str] = field(default_factory=Counter)
    gaps: int = 0
    missing_bars: int = 0
    interrupted: bool = False
    up_to_date: bool = False


async def download(settings: Settings, symbol: str, interval: str, start_ms: int | None, end_ms: int | None,
                   out: Path, *, checkpoint_s: float = 10.0, progress: bool = True,
                   client: WeexClient | None = None) -> DownloadResult:
    """Fetch closed bars with open time in ``[start_ms, end_ms)`` into ``out``, resuming after its last bar."""
    bar = TIMEFRAME_MS[interval]
    res = DownloadResult()
    _remove_stale_temps(out)
    span = _existing_span(out, bar, interval) if out.exists() else None
    existing_last = span[1] if span is not None else None
    have_existing = out.exists()
    if span is not None and start_ms is not None and start_ms < span[0] and progress:
        print(f"note: {out} starts at {_iso(span[0])}, after --from; a download only extends a file at its end "
              "(use a new --out for the earlier bars)", file=sys.stderr)
    if start_ms is None and existing_last is None:
        raise UsageError("--from is required unless --out already holds candles to continue after")
    first = -(-start_ms // bar) * bar if start_ms is not None else 0
    if existing_last is not None:
        res.resumed_after = existing_last
        first = max(first, existing_last + bar)
    own = client is None
    client = client or make_client(settings, max_retries=3)
    try:
        await client.start()
        try:
            await client.sync_time()
        except WeexError as exc:
            raise FetchError(f"cannot reach {settings.rest_url}: {_err(exc)}") from None
        listed = await client.exchange_info(symbol)
        if not listed:
            raise UsageError(f"{symbol} is not listed on {settings.rest_url}")
        now = client.now_ms()
        last = (now - bar) // bar * bar  # the newest bar that has closed
        if end_ms is not None:
            last = min(last, (end_ms - 1) // bar * bar)
        if first > last:
            res.up_to_date = True
            return res
        slots = (last - first) // bar + 1
        bar_view = Progress(slots) if progress else None
        validator = CandleValidator(bar, last_ts=existing_last)
        pending: list[str] = []
        saved_at = time.monotonic()

        def save() -> None:
            nonlocal pending, saved_at, have_existing
            if pending:
                commit_file(out, pending, have_existing)
                have_existing = True
                pending = []
            saved_at = time.monotonic()

        cursor = first
        try:
            while cursor <= last:
                page_end = min(last, cursor + HISTORY_PAGE_ROWS * bar - 1)
                try:
                    page = await client.history_klines(symbol, interval, cursor, page_end)
                except UnknownSymbolError:
                    raise UsageError(f"{symbol} is not listed on {settings.rest_url}") from None
                except WeexError as exc:
                    raise FetchError(f"historyKlines {_iso(cursor)} .. {_iso(page_end)} failed: {_err(exc)}") from None
                res.pages += 1
                for c in page:
                    if not cursor <= c.ts <= page_end or c.ts + bar > now:
                        continue  # outside the window asked for, or still forming
                    if validator.check(c) is not None:
                        continue  # counted by reason in validator.rejected
                    if validator.last_gap_bars:
                        res.gaps += 1
                        res.missing_bars += validator.last_gap_bars
                    pending.append(format_row(c))
                    res.rows_written += 1
                    res.first_ts = c.ts if res.first_ts is None else res.first_ts
                    res.last_ts = c.ts
                cursor = page_end + 1
                if bar_view is not None:
                    bar_view.update(min(slots, (cursor - first) // bar), res.rows_written)
                if time.monotonic() - saved_at >= checkpoint_s:
                    save()
        except asyncio.CancelledError:
            res.interrupted = True
            save()
            raise
        except BaseException:
            save()  # keep what was fetched before the failure: the next run continues after it
            raise
        save()
        if bar_view is not None:
            bar_view.update(slots, res.rows_written, final=True)
        res.rejected = validator.rejected
        return res
    finally:
        if own:
            await client.close()


def _download_summary(res: DownloadResult, out: Path, symbol: str, interval: str) -> dict[str, Any]:
    return {"out": str(out), "symbol": symbol, "interval": interval, "rows_written": res.rows_written,
            "first_ts": res.first_ts, "last_ts": res.last_ts, "pages": res.pages,
            "resumed_after_ts": res.resumed_after, "rejected": dict(res.rejected), "gaps": res.gaps,
            "missing_bars": res.missing_bars, "up_to_date": res.up_to_date, "interrupted": res.interrupted}


async def _download_task(settings: Settings, args: argparse.Namespace, start: int | None, end: int | None,
                         out: Path) -> DownloadResult:
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    return await download(settings, args.symbol or settings.symbol, args.interval or settings.timeframe, start, end,
                          out, checkpoint_s=args.checkpoint_s, progress=not args.quiet)


def run_download(args: argparse.Namespace, settings_loader: Callable[[], Settings]) -> int:
    interval = args.interval
    try:
        if interval is not None and interval not in TIMEFRAME_MS:
            raise UsageError(f"--interval {interval!r} is not one of {', '.join(TIMEFRAME_MS)}")
        start = parse_iso(args.start, "--from") if args.start else None
        end = parse_iso(args.end, "--to") if args.end else None
        if start is not None and end is not None and end <= start:
            raise UsageError("--to must be after --from")
    except UsageError as exc:
        print(f"alphapulse fetch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        settings = settings_loader()
    except ConfigError as e:
        return report_config_error(e)
    symbol, interval = args.symbol or settings.symbol, interval or settings.timeframe
    out = Path(args.out)
    if not out.parent.is_dir():
        print(f"alphapulse fetch: the directory of --out {out} does not exist", file=sys.stderr)
        return EXIT_USAGE
    try:
        res = asyncio.run(_download_task(settings, args, start, end, out))
    except UsageError as exc:
        print(f"alphapulse fetch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except FetchError as exc:
        print(f"alphapulse fetch: {exc}; rows fetched before the failure are saved, re-run to continue",
              file=sys.stderr)
        return EXIT_FAIL
    except (asyncio.CancelledError, KeyboardInterrupt):
        print(f"alphapulse fetch: interrupted; {out} holds every bar up to the last save, re-run the same command "
              "to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:
        print(f"alphapulse fetch: cannot write {out}: {exc}", file=sys.stderr)
        return EXIT_FAIL
    summary = _download_summary(res, out, symbol, interval)
    if args.json:
        print(orjson.dumps(summary).decode())
    elif res.up_to_date:
        print(f"{out}: already up to date ({symbol} {interval}, last bar "
              f"{_iso(res.resumed_after) if res.resumed_after is not None else 'none'})")
    else:
        span = (f"{_iso(res.first_ts)} -> {_iso(res.last_ts)}" if res.first_ts is not None and res.last_ts is not None
                else "no new bars")
        resumed = f", resumed after {_iso(res.resumed_after)}" if res.resumed_after is not None else ""
        gaps = f", {res.gaps} gaps ({res.missing_bars} missing bars)" if res.gaps else ""
        rej = ", rejected " + ", ".join(f"{k} {v}" for k, v in sorted(res.rejected.items())) if res.rejected else ""
        print(f"{out}: {res.rows_written} new {symbol} {interval} bars {span} in {res.pages} requests"
              f"{resumed}{gaps}{rej}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alphapulse fetch",
        description="check the exchange connection (--test), check stored candles and the state database "
                    "(--validate), or download candles (download ...)")
    p.add_argument("--test", action="store_true", help="check REST, clock, symbol, WebSocket, keys and permissions")
    p.add_argument("--validate", action="store_true", help="check candle files (--data) and the state database")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--data", nargs="+", metavar="FILE", help="candle files for --validate")
    p.add_argument("--store", metavar="DIR", help="state directory for --validate (default: paths.data_dir)")
    p.add_argument("--interval", help="candle interval of the --data files (default: from the file name or data)")
    p.add_argument("--strict", action="store_true", help="--validate: gaps are errors too")
    sub = p.add_subparsers(dest="action", metavar="download")
    d = sub.add_parser("download", help="download candles via historyKlines into a shared/data gzip CSV")
    d.add_argument("--symbol", help="contract, e.g. BTCUSDT (default: trading_params.yaml symbol)")
    d.add_argument("--interval", help="1m, 5m, 15m, 1h, ... (default: trading_params.yaml timeframe)",
                   default=argparse.SUPPRESS)
    d.add_argument("--from", dest="start", help="first bar, ISO date/time UTC (optional when resuming --out)")
    d.add_argument("--to", dest="end", help="end, exclusive, ISO date/time UTC (default: the last closed bar)")
    d.add_argument("--out", required=True, help="output .csv.gz; when it exists, download continues after its "
                   "last bar")
    d.add_argument("--checkpoint-s", type=float, default=10.0, help="save progress at least this often (s)")
    d.add_argument("--quiet", action="store_true", help="no progress output")
    d.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the summary as JSON")
    return p


def fetch_main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    modes = [m for m, on in (("--test", args.test), ("--validate", args.validate),
                             ("download", args.action == "download")) if on]
    if len(modes) != 1:
        p.error("choose exactly one of --test, --validate or download" if not modes else
                f"{' and '.join(modes)} cannot be combined")
    configure_logging(None, level="ERROR" if args.json else "WARNING", console=True)

    def settings_loader() -> Settings:
        return load_settings()

    if args.validate:
        return run_validate(args, settings_loader)
    if args.action == "download":
        return run_download(args, settings_loader)
    try:
        settings = settings_loader()
    except ConfigError as e:
        return report_config_error(e)
    try:
        checks = asyncio.run(run_test(settings))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    extra = {"rest_url": settings.rest_url, "ws_url": settings.ws_url, "symbol": settings.symbol,
             "mode": settings.mode}
    return _print_checks(checks, args.json, extra)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(fetch_main())
