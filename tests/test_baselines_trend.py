"""The vol-targeted time-series momentum baseline on real BTC candles: long in a sustained rise, short in a
sustained fall, a new target only once a day, sized by volatility from the trend_v1 observation."""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import math
from pathlib import Path

import numpy as np
import pytest

from alphapulse.baselines import TsMomentum, trend_baselines
from alphapulse.domain import Candle
from alphapulse.features import (
    FEATURE_NAMES,
    FEATURE_SET_TREND,
    TREND_FEATURE_NAMES,
    StreamingTrendFeatures,
    batch_trend_features,
    feature_set,
)
from alphapulse.policy import ACTION_TARGETS

ROOT = Path(__file__).resolve().parents[1]
RISE_FILE = ROOT / "alphapulse" / "data" / "BTC_USDT_USDT-1h.csv.gz"  # perp 2024-12-31 -> 2025-08-31
FALL_FILE = ROOT / "tests" / "data" / "BTC_USDT-1h-2021-11_2022-06.csv.gz"  # spot 2021-11 -> 2022-06
Rows = list[tuple[int, float, list[float]]]  # (candle_ts, target, observation) per candle after the warm-up
Z30 = TREND_FEATURE_NAMES.index("z_30d")
VOL = TREND_FEATURE_NAMES.index("vol_30d")


def read(path: Path) -> list[Candle]:
    with gzip.open(path, "rt", newline="") as fh:
        reader = csv.reader(fh)
        next(reader)
        return [Candle(int(r[0]), float(r[1]), float(r[2]), float(r[3]), float(r[4]), float(r[5])) for r in reader]


def month(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts / 1000, tz=dt.UTC).strftime("%Y-%m")


def run(path: Path, policy: TsMomentum) -> Rows:
    """(candle_ts, target, obs) for every candle after the warm-up, streaming features as the daemon would."""
    feats = StreamingTrendFeatures()
    out = []
    for c in read(path):
        market = feats.update(c)
        if market is None:
            continue
        obs = feature_set(FEATURE_SET_TREND).observation(market, 0.0, 0.0)
        out.append((c.ts, policy.decide(obs, c.ts, "BTCUSDT").target, obs))
    return out


@pytest.fixture(scope="module")
def rise() -> Rows:
    return run(RISE_FILE, TsMomentum())


@pytest.fixture(scope="module")
def fall() -> Rows:
    return run(FALL_FILE, TsMomentum())


def daily(rows: Rows, months: set[str]) -> list[float]:
    pol = TsMomentum()
    return [t for ts, t, _ in rows if pol.is_decision_time(ts) and month(ts) in months]


def test_long_in_the_2025_rise(rise: Rows) -> None:
    # BTC 2025-05-01 96k -> 2025-07-31 116k: long at every May and July decision, long on >= 85 % of all three months
    assert all(t > 0 for t in daily(rise, {"2025-05", "2025-07"}))
    targets = daily(rise, {"2025-05", "2025-06", "2025-07"})
    assert len(targets) == 92
    assert np.mean(np.array(targets) > 0) >= 0.85 and np.mean(targets) > 0.15


def test_short_in_the_2022_fall(fall: Rows) -> None:
    # BTC 2022-05-01 38k -> 2022-06-30 20k (Terra, then the June capitulation): short at every decision
    targets = daily(fall, {"2022-05", "2022-06"})
    assert len(targets) == 61
    assert all(t < 0 for t in targets) and np.mean(targets) < -0.1


def test_target_changes_only_at_the_daily_decision(rise: Rows) -> None:
    pol = TsMomentum()
    decisions = 0
    for (_, prev, _), (ts, cur, _) in zip(rise, rise[1:], strict=False):
        if pol.is_decision_time(ts):
            decisions += 1
        else:
            assert cur == prev
    assert decisions == len(rise) // 24  # one per day
    # the candle that closes at 00:00 UTC is the 23:00 one
    hours = {dt.datetime.fromtimestamp(ts / 1000, tz=dt.UTC).hour for ts, _, _ in rise if pol.is_decision_time(ts)}
    assert hours == {23}


def test_vol_targeted_size(rise: Rows, fall: Rows) -> None:
    for rows in (rise, fall):
        for _, target, _obs in rows[::97]:
            assert -1.0 <= target <= 1.0
        pol = TsMomentum(target_vol=0.10, max_position_frac=0.5, horizons_days=(30,))
        for _, _, obs in rows[::97]:
            w = math.tanh(obs[Z30]) * min(0.10 / obs[VOL], 0.5)
            assert pol.target_for(obs) == pytest.approx(w / 0.5, rel=1e-12, abs=1e-15)
            # expected annualised vol of the position: |w| * vol_30d <= target_vol
            assert abs(pol.target_for(obs)) * 0.5 * obs[VOL] <= 0.10 + 1e-12
    # doubling the target volatility doubles the position while it stays under the cap
    _, _, obs = rise[-1]
    small = TsMomentum(target_vol=0.05).target_for(obs)
    assert TsMomentum(target_vol=0.10).target_for(obs) == pytest.approx(2 * small, rel=1e-12)


def test_decision_contract(rise: Rows) -> None:
    pol = TsMomentum()
    ts, _, obs = rise[100]
    d = pol.decide(obs, ts, "BTCUSDT")  # the first call decides even off the daily time
    assert d.target == pol.target_for(obs) and d.candle_ts == ts and d.symbol == "BTCUSDT"
    assert d.confidence == 1.0 and sum(d.probabilities) == 1.0
    assert ACTION_TARGETS[d.action] == min(ACTION_TARGETS, key=lambda a: abs(a - d.target))
    pol.reset()
    with pytest.raises(ValueError, match="trend_v1"):
        pol.decide([0.0] * len(FEATURE_NAMES), ts, "BTCUSDT")  # the short-horizon observation is refused
    assert TsMomentum().target_for([0.0] * len(TREND_FEATURE_NAMES)) == 0.0  # no volatility: no position
    for bad in ({"target_vol": 0.0}, {"horizons_days": (5,)}, {"decision_hour_utc": 24}, {"timeframe": "7h"}):
        with pytest.raises(ValueError):
            TsMomentum(**bad)  # type: ignore[arg-type]
    assert list(trend_baselines()) == ["tsmom_vol_target"]


def test_batch_features_give_the_same_decisions(rise: Rows) -> None:
    """Backtest/training read batch rows: same targets as the daemon's streaming path (to float noise)."""
    close = np.array([c.close for c in read(RISE_FILE)])
    rows = batch_trend_features(close)
    rows = rows[~np.isnan(rows[:, 0])]
    pol = TsMomentum()
    got = [pol.decide([*r.tolist(), 0.0, 0.0], ts, "BTCUSDT").target for (ts, _, _), r in zip(rise, rows, strict=True)]
    assert np.abs(np.array(got) - np.array([t for _, t, _ in rise])).max() < 1e-12
