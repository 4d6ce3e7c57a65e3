"""sd_notify(3) and the systemd watchdog interval, shared by every long-running process of the package.

Its own module (not the daemon's) so that a light process such as ``alphapulse monitor`` can talk to systemd
without importing the trading stack (onnxruntime, numpy) it does not need.
"""

from __future__ import annotations

import os

from alphapulse.log import get_logger

log = get_logger("alphapulse.sdnotify")


class SystemdNotifier:
    """sd_notify(3) over $NOTIFY_SOCKET; a no-op outside systemd. Datagrams never block."""

    def __init__(self) -> None:
        import socket

        addr = os.environ.get("NOTIFY_SOCKET")
        self._sock: socket.socket | None = None
        self._addr: str | bytes | None = None
        if addr:
            self._addr = "\0" + addr[1:] if addr.startswith("@") else addr
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, msg: str) -> bool:
        if self._sock is None or self._addr is None:
            return False
        try:
            self._sock.sendto(msg.encode(), self._addr)
            return True
        except OSError as e:
            log.warning("sd_notify failed", error=str(e))
            return False


def watchdog_interval_s() -> float | None:
    """Half of systemd's WatchdogSec (sd_watchdog_enabled semantics), or None when not supervised."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        return max(0.05, int(usec) / 2e6)
    except ValueError:
        return None
