"""Backtests and evaluation: parity with the daemon, exact reconciliation, baselines, CLI errors, --validate."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

from alphapulse.backtest import infer_market, run_backtest, select
from alphapulse.baselines import ConstantTarget, SmaCrossover
from alphapulse.config import load_settings
from alphapulse.evaluation import METRIC_KEYS, evaluate, validate_model
from alphapulse.funding import FundingSchedule
from alphapulse.market.replay import load_candles
from alphapulse.policy import Policy, default_model_path
from tests.daemon_harness import BASELINE_MODEL, REPO, DaemonProc, clean_env, slice_bundled
from tests.test_policy import good_metadata, write_model

N = 6_000


@pytest.fixture(scope="module")
def replay(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # a real slice that trades, hits REDUCE_ONLY and halts on the way (March 2025)
    return slice_bundled(tmp_path_factory.mktemp("bt") / "BTC_USDT_USDT-5m.csv", N, start=12_000)


@pytest.fixture(scope="module")
def settings():  # type: ignore[no-untyped-def]
    return load_settings(REPO / "config", env={})


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``alphapulse <args>`` with the 5m baseline model (these tests slice the bundled 5m candles)."""
    if args[0] in ("backtest", "evaluate") and "--model" not in args and "--validate" not in args:
        args = (args[0], "--model", str(BASELINE_MODEL), *args[1:])
    env = clean_env() | {"ALPHAPULSE_CONFIG_DIR": str(REPO / "config")}
    return subprocess.run([sys.executable, "-m", "alphapulse", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300, stdin=subprocess.DEVNULL)


def test_backtest_trades_exactly_what_the_paper_daemon_trades(replay: Path, tmp_path: Path) -> None:
    d = DaemonProc(tmp_path / "daemon", replay_file=replay, args=("--exit-at-end",))
    try:
        d.start()
        assert d.wait_exit(timeout=120) == 0, d.stderr()
    finally:
        d.close()
    for streaming in (False, True):
        out = tmp_path / f"bt-{streaming}"
        args = ["backtest", "--data", str(replay), "--out", str(out), "--json"]
        r = _cli(*args, *(["--streaming-features"] if streaming else []))
        assert r.returncode == 0, r.stderr
        daemon_trades = (d.log_dir / "trades.csv").read_text().splitlines()
        bt_trades = (out / "trades.csv").read_text().splitlines()
        assert len(daemon_trades) > 20
        # the backtest adds one closing fill at the end (a run ends flat); everything before is identical
        if bt_trades[-1].endswith(",end_of_backtest"):
            bt_trades = bt_trades[:-1]
        assert bt_trades == daemon_trades

        def decisions(p: Path) -> list[tuple[object, ...]]:
            rows = [json.loads(ln) for ln in p.read_text().splitlines()]
            keys = ("candle_time", "action", "allowed", "reason", "order_id", "equity")
            return [tuple(r[k] for k in keys) for r in rows]

        assert decisions(out / "ai_decisions.json") == decisions(d.log_dir / "ai_decisions.json")
        assert (out / "risk_alerts.json").read_text().count("RISK_LIMIT_EXCEEDED") == \
            (d.log_dir / "risk_alerts.json").read_text().count("RISK_LIMIT_EXCEEDED")


def test_backtest_ends_flat_and_reconciles_to_the_cent(replay: Path, tmp_path: Path) -> None:
    out = tmp_path / "bt"
    r = _cli("backtest", "--data", str(replay), "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    with open(out / "trades.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows, "the slice should trade"
    total_pnl = sum(Decimal(x["pnl"]) for x in rows)
    total_fee = sum(Decimal(x["fee"]) for x in rows)
    assert total_pnl == Decimal(summary["final_equity"]) - Decimal(summary["initial_equity"])
    assert total_fee == Decimal(summary["fees"])
    equity = (out / "equity.csv").read_text().splitlines()
    assert equity[-1].split(",")[2] == "0", "a backtest run ends flat"
    assert Decimal(equity[-1].split(",")[1]) == Decimal(summary["final_equity"])
    assert json.loads((out / "summary.json").read_text())["final_equity"] == summary["final_equity"]
    # positions in equity.csv follow the fills exactly
    pos = Decimal(0)
    for x in rows:
        pos += Decimal(x["qty"]) if x["side"] == "buy" else -Decimal(x["qty"])
    assert pos == 0


def test_backtest_period_selection_and_errors(replay: Path, tmp_path: Path) -> None:
    r = _cli("backtest", "--data", str(replay), "--from", "2025-02-15", "--to", "2025-02-20", "--json",
             "--out", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    # 48 warm-up bars before --from, then every 5m bar of the five days
    assert s["candles"] == 5 * 288 + 48
    assert s["to"] == "2025-02-20T00:00:00.000Z"
    for args, fragment in (
        (["--from", "yesterday"], "--from"),
        (["--from", "2025-03-20", "--to", "2025-03-10"], "--to must be after --from"),
        (["--data", str(tmp_path / "missing.csv")], "missing.csv"),
        (["--from", "2030-01-01"], "no candles"),
    ):
        r = _cli("backtest", "--data", str(replay), *args, "--out", str(tmp_path / "x"))
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert fragment in r.stderr and "Traceback" not in r.stderr, r.stderr
    hourly = tmp_path / "BTC_USDT-1h.csv"
    rows = replay.read_text().splitlines()
    hourly.write_text("\n".join([rows[0]] + [r for r in rows[1:] if int(r.split(",")[0]) % 3_600_000 == 0]) + "\n")
    r = _cli("backtest", "--data", str(hourly), "--out", str(tmp_path / "y"))
    assert r.returncode == 1 and "1h" in r.stderr and "5m" in r.stderr


def test_infer_market_from_shared_data_names() -> None:
    ts = np.array([0, 300_000])
    assert infer_market(Path("BTC_USDT-1h.csv.gz"), ts) == ("BTCUSDT", "1h")
    assert infer_market(Path("futures/ETH_USDT_USDT-5m-futures.csv.gz"), ts) == ("ETHUSDT", "5m")
    assert infer_market(Path("whatever.csv"), ts) == ("WHATEVER", "5m")


def test_baselines_behave_as_named(replay: Path, settings) -> None:  # type: ignore[no-untyped-def]
    cols = select(load_candles(replay), None, None, 300_000)
    bh = run_backtest(ConstantTarget(1.0), cols, settings, symbol="BTCUSDT", timeframe="5m")
    flat = run_backtest(ConstantTarget(0.0), cols, settings, symbol="BTCUSDT", timeframe="5m")
    assert flat.metrics["trades"] == 0 and flat.final_equity == flat.initial_equity
    assert bh.metrics["exposure"] > 0.95
    # buy-and-hold rides the market with half the capital (max position 50 % of equity, re-sized only outside
    # the rebalance band): its return is about half the market's from the first fill (the open after the first
    # decided bar) to the last close, less fees; "all" or "none" of the capital would be 2.3 points away
    assert bh.metrics["trades"] <= 4  # open, the end close, and rare re-sizing outside the rebalance band
    market = float(cols["close"][-1] / cols["open"][49] - 1)
    assert abs(market) > 0.04
    assert float(bh.final_equity / bh.initial_equity - 1) == pytest.approx(market / 2, abs=0.008)

    # SMA crossover = sign(SMA12 - SMA48) of real closes, computed independently here
    sma = SmaCrossover()
    close = cols["close"]
    k = 2_000
    sma12, sma48 = close[k - 11:k + 1].mean(), close[k - 47:k + 1].mean()
    from alphapulse.features import batch_market_features, observation

    market = batch_market_features(cols["open"], cols["high"], cols["low"], close, cols["volume"])
    d = sma.decide(observation(market[k].tolist(), 0.0, 0.0), int(cols["ts"][k]), "BTCUSDT")
    assert d.target == (1.0 if sma12 > sma48 else -1.0)


def test_evaluate_json_has_every_strategy_and_metric(replay: Path) -> None:
    r = _cli("evaluate", "--data", str(replay), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out["data"]) >= {"file", "symbol", "timeframe", "from", "to", "candles"}
    assert out["data"]["symbol"] == "BTCUSDT" and out["data"]["timeframe"] == "5m"
    assert out["data"]["candles"] == N - 48
    assert set(out["strategies"]) == {"policy", "buy_and_hold", "flat", "sma_crossover", "tsmom_vol_target"}
    # TSMOM reads trend_v1, defined on 1h bars: on 5m candles it is reported, not run
    assert out["strategies"].pop("tsmom_vol_target") == {"skipped": "needs 1h candles (trend_v1 features)"}
    for name, m in out["strategies"].items():
        assert set(METRIC_KEYS) <= set(m), name
        assert m["max_drawdown"] >= 0
    assert out["strategies"]["flat"]["total_return"] == 0 and out["strategies"]["flat"]["trades"] == 0
    r7 = _cli("evaluate", "--data", str(replay), "--period", "7d", "--json")
    assert json.loads(r7.stdout)["data"]["candles"] == 7 * 288
    table = _cli("evaluate", "--data", str(replay))
    assert table.returncode == 0 and "buy_and_hold" in table.stdout and "sharpe" in table.stdout


def test_evaluate_rows_agree_with_the_candles_and_a_direct_backtest(replay: Path, settings) -> None:  # type: ignore[no-untyped-def]
    policy = Policy.load(BASELINE_MODEL)
    out = evaluate(policy, replay, settings)
    cols = select(load_candles(replay), None, None, 300_000)
    # First what the candles alone say a buy-and-hold row must show (evaluate calls run_backtest, so the
    # comparison with a direct run below only proves the plumbing: same bars, settings and funding).
    bh = out["strategies"]["buy_and_hold"]
    e0 = 10_000.0
    market = float(cols["close"][-1] / cols["open"][49] - 1)  # first fill: the open after the first decided bar
    assert bh["exposure"] > 0.99 and bh["trades"] <= 4
    assert bh["total_return"] == pytest.approx(market / 2, abs=0.008)  # half the capital, less fees and funding
    assert 2 * 0.0006 * 0.45 * e0 < bh["fees"] < 2 * 0.0006 * 0.6 * e0 + 1  # taker fee on the way in and out
    funding_times = int((cols["ts"][48:] % (8 * 3_600_000) == 0).sum())  # 00/08/16 UTC bars while held
    assert funding_times > 50
    assert funding_times * 1e-4 * 0.4 * e0 < -bh["funding"] < funding_times * 1e-4 * 0.6 * e0  # 0.01 % per 8 h
    assert bh["final_equity"] == pytest.approx(e0 * (1 + bh["total_return"]), abs=1e-6)
    # baselines are the plain strategies: the daemon's costs and position size, but no halts
    plain = dataclasses.replace(settings, risk=dataclasses.replace(settings.risk, daily_loss_limit_frac=1.0,
                                                                  max_drawdown_frac=1.0))
    funding = FundingSchedule()  # evaluate books the default funding rate for every strategy
    direct = run_backtest(ConstantTarget(1.0), cols, plain, symbol="BTCUSDT", timeframe="5m", funding=funding)
    assert out["strategies"]["buy_and_hold"]["final_equity"] == float(direct.final_equity)
    assert out["strategies"]["buy_and_hold"]["funding"] == float(direct.funding) < 0  # a long pays
    halted = run_backtest(policy, cols, settings, symbol="BTCUSDT", timeframe="5m", funding=funding)
    assert out["strategies"]["policy"]["final_equity"] == float(halted.final_equity), "policy: daemon limits"
    assert out["strategies"]["buy_and_hold"]["fees"] == pytest.approx(float(direct.fees))


def test_validate_accepts_the_shipped_model_and_names_problems(tmp_path: Path) -> None:
    assert validate_model(default_model_path()) == []
    r = _cli("evaluate", "--validate")
    assert r.returncode == 0 and "ok" in r.stdout
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x00garbage" * 100)
    r = _cli("evaluate", "--validate", "--model", str(corrupt), "--json")
    assert r.returncode == 1
    problems = json.loads(r.stdout)["problems"]
    assert problems and "Traceback" not in r.stdout + r.stderr
    pytest.importorskip("onnx")
    wrong = write_model(tmp_path / "wrong.onnx", metadata=good_metadata(**{
        "alphapulse.feature_names": json.dumps([f"f{i}" for i in range(20)]),
        "alphapulse.training_data_range": ""}))
    problems = validate_model(wrong)
    assert any("training_data_range" in p for p in problems), problems
    assert any("feature" in p for p in problems), problems
    r = _cli("evaluate", "--data", str(tmp_path / "nope.csv.gz"))
    assert r.returncode == 1 and "nope.csv.gz" in r.stderr and "Traceback" not in r.stderr


def test_evaluate_refuses_a_file_of_another_timeframe(tmp_path: Path) -> None:
    with gzip.open(REPO / "alphapulse/data/BTC_USDT_USDT-5m.csv.gz", "rt") as f:
        lines = f.read().splitlines()
    hourly = tmp_path / "BTC_USDT-1h.csv"
    hourly.write_text("\n".join([lines[0]] + [r for r in lines[1:3000] if int(r.split(",")[0]) % 3_600_000 == 0]))
    r = _cli("evaluate", "--data", str(hourly))
    assert r.returncode == 1 and "trained on 5m" in r.stderr


def test_evaluate_quick_uses_the_bundled_candles_of_the_models_timeframe() -> None:
    r = _cli("evaluate", "--quick", "--json")  # no --data: the bundled file of the model's timeframe
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["data"]["candles"] == 2_000 and out["data"]["timeframe"] == "5m"
    assert out["data"]["file"].endswith("BTC_USDT_USDT-5m.csv.gz")
    assert out["data"]["to"] == "2025-09-01T00:00:00.000Z"
