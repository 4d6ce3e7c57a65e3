"""The monitor's HTTP API on 127.0.0.1 (default port 8081).

| endpoint | |
| --- | --- |
| ``GET /health`` | the monitor's own health (200 while scrapes complete) and what it sees of the daemon |
| ``GET /api/alerts?recent=N`` | ``active_alerts``, ``recent_alerts``, ``statistics`` |
| ``POST /api/alerts/{id}/acknowledge`` | bearer token (the daemon's control token) |
| ``GET /api/metrics?minutes=M&points=P`` | recent samples (series per rule, host, equity...) |
| ``GET /api/logs?level=L&lines=N`` | tail of the daemon's JSON log, at level L and above |
| ``GET /api/snapshot`` | daemon, host, alerts and monitor in one body |
| ``GET /api/stream`` | server-sent events: ``event: snapshot`` after every scrape and alert change |
| ``GET /metrics`` | Prometheus text (prometheus_client) |

Answers are JSON; a bad request gets a 4xx JSON body (the control server's middleware), never a traceback.
:func:`create_app` returns the application before it is frozen, so another module can add routes
(the dashboard's ``register_dashboard(app)``).
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from alphapulse.control import check_bearer, error_response, errors_as_json, json_response
from alphapulse.monitor.dashboard import register_dashboard
from alphapulse.monitor.rules import SEVERITIES
from alphapulse.monitor.service import STREAM_END, Monitor
from alphapulse.monitor.store import AlertNotFound, AlertResolved
from alphapulse.operator_files import DAILY_LOG_PREFIX, DAILY_LOG_SUFFIX

MONITOR: web.AppKey[Monitor] = web.AppKey("monitor", Monitor)
LOG_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
LOG_TAIL_BYTES = 1 << 20  # read at most the last MiB of the daemon's log
HEARTBEAT_S = 15.0
_LOG_NAME = re.compile(rf"^{re.escape(DAILY_LOG_PREFIX)}\d{{8}}{re.escape(DAILY_LOG_SUFFIX)}$")


def _int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int | web.Response:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        v = int(raw)
    except ValueError:
        return error_response(400, f"{name} must be an integer in {lo}..{hi}, got {raw!r}")
    if not lo <= v <= hi:
        return error_response(400, f"{name} must be an integer in {lo}..{hi}, got {v}")
    return v


async def health(request: web.Request) -> web.Response:
    status, body = request.app[MONITOR].health()
    return json_response(body, status)


async def alerts(request: web.Request) -> web.Response:
    recent = _int_param(request, "recent", 50, 1, 500)
    if isinstance(recent, web.Response):
        return recent
    return json_response(await request.app[MONITOR].alerts_body(recent))


async def acknowledge(request: web.Request) -> web.Response:
    mon = request.app[MONITOR]
    denied = check_bearer(request.headers.get("Authorization", ""), mon.token)
    if denied is not None:
        return denied
    raw = request.match_info["id"]
    if not raw.isdigit() or len(raw) > 18:
        return error_response(400, f"alert id must be a positive integer, got {raw!r}")
    try:
        changed, alert = await mon.acknowledge(int(raw))
    except AlertNotFound:
        return error_response(404, f"no alert {raw}")
    except AlertResolved:
        return error_response(409, f"alert {raw} is already resolved")
    return json_response({"ok": True, "changed": changed, "alert": alert})


async def metrics_series(request: web.Request) -> web.Response:
    mon = request.app[MONITOR]
    keep_min = max(1, int(mon.settings.retention_days * 1440))
    minutes = _int_param(request, "minutes", 60, 1, keep_min)
    if isinstance(minutes, web.Response):
        return minutes
    points = _int_param(request, "points", 720, 1, 5000)
    if isinstance(points, web.Response):
        return points
    assert mon.store is not None
    since = int((mon.clock() - minutes * 60) * 1000)
    samples = await asyncio.to_thread(mon.store.samples, since, points)
    return json_response({"minutes": minutes, "scrape_interval_s": mon.settings.scrape_interval_s,
                          "count": len(samples), "samples": samples})


def latest_daemon_log(log_dir: Path) -> Path | None:
    """The daemon's newest daily JSON log (alphapulse_YYYYMMDD.log), not the monitor's own."""
    try:
        names = sorted(p.name for p in log_dir.iterdir() if _LOG_NAME.match(p.name))
    except OSError:
        return None
    return log_dir / names[-1] if names else None


def tail_log(log_dir: Path, min_level: int, lines: int) -> dict[str, Any]:
    """The last ``lines`` records at ``min_level`` or above. Blocking: call in a thread."""
    path = latest_daemon_log(log_dir)
    if path is None:
        return {"file": None, "lines": []}
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - LOG_TAIL_BYTES))
        raw = f.read()
    chunks = raw.split(b"\n")
    if size > LOG_TAIL_BYTES:
        chunks = chunks[1:]  # the first one is probably cut
    out: list[Any] = []
    for chunk in reversed(chunks):
        if not chunk.strip():
            continue
        try:
            rec = orjson.loads(chunk)
        except orjson.JSONDecodeError:
            continue  # a torn last line of a crashed daemon
        if not isinstance(rec, dict) or LOG_LEVELS.get(str(rec.get("level", "info")).lower(), 20) < min_level:
            continue
        out.append(rec)
        if len(out) >= lines:
            break
    out.reverse()
    return {"file": path.name, "lines": out}


async def logs(request: web.Request) -> web.Response:
    mon = request.app[MONITOR]
    level = request.query.get("level", "info").strip().lower() or "info"
    if level not in LOG_LEVELS:
        return error_response(400, f"level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    lines = _int_param(request, "lines", 100, 1, 1000)
    if isinstance(lines, web.Response):
        return lines
    body = await asyncio.to_thread(tail_log, mon.settings.daemon.log_dir, LOG_LEVELS[level], lines)
    return json_response({"level": level, **body})


async def snapshot(request: web.Request) -> web.Response:
    return json_response(request.app[MONITOR].snapshot)


async def stream(request: web.Request) -> web.StreamResponse:
    mon = request.app[MONITOR]
    q = mon.open_stream()
    if q is None:
        return error_response(429, "too many open event streams; close one and retry")
    try:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        await resp.write(b"retry: 2000\n\n" + _event(mon.snapshot))
        while True:
            try:
                item = await asyncio.wait_for(q.get(), HEARTBEAT_S)
            except TimeoutError:
                await resp.write(b": keep-alive\n\n")
                continue
            if item is STREAM_END:
                break
            await resp.write(_event(item))
        return resp
    finally:
        mon.close_stream(q)


def _event(body: dict[str, Any]) -> bytes:
    return b"event: snapshot\ndata: " + orjson.dumps(body) + b"\n\n"


class _MonitorCollector(Collector):
    """Reads the monitor's state at each /metrics request (no second copy of the figures to keep in sync)."""

    def __init__(self, mon: Monitor) -> None:
        self.mon = mon

    def collect(self) -> Any:
        mon = self.mon
        s = mon.last
        up = GaugeMetricFamily("alphapulse_monitor_daemon_up", "1 when the daemon answered the last scrape")
        up.add_metric([], 1.0 if s is not None and s.daemon_up else 0.0)
        yield up
        scrapes = CounterMetricFamily("alphapulse_monitor_scrapes", "Scrapes of the daemon and the host")
        scrapes.add_metric([], mon.scraper.scrapes)
        yield scrapes
        failed = CounterMetricFamily("alphapulse_monitor_scrape_failures", "Scrapes the daemon did not answer")
        failed.add_metric([], mon.scraper.failures)
        yield failed
        if s is not None and s.scrape_ms is not None:
            dur = GaugeMetricFamily("alphapulse_monitor_scrape_duration_seconds", "Daemon answer time, last scrape")
            dur.add_metric([], s.scrape_ms / 1000.0)
            yield dur
        host = GaugeMetricFamily("alphapulse_monitor_host_usage_percent", "Host CPU, memory and disk usage",
                                 labels=["resource"])
        if s is not None:
            for name, v in (("cpu", s.cpu_pct), ("memory", s.memory_pct), ("disk", s.disk_pct)):
                if v is not None:
                    host.add_metric([name], v)
        yield host
        active = GaugeMetricFamily("alphapulse_monitor_alerts_active", "Unresolved alerts by severity",
                                   labels=["severity"])
        counts = {sev: 0 for sev in SEVERITIES}
        for a in mon.book.open.values():
            counts[a.severity] = counts.get(a.severity, 0) + 1
        for sev, n in counts.items():
            active.add_metric([sev], n)
        yield active
        firing = GaugeMetricFamily("alphapulse_monitor_alert", "1 for each unresolved alert",
                                   labels=["rule", "severity", "state"])
        for a in mon.book.open.values():
            firing.add_metric([a.rule, a.severity, a.state], 1.0)
        yield firing
        if mon.dispatcher is not None:
            stats = mon.dispatcher.stats()
            for key in ("sent", "failed", "retried", "rate_limited", "suppressed_quiet", "dropped"):
                fam = CounterMetricFamily(f"alphapulse_monitor_delivery_{key}", f"Alert delivery: {key} per channel",
                                          labels=["channel"])
                for channel, st in stats.items():
                    fam.add_metric([channel], st.get(key, 0))
                yield fam
            waiting = GaugeMetricFamily("alphapulse_monitor_delivery_queued", "Alerts waiting to be delivered",
                                        labels=["channel"])
            for channel, st in stats.items():
                waiting.add_metric([channel], st.get("queued", 0) + st.get("held", 0))
            yield waiting
        uptime = GaugeMetricFamily("alphapulse_monitor_uptime_seconds", "Seconds since the monitor started")
        uptime.add_metric([], mon.clock() - mon.started_wall)
        yield uptime


async def prometheus(request: web.Request) -> web.Response:
    registry: CollectorRegistry = request.app[REGISTRY]
    return web.Response(body=generate_latest(registry),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


REGISTRY: web.AppKey[CollectorRegistry] = web.AppKey("registry", CollectorRegistry)


def create_app(mon: Monitor) -> web.Application:
    """The monitor's application, not yet frozen: callers may add routes before running it."""
    app = web.Application(middlewares=[errors_as_json], client_max_size=64 * 1024)
    app[MONITOR] = mon
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_MonitorCollector(mon))
    app[REGISTRY] = registry
    app.router.add_get("/health", health)
    app.router.add_get("/api/alerts", alerts)
    app.router.add_post("/api/alerts/{id}/acknowledge", acknowledge)
    app.router.add_get("/api/metrics", metrics_series)
    app.router.add_get("/api/logs", logs)
    app.router.add_get("/api/snapshot", snapshot)
    app.router.add_get("/api/stream", stream)
    app.router.add_get("/metrics", prometheus)
    register_dashboard(app)  # GET / and its two static files (alphapulse/monitor/dashboard.py)
    return app
