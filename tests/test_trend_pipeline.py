"""The trend policy's building blocks through the one pipeline: feature set and cadence from the model's metadata,
volatility-targeted sizing, paper funding, the TSMOM row of evaluate and check-config's warm-up report.

Real data only: the committed BTC/USDT 1h slice 2021-11 -> 2022-06 (long enough for trend_v1's 90-day warm-up),
the real BTC funding-rate file and the real ETH crash slice (tests/data/README.md).
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import math
import subprocess
import sys
from collections.abc import Sequence
from decimal import ROUND_DOWN, Decimal
from pathlib import Path

import numpy as np
import pytest
import yaml

from alphapulse.backtest import BacktestError, run_backtest, select
from alphapulse.baselines import ConstantTarget
from alphapulse.builder import build_engine, funding_schedule, warmup_check
from alphapulse.config import Settings, load_settings
from alphapulse.costs import money
from alphapulse.domain import Candle, Decision, RiskLimits, TradingState
from alphapulse.engine import Cadence, Engine, EngineConfig
from alphapulse.evaluation import evaluate
from alphapulse.execution.paper import PaperBroker
from alphapulse.features import (
    TREND_FEATURE_NAMES,
    TREND_WARMUP_BARS,
    batch_trend_features,
    feature_set,
)
from alphapulse.funding import FundingSchedule
from alphapulse.market.replay import load_candles
from alphapulse.policy import ACTION_MEANINGS, ACTION_TARGETS, ModelError, Policy, contract_metadata, default_model_path
from alphapulse.portfolio import Portfolio
from alphapulse.risk import check_order, target_qty
from alphapulse.training.data import make_segment
from alphapulse.training.env import EnvConfig, TradingEnv
from tests.daemon_harness import REPO, DaemonProc, clean_env

DATA = REPO / "tests" / "data"
SLICE_1H = DATA / "BTC_USDT-1h-2021-11_2022-06.csv.gz"
FUNDING_FILE = DATA / "BTC_USDT_USDT-funding_rate.csv.gz"
# The previous default: short_v1 features (49-bar warm-up), a decision every bar.  The tests below that need a
# short warm-up (so TSMOM's 90 days are missing) name it; the default is the daily trend_v1 gated policy.
PPO_1H = default_model_path().with_name("ppo_1h.onnx")
BUNDLED_1H = REPO / "alphapulse" / "data" / "BTC_USDT_USDT-1h.csv.gz"
HOUR = 3_600_000
DAY = 24 * HOUR
D = Decimal


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings(REPO / "config", env={})


@pytest.fixture(scope="module")
def slice_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed slice under a shared/data-style name, so the symbol (BTCUSDT) and timeframe are inferred."""
    dest = tmp_path_factory.mktemp("data") / "BTC_USDT-1h.csv.gz"
    dest.write_bytes(SLICE_1H.read_bytes())
    return dest


@pytest.fixture(scope="module")
def cols() -> dict[str, np.ndarray]:
    return select(load_candles(SLICE_1H), None, None, HOUR)


def write_trend_model(path: Path, *, every: int | None = 24, hour: int | None = 0,
                      fs_name: str = "trend_v1") -> Path:
    """A tiny linear+softmax ONNX policy with feature-set and cadence metadata.  On trend_v1: long_full when the
    30-day z-score is clearly up, short_full when clearly down, uniform (below the confidence threshold) near 0.
    On short_v1: long_full, confidently, whenever volume_ratio_48 (log1p(v / mean v) > 0) is typical: a buy and
    hold that goes through the model file and the engine like any model."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    names = feature_set(fs_name).feature_names
    w = np.zeros((len(names), len(ACTION_TARGETS)), dtype=np.float32)
    if "z_30d" in names:
        z = names.index("z_30d")
        w[z, ACTION_TARGETS.index(1.0)] = 4.0
        w[z, ACTION_TARGETS.index(-1.0)] = -4.0
    else:
        w[names.index("volume_ratio_48"), ACTION_TARGETS.index(1.0)] = 8.0
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["obs", "w"], ["logits"]), helper.make_node("Softmax", ["logits"], ["probs"],
                                                                               axis=1)],
        "trend_test_policy",
        [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["batch", len(names)])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", len(ACTION_TARGETS)])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = contract_metadata(kind="baseline", version="trend-test-1", timeframe="1h",
                             training_data_range="none (hand-set)", created="2026-12-01T00:00:00Z",
                             feature_set_name=fs_name, decision_every_bars=every, decision_hour_utc=hour)
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def trend_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_trend_model(tmp_path_factory.mktemp("model") / "trend.onnx")


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = clean_env() | {"ALPHAPULSE_CONFIG_DIR": str(REPO / "config")} | (env or {})
    return subprocess.run([sys.executable, "-m", "alphapulse", *args], capture_output=True, text=True, env=e,
                          timeout=300, stdin=subprocess.DEVNULL)


def _trades(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


# ---- the model's metadata ------------------------------------------------------------------------------------


def test_model_metadata_names_feature_set_and_cadence(trend_model: Path, tmp_path: Path) -> None:
    p = Policy.load(trend_model)
    assert p.meta.feature_set_name == "trend_v1" and p.meta.feature_names == TREND_FEATURE_NAMES
    assert (p.meta.decision_every_bars, p.meta.decision_hour_utc) == (24, 0)
    shipped = Policy.load(PPO_1H)  # no cadence metadata: short_v1, every bar
    assert shipped.meta.feature_set_name == "short_v1"
    assert (shipped.meta.decision_every_bars, shipped.meta.decision_hour_utc) == (1, None)
    assert shipped.meta.feature_set.warmup_bars == 49 and p.meta.feature_set.warmup_bars == TREND_WARMUP_BARS
    # a trend model whose names are short_v1's is refused, as is a feature set nobody knows
    onnx = pytest.importorskip("onnx")
    bad = onnx.load(str(trend_model))
    for prop in bad.metadata_props:
        if prop.key == "alphapulse.feature_set":
            prop.value = "trend_v9"
    onnx.save(bad, str(tmp_path / "bad.onnx"))
    with pytest.raises(ModelError, match="trend_v9"):
        Policy.load(tmp_path / "bad.onnx")


# ---- daemon == backtest for a trend_v1, daily-cadence model ---------------------------------------------------


def test_trend_model_daemon_and_backtest_trade_the_same(trend_model: Path, slice_file: Path, tmp_path: Path) -> None:
    """The real daemon (replay of the 1h slice, paper, the real funding file as ``feed.funding_file``) and
    ``alphapulse backtest --funding`` write the same trades (trades, funding lines) and decisions; decisions come
    only at the 00:00 UTC close, after the warm-up.  (tests/test_backtest.py covers the default rate.)"""
    d = DaemonProc(tmp_path / "daemon", replay_file=slice_file, args=("--exit-at-end",),
                   trading={"timeframe": "1h"},
                   service={"model": {"path": str(trend_model)}, "feed": {"funding_file": str(FUNDING_FILE)}})
    try:
        d.start()
        assert d.wait_exit(timeout=240) == 0, d.stderr()
    finally:
        d.close()
    out = tmp_path / "bt"
    r = _cli("backtest", "--model", str(trend_model), "--data", str(slice_file), "--out", str(out), "--json",
             "--funding", str(FUNDING_FILE))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    daemon_trades = (d.log_dir / "trades.csv").read_text().splitlines()
    bt_trades = (out / "trades.csv").read_text().splitlines()
    if bt_trades[-1].endswith(",end_of_backtest"):
        bt_trades = bt_trades[:-1]  # the backtest's closing fill (a run ends flat)
    assert bt_trades == daemon_trades
    rows = _trades(out / "trades.csv")
    assert sum(r_["side"] == "buy" for r_ in rows) >= 1 and sum(r_["side"] == "sell" for r_ in rows) >= 1
    assert sum(r_["side"] == "funding" for r_ in rows) > 50, "positions held for weeks pay funding"

    def decisions(p: Path) -> list[dict[str, object]]:
        return [json.loads(ln) for ln in p.read_text().splitlines()]

    dd, bd = decisions(d.log_dir / "ai_decisions.json"), decisions(out / "ai_decisions.json")
    keys = ("candle_time", "action", "allowed", "reason", "order_id", "equity")
    assert [tuple(x[k] for k in keys) for x in bd] == [tuple(x[k] for k in keys) for x in dd]
    # one line per decision: only the candle closing at 00:00 UTC (23:00 open), none during the warm-up
    assert bd and all(str(x["candle_time"]).endswith("T23:00:00.000Z") for x in bd)
    first_decidable = int(load_candles(SLICE_1H)["ts"][TREND_WARMUP_BARS - 1])
    from datetime import datetime
    assert datetime.fromisoformat(str(bd[0]["candle_time"]).replace("Z", "+00:00")).timestamp() * 1000 >= \
        first_decidable
    n_days = summary["candles"] // 24
    assert len(bd) <= n_days - TREND_WARMUP_BARS // 24 + 1
    # reconciles to the cent with funding in
    assert sum(D(r_["pnl"]) for r_ in rows) == D(summary["final_equity"]) - D(summary["initial_equity"])
    assert sum(D(r_["pnl"]) for r_ in rows if r_["side"] == "funding") == D(summary["funding"]) != 0


# ---- cadence: decisions only at the configured time; fills, marks and halts between -----------------------------


class CountingLong:
    """Always the full long target, fully confident; remembers when it was asked."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    def decide(self, obs: Sequence[float], candle_ts: int, symbol: str) -> Decision:
        self.asked.append(candle_ts)
        return Decision(candle_ts, symbol, (0.0, 1.0), 1, 1.0, 1.0, 0.0)


def test_cadence_asks_only_at_the_decision_hour_but_halts_between(settings: Settings,
                                                                   crash_candles: list[Candle]) -> None:
    """Daily cadence at 00:00 UTC on the real ETH crash (5m bars): the policy is asked once a day, yet the drawdown
    halt, its flatten order and the fill happen on the bars between decisions."""
    bar = 300_000
    policy = CountingLong()
    cfg = EngineConfig("ETHUSDT", bar, settings.lot_size, settings.confidence_threshold, settings.risk)
    eng = Engine(cfg, policy, PaperBroker(settings.taker_fee, settings.slippage_bps),
                 Portfolio.new("ETHUSDT", settings.initial_equity), cadence=Cadence(DAY // bar, 0))
    results = [eng.step(c) for c in crash_candles]
    assert policy.asked and all((ts + bar) % DAY == 0 for ts in policy.asked)
    assert len(policy.asked) == len({(c.ts + bar) // DAY for c in crash_candles[48:] if (c.ts + bar) % DAY == 0})
    decided = [r for r in results if r.decision is not None]
    assert [r.candle_ts for r in decided] == policy.asked  # one decision record per decision, none between
    halt = next(i for i, r in enumerate(results) if any(a.limit == "max_drawdown" for a in r.alerts))
    assert eng.state is TradingState.HALTED
    assert (crash_candles[halt].ts + bar) % DAY != 0, "the halt came between decisions"
    assert [o.reason for o in results[halt].orders] == ["halt"]
    assert results[halt + 1].fills and eng.portfolio.position.qty == 0  # flattened at the next open
    # every-bar cadence (no metadata) asks at every bar after the warm-up, as before
    every = CountingLong()
    eng2 = Engine(cfg, every, PaperBroker(settings.taker_fee, settings.slippage_bps),
                  Portfolio.new("ETHUSDT", settings.initial_equity))
    for c in crash_candles[:200]:
        eng2.step(c)
    assert len(every.asked) == 200 - 48


# ---- volatility-targeted sizing -------------------------------------------------------------------------------


def test_vol_target_sizing_formula_and_caps() -> None:
    lot, eq, price = D("0.001"), D("10000"), D("40000")
    off = RiskLimits()
    on = dataclasses.replace(off, target_vol=0.10)

    def expected(target: float, vol: float, limits: RiskLimits) -> Decimal:
        frac = D(repr(abs(target) * min(limits.target_vol / vol, 1.0) * limits.max_position_frac))
        return (frac * eq / price / lot).to_integral_value(rounding=ROUND_DOWN) * lot * (1 if target > 0 else -1)

    for target in (1.0, -1.0, 0.5, -0.5):
        for vol in (0.05, 0.10, 0.40, 0.80, 1.6):
            q = target_qty(target, eq, price, on, lot, vol)
            assert q == expected(target, vol, on), (target, vol)
            assert abs(q) * price <= D("0.5") * eq  # never above the maximum position
    # realised vol at or below the target: the full (unscaled) target, identical to sizing off
    assert target_qty(1.0, eq, price, on, lot, 0.08) == target_qty(1.0, eq, price, off, lot) == D("0.125")
    assert target_qty(1.0, eq, price, on, lot, 0.40) == D("0.031")  # 0.5 * 0.25 * 10000 / 40000, in lots
    assert target_qty(1.0, eq, price, on, lot, None) == 0 and target_qty(1.0, eq, price, on, lot, 0.0) == 0
    # off: the realised vol is ignored, exactly today's fixed fraction
    assert target_qty(0.5, eq, price, off, lot, 0.9) == target_qty(0.5, eq, price, off, lot)
    # the caps still apply afterwards: a leverage cap below the position cap clamps the vol-targeted size too
    tight = dataclasses.replace(on, max_position_frac=2.0, max_leverage=1.0)
    desired = target_qty(1.0, eq, price, tight, lot, 0.05)
    v = check_order(state=TradingState.ACTIVE, current_qty=D(0), desired_qty=desired, equity=eq, price=price,
                    limits=tight, lot=lot, data_age_ms=0, bar_ms=HOUR, orders_last_minute=0, now_ms=0)
    assert desired * price == 2 * eq and v.qty * price <= eq and v.reason == "clamped"


def test_vol_target_in_the_engine_uses_the_trend_features_vol(settings: Settings, cols: dict[str, np.ndarray]
                                                              ) -> None:
    """Through the engine: the first order of an always-long strategy is sized by vol_30d of trend_v1 at the
    decision bar (computed here independently by the batch form); with targeting off it is today's size."""
    on = dataclasses.replace(settings, risk=dataclasses.replace(settings.risk, target_vol=0.20))
    trend = feature_set("trend_v1")
    res_on = run_backtest(ConstantTarget(1.0), cols, on, symbol="BTCUSDT", timeframe="1h", feature_set=trend)
    res_off = run_backtest(ConstantTarget(1.0), cols, settings, symbol="BTCUSDT", timeframe="1h",
                           feature_set=trend)
    i = TREND_WARMUP_BARS - 1  # first decision bar
    vol = float(batch_trend_features(cols["close"])[i, TREND_FEATURE_NAMES.index("vol_30d")])
    assert 0.2 < vol < 1.5
    close = D(repr(float(cols["close"][i])))
    lot = settings.lot_size
    scale = min(0.20 / vol, 1.0)
    want_on = (D(repr(scale * 0.5)) * settings.initial_equity / (close * lot)).to_integral_value(ROUND_DOWN) * lot
    want_off = (D("0.5") * settings.initial_equity / (close * lot)).to_integral_value(ROUND_DOWN) * lot
    assert res_on.position[i + 1] == float(want_on) and res_off.position[i + 1] == float(want_off)
    assert want_on < want_off
    # the short-horizon set has no volatility feature: vol targeting refuses to run on it
    with pytest.raises(BacktestError, match="volatility"):
        run_backtest(ConstantTarget(1.0), cols, on, symbol="BTCUSDT", timeframe="1h")


# ---- funding ------------------------------------------------------------------------------------------------


def _file_rates() -> dict[int, Decimal]:
    """The funding file read independently of alphapulse.funding (timestamps rounded to the minute)."""
    with gzip.open(FUNDING_FILE, "rt") as f:
        rows = list(csv.reader(f))[1:]
    return {round(int(ts) / 60_000) * 60_000: D(rate) for ts, rate in rows}


def test_backtest_books_the_funding_of_the_file_exactly(tmp_path: Path, slice_file: Path) -> None:
    """Buy-and-hold-style run over Nov 2021 - Jan 2022 with the real funding file: every funding line is the file's
    rate times the position held at that time times the bar's close, and trades.csv reconciles to the cent."""
    rates = _file_rates()
    model = write_trend_model(tmp_path / "short_every_bar.onnx", every=None, hour=None, fs_name="short_v1")
    out = tmp_path / "bt"
    r = _cli("backtest", "--model", str(model), "--data", str(slice_file), "--to", "2022-02-01",
             "--funding", str(FUNDING_FILE), "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["funding_source"].startswith(f"file {FUNDING_FILE}")
    rows = _trades(out / "trades.csv")
    funding_rows = [x for x in rows if x["side"] == "funding"]
    assert len(funding_rows) > 20
    eq = [line.split(",") for line in (out / "equity.csv").read_text().splitlines()[1:]]
    from datetime import datetime

    def ms(text: str) -> int:
        return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)

    closes = {ms(t): (D(q), D(p)) for t, _e, q, p in eq}  # bar close time -> (position held, close price)
    candles = load_candles(SLICE_1H)
    opens = dict(zip(candles["ts"].tolist(), candles["open"].tolist(), strict=True))
    first_open, last_close = ms(eq[0][0]) - HOUR, ms(eq[-1][0])
    expected: dict[int, Decimal] = {}
    prev_close_ms = None
    for t_close in sorted(closes):
        if t_close - HOUR < first_open:
            continue
        qty, price = closes[t_close]
        lo = t_close - HOUR
        if prev_close_ms is not None and prev_close_ms < lo:  # a hole in the data: held position, next open
            for ts, rate in rates.items():
                if prev_close_ms < ts <= lo and closes[prev_close_ms][0] != 0:
                    expected[ts] = -money(closes[prev_close_ms][0] * D(repr(opens[lo])) * rate)
        for ts, rate in rates.items():
            if lo < ts <= t_close and qty != 0:
                expected[ts] = -money(qty * price * rate)
        prev_close_ms = t_close
    expected = {ts: v for ts, v in expected.items() if ts <= last_close}
    booked = {ms(x["timestamp"]): D(x["pnl"]) for x in funding_rows}
    assert len(booked) == len(funding_rows)
    assert booked == expected
    assert sum(D(x["pnl"]) for x in rows) == D(summary["final_equity"]) - D(summary["initial_equity"])
    assert sum(expected.values()) == D(summary["funding"])


def test_backtest_without_funding_file_states_the_default(tmp_path: Path, slice_file: Path) -> None:
    model = write_trend_model(tmp_path / "m.onnx", every=None, hour=None, fs_name="short_v1")
    r = _cli("backtest", "--model", str(model), "--data", str(slice_file), "--to", "2021-12-01",
             "--out", str(tmp_path / "bt"))
    assert r.returncode == 0, r.stderr
    assert "funding: default rate 0.0001 per 8 h" in r.stdout
    s = json.loads((tmp_path / "bt" / "summary.json").read_text())
    assert s["funding_source"].startswith("default rate 0.0001")
    rows = _trades(tmp_path / "bt" / "trades.csv")
    assert sum(D(x["pnl"]) for x in rows if x["side"] == "funding") == D(s["funding"])
    # the default schedule charges at 00/08/16 UTC only
    assert all(x["timestamp"][11:19] in ("00:00:00", "08:00:00", "16:00:00") for x in rows if x["side"] == "funding")


def test_live_mode_gets_no_simulated_funding(settings: Settings) -> None:
    live = dataclasses.replace(settings, mode="live")
    assert funding_schedule(live) is None and funding_schedule(settings) is not None

    class NotPaper(PaperBroker):
        pass

    with pytest.raises(ValueError, match="paper"):
        build_engine(settings, ConstantTarget(0.0), broker=object(), funding=FundingSchedule())  # type: ignore[arg-type]
    build_engine(settings, ConstantTarget(0.0), broker=NotPaper(D(0), D(0)), funding=FundingSchedule())


# ---- evaluate's TSMOM row ----------------------------------------------------------------------------------


def test_evaluate_reports_tsmom_or_why_not(settings: Settings, slice_file: Path) -> None:
    policy = Policy.load(PPO_1H)  # short_v1, 1h
    late = evaluate(policy, slice_file, settings, start_ms=1_646_092_800_000)  # from 2022-03-01: 90 days before it
    t = late["strategies"]["tsmom_vol_target"]
    assert "skipped" not in t and t["trades"] > 0 and math.isfinite(t["sharpe"])
    assert set(late["strategies"]) == {"policy", "buy_and_hold", "flat", "sma_crossover", "tsmom_vol_target"}
    assert late["costs"]["funding"].startswith("default rate")
    early = evaluate(policy, slice_file, settings)  # the whole file: no 90 days before its first evaluated bar
    assert early["strategies"]["tsmom_vol_target"]["skipped"].startswith(
        f"not enough history (needs {TREND_WARMUP_BARS} bars")
    r = _cli("evaluate", "--model", str(PPO_1H), "--data", str(slice_file))
    assert r.returncode == 0, r.stderr
    assert "tsmom_vol_target" in r.stdout and f"not enough history (needs {TREND_WARMUP_BARS} bars" in r.stdout
    r = _cli("evaluate", "--model", str(PPO_1H), "--data", str(slice_file), "--from", "2022-03-01")
    line = next(x for x in r.stdout.splitlines() if x.startswith("tsmom_vol_target"))
    assert "%" in line and "not enough" not in line


def test_evaluate_on_the_bundled_1h_file_names_the_first_date_tsmom_can_run_from(settings: Settings) -> None:
    """The bundled 1h file starts 2024-12-31, so a model with a short warm-up (the PPO model, 49 bars) evaluated
    on all of it has no 90 days before its first bar for TSMOM: the row says from which date it can run, and that
    date (not a day earlier) gives a TSMOM row over the same bars as the policy's."""
    import re

    from alphapulse.backtest import parse_time

    bundled = BUNDLED_1H
    r = _cli("evaluate", "--model", str(PPO_1H))  # a 1h short_v1 model on the bundled file
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("tsmom_vol_target"))
    assert f"not enough history (needs {TREND_WARMUP_BARS} bars" in line, line
    found = re.search(r"--from (\d{4}-\d{2}-\d{2})", line)
    assert found, line
    day = found.group(1)
    first_bar = load_candles(bundled)["ts"][0]
    assert parse_time(day, "--from") == first_bar + (TREND_WARMUP_BARS - 1) * 3_600_000  # exactly 90 days in
    policy = Policy.load(PPO_1H)
    res = evaluate(policy, bundled, settings, start_ms=parse_time(day, "--from"))
    t = res["strategies"]["tsmom_vol_target"]
    assert "skipped" not in t and t["trades"] > 0 and math.isfinite(t["sharpe"]), t
    assert res["data"]["from"].startswith(day)
    earlier = evaluate(policy, bundled, settings, start_ms=parse_time(day, "--from") - 86_400_000)
    assert "not enough history" in earlier["strategies"]["tsmom_vol_target"]["skipped"]
    r = _cli("evaluate", "--model", str(PPO_1H), "--from", day)
    line = next(x for x in r.stdout.splitlines() if x.startswith("tsmom_vol_target"))
    assert r.returncode == 0 and "%" in line and "not enough" not in line, r.stdout + r.stderr


def test_default_evaluate_runs_the_shipped_model_against_all_four_baselines() -> None:
    """``alphapulse evaluate`` as a new user runs it: the default model (trend_v1, 2,161-bar warm-up) on the bundled
    1h file.  Its own warm-up already holds TSMOM's 90 days, so every baseline runs over the same bars as the
    policy, from the first bar with a full warm-up, and the table says where that is and why."""
    from alphapulse.store import iso_ms

    r = _cli("evaluate", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["model"]["path"] == str(default_model_path()) and res["model"]["feature_set"] == "trend_v1"
    assert res["model"]["warmup_bars"] == TREND_WARMUP_BARS
    ts = load_candles(BUNDLED_1H)["ts"]
    assert res["data"]["from"] == iso_ms(int(ts[TREND_WARMUP_BARS - 1]))  # 2025-03-31T00:00
    assert res["data"]["candles"] == len(ts) - (TREND_WARMUP_BARS - 1)
    assert set(res["strategies"]) == {"policy", "buy_and_hold", "flat", "sma_crossover", "tsmom_vol_target"}
    for name, m in res["strategies"].items():
        assert "skipped" not in m and math.isfinite(m["sharpe"]), (name, m)
    assert res["strategies"]["policy"]["trades"] > 0 and res["strategies"]["tsmom_vol_target"]["trades"] > 0
    table = _cli("evaluate")
    assert table.returncode == 0, table.stderr
    assert (f"warm-up: {TREND_WARMUP_BARS} 1h bars of trend_v1 features up to {res['data']['from']}"
            in table.stdout), table.stdout
    assert "the policy decides every 24 bars, on the bar closing at 00:00 UTC" in table.stdout


# ---- check-config --------------------------------------------------------------------------------------------


def test_check_config_reports_the_warm_up(trend_model: Path, tmp_path: Path, settings: Settings,
                                          slice_file: Path) -> None:
    cfg = tmp_path / "config"
    cfg.mkdir()
    (cfg / "trading_params.yaml").write_text((REPO / "config" / "trading_params.yaml").read_text())
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    base["model"]["path"] = str(trend_model)
    (cfg / "config.yaml").write_text(yaml.safe_dump(base))
    env = {"ALPHAPULSE_CONFIG_DIR": str(cfg), "ALPHAPULSE_DATA_DIR": str(tmp_path / "d"),
           "ALPHAPULSE_LOG_DIR": str(tmp_path / "l")}
    r = _cli("check-config", env=env | {"ALPHAPULSE_REPLAY_FILE": str(slice_file)})
    assert r.returncode == 0, r.stderr
    assert f"warm-up: {TREND_WARMUP_BARS} 1h bars (trend_v1" in r.stdout and "enough" in r.stdout
    short = tmp_path / "BTC_USDT-1h-short.csv"
    with gzip.open(SLICE_1H, "rt") as f:
        short.write_text("".join(f.readlines()[:1001]))
    r = _cli("check-config", env=env | {"ALPHAPULSE_REPLAY_FILE": str(short)})
    assert r.returncode == 78 and "has only 1000 valid candles" in r.stderr and str(TREND_WARMUP_BARS) in r.stderr
    ok, text = warmup_check(dataclasses.replace(settings, feed_source="weex"), Policy.load(trend_model))
    assert ok and "fetches them at start" in text


# ---- training env: cadence, funding, vol-scaled reward ---------------------------------------------------------


def test_env_decides_once_a_day_with_the_vol_scaled_reward(settings: Settings, cols: dict[str, np.ndarray]) -> None:
    seg = make_segment("BTC_USDT", "train", cols, feature_set("trend_v1"))
    cfg = EnvConfig(episode_length=20, feature_set="trend_v1", decision_every_bars=24, decision_hour_utc=0,
                    reward="vol_scaled", target_vol=0.10)
    env = TradingEnv([seg], settings, cfg)
    obs, _ = env.reset(options={"segment": 0, "start": seg.first_obs_index})
    assert obs.shape == (len(TREND_FEATURE_NAMES),)
    assert (int(seg.ts[env.t]) + HOUR) % DAY == 0  # the first decision is at a 00:00 UTC close
    sigma = 0.10 * math.sqrt(DAY / (365 * DAY))
    long_full = ACTION_TARGETS.index(1.0)
    for _ in range(10):
        eq0 = float(env.engine.portfolio.equity)  # type: ignore[union-attr]
        t0 = env.t
        _, reward, terminated, truncated, info = env.step(long_full)
        assert env.t - t0 == 24 and (int(seg.ts[env.t]) + HOUR) % DAY == 0
        assert reward == pytest.approx((info["equity"] - eq0) / eq0 / sigma, rel=1e-12)
        if terminated or truncated:
            break
    assert env.engine is not None and env.engine.portfolio.funding < 0, "a long held for days pays funding"
    with pytest.raises(ValueError, match="drawdown"):
        EnvConfig(reward="vol_scaled", drawdown_penalty=1.0)
    assert ACTION_MEANINGS[long_full] == "long_full"
