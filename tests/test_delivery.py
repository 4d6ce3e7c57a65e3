"""Alert delivery (alphapulse/monitor/delivery.py) against real local receivers on 127.0.0.1.

Every channel is sent through apprise for real: an aiohttp server plays the generic JSON webhook, the Slack
incoming webhook and the Telegram Bot API (recording each request, failing on demand), and an aiosmtpd
server receives the e-mail (with SMTP AUTH). Ports are ephemeral, nothing leaves 127.0.0.1, and every wait
is bounded. Quiet hours and the rate limit run on an injected clock, so crossing a window or refilling a
token does not cost real minutes.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from alphapulse import log
from alphapulse.config import EX_CONFIG, ConfigError, load_settings
from alphapulse.monitor.delivery import DeliveryConfig, Dispatcher, build_dispatcher
from alphapulse.monitor.delivery_config import DELIVERY_ENV, QuietHours

REPO = Path(__file__).resolve().parent.parent
SRC = "monitoring.yaml"
TG_TOKEN = "123456789:AAFakeToken_for-tests"
SLACK_TOKENS = "T0001/B0002/SlackSecret0003"
WAIT_S = 5.0


# ------------------------------------------------------------------------------------------------------------
# Local receivers and helpers
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_proxy_for_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """apprise sends with requests, which honours HTTP(S)_PROXY: keep a CI proxy away from 127.0.0.1."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@dataclass
class Receiver:
    """One aiohttp server on 127.0.0.1 playing a JSON webhook, a Slack webhook and the Telegram Bot API."""

    port: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    fail_next: int = 0  # answer 500 to this many requests first
    fail_if: Callable[[str], bool] | None = None  # answer 500 to requests whose body matches
    hang_s: float = 0.0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.text()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw
        self.requests.append({"path": request.path, "method": request.method, "body": body, "raw": raw,
                              "at": time.monotonic()})
        if self.hang_s:
            await asyncio.sleep(self.hang_s)
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.json_response({"ok": False, "description": "induced failure"}, status=500)
        if self.fail_if is not None and self.fail_if(raw):
            return web.json_response({"ok": False, "description": "induced failure"}, status=500)
        if request.path.startswith("/services/"):
            return web.Response(text="ok")  # Slack answers a webhook with the bare text "ok"
        if request.path.startswith("/bot"):
            return web.json_response({"ok": True, "result": {"message_id": len(self.requests)}})
        return web.json_response({"received": True})


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    rec.port = runner.addresses[0][1]
    yield rec
    await runner.cleanup()


class MailBox:
    """aiosmtpd handler: keeps every message it accepts."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], email.message.EmailMessage]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), msg))
        return "250 OK"


class Authenticator:
    """Accepts exactly one login; records every attempt."""

    def __init__(self, user: str, password: str) -> None:
        self.user, self.password = user, password
        self.attempts: list[tuple[str, str]] = []

    def __call__(self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        user, pw = auth_data.login.decode(), auth_data.password.decode()
        self.attempts.append((user, pw))
        return AuthResult(success=(user, pw) == (self.user, self.password))


class FakeClock:
    """Settable wall and monotonic time, advanced together."""

    def __init__(self, wall: datetime) -> None:
        self.wall = wall
        self.mono = 1000.0

    def now(self) -> datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += timedelta(seconds=seconds)
        self.mono += seconds


def alert(rule: str, severity: str, message: str = "", **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": kw.pop("id", abs(hash(rule)) % 10_000), "rule": rule, "severity": severity, "state": "open",
        "message": message or f"{rule} breached", "value": 12.5, "threshold": 12.0,
        "opened_at": 1_764_612_000.0, "updated_at": 1_764_612_060.0, "acknowledged_at": None,
        "resolved_at": None, "count": 1,
    }
    base.update(kw)
    return base


async def wait_for(pred: Callable[[], bool], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)


def cfg(channels: dict[str, Any], environ: dict[str, str] | None = None, **top: Any) -> DeliveryConfig:
    data: dict[str, Any] = {"backoff_s": 0.05, "backoff_max_s": 0.2, "timeout_s": 3, "drain_timeout_s": 3}
    data.update(top)
    data.update(channels)
    return DeliveryConfig.from_mapping(data, SRC, environ=environ or {})


def webhook(rec: Receiver, **kw: Any) -> dict[str, Any]:
    return {"webhook": {"enabled": True, "url": f"{rec.base}/hook?team=ops", **kw}}


async def started(c: DeliveryConfig, clock: FakeClock | None = None) -> Dispatcher:
    d = build_dispatcher(c, clock=clock, tick_s=0.05)
    await d.start()
    return d


# ------------------------------------------------------------------------------------------------------------
# Each channel delivers the content
# ------------------------------------------------------------------------------------------------------------


async def test_json_webhook_receives_severity_rule_and_message(receiver: Receiver) -> None:
    d = await started(cfg(webhook(receiver)))
    d.submit("opened", alert("drawdown_pct", "P2", "drawdown 12.5% from peak", id=7))
    await wait_for(lambda: len(receiver.requests) == 1)
    await d.close()
    req = receiver.requests[0]
    assert req["path"] == "/hook" and req["method"] == "POST"
    body = req["body"]
    assert body["title"].startswith("[P2] OPENED drawdown_pct")
    assert "drawdown 12.5% from peak" in body["message"]
    assert "value: 12.5  threshold: 12.0" in body["message"]
    assert "alert id: 7" in body["message"]
    assert "opened: 2025-12-01 18:00:00 UTC" in body["message"]
    assert body["type"] == "failure"
    assert d.stats()["webhook"] == {"sent": 1, "failed": 0, "retried": 0, "rate_limited": 0, "suppressed_quiet": 0,
                                    "dropped": 0, "queued": 0, "held": 0}


async def test_json_webhook_keeps_the_query_string_and_marks_resolved_as_success(receiver: Receiver) -> None:
    d = await started(cfg(webhook(receiver)))
    d.submit("resolved", alert("cpu_pct", "P3", resolved_at="2026-12-01T10:00:00Z"))
    await wait_for(lambda: len(receiver.requests) == 1)
    await d.close()
    assert receiver.requests[0]["body"]["type"] == "success"
    assert "resolved: 2026-12-01T10:00:00Z" in receiver.requests[0]["body"]["message"]
    # apprise forwards the target URL's own query parameter (written "-team=ops" in its URL form)
    assert receiver.requests[0]["path"] == "/hook"


async def test_slack_webhook_url_pointed_at_a_local_receiver(receiver: Receiver) -> None:
    url = f"{receiver.base}/services/{SLACK_TOKENS}"
    d = await started(cfg({"slack": {"enabled": True, "url": url}}))
    d.submit("escalated", alert("daily_loss_pct", "P2", "daily loss 3.1% < limit? no: > 3.0%"))
    await wait_for(lambda: len(receiver.requests) == 1)
    await d.close()
    req = receiver.requests[0]
    assert req["path"] == f"/services/{SLACK_TOKENS}"
    att = req["body"]["attachments"][0]
    assert att["title"].startswith("[P2] ESCALATED daily_loss_pct")
    # Slack escapes <, > and & itself; apprise did it for us from plain text
    assert "daily loss 3.1% &lt; limit? no: &gt; 3.0%" in att["text"]
    assert "icon_url" not in req["body"]  # image=no: nothing fetched from elsewhere
    assert d.stats()["slack"]["sent"] == 1


async def test_slack_url_from_the_environment(receiver: Receiver) -> None:
    env = {"ALPHAPULSE_SLACK_WEBHOOK_URL": f"{receiver.base}/services/{SLACK_TOKENS}"}
    c = cfg({"slack": {"enabled": True}}, environ=env)
    d = await started(c)
    d.submit("opened", alert("memory_pct", "P3"))
    await wait_for(lambda: len(receiver.requests) == 1)
    await d.close()
    assert receiver.requests[0]["path"] == f"/services/{SLACK_TOKENS}"
    assert "SlackSecret0003" not in repr(c)


async def test_telegram_through_a_configurable_bot_api_base(receiver: Receiver, tmp_path: Path) -> None:
    log.configure_logging(tmp_path, level="DEBUG", console=False)
    try:
        c = cfg({"telegram": {"enabled": True, "chat_id": -1001234567890, "api_url": receiver.base}},
                environ={"ALPHAPULSE_TELEGRAM_TOKEN": TG_TOKEN})
        receiver.fail_next = 1  # one failure makes apprise and us log a warning: it must not carry the token
        d = await started(c)
        d.submit("opened", alert("daemon_down", "P1", "daemon /health unreachable <3 scrapes>"))
        await wait_for(lambda: len(receiver.requests) == 2)
        await d.close()
    finally:
        log.close_logging()
    req = receiver.requests[1]
    assert req["path"] == f"/bot{TG_TOKEN}/sendMessage"
    assert req["body"]["chat_id"] == -1001234567890
    text = req["body"]["text"]
    assert "[P1] OPENED daemon_down" in text
    assert "daemon /health unreachable &lt;3 scrapes&gt;" in text  # HTML parse mode, escaped by apprise
    assert d.stats()["telegram"]["sent"] == 1 and d.stats()["telegram"]["retried"] == 1
    logged = "".join(p.read_text() for p in tmp_path.glob("*.log"))
    assert "alert_delivery_retry" in logged
    assert TG_TOKEN not in logged and TG_TOKEN.split(":")[1] not in logged
    assert TG_TOKEN not in repr(c)


async def test_email_through_aiosmtpd_with_auth_password_from_the_environment() -> None:
    password = "p@ss:w/rd%&?=x"
    box = MailBox()
    auth = Authenticator("monitor", password)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(box, authenticator=auth, auth_require_tls=False, hostname="fake-smtp"), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        c = cfg({"email": {"enabled": True, "host": "127.0.0.1", "port": port, "security": "none",
                           "username": "monitor", "from": "alphapulse@example.org",
                           "to": ["ops@example.org", "oncall@example.org"]}},
                environ={"ALPHAPULSE_SMTP_PASSWORD": password})
        d = await started(c)
        d.submit("opened", alert("stale_data", "P3", "last candle 3 bars old"))
        await wait_for(lambda: len(box.messages) == 2)  # apprise mails each recipient on its own
        await d.close()
    finally:
        server.close()
        await server.wait_closed()
    assert auth.attempts == [("monitor", password)]  # one SMTP session, logged in with the exact password
    assert sorted(r for _, rcpt, _ in box.messages for r in rcpt) == ["oncall@example.org", "ops@example.org"]
    for mail_from, _rcpt, msg in box.messages:
        assert mail_from == "alphapulse@example.org"
        assert str(msg["Subject"]).startswith("[P3] OPENED stale_data")
        body = msg.get_body(("plain",))
        assert body is not None and "last candle 3 bars old" in body.get_content()
    assert d.stats()["email"]["sent"] == 1
    assert password not in repr(c) and password in c.secrets()


# ------------------------------------------------------------------------------------------------------------
# Retries, rate limit, P1, quiet hours
# ------------------------------------------------------------------------------------------------------------


async def test_starttls_is_never_downgraded_to_plain_text() -> None:
    """security: starttls against a server without STARTTLS fails (counted), it does not send in clear."""
    box = MailBox()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(box, hostname="plain-smtp"), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        c = cfg({"email": {"enabled": True, "host": "127.0.0.1", "port": port, "security": "starttls",
                           "from": "alphapulse@example.org", "to": "ops@example.org"}}, max_attempts=2)
        d = await started(c)
        d.submit("opened", alert("cpu_pct", "P2"))
        await wait_for(lambda: d.stats()["email"]["failed"] == 1)
        await d.close()
    finally:
        server.close()
        await server.wait_closed()
    assert box.messages == []
    assert d.stats()["email"]["retried"] == 1


async def test_queue_bound_drops_and_counts_the_excess(receiver: Receiver) -> None:
    clock = FakeClock(datetime(2026, 12, 1, 12, 0, tzinfo=UTC))
    d = build_dispatcher(cfg(webhook(receiver), queue_size=5, rate_limit_per_minute=1), clock=clock, tick_s=0.05)
    for i in range(8):  # submitted before start: nothing has been taken off the queue yet
        d.submit("opened", alert(f"r{i}", "P3"))
    assert d.stats()["webhook"]["dropped"] == 3 and d.stats()["webhook"]["queued"] == 5
    await d.start()
    await wait_for(lambda: len(receiver.requests) == 1)  # the one token: all five waiting go as one summary
    await d.close()
    assert len(receiver.requests) == 1
    assert receiver.requests[0]["body"]["title"].startswith("[P3] 5 alert events (rate limit summary)")
    assert [ln.split()[2] for ln in receiver.requests[0]["body"]["message"].splitlines()] == [
        "r0:", "r1:", "r2:", "r3:", "r4:"]


async def test_retries_until_the_receiver_recovers(receiver: Receiver) -> None:
    receiver.fail_next = 2
    d = await started(cfg(webhook(receiver), max_attempts=4))
    d.submit("opened", alert("cpu_pct", "P3"))
    await wait_for(lambda: d.stats()["webhook"]["sent"] == 1)
    await d.close()
    assert len(receiver.requests) == 3
    gaps = [b["at"] - a["at"] for a, b in zip(receiver.requests, receiver.requests[1:], strict=False)]
    assert gaps[0] >= 0.04 and gaps[1] >= 0.09  # back-off 0.05 s, then 0.1 s
    s = d.stats()["webhook"]
    assert (s["sent"], s["retried"], s["failed"]) == (1, 2, 0)


async def test_retries_are_bounded_then_counted_failed(receiver: Receiver) -> None:
    receiver.fail_next = 100
    d = await started(cfg(webhook(receiver), max_attempts=3))
    d.submit("opened", alert("cpu_pct", "P3"))
    await wait_for(lambda: d.stats()["webhook"]["failed"] == 1)
    await asyncio.sleep(0.3)  # no fourth attempt comes
    await d.close()
    assert len(receiver.requests) == 3
    s = d.stats()["webhook"]
    assert (s["sent"], s["retried"], s["failed"]) == (0, 2, 1)


async def test_rate_limit_coalesces_the_excess_into_one_summary(receiver: Receiver) -> None:
    clock = FakeClock(datetime(2026, 12, 1, 12, 0, tzinfo=UTC))
    d = await started(cfg(webhook(receiver), rate_limit_per_minute=2), clock)
    for i in range(5):
        d.submit("opened", alert(f"rule_{i}", "P3", id=i))
    await wait_for(lambda: len(receiver.requests) == 2)
    first, summary = (r["body"] for r in receiver.requests)
    assert first["title"].startswith("[P3] OPENED rule_0")
    assert summary["title"] == "[P3] 4 alert events (rate limit summary) (AlphaPulse)"
    assert [line.split()[2].rstrip(":") for line in summary["message"].splitlines()] == [
        "rule_1", "rule_2", "rule_3", "rule_4"]
    assert d.stats()["webhook"]["rate_limited"] == 4

    # The bucket is empty: two more wait (no message) until a token is due, then go as one summary.
    d.submit("opened", alert("rule_5", "P4", id=5))
    d.submit("escalated", alert("rule_6", "P2", id=6))
    await asyncio.sleep(0.4)
    assert len(receiver.requests) == 2 and d.stats()["webhook"]["queued"] == 2
    clock.advance(30)  # one token (2 a minute)
    await wait_for(lambda: len(receiver.requests) == 3)
    last = receiver.requests[2]["body"]
    assert last["title"].startswith("[P2] 2 alert events")  # the most severe sets the summary's severity
    assert "rule_6" in last["message"].splitlines()[0] and "rule_5" in last["message"]
    await d.close()
    s = d.stats()["webhook"]
    assert (s["sent"], s["rate_limited"], s["queued"]) == (3, 6, 0)


async def test_p1_goes_out_at_once_while_rate_limited_and_while_others_back_off(receiver: Receiver) -> None:
    clock = FakeClock(datetime(2026, 12, 1, 12, 0, tzinfo=UTC))
    receiver.fail_if = lambda raw: "rule_slow" in raw  # this one keeps failing, with a long back-off
    c = cfg(webhook(receiver), rate_limit_per_minute=1, backoff_s=5, backoff_max_s=5, max_attempts=2,
            drain_timeout_s=0.5)
    d = await started(c, clock)
    d.submit("opened", alert("rule_slow", "P3"))  # takes the only token, fails, backs off 5 s
    await wait_for(lambda: len(receiver.requests) == 1)
    d.submit("opened", alert("rule_waits", "P2"))  # no token: waits
    t0 = time.monotonic()
    d.submit("opened", alert("daemon_down", "P1", "daemon unreachable"))
    await wait_for(lambda: any("daemon_down" in r["raw"] for r in receiver.requests), timeout=3.0)
    assert time.monotonic() - t0 < 3.0  # well before the P3's 5 s back-off ends
    assert [r["raw"].count("rule_slow") > 0 for r in receiver.requests] == [True, False]
    assert not any("rule_waits" in r["raw"] for r in receiver.requests)
    await d.close()
    assert d.stats()["webhook"]["sent"] >= 1


async def test_quiet_hours_hold_p3_p4_until_the_window_ends_but_not_p1_p2(receiver: Receiver) -> None:
    # 22:00-07:00 in Tokyo (UTC+9, no DST) is 13:00-22:00 UTC; 14:00 UTC is inside.
    clock = FakeClock(datetime(2026, 12, 1, 14, 0, tzinfo=UTC))
    quiet = {"start": "22:00", "end": "07:00", "timezone": "Asia/Tokyo"}
    d = await started(cfg(webhook(receiver), quiet_hours=quiet, rate_limit_per_minute=0), clock)
    for sev in ("P1", "P2", "P3", "P4"):
        d.submit("opened", alert(f"rule_{sev}", sev))
    await wait_for(lambda: len(receiver.requests) == 2)
    await asyncio.sleep(0.4)  # several ticks: P3 and P4 stay held
    titles = sorted(r["body"]["title"] for r in receiver.requests)
    assert titles[0].startswith("[P1] OPENED rule_P1") and titles[1].startswith("[P2] OPENED rule_P2")
    assert len(receiver.requests) == 2
    assert d.stats()["webhook"]["suppressed_quiet"] == 2 and d.stats()["webhook"]["held"] == 2
    d.submit("resolved", alert("rule_P3", "P3"))  # its resolution is held too
    await wait_for(lambda: d.stats()["webhook"]["held"] == 3)
    clock.advance(8 * 3600 + 1800)  # 22:30 UTC = 07:30 Tokyo: the window is over
    await wait_for(lambda: len(receiver.requests) == 3)
    digest = receiver.requests[2]["body"]
    assert digest["title"].startswith("[P3] 3 alert events (held during quiet hours 22:00–07:00 Asia/Tokyo)")
    lines = digest["message"].splitlines()
    assert [ln.split()[:3] for ln in lines] == [["[P3]", "opened", "rule_P3:"], ["[P3]", "resolved", "rule_P3:"],
                                                ["[P4]", "opened", "rule_P4:"]]
    await d.close()
    s = d.stats()["webhook"]
    assert (s["sent"], s["suppressed_quiet"], s["held"], s["dropped"]) == (3, 3, 0, 0)


async def test_quiet_hours_drop_action_only_counts(receiver: Receiver) -> None:
    clock = FakeClock(datetime(2026, 12, 1, 23, 30, tzinfo=UTC))
    quiet = {"start": "23:00", "end": "06:00", "action": "drop"}
    d = await started(cfg(webhook(receiver), quiet_hours=quiet), clock)
    d.submit("opened", alert("cpu_pct", "P4"))
    d.submit("opened", alert("disk_pct", "P2"))
    await wait_for(lambda: len(receiver.requests) == 1)
    clock.advance(7 * 3600)
    await asyncio.sleep(0.4)
    await d.close()
    assert len(receiver.requests) == 1 and "disk_pct" in receiver.requests[0]["raw"]
    s = d.stats()["webhook"]
    assert (s["sent"], s["suppressed_quiet"], s["held"], s["dropped"]) == (1, 1, 0, 0)


def test_quiet_hours_window_bounds_and_time_zone() -> None:
    q = QuietHours(start=datetime(2000, 1, 1, 22, 0).time(), end=datetime(2000, 1, 1, 7, 0).time(),
                   timezone="Europe/Berlin", action="hold")
    utc = lambda *a: datetime(*a, tzinfo=UTC)  # noqa: E731
    assert q.active(utc(2026, 12, 1, 21, 0))       # 22:00 Berlin (UTC+1 in winter): starts
    assert not q.active(utc(2026, 12, 1, 20, 59))  # 21:59 Berlin
    assert q.active(utc(2026, 12, 2, 5, 59))       # 06:59 Berlin
    assert not q.active(utc(2026, 12, 2, 6, 0))    # 07:00 Berlin: over
    assert q.active(utc(2026, 7, 1, 20, 0))        # 22:00 Berlin in summer (UTC+2)
    day = QuietHours(start=datetime(2000, 1, 1, 9, 0).time(), end=datetime(2000, 1, 1, 17, 0).time(),
                     timezone="UTC", action="hold")
    assert day.active(utc(2026, 12, 1, 9, 0)) and not day.active(utc(2026, 12, 1, 17, 0))


async def test_channel_filters_by_min_severity_and_events(receiver: Receiver) -> None:
    d = await started(cfg(webhook(receiver, min_severity="P2", events=["opened", "resolved"])))
    d.submit("opened", alert("p3_rule", "P3"))
    d.submit("acknowledged", alert("ack_rule", "P1"))
    d.submit("resolved", alert("p2_rule", "P2"))
    await wait_for(lambda: len(receiver.requests) == 1)
    await asyncio.sleep(0.3)
    await d.close()
    assert len(receiver.requests) == 1 and "p2_rule" in receiver.requests[0]["raw"]


# ------------------------------------------------------------------------------------------------------------
# submit never blocks; close is bounded
# ------------------------------------------------------------------------------------------------------------


async def test_submit_never_blocks_even_when_the_receiver_hangs(receiver: Receiver) -> None:
    receiver.hang_s = 3.0
    c = cfg(webhook(receiver), timeout_s=5, max_attempts=1, drain_timeout_s=0.5, rate_limit_per_minute=0)
    d = await started(c)
    t0 = time.perf_counter()
    for i in range(200):
        d.submit("opened", alert(f"r{i}", "P3"))
    assert time.perf_counter() - t0 < 0.5  # ~1 ms in practice; generous for a loaded CI machine
    # The loop stays responsive while the first send hangs in its worker thread (a blocking send would
    # freeze it for the receiver's 3 s).
    t = time.perf_counter()
    for _ in range(10):
        await asyncio.sleep(0.01)
    assert time.perf_counter() - t < 1.0
    assert len(receiver.requests) == 1
    t0 = time.perf_counter()
    await d.close()
    assert time.perf_counter() - t0 < 3.0  # drain bound 0.5 s (+ grace), not 200 hanging sends
    s = d.stats()["webhook"]
    # the hanging send and the 199 behind it: none lost without a count
    assert (s["sent"], s["failed"], s["dropped"], s["queued"]) == (0, 0, 200, 0)


async def test_close_cuts_a_back_off_short_for_one_last_try(receiver: Receiver) -> None:
    receiver.fail_next = 1
    d = await started(cfg(webhook(receiver), backoff_s=30, backoff_max_s=30, drain_timeout_s=5))
    d.submit("opened", alert("cpu_pct", "P3"))
    await wait_for(lambda: d.stats()["webhook"]["retried"] == 1)
    t0 = time.perf_counter()
    await d.close()
    assert time.perf_counter() - t0 < 3.0  # not the 30 s back-off
    assert len(receiver.requests) == 2 and d.stats()["webhook"]["sent"] == 1


async def test_a_long_summary_is_capped_to_fit_telegram(receiver: Receiver) -> None:
    clock = FakeClock(datetime(2026, 12, 1, 12, 0, tzinfo=UTC))
    c = cfg({"telegram": {"enabled": True, "bot_token": TG_TOKEN, "chat_id": 42, "api_url": receiver.base}},
            rate_limit_per_minute=1)
    d = await started(c, clock)
    for i in range(40):
        d.submit("opened", alert(f"rule_{i:02d}", "P3", "x & <y> " * 40, id=i))
    await wait_for(lambda: len(receiver.requests) == 1)
    await d.close()
    text = receiver.requests[0]["body"]["text"]
    assert len(text) <= 4096
    assert "[P3] 40 alert events (rate limit summary)" in text
    assert text.rstrip().endswith("more") and "rule_00" in text and "rule_39" not in text


async def test_submit_from_another_thread_and_after_close(receiver: Receiver) -> None:
    d = await started(cfg(webhook(receiver)))
    th = threading.Thread(target=d.submit, args=("opened", alert("from_thread", "P2")))
    th.start()
    th.join(2)
    await wait_for(lambda: len(receiver.requests) == 1)
    await d.close()
    d.submit("opened", alert("late", "P2"))
    assert d.stats()["webhook"]["dropped"] == 1
    with pytest.raises(ValueError, match="event must be one of"):
        d.submit("fired", alert("x", "P2"))
    with pytest.raises(ValueError, match="severity must be one of"):
        d.submit("opened", alert("x", "P5"))


async def test_close_sends_waiting_alerts_as_one_summary_and_counts_held_ones(receiver: Receiver) -> None:
    clock = FakeClock(datetime(2026, 12, 1, 23, 30, tzinfo=UTC))
    c = cfg(webhook(receiver), rate_limit_per_minute=1, quiet_hours={"start": "23:00", "end": "06:00"})
    d = await started(c, clock)
    for i in range(3):
        d.submit("opened", alert(f"loud_{i}", "P2"))
    d.submit("opened", alert("quiet_one", "P4"))
    await wait_for(lambda: len(receiver.requests) == 1)
    await d.close()
    assert len(receiver.requests) == 1 and "3 alert events" in receiver.requests[0]["body"]["title"]
    s = d.stats()["webhook"]
    assert (s["sent"], s["dropped"], s["held"]) == (1, 1, 0)


async def test_no_channels_means_nothing_to_do() -> None:
    d = await started(DeliveryConfig.from_mapping(None, SRC, environ={}))
    d.submit("opened", alert("x", "P1"))
    await d.close()
    assert d.stats() == {}


# ------------------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------------------

BAD_CONFIGS = [
    ({"colour": "red"}, "delivery.colour", "unknown key"),
    ({"max_attempts": "many"}, "delivery.max_attempts", "must be an integer"),
    ({"max_attempts": 0}, "delivery.max_attempts", "between 1 and 20"),
    ({"backoff_s": 10, "backoff_max_s": 5}, "delivery.backoff_max_s", "must be >= backoff_s"),
    ({"rate_limit_per_minute": -1}, "delivery.rate_limit_per_minute", "between 0 and"),
    ({"quiet_hours": {"start": 1320, "end": "07:00"}}, "delivery.quiet_hours.start", "quoted"),
    ({"quiet_hours": {"start": "25:00", "end": "07:00"}}, "delivery.quiet_hours.start", "HH:MM"),
    ({"quiet_hours": {"start": "22:00"}}, "delivery.quiet_hours.end", "must be set"),
    ({"quiet_hours": {"start": "22:00", "end": "22:00"}}, "delivery.quiet_hours.end", "must differ"),
    ({"quiet_hours": {"start": "22:00", "end": "07:00", "timezone": "Mars/Olympus"}},
     "delivery.quiet_hours.timezone", "unknown time zone"),
    ({"quiet_hours": {"start": "22:00", "end": "07:00", "action": "snooze"}}, "delivery.quiet_hours.action",
     "hold, drop"),
    ({"webhook": {"enabled": True}}, "delivery.webhook.url", "required when enabled"),
    ({"webhook": {"enabled": "maybe", "url": "http://x"}}, "delivery.webhook.enabled", "true or false"),
    ({"webhook": {"enabled": True, "url": "ftp://h/x"}}, "delivery.webhook.url", "http:// or https://"),
    ({"webhook": {"enabled": True, "url": "http://h/x", "min_severity": "P0"}}, "delivery.webhook.min_severity",
     "P1, P2, P3, P4"),
    ({"webhook": {"enabled": True, "url": "http://h/x", "events": ["opened", "fired"]}}, "delivery.webhook.events",
     "'fired'"),
    ({"webhook": {"enabled": True, "url": "http://h/x", "secret": 1}}, "delivery.webhook.secret", "unknown key"),
    ({"slack": {"enabled": True, "url": "https://hooks.slack.com/services/T1/B2"}}, "delivery.slack.url",
     "Slack incoming-webhook URL"),
    ({"telegram": {"enabled": True, "chat_id": 42}}, "delivery.telegram.bot_token", "ALPHAPULSE_TELEGRAM_TOKEN"),
    ({"telegram": {"enabled": True, "bot_token": "nocolon", "chat_id": 42}}, "delivery.telegram.bot_token",
     "must look like"),
    ({"telegram": {"enabled": True, "bot_token": TG_TOKEN, "chat_id": "a b"}}, "delivery.telegram.chat_id",
     "numeric chat id"),
    ({"telegram": {"enabled": True, "bot_token": TG_TOKEN, "chat_id": 1, "api_url": "api.telegram.org"}},
     "delivery.telegram.api_url", "http:// or https://"),
    ({"email": {"enabled": True, "from": "a@b.org", "to": ["c@d.org"]}}, "delivery.email.host", "required"),
    ({"email": {"enabled": True, "host": "smtp.x.org", "port": 70000, "from": "a@b.org", "to": ["c@d.org"]}},
     "delivery.email.port", "between 1 and 65535"),
    ({"email": {"enabled": True, "host": "smtp.x.org", "security": "tls", "from": "a@b.org", "to": ["c@d.org"]}},
     "delivery.email.security", "starttls, ssl, none"),
    ({"email": {"enabled": True, "host": "smtp.x.org", "from": "nobody", "to": ["c@d.org"]}},
     "delivery.email.from", "e-mail address"),
    ({"email": {"enabled": True, "host": "smtp.x.org", "from": "a@b.org", "to": []}}, "delivery.email.to",
     "at least one"),
    ({"email": {"enabled": True, "host": "smtp.x.org", "from": "a@b.org", "to": "c@d.org", "password": "pw12345"}},
     "delivery.email.username", "required when a password is set"),
]


@pytest.mark.parametrize(("data", "key", "problem"), BAD_CONFIGS, ids=[b[1] + ":" + b[2] for b in BAD_CONFIGS])
def test_bad_config_names_file_key_and_problem_on_one_line(data: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as ei:
        DeliveryConfig.from_mapping(data, "/etc/alphapulse/monitoring.yaml", environ={})
    e = ei.value
    assert (e.source, e.key) == ("/etc/alphapulse/monitoring.yaml", key), str(e)
    assert problem in e.problem, str(e)
    assert "\n" not in str(e) and str(e).startswith(f"/etc/alphapulse/monitoring.yaml: {key}: ")


def test_bad_config_never_echoes_a_secret() -> None:
    secret_url = "https://hooks.slack.com/services/T1/B2/not-alnum-SECRET"
    with pytest.raises(ConfigError) as ei:
        DeliveryConfig.from_mapping({"slack": {"enabled": True}}, SRC,
                                    environ={"ALPHAPULSE_SLACK_WEBHOOK_URL": secret_url})
    assert (ei.value.source, ei.value.key) == ("environment", "ALPHAPULSE_SLACK_WEBHOOK_URL")
    assert "SECRET" not in str(ei.value)
    with pytest.raises(ConfigError) as ei2:
        DeliveryConfig.from_mapping({"telegram": {"enabled": True, "chat_id": 5}}, SRC,
                                    environ={"ALPHAPULSE_TELEGRAM_TOKEN": "12345:has spaces-SECRET"})
    assert ei2.value.key == "ALPHAPULSE_TELEGRAM_TOKEN" and "SECRET" not in str(ei2.value)
    with pytest.raises(ConfigError) as ei3:
        DeliveryConfig.from_mapping({"webhook": {"enabled": True, "url": "gopher://u:SECRET@h/"}}, SRC, environ={})
    assert "SECRET" not in str(ei3.value)


def test_not_a_mapping() -> None:
    with pytest.raises(ConfigError, match=r"^monitoring.yaml: delivery: must be a mapping, got list$"):
        DeliveryConfig.from_mapping([1, 2], SRC, environ={})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^monitoring.yaml: delivery.slack: must be a mapping, got str$"):
        DeliveryConfig.from_mapping({"slack": "yes"}, SRC, environ={})


def test_shipped_monitoring_yaml_delivery_section_is_valid_and_sends_nothing() -> None:
    path = REPO / "config" / "monitoring.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data.get("delivery"), dict), "config/monitoring.yaml must carry a delivery: section"
    c = DeliveryConfig.from_mapping(data["delivery"], str(path), environ={})
    assert c.channels == () and c.quiet_hours is None
    # Every channel of the example, switched on with the values its comments ask for, is valid too.
    example = data["delivery"]
    example["quiet_hours"].update(start="22:00", end="07:00")
    for kind in ("webhook", "slack", "telegram", "email"):
        example[kind]["enabled"] = True
    example["webhook"]["url"] = "https://alerts.example.org/hook"
    example["telegram"]["chat_id"] = -100123
    example["email"].update(host="smtp.example.org", username="alphapulse", **{"from": "a@example.org"},
                            to=["ops@example.org"])
    env = {"ALPHAPULSE_SLACK_WEBHOOK_URL": f"https://hooks.slack.com/services/{SLACK_TOKENS}",
           "ALPHAPULSE_TELEGRAM_TOKEN": TG_TOKEN, "ALPHAPULSE_SMTP_PASSWORD": "hunter2hunter2"}
    full = DeliveryConfig.from_mapping(example, str(path), environ=env)
    assert [ch.kind for ch in full.channels] == ["webhook", "slack", "telegram", "email"]
    assert full.quiet_hours is not None
    assert dict(next(ch for ch in full.channels if ch.kind == "slack").overrides) == {
        "webhook_url": "https://hooks.slack.com/services"}
    assert dict(next(ch for ch in full.channels if ch.kind == "telegram").overrides) == {
        "notify_url": "https://api.telegram.org/bot"}


def test_secrets_are_registered_for_log_redaction() -> None:
    token = "987654321:RedactMe_please-42"
    c = DeliveryConfig.from_mapping({"telegram": {"enabled": True, "chat_id": 5}}, SRC,
                                    environ={"ALPHAPULSE_TELEGRAM_TOKEN": token})
    line = f"url https://api.telegram.org/bot{token}/sendMessage"
    assert log.redact_text(line) == line  # a token no other test uses: not registered yet
    build_dispatcher(c)
    assert log.redact_text(f"url https://api.telegram.org/bot{token}/sendMessage") == \
        "url https://api.telegram.org/bot***/sendMessage"


def test_daemon_settings_accept_the_delivery_environment_variables(tmp_path: Path) -> None:
    """The daemon and the monitor share one env file; the daemon must not exit 78 on the monitor's secrets."""
    from alphapulse import config

    assert set(config.DELIVERY_ENV) == set(DELIVERY_ENV)
    env = {name: "x" for name in DELIVERY_ENV}
    s = load_settings(tmp_path, env=env)
    assert s.mode == "paper"


def test_config_error_exits_78_with_one_line_in_a_real_process(tmp_path: Path) -> None:
    """What the monitor does with a bad delivery section: the project's exit 78 and one stderr line."""
    cfg_file = tmp_path / "monitoring.yaml"
    cfg_file.write_text("delivery:\n  telegram: {enabled: true, chat_id: 1}\n", encoding="utf-8")
    script = (
        "import sys, yaml\n"
        "from alphapulse.config import ConfigError, report_config_error\n"
        "from alphapulse.monitor.delivery import DeliveryConfig\n"
        "p = sys.argv[1]\n"
        "try:\n"
        "    DeliveryConfig.from_mapping(yaml.safe_load(open(p)).get('delivery'), p)\n"
        "except ConfigError as e:\n"
        "    sys.exit(report_config_error(e))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script, str(cfg_file)], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == EX_CONFIG
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"alphapulse: config error: {cfg_file}: delivery.telegram.bot_token: required when enabled "
                     "(or set ALPHAPULSE_TELEGRAM_TOKEN)"]
