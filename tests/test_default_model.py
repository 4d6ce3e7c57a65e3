"""The rule-gated policy as the daemon's default model: what a user meets with it out of the box.

``alphapulse/models/gated_rule_1h.onnx`` decides once a day (on the bar closing at 00:00 UTC) on ``trend_v1``
features with a 2,161-bar warm-up, where the previous default decided every bar on a 49-bar warm-up.  These tests
run the commands a new user runs (``check-config``, ``backtest``, ``report``, ``model promote``/``list``, the
monitor's model-confidence rule) on the bundled 1h candles with the repository's own configuration, and check
each still says something true and useful with a daily model.  The ``make run`` daemon test is in
``tests/test_daemon.py``; ``evaluate`` is in ``tests/test_trend_pipeline.py``.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import yaml

from alphapulse.backtest import run_backtest, select
from alphapulse.config import Settings, load_settings
from alphapulse.evaluation import validate_model
from alphapulse.market.replay import load_candles
from alphapulse.model_cli import model_main
from alphapulse.monitor import rules
from alphapulse.monitor.settings import load_monitor_settings
from alphapulse.policy import Policy, default_model_path
from alphapulse.report import run as report_run
from alphapulse.store import iso_ms
from tests.daemon_harness import REPO, DaemonProc, MonitorProc, clean_env

BUNDLED_1H = REPO / "alphapulse" / "data" / "BTC_USDT_USDT-1h.csv.gz"
HOUR = 3_600_000
WARMUP = 2161  # trend_v1: 90 days of 1h bars + 1


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings(REPO / "config", env={})


@pytest.fixture(scope="module")
def backtest_logs(tmp_path_factory: pytest.TempPathFactory, settings: Settings) -> Path:
    """`alphapulse backtest`'s operator files for the default model over the whole bundled 1h file."""
    out = tmp_path_factory.mktemp("bt")
    cols = select(load_candles(BUNDLED_1H), None, None, HOUR)
    run_backtest(Policy.load(default_model_path()), cols, settings, symbol="BTCUSDT", timeframe="1h", out_dir=out)
    return out


def decisions(logs: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (logs / "ai_decisions.json").read_text().splitlines() if line.strip()]


def test_the_default_is_the_gated_policy_and_passes_the_promotion_gate() -> None:
    path = default_model_path()
    assert path.name == "gated_rule_1h.onnx"
    meta = Policy.load(path).meta
    assert (meta.kind, meta.timeframe, meta.feature_set_name) == ("gated_rule", "1h", "trend_v1")
    assert (meta.decision_every_bars, meta.decision_hour_utc) == (24, 0)
    assert meta.feature_set.warmup_bars == WARMUP
    assert validate_model(path) == []


def test_check_config_says_the_bundled_file_holds_the_warm_up(tmp_path: Path) -> None:
    env = clean_env() | {"ALPHAPULSE_CONFIG_DIR": str(REPO / "config"), "ALPHAPULSE_DATA_DIR": str(tmp_path / "d"),
                         "ALPHAPULSE_LOG_DIR": str(tmp_path / "l")}
    r = subprocess.run([sys.executable, "-m", "alphapulse", "check-config"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    n = len(load_candles(BUNDLED_1H)["ts"])
    assert f"model: gate-2024-25-prior_strong-s1 from {default_model_path()} (bundled)" in r.stdout, r.stdout
    assert (f"warm-up: {WARMUP} 1h bars (trend_v1 features of model gate-2024-25-prior_strong-s1); replay file "
            f"{BUNDLED_1H} has {n} valid candles: enough ({n - WARMUP + 1} decidable)") in r.stdout, r.stdout


def test_backtest_decides_once_a_day_after_the_warm_up(backtest_logs: Path) -> None:
    rows = decisions(backtest_logs)
    ts = load_candles(BUNDLED_1H)["ts"]
    first_decidable = int(ts[WARMUP - 1])
    times = [r["candle_time"] for r in rows]
    assert all(t.endswith("T23:00:00.000Z") for t in times), times[:5]  # the candle closing at 00:00 UTC
    assert len(set(times)) == len(times)
    assert times[0] == iso_ms(first_decidable + 23 * HOUR)  # the warm-up ends at 2025-03-31 00:00
    assert times[-1] == iso_ms(int(ts[-1]))  # the file's last bar is 23:00: it is decided
    traded = [r for r in rows if r["order_id"]]
    assert len(traded) > 5, "the default model should trade the bundled file"


def test_monitor_confidence_rule_stays_quiet_on_the_default_model(backtest_logs: Path) -> None:
    """The monitor's P3 ``model_confidence`` rule (config/monitoring.yaml: mean confidence below 0.60 over the
    last hour) fed the default model's real decision stream as the daemon reports it (``model.decisions`` and
    ``model.avg_confidence``), one decision a day, so each 1 h window holds at most one: it never opens.  The same
    stream against a 0.90 minimum does open it, so the quiet is the data's, not a rule that cannot fire."""
    confs = [r["confidence"] for r in decisions(backtest_logs)]
    assert len(set(confs)) > 10, "a gated model's confidence varies with the gate distribution, not constant"
    assert min(confs) >= 0.6, min(confs)
    shipped = load_monitor_settings(REPO / "config", env={}).thresholds
    assert shipped.model_confidence_min == 0.60

    def opened(threshold: float) -> list[rules.Transition]:
        th = dataclasses.replace(shipped, model_confidence_min=threshold)
        out, streak, alert, n, total = [], rules.Streak(), None, 0, 0.0
        prev = rules.Sample(ts=0.0, daemon_up=True, metrics={"model": {"decisions": 0, "avg_confidence": 0.0},
                                                             "system": {"uptime_s": 0}})
        for i, c in enumerate(confs):
            n, total = n + 1, total + c
            now = rules.Sample(ts=(i + 1) * 86_400.0, daemon_up=True,
                               metrics={"model": {"decisions": n, "avg_confidence": round(total / n, 6)},
                                        "system": {"uptime_s": (i + 1) * 86_400}})
            tr, streak = rules.step(rules.model_confidence(now, prev, th), alert, streak, 5.0)
            if tr is not None and tr.kind == "opened":
                out.append(tr)
                alert = rules.OpenAlert(len(out), tr.rule, tr.severity, "open")
            prev = now
        return out

    assert opened(shipped.model_confidence_min) == []
    assert opened(0.90), "a 0.90 minimum must fire on this stream (median confidence ~0.81)"


def test_report_defaults_to_the_last_day_with_a_decision(backtest_logs: Path, tmp_path: Path) -> None:
    """The last decision is on 2025-08-31 23:00 and its fill, the funding and the backtest's closing fill are
    stamped 2025-09-01 00:00, the close of that bar: the default daily report is 2025-08-31 (with its decision),
    not a 2025-09-01 holding only those lines, which an explicit --date still reports."""
    trades = (backtest_logs / "trades.csv").read_text()
    assert "2025-09-01T00:00:00" in trades or "2025-09-01 00:00:00" in trades, trades[-500:]
    report, _ = report_run("daily", None, backtest_logs, tmp_path / "d.html")
    assert report.data.period.label == "2025-08-31" and report.data.decisions == 1
    week, _ = report_run("weekly", None, backtest_logs, tmp_path / "w.html")
    assert week.data.period.label == "2025-W35" and week.data.decisions == 7
    assert week.bar_ms == 24 * HOUR  # one equity mark a day: Sharpe annualised with 365 periods, not 8,760
    after, _ = report_run("daily", date(2025, 9, 1), backtest_logs, tmp_path / "a.html")
    assert after.data.decisions == 0 and after.data.trades


def test_model_promote_and_list_the_bundled_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = load_settings(REPO / "config", env={"ALPHAPULSE_DATA_DIR": str(tmp_path / "data"),
                                            "ALPHAPULSE_LOG_DIR": str(tmp_path / "log"),
                                            "ALPHAPULSE_CONTROL_PORT": "1"})
    assert model_main(["promote", str(default_model_path())], s) == 0
    assert model_main(["promote", str(default_model_path().with_name("ppo_1h.onnx"))], s) == 0
    assert model_main(["rollback"], s) == 0
    capsys.readouterr()
    assert model_main(["list"], s) == 0
    lines = capsys.readouterr().out.splitlines()
    head = lines[0].split()
    assert head == ["version", "kind", "tf", "features", "imported", "sha256"]
    gate = next(ln for ln in lines if "gate-2024-25-prior_strong-s1" in ln)
    ppo = next(ln for ln in lines if "ppo-1h-20261125-s9" in ln)
    assert gate.split()[:5] == ["*", "gate-2024-25-prior_strong-s1", "gated_rule", "1h", "trend_v1"], gate
    assert ppo.split()[:5] == ["-", "ppo-1h-20261125-s9", "ppo", "1h", "short_v1"], ppo
    col = lines[0].index(" kind ") + 1  # the columns line up: each kind starts under the "kind" title
    assert gate[col:].startswith("gated_rule ") and ppo[col:].startswith("ppo "), (lines[0], gate, ppo)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_real_monitor_beside_the_make_run_daemon_raises_no_confidence_alert(tmp_path: Path) -> None:
    """``make run`` (shipped config, default model, bundled replay; here at 20x its speed, ~15 s) with ``alphapulse
    monitor`` on the shipped monitoring.yaml beside it, scraping every 0.5 s: over the whole replay it opens no
    ``model_confidence`` alert; a second monitor with a 0.90 minimum opens one (P3) on the same daemon."""
    d = DaemonProc(tmp_path, shipped_defaults=True, speed="1440000")
    m = MonitorProc(d)
    strict: MonitorProc | None = None
    try:
        d.start()
        d.wait_ready()
        m.start()
        m.wait_ready()
        d.wait_metric(lambda x: x["market"]["feed"].get("finished"), timeout=150)

        def scraped_the_end(body: dict[str, Any]) -> bool:
            metrics = (body.get("daemon") or {}).get("metrics") or {}
            return bool(metrics.get("market", {}).get("feed", {}).get("finished"))

        end = time.monotonic() + 20
        while True:
            status, snap, _ = m.http("GET", "/api/snapshot")
            if status == 200 and scraped_the_end(snap):
                break
            assert time.monotonic() < end, snap
            time.sleep(0.1)
        assert snap["daemon"]["metrics"]["model"]["decisions"] > 100
        assert snap["monitor"]["scrapes"] > 5  # it watched the replay, not only its end
        body = m.alerts()
        seen = {a["rule"] for a in body["active_alerts"] + body["recent_alerts"]}
        assert "model_confidence" not in seen, body
        assert m.stop() == 0
        m.close()

        strict = MonitorProc(d, monitoring={"rules": {**_shipped_rules(), "model_confidence_min": 0.9}})
        strict.start()
        strict.wait_ready()
        got = strict.wait_alerts(lambda b: any(a["rule"] == "model_confidence" for a in b["active_alerts"]),
                                 timeout=20)
        alert = next(a for a in got["active_alerts"] if a["rule"] == "model_confidence")
        assert alert["severity"] == "P3"
        assert strict.stop() == 0
    finally:
        m.close()
        if strict is not None:
            strict.close()
        d.close()


def _shipped_rules() -> dict[str, Any]:
    return dict(yaml.safe_load((REPO / "config" / "monitoring.yaml").read_text())["rules"])
