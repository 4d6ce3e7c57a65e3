"""The policy's observation: one definition shared by the daemon, the backtester and training.

Two versioned feature sets live here, looked up by name through :func:`feature_set` (a model's metadata names
its set; models that name none use :data:`DEFAULT_FEATURE_SET`):

* ``short_v1`` - the shipped 20-value observation below (48-bar look-back), unchanged;
* ``trend_v1`` - multi-horizon (1-90 day) volatility-normalised returns and volatility regime, see the
  section "Feature set trend_v1" further down.

A policy only behaves in production as it did in training if it sees the *same numbers*, so every
feature is defined once here, in two forms that are tested to agree bar for bar:

* :class:`StreamingFeatures` - for the daemon: one closed candle at a time, plain Python floats,
  ``collections.deque`` and ``math`` (numpy's per-call overhead would dominate a 20-number vector
  on the per-candle hot path).
* :func:`batch_market_features` - for the backtester and the training environment: a whole history
  at once, vectorised numpy.

Every window is *finite* (no recursive EMA): a feature at bar ``t`` depends only on the last
:data:`WARMUP_BARS` candles, so a daemon restarted and warmed up on those candles produces exactly
the vector it would have produced had it never stopped, and the batch form has no look-ahead.

Features are raw (unnormalised); the model normalises them itself. Two numerical choices keep the
two forms equal and keep flat markets at exact zeros instead of ``1e-13`` rounding noise (which a
z-score would blow up into garbage):

* close-price statistics are taken on ``d_i = c_i - c_t`` (exactly ``0.0`` when prices are flat),
  never on raw prices or on running/cumulative sums;
* "0 when the denominator is 0" tests an exact ``0.0``, which the above makes reachable.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from alphapulse.domain import Candle

__all__ = [
    "DEFAULT_FEATURE_SET",
    "FEATURE_NAMES",
    "FEATURE_SETS",
    "FEATURE_SET_SHORT",
    "FEATURE_SET_TREND",
    "MARKET_FEATURES",
    "OBS_SIZE",
    "POSITION_FEATURES",
    "TREND_DAYS",
    "TREND_FEATURE_NAMES",
    "TREND_MARKET_FEATURES",
    "TREND_WARMUP_BARS",
    "WARMUP_BARS",
    "FeatureSet",
    "StreamingFeatures",
    "StreamingTrendFeatures",
    "batch_market_features",
    "batch_trend_features",
    "feature_set",
    "feature_set_for_names",
    "observation",
    "observation_for",
    "position_features",
    "position_fractions",
    "trend_warmup_bars",
]

# Fixed order: the ONNX model's input is built against these names. Never rename or reorder.
MARKET_FEATURES: tuple[str, ...] = (
    "ret_1",
    "ret_3",
    "ret_6",
    "ret_12",
    "ret_24",
    "ret_48",
    "vol_12",
    "vol_48",
    "rsi_14",
    "mom_12",
    "mom_48",
    "zscore_48",
    "range_1",
    "body_1",
    "upper_wick_1",
    "lower_wick_1",
    "volume_ratio_12",
    "volume_ratio_48",
)
POSITION_FEATURES: tuple[str, ...] = ("position_frac", "unrealized_pnl_frac")
FEATURE_NAMES: tuple[str, ...] = MARKET_FEATURES + POSITION_FEATURES
OBS_SIZE: int = len(FEATURE_NAMES)

_RET_LAGS: tuple[int, ...] = (1, 3, 6, 12, 24, 48)
_VOL_SHORT, _VOL_LONG = 12, 48
_RSI_WINDOW = 14
_MOM_SHORT, _MOM_LONG = 12, 48
_ZSCORE_WINDOW = 48
_VOLUME_SHORT, _VOLUME_LONG = 12, 48

# ret_48 and a 48-return window both need 49 closes; nothing looks further back.
WARMUP_BARS: int = 49

# Rows per numpy block in the batch form: bounds the (rows x 48) temporaries to ~25 MB each
# instead of ~200 MB per temporary on a 500k-row history, at no measurable speed cost.
_BATCH_CHUNK = 1 << 16


# --------------------------------------------------------------------------------------------
# Streaming form
# --------------------------------------------------------------------------------------------


def _pstd(values: Sequence[float], mean: float) -> float:
    """Population std around a given mean; ``math.dist`` does the sum of squares in C, accurately."""
    return math.dist(values, [mean] * len(values)) / math.sqrt(len(values))


class StreamingFeatures:
    """Market features, one closed candle at a time, for the daemon.

    State is nothing but the last :data:`WARMUP_BARS` closes and the last 48 one-bar returns and
    volumes, so :meth:`warmup` on the candles before a restart reproduces the running state
    bit for bit. The caller feeds each closed candle once, in time order (de-duplication and gap
    handling belong to the market-data stage; a gap is treated as adjacent bars, as in the batch
    form).
    """

    __slots__ = ("_closes", "_returns", "_volumes")

    def __init__(self) -> None:
        self._closes: deque[float] = deque(maxlen=WARMUP_BARS)
        self._returns: deque[float] = deque(maxlen=_VOL_LONG)
        self._volumes: deque[float] = deque(maxlen=_VOLUME_LONG)

    @property
    def ready(self) -> bool:
        """True once enough candles were seen that :meth:`update` returns a vector."""
        return len(self._closes) == WARMUP_BARS

    def reset(self) -> None:
        """Forget all history (e.g. after a data gap the caller does not want bridged)."""
        self._closes.clear()
        self._returns.clear()
        self._volumes.clear()

    def warmup(self, candles: Iterable[Candle]) -> list[float] | None:
        """Reset, then replay the last :data:`WARMUP_BARS` of ``candles``; returns the last vector.

        Only the tail matters because every window is finite, so passing a long history costs
        no more than passing the last 49 candles.
        """
        self.reset()
        result: list[float] | None = None
        for candle in deque(candles, maxlen=WARMUP_BARS):
            result = self.update(candle)
        return result

    def update(self, candle: Candle) -> list[float] | None:
        """Add one closed candle; return the market features after it, or None while warming up."""
        c = float(candle.close)
        if not c > 0.0:  # also rejects NaN; a log return of a non-positive price is meaningless
            raise ValueError(f"candle close must be a positive number, got {candle.close!r}")
        closes = self._closes
        returns = self._returns
        volumes = self._volumes
        v = float(candle.volume)
        if closes:
            returns.append(math.log(c / closes[-1]))
        closes.append(c)
        volumes.append(v)
        if len(closes) < WARMUP_BARS:
            return None

        log = math.log
        # closes holds c_{t-48} .. c_t, so c_{t-n} is closes[-1 - n].
        rets = [log(c / closes[-1 - n]) for n in _RET_LAGS]

        r_all = list(returns)
        r_short = r_all[-_VOL_SHORT:]
        mean_long = sum(r_all) / _VOL_LONG
        mean_short = sum(r_short) / _VOL_SHORT
        vol_long = _pstd(r_all, mean_long)
        vol_short = _pstd(r_short, mean_short)

        r_rsi = r_all[-_RSI_WINDOW:]
        abs_sum = sum(map(abs, r_rsi))
        rsi = sum(r_rsi) / abs_sum if abs_sum > 0.0 else 0.0

        # Closes relative to the current one: exact zeros when flat (see module docstring).
        d_long = [x - c for x in closes][1:]  # last 48 closes, c_{t-47} .. c_t
        md_long = sum(d_long) / _MOM_LONG
        md_short = sum(d_long[-_MOM_SHORT:]) / _MOM_SHORT
        # mom = c / mean - 1 = (c - mean) / mean with mean = c + md.
        mom_short = -md_short / (c + md_short)
        mom_long = -md_long / (c + md_long)
        z_std = _pstd(d_long, md_long)
        zscore = -md_long / z_std if z_std > 0.0 else 0.0

        o = float(candle.open)
        h = float(candle.high)
        lo = float(candle.low)
        top = max(c, o)
        bottom = min(c, o)

        v_all = list(volumes)
        vmean_long = sum(v_all) / _VOLUME_LONG
        vmean_short = sum(v_all[-_VOLUME_SHORT:]) / _VOLUME_SHORT
        vr_short = math.log1p(v / vmean_short) if vmean_short > 0.0 else 0.0
        vr_long = math.log1p(v / vmean_long) if vmean_long > 0.0 else 0.0

        rets.extend(
            (
                vol_short,
                vol_long,
                rsi,
                mom_short,
                mom_long,
                zscore,
                (h - lo) / c,
                (c - o) / c,
                (h - top) / c,
                (bottom - lo) / c,
                vr_short,
                vr_long,
            )
        )
        return rets


# --------------------------------------------------------------------------------------------
# Batch form
# --------------------------------------------------------------------------------------------


def _rolling(x: np.ndarray, window: int, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``out[t] = fn(windows)`` for the window ``x[t-window+1 .. t]``; NaN where it is incomplete.

    ``fn`` gets a (rows, window) block of a sliding-window *view* and reduces along axis 1;
    blocks bound the temporaries' memory.
    """
    out = np.full(x.shape[0], np.nan)
    if x.shape[0] < window:
        return out
    view = sliding_window_view(x, window)
    for start in range(0, view.shape[0], _BATCH_CHUNK):
        block = view[start : start + _BATCH_CHUNK]
        out[window - 1 + start : window - 1 + start + block.shape[0]] = fn(block)
    return out


def _block_pstd(block: np.ndarray) -> np.ndarray:
    mean = block.sum(axis=1) / block.shape[1]
    dev = block - mean[:, None]
    return np.sqrt(np.einsum("ij,ij->i", dev, dev) / block.shape[1])


def _block_rsi(block: np.ndarray) -> np.ndarray:
    abs_sum = np.abs(block).sum(axis=1)
    total = block.sum(axis=1)
    safe = np.where(abs_sum > 0.0, abs_sum, 1.0)
    return np.where(abs_sum > 0.0, total / safe, 0.0)


def _block_mean(block: np.ndarray) -> np.ndarray:
    return block.sum(axis=1) / block.shape[1]


def _close_stats(close: np.ndarray, out: np.ndarray, col_mom_short: int, col_mom_long: int, col_z: int) -> None:
    """mom_12, mom_48 and zscore_48 from closes relative to the window's last close (exact zeros when flat)."""
    n = close.shape[0]
    w = _ZSCORE_WINDOW
    if n < w:
        return
    view = sliding_window_view(close, w)
    for start in range(0, view.shape[0], _BATCH_CHUNK):
        block = view[start : start + _BATCH_CHUNK]
        c = block[:, -1]
        d = block - c[:, None]
        md_long = d.sum(axis=1) / w
        md_short = d[:, -_MOM_SHORT:].sum(axis=1) / _MOM_SHORT
        dev = d - md_long[:, None]
        std = np.sqrt(np.einsum("ij,ij->i", dev, dev) / w)
        safe = np.where(std > 0.0, std, 1.0)
        rows = slice(w - 1 + start, w - 1 + start + block.shape[0])
        out[rows, col_mom_short] = -md_short / (c + md_short)
        out[rows, col_mom_long] = -md_long / (c + md_long)
        out[rows, col_z] = np.where(std > 0.0, -md_long / safe, 0.0)


def _volume_ratio(volume: np.ndarray, window: int) -> np.ndarray:
    mean = _rolling(volume, window, _block_mean)
    positive = mean > 0.0  # NaN (incomplete window) compares False and is restored below
    ratio = np.zeros_like(mean)
    ratio[positive] = np.log1p(volume[positive] / mean[positive])
    ratio[np.isnan(mean)] = np.nan
    return ratio


def batch_market_features(
    open: np.ndarray, high: np.ndarray, low: np.ndarray, close: np.ndarray, volume: np.ndarray
) -> np.ndarray:
    """Market features for a whole history: shape ``(n, len(MARKET_FEATURES))``, float64.

    Row ``t`` equals :meth:`StreamingFeatures.update` after candle ``t`` (to ~1e-12, only summation
    order differs) and uses candles ``<= t`` only. Rows before ``WARMUP_BARS - 1`` are NaN.
    """
    o, h, lo, c, v = (np.ascontiguousarray(a, dtype=np.float64) for a in (open, high, low, close, volume))
    n = c.shape[0]
    for name, arr in (("open", o), ("high", h), ("low", lo), ("close", c), ("volume", v)):
        if arr.ndim != 1 or arr.shape[0] != n:
            raise ValueError(f"{name} must be 1-D with the same length as close ({n}), got shape {arr.shape}")
    if not np.all(c > 0.0):  # also rejects NaN, like the streaming form
        raise ValueError("close prices must all be positive numbers")

    out = np.full((n, len(MARKET_FEATURES)), np.nan)
    if n < WARMUP_BARS:
        return out
    col = {name: i for i, name in enumerate(MARKET_FEATURES)}

    for lag in _RET_LAGS:
        out[lag:, col[f"ret_{lag}"]] = np.log(c[lag:] / c[:-lag])

    r = np.empty(n)
    r[0] = 0.0  # placeholder; every window that includes it lies before WARMUP_BARS - 1 and is blanked
    r[1:] = np.log(c[1:] / c[:-1])
    out[:, col["vol_12"]] = _rolling(r, _VOL_SHORT, _block_pstd)
    out[:, col["vol_48"]] = _rolling(r, _VOL_LONG, _block_pstd)
    out[:, col["rsi_14"]] = _rolling(r, _RSI_WINDOW, _block_rsi)

    _close_stats(c, out, col["mom_12"], col["mom_48"], col["zscore_48"])

    top = np.maximum(o, c)
    bottom = np.minimum(o, c)
    out[:, col["range_1"]] = (h - lo) / c
    out[:, col["body_1"]] = (c - o) / c
    out[:, col["upper_wick_1"]] = (h - top) / c
    out[:, col["lower_wick_1"]] = (bottom - lo) / c

    out[:, col["volume_ratio_12"]] = _volume_ratio(v, _VOLUME_SHORT)
    out[:, col["volume_ratio_48"]] = _volume_ratio(v, _VOLUME_LONG)

    out[: WARMUP_BARS - 1] = np.nan
    return out


# --------------------------------------------------------------------------------------------
# Position features and the full observation
# --------------------------------------------------------------------------------------------


def _clip_unit(x: float) -> float:
    """Clip to [-1, 1]; NaN becomes 0 because a NaN must never reach the model."""
    x = float(x)
    if math.isnan(x):
        return 0.0
    return max(-1.0, min(x, 1.0))


def position_fractions(
    position_notional: float, max_position_notional: float, unrealized_pnl: float, equity: float
) -> tuple[float, float]:
    """Portfolio quantities -> ``(position_frac, unrealized_pnl_frac)``, per the feature definitions.

    Kept here so the portfolio, the backtester and the training environment cannot disagree on
    the zero-denominator cases: no maximum position (``<= 0``) gives 0, and so does
    ``equity <= 0`` (a blown account has no meaningful PnL fraction).
    """
    pos = position_notional / max_position_notional if max_position_notional > 0.0 else 0.0
    pnl = unrealized_pnl / equity if equity > 0.0 else 0.0
    return _clip_unit(pos), _clip_unit(pnl)


def position_features(position_frac: float, unrealized_pnl_frac: float) -> list[float]:
    """The two portfolio features in :data:`POSITION_FEATURES` order, clipped to [-1, 1]."""
    return [_clip_unit(position_frac), _clip_unit(unrealized_pnl_frac)]


def observation(market: Sequence[float], position_frac: float, unrealized_pnl_frac: float) -> list[float]:
    """The full model input in :data:`FEATURE_NAMES` order: market features then position features."""
    if len(market) != len(MARKET_FEATURES):
        raise ValueError(f"expected {len(MARKET_FEATURES)} market features, got {len(market)}")
    # on the per-candle path: the market features are already a list of floats (both forms produce one)
    head = market if type(market) is list else [float(x) for x in market]
    if position_frac == 0.0 and unrealized_pnl_frac == 0.0:  # flat: nothing to clip
        return [*head, 0.0, 0.0]
    return head + [_clip_unit(position_frac), _clip_unit(unrealized_pnl_frac)]


class FeatureSource(Protocol):
    """What the engine needs from features: the market vector after each candle (None while warming up).
    :class:`StreamingFeatures` (the daemon) and :class:`PrecomputedFeatures` (backtests, training) both fit."""

    def update(self, candle: Candle) -> list[float] | None: ...


class PrecomputedFeatures:
    """The batch form replayed through the streaming interface, for backtests and training.

    ``update`` ignores the candle's values and returns the next row of a matrix computed once by
    :func:`batch_market_features` over the same candles in the same order (None for warm-up rows), so the
    engine's per-candle code runs unchanged while features cost an index instead of ~8 µs.  Streaming and
    batch agree to 1e-9 (tests/test_features.py).
    """

    __slots__ = ("_i", "_rows")

    def __init__(self, matrix: np.ndarray) -> None:
        rows: list[list[float] | None] = matrix.tolist()  # one C-level conversion for the whole matrix
        for i, r in enumerate(rows):
            if r is not None and math.isnan(r[0]):  # warm-up rows: the first WARMUP_BARS - 1 only
                rows[i] = None
        self._rows = rows
        self._i = 0

    @property
    def ready(self) -> bool:
        return 0 < self._i <= len(self._rows) and self._rows[self._i - 1] is not None

    def update(self, candle: Candle) -> list[float] | None:
        row = self._rows[self._i]
        self._i += 1
        return row


# ============================================================================================
# Feature set trend_v1: multi-horizon volatility-normalised returns and volatility regime
# ============================================================================================
#
# Why: the short-horizon set above looks back at most 48 bars; its best correlation with the next
# bar's return is short-term reversal that fees eat. Time-series momentum in crypto and futures lives
# at horizons of weeks to months, so this set describes 1 day .. 1 quarter of history, every number
# scale-free (a pair never seen in training, at any price level, looks like the training pairs):
#
# * ``z_{d}d`` for d in 1, 3, 7, 14, 30, 60, 90 days: the ``d``-day log return divided by its
#   expected size under a random walk with the current 30-day volatility,
#   ``log(c_t / c_{t-n}) / (sigma_30d * sqrt(n))`` with ``n = d * bars_per_day`` and
#   ``sigma_30d`` the population std of the last ``30 * bars_per_day`` one-bar log returns
#   (0 when sigma is 0).  Roughly N(0, 1) without a trend, whatever the pair or its volatility.
# * ``vol_ratio_1d_30d``, ``vol_ratio_7d_90d``, ``vol_ratio_30d_90d``: log of short over long realised
#   volatility (volatility regime: rising or calming markets); 0 when either volatility is 0.
# * ``vol_30d``: ``sigma_30d`` annualised (``* sqrt(365 * bars_per_day)``): the input of volatility-
#   targeted sizing (position = target_vol / vol_30d); scale-free, though pairs differ in level.
#
# Streaming form: ``StreamingTrendFeatures``, O(1) per bar: a ring buffer of closes for the lagged
# returns and, for each volatility window, running sums of the one-bar log returns and their squares
# kept *exactly* as Python integers (returns in fixed point, units of 2**-64), so the running sums
# never drift and the variance is computed from exact sums (no catastrophic cancellation).
# Batch form: ``batch_trend_features``, numpy, two-pass std per window. They agree to ~1e-12
# (tests/test_features.py). Gaps are treated as adjacent bars, as in the short-horizon set; the
# caller resets on a hole it does not want bridged (training segments do).

FEATURE_SET_SHORT = "short_v1"
FEATURE_SET_TREND = "trend_v1"

TREND_DAYS: tuple[int, ...] = (1, 3, 7, 14, 30, 60, 90)
_TREND_VOL_DAYS: tuple[int, ...] = (1, 7, 30, 90)  # realised-vol windows
_TREND_NORM_DAYS = 30  # the volatility that normalises the returns (and sizes positions)
TREND_VOL_RATIOS: tuple[tuple[int, int], ...] = ((1, 30), (7, 90), (30, 90))
TREND_MARKET_FEATURES: tuple[str, ...] = (
    *(f"z_{d}d" for d in TREND_DAYS),
    *(f"vol_ratio_{a}d_{b}d" for a, b in TREND_VOL_RATIOS),
    "vol_30d",
)
TREND_FEATURE_NAMES: tuple[str, ...] = TREND_MARKET_FEATURES + POSITION_FEATURES
TREND_BARS_PER_DAY = 24  # the registry's trend_v1 is defined on 1h bars


def trend_warmup_bars(bars_per_day: int = TREND_BARS_PER_DAY) -> int:
    """Candles needed before the first trend vector: the longest window (90 days of returns) + 1 close."""
    return max(max(TREND_DAYS), max(_TREND_VOL_DAYS)) * bars_per_day + 1


#: 2161 one-hour candles (90 days + 1).
TREND_WARMUP_BARS: int = trend_warmup_bars()

_FIX_SCALE = 2.0**64  # fixed-point unit of the exact running sums: 2**-64 in log-return units


def _check_bars_per_day(bars_per_day: int) -> int:
    if not isinstance(bars_per_day, int) or isinstance(bars_per_day, bool) or bars_per_day < 1:
        raise ValueError(f"bars_per_day must be a positive integer, got {bars_per_day!r}")
    return bars_per_day


def _log_ratio(std_a: float, std_b: float) -> float:
    return math.log(std_a / std_b) if std_a > 0.0 and std_b > 0.0 else 0.0


class StreamingTrendFeatures:
    """The ``trend_v1`` market features, one closed candle at a time (daemon); O(1) work per candle.

    Same contract as :class:`StreamingFeatures`: ``update`` returns ``None`` for the first
    ``warmup_bars - 1`` candles, then a list of plain floats in :data:`TREND_MARKET_FEATURES` order;
    :meth:`warmup` on the last ``warmup_bars`` candles reproduces the long-running state bit for bit
    (the running sums are exact integers, so they carry no history of rounding).
    """

    __slots__ = ("_bars_per_day", "_closes", "_fix", "_lags", "_s1", "_s2", "_sqrt_year", "_vol_windows",
                 "warmup_bars")

    def __init__(self, bars_per_day: int = TREND_BARS_PER_DAY) -> None:
        self._bars_per_day = _check_bars_per_day(bars_per_day)
        self.warmup_bars = trend_warmup_bars(bars_per_day)
        self._lags = tuple(d * bars_per_day for d in TREND_DAYS)
        self._vol_windows = tuple(d * bars_per_day for d in _TREND_VOL_DAYS)
        self._sqrt_year = math.sqrt(365.0 * bars_per_day)
        self._closes: deque[float] = deque(maxlen=self.warmup_bars)
        self._fix: deque[int] = deque(maxlen=max(self._vol_windows))  # fixed-point one-bar log returns
        self._s1 = [0] * len(self._vol_windows)
        self._s2 = [0] * len(self._vol_windows)

    @property
    def bars_per_day(self) -> int:
        return self._bars_per_day

    @property
    def ready(self) -> bool:
        return len(self._closes) == self.warmup_bars

    def reset(self) -> None:
        self._closes.clear()
        self._fix.clear()
        self._s1 = [0] * len(self._vol_windows)
        self._s2 = [0] * len(self._vol_windows)

    def warmup(self, candles: Iterable[Candle]) -> list[float] | None:
        """Reset, then replay the last ``warmup_bars`` of ``candles``; returns the last vector."""
        self.reset()
        result: list[float] | None = None
        for candle in deque(candles, maxlen=self.warmup_bars):
            result = self.update(candle)
        return result

    def update(self, candle: Candle) -> list[float] | None:
        c = float(candle.close)
        if not c > 0.0:
            raise ValueError(f"candle close must be a positive number, got {candle.close!r}")
        closes = self._closes
        if closes:
            q = round(math.log(c / closes[-1]) * _FIX_SCALE)  # exact: scaling by a power of two
            fix = self._fix
            n_before = len(fix)
            for k, w in enumerate(self._vol_windows):
                self._s1[k] += q
                self._s2[k] += q * q
                if n_before >= w:  # the return leaving window k is w returns back
                    old = fix[n_before - w]
                    self._s1[k] -= old
                    self._s2[k] -= old * old
            fix.append(q)
        closes.append(c)
        if len(closes) < self.warmup_bars:
            return None

        stds = []
        for k, w in enumerate(self._vol_windows):
            s1 = self._s1[k]
            num = w * self._s2[k] - s1 * s1  # exact integer, >= 0: w^2 * variance in fixed point squared
            stds.append(math.sqrt(num) / (w * _FIX_SCALE) if num > 0 else 0.0)
        std_1, std_7, std_30, std_90 = stds
        out: list[float] = []
        log = math.log
        for n in self._lags:
            out.append(log(c / closes[-1 - n]) / (std_30 * math.sqrt(n)) if std_30 > 0.0 else 0.0)
        out.append(_log_ratio(std_1, std_30))
        out.append(_log_ratio(std_7, std_90))
        out.append(_log_ratio(std_30, std_90))
        out.append(std_30 * self._sqrt_year)
        return out


def _rolling_pstd(r: np.ndarray, window: int) -> np.ndarray:
    """Population std of ``r[t-window+1 .. t]`` (two-pass, in row blocks of bounded memory); NaN before."""
    out = np.full(r.shape[0], np.nan)
    if r.shape[0] < window:
        return out
    view = sliding_window_view(r, window)
    rows = max(1, (1 << 22) // window)  # ~32 MB per temporary
    for start in range(0, view.shape[0], rows):
        block = view[start : start + rows]
        out[window - 1 + start : window - 1 + start + block.shape[0]] = _block_pstd(block)
    return out


def _safe_log_ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ok = (a > 0.0) & (b > 0.0)
    out = np.zeros_like(a)
    out[ok] = np.log(a[ok] / b[ok])
    out[np.isnan(a) | np.isnan(b)] = np.nan
    return out


def batch_trend_features(close: np.ndarray, bars_per_day: int = TREND_BARS_PER_DAY) -> np.ndarray:
    """The ``trend_v1`` market features for a whole history: shape ``(n, len(TREND_MARKET_FEATURES))``.

    Row ``t`` equals :meth:`StreamingTrendFeatures.update` after candle ``t`` (to ~1e-12) and uses
    closes ``<= t`` only; rows before ``trend_warmup_bars(bars_per_day) - 1`` are NaN.
    """
    _check_bars_per_day(bars_per_day)
    c = np.ascontiguousarray(close, dtype=np.float64)
    if c.ndim != 1:
        raise ValueError(f"close must be 1-D, got shape {c.shape}")
    if not np.all(c > 0.0):
        raise ValueError("close prices must all be positive numbers")
    n = c.shape[0]
    warmup = trend_warmup_bars(bars_per_day)
    out = np.full((n, len(TREND_MARKET_FEATURES)), np.nan)
    if n < warmup:
        return out
    r = np.zeros(n)
    r[1:] = np.log(c[1:] / c[:-1])
    # r[0] is a placeholder: only windows ending before the warm-up include it
    std = {d: _rolling_pstd(r, d * bars_per_day) for d in _TREND_VOL_DAYS}
    s30 = std[_TREND_NORM_DAYS]
    pos = s30 > 0.0
    for j, d in enumerate(TREND_DAYS):
        lag = d * bars_per_day
        ret = np.full(n, np.nan)
        ret[lag:] = np.log(c[lag:] / c[:-lag])
        z = np.zeros(n)
        z[pos] = ret[pos] / (s30[pos] * math.sqrt(lag))
        out[:, j] = z
    j = len(TREND_DAYS)
    for a, b in TREND_VOL_RATIOS:
        out[:, j] = _safe_log_ratio(std[a], std[b])
        j += 1
    out[:, j] = s30 * math.sqrt(365.0 * bars_per_day)
    out[: warmup - 1] = np.nan
    return out


def observation_for(names: Sequence[str], market: Sequence[float], position_frac: float,
                    unrealized_pnl_frac: float) -> list[float]:
    """A feature set's full model input: its market features then the two position features."""
    n_market = len(names) - len(POSITION_FEATURES)
    if len(market) != n_market:
        raise ValueError(f"expected {n_market} market features, got {len(market)}")
    head = market if type(market) is list else [float(x) for x in market]
    if position_frac == 0.0 and unrealized_pnl_frac == 0.0:  # flat: nothing to clip
        return [*head, 0.0, 0.0]
    return head + position_features(position_frac, unrealized_pnl_frac)


# --------------------------------------------------------------------------------------------
# Registry: a model's metadata names its feature set; code gets everything else from here
# --------------------------------------------------------------------------------------------


class StreamingSource(Protocol):
    """What both streaming classes offer: per-candle update, warm-up replay, reset, readiness."""

    @property
    def ready(self) -> bool: ...

    def reset(self) -> None: ...

    def warmup(self, candles: Iterable[Candle]) -> list[float] | None: ...

    def update(self, candle: Candle) -> list[float] | None: ...


BatchFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _batch_trend_ohlcv(open: np.ndarray, high: np.ndarray, low: np.ndarray, close: np.ndarray,
                       volume: np.ndarray) -> np.ndarray:
    return batch_trend_features(close)


@dataclass(frozen=True)
class FeatureSet:
    """Everything a consumer needs to build a feature set's observations.

    ``streaming()`` makes a fresh streaming instance; ``batch(open, high, low, close, volume)`` computes a
    whole history; ``warmup_bars`` candles give the first vector; ``feature_names`` is the model input
    order (market features then position features); ``timeframe`` is the bar length it is defined on
    (``None``: any); ``vol_feature`` names the market feature that is the annualised realised volatility used
    by volatility-targeted sizing (``None``: the set has none, so vol targeting cannot run on it).
    """

    name: str
    market_features: tuple[str, ...]
    warmup_bars: int
    streaming: Callable[[], StreamingSource]
    batch: BatchFn
    timeframe: str | None
    vol_feature: str | None = None

    @property
    def vol_index(self) -> int | None:
        """Index of :attr:`vol_feature` in the market vector (None when the set has no volatility feature)."""
        return None if self.vol_feature is None else self.market_features.index(self.vol_feature)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.market_features + POSITION_FEATURES

    @property
    def obs_size(self) -> int:
        return len(self.feature_names)

    def observation(self, market: Sequence[float], position_frac: float, unrealized_pnl_frac: float) -> list[float]:
        return observation_for(self.feature_names, market, position_frac, unrealized_pnl_frac)


FEATURE_SETS: dict[str, FeatureSet] = {
    FEATURE_SET_SHORT: FeatureSet(FEATURE_SET_SHORT, MARKET_FEATURES, WARMUP_BARS, StreamingFeatures,
                                  batch_market_features, None),
    FEATURE_SET_TREND: FeatureSet(FEATURE_SET_TREND, TREND_MARKET_FEATURES, TREND_WARMUP_BARS,
                                  StreamingTrendFeatures, _batch_trend_ohlcv, "1h", "vol_30d"),
}
#: The set of models whose metadata names none (the shipped PPO model predates the registry).
DEFAULT_FEATURE_SET = FEATURE_SET_SHORT


def feature_set(name: str | None = None) -> FeatureSet:
    """The registered feature set called ``name`` (``None``: :data:`DEFAULT_FEATURE_SET`); KeyError lists the known."""
    key = DEFAULT_FEATURE_SET if name is None else name
    try:
        return FEATURE_SETS[key]
    except KeyError:
        raise KeyError(f"unknown feature set {key!r}; known: {sorted(FEATURE_SETS)}") from None


def feature_set_for_names(names: Sequence[str]) -> FeatureSet:
    """The registered set whose ``feature_names`` equal ``names`` exactly (for models that carry only names)."""
    for fs in FEATURE_SETS.values():
        if tuple(names) == fs.feature_names:
            return fs
    raise KeyError(f"no registered feature set has these feature names: {list(names)[:4]}...")
