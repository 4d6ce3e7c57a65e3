"""Alert rules as pure functions: a scraped sample in, alert transitions out.

Two stages, both pure so every rule can be tested on constructed figures without a process or a clock:

1. One function per rule turns a :class:`Sample` (plus, for rates and means, an earlier sample) into a
   :class:`Check`: the rule's current value, its thresholds with their severities, and a message.  A value of
   ``None`` means "no data" (the daemon is down, paper mode has no exchange): the alert keeps its state rather
   than resolving on silence.
2. :func:`step` applies one check to the rule's open alert and its streak and returns at most one
   :class:`Transition`.  That is where de-duplication and hysteresis live, once for every rule:

   * one alert per rule while it is not resolved: a new detection of an open alert is a ``redetected``
     transition that bumps its ``count``, never a second alert;
   * an alert opens after ``fire_after`` consecutive samples beyond a threshold and resolves only after
     ``clear_after`` consecutive samples *inside the hysteresis band*: for a rule that fires above a threshold
     the value must fall below ``threshold * (1 - hysteresis_pct/100)`` (above ``threshold * (1 + h)`` for a
     rule that fires below one), so a value hovering at the threshold neither flaps nor re-notifies;
   * a higher level (warning -> critical) escalates the open alert; the severity never drops while the alert
     is open (it records the worst seen), it resolves as a whole.

Severities: P1 daemon down or unhealthy, emergency stop; P2 critical thresholds, API errors, stale data, a
risk-limit breach; P3 warnings and low model confidence; P4 notices (the daemon restarted).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from alphapulse.monitor.settings import Thresholds

SEVERITIES = ("P1", "P2", "P3", "P4")
TIMEFRAME_S = {"1m": 60, "3m": 180, "5m": 300, "15m": 900, "30m": 1800, "1h": 3600, "2h": 7200, "4h": 14400,
               "6h": 21600, "8h": 28800, "12h": 43200, "1d": 86400, "1w": 604800}
#: Rates (API errors) are measured over about this long, so one failed request in a quiet minute does not page.
RATE_WINDOW_S = 60.0
#: The model's mean confidence is measured over about this long (the daemon only reports its lifetime mean).
CONFIDENCE_WINDOW_S = 3600.0

RULES = ("daemon_down", "daemon_unhealthy", "daemon_restarted", "emergency_stop", "risk_limit_breach", "daily_loss",
         "drawdown", "cpu", "memory", "disk", "model_confidence", "api_error_rate", "inference_latency",
         "api_response_time", "stale_data")


@dataclass(frozen=True)
class Sample:
    """One scrape: the daemon's answers (or why there are none) and the host's figures."""

    ts: float  # wall clock, seconds since the epoch
    daemon_up: bool
    health_status: int | None = None
    health: Mapping[str, Any] | None = None
    metrics: Mapping[str, Any] | None = None
    error: str | None = None
    scrape_ms: float | None = None  # how long the daemon took to answer /health and /metrics
    cpu_pct: float | None = None
    memory_pct: float | None = None
    disk_pct: float | None = None


@dataclass(frozen=True)
class Check:
    """A rule's reading of one sample. ``levels`` are (severity, threshold), mildest first."""

    rule: str
    value: float | None
    levels: tuple[tuple[str, float], ...]
    message: str = ""
    below: bool = False  # fires when the value is below the threshold (model confidence)
    strict: bool = False  # fires only strictly above the threshold ("error rate above 10 %")
    fire_after: int = 1
    clear_after: int = 1


@dataclass(frozen=True)
class OpenAlert:
    """What :func:`step` needs to know about a rule's unresolved alert."""

    id: int
    rule: str
    severity: str
    state: str  # open | acknowledged


@dataclass(frozen=True)
class Streak:
    """Consecutive samples beyond the threshold / inside the resolve band, and whether the last one breached."""

    breach: int = 0
    clear: int = 0
    breaching: bool = False


@dataclass(frozen=True)
class Transition:
    """``opened``, ``escalated``, ``redetected`` or ``resolved``; ``alert_id`` is None only for ``opened``."""

    kind: str
    rule: str
    severity: str
    value: float | None
    threshold: float | None
    message: str
    alert_id: int | None = None


def more_severe(a: str, b: str) -> bool:
    """True when severity ``a`` is worse than ``b`` (P1 is the worst)."""
    return SEVERITIES.index(a) < SEVERITIES.index(b)


def _level(check: Check) -> tuple[str, float] | None:
    """The most severe level the value reaches, or None."""
    assert check.value is not None
    reached = None
    for sev, thr in check.levels:
        if check.below:
            hit = check.value < thr
        else:
            hit = check.value > thr if check.strict else check.value >= thr
        if hit:
            reached = (sev, thr)
    return reached


def _inside_band(check: Check, hysteresis_pct: float) -> bool:
    """True when the value is far enough back inside the mildest threshold to resolve."""
    assert check.value is not None
    thr = check.levels[0][1]
    h = hysteresis_pct / 100.0
    if check.below:
        return check.value > thr * (1 + h) or (thr == 0 and check.value > 0)
    return check.value < thr * (1 - h)


def step(check: Check, alert: OpenAlert | None, streak: Streak,
         hysteresis_pct: float) -> tuple[Transition | None, Streak]:
    """Apply one check to the rule's open alert (None when it has none); returns the transition and new streak."""
    if check.value is None or not check.levels:
        return None, streak  # no data: no opinion
    level = _level(check)
    if level is not None:
        sev, thr = level
        new = Streak(breach=streak.breach + 1, clear=0, breaching=True)
        if alert is None:
            if new.breach >= check.fire_after:
                return Transition("opened", check.rule, sev, check.value, thr, check.message), new
            return None, new
        if more_severe(sev, alert.severity):
            return Transition("escalated", check.rule, sev, check.value, thr, check.message, alert.id), new
        if not streak.breaching:  # came back across the threshold without having resolved: the same alert
            return Transition("redetected", check.rule, alert.severity, check.value, thr, check.message,
                              alert.id), new
        return None, new
    inside = _inside_band(check, hysteresis_pct)
    new = Streak(breach=0, clear=streak.clear + 1 if inside else 0, breaching=False)
    if alert is not None and inside and new.clear >= check.clear_after:
        return Transition("resolved", check.rule, alert.severity, check.value, check.levels[0][1],
                          check.message, alert.id), new
    return None, new


# ----------------------------------------------------------------------------------------------------------------
# The rules: one function per rule, Sample -> Check
# ----------------------------------------------------------------------------------------------------------------


def _get(d: Any, *path: str) -> Any:
    """``d[path[0]][path[1]]...``, or None as soon as a level is missing or not a mapping: the daemon's JSON is
    read defensively, so an older or newer daemon (a changed shape) means "no data", never a crashed monitor."""
    cur: Any = d
    for p in path:
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(p)
    return cur


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def value_at(d: Any, *path: str) -> Any:
    """Public form of the defensive lookup, for the service's per-sample series."""
    return _get(d, *path)


def number_at(d: Any, *path: str) -> float | None:
    """A finite number at ``path``, else None."""
    return _num(_get(d, *path))


def daemon_down(s: Sample) -> Check:
    """P1 when the control API does not answer; clears after two good scrapes so a restart does not flap."""
    msg = "trading daemon is up" if s.daemon_up else f"trading daemon unreachable: {s.error or 'no answer'}"
    return Check("daemon_down", 0.0 if s.daemon_up else 1.0, (("P1", 1.0),), msg, clear_after=2)


def daemon_unhealthy(s: Sample) -> Check:
    """P1 when the daemon answers but its /health is not 200 (a stuck pipeline, a silent market stream)."""
    if not s.daemon_up or s.health_status is None:
        return Check("daemon_unhealthy", None, (("P1", 1.0),))
    bad = s.health_status != 200
    problem = _get(s.health, "problem")
    msg = (f"trading daemon unhealthy (HTTP {s.health_status}): {problem or _get(s.health, 'status')}" if bad
           else "trading daemon healthy")
    return Check("daemon_unhealthy", 1.0 if bad else 0.0, (("P1", 1.0),), msg, clear_after=2)


def daemon_restarted(s: Sample, prev: Sample | None) -> Check:
    """P4 notice when the daemon's uptime went backwards since the previous sample with metrics (a restart,
    planned or not, that may have happened between two scrapes); it resolves on the next sample."""
    up_now = _num(_get(s.metrics, "system", "uptime_s"))
    if up_now is None or prev is None:
        return Check("daemon_restarted", None, (("P4", 1.0),))
    restarted = _restarted(s, prev)
    msg = (f"trading daemon restarted (up {up_now:.0f}s, pid {_get(s.metrics, 'system', 'pid')})" if restarted
           else "trading daemon running")
    return Check("daemon_restarted", 1.0 if restarted else 0.0, (("P4", 1.0),), msg)


def emergency_stop(s: Sample) -> Check:
    """P1 while the daemon's trading state is EMERGENCY_STOP."""
    state = _get(s.metrics, "trading", "state")
    if state is None:
        return Check("emergency_stop", None, (("P1", 1.0),))
    reason = _get(s.metrics, "trading", "state_reason")
    on = state == "EMERGENCY_STOP"
    msg = f"emergency stop in the daemon: {reason or 'no reason given'}" if on else f"trading state {state}"
    return Check("emergency_stop", 1.0 if on else 0.0, (("P1", 1.0),), msg)


def risk_limit_breach(s: Sample, prev: Sample | None) -> Check:
    """P2 while a risk limit holds trading back (HALTED, REDUCE_ONLY) or when new RISK_LIMIT_EXCEEDED events
    appeared since the previous sample; the value is the number of new events (at least 1 while held back)."""
    state = _get(s.metrics, "trading", "state")
    alerts = _num(_get(s.metrics, "risk", "alerts"))
    if state is None:
        return Check("risk_limit_breach", None, (("P2", 1.0),))
    before = _num(_get(prev.metrics, "risk", "alerts")) if prev is not None else None
    new = max(0.0, alerts - before) if alerts is not None and before is not None else 0.0
    held = state in ("HALTED", "REDUCE_ONLY")
    value = max(new, 1.0 if held else 0.0)
    reason = _get(s.metrics, "trading", "state_reason")
    if held:
        msg = f"risk limit breached: trading {state} ({reason or 'no reason given'})"
    elif new:
        msg = f"{int(new)} new RISK_LIMIT_EXCEEDED event(s) in the daemon"
    else:
        msg = f"no risk limit breached (trading {state})"
    return Check("risk_limit_breach", value, (("P2", 1.0),), msg)


def _pair_levels(pair: tuple[float, float]) -> tuple[tuple[str, float], ...]:
    return (("P3", pair[0]), ("P2", pair[1]))


def daily_loss(s: Sample, th: Thresholds) -> Check:
    """Loss since the start of the UTC day, % of the day's starting equity: P3 warning, P2 critical."""
    equity = _num(_get(s.metrics, "portfolio", "equity"))
    pnl = _num(_get(s.metrics, "portfolio", "daily_pnl"))
    levels = _pair_levels(th.daily_loss_pct)
    if equity is None or pnl is None or equity - pnl <= 0:
        return Check("daily_loss", None, levels)
    loss = max(0.0, -pnl) / (equity - pnl) * 100.0
    return Check("daily_loss", round(loss, 4), levels, f"daily loss {loss:.2f}% of start-of-day equity")


def drawdown(s: Sample, th: Thresholds) -> Check:
    """Drawdown from peak equity in %: P3 warning, P2 critical."""
    dd = _num(_get(s.metrics, "portfolio", "drawdown"))
    levels = _pair_levels(th.drawdown_pct)
    if dd is None:
        return Check("drawdown", None, levels)
    return Check("drawdown", round(dd * 100.0, 4), levels, f"drawdown {dd * 100:.2f}% from peak equity")


#: CPU must stay high this many scrapes in a row (15 s at the shipped 5 s): a one-sample burst (a backtest, a
#: package install) is normal on a trading host and would only teach people to ignore the alert.
CPU_FIRE_AFTER = 3


def _host(rule: str, what: str, value: float | None, pair: tuple[float, float], fire_after: int = 1) -> Check:
    levels = _pair_levels(pair)
    if value is None:
        return Check(rule, None, levels, fire_after=fire_after)
    return Check(rule, round(value, 2), levels, f"host {what} {value:.1f}%", fire_after=fire_after)


def cpu(s: Sample, th: Thresholds) -> Check:
    return _host("cpu", "CPU", s.cpu_pct, th.cpu_pct, fire_after=CPU_FIRE_AFTER)


def memory(s: Sample, th: Thresholds) -> Check:
    return _host("memory", "memory", s.memory_pct, th.memory_pct)


def disk(s: Sample, th: Thresholds) -> Check:
    return _host("disk", "disk (data directory)", s.disk_pct, th.disk_pct)


def _restarted(s: Sample, base: Sample | None) -> bool:
    """True when the daemon restarted between ``base`` and ``s`` (its counters started again from zero)."""
    up_now = _num(_get(s.metrics, "system", "uptime_s"))
    up_then = _num(_get(base.metrics, "system", "uptime_s")) if base is not None else None
    return up_now is not None and up_then is not None and up_now < up_then


def model_confidence(s: Sample, base: Sample | None, th: Thresholds) -> Check:
    """P3 when the mean confidence of the decisions since ``base`` (about :data:`CONFIDENCE_WINDOW_S` earlier)
    is below the minimum; the daemon's lifetime mean when there is no usable base.  No decisions: no data."""
    levels = (("P3", th.model_confidence_min),)
    n = _num(_get(s.metrics, "model", "decisions"))
    avg = _num(_get(s.metrics, "model", "avg_confidence"))
    if n is None or avg is None or n <= 0:
        return Check("model_confidence", None, levels, below=True)
    mean, count = avg, n
    if base is not None and not _restarted(s, base):
        n0 = _num(_get(base.metrics, "model", "decisions"))
        avg0 = _num(_get(base.metrics, "model", "avg_confidence"))
        if n0 is not None and avg0 is not None and n > n0:
            mean, count = (avg * n - avg0 * n0) / (n - n0), n - n0
        elif n0 is not None and n == n0:
            return Check("model_confidence", None, levels, below=True)  # nothing decided in the window
    return Check("model_confidence", round(mean, 6), levels,
                 f"mean model confidence {mean:.3f} over {int(count)} decision(s)", below=True)


def _client(m: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    c = _get(m, "exchange", "broker", "client")
    return c if isinstance(c, Mapping) else None


def _client_errors(c: Mapping[str, Any]) -> float | None:
    """Failed exchange requests: the client's own error count, else its retries and rate-limit answers."""
    err = _num(c.get("errors"))
    if err is not None:
        return err
    retries, limited = _num(c.get("retries")), _num(c.get("rate_limited"))
    return None if retries is None else retries + (limited or 0.0)


def api_error_rate(s: Sample, base: Sample | None, th: Thresholds) -> Check:
    """P2 when the share of failed exchange API requests since ``base`` (about a minute) is above the maximum.
    Only a daemon that talks to the exchange has figures; no requests in the window: no data."""
    levels = (("P2", th.api_error_rate_max),)
    c = _client(s.metrics)
    c0 = _client(base.metrics) if base is not None else None
    if c is None or c0 is None or _restarted(s, base):
        return Check("api_error_rate", None, levels)
    req, req0 = _num(c.get("requests")), _num(c0.get("requests"))
    err, err0 = _client_errors(c), _client_errors(c0)
    if req is None or req0 is None or err is None or err0 is None or req <= req0:
        return Check("api_error_rate", None, levels)
    rate = max(0.0, err - err0) / (req - req0)
    return Check("api_error_rate", round(rate, 6), levels,
                 f"exchange API error rate {rate:.1%} over {int(req - req0)} request(s)", strict=True)


def inference_latency(s: Sample, th: Thresholds) -> Check:
    """The policy's ONNX inference p99 in ms: P3 warning, P2 critical."""
    levels = _pair_levels(th.inference_ms)
    inf = _get(s.metrics, "model", "inference_us")
    p99, count = _num(_get(inf, "p99")), _num(_get(inf, "count"))
    if p99 is None or not count:
        return Check("inference_latency", None, levels)
    ms = p99 / 1000.0
    return Check("inference_latency", round(ms, 3), levels, f"model inference p99 {ms:.1f} ms")


def api_response_time(s: Sample, th: Thresholds) -> Check:
    """API response time in ms: the exchange client's p99 when the daemon reports one (live), else how long the
    daemon's own control API took to answer this scrape. P3 warning, P2 critical."""
    levels = _pair_levels(th.api_response_ms)
    c = _client(s.metrics)
    p99 = _num(_get(c, "latency_ms", "p99")) if c is not None else None
    if p99 is not None and _num(_get(c, "latency_ms", "count")):
        return Check("api_response_time", round(p99, 3), levels, f"exchange API response p99 {p99:.0f} ms")
    if not s.daemon_up or s.scrape_ms is None:
        return Check("api_response_time", None, levels)
    return Check("api_response_time", round(s.scrape_ms, 3), levels,
                 f"daemon control API answered in {s.scrape_ms:.0f} ms")


def _parse_iso_s(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def stale_data(s: Sample, th: Thresholds) -> Check:
    """P2 when the last candle the daemon processed is more than ``stale_data_bars`` bars old, measured on the
    feed's own clock (a paced replay's simulated time, the exchange-corrected clock live) or the wall clock.
    A finished replay, a replay at maximum speed (no clock) or no candle yet: no data.  Fires on the second
    stale scrape in a row."""
    levels = (("P2", th.stale_data_bars),)
    feed = _get(s.metrics, "market", "feed")
    last = _parse_iso_s(_get(s.metrics, "market", "last_candle", "time"))
    bar_s = TIMEFRAME_S.get(str(_get(s.metrics, "trading", "timeframe") or _get(feed, "timeframe")))
    if feed is None or last is None or bar_s is None or _get(feed, "finished"):
        return Check("stale_data", None, levels)
    now_ms = _num(_get(feed, "now_ms"))
    if now_ms is not None:
        now = now_ms / 1000.0
    elif _get(feed, "kind") == "replay":
        return Check("stale_data", None, levels)
    else:
        now = s.ts
    # a bar is known once it has closed: ts + one bar
    age_bars = max(0.0, (now - (last + bar_s)) / bar_s)
    # two scrapes in a row: at a fast replay a pause of the daemon's loop between two candles is no outage
    return Check("stale_data", round(age_bars, 3), levels, f"last candle is {age_bars:.1f} bar(s) old",
                 fire_after=2)


def evaluate(s: Sample, prev: Sample | None, rate_base: Sample | None, confidence_base: Sample | None,
             th: Thresholds) -> list[Check]:
    """Every rule's check on one sample, in :data:`RULES` order."""
    checks = [
        daemon_down(s), daemon_unhealthy(s), daemon_restarted(s, prev), emergency_stop(s),
        risk_limit_breach(s, prev),
        daily_loss(s, th), drawdown(s, th), cpu(s, th), memory(s, th), disk(s, th),
        model_confidence(s, confidence_base, th), api_error_rate(s, rate_base, th), inference_latency(s, th),
        api_response_time(s, th), stale_data(s, th),
    ]
    assert [c.rule for c in checks] == list(RULES)
    return checks


class RuleBook:
    """The rules' memory between samples: open alerts by rule and each rule's streak.

    Pure apart from its own state: :meth:`evaluate` returns transitions; the caller persists them (which assigns
    alert ids) and reports the result back with :meth:`applied`.
    """

    def __init__(self, thresholds: Thresholds, open_alerts: Sequence[OpenAlert] = ()) -> None:
        self.thresholds = thresholds
        self.open: dict[str, OpenAlert] = {}
        self.streaks: dict[str, Streak] = {}
        for a in open_alerts:
            self.open[a.rule] = a
            # an alert that was open when the monitor stopped is taken as still breaching: no spurious re-detection
            self.streaks[a.rule] = Streak(breach=1, breaching=True)

    def evaluate(self, checks: Sequence[Check]) -> list[Transition]:
        out: list[Transition] = []
        for c in checks:
            t, self.streaks[c.rule] = step(c, self.open.get(c.rule), self.streaks.get(c.rule, Streak()),
                                           self.thresholds.hysteresis_pct)
            if t is not None:
                out.append(t)
        return out

    def applied(self, alert: Mapping[str, Any]) -> None:
        """Record an alert's new row (as the store returns it) after a transition or an acknowledgement."""
        rule = str(alert["rule"])
        if alert["state"] == "resolved":
            if rule in self.open and self.open[rule].id == alert["id"]:
                del self.open[rule]
            return
        self.open[rule] = OpenAlert(int(alert["id"]), rule, str(alert["severity"]), str(alert["state"]))

    def acknowledged(self, alert_id: int) -> None:
        for rule, a in self.open.items():
            if a.id == alert_id:
                self.open[rule] = replace(a, state="acknowledged")

