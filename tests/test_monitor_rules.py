"""The monitor's alert rules on constructed samples: each rule fires and resolves, hysteresis, de-duplication,
escalation, no-data handling; and monitoring.yaml validation.  Pure: no process, no clock, no network."""

from __future__ import annotations

import copy
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import yaml

from alphapulse.config import ConfigError
from alphapulse.monitor import rules
from alphapulse.monitor.rules import Check, OpenAlert, RuleBook, Sample, Streak, step
from alphapulse.monitor.settings import Thresholds, load_monitor_settings
from alphapulse.monitor.store import AlertResolved, MonitorStore

REPO = Path(__file__).resolve().parent.parent
TH = Thresholds()  # the defaults, which are monitoring.yaml's values (checked below)
T0 = 1_764_547_200.0  # 2025-12-01T00:00:00Z


def daemon_metrics(**over: Any) -> dict[str, Any]:
    """A /metrics body shaped like Daemon.metrics() of a healthy paper daemon."""
    m: dict[str, Any] = {
        "portfolio": {"equity": 10_000.0, "cash": 10_000.0, "initial_equity": 10_000.0, "daily_pnl": 0.0,
                      "drawdown": 0.0, "peak_equity": 10_000.0, "positions": [], "fills": 0},
        "trading": {"mode": "paper", "state": "ACTIVE", "state_reason": "", "symbol": "BTCUSDT", "timeframe": "5m",
                    "orders": 0, "open_orders": 0},
        "model": {"version": "baseline", "decisions": 100, "avg_confidence": 0.8, "confidence_threshold": 0.6,
                  "inference_us": {"count": 100, "p50": 40.0, "p99": 90.0, "max": 120.0, "mean": 45.0}},
        "risk": {"alerts": 0},
        "market": {"last_candle": {"time": "2025-12-01T00:00:00.000Z", "close": 1.0}, "candles_processed": 10,
                   "feed": {"kind": "replay", "timeframe": "5m", "now_ms": int(T0 * 1000) + 300_000,
                            "finished": False}},
        "exchange": None,
        "system": {"uptime_s": 100.0},
    }
    for dotted, value in over.items():
        *parents, leaf = dotted.split("__")
        cur = m
        for p in parents:
            cur = cur[p]
        cur[leaf] = value
    return m


def sample(ts: float = T0, *, up: bool = True, status: int = 200, metrics: dict[str, Any] | None = None,
           cpu: float = 10.0, mem: float = 20.0, disk: float = 30.0, scrape_ms: float = 5.0,
           problem: str | None = None) -> Sample:
    if not up:
        return Sample(ts=ts, daemon_up=False, error="connection refused", cpu_pct=cpu, memory_pct=mem, disk_pct=disk)
    return Sample(ts=ts, daemon_up=True, health_status=status,
                  health={"status": "ok" if status == 200 else "stalled", "problem": problem},
                  metrics=daemon_metrics() if metrics is None else metrics, scrape_ms=scrape_ms,
                  cpu_pct=cpu, memory_pct=mem, disk_pct=disk)


class Book:
    """A RuleBook plus the id assignment and rows a store would give, so sequences can be played."""

    def __init__(self, th: Thresholds = TH) -> None:
        self.book = RuleBook(th)
        self.th = th
        self.rows: dict[int, dict[str, Any]] = {}
        self.events: list[tuple[str, str, str]] = []  # (kind, rule, severity)
        self.prev: Sample | None = None

    def feed(self, s: Sample, base: Sample | None = None) -> list[rules.Transition]:
        checks = rules.evaluate(s, self.prev, base, base, self.th)
        ts = self.book.evaluate(checks)
        for t in ts:
            if t.kind == "opened":
                aid = len(self.rows) + 1
                self.rows[aid] = {"id": aid, "rule": t.rule, "severity": t.severity, "state": "open", "count": 1}
            else:
                assert t.alert_id is not None
                aid = t.alert_id
                row = self.rows[aid]
                if t.kind == "escalated":
                    row.update(severity=t.severity, state="open", count=row["count"] + 1)
                elif t.kind == "redetected":
                    row["count"] += 1
                elif t.kind == "resolved":
                    row["state"] = "resolved"
            self.book.applied(self.rows[aid])
            self.events.append((t.kind, t.rule, t.severity))
        if s.metrics is not None:
            self.prev = s
        return ts

    def active(self) -> dict[str, str]:
        return {rule: a.severity for rule, a in self.book.open.items()}

    def kinds(self, rule: str) -> list[str]:
        return [k for k, r, _ in self.events if r == rule]


# ---------------------------------------------------------------------------------------------------------- config


def test_shipped_monitoring_yaml_matches_the_built_in_defaults(tmp_path: Path) -> None:
    s = load_monitor_settings(REPO / "config", env={"ALPHAPULSE_DATA_DIR": str(tmp_path)})
    assert s.config_file == REPO / "config" / "monitoring.yaml"
    assert s.thresholds == Thresholds()
    assert (s.scrape_interval_s, s.scrape_timeout_s, s.retention_days, s.port) == (5.0, 2.0, 14.0, 8081)
    assert s.daemon_url == "http://127.0.0.1:8080" and s.db_path == tmp_path / "monitor.db"
    assert s.delivery["webhook"]["enabled"] is False  # the raw section, passed through
    assert s.delivery_config.channels == ()  # validated by alphapulse.monitor.delivery_config: all off


def _config_dir(tmp_path: Path, doc: Any) -> Path:
    d = tmp_path / "cfg"
    d.mkdir(exist_ok=True)
    (d / "monitoring.yaml").write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return d


@pytest.mark.parametrize(("doc", "key", "problem"), [
    ({"scrape_interval_s": 0}, "scrape_interval_s", "must be >= 0.1"),
    ({"scrape_interval_s": "fast"}, "scrape_interval_s", "must be a number"),
    ({"scrape_timeout_s": 9, "scrape_interval_s": 5}, "scrape_timeout_s", "must be <= scrape_interval_s"),
    ({"retention_days": 0}, "retention_days", "must be > 0"),
    ({"rules": {"cpu_pct": {"warning": 95, "critical": 90}}}, "rules.cpu_pct.warning", "must be <= rules.cpu_pct"),
    ({"rules": {"disk_pct": {"warning": 80, "critical": 120}}}, "rules.disk_pct.critical", "must be <= 100"),
    ({"rules": {"model_confidence_min": 1.5}}, "rules.model_confidence_min", "must be <= 1"),
    ({"rules": {"cpu": {"warning": 1}}}, "rules.cpu", "unknown key"),
    ({"rule": {}}, "rule", "unknown key"),
    ({"delivery": ["mail"]}, "delivery", "must be a mapping"),
    ("rules: [unclosed", "line 1", "invalid YAML"),
])
def test_invalid_monitoring_yaml_names_file_key_and_problem(tmp_path: Path, doc: Any, key: str, problem: str) -> None:
    d = _config_dir(tmp_path, doc)
    with pytest.raises(ConfigError) as e:
        load_monitor_settings(d, env={})
    assert e.value.source == str(d / "monitoring.yaml")
    assert e.value.key == key and problem in e.value.problem, str(e.value)


def test_monitor_port_comes_from_the_environment_and_is_checked(tmp_path: Path) -> None:
    d = _config_dir(tmp_path, {})
    assert load_monitor_settings(d, env={"ALPHAPULSE_MONITOR_PORT": "9191"}).port == 9191
    with pytest.raises(ConfigError) as e:
        load_monitor_settings(d, env={"ALPHAPULSE_MONITOR_PORT": "http"})
    assert (e.value.source, e.value.key) == ("environment", "ALPHAPULSE_MONITOR_PORT")
    with pytest.raises(ConfigError):
        load_monitor_settings(d, env={"ALPHAPULSE_MONITOR_PORT": "70000"})


def test_delivery_section_is_passed_on_and_validated_by_its_owner(tmp_path: Path) -> None:
    hook = {"webhook": {"enabled": True, "url": "http://127.0.0.1:9/hook", "min_severity": "P2"}}
    s = load_monitor_settings(_config_dir(tmp_path, {"delivery": hook}), env={})
    assert s.delivery == hook
    assert [(c.kind, c.min_severity) for c in s.delivery_config.channels] == [("webhook", "P2")]
    with pytest.raises(ConfigError) as e:
        load_monitor_settings(_config_dir(tmp_path, {"delivery": {"webhook": {"enabled": True}}}), env={})
    assert e.value.key == "delivery.webhook.url" and e.value.source.endswith("monitoring.yaml")


def test_daemon_accepts_the_monitor_port_variable(tmp_path: Path) -> None:
    """Both read the same environment file, and the daemon rejects unknown ALPHAPULSE_* variables."""
    from alphapulse.config import load_settings

    load_settings(None, env={"ALPHAPULSE_MONITOR_PORT": "8081"})


# ---------------------------------------------------------------------------------------------------------- step


def check(value: float | None, **kw: Any) -> Check:
    return Check("x", value, (("P3", 80.0), ("P2", 90.0)), f"value {value}", **kw)


def test_step_opens_escalates_and_resolves_only_inside_the_hysteresis_band() -> None:
    t, st = step(check(79.9), None, Streak(), 5.0)
    assert t is None
    t, st = step(check(80.0), None, st, 5.0)
    assert t is not None and (t.kind, t.severity, t.threshold) == ("opened", "P3", 80.0)
    alert = OpenAlert(1, "x", "P3", "open")
    t, st = step(check(91.0), alert, st, 5.0)
    assert t is not None and (t.kind, t.severity, t.alert_id) == ("escalated", "P2", 1)
    alert = OpenAlert(1, "x", "P2", "open")
    t, st = step(check(85.0), alert, st, 5.0)
    assert t is None  # severity never drops while open
    t, st = step(check(76.5), alert, st, 5.0)
    assert t is None  # below 80 but not below 80 * 0.95 = 76
    t, st = step(check(75.9), alert, st, 5.0)
    assert t is not None and (t.kind, t.alert_id) == ("resolved", 1)


def test_hovering_at_the_threshold_is_one_alert_with_a_count_not_a_flap() -> None:
    alert: OpenAlert | None = None
    st = Streak()
    kinds = []
    for v in [80.5, 79.0, 80.2, 78.9, 81.0, 77.0, 80.0] * 5:
        t, st = step(check(v), alert, st, 5.0)
        if t is not None:
            kinds.append(t.kind)
            if t.kind == "opened":
                alert = OpenAlert(7, "x", t.severity, "open")
    assert kinds[0] == "opened" and "resolved" not in kinds
    assert kinds.count("opened") == 1
    # each crossing back above the threshold while open (80.0 -> 80.5 across cycles is no crossing)
    assert kinds.count("redetected") == 3 * 5


def test_fire_after_and_clear_after_need_consecutive_samples() -> None:
    c = Check("b", 1.0, (("P1", 1.0),), fire_after=2, clear_after=2)
    t, st = step(c, None, Streak(), 5.0)
    assert t is None
    t, st = step(Check("b", 0.0, (("P1", 1.0),), fire_after=2, clear_after=2), None, st, 5.0)
    t, st = step(c, None, st, 5.0)
    assert t is None  # the streak was broken
    t, st = step(c, None, st, 5.0)
    assert t is not None and t.kind == "opened"
    a = OpenAlert(3, "b", "P1", "open")
    ok = Check("b", 0.0, (("P1", 1.0),), clear_after=2)
    t, st = step(ok, a, st, 5.0)
    assert t is None
    t, st = step(c, a, st, 5.0)
    assert t is not None and t.kind == "redetected"
    t, st = step(ok, a, st, 5.0)
    t, st = step(ok, a, st, 5.0)
    assert t is not None and t.kind == "resolved"


def test_a_cpu_burst_of_one_or_two_scrapes_does_not_fire() -> None:
    b = play([sample(T0, cpu=99.0), sample(T0 + 5, cpu=99.0), sample(T0 + 10, cpu=20.0), sample(T0 + 15, cpu=99.0)])
    assert b.events == []
    b.feed(sample(T0 + 20, cpu=99.0))
    b.feed(sample(T0 + 25, cpu=99.0))
    assert b.active() == {"cpu": "P2"}


def test_no_data_keeps_the_alert_as_it_is() -> None:
    a = OpenAlert(1, "x", "P3", "open")
    st = Streak(breach=3, breaching=True)
    t, st2 = step(check(None), a, st, 5.0)
    assert t is None and st2 == st


def test_below_rule_hysteresis() -> None:
    c = lambda v: Check("conf", v, (("P3", 0.6),), "", below=True)  # noqa: E731
    t, st = step(c(0.6), None, Streak(), 5.0)
    assert t is None  # "below 60 %": exactly 0.6 is fine
    t, st = step(c(0.55), None, st, 5.0)
    assert t is not None and t.kind == "opened"
    a = OpenAlert(1, "conf", "P3", "open")
    t, st = step(c(0.62), a, st, 5.0)
    assert t is None  # above 0.6 but not above 0.63
    t, st = step(c(0.64), a, st, 5.0)
    assert t is not None and t.kind == "resolved"


# ---------------------------------------------------------------------------------------- each rule, on samples


def play(values: list[Sample], th: Thresholds = TH, base: Sample | None = None) -> Book:
    b = Book(th)
    for s in values:
        b.feed(s, base)
    return b


def test_daemon_down_is_p1_at_once_and_resolves_after_two_good_scrapes() -> None:
    b = Book()
    b.feed(sample(T0))
    assert b.active() == {}
    b.feed(sample(T0 + 5, up=False))
    assert b.active() == {"daemon_down": "P1"}  # the first failed scrape: within two intervals of the death
    b.feed(sample(T0 + 10))
    assert b.active() == {"daemon_down": "P1"}
    b.feed(sample(T0 + 15))
    assert b.active() == {}
    assert b.kinds("daemon_down") == ["opened", "resolved"]


def test_daemon_unhealthy_is_p1_and_resolves() -> None:
    b = play([sample(T0 + i, status=503, problem="engine made no progress") for i in range(2)])
    assert b.active() == {"daemon_unhealthy": "P1"}
    b.feed(sample(T0 + 3))
    b.feed(sample(T0 + 4))
    assert b.active() == {} and b.kinds("daemon_unhealthy") == ["opened", "resolved"]


def test_daemon_restart_is_a_p4_notice_that_resolves_on_the_next_sample() -> None:
    def s(ts: float, uptime: float) -> Sample:
        return sample(ts, metrics=daemon_metrics(system__uptime_s=uptime))
    b = play([s(T0, 500.0), s(T0 + 5, 505.0)])
    assert b.events == []
    b.feed(sample(T0 + 10, up=False))
    b.feed(s(T0 + 15, 2.0))  # came back with a fresh uptime
    assert b.active() == {"daemon_down": "P1", "daemon_restarted": "P4"}
    b.feed(s(T0 + 20, 7.0))
    assert "daemon_restarted" not in b.active()
    assert b.kinds("daemon_restarted") == ["opened", "resolved"]


def test_emergency_stop_is_p1_and_resolves_on_resume() -> None:
    stopped = daemon_metrics(trading__state="EMERGENCY_STOP", trading__state_reason="operator")
    b = play([sample(T0, metrics=stopped)])
    assert b.active() == {"emergency_stop": "P1"}
    b.feed(sample(T0 + 5))
    assert b.active() == {} and b.kinds("emergency_stop") == ["opened", "resolved"]


def test_risk_limit_breach_fires_on_halt_and_on_new_risk_events() -> None:
    b = play([sample(T0), sample(T0 + 5, metrics=daemon_metrics(trading__state="HALTED",
                                                                  trading__state_reason="max drawdown"))])
    assert b.active() == {"risk_limit_breach": "P2"}
    b.feed(sample(T0 + 10))
    assert b.active() == {}
    # a RISK_LIMIT_EXCEEDED event while trading stays ACTIVE (orders clamped): fires, then resolves
    b.feed(sample(T0 + 15, metrics=daemon_metrics(risk__alerts=2)))
    assert b.active() == {"risk_limit_breach": "P2"}
    b.feed(sample(T0 + 20, metrics=daemon_metrics(risk__alerts=2)))
    assert b.active() == {}
    assert b.kinds("risk_limit_breach") == ["opened", "resolved", "opened", "resolved"]


@pytest.mark.parametrize(("pnl", "expected"), [(-150.0, None), (-204.0, "P3"), (-310.0, "P2")])
def test_daily_loss_thresholds(pnl: float, expected: str | None) -> None:
    # start of day 10,000: a loss of 204 is 2.04 %, of 310 is 3.1 %
    m = daemon_metrics(portfolio__equity=10_000.0 + pnl, portfolio__daily_pnl=pnl)
    b = play([sample(T0, metrics=m)])
    assert b.active().get("daily_loss") == expected


def test_daily_loss_fires_escalates_and_resolves() -> None:
    def s(ts: float, pnl: float) -> Sample:
        return sample(ts, metrics=daemon_metrics(portfolio__equity=10_000.0 + pnl, portfolio__daily_pnl=pnl))
    b = play([s(T0, -210), s(T0 + 5, -320), s(T0 + 10, -195), s(T0 + 15, -185)])
    # 1.95 % is inside 2 % but not inside 1.9 %: still open; 1.85 % resolves
    assert b.kinds("daily_loss") == ["opened", "escalated", "resolved"]
    assert b.active() == {}


def test_drawdown_fires_escalates_and_resolves() -> None:
    def s(ts: float, dd: float) -> Sample:
        return sample(ts, metrics=daemon_metrics(portfolio__drawdown=dd))
    b = play([s(T0, 0.091), s(T0 + 5, 0.125), s(T0 + 10, 0.086), s(T0 + 15, 0.084)])
    assert [e for e in b.events if e[1] == "drawdown"] == [("opened", "drawdown", "P3"),
                                                           ("escalated", "drawdown", "P2"),
                                                           ("resolved", "drawdown", "P2")]


@pytest.mark.parametrize(("rule", "field"), [("cpu", "cpu"), ("memory", "mem"), ("disk", "disk")])
def test_host_rules_fire_escalate_and_resolve(rule: str, field: str) -> None:
    b = Book()
    # CPU must stay high for three scrapes before it fires; memory and disk fire at once
    lead = [82.0, 85.0] if rule == "cpu" else []
    for i, v in enumerate([*lead, 82.0, 93.0, 77.0, 70.0]):
        b.feed(sample(T0 + 5 * i, **{field: v}))
    assert [e for e in b.events if e[1] == rule] == [("opened", rule, "P3"), ("escalated", rule, "P2"),
                                                     ("resolved", rule, "P2")]


def test_model_confidence_uses_the_decisions_in_the_window() -> None:
    base = sample(T0, metrics=daemon_metrics(model__decisions=1000, model__avg_confidence=0.8))
    # 100 new decisions at mean 0.5: the lifetime mean (0.77) hides it, the window does not
    low = daemon_metrics(model__decisions=1100, model__avg_confidence=(0.8 * 1000 + 0.5 * 100) / 1100)
    b = Book()
    b.feed(sample(T0 + 60, metrics=low), base)
    assert b.active() == {"model_confidence": "P3"}
    high = daemon_metrics(model__decisions=1200,
                          model__avg_confidence=(0.8 * 1000 + 0.5 * 100 + 0.7 * 100) / 1200)
    b.feed(sample(T0 + 120, metrics=high), sample(T0 + 60, metrics=low))
    assert b.active() == {} and b.kinds("model_confidence") == ["opened", "resolved"]
    # no decisions in the window: no opinion
    c = rules.model_confidence(sample(T0, metrics=low), sample(T0 - 60, metrics=low), TH)
    assert c.value is None


def live_metrics(requests: int, errors: int, p99_ms: float | None = None) -> dict[str, Any]:
    client: dict[str, Any] = {"requests": requests, "errors": errors, "retries": 0, "rate_limited": 0}
    if p99_ms is not None:
        client["latency_ms"] = {"count": requests, "p50": p99_ms / 2, "p99": p99_ms}
    return daemon_metrics(exchange={"broker": {"client": client}})


def test_api_error_rate_fires_above_the_maximum_and_resolves() -> None:
    base = sample(T0, metrics=live_metrics(100, 1))
    b = Book()
    b.feed(sample(T0 + 30, metrics=live_metrics(200, 11)), base)  # 10/100: exactly the maximum, not above
    assert b.active() == {}
    b.feed(sample(T0 + 60, metrics=live_metrics(300, 26)), base)  # 25/200
    assert b.active() == {"api_error_rate": "P2"}
    b.feed(sample(T0 + 90, metrics=live_metrics(400, 30)), sample(T0 + 60, metrics=live_metrics(300, 26)))  # 4 %
    assert b.active() == {} and b.kinds("api_error_rate") == ["opened", "resolved"]


def test_api_error_rate_has_no_data_in_paper_mode_or_across_a_restart() -> None:
    assert rules.api_error_rate(sample(T0 + 60), sample(T0), TH).value is None
    restarted = live_metrics(10, 9)
    restarted["system"]["uptime_s"] = 5.0
    before = live_metrics(500, 0)
    before["system"]["uptime_s"] = 1000.0
    assert rules.api_error_rate(sample(T0, metrics=restarted), sample(T0 - 30, metrics=before), TH).value is None


def test_inference_latency_fires_escalates_and_resolves() -> None:
    def s(ts: float, p99_us: float) -> Sample:
        return sample(ts, metrics=daemon_metrics(model__inference_us={"count": 10, "p50": 1.0, "p99": p99_us}))
    b = play([s(T0, 600_000), s(T0 + 5, 1_200_000), s(T0 + 10, 480_000), s(T0 + 15, 400_000)])
    assert [e[0] + ":" + e[2] for e in b.events if e[1] == "inference_latency"] == ["opened:P3", "escalated:P2",
                                                                                     "resolved:P2"]


def test_api_response_time_uses_the_exchange_p99_live_and_the_scrape_time_in_paper() -> None:
    b = play([sample(T0, scrape_ms=1500.0), sample(T0 + 5, scrape_ms=6000.0), sample(T0 + 10, scrape_ms=20.0)])
    assert [e[0] + ":" + e[2] for e in b.events if e[1] == "api_response_time"] == ["opened:P3", "escalated:P2",
                                                                                     "resolved:P2"]
    c = rules.api_response_time(sample(T0, metrics=live_metrics(10, 0, p99_ms=1200.0), scrape_ms=3.0), TH)
    assert (c.value, "exchange" in c.message) == (1200.0, True)


def test_stale_data_on_the_feed_clock() -> None:
    def s(ts: float, now_ms: int | None, kind: str = "replay", finished: bool = False) -> Sample:
        m = daemon_metrics()
        m["market"]["feed"] = {"kind": kind, "timeframe": "5m", "now_ms": now_ms, "finished": finished}
        return sample(ts, metrics=m)
    candle_ms = int(T0 * 1000)
    b = Book()
    b.feed(s(T0, candle_ms + 300_000 * 2))  # the bar closed one bar ago: fresh
    assert b.active() == {}
    b.feed(s(T0 + 5, candle_ms + 300_000 * 4))  # closed three bars ago
    assert b.active() == {}  # one stale scrape may be a pause between two candles
    b.feed(s(T0 + 6, candle_ms + 300_000 * 4 + 1000))
    assert b.active() == {"stale_data": "P2"}
    b.feed(s(T0 + 10, candle_ms + 300_000 * 2))
    assert b.active() == {} and b.kinds("stale_data") == ["opened", "resolved"]
    # a live feed without its own clock is measured on the wall clock; a finished replay has no opinion
    assert rules.stale_data(s(T0 + 3600, None, kind="weex"), TH).value == pytest.approx(11.0)
    assert rules.stale_data(s(T0, None, kind="replay"), TH).value is None
    assert rules.stale_data(s(T0 + 3600, candle_ms + 3_600_000, finished=True), TH).value is None


def test_a_down_daemon_leaves_the_daemon_rules_as_they_were() -> None:
    """Silence is not recovery: an open drawdown alert stays open while the daemon cannot be asked."""
    b = play([sample(T0, metrics=daemon_metrics(portfolio__drawdown=0.10))])
    assert b.active() == {"drawdown": "P3"}
    b.feed(sample(T0 + 5, up=False))
    assert b.active() == {"drawdown": "P3", "daemon_down": "P1"}


@pytest.mark.parametrize("odd", [
    {"portfolio": [], "trading": "ACTIVE", "model": {"inference_us": 5, "decisions": "many"}, "risk": None,
     "market": {"feed": 3, "last_candle": {"time": "not a time"}}, "exchange": {"broker": []}, "system": None},
    {"portfolio": {"equity": float("nan"), "daily_pnl": True, "drawdown": "0.1"}, "model": {"avg_confidence": None},
     "market": {"last_candle": None, "feed": {"kind": "weex", "timeframe": "7m"}}},
    {},
])
def test_an_unexpected_metrics_shape_is_no_data_not_a_crash(odd: dict[str, Any]) -> None:
    """A daemon of another version may answer differently: every rule reads it as no data."""
    from alphapulse.monitor.service import series_of

    s = sample(T0, metrics=odd)
    checks = rules.evaluate(s, sample(T0 - 5, metrics=odd), s, s, TH)
    daemon_rules = {c.rule: c.value for c in checks if c.rule not in ("daemon_down", "daemon_unhealthy", "cpu",
                                                                       "memory", "disk", "api_response_time")}
    assert set(daemon_rules.values()) <= {None, 0.0}, daemon_rules
    series = series_of(s, checks)
    assert series["equity"] is None and series["trading_state"] is None


def test_every_rule_is_evaluated_once_per_sample() -> None:
    checks = rules.evaluate(sample(T0), None, None, None, TH)
    assert [c.rule for c in checks] == list(rules.RULES)
    assert len(set(rules.RULES)) == 15


def test_a_healthy_sample_raises_nothing() -> None:
    b = play([sample(T0 + i * 5) for i in range(5)])
    assert b.events == []


def test_rulebook_restored_from_open_alerts_does_not_count_a_spurious_redetection() -> None:
    book = RuleBook(TH, [OpenAlert(4, "memory", "P3", "acknowledged")])
    ts = book.evaluate(rules.evaluate(sample(T0, mem=85.0), None, None, None, TH))
    assert ts == []
    ts = book.evaluate(rules.evaluate(sample(T0 + 5, mem=95.0), None, None, None, TH))
    assert [(t.kind, t.alert_id, t.severity) for t in ts] == [("escalated", 4, "P2")]


# ------------------------------------------------------------------------------------------------- store


def test_store_keeps_the_history_and_reopens_an_acknowledged_alert_on_escalation(tmp_path: Path) -> None:
    store = MonitorStore(tmp_path / "monitor.db")
    opened = store.record(1000, {"cpu": 85.0}, True, [rules.Transition("opened", "cpu", "P3", 85.0, 80.0, "cpu")])
    (kind, alert), = opened
    assert kind == "opened" and alert["state"] == "open" and alert["count"] == 1
    assert set(alert) == {"id", "rule", "severity", "state", "message", "value", "threshold", "opened_at",
                          "updated_at", "acknowledged_at", "resolved_at", "count"}
    changed, acked = store.acknowledge(alert["id"], 2000)
    assert changed and acked["state"] == "acknowledged" and acked["acknowledged_at"] == "1970-01-01T00:00:02.000Z"
    assert store.acknowledge(alert["id"], 2500)[0] is False  # idempotent
    (kind, esc), = store.record(3000, {}, True, [rules.Transition("escalated", "cpu", "P2", 95.0, 90.0, "cpu",
                                                                   alert["id"])])
    assert (esc["state"], esc["severity"], esc["count"]) == ("open", "P2", 2)
    store.record(4000, {}, True, [rules.Transition("resolved", "cpu", "P2", 70.0, 80.0, "cpu", alert["id"])])
    with pytest.raises(AlertResolved):
        store.acknowledge(alert["id"], 5000)
    body = store.alerts_body(now_ms=5000)
    assert body["active_alerts"] == [] and body["recent_alerts"][0]["state"] == "resolved"
    assert body["statistics"]["resolved"] == 1 and body["statistics"]["mean_time_to_resolve_s"] == 3.0
    store.close()
    # retention: old samples and resolved alerts go, an unresolved alert stays whatever its age
    store = MonitorStore(tmp_path / "monitor.db")
    store.record(4500, {}, False, [rules.Transition("opened", "daemon_down", "P1", 1.0, 1.0, "down")])
    assert store.prune(10_000) == {"samples": 4, "alerts": 1}
    assert [a.rule for a in store.open_alerts()] == ["daemon_down"]
    store.close()
    with sqlite3.connect(tmp_path / "monitor.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_samples_are_thinned_to_the_requested_points(tmp_path: Path) -> None:
    store = MonitorStore(tmp_path / "monitor.db")
    for i in range(100):
        store.record(i * 1000, {"cpu": float(i)}, True, [])
    pts = store.samples(0, 10)
    assert len(pts) == 10 and pts[-1]["cpu"] == 99.0  # the newest is always there
    assert [p["cpu"] for p in store.samples(90_000, 1000)] == [float(i) for i in range(90, 100)]
    store.close()


def test_metrics_fixture_is_not_shared_between_tests() -> None:
    a = daemon_metrics(portfolio__drawdown=0.5)
    assert daemon_metrics()["portfolio"]["drawdown"] == 0.0 and a["portfolio"]["drawdown"] == 0.5
    assert copy.deepcopy(a) == a

