"""Embedded aiohttp control server on 127.0.0.1: health, metrics and the operator's controls.

Every answer is JSON (or Prometheus text for /metrics when asked); a bad request gets a 4xx JSON body,
never a traceback.  The POST endpoints need ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from aiohttp import web
from prometheus_client.registry import CollectorRegistry

from alphapulse.domain import StateConflict
from alphapulse.log import get_logger
from alphapulse.prometheus import CONTENT_TYPE as PROMETHEUS_CONTENT_TYPE
from alphapulse.prometheus import ScrapeView, new_registry, render

if TYPE_CHECKING:
    from alphapulse.config import Settings

log = get_logger("alphapulse.control")

#: The operator's actions, in the order the README lists them; each is ``POST /<name>``.
OPERATOR_ACTIONS = ("emergency_stop", "flatten_positions", "maintenance_mode", "resume_trading")


class ControlTarget(Protocol):
    """What the control server needs from the process it controls: no more, so it never imports the daemon.

    ``operator_action`` runs one of :data:`OPERATOR_ACTIONS` to completion (persisted before it returns) and
    gives the answer's fields; it raises :class:`StateConflict` when the trading state forbids the action.
    """

    token: str
    ready: bool

    def health(self) -> tuple[int, dict[str, Any]]: ...

    def metrics(self) -> dict[str, Any]: ...

    def scrape_view(self) -> ScrapeView:
        """Latency histograms and clocks for the Prometheus exposition (alphapulse.prometheus)."""
        ...

    def operator_action(self, action: str, reason: str) -> dict[str, Any]: ...

    def trading_state(self) -> str: ...

    def wedge_engine(self) -> None:
        """Fault injection: the engine task stops consuming candles (as a task stuck on an await would)."""
        ...


DAEMON: web.AppKey[ControlTarget] = web.AppKey("daemon")
PROMETHEUS: web.AppKey[CollectorRegistry] = web.AppKey("prometheus")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return _json({"error": message, "status": status, **extra}, status)


#: Public names for the JSON helpers, so the package's other servers (the monitor) answer in the same shape.
json_response = _json
error_response = _error


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into a JSON answer: 4xx for the client's mistakes, 500 (logged) for ours."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        msg = {404: "not found", 405: "method not allowed"}.get(e.status, e.reason)
        extra: dict[str, Any] = {}
        if e.status == 405:
            extra["allowed"] = sorted(getattr(e, "allowed_methods", ()) or ())
        return _error(e.status, msg, path=request.path, **extra)
    except asyncio.CancelledError:
        raise
    except Exception as e:
        log.error("control request failed", path=request.path, error=repr(e), exc_info=e)
        return _error(500, "internal error; see the daemon log")


def check_bearer(header: str, token: str) -> web.Response | None:
    """None when ``header`` is ``Bearer <token>``; else the 401 answer.  Shared by every process whose POSTs
    take the control token (the daemon's control API, the monitor's acknowledgements)."""
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        return _error(401, "missing bearer token", how="send 'Authorization: Bearer <token>'; the token is "
                      "ALPHAPULSE_CONTROL_TOKEN or the control_token file in the state directory")
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        return _error(401, "wrong bearer token", how="send 'Authorization: Bearer <token>'; the token is "
                      "ALPHAPULSE_CONTROL_TOKEN or the control_token file in the state directory")
    return None


def _authorized(request: web.Request) -> web.Response | None:
    return check_bearer(request.headers.get("Authorization", ""), request.app[DAEMON].token)


def ensure_control_token(settings: Settings) -> tuple[str, Path | None]:
    """The configured token, or the one in ``<data_dir>/control_token``, created (mode 0600) when missing.

    The daemon and the monitor both call this and may start at the same moment: the file is written under a
    temporary name and hard-linked into place, so exactly one token wins and the loser reads the winner's.
    """
    if settings.control_token:
        return settings.control_token, None
    path = settings.data_dir / "control_token"
    for _ in range(3):
        try:
            token = path.read_text().strip()
            if token:
                return token, path
        except FileNotFoundError:
            pass
        token = secrets.token_urlsafe(32)
        tmp = path.with_name(f".control_token.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (token + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
            return token, path
        except FileExistsError:
            continue  # another process made it first: read theirs
        finally:
            tmp.unlink(missing_ok=True)
    raise OSError(f"cannot create or read {path}")


#: Public names for the JSON helpers, so other servers of the package answer in the same shape.
async def _body(request: web.Request) -> dict[str, Any] | web.Response:
    """Optional JSON object body ({} when empty); a malformed one is a 400."""
    if not request.body_exists:
        return {}
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _error(400, "body is not valid JSON")
    if not isinstance(data, dict):
        return _error(400, "body must be a JSON object")
    return data


async def health(request: web.Request) -> web.Response:
    status, body = request.app[DAEMON].health()
    return _json(body, status)


async def metrics(request: web.Request) -> web.Response:
    """JSON by default; the Prometheus text format with ``?format=prometheus`` or ``Accept: text/plain``.

    The Prometheus answer is collected at this moment from the daemon's state by the app's own registry, on the
    loop thread like the JSON view (the state is only consistent there), then formatted in slices (see
    alphapulse.prometheus.render).
    """
    fmt = request.query.get("format", "")
    if fmt not in ("", "json", "prometheus"):
        return _error(400, "format must be json or prometheus")
    accept = request.headers.get("Accept", "")
    if fmt == "prometheus" or (fmt == "" and "text/plain" in accept and "application/json" not in accept):
        body = await render(request.app[PROMETHEUS])
        return web.Response(body=body, headers={"Content-Type": PROMETHEUS_CONTENT_TYPE})
    return _json(request.app[DAEMON].metrics())


def _action(name: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        denied = _authorized(request)
        if denied is not None:
            return denied
        body = await _body(request)
        if isinstance(body, web.Response):
            return body
        target = request.app[DAEMON]
        if not target.ready:
            return _error(503, "daemon is starting; retry shortly")
        try:
            answer = target.operator_action(name, _reason(body))
        except StateConflict as e:
            return _error(409, str(e), state=target.trading_state())
        except ValueError as e:
            return _error(400, str(e))
        log.warning("operator action", action=name, state=target.trading_state(), remote=request.remote or "?")
        return _json({"ok": True, "action": name, **answer})

    return handler


def _reason(body: dict[str, Any]) -> str:
    r = body.get("reason", "operator")
    if not isinstance(r, str) or len(r) > 200:
        raise ValueError("reason must be a string of at most 200 characters")
    return r


async def debug_wedge(request: web.Request) -> web.Response:
    """Fault injection (config control.fault_injection): the engine task stops consuming candles."""
    denied = _authorized(request)
    if denied is not None:
        return denied
    request.app[DAEMON].wedge_engine()
    return _json({"ok": True, "wedged": "engine"})


async def debug_block_loop(request: web.Request) -> web.Response:
    """Fault injection: block the event loop for ``seconds`` (as a CPU-bound bug would)."""
    denied = _authorized(request)
    if denied is not None:
        return denied
    try:
        seconds = float(request.query.get("seconds", "5"))
    except ValueError:
        return _error(400, "seconds must be a number")
    if not 0 < seconds <= 120:
        return _error(400, "seconds must be in (0, 120]")
    time.sleep(seconds)  # deliberately blocking: that is the fault being injected
    return _json({"ok": True, "blocked_s": seconds})


def create_app(target: ControlTarget, fault_injection: bool = False) -> web.Application:
    app = web.Application(middlewares=[errors_as_json], client_max_size=64 * 1024)
    app[DAEMON] = target
    app[PROMETHEUS] = new_registry(target)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    for name in OPERATOR_ACTIONS:
        app.router.add_post(f"/{name}", _action(name))
    if fault_injection:
        app.router.add_post("/debug/wedge_engine", debug_wedge)
        app.router.add_post("/debug/block_loop", debug_block_loop)
    return app


async def start_control_server(target: ControlTarget, host: str, port: int, *,
                               fault_injection: bool = False) -> web.AppRunner:
    runner = web.AppRunner(create_app(target, fault_injection), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise ControlServerError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return runner


class ControlServerError(Exception):
    pass
