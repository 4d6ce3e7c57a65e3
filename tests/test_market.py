"""Market data: candle validation, the candle-file parser and the replay feed, on real candles.

Every fixture file here is cut from the bundled real BTCUSDT 5m perpetual file; "bad" rows
are injected copies of real rows with one thing broken, so each test knows exactly which
candles must be rejected and which must pass.
"""

from __future__ import annotations

import asyncio
import gzip
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from alphapulse.domain import Candle, timeframe_ms
from alphapulse.market import (
    REJECT_REASONS,
    CandleValidator,
    Feed,
    FeedError,
    ReplayFeed,
    default_replay_file,
    load_candles,
    valid_mask,
)

BAR = timeframe_ms("5m")
HEADER = "timestamp,open,high,low,close,volume"
BUNDLED_ROWS = 70_272


@pytest.fixture(scope="module")
def real_lines() -> list[str]:
    """Data lines (no header) of the bundled real file, exactly as written there."""
    with gzip.open(default_replay_file(), "rt") as f:
        assert f.readline().strip() == HEADER
        return [line.strip() for line in f if line.strip()]


def write_csv(path: Path, lines: list[str], gz: bool = False) -> Path:
    text = HEADER + "\n" + "\n".join(lines) + "\n"
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def line_ts(line: str) -> int:
    return int(line.split(",")[0])


def with_field(line: str, index: int, value: str) -> str:
    parts = line.split(",")
    parts[index] = value
    return ",".join(parts)


async def collect(feed: ReplayFeed) -> list[Candle]:
    return [c async for c in feed.candles()]


# -- validator -------------------------------------------------------------------------------


def real_candle(real_lines: list[str], i: int = 0) -> Candle:
    ts, o, h, lo, c, v = real_lines[i].split(",")
    return Candle(int(ts), float(o), float(h), float(lo), float(c), float(v))


def test_valid_real_candle_is_accepted(real_lines: list[str]) -> None:
    v = CandleValidator(BAR)
    assert v.check(real_candle(real_lines, 0)) is None
    assert v.check(real_candle(real_lines, 1)) is None
    assert (v.accepted, v.rejected_total, v.gaps, v.last_gap_bars) == (2, 0, 0, 0)
    assert v.last_ts == line_ts(real_lines[1])


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"close": math.nan}, "non_finite"),
        ({"volume": math.inf}, "non_finite"),
        ({"high": -math.inf}, "non_finite"),
        ({"low": 0.0}, "non_positive_price"),
        ({"open": -1.0}, "non_positive_price"),
        ({"high": 1.0}, "high_below_low"),
        ({"open": 1e9}, "open_outside_range"),
        ({"open": 1.0}, "open_outside_range"),
        ({"close": 1e9}, "close_outside_range"),
        ({"close": 1.0}, "close_outside_range"),
        ({"volume": -0.001}, "negative_volume"),
        ({"ts_delta": 1}, "misaligned_ts"),
        ({"ts_delta": -BAR}, "duplicate_ts"),
        ({"ts_delta": -2 * BAR}, "out_of_order_ts"),
    ],
)
def test_every_reject_reason(real_lines: list[str], change: dict[str, float], reason: str) -> None:
    v = CandleValidator(BAR)
    first = real_candle(real_lines, 0)
    second = real_candle(real_lines, 1)
    assert v.check(first) is None and v.check(second) is None
    base = real_candle(real_lines, 2)
    fields = {k: val for k, val in change.items() if k != "ts_delta"}
    bad = base._replace(ts=base.ts + int(change.get("ts_delta", 0)), **fields)
    assert v.check(bad) == reason
    assert reason in REJECT_REASONS
    assert v.rejected == Counter({reason: 1})
    # A rejected candle does not move the stream: the real next candle is still accepted, no gap.
    assert v.last_ts == second.ts
    assert v.check(base) is None
    assert (v.accepted, v.gaps, v.last_gap_bars) == (3, 0, 0)


def test_gap_is_reported_and_last_ts_resumes(real_lines: list[str]) -> None:
    v = CandleValidator(BAR, last_ts=line_ts(real_lines[9]))
    assert v.check(real_candle(real_lines, 9)) == "duplicate_ts"  # already decided before "restart"
    assert v.check(real_candle(real_lines, 10)) is None
    assert v.last_gap_bars == 0
    assert v.check(real_candle(real_lines, 14)) is None  # bars 11..13 missing
    assert v.last_gap_bars == 3
    assert v.check(real_candle(real_lines, 15)) is None
    assert v.last_gap_bars == 0
    assert (v.gaps, v.missing_bars, v.accepted) == (1, 3, 3)


# -- parser ----------------------------------------------------------------------------------


def test_bundled_file_loads_all_valid_no_gaps() -> None:
    cols = load_candles(default_replay_file())
    assert set(cols) == {"ts", "open", "high", "low", "close", "volume"}
    assert all(len(a) == BUNDLED_ROWS for a in cols.values())
    assert cols["ts"].dtype == np.int64 and cols["close"].dtype == np.float64
    assert int(cols["ts"][0]) == 1735603200000  # 2024-12-31T00:00Z
    assert float(cols["close"][0]) == 92755.5  # the file's first row, exactly
    assert bool(np.all(np.diff(cols["ts"]) == BAR))
    assert bool(valid_mask(cols, BAR).all())
    v = CandleValidator(BAR)
    for row in zip(*(cols[k].tolist() for k in ("ts", "open", "high", "low", "close", "volume"))):
        assert v.check(Candle(*row)) is None
    assert (v.accepted, v.rejected_total, v.gaps) == (BUNDLED_ROWS, 0, 0)


def test_gzip_and_plain_csv_give_same_candles(tmp_path: Path, real_lines: list[str]) -> None:
    lines = real_lines[5000:7000]
    plain = load_candles(write_csv(tmp_path / "a.csv", lines))
    gz = load_candles(write_csv(tmp_path / "a.csv.gz", lines, gz=True))
    assert len(plain["ts"]) == 2000
    for key in plain:
        assert np.array_equal(plain[key], gz[key])
    assert int(plain["ts"][0]) == line_ts(lines[0])
    # Values round-trip exactly to the text in the file.
    assert [repr(x) for x in plain["high"][:50].tolist()] == [repr(float(ln.split(",")[2])) for ln in lines[:50]]


async def test_gzip_and_plain_replay_identically(tmp_path: Path, real_lines: list[str]) -> None:
    lines = real_lines[:500]
    a = await collect(ReplayFeed(write_csv(tmp_path / "b.csv", lines), "BTCUSDT", "5m", None))
    b = await collect(ReplayFeed(write_csv(tmp_path / "b.csv.gz", lines, gz=True), "BTCUSDT", "5m", None))
    assert len(a) == 500 and a == b
    assert all(type(c.ts) is int and type(c.close) is float for c in a[:10])


def test_missing_and_unreadable_files_raise_feed_error(tmp_path: Path, real_lines: list[str]) -> None:
    missing = tmp_path / "nope.csv.gz"
    with pytest.raises(FeedError, match="nope.csv.gz.*not found"):
        load_candles(missing)
    bad_header = tmp_path / "hdr.csv"
    bad_header.write_text("time,o,h,l,c,v\n" + real_lines[0] + "\n")
    with pytest.raises(FeedError, match="hdr.csv.*header"):
        load_candles(bad_header)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(FeedError, match="empty"):
        load_candles(empty)
    truncated = tmp_path / "trunc.csv.gz"
    write_csv(truncated, real_lines[:3000], gz=True)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    with pytest.raises(FeedError, match="trunc.csv.gz.*unreadable"):
        load_candles(truncated)
    with pytest.raises(FeedError, match="not found"):
        asyncio.run(ReplayFeed(missing, "BTCUSDT", "5m", None).open())


def test_header_only_file_is_empty_not_an_error(tmp_path: Path) -> None:
    cols = load_candles(write_csv(tmp_path / "h.csv", []))
    assert all(len(a) == 0 for a in cols.values())


# -- injected bad rows -----------------------------------------------------------------------


def build_bad_file(real_lines: list[str], tmp_path: Path) -> tuple[Path, list[str]]:
    """300 real rows plus injected bad copies; returns (path, the real lines that must pass)."""
    good = real_lines[1000:1300]
    out: list[str] = []
    for i, line in enumerate(good):
        if i == 20:
            out.append(with_field(line, 4, "nan"))  # bad copy of the next real row, then the row
        if i == 40:
            out.append(with_field(line, 1, "-5"))
        if i == 60:
            lo = line.split(",")[3]
            out.append(with_field(with_field(line, 2, str(float(lo) - 100)), 3, lo))  # high < low
        if i == 80:
            out.append("this is, not a candle")  # garbage: no usable timestamp
        if i == 100:
            out.append(with_field(line, 5, "abc"))  # non-number field -> NaN candle
        if i == 120:
            out.append(line.rsplit(",", 1)[0])  # wrong column count -> NaN candle
        out.append(line)
        if i == 150:
            out.append(line)  # duplicate ts
        if i == 200:
            out.append(good[190])  # out of order
    return write_csv(tmp_path / "bad.csv.gz", out, gz=True), good


async def test_injected_bad_rows_are_counted_and_rejected(tmp_path: Path, real_lines: list[str]) -> None:
    path, good = build_bad_file(real_lines, tmp_path)
    feed = ReplayFeed(path, "BTCUSDT", "5m", None)
    v = CandleValidator(BAR)
    accepted: list[Candle] = []
    async for c in feed.candles():
        if v.check(c) is None:
            accepted.append(c)
    assert feed.finished
    assert feed.malformed_lines == 3  # garbage line, "abc" field, short line
    assert feed.progress() == (len(good) + 7, len(good) + 7)  # every line with a usable ts is emitted
    assert v.rejected == Counter(
        {
            "non_finite": 3,  # literal nan, "abc", missing column
            "non_positive_price": 1,
            "high_below_low": 1,
            "duplicate_ts": 1,
            "out_of_order_ts": 1,
        }
    )
    assert v.accepted == len(good) and v.gaps == 0
    assert [c.ts for c in accepted] == [line_ts(ln) for ln in good]
    assert accepted[100] == Candle(*(t(x) for t, x in zip((int,) + (float,) * 5, good[100].split(","))))
    # The vectorised rule agrees row for row with the validator.
    cols = load_candles(path)
    mask = valid_mask(cols, BAR)
    assert int(mask.sum()) == len(good)
    assert cols["ts"][mask].tolist() == [c.ts for c in accepted]


# -- replay feed -----------------------------------------------------------------------------


async def test_bundled_replay_max_speed_all_valid() -> None:
    feed = ReplayFeed(default_replay_file(), "BTCUSDT", "5m", None)
    assert isinstance(feed, Feed)
    assert feed.progress() == (0, 0) and not feed.finished
    v = CandleValidator(BAR)
    t0 = time.perf_counter()
    n = 0
    async for c in feed.candles():
        v.check(c)
        n += 1
    elapsed = time.perf_counter() - t0
    assert feed.now_ms() is None  # max speed: the daemon uses candle close times
    assert feed.finished and n == BUNDLED_ROWS
    assert feed.progress() == (BUNDLED_ROWS, BUNDLED_ROWS)
    assert (v.accepted, v.rejected_total, v.gaps, feed.gaps_skipped) == (BUNDLED_ROWS, 0, 0, 0)
    assert n / elapsed > 50_000, f"replay+validate only {n / elapsed:.0f} candles/s"
    info = feed.describe()
    assert info["emitted"] == BUNDLED_ROWS and info["finished"] is True and info["symbol"] == "BTCUSDT"


async def test_max_speed_keeps_event_loop_responsive() -> None:
    feed = ReplayFeed(default_replay_file(), "BTCUSDT", "5m", None)
    await feed.open()
    ticks: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    t0 = time.perf_counter()
    n = 0
    async for _ in feed.candles():
        n += 1
    elapsed = time.perf_counter() - t0
    tick_count_during = sum(1 for t in ticks if t >= t0)
    done.set()
    await task
    assert n == BUNDLED_ROWS
    assert n / elapsed > 100_000, f"replay alone only {n / elapsed:.0f} candles/s"
    # The 10 ms ticker kept running throughout (allow generous slack for a loaded machine).
    assert tick_count_during >= max(1, int(elapsed / 0.01 * 0.3))
    gaps = np.diff([t for t in ticks if t >= t0] + [t0 + elapsed])
    assert float(gaps.max()) < 0.25


async def test_start_after_ts_resumes_exactly_after(tmp_path: Path, real_lines: list[str]) -> None:
    path = write_csv(tmp_path / "s.csv", real_lines[:1000])
    resume_at = line_ts(real_lines[399])
    feed = ReplayFeed(path, "BTCUSDT", "5m", None, start_after_ts=resume_at)
    got = await collect(feed)
    assert got[0].ts == resume_at + BAR == line_ts(real_lines[400])
    assert [c.ts for c in got] == [line_ts(ln) for ln in real_lines[400:1000]]
    assert feed.progress() == (600, 600) and feed.skipped == 400
    # Off-grid resume point: still nothing at or before it.
    feed = ReplayFeed(path, "BTCUSDT", "5m", None, start_after_ts=resume_at + 1)
    assert (await collect(feed))[0].ts == line_ts(real_lines[400])
    # Past the end: nothing to do, finished at once.
    feed = ReplayFeed(path, "BTCUSDT", "5m", None, start_after_ts=line_ts(real_lines[999]))
    assert await collect(feed) == [] and feed.finished and feed.progress() == (0, 0)


async def test_candles_resumes_after_consumer_stops(tmp_path: Path, real_lines: list[str]) -> None:
    feed = ReplayFeed(write_csv(tmp_path / "r.csv", real_lines[:300]), "BTCUSDT", "5m", None)
    first: list[Candle] = []
    gen = feed.candles()
    async for c in gen:
        first.append(c)
        if len(first) == 120:
            break
    await gen.aclose()  # type: ignore[attr-defined]
    assert not feed.finished
    rest = await collect(feed)
    assert [c.ts for c in first + rest] == [line_ts(ln) for ln in real_lines[:300]]
    assert feed.finished


async def test_warm_up_candles_go_out_unpaced_then_pacing_starts(tmp_path: Path, real_lines: list[str]) -> None:
    """A fresh replay's warm-up candles (nothing is decided on them) are not waited for: 400 bars at one bar per
    20 ms would take 8 s paced; they take well under that, and the 11 after them are paced as ever."""
    warm, paced = 400, 11
    speed = BAR / 20.0  # one 5m bar every 20 ms of wall time
    feed = ReplayFeed(write_csv(tmp_path / "w.csv", real_lines[:warm + paced]), "BTCUSDT", "5m", speed,
                      unpaced_first=warm)
    stamps: list[float] = []
    async for _ in feed.candles():
        stamps.append(time.perf_counter())
    assert len(stamps) == warm + paced and feed.finished
    assert stamps[warm - 1] - stamps[0] < 2.0  # paced, these 400 would take 8 s
    tail = stamps[warm + paced - 1] - stamps[warm]  # 10 bar intervals at 20 ms each, once pacing starts
    assert tail >= 10 * 0.020 * 0.95, f"pacing did not start after the warm-up: {tail:.3f}s"
    assert feed.now_ms() is not None and feed.now_ms() >= int(line_ts(real_lines[warm + paced - 1])) + BAR


async def test_paced_replay_takes_expected_time(tmp_path: Path, real_lines: list[str]) -> None:
    n = 41
    speed = BAR / 10.0  # one 5m bar every 10 ms of wall time
    feed = ReplayFeed(write_csv(tmp_path / "p.csv", real_lines[:n]), "BTCUSDT", "5m", speed)
    assert feed.now_ms() is None  # clock not started
    seen: list[tuple[int, int]] = []
    t0 = time.perf_counter()
    async for c in feed.candles():
        now = feed.now_ms()
        assert now is not None
        seen.append((c.ts, now))
    elapsed = time.perf_counter() - t0
    assert len(seen) == n and feed.finished
    expected = (n - 1) * 0.010
    assert elapsed >= expected * 0.95, f"paced replay too fast: {elapsed:.3f}s < {expected:.3f}s"
    assert elapsed < expected + 3.0
    # Each candle is delivered once the simulated clock has reached its close time.
    assert all(now >= ts + BAR for ts, now in seen)
    nows = [now for _, now in seen]
    assert nows == sorted(nows)
    # The simulated clock tracks the data: at the last candle it is near that candle's close.
    assert nows[-1] - (seen[-1][0] + BAR) < BAR * 50


async def test_gap_is_fast_forwarded(tmp_path: Path, real_lines: list[str]) -> None:
    lines = real_lines[2000:2140]
    holed = lines[:20] + lines[120:]  # drop 100 real rows: a 100-bar hole
    speed = BAR / 20.0  # 20 ms per bar; sleeping through the hole would take 2 s
    feed = ReplayFeed(write_csv(tmp_path / "g.csv", holed), "BTCUSDT", "5m", speed)
    v = CandleValidator(BAR)
    stamps: list[tuple[int, float, int | None]] = []
    t0 = time.perf_counter()
    async for c in feed.candles():
        assert v.check(c) is None
        if v.last_gap_bars:
            assert v.last_gap_bars == 100
        stamps.append((c.ts, time.perf_counter(), feed.now_ms()))
    elapsed = time.perf_counter() - t0
    assert len(stamps) == 40
    assert (feed.gaps_skipped, feed.bars_skipped, v.gaps, v.missing_bars) == (1, 100, 1, 100)
    # Wall time between the candle before the hole and the one after is one bar (~20 ms), not 101 bars.
    hole_wall = stamps[20][1] - stamps[19][1]
    assert hole_wall < 1.0, f"slept through the hole: {hole_wall:.3f}s"
    assert elapsed >= 39 * 0.02 * 0.95
    # The simulated clock jumped with the data: right after the hole it reads that candle's close.
    after_ts, _, after_now = stamps[20]
    assert after_ts == line_ts(lines[120])
    assert after_now is not None and after_ts + BAR <= after_now < after_ts + BAR * 40


async def test_history_returns_right_candles(tmp_path: Path, real_lines: list[str]) -> None:
    feed = ReplayFeed(default_replay_file(), "BTCUSDT", "5m", None)
    await feed.open()
    cols = load_candles(default_replay_file())
    before = int(cols["ts"][1000])
    hist = feed.history(before, 50)
    assert [c.ts for c in hist] == cols["ts"][950:1000].tolist()
    assert hist[-1].close == float(cols["close"][999])
    assert [c.ts for c in feed.history(before + 1, 3)] == cols["ts"][998:1001].tolist()
    assert len(feed.history(int(cols["ts"][10]), 500)) == 10  # fewer available than asked
    assert feed.history(int(cols["ts"][0]), 5) == []
    assert feed.history(before, 0) == []
    # On a file with bad rows, history skips what the validator would reject.
    path, good = build_bad_file(real_lines, tmp_path)
    bad_feed = ReplayFeed(path, "BTCUSDT", "5m", None)
    end = line_ts(good[210])
    hist = bad_feed.history(end, 210)  # synchronous load path: not opened first
    assert [c.ts for c in hist] == [line_ts(ln) for ln in good[:210]]
    assert all(math.isfinite(c.close) and c.low <= c.close <= c.high for c in hist)


def test_invalid_constructor_arguments() -> None:
    with pytest.raises(ValueError):
        ReplayFeed(default_replay_file(), "BTCUSDT", "7m", None)
    with pytest.raises(ValueError):
        ReplayFeed(default_replay_file(), "BTCUSDT", "5m", 0.0)
    with pytest.raises(ValueError):
        ReplayFeed(default_replay_file(), "BTCUSDT", "5m", math.nan)
