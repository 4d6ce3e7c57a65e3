"""The training pipeline on the committed real data (data/quick: Binance spot BTC/ETH 1h, 2025-03..08).

What must hold for a trained policy to mean anything in production:

* the observation at bar t depends on candles <= t only (changing the future changes nothing before it);
* train / validation / test are split by time with the configured dates and share no bar;
* the environment trades with the daemon's fees, slippage, lot size and limits (a hand-computed trade
  matches to the last 1e-8 USDT) and ends the episode when the engine HALTs;
* the same seed reproduces the same weights bit for bit, a different seed does not;
* the export is the trained policy (ONNX vs PyTorch <= 1e-5), loads with Policy.load, and a broken export
  is refused without writing a file.
"""

from __future__ import annotations

import copy
import json
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from alphapulse.config import Settings
from alphapulse.costs import money, price_with_slippage, taker_fee
from alphapulse.domain import Fill, Side, TradingState
from alphapulse.features import FEATURE_NAMES, MARKET_FEATURES, WARMUP_BARS, StreamingFeatures
from alphapulse.policy import Policy
from alphapulse.portfolio import Portfolio
from alphapulse.training import export as export_mod
from alphapulse.training.data import (
    SPLITS,
    DataError,
    Dataset,
    SplitDates,
    load_dataset,
    load_valid,
    make_segment,
    pair_file,
    parse_utc,
    segments_of,
)
from alphapulse.training.env import ACTION_TARGETS, EnvConfig, TradingEnv
from alphapulse.training.export import ExportError, export_policy, onnx_probabilities, verify
from alphapulse.training.train import (
    TrainingConfig,
    TrainingConfigError,
    TrainingResult,
    argmax_decider,
    evaluate,
    load_training_config,
    run_training,
    trading_settings,
    train_main,
)

HOUR = 3_600_000
LONG_FULL, FLAT, SHORT_FULL = ACTION_TARGETS.index(1.0), ACTION_TARGETS.index(0.0), ACTION_TARGETS.index(-1.0)


@pytest.fixture(scope="module")
def cfg() -> TrainingConfig:
    return load_training_config("quick")


@pytest.fixture(scope="module")
def settings(cfg: TrainingConfig) -> Settings:
    return trading_settings(cfg)


@pytest.fixture(scope="module")
def dataset(cfg: TrainingConfig) -> Dataset:
    return load_dataset(cfg.data_dir, cfg.pairs, cfg.timeframe, cfg.dates, episode_length=cfg.episode_length,
                        max_gap_bars=cfg.max_gap_bars, file_pattern=cfg.file_pattern)


def btc_columns(cfg: TrainingConfig) -> dict[str, np.ndarray]:
    cols, invalid = load_valid(pair_file(cfg.data_dir, "BTC_USDT", "1h"), HOUR)
    assert invalid == 0
    return cols


# ---- data: time split ----------------------------------------------------------------------------------


def test_time_split_respects_dates_and_has_no_overlap(cfg: TrainingConfig, dataset: Dataset) -> None:
    d = cfg.dates
    assert (d.train_start, d.validation_start, d.test_start, d.test_end) == (
        parse_utc("2025-03-01"), parse_utc("2025-07-01"), parse_utc("2025-08-01"), parse_utc("2025-09-01"))
    seen: dict[str, set[int]] = {}
    for split in SPLITS:
        lo, hi = d.bounds(split)
        segs = dataset.segments[split]
        assert sorted(s.pair for s in segs) == ["BTC_USDT", "ETH_USDT"], split
        for seg in segs:
            assert seg.split == split
            assert lo is not None and hi is not None
            assert lo <= int(seg.ts[0]) and int(seg.ts[-1]) < hi, (split, seg.describe())
            assert np.all(np.diff(seg.ts) == HOUR)  # the quick data has no holes: one contiguous run each
            assert len(seg) >= WARMUP_BARS + cfg.episode_length
            stamps = set(seg.ts.tolist())
            assert not stamps & seen.get(seg.pair, set()), f"{seg.describe()} overlaps another split"
            seen.setdefault(seg.pair, set()).update(stamps)
    # Every hour of the committed files lands in exactly one split: Mar-Jun 122 days, Jul 31, Aug 31.
    assert [dataset.bars(s) // 2 for s in SPLITS] == [122 * 24, 31 * 24, 31 * 24]
    for pair, stamps in seen.items():
        assert len(stamps) == 4416, pair
        assert max(s for s in stamps if s < d.validation_start) == d.validation_start - HOUR
        assert min(s for s in stamps if s >= d.validation_start) == d.validation_start


def test_split_cuts_at_holes_and_drops_short_runs(cfg: TrainingConfig) -> None:
    cols = btc_columns(cfg)
    # Remove 30 real hours in the middle of July: more than max_gap_bars, so validation splits in two runs.
    july = np.flatnonzero(cols["ts"] == parse_utc("2025-07-10"))[0]
    keep = np.ones(cols["ts"].shape[0], dtype=bool)
    keep[july : july + 30] = False
    holed = {k: v[keep] for k, v in cols.items()}
    segs, dropped = segments_of("BTC_USDT", holed, cfg.dates, HOUR, max_gap_bars=12, min_bars=WARMUP_BARS + 100)
    val = segs["validation"]
    assert [(int(s.ts[0]), int(s.ts[-1])) for s in val] == [
        (parse_utc("2025-07-01"), parse_utc("2025-07-10") - HOUR),
        (parse_utc("2025-07-10") + 30 * HOUR, parse_utc("2025-08-01") - HOUR),
    ]
    assert dropped["validation"] == 0
    # With a longer minimum the 9-day run is too short and is dropped (and counted), the other kept.
    segs, dropped = segments_of("BTC_USDT", holed, cfg.dates, HOUR, max_gap_bars=12, min_bars=WARMUP_BARS + 336)
    assert len(segs["validation"]) == 1 and dropped["validation"] == 1
    # A hole within max_gap_bars is bridged, as the daemon's features bridge it.
    segs, _ = segments_of("BTC_USDT", holed, cfg.dates, HOUR, max_gap_bars=48, min_bars=WARMUP_BARS + 100)
    assert len(segs["validation"]) == 1


def test_empty_validation_split_is_an_error(cfg: TrainingConfig) -> None:
    dates = SplitDates(validation_start=parse_utc("2025-07-01"), test_start=parse_utc("2025-07-05"),
                       train_start=parse_utc("2025-03-01"))
    with pytest.raises(DataError, match="no validation segment"):
        load_dataset(cfg.data_dir, ["BTC_USDT"], "1h", dates, episode_length=336)
    with pytest.raises(DataError, match="split dates must increase"):
        SplitDates(validation_start=parse_utc("2025-07-01"), test_start=parse_utc("2025-06-01"))


# ---- env: no look-ahead ----------------------------------------------------------------------------------


def test_observation_at_t_ignores_every_later_candle(cfg: TrainingConfig, settings: Settings) -> None:
    cols = btc_columns(cfg)
    n = 600
    base = {k: v[:n].copy() for k, v in cols.items()}
    t = 400
    future = {k: v.copy() for k, v in base.items()}
    for k in ("open", "high", "low", "close"):
        future[k][t + 1 :] *= 1.37  # a different future that is still a valid market
    future["volume"][t + 1 :] *= 3.0
    seg_a, seg_b = make_segment("BTC_USDT", "train", base), make_segment("BTC_USDT", "train", future)
    env_cfg = EnvConfig("1h", episode_length=None)
    env_a, env_b = TradingEnv([seg_a], settings, env_cfg), TradingEnv([seg_b], settings, env_cfg)
    start = seg_a.first_obs_index
    obs_a, _ = env_a.reset(options={"segment": 0, "start": start})
    obs_b, _ = env_b.reset(options={"segment": 0, "start": start})
    rng = np.random.default_rng(7)
    actions = [int(a) for a in rng.integers(0, len(ACTION_TARGETS), size=t - start + 1)]
    positions = set()
    streaming = StreamingFeatures()
    for bar in range(start):
        streaming.update(seg_a.candle(bar))
    for n_done, a in enumerate(actions):
        assert env_a.t == env_b.t == start + n_done
        np.testing.assert_array_equal(obs_a, obs_b, err_msg=f"observation at bar {env_a.t} saw the future")
        # ... and it is the daemon's streaming feature vector for the same candle.
        market = streaming.update(seg_a.candle(env_a.t))
        assert market is not None
        np.testing.assert_allclose(obs_a[: len(MARKET_FEATURES)], np.asarray(market, np.float32), rtol=1e-6,
                                   atol=1e-9)
        positions.add(round(float(obs_a[FEATURE_NAMES.index("position_frac")]), 1))
        obs_a, *_ = env_a.step(a)
        obs_b, *_ = env_b.step(a)
    assert env_a.t == t + 1
    assert not np.array_equal(obs_a, obs_b), "the changed candle t+1 must change the observation at t+1"
    assert len(positions) >= 3, "the check must cover observations with open positions"


# ---- env: the daemon's costs and limits ------------------------------------------------------------------


def test_forced_trade_pays_exactly_the_configured_fee_and_slippage(cfg: TrainingConfig, settings: Settings,
                                                                   dataset: Dataset, repo_dir: Path) -> None:
    params = yaml.safe_load((repo_dir / "config" / "trading_params.yaml").read_text())
    rate, slip = Decimal(repr(float(params["fees"]["taker_fee"]))), Decimal(repr(float(params["fees"]["slippage_bps"])))
    assert rate > 0 and slip > 0
    seg = next(s for s in dataset.segments["train"] if s.pair == "BTC_USDT")
    env = TradingEnv([seg], settings, cfg.env_config())
    start = 1000
    env.reset(options={"segment": 0, "start": start})
    assert env.engine is not None
    assert env.engine.broker.taker_fee_rate == rate and env.engine.broker.slippage_bps == slip  # type: ignore[attr-defined]
    eq0 = Decimal(repr(float(params["initial_equity"])))
    close_t, open_1, close_1 = (Decimal(repr(float(x))) for x in (seg.close[start], seg.open[start + 1],
                                                                  seg.close[start + 1]))

    _, reward, terminated, truncated, info = env.step(LONG_FULL)

    # By hand: the full target is max_position_pct of equity at the decision's close, rounded down to lots...
    lot = Decimal(repr(float(params["lot_size"])))
    frac = Decimal(repr(float(params["risk"]["max_position_pct"]) / 100.0))
    qty = (frac * eq0 / close_t / lot).to_integral_value(rounding="ROUND_DOWN") * lot
    assert qty > 0
    # ... filled at the next candle's open plus slippage, paying the taker fee on the fill's notional.
    fill_price = price_with_slippage(Side.BUY, open_1, slip)
    assert fill_price == money(open_1 * (1 + slip / 10_000))
    fee = taker_fee(qty, fill_price, rate)
    assert fee == money(qty * fill_price * rate) and fee > 0
    pf = env.engine.portfolio
    assert (pf.position.qty, pf.position.entry_price, pf.fees_paid) == (qty, fill_price, fee)
    expected_equity = eq0 - fee + money(qty * (close_1 - fill_price))
    hand = Portfolio.new(seg.symbol, eq0)
    hand.apply_fill(Fill("x", seg.symbol, Side.BUY, qty, fill_price, fee, int(seg.ts[start + 1])))
    hand.mark(close_1, int(seg.ts[start + 1]) + HOUR)
    assert pf.equity == hand.equity == expected_equity
    assert info["equity"] == float(expected_equity) and info["fills"] == 1
    assert reward == pytest.approx(math.log(float(expected_equity) / float(eq0)), abs=1e-15)
    assert not terminated and not truncated

    # Closing pays the fee again, on the sell side of the slippage.
    env.step(FLAT)
    open_2 = Decimal(repr(float(seg.open[start + 2])))
    sell_price = price_with_slippage(Side.SELL, open_2, slip)
    assert pf.position.qty == 0
    assert pf.fees_paid == fee + taker_fee(qty, sell_price, rate)
    assert pf.cash == eq0 - pf.fees_paid + money(qty * (sell_price - fill_price))


def test_env_terminates_when_the_engine_halts(cfg: TrainingConfig, settings: Settings, dataset: Dataset) -> None:
    tight = replace(settings, risk=replace(settings.risk, max_drawdown_frac=0.01))
    seg = next(s for s in dataset.segments["validation"] if s.pair == "ETH_USDT")
    env = TradingEnv([seg], tight, cfg.env_config(episode_length=None))
    env.reset(options={"segment": 0, "start": seg.first_obs_index})
    assert env.engine is not None
    steps, terminated, truncated = 0, False, False
    info: dict[str, object] = {}
    while not (terminated or truncated):
        _, _, terminated, truncated, info = env.step(SHORT_FULL)  # short ETH in a month it rose 40 %
        steps += 1
    assert terminated and not truncated
    assert env.engine.state is TradingState.HALTED and info["state"] == "HALTED"
    assert env.engine.portfolio.drawdown >= 0.01
    assert steps < len(seg) - seg.first_obs_index - 1, "must stop at the halt, not at the end of the data"
    # The same policy under the shipped limits (12 % drawdown) is merely truncated at the end of the episode.
    loose = TradingEnv([seg], settings, cfg.env_config())
    loose.reset(options={"segment": 0, "start": seg.first_obs_index})
    for _ in range(10):
        _, _, terminated, truncated, _ = loose.step(FLAT)
    assert not terminated and not truncated


def test_env_passes_the_gymnasium_and_sb3_checkers(cfg: TrainingConfig, settings: Settings, dataset: Dataset) -> None:
    from gymnasium.utils.env_checker import check_env as gym_check
    from stable_baselines3.common.env_checker import check_env as sb3_check

    env = TradingEnv(dataset.segments["train"], settings, cfg.env_config())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # only "Box bounds are infinite": raw features are unbounded by design
        gym_check(env, skip_render_check=True)  # includes: reset(seed=s) twice gives the same episode
        sb3_check(env, warn=False)
    obs1, _ = env.reset(seed=5)
    t1 = (env.segment.pair, env.t)
    obs2, _ = env.reset(seed=5)
    assert (env.segment.pair, env.t) == t1 and np.array_equal(obs1, obs2)
    starts = set()
    for s in range(20):
        env.reset(seed=s)
        starts.add((env.segment.pair, env.t))
    assert len({p for p, _ in starts}) == 2 and len(starts) == 20  # both pairs, many start bars


# ---- training: reproducibility and export ---------------------------------------------------------------


def tiny(cfg: TrainingConfig, seed: int) -> TrainingConfig:
    """512 timesteps in 2 rollouts of 2 envs x 128 steps: enough to move every weight, a few seconds."""
    return replace(cfg, seed=seed, total_timesteps=512,
                   ppo=replace(cfg.ppo, n_envs=2, n_steps=128, batch_size=64, n_epochs=2))


@pytest.fixture(scope="module")
def runs(cfg: TrainingConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, TrainingResult]]:
    out = tmp_path_factory.mktemp("models")
    yield {name: run_training(tiny(cfg, seed), out / f"{name}.onnx", log=lambda _m: None)
           for name, seed in (("a", 11), ("b", 11), ("c", 12))}


@pytest.fixture(scope="module")
def real_obs(cfg: TrainingConfig, settings: Settings, dataset: Dataset, runs: dict[str, TrainingResult]) -> np.ndarray:
    """Observations of the validation months, as the trained policy (argmax) meets them."""
    obs: list[np.ndarray] = []
    evaluate(dataset.segments["validation"], settings, cfg.env_config(), argmax_decider(runs["a"].actor), obs)
    return np.stack(obs)


def test_same_seed_same_weights_different_seed_different(runs: dict[str, TrainingResult], real_obs: np.ndarray) -> None:
    sa, sb, sc = (runs[k].model.policy.state_dict() for k in "abc")
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), "same seed must give bit-identical weights"
    assert not all(torch.equal(sa[k], sc[k]) for k in sa), "a different seed must give different weights"
    rms_a, rms_b = (runs[k].vecnorm.obs_rms for k in "ab")
    assert np.array_equal(rms_a.mean, rms_b.mean) and np.array_equal(rms_a.var, rms_b.var)  # type: ignore[attr-defined]
    pa, pb, pc = (onnx_probabilities(runs[k].path.read_bytes(), real_obs) for k in "abc")
    assert np.array_equal(pa, pb)
    assert not np.allclose(pa, pc)
    assert runs["a"].validation == runs["b"].validation


def test_exported_model_is_the_trained_policy_and_loads_in_the_daemon(runs: dict[str, TrainingResult],
                                                                      real_obs: np.ndarray) -> None:
    res = runs["a"]
    policy = Policy.load(res.path)
    meta = policy.meta
    assert (meta.kind, meta.timeframe, meta.obs_size) == ("ppo", "1h", 20)
    assert meta.feature_names == FEATURE_NAMES and meta.action_targets == ACTION_TARGETS
    fp = meta.extra["alphapulse.config_fingerprint"]
    assert re.fullmatch(r"ppo-1h-\d{8}-s11-[0-9a-f]{8}", meta.version) and meta.version.endswith(f"-s11-{fp}")
    # the same configuration gives the same fingerprint; another seed (or any hyper-parameter) another
    other = {k: Policy.load(runs[k].path).meta.extra["alphapulse.config_fingerprint"] for k in "bc"}
    assert other["b"] == fp and other["c"] != fp
    assert meta.extra["alphapulse.seed"] == "11"
    assert meta.extra["alphapulse.code_revision"]
    validation = json.loads(meta.extra["alphapulse.validation_metrics"])
    assert validation == json.loads(json.dumps(res.validation))
    for kind in ("daemon", "argmax"):
        assert set(validation[kind]["pairs"]) == {"BTC_USDT", "ETH_USDT"}
        for v in validation[kind]["pairs"].values():  # every July decision, unless the drawdown limit halted it
            assert math.isfinite(v["total_return"]) and math.isfinite(v["sharpe"])
            assert v["bars"] == 744 - WARMUP_BARS or (v["halted"] and v["max_drawdown"] >= 0.12)
    hyper = json.loads(meta.extra["alphapulse.hyperparameters"])
    assert hyper["total_timesteps"] == 512 and hyper["n_envs"] == 2
    assert "BTC_USDT" in meta.training_data_range and "2025-07-01" in meta.training_data_range

    with torch.no_grad():
        expected = res.actor(torch.as_tensor(real_obs)).numpy()
    got = policy.predict_batch(real_obs)
    assert got.shape == (real_obs.shape[0], len(ACTION_TARGETS))
    assert float(np.max(np.abs(got - expected))) <= 1e-5
    assert np.allclose(got.sum(axis=1), 1.0, atol=1e-5)
    # The daemon's single-row path picks the same action as the batch path.
    d = policy.decide(real_obs[100].tolist(), 0, "BTCUSDT")
    assert d.action == int(np.argmax(expected[100])) and d.target == ACTION_TARGETS[d.action]


def test_export_refuses_a_model_that_is_not_the_trained_policy(runs: dict[str, TrainingResult], real_obs: np.ndarray,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    actor = runs["a"].actor
    assert verify(export_mod.onnx_bytes(actor), actor, real_obs) <= 1e-5
    # A graph whose action head is off by a little: the check must see it, and nothing may be written.
    skewed = copy.deepcopy(actor)
    with torch.no_grad():
        skewed.action_net.bias[LONG_FULL] += 1e-3  # type: ignore[index, operator]
    skewed_bytes = export_mod.onnx_bytes(skewed)
    with pytest.raises(ExportError, match="disagree"):
        verify(skewed_bytes, actor, real_obs)
    monkeypatch.setattr(export_mod, "onnx_bytes", lambda _actor: skewed_bytes)
    target = tmp_path / "refused.onnx"
    with pytest.raises(ExportError, match="disagree"):
        export_policy(actor, real_obs, target, runs["a"].metadata)
    assert list(tmp_path.iterdir()) == []


# ---- CLI -------------------------------------------------------------------------------------------------


def test_train_main_quick_profile_writes_a_loadable_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.onnx"
    assert train_main(["--config", "quick", "--timesteps", "512", "--seed", "3", "--out", str(out),
                       "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "validation [daemon]" in printed
    policy = Policy.load(out, expected_timeframe="1h")
    assert policy.meta.extra["alphapulse.seed"] == "3"
    assert train_main(["--config", "nonexistent", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "no profile 'nonexistent'" in capsys.readouterr().err
    assert train_main(["--config", "quick", "--data-dir", str(tmp_path), "--out", str(tmp_path / "y.onnx")]) == 2
    assert "candle files not found" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "y.onnx").exists()


def test_training_config_rejects_typos(tmp_path: Path, repo_dir: Path) -> None:
    text = (repo_dir / "config" / "training.yaml").read_text()
    bad = tmp_path / "training.yaml"
    bad.write_text(text.replace("learning_rate:", "learning_rat:", 1))
    with pytest.raises(TrainingConfigError, match="learning_rat"):
        load_training_config("quick", bad)
    bad.write_text(text.replace('validation_start: "2025-07-01"', 'validation_start: "2025-02-01"', 1))
    with pytest.raises(TrainingConfigError, match="split dates must increase"):
        load_training_config("quick", bad)
    prod = load_training_config("ppo_1h")
    assert prod.pairs == ("BTC_USDT", "ETH_USDT", "SOL_USDT", "BNB_USDT") and prod.timeframe == "1h"
    assert prod.data_dir == (repo_dir / ".." / "shared" / "data").resolve()
    assert prod.ppo.n_envs == 8 and prod.ppo.learning_rate == 3e-4  # profile overrides merge into common


def test_training_config_carries_features_cadence_and_reward_to_the_env(tmp_path: Path, repo_dir: Path) -> None:
    """The trend options of training.yaml reach EnvConfig (which the exported metadata is written from); the
    shipped defaults are today's: short_v1, every bar, log-return reward."""
    quick = load_training_config("quick")
    env = quick.env_config()
    assert (env.feature_set, env.decision_every_bars, env.decision_hour_utc, env.reward) == \
        ("short_v1", 1, None, "log_return")
    text = (repo_dir / "config" / "training.yaml").read_text()
    trend = tmp_path / "training.yaml"
    trend.write_text(text.replace("feature_set: short_v1", "feature_set: trend_v1", 1)
                     .replace("decision_every_bars: 1", "decision_every_bars: 24", 1)
                     .replace("decision_hour_utc: null", "decision_hour_utc: 0", 1)
                     .replace("kind: log_return", "kind: vol_scaled", 1))
    env = load_training_config("quick", trend).env_config()
    assert (env.feature_set, env.decision_every_bars, env.decision_hour_utc, env.reward, env.target_vol) == \
        ("trend_v1", 24, 0, "vol_scaled", 0.10)
    assert env.bars_per_episode == 336 * 24
    for old, new, match in (("feature_set: short_v1", "feature_set: long_v9", "long_v9"),
                            ("kind: log_return", "kind: sharpe", "reward must be one of"),
                            ("decision_hour_utc: null", "decision_hour_utc: 24", "0..23")):
        trend.write_text(text.replace(old, new, 1))
        with pytest.raises(TrainingConfigError, match=match):
            load_training_config("quick", trend)
