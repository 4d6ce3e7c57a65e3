"""Is the trading daemon (or anything else) using the state directory's databases?  Asked before a restore.

The check is a kernel lock, not a port probe: every open SQLite connection to a WAL database holds a POSIX read
lock on byte 128 of its ``-shm`` file (SQLite's "dead man switch", released by the kernel when the process
dies), and ``F_GETLK`` names the holder's pid without taking the lock.  So a daemon on another port, or a
wedged one that no longer answers HTTP, is seen, a crashed one is not, and any other process with a database
open (the monitor) counts too: none of them may have the files replaced under it.  Locks held by the calling
process itself are invisible to ``F_GETLK``, so callers ask before opening any database themselves.
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

#: POSIX lock offset of SQLite's dead-man-switch byte in a WAL ``-shm`` file (120 + 8 lock slots).
SHM_DMS_OFFSET = 128


def shm_lock_holder(db: Path) -> int | None:
    """Pid of a process that has this WAL database open (None when no process does).

    Reads the lock without taking it (``F_GETLK``).  Locks of the calling process itself are invisible to it,
    which is why the CLI checks before it opens any database.
    """
    shm = Path(f"{db}-shm")
    try:
        fd = os.open(shm, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None  # a WAL database that is open always has its -shm file
    try:
        probe = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, SHM_DMS_OFFSET, 1, 0)
        l_type, _whence, _start, _len, pid = struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, probe))
    finally:
        os.close(fd)
    return None if l_type == fcntl.F_UNLCK else int(pid)


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return " ".join(raw.decode(errors="replace").replace("\0", " ").split())[:200]  # one line, whatever argv holds


def databases_in_use(data_dir: Path) -> list[tuple[Path, int, str]]:
    """(database, pid, command line) for every ``*.db`` in the state directory another process has open."""
    out = []
    for db in sorted(data_dir.glob("*.db")) if data_dir.is_dir() else []:
        pid = shm_lock_holder(db)
        if pid is not None:
            out.append((db, pid, _cmdline(pid)))
    return out
