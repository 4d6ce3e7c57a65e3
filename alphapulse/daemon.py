"""The trading daemon: wires the stages into cooperating tasks on one uvloop event loop.

Tasks: ingestion (feed -> validation -> queue), the engine (one :meth:`Engine.step` per candle, then a
durable commit and the operator files), housekeeping (WAL checkpoints in a thread, systemd STATUS), the
systemd watchdog, and the embedded aiohttp control server.  READY=1 is sent only once config, state,
model and feed are up; WATCHDOG=1 only while the loop is responsive and every pipeline task is alive and
progressing, so a wedged task or a blocked loop makes systemd restart the service instead of trusting a
watchdog that lies.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from alphapulse import __version__
from alphapulse.builder import (
    build_broker,
    build_engine,
    build_exchange_client,
    build_feed,
    funding_schedule,
    policy_feature_set,
)
from alphapulse.config import ConfigError, Settings
from alphapulse.control import ensure_control_token, start_control_server
from alphapulse.domain import Candle, Fill, TradingState
from alphapulse.engine import Engine, StepResult
from alphapulse.exchange.weex.broker import WeexBroker
from alphapulse.exchange.weex.client import WeexClient
from alphapulse.exchange.weex.errors import AuthError, ExchangeUnavailable, UnknownSymbolError, WeexError
from alphapulse.features import StreamingSource
from alphapulse.funding import FundingError
from alphapulse.log import get_logger, register_secrets, reopen_log_file
from alphapulse.market.feed import Feed, FeedError
from alphapulse.market.replay import check_file_timeframe, default_replay_file
from alphapulse.market.validate import CandleValidator
from alphapulse.metrics import LatencyHistogram
from alphapulse.model_store import model_error, resolve_model
from alphapulse.policy import ModelError, Policy
from alphapulse.prometheus import ExchangeRequests, LatencySeries, ScrapeView
from alphapulse.reconcile import MISMATCH_KINDS, AccountView, Resolution, reconcile
from alphapulse.sdnotify import SystemdNotifier, watchdog_interval_s
from alphapulse.store import OperatorFiles, Persisted, Store, iso_ms

log = get_logger("alphapulse.daemon")

_END = object()  # queue sentinel: the feed is exhausted
# Longest the operator files of a step wait for its orders' acknowledgement (live): a slow exchange delays the files,
# never the decisions (the engine sends no new order while one is pending anyway).
ANSWER_WAIT_S = 0.5
STOP_TASKS_TIMEOUT_S = 5.0  # each pipeline task stops within this after SIGTERM, or is named in the journal


def rss_mb() -> float:
    """Resident set size of this process in MiB, from /proc (0 when unavailable)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 1048576
    except (OSError, ValueError, IndexError):
        return 0.0


@dataclass
class Component:
    """Progress of one pipeline task, for /health and the watchdog."""

    name: str
    last_progress: float = field(default_factory=time.monotonic)
    state: str = "starting"
    task: asyncio.Task[Any] | None = None

    def progress(self, state: str = "running") -> None:
        self.last_progress = time.monotonic()
        self.state = state

    def age_s(self) -> float:
        return time.monotonic() - self.last_progress


class StepObserver(Protocol):
    """Called after each candle's step with the step and four ``time.perf_counter_ns`` stamps: before
    :meth:`Engine.step`, after it, after the durable commit (``committed - start`` is exactly the sample the daemon
    adds to ``tick_to_order_us``) and after the operator files and log lines.  For measurements (the benchmark
    splits the latency by stage and by "produced an order"); it runs on the engine task, so it must be quick and
    must not raise.  Unset (the default), it costs the per-candle path one ``perf_counter_ns`` call (the stamp
    between step and commit) and a ``None`` check."""

    def __call__(self, res: StepResult, start_ns: int, stepped_ns: int, committed_ns: int, published_ns: int) -> None:
        ...


class StartupError(Exception):
    """Start-up failed for a reason that may pass (the exchange unreachable): exit 1 so systemd tries again."""


class Daemon:
    def __init__(self, settings: Settings, exit_at_end: bool = False,
                 step_observer: StepObserver | None = None) -> None:
        self.settings = settings
        self.exit_at_end = exit_at_end
        self.step_observer = step_observer  # see StepObserver
        self.started_mono = time.monotonic()
        self.started_wall = time.time()
        self.notifier = SystemdNotifier()
        self.stop_event = asyncio.Event()
        self.exit_code = 0
        self.ready = False
        live = settings.mode == "live"
        self.components = {n: Component(n) for n in ("feed", "engine", "housekeeping",
                                                       *(("execution", "reconcile") if live else ()))}
        self.client: WeexClient | None = None
        self.live: WeexBroker | None = None
        self.reconcile_stats: Counter[str] = Counter()
        self._foreign_seen: frozenset[str] = frozenset()  # foreign open orders already reported
        self.last_reconcile_wall: float | None = None
        self.latency = LatencyHistogram()  # candle in -> order acked and committed
        self.inference = LatencyHistogram()
        self.rejected: Counter[str] = Counter()
        self.candles_in = 0
        self.candles_processed = 0
        self.confidence_sum = 0.0
        self.last_candle: Candle | None = None
        self.replay_summary: dict[str, Any] | None = None
        self.wedged = asyncio.Event()  # fault injection: the engine task stops consuming when set
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=settings.queue_size)
        self.token = ""
        self.token_path: Path | None = None
        # created in start()
        self.store: Store
        self.files: OperatorFiles
        self.engine: Engine
        self.policy: Policy
        self.model_source = "bundled"  # where the policy's file came from: config | store | bundled
        self.feed: Feed | None = None  # built in start() after the broker: live start-up reports STATUS before it
        self.validator: CandleValidator
        self._runner: Any = None
        self._reopen_failing = False
        self._reload_task: asyncio.Task[None] | None = None

    # ---- start-up ---------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        if s.feed_source == "replay":  # a file of another timeframe is a config error before any state exists
            await asyncio.to_thread(self._check_replay_timeframe)
        self.token, self.token_path = ensure_control_token(s)
        register_secrets([self.token])
        if self.token_path is not None:
            log.info("control token file", path=str(self.token_path),
                     hint="send it as 'Authorization: Bearer <token>' to the POST endpoints")

        # model.path when set, else the active version of the model store (alphapulse model promote), else bundled
        model_path, self.model_source = await asyncio.to_thread(resolve_model, s)
        try:
            self.policy = await asyncio.to_thread(Policy.load, model_path)
        except ModelError as e:
            raise model_error(s, self.model_source, str(e)) from None
        if self.policy.meta.timeframe and self.policy.meta.timeframe != s.timeframe:
            raise ConfigError("trading_params.yaml", "timeframe", f"{s.timeframe} but model "
                              f"{self.policy.meta.version} was built for {self.policy.meta.timeframe}")
        await asyncio.to_thread(self.policy.warmup, s.model_warmup_runs)

        self.store = Store(s.data_dir)
        persisted = self.store.load()
        self.files = OperatorFiles(s.log_dir)  # before anything at start-up can book (live reconciliation)
        added = self.files.reconcile(self.store, self.policy.meta.action_meanings, s.bar_ms)
        if any(added.values()):
            log.warning("operator files were behind the database (crash between commit and append); restored",
                        **added)
        self._note_model_change(model_path)
        fs = policy_feature_set(self.policy)  # the model's feature set: its streaming form and warm-up
        self.features: StreamingSource = fs.streaming()
        if s.mode == "live" or s.feed_source == "weex":
            self.client = build_exchange_client(s)
        broker = build_broker(s, self.client)
        try:
            funding = funding_schedule(s)  # paper: simulated funding; live: None, the exchange books it
        except FundingError as e:
            raise ConfigError("config.yaml", "feed.funding_file", str(e)) from None
        try:
            self.engine = build_engine(s, self.policy, features=self.features, broker=broker, persisted=persisted,
                                       feature_set=fs, funding=funding)
        except ValueError as e:  # vol targeting on a model whose features have no volatility
            raise ConfigError("trading_params.yaml", "risk.target_vol_pct", str(e)) from None
        portfolio = self.engine.portfolio
        if isinstance(broker, WeexBroker):
            self.live = broker
            await self._start_live(broker, persisted is not None)
        else:
            self.store.set_meta("mode", s.mode)  # a later live start knows these books were paper
        last_ts = self.engine.last_candle_ts
        reason = self.engine.state_reason

        self.feed = build_feed(s, last_ts, self.client, warmup_bars=fs.warmup_bars)
        try:
            await self.feed.open()
        except FeedError as e:
            if s.feed_source == "replay":
                raise ConfigError("config.yaml", "feed.replay_file", str(e)) from None
            raise StartupError(f"exchange feed: {e}") from None  # the network may come back: systemd retries
        if last_ts is not None:
            self.features.warmup(self.feed.history(last_ts + 1, fs.warmup_bars))
        elif s.feed_source == "weex":  # a live market has a past: warm up from it instead of waiting for it
            self.features.warmup(self.feed.history(self.feed.now_ms() or 0, fs.warmup_bars))
        self.validator = CandleValidator(s.bar_ms, last_ts)

        self._runner = await start_control_server(self, s.control_host, s.control_port,
                                                  fault_injection=s.fault_injection)
        log.info("daemon started", version=__version__, mode=s.mode, symbol=s.symbol, timeframe=s.timeframe,
                 model=self.policy.meta.version, model_source=self.model_source, feed=self.feed.describe(),
                 resumed_after=iso_ms(last_ts) if last_ts is not None else None,
                 state=self.engine.state.value, equity=str(portfolio.equity),
                 control=f"http://{s.control_host}:{s.control_port}")
        if self.engine.state is not TradingState.ACTIVE:
            log.warning("trading state restored", state=self.engine.state.value, reason=reason)

    def _note_model_change(self, path: Path) -> None:
        """An incidents.log line when the daemon starts on another model than last time (a promotion or a
        rollback taking effect), so the file tells which model traded from when.  The first start of a store
        only records the version: there is no change to report."""
        meta = self.policy.meta
        last = self.store.get_meta("model_version")
        if last == meta.version:
            return
        if last is not None:
            self.files.note(int(time.time() * 1000), "MODEL_LOADED", {
                "version": meta.version, "previous": last, "source": self.model_source, "path": str(path)})
        self.store.set_meta("model_version", meta.version)

    def _check_replay_timeframe(self) -> None:
        """Refuse a replay file of another timeframe (a 5m file under the 1h config) before the store and the
        control token are created: the opened feed would refuse it too, but only after them."""
        s = self.settings
        try:
            check_file_timeframe(s.replay_file or default_replay_file(s.timeframe), s.bar_ms)
        except FeedError as e:
            raise ConfigError("config.yaml", "feed.replay_file", str(e)) from None

    async def _start_live(self, broker: WeexBroker, has_state: bool) -> None:
        """Credentials, symbol, leverage and a first reconciliation, all before READY."""
        s = self.settings
        broker.bind(lambda: self.engine.portfolio.position.qty)
        broker.restore_booked(self.store.order_fills(o.client_order_id for o in broker.open_orders()))
        broker.funding_since_ms = self.store.last_cash_flow_ms("funding")
        try:
            await broker.start()
        except AuthError as e:
            raise ConfigError("environment", "WEEX_API_KEY", f"the exchange rejected the credentials "
                              f"({e.code}: {e.msg}); nothing was traded") from None
        except UnknownSymbolError as e:
            raise ConfigError("trading_params.yaml", "symbol", f"{s.symbol}: {e.msg}") from None
        except (ExchangeUnavailable, WeexError) as e:
            raise StartupError(f"exchange unreachable at start ({e}); nothing was traded") from None
        previous = self.store.get_meta("mode")
        switched = has_state and previous != "live"  # a paper store going live: its paper books differ, by design
        await self._reconcile(expected_difference=switched or not has_state)
        if switched or not has_state:
            self.engine.portfolio.rebase()
            log.warning("live trading starts from the exchange's account", previous_mode=previous or "none",
                        equity=str(self.engine.portfolio.equity), position=str(self.engine.portfolio.position.qty))
        self.store.set_meta("mode", "live")

    async def _reconcile(self, expected_difference: bool = False) -> Resolution | None:
        """Compare the store's account with the exchange's and resolve by the rule in alphapulse.reconcile."""
        broker = self.live
        assert broker is not None
        if broker.in_flight() and not expected_difference:
            self.reconcile_stats["skipped_in_flight"] += 1
            return None
        await broker.poll_funding(self)  # funding the exchange booked is ours to book first, not an adjustment
        activity = broker.activity
        theirs = await broker.account()
        if (broker.activity != activity or broker.in_flight()) and not expected_difference:
            self.reconcile_stats["skipped_in_flight"] += 1  # an order or fill moved while we looked: next time
            return None
        pf = self.engine.portfolio
        ours = AccountView(pf.symbol, pf.position.qty, pf.position.entry_price, pf.cash)
        resolution = reconcile(ours, theirs, broker.order_ids(), qty_tolerance=self.settings.lot_size / 2,
                               halt_on_position=not expected_difference, reported_foreign=self._foreign_seen)
        self._foreign_seen = resolution.foreign_orders
        self.reconcile_stats["runs"] += 1
        self.last_reconcile_wall = time.time()
        if not resolution.clean:
            for m in resolution.mismatches:
                self.reconcile_stats[m.kind] += 1
                log.warning("RECONCILIATION_MISMATCH", **m.as_detail())
            self.apply(self.engine.apply_reconciliation(resolution, int(time.time() * 1000)))
        return resolution

    async def _reconcile_loop(self) -> None:
        comp = self.components["reconcile"]
        while True:
            await asyncio.sleep(self.settings.reconcile_interval_s)
            try:
                await self._reconcile()
                comp.progress("running")
            except WeexError as e:
                self.reconcile_stats["errors"] += 1
                log.warning("reconciliation failed; will retry", error=str(e))

    async def _execute(self) -> None:
        assert self.live is not None
        self.components["execution"].progress("running")
        await self.live.run(self)

    # ---- what the exchange reports (ExecutionSink; called by the broker's task on the loop) ------
    def on_fills(self, fills: list[Fill]) -> None:
        res = StepResult(None)
        self.engine.book_fills(res, fills)
        self.apply(res)
        self.components["execution"].progress("running")

    def on_order_status(self, client_order_id: str, status: str, exchange_order_id: str | None, detail: str) -> None:
        self.store.mark_order(client_order_id, status, exchange_order_id)
        if status in ("rejected", "cancelled"):
            log.warning("order ended without filling completely", order_id=client_order_id, status=status,
                        exchange_order_id=exchange_order_id, detail=detail)

    # ---- tasks ------------------------------------------------------------------------------
    async def _ingest(self) -> None:
        comp = self.components["feed"]
        comp.progress()
        v = self.validator
        async for candle in self._open_feed().candles():
            self.candles_in += 1
            reason = v.check(candle)
            if reason is not None:
                self.rejected[reason] += 1
                log.warning("candle rejected", reason=reason, ts=candle.ts, close=candle.close,
                            rejected_total=sum(self.rejected.values()))
                comp.progress()
                continue
            if v.last_gap_bars:
                log.warning("data gap", missing_bars=v.last_gap_bars, resumed_at=iso_ms(candle.ts))
            await self._queue.put(candle)
            comp.progress()
        comp.progress("finished")
        await self._queue.put(_END)

    async def _run_engine(self) -> None:
        comp = self.components["engine"]
        comp.progress("waiting")
        q = self._queue
        perf = time.perf_counter_ns
        observer = self.step_observer
        feed = self._open_feed()
        while True:
            item = await q.get()
            if self.wedged.is_set():
                await asyncio.Event().wait()  # fault injection: a task stuck on an await that never returns
            if item is _END:
                self._on_feed_end()
                comp.progress("idle")
                if self.exit_at_end:
                    self.stop_event.set()
                continue
            t0 = perf()
            res = self.engine.step(item, feed.now_ms(), stream_stalled=feed.stalled)
            t1 = perf()
            persisted = self._commit(res)
            t2 = perf()
            # the order is acknowledged once durable: the files and log lines below are views derived from it
            self.latency.add((t2 - t0) / 1000)
            if res.orders and self.live is not None:
                # the files and log lines wait until the exchange has answered (bounded): written meanwhile, they
                # would hold the loop while the acknowledgement is waiting to be read
                await self.live.wait_answered(ANSWER_WAIT_S)
            self._publish(res, persisted)
            if observer is not None:
                observer(res, t0, t1, t2, perf())
            self.last_candle = item
            self.candles_processed += 1
            d = res.decision
            if d is not None:
                self.inference.add(d.decision.inference_us)
                self.confidence_sum += d.decision.confidence
            comp.progress("running" if q.qsize() else "waiting")

    def _persist(self, res: StepResult) -> None:
        """Commit one step, then append the operator files and log what matters."""
        self._publish(res, self._commit(res))

    def _commit(self, res: StepResult) -> Persisted:
        p = self.store.commit_step(res, self.engine.snapshot())
        if res.orders:
            self.engine.broker.release()  # the intents are durable: now they may leave for the venue
        return p

    def _publish(self, res: StepResult, p: Persisted) -> None:
        """Operator files and log lines for a committed step (re-created from the store after a crash)."""
        eng = self.engine
        reasons = {o.client_order_id: o.reason for o in res.orders}
        missing = [f.client_order_id for f in res.fills if f.client_order_id not in reasons]
        if missing:
            reasons.update(self.store.fill_reasons(missing))
        self.files.write(p, reasons, self.policy.meta.action_meanings, self.settings.bar_ms)
        for o in res.orders:
            log.info("order", order_id=o.client_order_id, side=o.side.value, qty=str(o.qty),
                     reduce_only=o.reduce_only, reason=o.reason)
        for f in res.fills:
            log.info("fill", order_id=f.client_order_id, side=f.side.value, qty=str(f.qty), price=str(f.price),
                     fee=str(f.fee), pnl=str(f.realized_pnl - f.fee), equity=str(eng.portfolio.equity))
        for a in res.alerts:
            log.warning("RISK_LIMIT_EXCEEDED", limit=a.limit, value=round(a.value, 6), threshold=a.threshold,
                        action=a.action, **{k: v for k, v in a.detail.items() if isinstance(v, (str, int, float))})
        for inc in res.incidents:
            log.warning("incident", kind=inc.kind, **{k: v for k, v in inc.detail.items()
                                                      if isinstance(v, (str, int, float)) or v is None})
        d = res.decision
        if d is not None and d.allowed:
            log.info("decision", candle=iso_ms(d.decision.candle_ts), action=self.policy.meta.action_meanings[
                d.decision.action], confidence=round(d.decision.confidence, 4), order_id=d.order_id)

    def _on_feed_end(self) -> None:
        pf = self.engine.portfolio
        ret = float(pf.equity / pf.initial_equity - 1) if pf.initial_equity else 0.0
        self.replay_summary = {
            "candles": self.candles_processed, "rejected": sum(self.rejected.values()), "decisions":
            self.engine.decisions, "orders": self.engine.orders_sent, "fills": pf.fills, "equity": str(pf.equity),
            "return_pct": round(ret * 100, 4), "fees": str(pf.fees_paid), "realized_pnl": str(pf.realized_pnl),
            "state": self.engine.state.value,
        }
        log.info("replay finished", **{k: v for k, v in self.replay_summary.items() if v is not None},
                 hint="the daemon keeps serving; stop it with Ctrl-C or systemctl stop, or use --exit-at-end")
        self.notify_status()

    async def _housekeeping(self) -> None:
        comp = self.components["housekeeping"]
        last_commits = 0
        ticks = 0
        while True:
            await asyncio.sleep(1.0)
            ticks += 1
            # not while a live order is on the wire: the checkpoint's copy and fsync compete with the order's commit
            # and its answer for the disk and the CPU (A/B, 200 live orders a run against the fake: decision-to-release
            # p99 736 and 862 µs with checkpoints, 442 and 378 µs without)
            in_flight = self.live is not None and self.live.in_flight()
            if self.store.commits != last_commits and not in_flight:
                last_commits = self.store.commits
                await asyncio.to_thread(self.store.checkpoint)
            if ticks % 2 == 0:
                self.notify_status()
            self._reopen_rotated()
            comp.progress("running")

    def _reopen_rotated(self) -> None:
        """Follow logrotate: files renamed or removed under us are reopened at their paths (a few stat calls a
        second; the reopen itself is rare and short).  No signal is needed, so a rotation can never kill a
        daemon that has not installed its handlers yet."""
        try:
            files = self.files.reopen_rotated()
            if reopen_log_file():
                files.append("log")
        except OSError as e:
            if not self._reopen_failing:  # once, not every second, until it works again
                log.error("cannot reopen rotated log files; still writing to the old ones", error=str(e))
            self._reopen_failing = True
            return
        self._reopen_failing = False
        if files:
            log.info("log files reopened after rotation", files=files)

    async def _watchdog(self, interval: float) -> None:
        withheld = False
        while True:
            await asyncio.sleep(interval)
            problem = self.health_problem()
            if problem is None:
                self.notifier.notify("WATCHDOG=1")
                if withheld:
                    log.info("watchdog pings resumed")
                withheld = False
            elif not withheld:
                withheld = True
                log.error("watchdog ping withheld: pipeline not healthy", problem=problem)

    # ---- health -----------------------------------------------------------------------------
    def health_problem(self) -> str | None:
        """None when healthy; else why (a dead task, or one with work that has stopped progressing)."""
        stall = self.settings.stall_timeout_s
        for comp in self.components.values():
            t = comp.task
            if t is not None and t.done() and comp.state != "finished":
                return f"{comp.name} task ended"
        eng = self.components["engine"]
        if (self._queue.qsize() > 0 or eng.state == "running") and eng.age_s() > stall:
            return f"engine made no progress for {eng.age_s():.1f}s with {self._queue.qsize()} candles queued"
        feed = self.components["feed"]
        if feed.state != "finished" and not self._queue.full():
            speed = (self.settings.replay_speed or 1e9) if self.settings.feed_source == "replay" else 1.0
            expected = 3 * self.settings.bar_ms / 1000 / speed  # a live market closes one bar per bar
            if feed.age_s() > stall + expected:
                return f"feed produced nothing for {feed.age_s():.1f}s"
        hk = self.components["housekeeping"]
        if hk.age_s() > stall + 5:
            return f"housekeeping made no progress for {hk.age_s():.1f}s"
        return None

    def status_line(self) -> str:
        pf = self.engine.portfolio
        return (f"{self.settings.mode} {self.engine.state.value} equity={pf.equity:.2f} "
                f"pos={pf.position.qty} candles={self.candles_processed}"
                + (" feed=finished" if self.feed is not None and self.feed.finished else ""))

    def _open_feed(self) -> Feed:
        """The feed start() built: everything but :meth:`status_line` runs after that, so None here is a bug."""
        if self.feed is None:
            raise RuntimeError("the feed is used before start() built it")
        return self.feed

    def notify_status(self) -> None:
        self.notifier.notify(f"STATUS={self.status_line()}")

    # ---- the control server's view (ControlTarget; called on the loop thread) -----------------
    def apply(self, res: StepResult) -> None:
        self._persist(res)
        self.notify_status()

    def operator_action(self, action: str, reason: str) -> dict[str, Any]:
        """Run an operator action through the engine and persist it before answering."""
        eng, now = self.engine, int(time.time() * 1000)
        if action == "emergency_stop":
            res = eng.emergency_stop(now, reason)
        elif action == "flatten_positions":
            res = eng.flatten(now)
        elif action == "maintenance_mode":
            res = eng.maintenance(now)
        elif action == "resume_trading":
            res = eng.resume(now)
        else:
            raise ValueError(f"unknown operator action {action!r}")
        self.apply(res)
        return {"state": eng.state.value, "orders": [o.client_order_id for o in res.orders],
                "cancelled": [o.client_order_id for o in res.cancelled]}

    def trading_state(self) -> str:
        return self.engine.state.value

    def wedge_engine(self) -> None:
        self.wedged.set()

    # ---- lifecycle ----------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload)  # also before READY: its default action kills
        try:
            await self.start()
        except BaseException:
            await self._shutdown()
            raise
        self.components["feed"].task = asyncio.create_task(self._ingest(), name="ingest")
        self.components["engine"].task = asyncio.create_task(self._run_engine(), name="engine")
        self.components["housekeeping"].task = asyncio.create_task(self._housekeeping(), name="housekeeping")
        if self.live is not None:
            self.components["execution"].task = asyncio.create_task(self._execute(), name="execution")
            self.components["reconcile"].task = asyncio.create_task(self._reconcile_loop(), name="reconcile")
        for c in self.components.values():
            c.progress(c.state)
        wd = watchdog_interval_s()
        wd_task = asyncio.create_task(self._watchdog(wd), name="watchdog") if wd else None
        # Start-up objects never die: move them out of the collector's sight, and collect young objects less
        # often, so a collection pause lands on fewer candles (measured: p99 218 -> 173 µs).
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        self.ready = True
        self.notifier.notify("READY=1")
        self.notify_status()
        log.info("READY", startup_s=round(time.monotonic() - self.started_mono, 3),
                 watchdog_interval_s=wd)

        crashed = asyncio.create_task(self._first_crash(), name="crash-monitor")
        await self.stop_event.wait()
        crashed.cancel()
        self.notifier.notify("STOPPING=1")
        log.info("stopping", candles=self.candles_processed, equity=str(self.engine.portfolio.equity))
        tasks = [c.task for c in self.components.values() if c.task] + ([wd_task] if wd_task else [])
        if self._reload_task is not None:
            tasks.append(self._reload_task)
        for t in tasks:
            t.cancel()
        # bounded: a task slow to honour its cancellation is named in the journal and cancelled once more, and the
        # store is still closed cleanly after it (systemd's stop timeout would otherwise SIGKILL the service)
        _, pending = await asyncio.wait(tasks, timeout=STOP_TASKS_TIMEOUT_S) if tasks else (set(), set())
        if pending:
            log.error("tasks slow to stop; cancelling them again", tasks=sorted(t.get_name() for t in pending),
                      timeout_s=STOP_TASKS_TIMEOUT_S)
            for t in pending:
                t.cancel()
            await asyncio.wait(pending, timeout=STOP_TASKS_TIMEOUT_S)
        await self._shutdown()
        log.info("stopped", exit_code=self.exit_code)
        return self.exit_code

    async def _first_crash(self) -> None:
        tasks = {c.task for c in self.components.values() if c.task}
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t.cancelled():
                continue
            exc = t.exception()
            if exc is not None:
                log.error("pipeline task crashed; exiting so systemd restarts the service", task=t.get_name(),
                          error=repr(exc), exc_info=exc)
                self.exit_code = 1
                self.stop_event.set()
                return
        # the ingest task ends normally when the replay is exhausted; that is not a crash
        rest = tasks - done
        if rest:
            await asyncio.wait(rest, return_when=asyncio.FIRST_EXCEPTION)
            for t in rest:
                if t.done() and not t.cancelled() and t.exception() is not None:
                    log.error("pipeline task crashed; exiting so systemd restarts the service",
                              task=t.get_name(), error=repr(t.exception()))
                    self.exit_code = 1
                    self.stop_event.set()
                    return

    def _on_reload(self) -> None:
        """SIGHUP (``systemctl reload``): swap in the model the configuration resolves to now, if it is safe."""
        if not self.ready:
            log.warning("SIGHUP before READY ignored; the model being loaded is already the current one")
            return
        if self._reload_task is not None and not self._reload_task.done():
            log.warning("SIGHUP ignored: a model reload is already running")
            return
        self._reload_task = asyncio.create_task(self._reload_model(), name="model-reload")

    def _reload_problem(self, new: Policy) -> str | None:
        """Why ``new`` cannot replace the running policy without a restart (None: it can).

        Everything built around the policy at start must stay valid: the feature pipeline and its warm-up,
        the decision cadence, the timeframe, and the action space the operator files name."""
        old, meta = self.policy.meta, new.meta
        if meta.timeframe != self.settings.timeframe:
            return f"built for {meta.timeframe} bars, the daemon trades {self.settings.timeframe}"
        for what, a, b in (("feature set", old.feature_set_name, meta.feature_set_name),
                           ("decision cadence", (old.decision_every_bars, old.decision_hour_utc),
                            (meta.decision_every_bars, meta.decision_hour_utc)),
                           ("action targets", old.action_targets, meta.action_targets),
                           ("action names", old.action_meanings, meta.action_meanings)):
            if a != b:
                return f"its {what} differs ({a} -> {b}): restart the daemon to switch"
        return None

    async def _reload_model(self) -> None:
        """Tell systemd a reload is under way (``RELOADING=1`` ... ``READY=1``) around :meth:`_swap_model`."""
        self.notifier.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            await self._swap_model()
        finally:
            self.notifier.notify("READY=1")
            self.notify_status()

    async def _swap_model(self) -> None:
        """Load and warm the new model in a worker thread, then swap it in on the loop thread.

        The engine's step is synchronous on this thread, so the assignment below lands between two candles:
        every decision is made wholly by the old model or wholly by the new one.  A model that cannot be
        swapped safely is refused and the running one keeps trading."""
        s = self.settings
        path: Path | None = None
        try:
            resolved, source = await asyncio.to_thread(resolve_model, s)
            path = resolved
            new = await asyncio.to_thread(Policy.load, resolved)
            problem = self._reload_problem(new)
            if problem is None and new.meta.version == self.policy.meta.version:
                log.info("SIGHUP: the model is unchanged", version=new.meta.version, path=str(path))
                return
            if problem is None:
                await asyncio.to_thread(new.warmup, s.model_warmup_runs)
        except (ConfigError, ModelError) as e:
            problem = str(e)
        if problem is not None:
            log.error("model reload refused; the running model keeps trading", problem=problem,
                      version=self.policy.meta.version)
            self.files.note(int(time.time() * 1000), "MODEL_RELOAD_REFUSED", {
                "running": self.policy.meta.version, "path": None if path is None else str(path), "problem": problem})
            return
        # ---- the swap: no await from here to the end, so no candle is stepped in between ----
        previous = self.policy.meta.version
        self.policy = self.engine.policy = new
        self.model_source = source
        after = self.engine.last_candle_ts
        self.files.note(int(time.time() * 1000), "MODEL_RELOADED", {
            "version": new.meta.version, "previous": previous, "source": source, "path": str(path),
            "after_candle": None if after is None else iso_ms(after)})
        self.store.set_meta("model_version", new.meta.version)
        log.warning("model reloaded", version=new.meta.version, previous=previous, source=source,
                    after_candle=None if after is None else iso_ms(after))

    def _on_signal(self, sig: int) -> None:
        log.info("signal received", signal=signal.Signals(sig).name)
        self.stop_event.set()

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.client is not None:
            await self.client.close()
        if hasattr(self, "store"):
            try:
                self.store.close()
            except Exception as e:  # pragma: no cover - best effort at exit
                log.error("closing the store failed", error=repr(e))
        if hasattr(self, "files"):
            self.files.close()

    # ---- figures for /metrics -----------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        eng = self.engine
        pf = eng.portfolio
        lim = self.settings.risk
        equity = pf.equity
        pos = pf.position
        lev = pf.leverage if equity > 0 else 0.0
        max_notional = float(equity) * lim.max_position_frac
        decided = eng.decisions
        return {
            "portfolio": {
                "equity": float(equity), "cash": float(pf.cash), "initial_equity": float(pf.initial_equity),
                "daily_pnl": float(pf.daily_pnl), "drawdown": round(pf.drawdown, 6),
                "peak_equity": float(pf.peak_equity), "realized_pnl": float(pf.realized_pnl),
                "unrealized_pnl": float(pf.unrealized_pnl), "fees_paid": float(pf.fees_paid),
                "positions": [] if pos.qty == 0 else [{
                    "symbol": pos.symbol, "qty": float(pos.qty), "side": "long" if pos.qty > 0 else "short",
                    "entry_price": float(pos.entry_price), "mark_price": float(pf.mark_price),
                    "notional": float(pf.notional), "unrealized_pnl": float(pf.unrealized_pnl)}],
                "fills": pf.fills,
            },
            "trading": {"mode": self.settings.mode, "state": eng.state.value, "state_reason": eng.state_reason,
                        "symbol": self.settings.symbol, "timeframe": self.settings.timeframe,
                        "orders": eng.orders_sent, "open_orders": len(eng.broker.open_orders())},
            "model": {"version": self.policy.meta.version, "kind": self.policy.meta.kind, "source": self.model_source,
                      "decisions": decided,
                      "avg_confidence": round(self.confidence_sum / decided, 6) if decided else 0.0,
                      "confidence_threshold": self.settings.confidence_threshold,
                      "inference_us": self.inference.summary()},
            "risk": {
                "limits": {"max_position_pct": lim.max_position_frac * 100, "max_leverage": lim.max_leverage,
                           "daily_loss_limit_pct": lim.daily_loss_limit_frac * 100,
                           "max_drawdown_pct": lim.max_drawdown_frac * 100,
                           "max_orders_per_minute": lim.max_orders_per_minute,
                           "max_data_age_bars": lim.max_data_age_bars},
                "usage": {"position": round(float(pf.notional) / max_notional, 6) if max_notional > 0 else 0.0,
                          "leverage": round(lev / lim.max_leverage, 6),
                          "daily_loss": round(pf.daily_loss / lim.daily_loss_limit_frac, 6),
                          "drawdown": round(pf.drawdown / lim.max_drawdown_frac, 6)},
                "alerts": self.store.count("risk_alerts"),
            },
            "market": {"symbol": self.settings.symbol,
                       "last_candle": None if self.last_candle is None else {
                           "time": iso_ms(self.last_candle.ts), "close": self.last_candle.close},
                       "candles_in": self.candles_in, "candles_processed": self.candles_processed,
                       "rejected_candles": sum(self.rejected.values()),
                       "rejected_by_reason": dict(self.rejected), "gaps": self.validator.gaps,
                       "feed": self._open_feed().describe()},
            "exchange": None if self.live is None else {
                "broker": self.live.describe(),
                "reconciliation": {"runs": self.reconcile_stats["runs"],
                                   "mismatches": {k: v for k, v in self.reconcile_stats.items()
                                                  if k in MISMATCH_KINDS},
                                   "errors": self.reconcile_stats["errors"],
                                   "skipped_in_flight": self.reconcile_stats["skipped_in_flight"],
                                   "last_run_age_s": None if self.last_reconcile_wall is None else
                                   round(time.time() - self.last_reconcile_wall, 3)}},
            "system": {"version": __version__, "pid": os.getpid(), "uptime_s": round(time.time() -
                                                                                     self.started_wall, 3),
                       "rss_mb": round(rss_mb(), 2), "queue_depth": self._queue.qsize(),
                       "tick_to_order_us": self.latency.summary(), "db_commits": self.store.commits,
                       "ready": self.ready, "watchdog": watchdog_interval_s() is not None},
        }

    def scrape_view(self) -> ScrapeView:
        """The histograms and clocks Prometheus reads beyond :meth:`metrics`, as they are at this moment."""
        sym = {"symbol": self.settings.symbol}
        latency = [
            LatencySeries("alphapulse_tick_to_order_seconds", "Candle in to its step (decision, risk, order) "
                          "durably committed, per candle", sym, self.latency),
            LatencySeries("alphapulse_inference_seconds", "ONNX policy inference, per decision", sym, self.inference),
        ]
        if self.live is not None:
            latency += [
                LatencySeries("alphapulse_decision_to_ack_seconds", "Engine submit to the exchange's answer, first "
                              "leg of each order", sym, self.live.decision_to_ack),
                LatencySeries("alphapulse_decision_to_last_ack_seconds", "Engine submit to the exchange's answer "
                              "for the last leg of an order", sym, self.live.decision_to_last_ack),
            ]
        exchange = None
        if self.client is not None:
            c = self.client
            latency.append(LatencySeries("alphapulse_exchange_request_seconds", "One REST request to the "
                                         "exchange, sent to answered or failed", {}, c.latency))
            exchange = ExchangeRequests(c.requests, c.errors, c.retries, c.rate_limited)
        last = self.last_candle
        age: dict[str, float] = {}
        feed = self._open_feed()
        if last is not None and not feed.finished:
            bar = self.settings.bar_ms
            now = feed.now_ms()
            close = last.ts + bar
            age[self.settings.symbol] = max(0, (now if now is not None else close) - close) / bar
        return ScrapeView(latency=latency, data_age_bars=age,
                          last_candle_s={} if last is None else {self.settings.symbol: last.ts / 1000},
                          bar_seconds=self.settings.bar_ms / 1000, exchange=exchange)

    def degraded(self) -> str | None:
        """Why the daemon cannot trade safely although every task is alive (a silent market-data stream):
        /health says 503, the watchdog keeps pinging (a restart would not bring the stream back sooner)."""
        info = self._open_feed().describe()
        if info.get("stalled"):
            return (f"market data stream silent for {info.get('last_message_age_s')}s; bars come from REST polling "
                    "while it reconnects, and a bar that arrives late is too stale to trade on")
        return None

    def health(self) -> tuple[int, dict[str, Any]]:
        problem = self.health_problem() or self.degraded()
        comps = {n: {"state": c.state, "last_progress_age_s": round(c.age_s(), 3)} for n, c in self.components.items()}
        finished = self._open_feed().finished
        comps["feed"]["finished"] = finished
        body = {
            "status": "stalled" if problem else ("finished" if finished else "ok"),
            "problem": problem,
            "mode": self.settings.mode,
            "trading_state": self.engine.state.value,
            "components": comps,
            "last_candle": None if self.last_candle is None else iso_ms(self.last_candle.ts),
            "equity": float(self.engine.portfolio.equity),
        }
        return (503 if problem else 200), body

