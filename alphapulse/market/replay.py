"""Historical replay feed and the candle-file parser shared with backtests and training.

Replay is how the daemon is exercised without an exchange: the same loop, clock and restart
logic as live trading, driven by a real candle file.  Design points:

* Parsing (up to ~500k rows) runs in a worker thread so the event loop - and with it the
  control server and the systemd watchdog - never stalls during start-up.
* Data is held as one numpy column per field (~48 bytes a row) and ``Candle`` objects are
  created only when yielded, instead of half a million Python objects.
* A malformed line never stops a replay: it becomes a NaN candle the validator rejects (when
  its timestamp is readable) or is dropped, and is counted in ``malformed_lines`` either way.
* Paced replay runs a simulated clock ``speed`` times faster than the wall clock and emits each
  candle when that clock reaches the candle's *close* time, as a live feed would; holes in the
  data are fast-forwarded so a month-long exchange outage does not stall a replay for a month.
"""

from __future__ import annotations

import asyncio
import gzip
import math
import time
import warnings
import zlib
from array import array
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from alphapulse.domain import TIMEFRAME_MS, Candle, timeframe_ms
from alphapulse.market.feed import FeedError
from alphapulse.market.validate import valid_mask

#: Column keys of :func:`load_candles`' result, in file order.
COLUMNS: tuple[str, ...] = ("ts", "open", "high", "low", "close", "volume")
#: The header every candle file in the shared data format starts with.
HEADER: tuple[str, ...] = ("timestamp", "open", "high", "low", "close", "volume")

DEFAULT_REPLAY_SYMBOL = "BTCUSDT"
DEFAULT_REPLAY_TIMEFRAME = "5m"

_GZIP_MAGIC = b"\x1f\x8b"
# Timestamps pass through float64 on the fast path; beyond 2**53 ms they would lose precision.
_MAX_EXACT_TS = 2**53
# Max-speed replay hands control back to the event loop this often (in candles): often enough
# that a 10 ms timer is late by well under a millisecond, rare enough to keep >100k candles/s.
_YIELD_EVERY = 64
# Rows converted to Python objects at a time while replaying (bounded transient memory).
_CHUNK_ROWS = 4096


def default_replay_file(timeframe: str = DEFAULT_REPLAY_TIMEFRAME) -> Path:
    """The bundled replay file of ``timeframe``: real BTCUSDT perpetual candles 2024-12-31 .. 2025-08-31
    (5m: 70,272 candles; 1h: 5,856). :class:`FeedError` when none is bundled for that timeframe."""
    path = Path(__file__).resolve().parent.parent / "data" / f"BTC_USDT_USDT-{timeframe}.csv.gz"
    if not path.is_file():
        raise FeedError(f"{path}: no bundled replay for timeframe {timeframe}; set ALPHAPULSE_REPLAY_FILE")
    return path


@dataclass(frozen=True)
class ParsedCandles:
    """Result of parsing a candle file: compact columns plus how many lines were unusable."""

    columns: dict[str, np.ndarray]
    malformed_lines: int

    def __len__(self) -> int:
        return len(self.columns["ts"])


def _open_text(path: Path) -> IO[str]:
    """Open plain or gzip text by content (magic bytes), so a misnamed file still reads."""
    with open(path, "rb") as raw:
        magic = raw.read(2)
    if magic == _GZIP_MAGIC:
        return gzip.open(path, "rt", encoding="utf-8", newline=None)
    return open(path, encoding="utf-8", newline=None)


def _check_header(path: Path, line: str) -> None:
    if not line:
        raise FeedError(f"{path}: empty file (expected header {','.join(HEADER)})")
    names = tuple(part.strip().lower() for part in line.strip().split(","))
    if names != HEADER:
        raise FeedError(f"{path}: unexpected header {line.strip()!r}; expected {','.join(HEADER)!r}")


def _empty_columns() -> dict[str, np.ndarray]:
    cols: dict[str, np.ndarray] = {"ts": np.empty(0, dtype=np.int64)}
    for key in COLUMNS[1:]:
        cols[key] = np.empty(0, dtype=np.float64)
    return cols


def _parse_fast(f: IO[str]) -> dict[str, np.ndarray] | None:
    """numpy's C parser for the common all-clean file; None if any line needs the slow path."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "empty input file" for a header-only file
            table = np.loadtxt(f, delimiter=",", dtype=np.float64, comments=None, ndmin=2)
    except ValueError:
        return None
    if table.size == 0:
        return _empty_columns()
    if table.shape[1] != len(COLUMNS):
        return None
    ts = table[:, 0]
    if not (np.all(np.isfinite(ts)) and np.all(ts == np.floor(ts)) and np.all(np.abs(ts) < _MAX_EXACT_TS)):
        return None
    cols: dict[str, np.ndarray] = {"ts": ts.astype(np.int64)}
    for j, key in enumerate(COLUMNS[1:], start=1):
        cols[key] = np.ascontiguousarray(table[:, j])
    return cols


def _parse_ts(text: str) -> int | None:
    """Integer ms timestamp from a field, accepting '1.7e12'-style integral floats; else None."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value) or value != math.floor(value) or abs(value) >= _MAX_EXACT_TS:
        return None
    return int(value)


def _parse_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _parse_tolerant(f: IO[str]) -> ParsedCandles:
    """Line-by-line parser that never fails on content.

    A line whose timestamp is readable becomes a row; unreadable numbers (or a wrong column
    count, where fields cannot be trusted) become NaN so the validator rejects and counts the
    candle.  A line without a readable timestamp cannot be placed in time and is dropped.
    Either way the line is counted as malformed.
    """
    ts_col = array("q")
    value_cols = [array("d") for _ in COLUMNS[1:]]
    nan = math.nan
    malformed = 0
    for line in f:
        text = line.strip()
        if not text:
            continue
        parts = text.split(",")
        ts = _parse_ts(parts[0])
        if len(parts) != len(COLUMNS):
            malformed += 1
            values: list[float | None] = [None] * (len(COLUMNS) - 1)
        else:
            values = [_parse_float(p) for p in parts[1:]]
            if ts is None or any(v is None for v in values):
                malformed += 1
        if ts is None:
            continue
        ts_col.append(ts)
        for col, v in zip(value_cols, values):
            col.append(nan if v is None else v)
    cols: dict[str, np.ndarray] = {"ts": np.array(ts_col, dtype=np.int64)}
    for key, col in zip(COLUMNS[1:], value_cols):
        cols[key] = np.array(col, dtype=np.float64)
    return ParsedCandles(cols, malformed)


def parse_candle_file(path: str | Path) -> ParsedCandles:
    """Parse a ``timestamp,open,high,low,close,volume`` file (plain or gzip); blocking.

    Raises :class:`FeedError` naming the path for a missing/unreadable file or a wrong header;
    bad *lines* never raise (see :func:`_parse_tolerant`).
    """
    p = Path(path)
    try:
        with _open_text(p) as f:
            _check_header(p, f.readline())
            cols = _parse_fast(f)
        if cols is not None:
            return ParsedCandles(cols, 0)
        with _open_text(p) as f:
            f.readline()
            return _parse_tolerant(f)
    except FeedError:
        raise
    except FileNotFoundError:
        raise FeedError(f"{p}: file not found") from None
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise FeedError(f"{p}: unreadable candle file ({type(exc).__name__}: {exc})") from exc


def load_candles(path: str | Path) -> dict[str, np.ndarray]:
    """Columns ``ts`` (int64 ms, bar open time) and ``open/high/low/close/volume`` (float64).

    Raw rows in file order, unvalidated: use :func:`alphapulse.market.validate.valid_mask` to
    keep exactly what the live validator would accept.  Blocking; call via
    ``asyncio.to_thread`` from async code.
    """
    return parse_candle_file(path).columns


@dataclass(frozen=True)
class _Loaded:
    parsed: ParsedCandles
    accepted_idx: np.ndarray  # rows a validator would accept, for history()
    accepted_ts: np.ndarray


def check_spacing(path: Path, ts: np.ndarray, bar_ms: int) -> None:
    """A file of another timeframe is a configuration mistake: say so once, naming both timeframes.

    Otherwise most of its candles would be rejected one by one as misaligned (a 5m file under a 1h
    configuration loses 11 candles in 12), or every bar would look like a gap.
    """
    if len(ts) < 3:
        return
    step = int(np.median(np.diff(ts)))
    if step != bar_ms:
        names = {ms: tf for tf, ms in TIMEFRAME_MS.items()}
        raise FeedError(f"{path}: its candles are {names.get(step, f'{step} ms')} apart, but the configured "
                        f"timeframe is {names.get(bar_ms, f'{bar_ms} ms')} (trading_params.yaml timeframe)")


def check_file_timeframe(path: str | Path, bar_ms: int, head_rows: int = 500) -> None:
    """:func:`check_spacing` on the first ``head_rows`` timestamps only: a millisecond, not a whole parse, so the
    daemon can refuse a file of another timeframe before it creates any state.  Raises :class:`FeedError`."""
    path = Path(path)
    ts: list[int] = []
    try:
        with _open_text(path) as f:
            for line in f:
                first = line.split(",", 1)[0].strip()
                if first.isdigit():  # the header and malformed lines are the full parse's business
                    ts.append(int(first))
                    if len(ts) >= head_rows:
                        break
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:
        raise FeedError(f"{path}: cannot read: {e}") from None
    check_spacing(path, np.array(ts, dtype=np.int64), bar_ms)


def _load(path: Path, bar_ms: int) -> _Loaded:
    parsed = parse_candle_file(path)
    check_spacing(path, parsed.columns["ts"], bar_ms)
    idx = np.flatnonzero(valid_mask(parsed.columns, bar_ms))
    return _Loaded(parsed, idx, parsed.columns["ts"][idx])


class ReplayFeed:
    """A :class:`~alphapulse.market.feed.Feed` replaying a candle file.

    ``speed``: None = as fast as possible, 1.0 = real time, N = N times real time.
    ``start_after_ts``: every candle with ``ts <= start_after_ts`` is skipped, so a restarted
    daemon resumes after the last candle it decided and never decides one twice.
    ``unpaced_first``: that many first candles go out at full speed before pacing starts (the model's warm-up).

    ``await feed.open()`` loads the file off the event loop; ``candles()`` does it itself, and
    ``history()`` before that loads synchronously (correct, but blocks the loop once).
    """

    kind = "replay"

    def __init__(
        self,
        path: str | Path,
        symbol: str,
        timeframe: str,
        speed: float | None,
        start_after_ts: int | None = None,
        unpaced_first: int = 0,
    ) -> None:
        if speed is not None and not (math.isfinite(speed) and speed > 0):
            raise ValueError(f"speed must be None (max speed) or a finite number > 0, got {speed!r}")
        self.path = Path(path)
        self.symbol = symbol
        self.timeframe = timeframe
        self.bar_ms = timeframe_ms(timeframe)
        self.speed = speed
        self.start_after_ts = start_after_ts
        # The first candles of a fresh replay that only warm the model's features up (nothing is decided on them)
        # are handed out unpaced: a 90-day warm-up at the shipped 72,000x would otherwise be minutes of waiting.
        self.unpaced_first = max(0, int(unpaced_first))
        self.finished = False
        self.stalled = False  # a file never goes silent
        self.malformed_lines = 0
        self.emitted = 0
        self.skipped = 0  # rows at or before start_after_ts
        self.gaps_skipped = 0  # holes in the data passed over without waiting them out
        self.bars_skipped = 0  # missing bars in those holes
        self._loaded: _Loaded | None = None
        self._total = 0
        self._cursor = 0  # index of the next row to consider
        self._max_ts: int | None = None  # largest ts emitted so far (gap detection)
        self._last_close: int | None = None  # largest close time emitted so far
        self._last_emitted_ts: int | None = None
        self._anchor_wall: float | None = None  # monotonic seconds when the sim clock read _anchor_sim
        self._anchor_sim = 0.0  # simulated ms UTC
        self._gap_noted_ts: int | None = None
        self._iterating = False

    # -- loading ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Parse the file in a worker thread (idempotent). Raises :class:`FeedError`."""
        if self._loaded is None:
            loaded = await asyncio.to_thread(_load, self.path, self.bar_ms)
            if self._loaded is None:
                self._install(loaded)

    def _ensure_loaded(self) -> _Loaded:
        if self._loaded is None:
            self._install(_load(self.path, self.bar_ms))
        assert self._loaded is not None
        return self._loaded

    def _install(self, loaded: _Loaded) -> None:
        self._loaded = loaded
        self.malformed_lines = loaded.parsed.malformed_lines
        ts = loaded.parsed.columns["ts"]
        n = len(ts)
        if self.start_after_ts is None:
            self._total, self._cursor = n, 0
        else:
            keep = ts > self.start_after_ts
            self._total = int(np.count_nonzero(keep))
            self._cursor = int(np.argmax(keep)) if self._total else n
        self.skipped = n - self._total

    # -- Feed protocol ---------------------------------------------------------------------

    async def candles(self) -> AsyncIterator[Candle]:
        """Yield raw candles in file order, paced by ``speed``; sets ``finished`` at the end.

        Resumable: a new call continues after the last candle handed out.  Only one iteration
        may run at a time (two consumers would each see half the stream).
        """
        if self._iterating:
            raise RuntimeError("ReplayFeed.candles() is already being iterated")
        self._iterating = True
        try:
            await self.open()
            loaded = self._ensure_loaded()
            cols = loaded.parsed.columns
            n = len(cols["ts"])
            skip_le = self.start_after_ts
            since_yield = 0
            for chunk_start in range(self._cursor, n, _CHUNK_ROWS):
                chunk_end = min(n, chunk_start + _CHUNK_ROWS)
                rows = zip(*(cols[key][chunk_start:chunk_end].tolist() for key in COLUMNS))
                for i, (ts, o, h, lo, c, v) in enumerate(rows, start=chunk_start):
                    if skip_le is not None and ts <= skip_le:
                        continue
                    self._note_gap(ts)
                    if self.speed is not None and self.emitted >= self.unpaced_first and await self._wait_due(ts):
                        since_yield = 0
                    self._cursor = i + 1
                    self._mark_emitted(ts)
                    yield Candle(ts, o, h, lo, c, v)
                    since_yield += 1
                    if since_yield >= _YIELD_EVERY:
                        since_yield = 0
                        await asyncio.sleep(0)
            self._cursor = n
            self.finished = True
        finally:
            self._iterating = False

    def now_ms(self) -> int | None:
        """Simulated ms UTC for paced replay (None before the first candle); None at max speed.

        Never earlier than the close of the last emitted candle, so the clock is monotonic and
        consistent with the data even if float rounding lands a hair short.
        """
        if self.speed is None or self._anchor_wall is None:
            return None
        sim = self._anchor_sim + (time.monotonic() - self._anchor_wall) * self.speed * 1000.0
        return max(int(sim), self._last_close or 0)

    def history(self, before_ts: int, n: int) -> list[Candle]:
        """The last ``n`` *valid* candles with ``ts < before_ts``, oldest first.

        Only candles the validator would accept are returned, so warm-up features are built
        from the same data the live loop would have used, never from a rejected NaN row.
        """
        if n <= 0:
            return []
        loaded = self._ensure_loaded()
        k = int(np.searchsorted(loaded.accepted_ts, before_ts, side="left"))
        idx = loaded.accepted_idx[max(0, k - n) : k]
        cols = loaded.parsed.columns
        return [Candle(*row) for row in zip(*(cols[key][idx].tolist() for key in COLUMNS))]

    def progress(self) -> tuple[int, int]:
        """(candles emitted, candles this replay will emit in total - after start_after_ts)."""
        return self.emitted, self._total

    def describe(self) -> dict[str, object]:
        cols = self._loaded.parsed.columns if self._loaded is not None else None
        return {
            "kind": self.kind,
            "path": str(self.path),
            "symbol": self.symbol,
            "timeframe": self.timeframe,
            "speed": self.speed,
            "loaded": self._loaded is not None,
            "rows": 0 if cols is None else len(cols["ts"]),
            "first_ts": int(cols["ts"][0]) if cols is not None and len(cols["ts"]) else None,
            "last_ts": int(cols["ts"][-1]) if cols is not None and len(cols["ts"]) else None,
            "start_after_ts": self.start_after_ts,
            "emitted": self.emitted,
            "total": self._total,
            "skipped": self.skipped,
            "last_emitted_ts": self._last_emitted_ts,
            "now_ms": self.now_ms(),
            "finished": self.finished,
            "gaps_skipped": self.gaps_skipped,
            "bars_skipped": self.bars_skipped,
            "malformed_lines": self.malformed_lines,
        }

    # -- pacing ----------------------------------------------------------------------------

    def _note_gap(self, ts: int) -> None:
        """Count a hole before ``ts`` and, when paced, jump the simulated clock over it."""
        if self._max_ts is None or ts - self._max_ts <= self.bar_ms or ts == self._gap_noted_ts:
            return
        self._gap_noted_ts = ts  # a consumer that stops mid-wait and resumes must not count it twice
        hole_ms = ts - self._max_ts - self.bar_ms
        self.gaps_skipped += 1
        self.bars_skipped += hole_ms // self.bar_ms
        if self._anchor_wall is not None:
            self._anchor_sim += hole_ms

    async def _wait_due(self, ts: int) -> bool:
        """Sleep until the simulated clock reaches this candle's close; True if it slept."""
        assert self.speed is not None
        close = ts + self.bar_ms
        if self._anchor_wall is None:
            self._anchor_wall = time.monotonic()
            self._anchor_sim = float(close)
            return False
        due = self._anchor_wall + (close - self._anchor_sim) / (self.speed * 1000.0)
        slept = False
        while (delay := due - time.monotonic()) > 0:
            await asyncio.sleep(delay)
            slept = True
        return slept

    def _mark_emitted(self, ts: int) -> None:
        self.emitted += 1
        self._last_emitted_ts = ts
        if self._max_ts is None or ts > self._max_ts:
            self._max_ts = ts
        close = ts + self.bar_ms
        if self._last_close is None or close > self._last_close:
            self._last_close = close
