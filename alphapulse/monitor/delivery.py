"""Delivery of the monitor's alerts to people: webhooks (generic JSON, Slack), Telegram and e-mail.

The services are spoken to through apprise, a maintained notification library, not hand-written clients;
this module adds what an alerting pipeline needs around it:

* :meth:`Dispatcher.submit` never blocks: it only queues. One asyncio task per channel and lane sends, each
  apprise call in a worker thread (apprise is synchronous: requests and smtplib), so a slow SMTP server or
  a hanging webhook never stalls the monitor's event loop.
* **P1 goes out at once.** P1 alerts have their own lane (task and apprise plugin instance) per channel:
  they skip the rate limit and quiet hours and never wait behind a P2–P4 message that is backing off.
* **Retries**: a failed send is retried up to ``max_attempts`` in all, after ``backoff_s``, 2×, 4×, …
  capped at ``backoff_max_s``; then it is counted ``failed`` and logged (channel and alert ids, never the
  URL or token).
* **Rate limit** per channel: a token bucket of ``rate_limit_per_minute`` messages (burst as large, refilled
  evenly). Alerts beyond it are **coalesced, not dropped**: when the next token is due, everything waiting
  goes out as ONE summary message listing each alert. ``rate_limited`` counts alerts that were delayed or
  folded into such a summary. A P1 takes a token when one is free but never waits for one.
* **Quiet hours** (a daily window in a configured time zone): P3–P4 alerts are **held** and sent as one
  digest when the window ends (``action: hold``, the default), or only counted (``action: drop``).
  ``suppressed_quiet`` counts them either way. P1 and P2 always go out.
* :meth:`Dispatcher.close` drains with a bound (``drain_timeout_s``): what waits for the rate limit goes out
  as one final summary; alerts still held for quiet hours, or unsent when the bound runs out, are counted
  ``dropped`` and logged. The clock (wall time for quiet hours, monotonic time for the rate limit) is
  injectable, so tests can cross a window without waiting for it.

Pointing a channel at another host (a Slack-compatible receiver, a self-hosted Telegram Bot API server, a
local fake in tests) sets one attribute of the apprise plugin instance, the one apprise itself reads for
the service's base URL (``NotifySlack.webhook_url``, ``NotifyTelegram.notify_url``); see
:mod:`alphapulse.monitor.delivery_config`.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import apprise

from alphapulse.log import get_logger, register_secrets
from alphapulse.monitor.delivery_config import (
    EVENTS,
    QUIET_SEVERITIES,
    ChannelConfig,
    DeliveryConfig,
    QuietHours,
)
from alphapulse.monitor.delivery_format import Entry, format_alert, format_summary, notify_type, severity_of

__all__ = ["Clock", "DeliveryConfig", "Dispatcher", "SystemClock", "build_dispatcher", "make_plugin"]

log = get_logger("alphapulse.monitor.delivery")

STAT_KEYS = ("sent", "failed", "retried", "rate_limited", "suppressed_quiet", "dropped")


class Clock(Protocol):
    """Wall time for quiet hours, monotonic time for the rate limit; tests pass a settable one."""

    def now(self) -> datetime: ...

    def monotonic(self) -> float: ...


class SystemClock:
    """The real clocks."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


def make_plugin(ch: ChannelConfig, timeout_s: float) -> Any:
    """A fresh apprise plugin for ``ch`` with its host overrides and timeouts; raises on a URL apprise rejects.

    apprise's own per-plugin throttle (``request_rate_per_sec``: 5.5 s between two e-mails, 1.2 s for Slack,
    spent sleeping in the sending thread) is turned off: the dispatcher's rate limit paces each channel.
    No persistent storage: apprise keeps nothing on disk.
    """
    asset = apprise.AppriseAsset(storage_mode="memory")
    plugin = apprise.Apprise.instantiate(ch.url, asset=asset, suppress_exceptions=False)
    if plugin is None:
        return None
    for attr, value in ch.overrides:
        if not hasattr(plugin, attr):  # a newer apprise renamed it: fail loudly at start, never send elsewhere
            raise AttributeError(f"apprise {type(plugin).__name__} has no attribute {attr}")
        setattr(plugin, attr, value)
    plugin.request_rate_per_sec = 0
    plugin.socket_connect_timeout = timeout_s
    plugin.socket_read_timeout = timeout_s
    return plugin


class TokenBucket:
    """``per_minute`` tokens, refilled evenly, at most ``per_minute`` banked; 0 means unlimited."""

    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.tokens = float(per_minute)
        self.last = now

    def _refill(self, now: float) -> None:
        if now > self.last:
            self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = max(self.last, now)

    def available(self, now: float) -> float:
        if self.capacity == 0:
            return float("inf")
        self._refill(now)
        return self.tokens

    def take(self, now: float) -> bool:
        """Take a token if one is there."""
        if self.capacity == 0:
            return True
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def seconds_until_token(self, now: float) -> float:
        if self.capacity == 0:
            return 0.0
        self._refill(now)
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate


@dataclass
class _Message:
    """Alerts that will go out as one notification (one alert, or a quiet-hours digest)."""

    entries: list[Entry]
    reason: str = ""
    limited: bool = False  # already counted in rate_limited


@dataclass
class _Channel:
    """Runtime state of one channel: two lanes, the held and waiting alerts, the counters."""

    cfg: ChannelConfig
    bucket: TokenBucket
    urgent_sender: Any
    normal_sender: Any
    inbox: collections.deque[Entry] = field(default_factory=collections.deque)
    urgent: collections.deque[Entry] = field(default_factory=collections.deque)
    pending: collections.deque[_Message] = field(default_factory=collections.deque)
    held: list[Entry] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    wake_urgent: asyncio.Event = field(default_factory=asyncio.Event)
    stats: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STAT_KEYS, 0))

    def queued(self) -> int:
        return len(self.inbox) + len(self.urgent) + sum(len(m.entries) for m in self.pending)


class Dispatcher:
    """Queues alert events and delivers them per channel under the rules in the module docstring."""

    def __init__(self, cfg: DeliveryConfig, *, clock: Clock | None = None, tick_s: float = 1.0) -> None:
        self.cfg = cfg
        self.clock: Clock = clock or SystemClock()
        self.tick_s = tick_s
        now = self.clock.monotonic()
        self._channels = [
            _Channel(cfg=ch, bucket=TokenBucket(cfg.rate_limit_per_minute, now),
                     urgent_sender=make_plugin(ch, cfg.timeout_s), normal_sender=make_plugin(ch, cfg.timeout_s))
            for ch in cfg.channels
        ]
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._closing = False
        self._closing_event = asyncio.Event()  # binds to the loop at its first wait (Python >= 3.10)
        self._closed = False
        self._drain_deadline = float("inf")  # loop time

    # -- the monitor's side ---------------------------------------------------------------------------------

    def submit(self, event: str, alert: Mapping[str, Any]) -> None:
        """Queue ``event`` (opened, escalated, resolved, acknowledged) of ``alert`` for every channel that takes it.

        Never blocks and never sends. Safe from another thread once started. A bad event or severity is the
        caller's bug and raises ValueError; a full queue or a closed dispatcher drops (counted ``dropped``).
        """
        if event not in EVENTS:
            raise ValueError(f"event must be one of {', '.join(EVENTS)}, got {event!r}")
        severity = severity_of(alert)
        entry: Entry = (event, dict(alert))
        loop = self._loop
        if loop is not None and threading.get_ident() != self._loop_thread and not loop.is_closed():
            loop.call_soon_threadsafe(self._enqueue, entry, severity)
        else:
            self._enqueue(entry, severity)

    def _enqueue(self, entry: Entry, severity: str) -> None:
        for ch in self._channels:
            if not ch.cfg.accepts(entry[0], severity):
                continue
            if self._closing or ch.queued() + len(ch.held) >= self.cfg.queue_size:
                ch.stats["dropped"] += 1
                if ch.stats["dropped"] % 100 == 1:  # the first, then every 100th: a flood must not flood the log
                    log.warning("alert_delivery_dropped", channel=ch.cfg.kind, alert_id=entry[1].get("id"),
                                reason="closing" if self._closing else "queue full", dropped=ch.stats["dropped"])
                continue
            if severity == "P1":
                ch.urgent.append(entry)
                ch.wake_urgent.set()
            else:
                ch.inbox.append(entry)
                ch.wake.set()

    async def start(self) -> None:
        """Start one task per channel and lane; alerts submitted before are sent now."""
        if self._tasks:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        for ch in self._channels:
            # Events made before the loop ran belong to no loop yet; fresh ones, and a wake for what is queued.
            ch.wake, ch.wake_urgent = asyncio.Event(), asyncio.Event()
            ch.wake.set()
            ch.wake_urgent.set()
            self._tasks.append(asyncio.create_task(self._run_urgent(ch), name=f"delivery-{ch.cfg.kind}-p1"))
            self._tasks.append(asyncio.create_task(self._run_normal(ch), name=f"delivery-{ch.cfg.kind}"))
        log.info("alert_delivery_started", channels=[f"{c.cfg.kind}->{c.cfg.target}" for c in self._channels],
                 rate_limit_per_minute=self.cfg.rate_limit_per_minute,
                 quiet_hours=self.cfg.quiet_hours.describe() if self.cfg.quiet_hours else None)

    async def close(self) -> None:
        """Stop taking alerts, send what is queued within ``drain_timeout_s``, count the rest as dropped."""
        if self._closed:
            return
        self._closed = True
        self._closing = True
        self._closing_event.set()
        loop = asyncio.get_running_loop()
        self._drain_deadline = loop.time() + self.cfg.drain_timeout_s
        for ch in self._channels:
            ch.wake.set()
            ch.wake_urgent.set()
        if self._tasks:
            done, not_done = await asyncio.wait(self._tasks, timeout=self.cfg.drain_timeout_s + 0.5)
            for task in not_done:
                task.cancel()
            if not_done:
                await asyncio.wait(not_done, timeout=1.0)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    log.error("alert_delivery_task_failed", task=task.get_name(), exc_info=task.exception())
        for ch in self._channels:
            lost = ch.queued() + len(ch.held)
            if lost:
                ch.stats["dropped"] += lost
                log.warning("alert_delivery_unsent_at_close", channel=ch.cfg.kind, alerts=lost,
                            held_for_quiet_hours=len(ch.held))
            ch.inbox.clear()
            ch.urgent.clear()
            ch.pending.clear()
            ch.held.clear()
        self._tasks.clear()

    def stats(self) -> dict[str, dict[str, int]]:
        """Per channel: sent / failed / retried (messages), rate_limited / suppressed_quiet / dropped (alerts),
        and now queued and held (alerts), for the monitor's /metrics."""
        return {ch.cfg.kind: dict(ch.stats, queued=ch.queued(), held=len(ch.held)) for ch in self._channels}

    # -- the lanes ------------------------------------------------------------------------------------------

    async def _run_urgent(self, ch: _Channel) -> None:
        """P1: send each at once, in order, with retries; a free rate-limit token is taken, none awaited."""
        while True:
            ch.wake_urgent.clear()
            while ch.urgent:
                entry = ch.urgent.popleft()
                ch.bucket.take(self.clock.monotonic())
                await self._guarded(ch, self._deliver(ch, ch.urgent_sender, [_Message([entry])]))
            if self._closing:
                return
            await ch.wake_urgent.wait()

    async def _run_normal(self, ch: _Channel) -> None:
        """P2–P4: quiet hours, then the rate limit (coalescing), then send with retries."""
        while True:
            ch.wake.clear()
            self._absorb(ch)
            await self._guarded(ch, self._send_due(ch))
            if self._closing and not ch.inbox and not ch.pending:
                return
            timeout = self.tick_s
            if ch.pending:
                timeout = min(timeout, max(0.01, ch.bucket.seconds_until_token(self.clock.monotonic())))
            try:
                await asyncio.wait_for(ch.wake.wait(), timeout)
            except TimeoutError:
                pass

    async def _guarded(self, ch: _Channel, step: Awaitable[None]) -> None:
        """Run one step of a lane; a bug in it is logged and costs that message, never the lane itself
        (an alerting path that dies quietly is the worst way for it to fail)."""
        try:
            await step
        except Exception:
            ch.stats["failed"] += 1
            log.exception("alert_delivery_lane_error", channel=ch.cfg.kind)
            await asyncio.sleep(self.tick_s)

    def _absorb(self, ch: _Channel) -> None:
        """Release the held digest once the window is over, then move new alerts to held or waiting.

        The digest goes first so that an alert's "resolved", arriving after the window, never overtakes its
        held "opened".
        """
        quiet: QuietHours | None = self.cfg.quiet_hours
        in_window = quiet is not None and quiet.active(self.clock.now())
        if ch.held and not in_window:
            assert quiet is not None
            digest = _Message(ch.held, reason=f"held during quiet hours {quiet.describe()}")
            ch.held = []
            if ch.bucket.available(self.clock.monotonic()) < 1.0:
                digest.limited = True
                ch.stats["rate_limited"] += len(digest.entries)
            ch.pending.append(digest)
        while ch.inbox:
            entry = ch.inbox.popleft()
            if in_window and severity_of(entry[1]) in QUIET_SEVERITIES:
                ch.stats["suppressed_quiet"] += 1
                if quiet is not None and quiet.action == "hold":
                    ch.held.append(entry)
                continue
            msg = _Message([entry])
            if ch.bucket.available(self.clock.monotonic()) < 1.0:
                msg.limited = True
                ch.stats["rate_limited"] += 1
            ch.pending.append(msg)

    async def _send_due(self, ch: _Channel) -> None:
        """Send while tokens last; with the last token (or at close) everything waiting goes as one summary."""
        while ch.pending:
            now = self.clock.monotonic()
            if not ch.bucket.take(now) and not self._closing:
                return
            if len(ch.pending) > 1 and (self._closing or ch.bucket.available(now) < 1.0):
                batch = list(ch.pending)
                ch.pending.clear()
                for m in batch:
                    if not m.limited:
                        m.limited = True
                        ch.stats["rate_limited"] += len(m.entries)
            else:
                batch = [ch.pending.popleft()]
            await self._deliver(ch, ch.normal_sender, batch)

    async def _deliver(self, ch: _Channel, sender: Any, batch: list[_Message]) -> None:
        """Send ``batch`` as one notification, retrying with exponential back-off, within the drain bound."""
        entries = [e for m in batch for e in m.entries]
        if len(entries) == 1 and not batch[0].reason:
            title, body = format_alert(*entries[0])
        else:
            reasons = sorted({m.reason for m in batch if m.reason})
            if len(batch) > 1 or not reasons:
                reasons.insert(0, "rate limit summary")
            title, body = format_summary(entries, "; ".join(reasons))
        kind = notify_type(entries)
        ids = [al.get("id") for _, al in entries]
        loop = asyncio.get_running_loop()
        attempt = 0
        try:
            for attempt in range(1, self.cfg.max_attempts + 1):
                if await asyncio.to_thread(_send, sender, title, body, kind):
                    ch.stats["sent"] += 1
                    log.info("alert_delivered", channel=ch.cfg.kind, alert_ids=ids, attempt=attempt)
                    return
                if attempt == self.cfg.max_attempts:
                    break
                delay = min(self.cfg.backoff_s * 2 ** (attempt - 1), self.cfg.backoff_max_s)
                if self._closing and loop.time() + delay > self._drain_deadline:
                    break
                ch.stats["retried"] += 1
                log.warning("alert_delivery_retry", channel=ch.cfg.kind, alert_ids=ids, attempt=attempt,
                            retry_in_s=delay)
                # close() cuts a back-off short: the drain is the message's last chance, so it tries at once.
                try:
                    await asyncio.wait_for(self._closing_event.wait(), delay)
                except TimeoutError:
                    pass
        except asyncio.CancelledError:  # close() ran out of time while this send hung
            ch.stats["dropped"] += len(entries)
            log.warning("alert_delivery_unsent_at_close", channel=ch.cfg.kind, alert_ids=ids)
            raise
        ch.stats["failed"] += 1
        log.error("alert_delivery_failed", channel=ch.cfg.kind, target=ch.cfg.target, alert_ids=ids,
                  attempts=attempt)


def _send(plugin: Any, title: str, body: str, kind: str) -> bool:
    """One apprise send, in a worker thread; any exception is a failed attempt."""
    try:
        return bool(plugin.notify(body=body, title=title, notify_type=apprise.NotifyType(kind),
                                  body_format=apprise.NotifyFormat.TEXT))
    except Exception as e:  # apprise plugins may raise from requests/smtplib; never kill the lane
        log.warning("alert_delivery_error", error=type(e).__name__)
        return False


def build_dispatcher(cfg: DeliveryConfig, *, clock: Clock | None = None, tick_s: float = 1.0) -> Dispatcher:
    """The dispatcher for ``cfg``, with its secrets registered for log redaction first.

    Start-up work, synchronous like :meth:`DeliveryConfig.from_mapping` (apprise builds its plugins; the
    first use loads its plugin table, about half a second): call it before serving, not per alert.
    """
    register_secrets(cfg.secrets())
    return Dispatcher(cfg, clock=clock, tick_s=tick_s)
