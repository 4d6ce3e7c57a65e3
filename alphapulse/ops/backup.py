"""Backups of the daemon's state, logs, configuration and models: create, list, verify, restore, prune.

A backup is a directory ``<backup dir>/alphapulse-<type>-<YYYYMMDDTHHMMSSZ>[-n]/`` holding ``payload.tar.gz``
(``payload.tar.gz.enc`` when it carries secrets) and ``manifest.json``, written last, so a directory without a
manifest is an unfinished backup that nothing reads.  The manifest names every file with its size and sha256,
the payload's own sha256, and what was left out as secret.

Why it is built this way:

* **Consistent while the daemon trades.** Every ``*.db`` of the state directory is copied with SQLite's online
  backup API inside one read transaction (never a file copy of a live WAL database), checked with
  ``PRAGMA integrity_check`` and stored in rollback-journal mode, so the copy is one self-contained file.  The
  log directory is copied *before* the databases: the daemon appends an operator-file line only after its
  commit, so the copied files never hold a record the copied database lacks, and the daemon's start-up
  reconciliation (:meth:`alphapulse.store.OperatorFiles.reconcile`) appends whatever they miss.  Log files are
  cut at their last complete line.
* **Secrets stay out** of a backup unless ``--include-secrets``: values of secret keys in ``*.env`` files are
  commented out, secret YAML values blanked, the ``control_token`` file skipped.  With ``--include-secrets`` the
  payload is encrypted (:mod:`alphapulse.ops.backup_crypto`) and a missing key is refused.
* **Restore is refused while the daemon runs.** The check is a kernel lock, not a port probe: every open SQLite
  connection to a WAL database holds a POSIX read lock on byte 128 of its ``-shm`` file (SQLite's "DMS" lock,
  released by the kernel when the process dies), and ``F_GETLK`` names the holder's pid.  A daemon on another
  port, or a wedged one that no longer answers HTTP, is still seen; a crashed one is not.  It also catches any
  other process with the database open (the monitor), which must not see its files replaced either.
* **Restore changes exactly what the dry run lists**: files added, changed (sha256 differs) and removed (in the
  component's directory but not in the backup; stale ``-wal``/``-shm`` files always, never a secret the backup
  left out).  Before changing anything it takes a ``prerestore`` backup of what it will replace.
* **Prune** keeps, per backup type, the newest backup of each of the last N days / ISO weeks / months that have
  one (the restic/borg rule), judged by the UTC time in the names, plus the newest of each type.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import sqlite3
import sys
import tarfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from alphapulse import __version__
from alphapulse.config import ConfigError, Settings
from alphapulse.filehash import sha256_file, sha256_stream
from alphapulse.ops.backup_crypto import KEY_ENV, BackupCryptoError, check_passphrase, decrypt_bytes, encrypt_file
from alphapulse.ops.backup_secrets import merge_env, merge_yaml, sanitize_env, sanitize_yaml
from alphapulse.ops.inuse import databases_in_use

COMPONENTS = ("config", "data", "models", "logs")
#: What each ``--type`` backs up, in the order it is copied: logs before data (see the module docstring).
TYPES: dict[str, tuple[str, ...]] = {
    "full": ("logs", "config", "models", "data"),
    "data": ("data",),
    "config": ("config",),
    "models": ("models",),
    "logs": ("logs",),
}
PRE_RESTORE = "prerestore"
MANIFEST = "manifest.json"
PAYLOAD = "payload.tar.gz"
PAYLOAD_ENC = "payload.tar.gz.enc"
FORMAT = 1
BACKUP_DIR_ENV = "ALPHAPULSE_BACKUP_DIR"
NAME_RE = re.compile(r"^alphapulse-(?P<type>[a-z]+)-(?P<ts>\d{8}T\d{6}Z)(?:-(?P<n>\d+))?$")
SECRET_FILES = ("control_token",)
SQLITE_SIDE = ("-wal", "-shm", "-journal")

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class BackupError(Exception):
    """A backup operation failed or was refused; ``code`` is the CLI's exit status."""

    def __init__(self, message: str, code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------------------------------
# Where things are
# --------------------------------------------------------------------------------------------------


def default_backup_dir(settings: Settings, env: Mapping[str, str] | None = None) -> Path:
    """``$ALPHAPULSE_BACKUP_DIR``, else a ``backups`` folder beside the state directory (``var/data`` ->
    ``var/backups``): beside it, not inside, so a restore of the state directory never touches the backups."""
    value = (os.environ if env is None else env).get(BACKUP_DIR_ENV, "")
    if value:
        return Path(value).expanduser()
    return settings.data_dir.expanduser().absolute().parent / "backups"


@dataclass(frozen=True)
class Roots:
    """The directories a backup reads and a restore writes, all from the daemon's own settings."""

    data_dir: Path
    log_dir: Path
    config_dir: Path | None
    model_path: Path | None
    backup_dir: Path

    @classmethod
    def from_settings(cls, s: Settings, env: Mapping[str, str] | None = None) -> Roots:
        return cls(s.data_dir.absolute(), s.log_dir.absolute(),
                   s.config_dir.absolute() if s.config_dir is not None else None,
                   s.model_path.absolute() if s.model_path is not None else None,
                   default_backup_dir(s, env).absolute())

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    def root(self, component: str) -> Path:
        if component == "config":
            if self.config_dir is None:
                raise ConfigError("environment", "ALPHAPULSE_CONFIG_DIR",
                                  "no configuration directory to back up or restore (set it or pass --config-dir)")
            return self.config_dir
        return {"data": self.data_dir, "logs": self.log_dir, "models": self.models_dir}[component]


# --------------------------------------------------------------------------------------------------
# Creating a backup
# --------------------------------------------------------------------------------------------------


@dataclass
class _Source:
    arcname: str
    path: Path
    kind: str  # sqlite | lines | env | yaml | file | link


def _plain_files(d: Path) -> list[Path]:
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if not p.name.startswith(".") and (p.is_file() or p.is_symlink())
                  and not p.is_dir())


def _sources(roots: Roots, component: str, include_secrets: bool) -> tuple[list[_Source], list[dict[str, Any]]]:
    """What one component backs up, and what it leaves out as secret."""
    src: list[_Source] = []
    left: list[dict[str, Any]] = []
    if component == "logs":
        src = [_Source(f"logs/{p.name}", p, "lines") for p in _plain_files(roots.log_dir)]
    elif component == "config":
        for p in _plain_files(roots.root("config")):
            kind = "env" if p.suffix == ".env" else "yaml" if p.suffix in (".yaml", ".yml") else "file"
            src.append(_Source(f"config/{p.name}", p, kind))
    elif component == "data":
        for p in _plain_files(roots.data_dir):
            if p.name.endswith(SQLITE_SIDE) or p == roots.backup_dir:
                continue
            if p.name in SECRET_FILES and not include_secrets:
                left.append({"path": f"data/{p.name}"})
                continue
            src.append(_Source(f"data/{p.name}", p, "sqlite" if p.suffix == ".db" else "file"))
    elif component == "models":
        if roots.models_dir.is_dir():
            for p in sorted(roots.models_dir.rglob("*")):
                rel = p.relative_to(roots.models_dir).as_posix()
                if p.is_symlink():
                    src.append(_Source(f"models/store/{rel}", p, "link"))
                elif p.is_file():
                    src.append(_Source(f"models/store/{rel}", p, "file"))
        mp = roots.model_path
        if mp is not None and mp.is_file() and not mp.resolve().is_relative_to(roots.models_dir.resolve()):
            src.append(_Source(f"models/configured/{mp.name}", mp, "file"))
    return src, left


def _copy_lines(src: Path, dst: Path) -> None:
    """Copy a file the daemon appends to, up to its last complete line (a line being written now is the next
    backup's)."""
    with open(src, "rb") as f:
        data = f.read()
    cut = data.rfind(b"\n") + 1
    dst.write_bytes(data[:cut])


def sqlite_snapshot(src: Path, dst: Path) -> dict[str, Any]:
    """A consistent copy of a (possibly live) SQLite database through the online backup API, integrity-checked
    and switched to rollback-journal mode so the copy is one self-contained file; returns a few counts."""
    con = sqlite3.connect(src, timeout=30)
    try:
        out = sqlite3.connect(dst)
        try:
            con.backup(out)  # one step: one read transaction, a snapshot of one committed state
            out.execute("PRAGMA journal_mode=DELETE")
            check = out.execute("PRAGMA integrity_check").fetchone()[0]
            if check != "ok":
                raise BackupError(f"{src}: the copy fails PRAGMA integrity_check: {check}")
            return _db_summary(out)
        finally:
            out.close()
    finally:
        con.close()


def _db_summary(con: sqlite3.Connection) -> dict[str, Any]:
    tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
    info: dict[str, Any] = {"tables": {t: con.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] for t in tables}}
    if "decisions" in tables:
        info["last_candle_ts"] = con.execute("SELECT MAX(candle_ts) FROM decisions").fetchone()[0]
    return info


def _stage(s: _Source, dst: Path, include_secrets: bool, left: list[dict[str, Any]],
           dbs: dict[str, Any]) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if s.kind == "sqlite":
        dbs[s.arcname] = sqlite_snapshot(s.path, dst)
    elif s.kind == "lines":
        _copy_lines(s.path, dst)
    elif s.kind in ("env", "yaml") and not include_secrets:
        text = s.path.read_text(encoding="utf-8")
        clean, keys = (sanitize_env if s.kind == "env" else sanitize_yaml)(text)
        if keys:
            left.append({"path": s.arcname, "keys": keys})
        dst.write_text(clean, encoding="utf-8")
    else:
        shutil.copyfile(s.path, dst)


def _backup_name(btype: str, now: float, backup_dir: Path) -> Path:
    stamp = datetime.fromtimestamp(now, tz=UTC).strftime("%Y%m%dT%H%M%SZ")
    for n in range(1, 1000):
        path = backup_dir / (f"alphapulse-{btype}-{stamp}" + (f"-{n}" if n > 1 else ""))
        try:
            path.mkdir()  # exclusive: two runs in the same second get two names
            return path
        except FileExistsError:
            continue
    raise BackupError(f"cannot name a new backup in {backup_dir}")


def _fsync_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def create_backup(roots: Roots, btype: str, *, include_secrets: bool = False, passphrase: str | None = None,
                  now: float | None = None, components: Sequence[str] | None = None) -> Path:
    """Make one backup; returns its directory.  Reads the live state without stopping the daemon."""
    if btype not in TYPES and btype != PRE_RESTORE:
        raise BackupError(f"unknown backup type {btype!r} (one of {', '.join(TYPES)})", EXIT_USAGE)
    if include_secrets and (why := check_passphrase(passphrase)):
        raise ConfigError("environment", KEY_ENV, f"--include-secrets encrypts the backup and needs a key: {why}")
    if components is None:
        components = TYPES.get(btype, TYPES["full"])
    else:  # a subset, still in the safe copying order
        components = tuple(c for c in TYPES["full"] if c in components)
    plan: list[_Source] = []
    left: list[dict[str, Any]] = []
    for comp in components:
        if comp == "config" and roots.config_dir is None and btype != "config":
            continue  # built-in defaults only: nothing to back up
        srcs, lo = _sources(roots, comp, include_secrets)
        plan += srcs
        left += lo
    try:
        roots.backup_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not os.access(roots.backup_dir, os.W_OK):
            raise PermissionError(13, "not writable")
    except OSError as e:
        raise ConfigError("environment", BACKUP_DIR_ENV,
                          f"cannot write backups to {roots.backup_dir}: {e.strerror or e}") from None
    now = time.time() if now is None else now
    bdir = _backup_name(btype, now, roots.backup_dir)
    staging = bdir / ".staging"
    try:
        files: list[dict[str, Any]] = []
        dbs: dict[str, Any] = {}
        staging.mkdir()
        for s in plan:  # in component order: logs before data
            dst = staging / s.arcname
            if s.kind == "link":
                files.append({"path": s.arcname, "link": os.readlink(s.path), "component": s.arcname.split("/")[0]})
                continue
            try:
                _stage(s, dst, include_secrets, left, dbs)
            except FileNotFoundError:
                continue  # rotated away between listing and copying
            st = dst.stat()
            files.append({"path": s.arcname, "size": st.st_size, "sha256": sha256_file(dst),
                          "mode": s.path.stat().st_mode & 0o777, "mtime": int(s.path.stat().st_mtime),
                          "component": s.arcname.split("/")[0], "kind": s.kind})
        plain = bdir / PAYLOAD
        with tarfile.open(plain, "w:gz", compresslevel=6) as tar:
            for f in files:
                if "link" in f:
                    ti = tarfile.TarInfo(f["path"])
                    ti.type, ti.linkname = tarfile.SYMTYPE, f["link"]
                    tar.addfile(ti)
                else:
                    tar.add(staging / f["path"], arcname=f["path"], recursive=False)
        shutil.rmtree(staging)
        payload = plain
        if include_secrets:
            assert passphrase is not None
            payload = bdir / PAYLOAD_ENC
            encrypt_file(plain, payload, passphrase)
            plain.unlink()
        with open(payload, "rb") as fh:
            os.fsync(fh.fileno())
        size = payload.stat().st_size
        digest = sha256_file(payload)  # read back from disk: what is recorded is what was written
        manifest = {
            "format": FORMAT, "name": bdir.name, "type": btype, "components": list(components),
            "created": datetime.fromtimestamp(now, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "created_epoch": now, "host": socket.gethostname(), "alphapulse_version": __version__,
            "encrypted": include_secrets, "include_secrets": include_secrets,
            "payload": {"file": payload.name, "size": size, "sha256": digest},
            "sources": {"data": str(roots.data_dir), "logs": str(roots.log_dir),
                        "config": str(roots.config_dir) if roots.config_dir else None,
                        "model_path": str(roots.model_path) if roots.model_path else None},
            "files": files, "left_out": left, "databases": dbs,
        }
        # verified before it counts: the archive read back, every file against its hash, each database checked
        problems = verify_backup(bdir, passphrase, manifest)
        if problems:
            raise BackupError(f"the new backup fails verification, removed: {'; '.join(problems)}")
        _fsync_write(bdir / MANIFEST, json.dumps(manifest, indent=1).encode())
    except BaseException:
        shutil.rmtree(bdir, ignore_errors=True)
        raise
    return bdir


# --------------------------------------------------------------------------------------------------
# Reading backups
# --------------------------------------------------------------------------------------------------


def read_manifest(bdir: Path) -> dict[str, Any]:
    try:
        m = json.loads((bdir / MANIFEST).read_text())
    except FileNotFoundError:
        raise BackupError(f"{bdir.name}: no manifest (an unfinished or foreign backup)") from None
    except (OSError, ValueError) as e:
        raise BackupError(f"{bdir.name}: unreadable manifest: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("files"), list):
        raise BackupError(f"{bdir.name}: not a format-{FORMAT} AlphaPulse backup manifest")
    for f in m["files"]:  # a restore writes to paths built from these names: none may leave its directory
        path = f.get("path") if isinstance(f, dict) else None
        parts = path.split("/") if isinstance(path, str) else []
        if (len(parts) < 2 or parts[0] not in COMPONENTS or f.get("component") != parts[0]
                or any(p in ("", ".", "..") for p in parts) or "\0" in path):  # type: ignore[operator]
            raise BackupError(f"{bdir.name}: manifest names an unsafe or foreign path: {path!r}")
    return m


def iter_backups(backup_dir: Path) -> Iterator[tuple[Path, dict[str, Any] | None, str | None]]:
    """(directory, manifest or None, problem or None) for each backup-named directory, oldest first."""
    if not backup_dir.is_dir():
        return
    for p in sorted(backup_dir.iterdir(), key=lambda p: _name_time(p.name) or 0.0):
        if not p.is_dir() or not NAME_RE.match(p.name):
            continue
        try:
            m = read_manifest(p)
        except BackupError as e:
            yield p, None, str(e)
            continue
        payload = p / m["payload"]["file"]
        problem = None
        if not payload.is_file():
            problem = f"payload {payload.name} missing"
        elif payload.stat().st_size != m["payload"]["size"]:
            problem = f"payload {payload.name} is {payload.stat().st_size} bytes, manifest says {m['payload']['size']}"
        yield p, m, problem


def _name_time(name: str) -> float | None:
    m = NAME_RE.match(name)
    if not m:
        return None
    t = datetime.strptime(m.group("ts"), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    return t + int(m.group("n") or 1) * 1e-3  # -2, -3: made later in the same second


def latest_backup_time(backup_dir: Path) -> float | None:
    """Epoch seconds of the newest complete backup (manifest present, payload the recorded size), else None.

    Creation verifies every backup (:func:`verify_backup`) before it writes the manifest, so a manifest is only
    there for a backup verified at creation; the size check catches a payload truncated since (``verify`` rereads
    everything, too slow for a health check)."""
    best: float | None = None
    for _p, m, problem in iter_backups(backup_dir):
        if m is not None and problem is None:
            t = float(m["created_epoch"])
            best = t if best is None or t > best else best
    return best


def _open_payload(bdir: Path, m: dict[str, Any], passphrase: str | None) -> tarfile.TarFile:
    payload = bdir / m["payload"]["file"]
    if sha256_file(payload) != m["payload"]["sha256"]:
        raise BackupError(f"{bdir.name}: {payload.name}: sha256 differs from the manifest (damaged or tampered)")
    if m.get("encrypted"):
        if why := check_passphrase(passphrase):
            raise ConfigError("environment", KEY_ENV, f"backup {bdir.name} is encrypted: {why}")
        assert passphrase is not None
        try:
            data = decrypt_bytes(payload.read_bytes(), passphrase)
        except BackupCryptoError as e:
            raise BackupError(f"{bdir.name}: {e}") from None
        return tarfile.open(fileobj=io.BytesIO(data), mode="r:gz")
    return tarfile.open(payload, "r:gz")


def verify_backup(bdir: Path, passphrase: str | None = None, manifest: dict[str, Any] | None = None) -> list[str]:
    """Every problem found: payload hash, each file's sha256 and presence, and each database's integrity.
    ``manifest``: check against this one instead of the directory's (a backup being created has none yet)."""
    m = read_manifest(bdir) if manifest is None else manifest
    problems: list[str] = []
    try:
        tar = _open_payload(bdir, m, passphrase)
    except BackupError as e:
        return [str(e)]
    want = {f["path"]: f for f in m["files"]}
    seen: set[str] = set()
    with tar:
        for ti in tar:
            f = want.get(ti.name)
            if f is None:
                problems.append(f"{ti.name}: in the archive but not in the manifest")
                continue
            seen.add(ti.name)
            if "link" in f:
                if not ti.issym() or ti.linkname != f["link"]:
                    problems.append(f"{ti.name}: symlink target differs from the manifest")
                continue
            fobj = tar.extractfile(ti)
            if fobj is None:
                problems.append(f"{ti.name}: not a regular file in the archive")
                continue
            if f.get("kind") == "sqlite":
                problems += _check_db(ti.name, fobj, f["sha256"])
            elif sha256_stream(fobj) != f["sha256"]:
                problems.append(f"{ti.name}: sha256 differs from the manifest (damaged or tampered)")
    problems += [f"{p}: in the manifest but missing from the archive" for p in sorted(set(want) - seen)]
    return problems


def _check_db(name: str, fobj: IO[bytes], sha: str) -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="alphapulse-verify-") as tmp:
        path = Path(tmp) / "check.db"
        with open(path, "wb") as out:
            digest = sha256_stream(fobj, out)
        if digest != sha:
            return [f"{name}: sha256 differs from the manifest (damaged or tampered)"]
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            res = con.execute("PRAGMA integrity_check").fetchone()[0]
        except sqlite3.DatabaseError as e:
            res = str(e)
        finally:
            con.close()
        return [] if res == "ok" else [f"{name}: PRAGMA integrity_check: {res}"]


# --------------------------------------------------------------------------------------------------
# Restore
# --------------------------------------------------------------------------------------------------


@dataclass
class Change:
    action: str  # added | changed | removed | unchanged
    arcname: str
    target: Path


@dataclass
class RestorePlan:
    backup: str
    components: list[str]
    changes: list[Change] = field(default_factory=list)

    def by(self, action: str) -> list[Change]:
        return [c for c in self.changes if c.action == action]


def _target(roots: Roots, m: dict[str, Any], arcname: str) -> Path:
    comp, _, rest = arcname.partition("/")
    if comp == "models":
        where, _, rel = rest.partition("/")
        if where == "store":
            return roots.models_dir / rel
        # the configured model file: where the configuration in force names it, else where it was
        if roots.model_path is not None:
            return roots.model_path
        original = m.get("sources", {}).get("model_path")
        return Path(original) if original else roots.models_dir / rel
    return roots.root(comp) / rest


def _scope(roots: Roots, comp: str) -> dict[Path, str]:
    """Files now in a component's directory that a restore of it replaces or removes: target -> arcname."""
    if comp == "models":
        d = roots.models_dir
        if not d.is_dir():
            return {}
        return {p: f"models/store/{p.relative_to(d).as_posix()}" for p in d.rglob("*")
                if p.is_file() or p.is_symlink()}
    if comp == "config" and roots.config_dir is None:
        return {}
    root = roots.root(comp)
    return {p: f"{comp}/{p.name}" for p in _plain_files(root) if p != roots.backup_dir}


def _current_hash(p: Path) -> str | None:
    if p.is_symlink():
        return "link:" + os.readlink(p)
    return sha256_file(p) if p.is_file() else None


def _desired(f: dict[str, Any], data: bytes | None, target: Path) -> tuple[str, bytes | None]:
    """(hash of what the restore writes, those bytes when they differ from the archive's: a configuration file
    whose left-out secrets are taken from the file in place)."""
    if "link" in f:
        return "link:" + f["link"], None
    if f.get("kind") in ("env", "yaml") and data is not None:
        cur = target.read_text(encoding="utf-8") if target.is_file() else None
        merge = merge_env if f["kind"] == "env" else merge_yaml
        merged = merge(data.decode("utf-8"), cur).encode("utf-8")
        return hashlib.sha256(merged).hexdigest(), merged
    return str(f["sha256"]), None


def plan_restore(bdir: Path, roots: Roots, components: Sequence[str] | None = None,
                 passphrase: str | None = None) -> tuple[RestorePlan, dict[str, bytes]]:
    """What a restore would do, after checking every archived file against its manifest hash.  Returns the plan
    and the bytes to write for files whose content is not the archive's (configuration with secrets merged)."""
    m = read_manifest(bdir)
    comps = list(components) if components else [c for c in m["components"]]
    bad = [c for c in comps if c not in m["components"]]
    if bad:
        raise BackupError(f"{bdir.name} ({m['type']}) has no {', '.join(bad)} (it has {', '.join(m['components'])})",
                          EXIT_USAGE)
    files = {f["path"]: f for f in m["files"] if f["component"] in comps}
    problems = verify_backup(bdir, passphrase)
    if problems:
        raise BackupError(f"{bdir.name} fails verification, nothing restored: " + "; ".join(problems))
    envs: dict[str, bytes] = {}
    small: dict[str, bytes] = {}
    with _open_payload(bdir, m, passphrase) as tar:
        for ti in tar:
            f = files.get(ti.name)
            if f is not None and f.get("kind") in ("env", "yaml") and (fo := tar.extractfile(ti)) is not None:
                small[ti.name] = fo.read()
    plan = RestorePlan(bdir.name, comps)
    protected = {lo["path"] for lo in m.get("left_out", []) if "keys" not in lo}  # secret files left out
    targets: set[Path] = set()
    for arc, f in files.items():
        target = _target(roots, m, arc)
        targets.add(target)
        want, content = _desired(f, small.get(arc), target)
        if content is not None:
            envs[arc] = content
        have = _current_hash(target) if (target.exists() or target.is_symlink()) else None
        action = "added" if have is None else "unchanged" if have == want else "changed"
        plan.changes.append(Change(action, arc, target))
    for comp in comps:
        for p, arc in sorted(_scope(roots, comp).items()):
            if p not in targets and arc not in protected:
                plan.changes.append(Change("removed", arc, p))
    return plan, envs


def restore_backup(bdir: Path, roots: Roots, components: Sequence[str] | None = None, *, dry_run: bool = False,
                   passphrase: str | None = None, now: float | None = None) -> tuple[RestorePlan, Path | None]:
    """Restore (or with ``dry_run`` only plan) a backup into ``roots``; returns the plan and the pre-restore backup.

    Refused while any process has a database of the state directory open (see :func:`databases_in_use`)."""
    busy = databases_in_use(roots.data_dir)
    who = "; ".join(f"{db.name} is open by pid {pid} ({cmd})" for db, pid, cmd in busy)
    if busy and not dry_run:
        raise BackupError(f"restore refused: the daemon (or another process) has the state open: {who}; stop it first "
                          "(systemctl stop alphapulse-trading) and run the restore again")
    plan, envs = plan_restore(bdir, roots, components, passphrase)
    if dry_run:
        if busy:
            print(f"alphapulse backup: note: the state is in use ({who}): the real restore will be refused until "
                  "it stops, and its files change meanwhile", file=sys.stderr)
        return plan, None
    pre: Path | None = None
    touched = plan.by("changed") + plan.by("removed")
    if touched:
        pre = create_backup(roots, PRE_RESTORE, now=now, components=plan.components)
    m = read_manifest(bdir)
    files = {f["path"]: f for f in m["files"]}
    for c in plan.by("removed"):
        c.target.unlink(missing_ok=True)
    write = {c.arcname: c for c in plan.changes if c.action in ("added", "changed")}
    for c in write.values():  # a restored database must never meet a stale WAL of the one it replaces
        if files[c.arcname].get("kind") == "sqlite":
            for side in SQLITE_SIDE:
                Path(f"{c.target}{side}").unlink(missing_ok=True)
    with _open_payload(bdir, m, passphrase) as tar:
        for ti in tar:
            change = write.get(ti.name)
            if change is None:
                continue
            c, f = change, files[ti.name]
            c.target.parent.mkdir(parents=True, exist_ok=True)
            tmp = c.target.with_name(f".{c.target.name}.restore-tmp")
            if "link" in f:
                tmp.unlink(missing_ok=True)
                os.symlink(f["link"], tmp)
                os.replace(tmp, c.target)
                continue
            fobj = tar.extractfile(ti)
            assert fobj is not None
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, f.get("mode", 0o600) or 0o600)
            with os.fdopen(fd, "wb") as out:
                if ti.name in envs:
                    out.write(envs[ti.name])
                elif sha256_stream(fobj, out) != f["sha256"]:
                    raise BackupError(f"{ti.name}: sha256 changed while restoring; {c.target} left as it was")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, c.target)
            os.utime(c.target, (f.get("mtime", time.time()), f.get("mtime", time.time())))
    for d in {c.target.parent for c in plan.changes}:
        if d.is_dir():
            dfd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    return plan, pre


# --------------------------------------------------------------------------------------------------
# Prune
# --------------------------------------------------------------------------------------------------


def _type_of(name: str) -> str | None:
    m = NAME_RE.match(name)
    return m.group("type") if m else None


def select_kept(names: Iterable[str], keep_daily: int, keep_weekly: int, keep_monthly: int = 0) -> set[str]:
    """The backups a prune keeps, from their names alone (pure, so the rule is tested without a clock).

    Per type: the newest backup, and the newest of each of the last ``keep_daily`` days (``keep_weekly`` ISO
    weeks, ``keep_monthly`` months) that have a backup.  Names that are not backup names are always kept."""
    by_type: dict[str, list[tuple[datetime, str]]] = {}
    kept: set[str] = set()
    for n in names:
        m = NAME_RE.match(n)
        if not m:
            kept.add(n)
            continue
        t = datetime.strptime(m.group("ts"), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        by_type.setdefault(m.group("type"), []).append((t, n))
    for items in by_type.values():
        items.sort(key=lambda x: (x[0], _name_time(x[1]) or 0.0), reverse=True)
        kept.add(items[0][1])
        for count, period in ((keep_daily, "%Y-%m-%d"), (keep_weekly, "%G-W%V"), (keep_monthly, "%Y-%m")):
            seen: set[str] = set()
            for t, n in items:
                key = t.strftime(period)
                if key in seen:
                    continue
                seen.add(key)
                if len(seen) > count:
                    break
                kept.add(n)
    return kept


def prune_backups(backup_dir: Path, keep_daily: int, keep_weekly: int, keep_monthly: int = 0,
                  btype: str | None = None, dry_run: bool = False) -> tuple[list[str], list[str]]:
    """Delete the backups :func:`select_kept` does not keep (of one type, or all); returns (kept, removed)."""
    names = [p.name for p, _m, _problem in iter_backups(backup_dir) if btype is None or _type_of(p.name) == btype]
    keep = select_kept(names, keep_daily, keep_weekly, keep_monthly)
    removed = [n for n in names if n not in keep]
    if not dry_run:
        for n in removed:
            shutil.rmtree(backup_dir / n)
    return [n for n in names if n in keep], removed


