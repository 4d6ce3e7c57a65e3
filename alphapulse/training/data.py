"""Training data: candle files of several pairs, cleaned, split by time and cut into contiguous segments.

Why it is shaped like this:

* **Same cleaning as the daemon.**  Files are parsed with :func:`alphapulse.market.replay.load_candles` and
  filtered with :func:`alphapulse.market.validate.valid_mask`, so training sees exactly the candles the live
  validator would accept.
* **Split by time, same cut dates for every pair.**  A random or per-pair split would leak the future: BTC and
  ETH move together, so an ETH bar from a "validation" week teaches the model what BTC did in that week.  A
  candle belongs to the split its *open* time falls in (half-open intervals), so no bar is in two splits.
* **Segments, not whole series.**  Long holes in the data (weeks on some pairs) are not bridged: a series is
  cut into contiguous runs wherever more than ``max_gap_bars`` bars are missing (short exchange outages are
  bridged, as the daemon's features bridge them), and each split's runs are separate segments.  Features are
  computed *per segment* with the feature set's batch form (``short_v1`` unless ``feature_set`` names another), so
  the set's first ``warmup_bars`` - 1 rows of every segment are warm-up and a validation segment never
  reads a training candle, even as feature history.  Segments too short for warm-up plus one episode are
  dropped (and counted, so a typo in a date does not silently train on nothing).
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alphapulse.domain import Candle, timeframe_ms
from alphapulse.features import FeatureSet, feature_set
from alphapulse.market.feed import FeedError
from alphapulse.market.replay import COLUMNS, load_candles
from alphapulse.market.validate import valid_mask
from alphapulse.timeutil import parse_utc_ms

SPLITS: tuple[str, ...] = ("train", "validation", "test")

Columns = dict[str, np.ndarray]


class DataError(Exception):
    """Missing files, unusable dates or an empty split: the training run cannot start."""


def parse_utc(value: str | dt.date | dt.datetime) -> int:
    """A UTC date or ISO time (``2025-07-01``, ``2025-07-01T12:00``) -> epoch milliseconds.

    YAML turns an unquoted ``2025-07-01`` into a ``date``; both forms are accepted.  A time with an explicit
    offset is converted; a naive one is taken as UTC (all candle timestamps are UTC).  The parsing is
    :func:`alphapulse.timeutil.parse_utc_ms`, the one every command uses; here a bad value is a DataError.
    """
    try:
        return parse_utc_ms(value)
    except ValueError:
        raise DataError(f"not a UTC date/time: {value!r} (expected e.g. 2025-07-01)") from None


def format_utc(ts_ms: int) -> str:
    """Epoch ms -> ``2025-07-01T00:00Z`` (for metadata and logs)."""
    return dt.datetime.fromtimestamp(ts_ms / 1000, tz=dt.UTC).strftime("%Y-%m-%dT%H:%MZ")


@dataclass(frozen=True)
class SplitDates:
    """Cut dates in epoch ms: train [train_start, validation_start), validation [validation_start,
    test_start), test [test_start, test_end).  ``None`` for an open end."""

    validation_start: int
    test_start: int
    train_start: int | None = None
    test_end: int | None = None

    def __post_init__(self) -> None:
        points = [p for p in (self.train_start, self.validation_start, self.test_start, self.test_end) if p is not None]
        if any(b <= a for a, b in itertools.pairwise(points)):
            raise DataError(
                "split dates must increase: train_start < validation_start < test_start < test_end, got "
                + ", ".join(format_utc(p) for p in points)
            )

    def bounds(self, split: str) -> tuple[int | None, int | None]:
        """Half-open ``[lo, hi)`` interval of a split's candle open times."""
        if split == "train":
            return self.train_start, self.validation_start
        if split == "validation":
            return self.validation_start, self.test_start
        if split == "test":
            return self.test_start, self.test_end
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")

    def describe(self) -> dict[str, str | None]:
        def fmt(v: int | None) -> str | None:
            return None if v is None else format_utc(v)

        return {
            "train_start": fmt(self.train_start),
            "validation_start": fmt(self.validation_start),
            "test_start": fmt(self.test_start),
            "test_end": fmt(self.test_end),
        }


@dataclass(frozen=True, eq=False)
class Segment:
    """A contiguous run of valid candles of one pair inside one split, with its market features.

    ``features[i]`` depends on candles ``<= i`` of this segment only (NaN for the warm-up rows
    ``i < warmup_bars - 1``), which is what makes the environment free of look-ahead.
    """

    pair: str
    symbol: str
    split: str
    ts: np.ndarray  # int64 bar open times, strictly increasing
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray
    features: np.ndarray  # (n, len(feature set's market features)) float64
    feature_set_name: str = "short_v1"
    warmup_bars: int = feature_set(None).warmup_bars

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    @property
    def first_obs_index(self) -> int:
        """Index of the first bar with a complete feature vector."""
        return self.warmup_bars - 1

    def candle(self, i: int) -> Candle:
        return Candle(int(self.ts[i]), float(self.open[i]), float(self.high[i]), float(self.low[i]),
                      float(self.close[i]), float(self.volume[i]))

    def describe(self) -> str:
        first, last = format_utc(int(self.ts[0])), format_utc(int(self.ts[-1]))
        return f"{self.pair} {self.split} {first}..{last} ({len(self)} bars)"


@dataclass
class Dataset:
    """Segments per split, plus what was dropped and why (printed by the trainer)."""

    timeframe: str
    dates: SplitDates
    segments: dict[str, list[Segment]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    dropped_short: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})
    invalid_rows: dict[str, int] = field(default_factory=dict)  # per pair, rows the validator rejected

    def bars(self, split: str) -> int:
        return sum(len(s) for s in self.segments[split])

    def date_range(self, split: str) -> str:
        segs = self.segments[split]
        if not segs:
            return "none"
        lo = min(int(s.ts[0]) for s in segs)
        hi = max(int(s.ts[-1]) for s in segs)
        return f"{format_utc(lo)}..{format_utc(hi)}"


def pair_symbol(pair: str) -> str:
    """``BTC_USDT`` -> ``BTCUSDT``: the exchange symbol the engine's orders carry."""
    return pair.replace("_", "").replace("/", "").replace(":", "").upper()


def pair_file(data_dir: Path, pair: str, timeframe: str, pattern: str = "{pair}-{timeframe}.csv.gz") -> Path:
    return Path(data_dir) / pattern.format(pair=pair, timeframe=timeframe)


def load_valid(path: Path, bar_ms: int) -> tuple[Columns, int]:
    """Rows of a candle file the live validator would accept, and how many it rejected."""
    raw = load_candles(path)
    keep = valid_mask(raw, bar_ms)
    return {k: np.ascontiguousarray(raw[k][keep]) for k in COLUMNS}, int(keep.size - np.count_nonzero(keep))


def split_rows(ts: np.ndarray, dates: SplitDates, split: str) -> np.ndarray:
    """Boolean mask of the rows whose open time is in ``split``'s half-open interval."""
    lo, hi = dates.bounds(split)
    mask = np.ones(ts.shape[0], dtype=bool)
    if lo is not None:
        mask &= ts >= lo
    if hi is not None:
        mask &= ts < hi
    return mask


def contiguous_runs(ts: np.ndarray, bar_ms: int, max_gap_bars: int) -> list[slice]:
    """Slices of ``ts`` (strictly increasing) with no hole of more than ``max_gap_bars`` missing bars."""
    if ts.shape[0] == 0:
        return []
    missing = np.diff(ts) // bar_ms - 1
    cuts = np.flatnonzero(missing > max_gap_bars) + 1
    starts = np.concatenate(([0], cuts))
    ends = np.concatenate((cuts, [ts.shape[0]]))
    return [slice(int(a), int(b)) for a, b in zip(starts, ends, strict=True)]


def make_segment(pair: str, split: str, cols: Columns, fs: FeatureSet | None = None) -> Segment:
    """A segment from already-clean columns; computes its features (``fs``, default ``short_v1``) on its own
    candles only."""
    fs = fs if fs is not None else feature_set(None)
    arrays = {k: np.ascontiguousarray(cols[k]) for k in COLUMNS}
    feats = fs.batch(arrays["open"], arrays["high"], arrays["low"], arrays["close"], arrays["volume"])
    return Segment(pair, pair_symbol(pair), split, arrays["ts"].astype(np.int64), arrays["open"], arrays["high"],
                   arrays["low"], arrays["close"], arrays["volume"], feats, fs.name, fs.warmup_bars)


def segments_of(pair: str, cols: Columns, dates: SplitDates, bar_ms: int, max_gap_bars: int,
                min_bars: int, fs: FeatureSet | None = None) -> tuple[dict[str, list[Segment]], dict[str, int]]:
    """Split one pair's clean columns by time, then into contiguous runs; drop runs shorter than ``min_bars``."""
    out: dict[str, list[Segment]] = {s: [] for s in SPLITS}
    dropped = {s: 0 for s in SPLITS}
    for split in SPLITS:
        rows = np.flatnonzero(split_rows(cols["ts"], dates, split))
        sub = {k: cols[k][rows] for k in COLUMNS}
        for run in contiguous_runs(sub["ts"], bar_ms, max_gap_bars):
            if run.stop - run.start < min_bars:
                dropped[split] += 1
                continue
            out[split].append(make_segment(pair, split, {k: sub[k][run] for k in COLUMNS}, fs))
    return out, dropped


def min_segment_bars(episode_length: int, warmup_bars: int | None = None) -> int:
    """Warm-up plus one full episode: ``episode_length`` bars, each decision needing the next candle."""
    return (feature_set(None).warmup_bars if warmup_bars is None else warmup_bars) + episode_length


def load_dataset(
    data_dir: Path,
    pairs: Sequence[str],
    timeframe: str,
    dates: SplitDates,
    *,
    episode_length: int,
    max_gap_bars: int = 12,
    file_pattern: str = "{pair}-{timeframe}.csv.gz",
    feature_set_name: str | None = None,
) -> Dataset:
    """Load every pair, split by time and segment; :class:`DataError` if a file is missing or a split
    needed for training (train, validation) ends up empty."""
    bar_ms = timeframe_ms(timeframe)
    ds = Dataset(timeframe, dates)
    fs = feature_set(feature_set_name)
    min_bars = min_segment_bars(episode_length, fs.warmup_bars)
    missing = [str(pair_file(data_dir, p, timeframe, file_pattern)) for p in pairs
               if not pair_file(data_dir, p, timeframe, file_pattern).is_file()]
    if missing:
        raise DataError(f"candle files not found: {', '.join(missing)} (use --data-dir to point at the data)")
    for pair in pairs:
        try:
            cols, invalid = load_valid(pair_file(data_dir, pair, timeframe, file_pattern), bar_ms)
        except FeedError as exc:
            raise DataError(str(exc)) from None
        ds.invalid_rows[pair] = invalid
        segs, dropped = segments_of(pair, cols, dates, bar_ms, max_gap_bars, min_bars, fs)
        for split in SPLITS:
            ds.segments[split].extend(segs[split])
            ds.dropped_short[split] += dropped[split]
    for split in ("train", "validation"):
        if not ds.segments[split]:
            lo, hi = dates.bounds(split)
            since = format_utc(lo) if lo is not None else "the start"
            until = format_utc(hi) if hi is not None else "the end"
            raise DataError(
                f"no {split} segment of at least {min_bars} bars in {data_dir} for {list(pairs)} "
                f"between {since} and {until}"
            )
    return ds
