"""One scrape: the daemon's ``/health`` and ``/metrics`` over loopback HTTP, the host's CPU, memory and disk.

A daemon that does not answer is a result, not an exception: the sample says ``daemon_up=False`` and why
(connection refused, timeout), which is exactly what the ``daemon_down`` rule needs.  psutil calls read /proc
and statfs, so they run in a worker thread.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil

from alphapulse.monitor.rules import Sample


def host_figures(disk_path: Path) -> dict[str, float | None]:
    """CPU % since the previous call (psutil's own interval), memory % and the disk % of ``disk_path``'s
    filesystem.  Blocking: call it in a thread."""
    out: dict[str, float | None] = {"cpu_pct": None, "memory_pct": None, "disk_pct": None}
    try:
        out["cpu_pct"] = float(psutil.cpu_percent(interval=None))
    except OSError:
        pass
    try:
        out["memory_pct"] = float(psutil.virtual_memory().percent)
    except OSError:
        pass
    probe = disk_path
    while not probe.exists() and probe != probe.parent:  # the data directory may not exist yet
        probe = probe.parent
    try:
        out["disk_pct"] = float(psutil.disk_usage(str(probe)).percent)
    except OSError:
        pass
    return out


class Scraper:
    """Keeps one aiohttp session to the daemon; :meth:`scrape` never raises for the daemon's failures."""

    def __init__(self, base_url: str, timeout_s: float, disk_path: Path) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.disk_path = disk_path
        self._session: aiohttp.ClientSession | None = None
        self.scrapes = 0
        self.failures = 0

    async def start(self) -> None:
        if self._session is None:
            # no keep-alive: a restarted daemon must not be hit on a dead pooled connection
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
            await asyncio.to_thread(psutil.cpu_percent, None)  # prime the CPU counter: the first call reads 0

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _get_json(self, path: str) -> tuple[int, Any]:
        assert self._session is not None
        async with self._session.get(self.base_url + path, timeout=self.timeout,
                                     headers={"Accept": "application/json"}) as resp:
            raw = await resp.read()
            try:
                return resp.status, orjson.loads(raw)
            except orjson.JSONDecodeError:
                return resp.status, None

    async def _daemon(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            (h_status, health), (m_status, metrics) = await asyncio.gather(self._get_json("/health"),
                                                                          self._get_json("/metrics"))
        except TimeoutError:
            return {"daemon_up": False, "error": f"no answer within {self.timeout.total}s"}
        except aiohttp.ClientConnectorError as e:
            return {"daemon_up": False, "error": f"cannot connect to {self.base_url}: {e.os_error.strerror or e}"}
        except aiohttp.ClientError as e:
            return {"daemon_up": False, "error": f"{type(e).__name__}: {e}"}
        ms = (time.perf_counter() - t0) * 1000.0
        if not isinstance(health, dict):
            return {"daemon_up": False, "error": f"/health answered HTTP {h_status} without JSON", "scrape_ms": ms}
        return {"daemon_up": True, "health_status": h_status, "health": health,
                "metrics": metrics if m_status == 200 and isinstance(metrics, dict) else None,
                "error": None if m_status == 200 else f"/metrics answered HTTP {m_status}", "scrape_ms": ms}

    async def scrape(self) -> Sample:
        await self.start()
        now = time.time()
        daemon, host = await asyncio.gather(self._daemon(), asyncio.to_thread(host_figures, self.disk_path))
        self.scrapes += 1
        if not daemon["daemon_up"]:
            self.failures += 1
        return Sample(ts=now, daemon_up=daemon["daemon_up"], health_status=daemon.get("health_status"),
                      health=daemon.get("health"), metrics=daemon.get("metrics"), error=daemon.get("error"),
                      scrape_ms=daemon.get("scrape_ms"), cpu_pct=host["cpu_pct"], memory_pct=host["memory_pct"],
                      disk_pct=host["disk_pct"])
