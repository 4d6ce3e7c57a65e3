"""Headless Chromium driven over the Chrome DevTools Protocol with aiohttp: no selenium, no browser downloads.

Debian's ``chromium`` package (installed by scripts/install_test_tools.sh) is started as a real process with
``--remote-debugging-port=0``; the port it picked is read from ``DevToolsActivePort`` in its profile directory,
and one page target is driven over its WebSocket.  Clicks and typing go through ``Input.*`` events, as a
person's would, not through ``element.click()``.

The browser cannot reach anything but 127.0.0.1: its host resolver maps every other name to nothing and its
background services (updates, safe browsing, sync) are off.  Every request the page makes is recorded in
:attr:`Page.requests`, so a test can prove nothing left the machine.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str:
    """Path of a Chromium binary; without one the test skips with the reason, or fails under CI=true."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    reason = ("headless Chromium not found (Debian package 'chromium'; scripts/install_test_tools.sh installs it)")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + "; CI=true requires it")
    pytest.skip(reason)


class CDPError(RuntimeError):
    """An error answer from the browser, or a page condition that never came true."""


class Page:
    """One page target: commands with ``send``, JavaScript with ``evaluate``, events recorded as they arrive."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.requests: list[str] = []
        self.console: list[str] = []
        self.exceptions: list[str] = []
        self.failed: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
                continue
            method, params = data.get("method"), data.get("params", {})
            if method == "Network.requestWillBeSent":
                self.requests.append(params["request"]["url"])
            elif method == "Network.loadingFailed":
                self.failed.append(f"{params.get('errorText')} {params.get('blockedReason') or ''}".strip())
            elif method == "Runtime.consoleAPICalled":
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
            elif method == "Runtime.exceptionThrown":
                d = params["exceptionDetails"]
                self.exceptions.append(str(d.get("exception", {}).get("description") or d.get("text")))
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(CDPError("browser connection closed"))

    async def send(self, method: str, timeout: float = 15.0, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        await self._ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        answer = await asyncio.wait_for(fut, timeout)
        if "error" in answer:
            raise CDPError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    async def evaluate(self, expression: str) -> Any:
        """Value of a JavaScript expression (awaited if it is a promise); a thrown error raises CDPError."""
        res = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise CDPError(f"{expression!r} threw {res['exceptionDetails'].get('exception', {}).get('description')}")
        return res["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 20.0, what: str = "") -> Any:
        """Poll a JavaScript expression until it is truthy; its value is returned."""
        end = time.monotonic() + timeout
        value: Any = None
        while time.monotonic() < end:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(0.1)
        raise CDPError(f"timed out after {timeout}s waiting for {what or expression!r} (last value {value!r}); "
                       f"page exceptions {self.exceptions}, console {self.console[-5:]}")

    async def navigate(self, url: str, timeout: float = 20.0) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete'", timeout, "page load")

    async def set_viewport(self, width: int, height: int, *, mobile: bool = False, scale: float = 1.0) -> None:
        self.viewport = {"width": width, "height": height, "deviceScaleFactor": scale, "mobile": mobile}
        await self.send("Emulation.setDeviceMetricsOverride", **self.viewport)

    async def click(self, selector: str) -> None:
        """A real mouse click (pressed + released) in the middle of the first element matching ``selector``."""
        box = await self.wait_for(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return null;"
            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            " return r.width && r.height ? {x: r.x + r.width / 2, y: r.y + r.height / 2} : null; })()",
            what=f"a visible {selector}")
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=box["x"], y=box["y"], button="left",
                            clickCount=1)

    async def type_text(self, text: str) -> None:
        """Type into the focused element."""
        await self.send("Input.insertText", text=text)

    async def press_enter(self) -> None:
        key: dict[str, Any] = {"key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13,
                               "nativeVirtualKeyCode": 13}
        await self.send("Input.dispatchKeyEvent", type="keyDown", text="\r", **key)
        await self.send("Input.dispatchKeyEvent", type="keyUp", **key)

    async def screenshot(self, path: Path, *, full_page: bool = True) -> Path:
        """Save a PNG of the page: with ``full_page`` the viewport grows to the content's height for the shot
        (as a tall phone would show it), then returns to what :meth:`set_viewport` set."""
        vp = dict(getattr(self, "viewport", {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False}))
        if full_page:
            height = await self.evaluate("Math.ceil(document.documentElement.scrollHeight)")
            await self.send("Emulation.setDeviceMetricsOverride", **{**vp, "height": max(int(height), vp["height"])})
            await self.evaluate("new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)))")
        try:
            res = await self.send("Page.captureScreenshot", timeout=30.0, format="png")
        finally:
            if full_page:
                await self.send("Emulation.setDeviceMetricsOverride", **vp)
        path.write_bytes(base64.b64decode(res["data"]))
        return path

    async def close(self) -> None:
        await self._ws.close()
        self._reader.cancel()


class Chromium:
    """A headless Chromium process with its own throw-away profile under ``root``."""

    def __init__(self, root: Path) -> None:
        self.binary = find_chromium()
        self.root = root
        self.profile = root / "chromium-profile"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._session: aiohttp.ClientSession | None = None

    async def start(self, timeout: float = 30.0) -> Chromium:
        self.profile.mkdir(parents=True, exist_ok=True)
        (self.profile / "DevToolsActivePort").unlink(missing_ok=True)  # a previous run's port is not ours
        self.log_path = self.root / "chromium.log"
        self._log = open(self.log_path, "wb")
        args = [
            self.binary, "--headless", "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
            f"--user-data-dir={self.profile}", "--no-first-run", "--no-default-browser-check",
            "--disable-gpu", "--disable-extensions", "--disable-background-networking", "--disable-sync",
            "--disable-component-update", "--disable-default-apps", "--disable-breakpad",
            "--disable-features=Translate,MediaRouter,OptimizationHints", "--metrics-recording-only",
            "--mute-audio", "--password-store=basic", "--use-mock-keychain",
            # Nothing but loopback resolves: a page that tried a CDN would fail to load it.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "about:blank",
        ]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox (CI containers)
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
                                     start_new_session=True)
        port_file = self.profile / "DevToolsActivePort"
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise CDPError(f"chromium exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                first = port_file.read_text().splitlines()[0]
                self.port = int(first)
                break
            except (OSError, IndexError, ValueError):
                await asyncio.sleep(0.1)
        else:
            raise CDPError(f"chromium wrote no DevToolsActivePort within {timeout}s")
        self._session = aiohttp.ClientSession()
        return self

    async def page(self) -> Page:
        """Connect to the start page's target and enable the domains the tests read events from."""
        assert self._session is not None
        end = time.monotonic() + 15.0
        targets: list[dict[str, Any]] = []
        while time.monotonic() < end:
            async with self._session.get(f"http://127.0.0.1:{self.port}/json/list") as resp:
                targets = await resp.json()
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                break
            await asyncio.sleep(0.1)
        else:
            raise CDPError(f"no page target: {targets}")
        ws = await self._session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=64 * 1024 * 1024)
        page = Page(ws)
        for domain in ("Page", "Runtime", "Network"):
            await page.send(f"{domain}.enable")
        return page

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, 10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                await asyncio.to_thread(self.proc.wait, 10)
        if hasattr(self, "_log"):
            self._log.close()
