"""The monitor's live dashboard (alphapulse/monitor/dashboard.py and monitor/static/).

Fast tests serve the page from a bare aiohttp app on 127.0.0.1 and read the files it ships.  The slow test is the
real thing: a real ``alphapulse monitor`` process, a real trading daemon started after it (tests/daemon_harness.py),
and Debian's headless Chromium driven over the DevTools protocol (tests/cdp_browser.py).  It watches the page
show the daemon down, then live, compares every number the page shows with the daemon's own ``/metrics``,
acknowledges an alert through the page's token dialog, and saves desktop and phone screenshots.
"""

from __future__ import annotations

import asyncio
import configparser
import fnmatch
import json
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from alphapulse.monitor.dashboard import CONTENT_SECURITY_POLICY, ROUTES, register_dashboard
from tests.cdp_browser import Chromium, Page
from tests.daemon_harness import REPO, DaemonProc, MonitorProc, slice_bundled

STATIC = REPO / "alphapulse" / "monitor" / "static"


# ---------------------------------------------------------------------------------------------------------------
# Fast: the files and how they are served
# ---------------------------------------------------------------------------------------------------------------


async def _client() -> TestClient[web.Request, web.Application]:
    app = web.Application()
    register_dashboard(app)
    client: TestClient[web.Request, web.Application] = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return client


async def test_page_and_assets_are_served_from_the_package_with_a_same_origin_policy() -> None:
    client = await _client()
    try:
        for path, (name, ctype) in ROUTES.items():
            resp = await client.get(path)
            assert resp.status == 200, path
            assert resp.headers["Content-Type"] == ctype
            assert await resp.read() == (STATIC / name).read_bytes()
            assert resp.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            assert resp.headers["Cache-Control"] == "no-cache"
            etag = resp.headers["ETag"]
            again = await client.get(path, headers={"If-None-Match": etag})
            assert again.status == 304 and await again.read() == b""
            head = await client.head(path)
            assert head.status == 200
        # Only this origin may provide scripts, styles and connections.
        directives = dict(d.strip().split(" ", 1) for d in CONTENT_SECURITY_POLICY.split(";"))
        assert directives["default-src"] == "'none'"
        for d in ("script-src", "style-src", "connect-src"):
            assert directives[d] == "'self'", d
    finally:
        await client.close()


def test_page_loads_nothing_from_elsewhere_and_inserts_data_as_text_only() -> None:
    html = (STATIC / "dashboard.html").read_text()
    js = (STATIC / "dashboard.js").read_text()
    css = (STATIC / "dashboard.css").read_text()
    # Every URL the page can fetch is a same-origin path; the SVG namespace is a name, not a request.
    for text in (html, js, css):
        urls = set(re.findall(r"(?:https?:)?//[A-Za-z0-9.-]+[^\s\"')]*", text)) - {"http://www.w3.org/2000/svg"}
        urls = {u for u in urls if not u.startswith("//") or re.match(r"//[a-z]+\.[a-z]", u)}
        assert not urls, urls
    assert set(re.findall(r'(?:src|href)="([^"]+)"', html)) == {"/dashboard.css", "/dashboard.js", "data:,"}
    assert "@import" not in css and "url(" not in css
    assert "<script>" not in html and "style=" not in html  # no inline code: the CSP forbids it anyway
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in js, sink
    # The script talks to the monitor's API only.
    paths = set(re.findall(r"['`](/[^'`\s]*)['`]", js))
    assert paths and all(p.startswith("/api/") for p in paths), paths
    assert "new EventSource('/api/stream')" in js
    # Every element the script fills exists in the page.
    ids = set(re.findall(r'id="([^"]+)"', html))
    used = set(re.findall(r"\$\('([a-z0-9-]+)'\)", js)) | set(re.findall(r"put(?:Num)?\('([a-z0-9-]+)'", js))
    assert used <= ids, used - ids


def test_static_files_are_package_data() -> None:
    """setup.cfg ships them (a wheel without the page would serve 500s at /)."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    patterns = [p.strip() for p in cfg["options.package_data"]["alphapulse"].split(",")]
    for name, _ in ROUTES.values():
        rel = f"monitor/static/{name}"
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), (rel, patterns)


# ---------------------------------------------------------------------------------------------------------------
# Slow: daemon + monitor + headless Chromium
# ---------------------------------------------------------------------------------------------------------------

REPLAY_ROWS, REPLAY_START = 600, 20000  # ends long BTC with a loss on the day: every card has a non-zero figure
REPLAY_SPEED = "20000"  # about 9 s for the 600 five-minute candles, so the page is watched while they arrive


async def _get(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        assert resp.status == 200, (url, resp.status, await resp.text())
        return await resp.json()


# Everything the page shows with a data-value, and its text; positions row by row.
DOM_VALUES = """(() => {
  const out = {};
  const read = (e) => ({value: e.dataset.value, text: e.textContent});
  for (const e of document.querySelectorAll('[id][data-value]')) out[e.id] = read(e);
  out.positions = [...document.querySelectorAll('#positions-body tr')].map((tr) => {
    const row = {};
    for (const td of tr.querySelectorAll('td[data-field]')) row[td.dataset.field] = read(td);
    return row;
  });
  out.updated.count = Number(document.getElementById('updated').dataset.count);
  return out;
})()"""


def _shown(entry: dict[str, str]) -> float:
    """The number a person reads: "+1,234.57" -> 1234.57."""
    return float(entry["text"].replace(",", "").replace("+", ""))


def _check(dom: dict[str, Any], key: str, expected: float, scale: float = 1.0) -> None:
    """The raw value is the daemon's number exactly; the text is that number (times ``scale``) rounded to the
    decimals shown."""
    entry = dom[key]
    assert entry["value"] != "", (key, entry)
    assert float(entry["value"]) == pytest.approx(expected, rel=1e-12, abs=1e-12), (key, entry, expected)
    decimals = len(entry["text"].split(".")[1]) if "." in entry["text"] else 0
    assert abs(_shown(entry) - expected * scale) <= 0.5 * 10 ** -decimals + 1e-9, (key, entry, expected * scale)


def _compare_with_metrics(dom: dict[str, Any], m: dict[str, Any]) -> int:
    """Assert every figure of the page against the daemon's /metrics; returns how many were compared."""
    p, t, mo, r, mk, sy = m["portfolio"], m["trading"], m["model"], m["risk"], m["market"], m["system"]
    checks: list[tuple[str, float, float]] = [
        ("equity", p["equity"], 1), ("cash", p["cash"], 1), ("initial-equity", p["initial_equity"], 1),
        ("daily-pnl", p["daily_pnl"], 1),
        ("daily-pnl-pct", p["daily_pnl"] / (p["equity"] - p["daily_pnl"]) * 100, 1),
        ("realized-pnl", p["realized_pnl"], 1), ("unrealized-pnl", p["unrealized_pnl"], 1),
        ("drawdown", p["drawdown"], 100), ("peak-equity", p["peak_equity"], 1),
        ("drawdown-limit", r["limits"]["max_drawdown_pct"], 1),
        ("orders", t["orders"], 1),
        ("model-confidence", mo["avg_confidence"], 100), ("model-threshold", mo["confidence_threshold"], 100),
        ("model-decisions", mo["decisions"], 1),
        ("inference-p99", mo["inference_us"]["p99"], 0.001), ("inference-p50", mo["inference_us"]["p50"], 0.001),
        ("tick-to-order-p99", sy["tick_to_order_us"]["p99"], 0.001),
        ("candles-processed", mk["candles_processed"], 1), ("candles-rejected", mk["rejected_candles"], 1),
        ("risk-alerts", r["alerts"], 1), ("last-close", mk["last_candle"]["close"], 1),
    ]
    for key, expected, scale in checks:
        _check(dom, key, expected, scale)
    assert dom["trading-state"]["value"] == t["state"]
    assert dom["trading-state"]["text"] == t["state"].replace("_", " ")
    assert dom["trading-state-pill"]["value"] == t["state"]
    assert dom["trading-mode"]["value"] == t["mode"] == "paper"
    assert dom["last-candle"]["value"] == mk["last_candle"]["time"]
    assert dom["last-candle"]["text"] == mk["last_candle"]["time"][:16].replace("T", " ") + " UTC"
    assert len(dom["positions"]) == len(p["positions"])
    for row, pos in zip(dom["positions"], p["positions"]):
        assert row["symbol"]["text"] == pos["symbol"] and row["side"]["text"] == pos["side"]
        for field in ("qty", "entry_price", "mark_price", "notional", "unrealized_pnl"):
            _check(row, field, pos[field])
    return len(checks) + 5 + 5 * len(p["positions"])


async def _wait_page_has_caught_up(page: Page, candles: int, timeout: float = 30.0) -> None:
    """Until the page has rendered two snapshots scraped after the daemon's last candle: then what it shows is
    what the daemon's /metrics says now (nothing but uptime and memory moves once a replay has finished)."""
    await page.wait_for(f"document.getElementById('candles-processed').dataset.value === '{candles}'", timeout,
                        f"the page to show {candles} candles processed")
    seen = await page.evaluate("Number(document.getElementById('updated').dataset.count)")
    await page.wait_for(f"Number(document.getElementById('updated').dataset.count) >= {seen + 2}", timeout,
                        "two more snapshots")


@pytest.mark.slow
async def test_dashboard_live_against_a_real_daemon_and_monitor(tmp_path: Path) -> None:
    replay = slice_bundled(tmp_path / "replay.csv", REPLAY_ROWS, REPLAY_START)
    daemon = DaemonProc(tmp_path, replay_file=replay, speed=REPLAY_SPEED)
    # Scrapes every 0.5 s; a confidence floor no policy meets, so a model_confidence alert opens at once to be
    # acknowledged (with the shipped 0.60 it depends on the confidence of the first few hundred decisions).
    rules = yaml.safe_load((REPO / "config" / "monitoring.yaml").read_text())["rules"]
    monitor = MonitorProc(daemon, monitoring={"rules": {**rules, "model_confidence_min": 0.99}})
    mon_url = f"http://127.0.0.1:{monitor.port}"
    browser = Chromium(tmp_path)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    session = aiohttp.ClientSession()
    try:
        # 1. The monitor first, with the daemon not started: the page must say so and show the P1 alert.
        monitor.start()
        await asyncio.to_thread(monitor.wait_ready, 30)
        await browser.start()
        page = await browser.page()
        await page.set_viewport(1280, 900)
        await page.navigate(f"{mon_url}/")
        await page.evaluate("window.__loadedOnce = true")  # gone if anything reloads the page
        await page.wait_for("document.getElementById('daemon-up').dataset.value === 'false'", what="daemon down")
        down_id = await page.wait_for(
            "(() => { const li = document.querySelector('#alerts-active li[data-rule=\"daemon_down\"]');"
            " return li && li.dataset.severity === 'P1' ? li.dataset.alertId : null; })()",
            what="the P1 daemon_down alert on the page")
        assert await page.evaluate("document.getElementById('conn').dataset.state") == "live"
        await page.screenshot(shots / "dashboard-daemon-down.png")

        # 2. Start the daemon: the page follows it live, without reloading.
        token = daemon.token()  # the monitor created the shared control token; the daemon will read it
        daemon.start()
        await asyncio.to_thread(daemon.wait_ready, 60)
        seen_candles: set[int] = set()
        end = time.monotonic() + 60
        while time.monotonic() < end:
            v = await page.evaluate("document.getElementById('candles-processed').dataset.value")
            if v:
                seen_candles.add(int(v))
            if v == str(REPLAY_ROWS):
                break
            await asyncio.sleep(0.1)
        assert max(seen_candles, default=0) == REPLAY_ROWS, seen_candles
        assert len(seen_candles) >= 2, f"the page never showed the replay in progress: {seen_candles}"
        assert await page.evaluate("window.__loadedOnce === true && performance.getEntriesByType('navigation')"
                                   ".length === 1")
        health = await _get(session, f"http://127.0.0.1:{daemon.port}/health")
        assert health["status"] == "finished", health

        # 3. Every figure on the page equals the daemon's own /metrics.
        await _wait_page_has_caught_up(page, REPLAY_ROWS)
        dom = await page.evaluate(DOM_VALUES)
        metrics = await _get(session, f"http://127.0.0.1:{daemon.port}/metrics")
        compared = _compare_with_metrics(dom, metrics)
        assert compared >= 30
        assert metrics["portfolio"]["positions"] and metrics["portfolio"]["daily_pnl"] != 0  # real figures
        assert dom["daemon-up"]["value"] == "true" and dom["daemon-up"]["text"] == "daemon finished"
        # Host figures: those of the monitor's snapshot the page rendered last.
        for _ in range(50):
            dom = await page.evaluate(DOM_VALUES)
            snap = await _get(session, f"{mon_url}/api/snapshot")
            if snap["daemon"]["scraped_at"] == dom["updated"]["value"]:
                for key in ("cpu", "memory", "disk"):
                    _check(dom, f"{key}-pct", snap["host"][f"{key}_pct"])
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("never read the page and the snapshot it shows at the same moment")

        # 4. The daemon-down alert resolved (two good scrapes) and moved to the recent list.
        await page.wait_for(f"document.querySelector('#alerts-recent li[data-alert-id=\"{down_id}\"]')"
                            "?.dataset.state === 'resolved'", what="daemon_down resolved on the page")

        # 5. Acknowledge the open model-confidence alert.
        ack_id = await page.wait_for(
            "document.querySelector('#alerts-active li[data-rule=\"model_confidence\"][data-state=\"open\"]')"
            "?.dataset.alertId", what="an open model_confidence alert")
        assert await page.evaluate("localStorage.length") == 0
        await page.click(f'#alerts-active li[data-alert-id="{ack_id}"] button.ack')
        await page.wait_for("document.getElementById('token-dialog').open", what="the token dialog")
        await page.type_text("not-the-token")
        await page.press_enter()
        await page.wait_for("document.getElementById('token-dialog').open && "
                            "document.getElementById('token-message').textContent.includes('refused')",
                            what="the dialog asking again after a refused token")
        assert await page.evaluate("localStorage.length") == 0  # a refused token is not kept
        alerts = await _get(session, f"{mon_url}/api/alerts")
        assert {a["id"]: a["state"] for a in alerts["active_alerts"]}[int(ack_id)] == "open"
        await page.type_text(token)
        await page.click("#token-save")
        await page.wait_for(f"document.querySelector('#alerts-active li[data-alert-id=\"{ack_id}\"]')"
                            "?.dataset.state === 'acknowledged'", what="the alert acknowledged on the page")
        alerts = await _get(session, f"{mon_url}/api/alerts")
        acked = next(a for a in alerts["active_alerts"] if a["id"] == int(ack_id))
        assert acked["state"] == "acknowledged" and acked["acknowledged_at"], acked
        assert await page.evaluate(f"!document.querySelector('#alerts-active li[data-alert-id=\"{ack_id}\"] "
                                   "button.ack')")
        assert "acknowledged" in await page.evaluate("document.getElementById('notice').textContent")
        assert await page.evaluate("localStorage.getItem('alphapulse.controlToken')") == token
        # The stream confirms it: a later snapshot (not the page's optimistic update) still says acknowledged.
        count = await page.evaluate("Number(document.getElementById('updated').dataset.count)")
        await page.wait_for(f"Number(document.getElementById('updated').dataset.count) > {count + 1}")
        assert await page.evaluate(f"document.querySelector('#alerts-active li[data-alert-id=\"{ack_id}\"]')"
                                   ".dataset.state") == "acknowledged"

        # 6. Screenshots, desktop and phone; on a phone nothing is wider than the screen.
        desktop = await page.screenshot(shots / "dashboard-desktop.png")
        await page.set_viewport(390, 844, mobile=True, scale=2)
        await page.evaluate("new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)))")
        assert await page.evaluate("document.documentElement.scrollWidth") <= 390
        assert await page.evaluate("(() => { const s = document.querySelector('#positions').parentElement;"
                                   " return s.scrollWidth <= s.clientWidth; })()"), "positions wider than a phone"
        assert await page.evaluate("getComputedStyle(document.querySelector('.kpis')).gridTemplateColumns"
                                   ".split(' ').length") == 2
        phone = await page.screenshot(shots / "dashboard-phone.png")
        for png in (desktop, phone, shots / "dashboard-daemon-down.png"):
            data = png.read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, (png, len(data))

        # 7. Text from outside is shown as text: an emergency stop whose operator reason is full of markup. The
        # page shows the state, the reason verbatim, the monitor's P1, and creates no element from it.
        reason = '<img src="/x-injected" onerror="window.__xss = 1"><b id="injected">stop</b>'
        status, answer, _ = await asyncio.to_thread(
            daemon.http, "POST", "/emergency_stop", token=token, body=json.dumps({"reason": reason}).encode(),
            headers={"Content-Type": "application/json"})
        assert status == 200, answer
        await page.set_viewport(1280, 900)
        await page.wait_for("document.getElementById('trading-state').dataset.value === 'EMERGENCY_STOP'",
                            what="the emergency stop on the page")
        assert reason in await page.evaluate("document.getElementById('state-reason').textContent")
        await page.wait_for("document.querySelector('#alerts-active li[data-rule=\"emergency_stop\"]')"
                            "?.dataset.severity === 'P1'", what="the P1 emergency_stop alert on the page")
        assert await page.evaluate("document.getElementById('trading-state-pill').className") == \
            "pill state st-EMERGENCY_STOP"
        assert await page.evaluate("!document.getElementById('injected') && !document.querySelector('main img')"
                                   " && window.__xss === undefined")
        await page.screenshot(shots / "dashboard-emergency-stop.png")
        await page.set_viewport(390, 844, mobile=True, scale=2)
        assert await page.evaluate("(() => { const e = document.getElementById('trading-state');"
                                   " return e.scrollWidth <= e.parentElement.clientWidth; })()")
        await page.screenshot(shots / "dashboard-emergency-stop-phone.png")

        # 8. Nothing left the machine, nothing failed, no script error; the monitor answers the page's
        # neighbours with 4xx JSON, not a page or a traceback.
        for method, path, status in (("POST", "/", 405), ("GET", "/dashboard.jsx", 404),
                                     ("DELETE", "/dashboard.js", 405)):
            async with session.request(method, f"{mon_url}{path}") as resp:
                assert resp.status == status and (await resp.json())["status"] == status, (method, path)
        origin = f"{mon_url}/"
        outside = [u for u in page.requests if not (u.startswith(origin) or u.startswith("data:"))]
        assert not outside, outside
        assert not [u for u in page.requests if "x-injected" in u]
        assert {u.split("?")[0] for u in page.requests} >= {origin, f"{origin}dashboard.js", f"{origin}dashboard.css",
                                                             f"{origin}api/snapshot", f"{origin}api/stream"}
        assert not page.exceptions, page.exceptions
        assert not page.failed, page.failed
        assert token not in json.dumps(page.console)

        # 9. The monitor restarts: the page notices, reconnects by itself and goes on, still without a reload;
        # the acknowledgement (kept in the monitor's SQLite) is still shown.
        assert monitor.stop() == 0, monitor.stderr()
        await page.wait_for("document.getElementById('conn').dataset.state !== 'live'", 20,
                            "the page noticing the monitor is gone")
        count = await page.evaluate("Number(document.getElementById('updated').dataset.count)")
        monitor.start()
        await asyncio.to_thread(monitor.wait_ready, 30)
        await page.wait_for("document.getElementById('conn').dataset.state === 'live' && "
                            f"Number(document.getElementById('updated').dataset.count) > {count + 1}", 30,
                            "the page live again after the monitor restarted")
        assert await page.evaluate("window.__loadedOnce === true && performance.getEntriesByType('navigation')"
                                   ".length === 1")
        assert await page.evaluate(f"document.querySelector('#alerts-active li[data-alert-id=\"{ack_id}\"]')"
                                   ".dataset.state") == "acknowledged"
        await page.close()
    finally:
        await session.close()
        await browser.close()
        monitor.close()
        daemon.close()
    for out in monitor.root.glob("stderr-*.txt"):  # the token never reached the monitor's output
        assert token not in out.read_text(errors="replace"), out
