"""The ``alphapulse monitor`` process: scrape, evaluate, persist, notify, serve.

Loop: every ``scrape_interval_s`` one scrape (the daemon and the host), the rules
(:mod:`alphapulse.monitor.rules`), one SQLite transaction for the sample and the alert transitions (in a
thread), then every alert sink and every open event stream hear about it.  It is its own process so that it
sees the daemon die: it starts, and says so in its log, ``/health`` and systemd ``STATUS=``, while the daemon
is down.  systemd: ``READY=1`` once the store is open and the HTTP server listens; ``WATCHDOG=1`` only while
scrapes keep completing; ``STOPPING=1`` on SIGTERM, then a clean stop.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from aiohttp import web

from alphapulse import __version__
from alphapulse.control import ensure_control_token
from alphapulse.log import get_logger, register_secrets
from alphapulse.monitor import rules
from alphapulse.monitor.delivery import Dispatcher, build_dispatcher
from alphapulse.monitor.rules import RuleBook, Sample
from alphapulse.monitor.scraper import Scraper
from alphapulse.monitor.settings import MonitorSettings
from alphapulse.monitor.store import AlertNotFound, AlertResolved, MonitorStore
from alphapulse.sdnotify import SystemdNotifier, watchdog_interval_s
from alphapulse.store import iso_ms

log = get_logger("alphapulse.monitor")

MAX_STREAMS = 16  # open /api/stream connections; more get 429
STREAM_QUEUE = 4  # snapshots buffered per stream; a slow reader loses the oldest, never blocks the monitor
RETENTION_EVERY_S = 3600.0
SINK_EVENTS = ("opened", "escalated", "resolved", "acknowledged")
STREAM_END: dict[str, Any] = {}  # put on a stream's queue at shutdown: the handler ends the response


class AlertSink(Protocol):
    """Receives every alert transition; ``submit`` must not block (queue the work, return)."""

    def submit(self, event: str, alert: dict[str, Any]) -> None: ...


class MonitorError(Exception):
    """Start-up failed (the port is taken, the store cannot be opened): exit 1."""


def series_of(s: Sample, checks: list[rules.Check]) -> dict[str, Any]:
    """The compact figures kept per sample for /api/metrics (the full daemon metrics would be kilobytes)."""
    m = s.metrics
    out: dict[str, Any] = {"health_status": s.health_status, "scrape_ms": None if s.scrape_ms is None else
                           round(s.scrape_ms, 3), "cpu_pct": s.cpu_pct, "memory_pct": s.memory_pct,
                           "disk_pct": s.disk_pct}
    for key, path in (("equity", ("portfolio", "equity")), ("daily_pnl", ("portfolio", "daily_pnl")),
                      ("decisions", ("model", "decisions")), ("candles_processed", ("market", "candles_processed"))):
        out[key] = rules.number_at(m, *path)
    state = rules.value_at(m, "trading", "state")
    out["trading_state"] = state if isinstance(state, str) else None
    for c in checks:
        out[c.rule] = c.value
    return out


class Monitor:
    """The running monitor's state; the HTTP server (alphapulse.monitor.server) reads it."""

    def __init__(self, settings: MonitorSettings, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self.started_wall = clock()
        self.started_mono = time.monotonic()
        self.notifier = SystemdNotifier()
        self.stop_event = asyncio.Event()
        self.token = ""
        self.store: MonitorStore | None = None
        self.book = RuleBook(settings.thresholds)
        self.scraper = Scraper(settings.daemon_url, settings.scrape_timeout_s, settings.daemon.data_dir)
        self.sinks: list[AlertSink] = []  # every transition goes to each (the delivery dispatcher among them)
        self.dispatcher: Dispatcher | None = None
        self.streams: set[asyncio.Queue[dict[str, Any]]] = set()
        self.last: Sample | None = None
        self.last_scrape_mono: float | None = None
        self.snapshot: dict[str, Any] = {}
        self.history: deque[Sample] = deque(maxlen=4000)  # for windowed rates and means
        self._lock = asyncio.Lock()  # one alert change at a time: a scrape's transitions or an acknowledgement
        self._runner: web.AppRunner | None = None
        self._daemon_was_up: bool | None = None
        self.store_error: str | None = None  # why the last sample could not be recorded

    # ---- start / stop ------------------------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        try:
            self.token, _ = await asyncio.to_thread(ensure_control_token, s.daemon)
            self.store = await asyncio.to_thread(MonitorStore, s.db_path)
            open_alerts = await asyncio.to_thread(self.store.open_alerts)
        except OSError as e:
            raise MonitorError(f"cannot open the monitor's state in {s.daemon.data_dir}: {e}") from None
        register_secrets([self.token])
        self.book = RuleBook(s.thresholds, open_alerts)
        if s.delivery_config.channels:
            # apprise builds its plugins synchronously (about half a second the first time): in a thread
            self.dispatcher = await asyncio.to_thread(build_dispatcher, s.delivery_config)
            await self.dispatcher.start()
            self.sinks.append(self.dispatcher)
        await self._refresh_snapshot()
        from alphapulse.monitor.server import create_app

        self._runner = web.AppRunner(create_app(self), access_log=None, handle_signals=False)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, s.host, s.port, reuse_address=True).start()
        except OSError as e:
            await self._runner.cleanup()
            self._runner = None
            raise MonitorError(f"cannot listen on {s.host}:{s.port}: {e.strerror or e}") from None
        log.info("monitor started", version=__version__, listen=f"http://{s.host}:{s.port}",
                 daemon=s.daemon_url, db=str(s.db_path), scrape_interval_s=s.scrape_interval_s,
                 open_alerts=len(open_alerts), config=str(s.config_file) if s.config_file else "built-in defaults",
                 delivery=[ch.kind for ch in s.delivery_config.channels] or "off")

    async def shutdown(self) -> None:
        for q in list(self.streams):  # end the event streams first: the server waits for open handlers
            if q.full():
                q.get_nowait()
            q.put_nowait(STREAM_END)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.scraper.close()
        if self.dispatcher is not None:  # what waits is sent within delivery.drain_timeout_s
            await self.dispatcher.close()
            self.sinks.remove(self.dispatcher)
            self.dispatcher = None
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
            self.store = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            await self.start()
        except BaseException:
            await self.shutdown()
            raise
        tasks = [asyncio.create_task(self._scrape_loop(), name="scrape"),
                 asyncio.create_task(self._retention_loop(), name="retention")]
        wd = watchdog_interval_s()
        if wd:
            tasks.append(asyncio.create_task(self._watchdog(wd), name="watchdog"))
        self.notifier.notify("READY=1")
        log.info("READY", startup_s=round(time.monotonic() - self.started_mono, 3), watchdog_interval_s=wd)
        done_waiter = asyncio.create_task(asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION))
        stop_waiter = asyncio.create_task(self.stop_event.wait())
        await asyncio.wait({done_waiter, stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
        code = 0
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                log.error("monitor task crashed; exiting so systemd restarts it", task=t.get_name(),
                          error=repr(t.exception()), exc_info=t.exception())
                code = 1
        self.notifier.notify("STOPPING=1")
        log.info("stopping")
        everything: list[asyncio.Task[Any]] = [*tasks, done_waiter, stop_waiter]
        for t in everything:
            t.cancel()
        await asyncio.gather(*everything, return_exceptions=True)
        await self.shutdown()
        log.info("stopped", exit_code=code)
        return code

    def _on_signal(self, sig: int) -> None:
        log.info("signal received", signal=signal.Signals(sig).name)
        self.stop_event.set()

    # ---- loops -------------------------------------------------------------------------------------------------
    async def _scrape_loop(self) -> None:
        interval = self.settings.scrape_interval_s
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            await self.scrape_once()
            next_at += interval
            delay = next_at - loop.time()
            if delay < 0:  # fell behind (a slow scrape): start again from now rather than bursting
                next_at, delay = loop.time(), 0.0
            await asyncio.sleep(delay)

    async def _retention_loop(self) -> None:
        while True:
            assert self.store is not None
            cut = int((self.clock() - self.settings.retention_days * 86400) * 1000)
            try:
                removed = await asyncio.to_thread(self.store.prune, cut)
            except sqlite3.Error as e:  # retried in an hour; the scrape loop reports a store that cannot write
                log.error("retention failed", db=str(self.settings.db_path), error=str(e))
            else:
                if any(removed.values()):
                    log.info("retention", older_than=iso_ms(cut), **removed)
            await asyncio.sleep(RETENTION_EVERY_S)

    def scrape_age_s(self) -> float | None:
        return None if self.last_scrape_mono is None else time.monotonic() - self.last_scrape_mono

    def problem(self) -> str | None:
        """Why /health says 503: scrapes stopped, or samples cannot be recorded (a full disk).  Only the first
        withholds the watchdog: a restart would not free the disk, and restarts would soon hit the start limit."""
        if self.store_error is not None:
            return f"cannot record samples and alerts: {self.store_error}"
        return self.stalled()

    def stalled(self) -> str | None:
        """Why the monitor's scrape loop is not working (no scrape completed for a while), or None."""
        limit = 3 * self.settings.scrape_interval_s + self.settings.scrape_timeout_s + 5
        age = self.scrape_age_s()
        if age is None:
            age = time.monotonic() - self.started_mono
        return f"no scrape completed for {age:.1f}s" if age > limit else None

    async def _watchdog(self, interval: float) -> None:
        withheld = False
        while True:
            await asyncio.sleep(interval)
            problem = self.stalled()
            if problem is None:
                self.notifier.notify("WATCHDOG=1")
                withheld = False
            elif not withheld:
                withheld = True
                log.error("watchdog ping withheld", problem=problem)

    # ---- one scrape --------------------------------------------------------------------------------------------
    def _base(self, now: float, window: float) -> Sample | None:
        """The oldest remembered sample with daemon metrics within ``window`` seconds (the start of a rate)."""
        for old in self.history:
            if old.metrics is not None and now - old.ts <= window:
                return old
        return None

    async def scrape_once(self) -> list[tuple[str, dict[str, Any]]]:
        sample = await self.scraper.scrape()
        prev = next((h for h in reversed(self.history) if h.metrics is not None), None)
        checks = rules.evaluate(sample, prev, self._base(sample.ts, rules.RATE_WINDOW_S),
                                self._base(sample.ts, rules.CONFIDENCE_WINDOW_S), self.settings.thresholds)
        if sample.metrics is not None:
            self.history.append(sample)
            while self.history and sample.ts - self.history[0].ts > rules.CONFIDENCE_WINDOW_S:
                self.history.popleft()
        async with self._lock:
            transitions = self.book.evaluate(checks)
            assert self.store is not None
            try:
                changed = await asyncio.to_thread(self.store.record, int(sample.ts * 1000),
                                                  series_of(sample, checks), sample.daemon_up, transitions)
            except sqlite3.Error as e:
                # A full disk or a locked file: keep scraping (and serving what is known); the transitions are
                # found again on the next scrape, since the rules still see no alert where one should open.
                changed = []
                if self.store_error is None:
                    log.error("cannot record the sample and its alerts", db=str(self.settings.db_path), error=str(e))
                self.store_error = str(e)
            else:
                if self.store_error is not None:
                    log.info("recording works again", db=str(self.settings.db_path))
                self.store_error = None
            for _kind, alert in changed:
                self.book.applied(alert)
        self.last = sample
        self.last_scrape_mono = time.monotonic()
        self._note_daemon(sample)
        for kind, alert in changed:
            self._log_transition(kind, alert)
            if kind in SINK_EVENTS:
                self._submit(kind, alert)
        await self._refresh_snapshot()
        self.notifier.notify(f"STATUS={self.status_line()}")
        return changed

    def _note_daemon(self, s: Sample) -> None:
        if s.daemon_up == self._daemon_was_up:
            return
        if s.daemon_up:
            log.info("daemon reachable", url=self.settings.daemon_url, health_status=s.health_status)
        elif self._daemon_was_up is None:
            log.warning("daemon not reachable at start; monitoring continues and will alert",
                        url=self.settings.daemon_url, error=s.error)
        else:
            log.warning("daemon no longer reachable", url=self.settings.daemon_url, error=s.error)
        self._daemon_was_up = s.daemon_up

    @staticmethod
    def _log_transition(kind: str, alert: dict[str, Any]) -> None:
        fields = {"id": alert["id"], "rule": alert["rule"], "severity": alert["severity"], "value": alert["value"],
                  "threshold": alert["threshold"], "count": alert["count"]}
        if kind == "resolved":
            log.info("alert resolved", **fields)
        elif kind in ("opened", "escalated"):
            log.warning(f"alert {kind}", message=alert["message"], **fields)
        else:
            log.debug(f"alert {kind}", **fields)

    def _submit(self, event: str, alert: dict[str, Any]) -> None:
        for sink in self.sinks:
            try:
                sink.submit(event, alert)
            except Exception as e:  # a broken sink must not stop monitoring or the other sinks
                log.error("alert sink failed", sink=type(sink).__name__, alert_event=event, error=repr(e))

    def status_line(self) -> str:
        s = self.last
        up = "unknown" if s is None else ("up" if s.daemon_up else "DOWN")
        active = self.book.open
        worst = min((a.severity for a in active.values()), default=None)
        return f"daemon {up}; {len(active)} active alert(s)" + (f", worst {worst}" if worst else "")

    # ---- acknowledgements --------------------------------------------------------------------------------------
    async def acknowledge(self, alert_id: int) -> tuple[bool, dict[str, Any]]:
        """Raises AlertNotFound / AlertResolved; (changed, alert row)."""
        assert self.store is not None
        async with self._lock:
            changed, alert = await asyncio.to_thread(self.store.acknowledge, alert_id, int(self.clock() * 1000))
            if changed:
                self.book.acknowledged(alert_id)
        if changed:
            log.info("alert acknowledged", id=alert_id, rule=alert["rule"], severity=alert["severity"])
            self._submit("acknowledged", alert)
            await self._refresh_snapshot()
        return changed, alert

    # ---- views for the HTTP server -----------------------------------------------------------------------------
    async def alerts_body(self, recent: int = 50) -> dict[str, Any]:
        assert self.store is not None
        return await asyncio.to_thread(self.store.alerts_body, recent, int(self.clock() * 1000))

    def monitor_info(self) -> dict[str, Any]:
        return {"version": __version__, "uptime_s": round(self.clock() - self.started_wall, 3),
                "scrape_interval_s": self.settings.scrape_interval_s, "scrapes": self.scraper.scrapes,
                "scrape_failures": self.scraper.failures}

    async def _refresh_snapshot(self) -> None:
        """Rebuild /api/snapshot's body and push it to every open event stream."""
        s = self.last
        daemon: dict[str, Any] = {"up": False, "health_status": None, "health": None, "metrics": None,
                                  "scraped_at": None, "error": "not scraped yet"}
        host: dict[str, Any] = {"cpu_pct": None, "memory_pct": None, "disk_pct": None}
        if s is not None:
            daemon = {"up": s.daemon_up, "health_status": s.health_status, "health": s.health,
                      "metrics": s.metrics, "scraped_at": iso_ms(int(s.ts * 1000)), "error": s.error}
            host = {"cpu_pct": s.cpu_pct, "memory_pct": s.memory_pct, "disk_pct": s.disk_pct}
        self.snapshot = {"daemon": daemon, "host": host, "alerts": await self.alerts_body(),
                         "monitor": self.monitor_info()}
        for q in list(self.streams):
            if q.full():
                q.get_nowait()
            q.put_nowait(self.snapshot)

    def open_stream(self) -> asyncio.Queue[dict[str, Any]] | None:
        """A queue of snapshots for one /api/stream client, or None when :data:`MAX_STREAMS` are open."""
        if len(self.streams) >= MAX_STREAMS:
            return None
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=STREAM_QUEUE)
        self.streams.add(q)
        return q

    def close_stream(self, q: asyncio.Queue[dict[str, Any]]) -> None:
        self.streams.discard(q)

    def health(self) -> tuple[int, dict[str, Any]]:
        """The monitor's own health (200 while scrapes complete, whatever the daemon does) and what it sees."""
        problem = self.problem()
        s = self.last
        body = {
            "status": "stalled" if problem else "ok",
            "problem": problem,
            "daemon": {"url": self.settings.daemon_url, "up": None if s is None else s.daemon_up,
                       "health_status": None if s is None else s.health_status,
                       "error": None if s is None else s.error,
                       "scraped_at": None if s is None else iso_ms(int(s.ts * 1000))},
            "active_alerts": len(self.book.open),
            "last_scrape_age_s": None if self.scrape_age_s() is None else round(self.scrape_age_s() or 0.0, 3),
            "monitor": self.monitor_info(),
        }
        return (503 if problem else 200), body


def main(settings: MonitorSettings) -> int:
    """Run the monitor until SIGTERM/SIGINT; 0 on a clean stop, 1 when start-up failed or a task crashed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a core dependency
        uvloop = None  # type: ignore[assignment]

    async def _run() -> int:
        return await Monitor(settings).run()

    try:
        return uvloop.run(_run()) if uvloop is not None else asyncio.run(_run())
    except MonitorError as e:
        log.error("monitor start-up failed", error=str(e))
        print(f"alphapulse monitor: {e}", file=sys.stderr)
        return 1


__all__ = ["AlertNotFound", "AlertResolved", "AlertSink", "Monitor", "MonitorError", "main"]
