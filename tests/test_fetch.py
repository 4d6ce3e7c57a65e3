"""``alphapulse fetch`` against the in-process fake WEEX on 127.0.0.1: --test, download (exact rows, resume, kill -9
mid-way, 5xx), --validate on candle files and on a real store.

The fake's clock starts at the wall clock (so its server time agrees with ours and the signature window is the
real one); at that time every bar of the bundled 1h file (2024-12-31 .. 2025-08-31) has closed, so any range of it
can be downloaded.  CLI runs are subprocesses where the process contract matters (exit codes, output, signals).
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from alphapulse.config import load_settings
from alphapulse.domain import Fill, Order, Side, StepResult
from alphapulse.exchange.weex.client import WeexClient
from alphapulse.exchange.weex.fake import FakeWeex
from alphapulse.fetch import FetchError, Progress, download, format_number, run_test, validate_file, validate_store
from alphapulse.market.replay import default_replay_file, parse_candle_file
from alphapulse.portfolio import Portfolio
from alphapulse.store import Store
from tests.daemon_harness import REPO, clean_env, free_port

pytestmark = pytest.mark.timeout(30)

SOURCE = default_replay_file("1h")
HIST = "/capi/v3/market/historyKlines"
SECRET = "fake-secret-key"
H = 3_600_000
T0 = 1_736_035_200_000  # 2025-01-05T00:00:00Z


def source_lines() -> dict[int, str]:
    with gzip.open(SOURCE, "rt") as f:
        f.readline()
        return {int(line.split(",", 1)[0]): line for line in f}


SRC = source_lines()


def expected(start: int, end: int) -> list[str]:
    return [SRC[t] for t in sorted(SRC) if start <= t < end]


def body_lines(path: Path) -> list[str]:
    with gzip.open(path, "rt") as f:
        assert f.readline() == "timestamp,open,high,low,close,volume\n"
        return f.readlines()


@pytest.fixture
async def fake() -> AsyncIterator[FakeWeex]:
    f = FakeWeex(SOURCE, symbol="BTCUSDT", timeframe="1h", speed=1.0, start_ms=int(time.time() * 1000),
                 ping_interval_s=30.0)
    await f.start()
    yield f
    await f.stop()


def env_for(fake: FakeWeex | None, tmp: Path, keys: bool = True, port: int | None = None,
            **extra: str) -> dict[str, str]:
    env = clean_env()
    base = fake.url if fake is not None else f"http://127.0.0.1:{port}"
    ws = f"ws://127.0.0.1:{fake.port if fake is not None else port}/v3/ws"
    env.update(WEEX_REST_URL=base, WEEX_WS_URL=ws, ALPHAPULSE_DATA_DIR=str(tmp / "state"),
               ALPHAPULSE_LOG_DIR=str(tmp / "log"), PYTHONPATH=str(REPO), ALPHAPULSE_CONFIG_DIR=str(tmp / "noconf"))
    (tmp / "noconf").mkdir(exist_ok=True)
    if keys:
        env.update(WEEX_API_KEY="fake-api-key", WEEX_SECRET_KEY=SECRET, WEEX_PASSPHRASE="fake-passphrase")
    env.update(extra)
    return env


async def cli(env: dict[str, str], *argv: str, timeout: float = 20.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "alphapulse", "fetch", *argv, env=env,
                                                cwd=str(REPO), stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def settings_for(fake: FakeWeex, tmp: Path, keys: bool = True) -> Any:
    return load_settings(env=env_for(fake, tmp, keys=keys))


# ---------------------------------------------------------------------------------------------------------------
# --test
# ---------------------------------------------------------------------------------------------------------------


async def test_test_passes_against_the_fake_with_the_right_keys(fake: FakeWeex, tmp_path: Path) -> None:
    code, out, err = await cli(env_for(fake, tmp_path), "--test")
    lines = out.splitlines()
    assert code == 0, out + err
    checks = lines[:-1]
    assert [line.split()[1] for line in checks] == ["rest", "clock", "symbol", "websocket", "credentials",
                                                    "permissions"]
    assert all(line.startswith("OK ") for line in checks), out
    assert "BTCUSDT listed: price precision 1, quantity precision 3, min size 0.001" in out
    assert "acked SUBSCRIBE BTCUSDT@kline_1h_LAST_PRICE" in out
    assert "order permission is not tested" in out
    assert lines[-1] == "result: all checks passed"
    # each check really went over the wire: signed reads included
    for path in ("/capi/v3/market/time", "/capi/v3/market/exchangeInfo", "/v3/ws/public", "/capi/v3/account/balance",
                 "/capi/v3/account/position/allPosition", "/capi/v3/openOrders"):
        assert fake.count("GET", path) >= 1, path
    assert SECRET not in out + err and "fake-api-key" not in out + err


async def test_test_wrong_secret_fails_on_credentials_and_never_prints_it(fake: FakeWeex, tmp_path: Path) -> None:
    wrong = "wrong-secret-value-123"
    code, out, err = await cli(env_for(fake, tmp_path, WEEX_SECRET_KEY=wrong), "--test")
    assert code == 1, out + err
    cred = next(line for line in out.splitlines() if line.split()[1] == "credentials")
    assert cred.startswith("FAIL") and "rejected" in cred and "-1047" in cred, cred
    assert "permissions" in out and "SKIPPED" in out
    assert out.splitlines()[-1].startswith("result: 1 of 6 checks FAILED (credentials)")
    sent = [r.headers.get("ACCESS-SIGN", "") for r in fake.requests if r.path == "/capi/v3/account/balance"]
    assert sent and all(s and s not in out + err for s in sent)  # neither the secret nor a signature is shown
    assert wrong not in out + err and "fake-api-key" not in out + err
    # --json: the same verdict as one object
    code, out, err = await cli(env_for(fake, tmp_path, WEEX_SECRET_KEY=wrong), "--test", "--json")
    doc = json.loads(out)
    assert code == 1 and doc["ok"] is False and doc["exit_code"] == 1
    assert {c["name"]: c["status"] for c in doc["checks"]}["credentials"] == "FAIL"
    assert wrong not in out + err


async def test_test_reports_clock_skew(fake: FakeWeex, tmp_path: Path) -> None:
    fake.set_faults("clock_skew=5s")
    checks = {c.name: c for c in await run_test(settings_for(fake, tmp_path))}
    clock = checks["clock"]
    assert clock.status == "WARN" and 4_500 <= clock.measured["skew_ms"] <= 5_500, clock  # the server is ahead
    assert "local clock" in clock.value and "behind the server" in clock.value
    assert not any(c.failed for c in checks.values())  # a warning alone passes (the client corrects it)
    fake.set_faults("clock_skew=-60s")
    checks = {c.name: c for c in await run_test(settings_for(fake, tmp_path))}
    assert checks["clock"].status == "FAIL" and 59_500 <= -checks["clock"].measured["skew_ms"] <= 60_500
    assert "ahead of the server" in checks["clock"].value and "signature window" in checks["clock"].value
    assert checks["credentials"].status == "OK"  # the client signs with the server's time, as the daemon does


async def test_test_without_keys_skips_credentials_and_passes(fake: FakeWeex, tmp_path: Path) -> None:
    code, out, err = await cli(env_for(fake, tmp_path, keys=False), "--test")
    assert code == 0, out + err
    cred = next(line for line in out.splitlines() if line.split()[1] == "credentials")
    assert cred.startswith("SKIPPED credentials") and "live mode needs WEEX_API_KEY" in cred, cred
    assert "SKIPPED permissions" in out and out.splitlines()[-1] == "result: all checks passed"
    assert fake.count("GET", "/capi/v3/account/balance") == 0


async def test_test_unreachable_exchange_exits_1_without_traceback(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    code, out, err = await cli(env_for(None, tmp_path, port=port), "--test")
    assert code == 1, out + err
    rest = out.splitlines()[0]
    assert rest.startswith("FAIL    rest") and "unreachable" in rest and "WEEX_REST_URL" in rest, out
    assert "FAIL    websocket" in out
    assert "Traceback" not in out + err
    assert time.monotonic() - t0 < 15


async def test_a_config_error_exits_78_with_one_line(tmp_path: Path) -> None:
    code, out, err = await cli(env_for(None, tmp_path, port=1, ALPHAPULSE_TYPO="1"), "--test")
    assert code == 78 and err.strip().count("\n") == 0 and "ALPHAPULSE_TYPO" in err, err


# ---------------------------------------------------------------------------------------------------------------
# download
# ---------------------------------------------------------------------------------------------------------------


async def test_download_writes_the_source_rows_exactly(fake: FakeWeex, tmp_path: Path) -> None:
    out = tmp_path / "btc.csv.gz"
    code, stdout, err = await cli(env_for(fake, tmp_path, keys=False), "download", "--symbol", "BTCUSDT",
                                  "--interval", "1h", "--from", "2025-01-05", "--to", "2025-01-20T00:00:00Z",
                                  "--out", str(out))
    assert code == 0, stdout + err
    parsed = parse_candle_file(out)
    assert parsed.malformed_lines == 0 and len(parsed) == 360
    assert validate_file(out, None, strict=True).status == "OK"  # zero rejects, no gaps
    assert body_lines(out) == expected(T0, T0 + 360 * H)  # byte-equal text, row for row
    assert fake.count("GET", HIST) == 4  # 100 rows a call
    assert "360 new BTCUSDT 1h bars 2025-01-05T00:00:00Z -> 2025-01-19T23:00:00Z" in stdout
    assert "download:" in err and "100.0%" in err  # plain progress lines when not on a TTY
    with open(out, "rb") as f:
        assert f.read(2) == b"\x1f\x8b"
    before = out.read_bytes()
    code, stdout, err = await cli(env_for(fake, tmp_path, keys=False), "download", "--interval", "1h", "--to",
                                  "2025-01-20", "--out", str(out), "--json")  # --from is optional when resuming
    doc = json.loads(stdout)
    assert code == 0 and doc["up_to_date"] is True and doc["rows_written"] == 0, stdout + err
    assert doc["resumed_after_ts"] == T0 + 359 * H and fake.count("GET", HIST) == 4  # nothing left to ask for
    assert out.read_bytes() == before


async def test_download_refuses_to_extend_a_damaged_file(fake: FakeWeex, tmp_path: Path) -> None:
    rows = expected(T0, T0 + 10 * H)
    out = write_candles(tmp_path / "d.csv.gz", rows[:5] + [rows[3]] + rows[5:])  # a duplicate inside
    before = out.read_bytes()
    with pytest.raises(FetchError, match="1 rows the validator rejects"):
        await download(settings_for(fake, tmp_path, keys=False), "BTCUSDT", "1h", T0, T0 + 20 * H, out,
                       progress=False)
    assert out.read_bytes() == before and fake.count("GET", HIST) == 0


async def test_download_resumes_after_the_last_bar_and_equals_one_full_download(fake: FakeWeex,
                                                                                tmp_path: Path) -> None:
    s = settings_for(fake, tmp_path, keys=False)
    part, full = tmp_path / "part.csv.gz", tmp_path / "full.csv.gz"
    r1 = await download(s, "BTCUSDT", "1h", T0, T0 + 250 * H, part, progress=False)
    assert r1.rows_written == 250 and fake.count("GET", HIST) == 3
    r2 = await download(s, "BTCUSDT", "1h", T0, T0 + 700 * H, part, progress=False)
    assert r2.resumed_after == T0 + 249 * H and r2.rows_written == 450
    assert fake.count("GET", HIST) == 3 + 5  # only the 450 new slots were asked for, not the first 250 again
    asked = [r.query for r in fake.requests if r.path == HIST][3:]
    assert f"startTime={T0 + 250 * H}" in asked[0]
    r3 = await download(s, "BTCUSDT", "1h", T0, T0 + 700 * H, full, progress=False)
    assert r3.rows_written == 700
    assert part.read_bytes() == full.read_bytes()  # same rows, same bytes
    assert body_lines(part) == expected(T0, T0 + 700 * H)
    again = await download(s, "BTCUSDT", "1h", T0, T0 + 700 * H, part, progress=False)
    assert again.up_to_date and fake.count("GET", HIST) == 3 + 5 + 7


async def _start_and_stop(env: dict[str, str], args: tuple[str, ...], out: Path, sig: int) -> int:
    """Start a download, wait until it has saved once, send ``sig``; the exit code."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "alphapulse", "fetch", *args, env=env,
                                                cwd=str(REPO), stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL)
    before = len(parse_candle_file(out)) if out.exists() else 0
    deadline = time.monotonic() + 15
    while (not out.exists() or len(parse_candle_file(out)) == before) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    proc.send_signal(sig)
    return await asyncio.wait_for(proc.wait(), 10)


async def test_download_killed_mid_way_leaves_a_readable_file_and_a_rerun_completes(fake: FakeWeex,
                                                                                     tmp_path: Path) -> None:
    out = tmp_path / "k.csv.gz"
    fake.set_faults(f"latency=150ms@{HIST}")
    env = env_for(fake, tmp_path, keys=False)
    args = ("download", "--interval", "1h", "--from", "2025-01-05", "--to", "2025-02-16", "--out", str(out),
            "--checkpoint-s", "0")
    assert await _start_and_stop(env, args, out, signal.SIGKILL) == -signal.SIGKILL  # no chance to clean up
    parsed = parse_candle_file(out)
    n = len(parsed)
    assert parsed.malformed_lines == 0 and 100 <= n < 1008, n  # at least one page saved, not finished
    assert body_lines(out) == expected(T0, T0 + n * H)  # a clean prefix of the range
    # SIGTERM (systemd stop, Ctrl-C alike): saves what it has and exits 130
    assert await _start_and_stop(env, args, out, signal.SIGTERM) == 130
    m = len(parse_candle_file(out))
    assert n < m < 1008 and body_lines(out) == expected(T0, T0 + m * H)
    fake.set_faults(None)
    code, stdout, err = await cli(env, *args)
    assert code == 0, stdout + err
    assert f"{1008 - m} new BTCUSDT 1h bars" in stdout and "resumed after" in stdout
    assert body_lines(out) == expected(T0, T0 + 1008 * H)
    assert not list(tmp_path.glob(".k.csv.gz.tmp-*"))  # a killed run's temp file is cleaned up


async def test_download_rides_out_5xx_and_a_failure_keeps_the_file(fake: FakeWeex, tmp_path: Path) -> None:
    s = settings_for(fake, tmp_path, keys=False)
    out = tmp_path / "f.csv.gz"
    fake.set_faults(f"error5xx=0.3@{HIST}", seed=7)
    client = WeexClient(fake.url, timeout_s=1.0, max_retries=5, backoff_base_s=0.01)
    try:
        res = await download(s, "BTCUSDT", "1h", T0, T0 + 500 * H, out, progress=False, client=client)
    finally:
        await client.close()
    assert res.rows_written == 500 and client.retries > 0
    assert body_lines(out) == expected(T0, T0 + 500 * H)
    before = out.read_bytes()
    fake.set_faults(f"error5xx=1.0@{HIST}")  # the exchange is down for good
    client = WeexClient(fake.url, timeout_s=1.0, max_retries=1, backoff_base_s=0.01)
    try:
        with pytest.raises(FetchError, match="historyKlines .* failed: HTTP 503"):
            await download(s, "BTCUSDT", "1h", T0, T0 + 800 * H, out, progress=False, client=client)
    finally:
        await client.close()
    assert out.read_bytes() == before and len(parse_candle_file(out)) == 500
    fake.set_faults(None)
    res = await download(s, "BTCUSDT", "1h", T0, T0 + 800 * H, out, progress=False)
    assert res.rows_written == 300 and body_lines(out) == expected(T0, T0 + 800 * H)


async def test_download_unknown_symbol_and_bad_dates_exit_2(fake: FakeWeex, tmp_path: Path) -> None:
    env = env_for(fake, tmp_path, keys=False)
    out = tmp_path / "x.csv.gz"
    code, stdout, err = await cli(env, "download", "--symbol", "NOPEUSDT", "--interval", "1h", "--from",
                                  "2025-01-05", "--to", "2025-01-06", "--out", str(out))
    assert code == 2 and "NOPEUSDT is not listed" in err and "Traceback" not in err, err
    code, stdout, err = await cli(env, "download", "--from", "yesterday-ish", "--out", str(out))
    assert code == 2 and "--from: not an ISO date" in err, err
    code, stdout, err = await cli(env, "download", "--from", "2025-02-01", "--to", "2025-01-01", "--out", str(out))
    assert code == 2 and "--to must be after --from" in err, err
    assert not out.exists() and fake.count("GET", HIST) == 0


def test_progress_is_a_bar_on_a_tty_and_plain_lines_otherwise() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, plain = Tty(), io.StringIO()
    for stream in (tty, plain):
        p = Progress(200, stream=stream, every_s=3600)
        p.update(50, 50)
        p.update(100, 100)  # too soon for either
        p.update(200, 190, final=True)
    assert tty.getvalue().startswith("\r[######..................]  25.0% 50/200 bar slots, 50 rows")
    assert tty.getvalue().count("\r") == 2 and tty.getvalue().endswith("\n")
    assert "[##" in tty.getvalue().split("\r")[-1] and "100.0% 200/200 bar slots, 190 rows" in tty.getvalue()
    lines = plain.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("download:  25.0% 50/200") and "\r" not in plain.getvalue()


def test_numbers_are_written_as_the_shared_data_readme_says() -> None:
    assert format_number(92345.0) == "92345"
    assert format_number(2867.74) == "2867.74"
    assert format_number(0.000012345678) == "0.00001235"
    assert format_number(1e-9) == "0"
    assert format_number(123456.123456789) == "123456.12345679"
    assert format_number(1e21) == "1000000000000000000000"


# ---------------------------------------------------------------------------------------------------------------
# --validate
# ---------------------------------------------------------------------------------------------------------------


def write_candles(path: Path, lines: list[str]) -> Path:
    with gzip.open(path, "wt") as f:
        f.write("timestamp,open,high,low,close,volume\n" + "".join(lines))
    return path


async def test_validate_clean_file_passes_and_a_dirty_one_names_the_counts(tmp_path: Path) -> None:
    env = env_for(None, tmp_path, port=1, keys=False)
    rows = expected(T0, T0 + 48 * H)
    clean = write_candles(tmp_path / "clean-1h.csv.gz", rows)
    code, out, err = await cli(env, "--validate", "--data", str(clean), "--interval", "1h")
    assert code == 0, out + err
    assert out.startswith("OK      data clean-1h.csv.gz 48 rows 1h, 2025-01-05T00:00:00Z -> 2025-01-06T23:00:00Z; "
                          "no gaps")
    assert "SKIPPED store" in out  # no daemon ran in this state directory
    ts, o, h, lo, c, v = rows[10].strip().split(",")
    dirty_rows = (rows[:5] + [rows[4]]  # a duplicate
                  + rows[5:10] + [f"{int(ts) + 60_000},{o},{h},{lo},{c},{v}\n"]  # a misaligned row
                  + [f"{ts},{o},{lo},{h},{c},{v}\n"]  # high below low: a bad row
                  + rows[11:20] + rows[25:])  # and a gap of 5 bars
    dirty = write_candles(tmp_path / "dirty-1h.csv.gz", dirty_rows)
    code, out, err = await cli(env, "--validate", "--data", str(dirty), str(clean), "--json")
    assert code == 1, out + err
    doc = json.loads(out)
    d = doc["checks"][0]
    assert d["status"] == "FAIL" and d["measured"]["rejected"] == {"duplicate_ts": 1, "misaligned_ts": 1,
                                                                   "high_below_low": 1}
    assert d["measured"]["gaps"] == 2 and d["measured"]["missing_bars"] == 6  # bar 10 (bad) and bars 20-24
    assert d["measured"]["longest_gap_bars"] == 5
    assert "duplicate_ts 1" in d["value"] and "misaligned_ts 1" in d["value"] and "high_below_low 1" in d["value"]
    assert doc["checks"][1]["status"] == "OK"
    gappy = write_candles(tmp_path / "gappy-1h.csv.gz", rows[:20] + rows[25:])
    code, out, _ = await cli(env, "--validate", "--data", str(gappy), "--store", str(tmp_path / "nostore"))
    assert "1 gaps (5 missing bars, longest 5 after 2025-01-05T19:00:00Z)" in out
    assert "FAIL    store" in out and code == 1  # an explicit --store that holds no database is an error
    check = validate_file(gappy, "1h", strict=False)
    assert check.status == "OK" and validate_file(gappy, "1h", strict=True).status == "FAIL"


def _write_store(data_dir: Path) -> Path:
    store = Store(data_dir)
    pf = Portfolio.new("BTCUSDT", Decimal("10000"))
    state = {"trading_state": "ACTIVE", "state_reason": "", "last_candle_ts": T0}
    for i in range(5):
        res = StepResult(T0 + i * H)
        order = Order(f"ap-{i}-p", "BTCUSDT", Side.BUY if i % 2 == 0 else Side.SELL, Decimal("0.01"), False,
                      T0 + i * H, "policy")
        res.orders.append(order)
        res.fills.append(pf.apply_fill(Fill(order.client_order_id, "BTCUSDT", order.side, Decimal("0.01"),
                                            Decimal("93000"), Decimal("0.558"), T0 + i * H + 1, trade_id=f"t{i}")))
        if i == 3:  # a funding payment: a cash flow, no order behind it
            res.fills.append(pf.apply_fill(Fill("funding-1", "BTCUSDT", Side.FUNDING, Decimal(0), Decimal(0),
                                                Decimal(0), T0 + i * H + 2, realized_pnl=Decimal("-0.3"))))
        store.commit_step(res, {**state, "portfolio": pf.snapshot(), "equity": str(pf.equity)})
    store.close()
    return data_dir / "alphapulse.db"


async def test_validate_a_real_store_passes_and_a_corrupted_copy_fails(tmp_path: Path) -> None:
    db = _write_store(tmp_path / "state")
    check = validate_store(tmp_path / "state", explicit=True)
    assert check.status == "OK", check
    assert check.measured["orders"] == 5 and check.measured["fills"] == 6 and check.measured["orphan_fills"] == 0
    assert check.measured["state"]["trading_state"] == "ACTIVE"
    env = env_for(None, tmp_path, port=1, keys=False)  # the default store is ALPHAPULSE_DATA_DIR
    code, out, err = await cli(env, "--validate")
    assert code == 0 and out.startswith("OK      store") and "integrity ok" in out, out + err
    bad_dir = tmp_path / "corrupt"
    bad_dir.mkdir()
    data = bytearray(db.read_bytes())
    assert len(data) >= 4 * 4096
    mid = (len(data) // 2) // 4096 * 4096
    data[mid: mid + 4096] = b"\xa5" * 4096  # a whole page in the middle becomes noise
    (bad_dir / "alphapulse.db").write_bytes(bytes(data))
    code, out, err = await cli(env, "--validate", "--store", str(bad_dir))
    assert code == 1 and out.startswith("FAIL    store"), out + err
    assert "Traceback" not in out + err
    # a fill whose order the store does not know is reported too
    orphan_dir = tmp_path / "orphan"
    _write_store(orphan_dir)
    con = sqlite3.connect(orphan_dir / "alphapulse.db")
    con.execute("DELETE FROM orders WHERE client_order_id='ap-2-p'")
    con.commit()
    con.close()
    check = validate_store(orphan_dir, explicit=True)
    assert check.status == "FAIL" and "1 fills reference no known order" in check.value
