"""Features: streaming == batch on real candles, restart equivalence, hand-computed values, no look-ahead.

The daemon (streaming) and training/backtest (batch) must feed the policy identical numbers, so
the central check runs both forms over the bundled real BTC perpetual 5m history and compares
every bar.
"""

from __future__ import annotations

import csv
import gzip
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from alphapulse.domain import Candle
from alphapulse.features import (
    DEFAULT_FEATURE_SET,
    FEATURE_NAMES,
    FEATURE_SET_SHORT,
    FEATURE_SET_TREND,
    FEATURE_SETS,
    MARKET_FEATURES,
    OBS_SIZE,
    POSITION_FEATURES,
    TREND_DAYS,
    TREND_FEATURE_NAMES,
    TREND_MARKET_FEATURES,
    TREND_WARMUP_BARS,
    WARMUP_BARS,
    StreamingFeatures,
    StreamingTrendFeatures,
    batch_market_features,
    batch_trend_features,
    feature_set,
    feature_set_for_names,
    observation,
    observation_for,
    position_features,
    position_fractions,
    trend_warmup_bars,
)

DATA_FILE = Path(__file__).resolve().parents[1] / "alphapulse" / "data" / "BTC_USDT_USDT-5m.csv.gz"
COL = {name: i for i, name in enumerate(MARKET_FEATURES)}
PRICE_FEATURES = [name for name in MARKET_FEATURES if not name.startswith("volume_ratio")]


@dataclass(frozen=True)
class History:
    candles: list[Candle]
    ohlcv: np.ndarray  # (n, 5): open, high, low, close, volume

    def batch(self) -> np.ndarray:
        return batch_ohlcv(self.ohlcv)


def batch_ohlcv(ohlcv: np.ndarray) -> np.ndarray:
    return batch_market_features(ohlcv[:, 0], ohlcv[:, 1], ohlcv[:, 2], ohlcv[:, 3], ohlcv[:, 4])


def candles_to_ohlcv(candles: list[Candle]) -> np.ndarray:
    return np.array([[c.open, c.high, c.low, c.close, c.volume] for c in candles], dtype=np.float64)


@pytest.fixture(scope="module")
def real() -> History:
    """The bundled real candles, read with the csv module (the loader is another module's job)."""
    with gzip.open(DATA_FILE, "rt", newline="") as fh:
        reader = csv.reader(fh)
        assert next(reader) == ["timestamp", "open", "high", "low", "close", "volume"]
        candles = [Candle(int(r[0]), float(r[1]), float(r[2]), float(r[3]), float(r[4]), float(r[5])) for r in reader]
    assert len(candles) > 20_000
    return History(candles, candles_to_ohlcv(candles))


@pytest.fixture(scope="module")
def real_streamed(real: History) -> list[list[float] | None]:
    feats = StreamingFeatures()
    return [feats.update(c) for c in real.candles]


def make_candles(
    closes: list[float],
    *,
    volumes: list[float] | None = None,
    last_ohlc: tuple[float, float, float, float] | None = None,
) -> list[Candle]:
    """Candles with open=high=low=close (so only the chosen last candle has a body/wicks)."""
    vols = volumes if volumes is not None else [1.0] * len(closes)
    out = [Candle(i * 300_000, c, c, c, c, v) for i, (c, v) in enumerate(zip(closes, vols, strict=True))]
    if last_ohlc is not None:
        o, h, lo, c = last_ohlc
        out[-1] = Candle(out[-1].ts, o, h, lo, c, out[-1].volume)
    return out


def last_vectors(candles: list[Candle]) -> tuple[list[float], np.ndarray]:
    """The last bar's features from both forms."""
    feats = StreamingFeatures()
    streamed = None
    for c in candles:
        streamed = feats.update(c)
    assert streamed is not None
    return streamed, batch_ohlcv(candles_to_ohlcv(candles))[-1]


# ------------------------------------------------------------------ names (ONNX contract)


def test_feature_names_are_the_fixed_contract() -> None:
    assert MARKET_FEATURES == (
        "ret_1", "ret_3", "ret_6", "ret_12", "ret_24", "ret_48", "vol_12", "vol_48", "rsi_14", "mom_12", "mom_48",
        "zscore_48", "range_1", "body_1", "upper_wick_1", "lower_wick_1", "volume_ratio_12", "volume_ratio_48",
    )  # fmt: skip
    assert POSITION_FEATURES == ("position_frac", "unrealized_pnl_frac")
    assert FEATURE_NAMES == MARKET_FEATURES + POSITION_FEATURES
    assert OBS_SIZE == 20 == len(set(FEATURE_NAMES))
    assert WARMUP_BARS == 49


# ------------------------------------------------------------------ 1. streaming == batch on real data


def test_streaming_equals_batch_at_every_bar_on_real_data(
    real: History, real_streamed: list[list[float] | None]
) -> None:
    batch = real.batch()
    n = len(real.candles)
    assert batch.shape == (n, len(MARKET_FEATURES))
    assert batch.dtype == np.float64

    assert all(v is None for v in real_streamed[: WARMUP_BARS - 1])
    assert np.isnan(batch[: WARMUP_BARS - 1]).all()

    assert all(v is not None and len(v) == len(MARKET_FEATURES) for v in real_streamed[WARMUP_BARS - 1 :])
    streamed = np.array(real_streamed[WARMUP_BARS - 1 :], dtype=np.float64)
    assert np.isfinite(streamed).all()
    assert np.isfinite(batch[WARMUP_BARS - 1 :]).all()

    diff = np.abs(streamed - batch[WARMUP_BARS - 1 :])
    worst = {name: float(diff[:, i].max()) for i, name in enumerate(MARKET_FEATURES)}
    assert max(worst.values()) <= 1e-12, worst  # measured: 2.2e-15; 1e-12 leaves room, 1e-9 hid real drift

    # The comparison is only meaningful if the features actually move on this data.
    assert (np.std(streamed, axis=0) > 0).all()


def test_streaming_returns_plain_python_floats(real_streamed: list[list[float] | None]) -> None:
    vec = real_streamed[-1]
    assert vec is not None
    assert all(type(x) is float for x in vec)


# ------------------------------------------------------------------ 2. restart equivalence


@pytest.mark.parametrize("k", [WARMUP_BARS - 1, WARMUP_BARS, 1_000, 12_345, 40_000, -1])
def test_restart_warmup_reproduces_the_long_running_vector(
    real: History, real_streamed: list[list[float] | None], k: int
) -> None:
    k = k % len(real.candles)
    restarted = StreamingFeatures()
    tail = real.candles[max(0, k - WARMUP_BARS) : k]
    restarted.warmup(tail)
    assert restarted.ready == (len(tail) >= WARMUP_BARS)
    vec = restarted.update(real.candles[k])
    assert vec is not None
    assert vec == real_streamed[k]  # bit-identical: the state is only the finite windows

    # warmup() keeps only the tail, so replaying a long history gives the same result as well.
    assert StreamingFeatures().warmup(real.candles[: k + 1]) == real_streamed[k]


def test_warmup_replaces_previous_state(real: History, real_streamed: list[list[float] | None]) -> None:
    feats = StreamingFeatures()
    for c in real.candles[5_000:5_100]:
        feats.update(c)
    assert feats.warmup(real.candles[200:301]) == real_streamed[300]
    assert feats.update(real.candles[301]) == real_streamed[301]


def test_ready_and_reset(real: History) -> None:
    feats = StreamingFeatures()
    assert not feats.ready
    for i, c in enumerate(real.candles[:WARMUP_BARS]):
        out = feats.update(c)
        assert (out is None) == (i < WARMUP_BARS - 1)
        assert feats.ready == (i == WARMUP_BARS - 1)
    feats.reset()
    assert not feats.ready
    assert feats.update(real.candles[WARMUP_BARS]) is None
    assert feats.warmup(real.candles[:10]) is None
    assert not feats.ready


# ------------------------------------------------------------------ 3. hand-computed values


def test_hand_computed_jump_example() -> None:
    """48 bars flat at 100, then one bar closing at 148 with a volume spike: every feature by hand."""
    closes = [100.0] * 48 + [148.0]
    volumes = [1.0] * 48 + [25.0]
    candles = make_candles(closes, volumes=volumes, last_ohlc=(100.0, 150.0, 99.0, 148.0))
    big = math.log(1.48)
    expected = {
        **{f"ret_{n}": big for n in (1, 3, 6, 12, 24, 48)},
        # one non-zero return L among n: population std = L * sqrt(n - 1) / n
        "vol_12": big * math.sqrt(11) / 12,
        "vol_48": big * math.sqrt(47) / 48,
        "rsi_14": 1.0,
        "mom_12": 148 / ((11 * 100 + 148) / 12) - 1,  # = 11/26
        "mom_48": 148 / 101 - 1,  # mean of 47 x 100 and 148 is 101
        "zscore_48": math.sqrt(47),  # deviations: 47 x (-1) and +47 -> variance 47
        "range_1": 51 / 148,
        "body_1": 48 / 148,
        "upper_wick_1": 2 / 148,
        "lower_wick_1": 1 / 148,
        "volume_ratio_12": math.log1p(25 / 3),  # mean of 11 x 1 and 25 is 3
        "volume_ratio_48": math.log1p(25 / 1.5),  # mean of 47 x 1 and 25 is 1.5
    }
    assert expected["mom_12"] == pytest.approx(11 / 26, abs=1e-15)
    streamed, batch = last_vectors(candles)
    for name, value in expected.items():
        assert streamed[COL[name]] == pytest.approx(value, rel=1e-12, abs=1e-15), name
        assert batch[COL[name]] == pytest.approx(value, rel=1e-12, abs=1e-15), name


def test_hand_computed_rsi_and_bearish_candle() -> None:
    """Last 14 returns: 7 x +1% and 7 x -2% -> rsi = (0.07 - 0.14) / 0.21 = -1/3."""
    rets = [0.005] * 40 + [0.01] * 7 + [-0.02] * 7
    closes = [200.0]
    for r in rets:
        closes.append(closes[-1] * math.exp(r))
    c = closes[-1]
    candles = make_candles(closes, last_ohlc=(c * 1.05, c * 1.06, c * 0.9, c))
    streamed, batch = last_vectors(candles)
    for vec in (streamed, batch):
        assert vec[COL["rsi_14"]] == pytest.approx(-1 / 3, abs=1e-9)
        assert vec[COL["ret_1"]] == pytest.approx(-0.02, abs=1e-12)
        assert vec[COL["ret_12"]] == pytest.approx(5 * 0.01 - 7 * 0.02, abs=1e-12)
        assert vec[COL["body_1"]] == pytest.approx(-0.05, abs=1e-12)
        assert vec[COL["upper_wick_1"]] == pytest.approx(0.01, abs=1e-12)
        assert vec[COL["lower_wick_1"]] == pytest.approx(0.10, abs=1e-12)
        assert vec[COL["range_1"]] == pytest.approx(0.16, abs=1e-12)


@pytest.mark.parametrize("price", [0.1, 12_345.678, 97_123.45])
def test_flat_prices_give_exact_zeros(price: float) -> None:
    """Flat prices must give exact 0.0 - not rounding noise that a z-score would amplify into garbage."""
    candles = make_candles([price] * 60, volumes=[3.0] * 60)
    streamed, batch = last_vectors(candles)
    for vec in (streamed, batch):
        assert all(math.isfinite(x) for x in vec)
        for name in PRICE_FEATURES:
            assert vec[COL[name]] == 0.0, name
        assert vec[COL["volume_ratio_12"]] == pytest.approx(math.log(2.0), abs=1e-15)
        assert vec[COL["volume_ratio_48"]] == pytest.approx(math.log(2.0), abs=1e-15)


def test_zero_volume_gives_zero_volume_ratio() -> None:
    closes = [100.0 + (i % 5) for i in range(60)]
    candles = make_candles(closes, volumes=[0.0] * 60)
    feats = StreamingFeatures()
    streamed = [feats.update(c) for c in candles]
    batch = batch_ohlcv(candles_to_ohlcv(candles))
    for t in range(WARMUP_BARS - 1, 60):
        vec = streamed[t]
        assert vec is not None
        assert vec[COL["volume_ratio_12"]] == 0.0
        assert vec[COL["volume_ratio_48"]] == 0.0
        assert batch[t, COL["volume_ratio_12"]] == 0.0
        assert batch[t, COL["volume_ratio_48"]] == 0.0
        assert all(math.isfinite(x) for x in vec)
    assert np.isfinite(batch[WARMUP_BARS - 1 :]).all()


def test_batch_on_histories_shorter_than_warmup() -> None:
    for n in (0, 1, WARMUP_BARS - 1):
        ohlcv = np.full((n, 5), 100.0)
        out = batch_ohlcv(ohlcv)
        assert out.shape == (n, len(MARKET_FEATURES))
        assert np.isnan(out).all()
    out = batch_ohlcv(np.full((WARMUP_BARS, 5), 100.0))
    assert np.isnan(out[:-1]).all() and (out[-1, : COL["volume_ratio_12"]] == 0.0).all()


def test_bad_inputs_are_rejected() -> None:
    feats = StreamingFeatures()
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="positive"):
            feats.update(Candle(0, 1.0, 1.0, 1.0, bad, 1.0))
    ohlcv = np.full((60, 5), 100.0)
    ohlcv[30, 3] = 0.0
    with pytest.raises(ValueError, match="positive"):
        batch_ohlcv(ohlcv)
    good = np.full(60, 100.0)
    with pytest.raises(ValueError, match="same length"):
        batch_market_features(good, good, good, good, good[:-1])


# ------------------------------------------------------------------ 4. no look-ahead


@pytest.mark.parametrize("t", [WARMUP_BARS - 1, 777, 2_000])
def test_batch_row_ignores_future_candles(real: History, t: int) -> None:
    ohlcv = real.ohlcv[:3_000].copy()  # every t leaves a thousand or more future rows to perturb
    before = batch_ohlcv(ohlcv)
    rng = np.random.default_rng(t)
    future = ohlcv[t + 1 :]
    future[:, :4] *= rng.uniform(0.5, 2.0, size=(len(future), 1))  # scale a bar's OHLC together
    future[:, 4] = rng.uniform(0.0, 1e4, size=len(future))
    ohlcv[t + 1 :] = future
    after = batch_ohlcv(ohlcv)
    np.testing.assert_array_equal(after[: t + 1], before[: t + 1])
    assert len(ohlcv) - (t + 1) >= 999
    assert not np.array_equal(after[t + 1 :], before[t + 1 :])  # the perturbation did reach the future


# ------------------------------------------------------------------ position features and observation


def test_position_features_are_clipped() -> None:
    assert position_features(0.25, -0.5) == [0.25, -0.5]
    assert position_features(3.0, -7.0) == [1.0, -1.0]
    assert position_features(-math.inf, math.inf) == [-1.0, 1.0]
    assert position_features(math.nan, math.nan) == [0.0, 0.0]


def test_position_fractions_handle_zero_denominators() -> None:
    assert position_fractions(-500.0, 1_000.0, 25.0, 10_000.0) == (-0.5, 0.0025)
    assert position_fractions(5_000.0, 1_000.0, -50_000.0, 10_000.0) == (1.0, -1.0)
    assert position_fractions(500.0, 0.0, 25.0, 0.0) == (0.0, 0.0)
    assert position_fractions(500.0, 1_000.0, 25.0, -10.0) == (0.5, 0.0)


def test_observation_is_market_then_position(real_streamed: list[list[float] | None]) -> None:
    market = real_streamed[-1]
    assert market is not None
    obs = observation(market, 2.0, -0.1)
    assert len(obs) == OBS_SIZE
    assert obs[: len(MARKET_FEATURES)] == market
    assert obs[FEATURE_NAMES.index("position_frac")] == 1.0
    assert obs[FEATURE_NAMES.index("unrealized_pnl_frac")] == -0.1
    with pytest.raises(ValueError, match="18"):
        observation(market[:-1], 0.0, 0.0)


# ------------------------------------------------------------------ speed (loose bounds: catch O(n*w) Python loops)


def test_batch_handles_half_a_million_rows_quickly(real: History) -> None:
    reps = -(-500_000 // len(real.candles))
    big = np.tile(real.ohlcv, (reps, 1))[:500_000]
    start = time.perf_counter()
    out = batch_ohlcv(big)
    elapsed = time.perf_counter() - start
    assert out.shape == (500_000, len(MARKET_FEATURES))
    assert np.isfinite(out[WARMUP_BARS - 1 :]).all()
    assert elapsed < 10.0, f"batch_market_features took {elapsed:.2f}s for 500k rows"


def test_streaming_update_is_cheap(real: History) -> None:
    feats = StreamingFeatures()
    candles = real.candles[:20_000]
    start = time.perf_counter()
    for c in candles:
        feats.update(c)
    per_update_us = (time.perf_counter() - start) / len(candles) * 1e6
    assert per_update_us < 60.0, f"{per_update_us:.1f} us per update"


# ================================================================== feature set "trend_v1"

TREND_LONG_FILE = Path(__file__).resolve().parent / "data" / "BTC_USDT-1h-2021-11_2022-06.csv.gz"
TREND_1H_FILE = Path(__file__).resolve().parents[1] / "alphapulse" / "data" / "BTC_USDT_USDT-1h.csv.gz"
TCOL = {name: i for i, name in enumerate(TREND_MARKET_FEATURES)}
TrendReal = tuple[list[Candle], list[list[float] | None], np.ndarray]  # candles, streamed rows, batch matrix


def read_candles(path: Path) -> list[Candle]:
    with gzip.open(path, "rt", newline="") as fh:
        reader = csv.reader(fh)
        assert next(reader) == ["timestamp", "open", "high", "low", "close", "volume"]
        return [Candle(int(r[0]), float(r[1]), float(r[2]), float(r[3]), float(r[4]), float(r[5])) for r in reader]


@pytest.fixture(scope="module", params=[TREND_1H_FILE, TREND_LONG_FILE], ids=["perp-2025", "spot-2021-22"])
def trend_real(request: pytest.FixtureRequest) -> TrendReal:
    candles = read_candles(request.param)
    assert len(candles) > TREND_WARMUP_BARS + 3_000  # > 125 days of features after the warm-up
    feats = StreamingTrendFeatures()
    streamed = [feats.update(c) for c in candles]
    batch = batch_trend_features(np.array([c.close for c in candles]))
    return candles, streamed, batch


def test_trend_names_warmup_and_registry() -> None:
    assert TREND_MARKET_FEATURES == (
        "z_1d", "z_3d", "z_7d", "z_14d", "z_30d", "z_60d", "z_90d",
        "vol_ratio_1d_30d", "vol_ratio_7d_90d", "vol_ratio_30d_90d", "vol_30d",
    )  # fmt: skip
    assert TREND_FEATURE_NAMES == TREND_MARKET_FEATURES + POSITION_FEATURES
    assert TREND_WARMUP_BARS == 90 * 24 + 1 == trend_warmup_bars(24)
    assert trend_warmup_bars(288) == 90 * 288 + 1  # 5m bars
    trend = feature_set(FEATURE_SET_TREND)
    assert (trend.name, trend.feature_names, trend.warmup_bars, trend.obs_size) == (
        "trend_v1", TREND_FEATURE_NAMES, TREND_WARMUP_BARS, 13)
    assert isinstance(trend.streaming(), StreamingTrendFeatures)
    short = feature_set(None)  # models without a feature-set name: the shipped short-horizon set
    assert short is feature_set(FEATURE_SET_SHORT) is FEATURE_SETS[DEFAULT_FEATURE_SET]
    assert (short.feature_names, short.warmup_bars) == (FEATURE_NAMES, WARMUP_BARS)
    assert isinstance(short.streaming(), StreamingFeatures)
    assert feature_set_for_names(FEATURE_NAMES) is short
    assert feature_set_for_names(TREND_FEATURE_NAMES) is trend
    with pytest.raises(KeyError, match="trend_v1"):
        feature_set("nope")
    with pytest.raises(KeyError):
        feature_set_for_names(("ret_1",))


def test_trend_streaming_equals_batch_at_every_bar(
    trend_real: TrendReal,
) -> None:
    candles, streamed, batch = trend_real
    w = TREND_WARMUP_BARS
    assert batch.shape == (len(candles), len(TREND_MARKET_FEATURES))
    assert all(v is None for v in streamed[: w - 1])
    assert np.isnan(batch[: w - 1]).all()
    s = np.array(streamed[w - 1 :], dtype=np.float64)
    assert np.isfinite(s).all() and np.isfinite(batch[w - 1 :]).all()
    worst = np.abs(s - batch[w - 1 :]).max(axis=0)
    assert worst.max() <= 1e-12, dict(zip(TREND_MARKET_FEATURES, worst, strict=True))
    assert (s.std(axis=0) > 0.01).all()  # every feature moves on real data
    assert all(type(x) is float for x in streamed[-1] or [])
    # the whole point of the normalisation: z-scores are O(1) on real data
    z = s[:, : len(TREND_DAYS)]
    assert 0.3 < float(z.std()) < 3.0 and np.abs(z).max() < 10.0


def test_trend_registry_batch_equals_direct(trend_real: TrendReal) -> None:
    candles, _, batch = trend_real
    ohlcv = candles_to_ohlcv(candles)
    via_registry = feature_set(FEATURE_SET_TREND).batch(*(ohlcv[:, i] for i in range(5)))
    np.testing.assert_array_equal(via_registry, batch)


@pytest.mark.parametrize("k", [TREND_WARMUP_BARS - 1, TREND_WARMUP_BARS + 1_000, -1])
def test_trend_restart_warmup_is_bit_identical(
    trend_real: TrendReal, k: int
) -> None:
    candles, streamed, _ = trend_real
    k %= len(candles)
    restarted = StreamingTrendFeatures()
    assert restarted.warmup(candles[: k + 1]) == streamed[k]  # only the last warm-up candles matter
    assert restarted.ready
    if k + 1 < len(candles):
        assert restarted.update(candles[k + 1]) == streamed[k + 1]


def test_trend_warmup_length_is_respected(trend_real: TrendReal) -> None:
    candles, _, _ = trend_real
    feats = StreamingTrendFeatures()
    for i, c in enumerate(candles[: TREND_WARMUP_BARS]):
        assert (feats.update(c) is None) == (i < TREND_WARMUP_BARS - 1)
        assert feats.ready == (i == TREND_WARMUP_BARS - 1)
    feats.reset()
    assert not feats.ready and feats.update(candles[0]) is None
    # a history one candle short of the warm-up has no vector in either form
    short = np.array([c.close for c in candles[: TREND_WARMUP_BARS - 1]])
    assert np.isnan(batch_trend_features(short)).all()
    assert StreamingTrendFeatures().warmup(candles[: TREND_WARMUP_BARS - 1]) is None


@pytest.mark.parametrize("t", [TREND_WARMUP_BARS - 1, TREND_WARMUP_BARS + 500, 4_000])
def test_trend_no_look_ahead(trend_real: TrendReal, t: int) -> None:
    candles, streamed, before = trend_real
    assert len(candles) - t > 1_500  # many future rows get changed
    close = np.array([c.close for c in candles])
    rng = np.random.default_rng(t)
    close[t + 1 :] *= rng.uniform(0.5, 2.0, size=len(close) - t - 1)
    after = batch_trend_features(close)
    np.testing.assert_array_equal(after[: t + 1], before[: t + 1])
    assert not np.array_equal(after[t + 1 :], before[t + 1 :])
    # the streaming form cannot look ahead by construction; it also agrees with the pre-change row
    assert np.abs(np.array(streamed[t]) - after[t]).max() <= 1e-12


@pytest.mark.parametrize("factor", [8.0, 1 / 1024, 37.3, 1e-4])
def test_trend_features_are_scale_invariant(
    trend_real: TrendReal, factor: float
) -> None:
    candles, streamed, batch = trend_real
    close = np.array([c.close for c in candles])
    scaled = batch_trend_features(close * factor)
    w = TREND_WARMUP_BARS
    if math.log2(factor).is_integer():  # a power of two scales every price exactly: identical features
        np.testing.assert_array_equal(scaled, batch)
    else:
        assert np.abs(scaled[w - 1 :] - batch[w - 1 :]).max() <= 1e-9
    feats = StreamingTrendFeatures()
    tail = [Candle(c.ts, c.open * factor, c.high * factor, c.low * factor, c.close * factor, c.volume)
            for c in candles[-w:]]
    assert np.abs(np.array(feats.warmup(tail)) - np.array(streamed[-1])).max() <= 1e-9


def test_trend_hand_computed_values() -> None:
    """Alternating +-a returns (sigma = a exactly) then a known drift: every z and ratio by hand."""
    bpd = 2  # two bars a day keeps the history short: 90-day warm-up = 181 bars
    a = 0.01
    rets = [a if i % 2 == 0 else -a for i in range(180)]
    closes = [100.0]
    for r in rets:
        closes.append(closes[-1] * math.exp(r))
    feats = StreamingTrendFeatures(bars_per_day=bpd)
    streamed = [feats.update(Candle(i, c, c, c, c, 1.0)) for i, c in enumerate(closes)]
    vec = streamed[-1]
    assert vec is not None and streamed[-2] is None
    batch = batch_trend_features(np.array(closes), bars_per_day=bpd)[-1]
    for v in (vec, batch):
        col = dict(zip(TREND_MARKET_FEATURES, v, strict=True))
        # sigma of +-a alternating over any even window is exactly a; every lag is an even number of bars,
        # so every lagged log return is 0 (to rounding)
        for d in TREND_DAYS:
            assert col[f"z_{d}d"] == pytest.approx(0.0, abs=1e-9)
        for a_d, b_d in ((1, 30), (7, 90), (30, 90)):
            assert col[f"vol_ratio_{a_d}d_{b_d}d"] == pytest.approx(0.0, abs=1e-9)
        assert col["vol_30d"] == pytest.approx(a * math.sqrt(365 * bpd), rel=1e-9)
    # one more bar up by 5a: z_1d = log return over 2 bars / (sigma_30d * sqrt(2))
    c_new = closes[-1] * math.exp(5 * a)
    vec2 = feats.update(Candle(999, c_new, c_new, c_new, c_new, 1.0))
    assert vec2 is not None
    r60 = rets[-59:] + [5 * a]
    m = sum(r60) / 60
    sigma30 = math.sqrt(sum((x - m) ** 2 for x in r60) / 60)
    ret_1d = math.log(c_new / closes[-2])
    assert vec2[TCOL["z_1d"]] == pytest.approx(ret_1d / (sigma30 * math.sqrt(2)), rel=1e-12)
    assert vec2[TCOL["vol_30d"]] == pytest.approx(sigma30 * math.sqrt(730), rel=1e-12)


def test_trend_flat_prices_give_exact_zeros() -> None:
    closes = np.full(TREND_WARMUP_BARS + 5, 123.45)
    batch = batch_trend_features(closes)
    assert (batch[TREND_WARMUP_BARS - 1 :] == 0.0).all()
    feats = StreamingTrendFeatures()
    vec = feats.warmup([Candle(i, 123.45, 123.45, 123.45, 123.45, 0.0) for i in range(len(closes))])
    assert vec == [0.0] * len(TREND_MARKET_FEATURES)


def test_trend_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="positive"):
        StreamingTrendFeatures().update(Candle(0, 1.0, 1.0, 1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        batch_trend_features(np.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="bars_per_day"):
        StreamingTrendFeatures(bars_per_day=0)
    with pytest.raises(ValueError, match="1-D"):
        batch_trend_features(np.ones((3, 3)))


def test_trend_observation_is_market_then_position(
    trend_real: TrendReal,
) -> None:
    _, streamed, _ = trend_real
    market = streamed[-1]
    assert market is not None
    obs = feature_set(FEATURE_SET_TREND).observation(market, 3.0, -0.25)
    assert obs == [*market, 1.0, -0.25] and len(obs) == len(TREND_FEATURE_NAMES)
    with pytest.raises(ValueError, match="11"):
        observation_for(TREND_FEATURE_NAMES, market[:-1], 0.0, 0.0)


def test_trend_streaming_update_is_cheap() -> None:
    candles = read_candles(TREND_1H_FILE)
    feats = StreamingTrendFeatures()
    start = time.perf_counter()
    for c in candles:
        feats.update(c)
    per_update_us = (time.perf_counter() - start) / len(candles) * 1e6
    assert per_update_us < 60.0, f"{per_update_us:.1f} us per update"
