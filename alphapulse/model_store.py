"""Versioned model files under the state directory, and the ``active`` pointer the daemon starts from.

Layout (``<data_dir>/models/``)::

    <version>/model.onnx       the model, byte for byte as imported
    <version>/metadata.json    what `alphapulse model list` shows without opening ONNX Runtime: version, kind,
                               timeframe, feature set, training range, sha256, when and from where it was imported
    active.json                {"active": "<version>", "previous": "<version>" | null, "changed": "<time>"}
    .lock                      flock(2) held while a command changes the store

Why a single pointer file for both ``active`` and ``previous``: one ``rename(2)`` replaces it, so a reader (the
daemon starting, ``model list``) sees the old pair or the new pair, never an active version without its
previous one; the file is fsynced before the rename and the directory after it, so a power cut cannot leave
an empty pointer.  A version's directory is written under a temporary name and renamed into place for the same
reason: a version that ``list`` shows is complete.  Versions are never overwritten: the version name is the
model's own ``alphapulse.version`` metadata, the one ``/metrics`` reports, so one name is one set of bytes.

This module only stores and points; the gate (the ``evaluate --validate`` check) and the incidents are the
command's (:mod:`alphapulse.model_cli`), and the daemon asks :func:`resolve_model` which file to load.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from alphapulse.config import ConfigError
from alphapulse.filehash import sha256_file

if TYPE_CHECKING:
    from alphapulse.config import Settings
    from alphapulse.policy import ModelMeta

MODELS_DIR = "models"
MODEL_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
POINTER_FILE = "active.json"
LOCK_FILE = ".lock"
#: A version is a directory name: no separators, no dot-files, nothing a shell or a path would reinterpret.
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


class ModelStoreError(Exception):
    """A store operation that cannot be done (unknown version, a clash, no previous model): one line."""


@dataclass(frozen=True)
class Pointer:
    """The active version and the one before it (what ``rollback`` returns to)."""

    active: str | None
    previous: str | None
    changed: str | None = None


@dataclass(frozen=True)
class StoredModel:
    """One version in the store, from its metadata.json."""

    version: str
    path: Path
    info: dict[str, Any]

    @property
    def sha256(self) -> str:
        return str(self.info.get("sha256", ""))


def models_dir(data_dir: Path) -> Path:
    return data_dir / MODELS_DIR


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def adopt_owner(path: Path, owner_of: Path) -> None:
    """Give ``path`` (and what is under it) the owner of ``owner_of`` when running as root.

    An operator runs ``sudo alphapulse model ...`` on the service's state directory; files left root-owned there
    could not be replaced by the service's own (under systemd, dynamic) user later.  Not root: nothing to do."""
    if os.geteuid() != 0:
        return
    st = os.stat(owner_of)
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        if not p.is_symlink() and (p.stat().st_uid, p.stat().st_gid) != (st.st_uid, st.st_gid):
            os.chown(p, st.st_uid, st.st_gid)


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a reader or a crash sees the old or the new content, whole.

    Mode 0644: the daemon's user must read what an operator (maybe root) wrote; nothing here is secret, the
    state directory's own mode guards it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.fchmod(fd, 0o644)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class ModelStore:
    """The models directory of one state directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.root = models_dir(data_dir)
        self.pointer_path = self.root / POINTER_FILE

    # ---- reading ------------------------------------------------------------------------------
    def pointer(self) -> Pointer:
        """The pointer; no file means nothing was promoted yet.  A damaged file is a :class:`ConfigError` naming
        it (the daemon exits 78 rather than guess which model to trade)."""
        try:
            raw = self.pointer_path.read_bytes()
        except FileNotFoundError:
            return Pointer(None, None)
        except OSError as e:
            raise ConfigError(str(self.pointer_path), "active", f"cannot be read ({e.strerror or e}); run "
                              "'alphapulse model' as the service's user, or make it readable") from None
        try:
            rec = orjson.loads(raw)
            if not isinstance(rec, dict):
                raise TypeError("not a JSON object")
            active, previous = rec.get("active"), rec.get("previous")
            for v in (active, previous):
                if v is not None and not (isinstance(v, str) and VERSION_RE.fullmatch(v)):
                    raise ValueError(f"{v!r} is not a version name")
        except (orjson.JSONDecodeError, TypeError, ValueError) as e:
            raise ConfigError(str(self.pointer_path), "active", f"damaged model pointer ({e}); restore it from a "
                              "backup or run 'alphapulse model promote VERSION'") from None
        return Pointer(active, previous, rec.get("changed"))

    def get(self, version: str) -> StoredModel | None:
        """The stored version, or None when the store has no complete copy of it."""
        if not VERSION_RE.fullmatch(version):
            return None
        d = self.root / version
        try:
            info = orjson.loads((d / METADATA_FILE).read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return None
        if not isinstance(info, dict) or not (d / MODEL_FILE).is_file():
            return None
        return StoredModel(version, d / MODEL_FILE, info)

    def versions(self) -> list[StoredModel]:
        """Every complete version, oldest import first."""
        if not self.root.is_dir():
            return []
        found = [m for d in self.root.iterdir() if d.is_dir() and not d.name.startswith(".")
                 for m in [self.get(d.name)] if m is not None]
        return sorted(found, key=lambda m: (str(m.info.get("imported", "")), m.version))

    def active_model(self) -> StoredModel | None:
        """The active version's file; a pointer to a version the store lacks is a :class:`ConfigError`."""
        ptr = self.pointer()
        if ptr.active is None:
            return None
        model = self.get(ptr.active)
        if model is None:
            raise ConfigError(str(self.pointer_path), "active", f"points to version {ptr.active}, which is not in "
                              f"{self.root} (run 'alphapulse model list')")
        return model

    # ---- changing -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive: two operators promoting at once would otherwise both read the same ``previous``."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def import_file(self, source: Path, meta: ModelMeta, imported: str) -> tuple[StoredModel, bool]:
        """Copy ``source`` in as version ``meta.version``; (the stored model, whether it was new).

        The same bytes already stored under that version are not copied again; other bytes under a stored
        version name are refused: the name is what /metrics and the logs report."""
        version = meta.version
        if not VERSION_RE.fullmatch(version):
            raise ModelStoreError(f"model version {version!r} cannot name a directory: use letters, digits and "
                                  "'._+-' (set alphapulse.version when exporting)")
        digest = sha256_file(source)
        have = self.get(version)
        if have is not None:
            if have.sha256 != digest or sha256_file(have.path) != digest:
                raise ModelStoreError(f"version {version} is already in the store with other content; export the "
                                      "new model under a new alphapulse.version")
            return have, False
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".import-*"):  # left by an import that crashed; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.root / f".import-{version}-{os.getpid()}"
        tmp.mkdir()
        try:
            shutil.copyfile(source, tmp / MODEL_FILE)
            os.chmod(tmp / MODEL_FILE, 0o644)
            if sha256_file(tmp / MODEL_FILE) != digest:
                raise ModelStoreError(f"{source} changed while it was being copied; try again")
            with open(tmp / MODEL_FILE, "rb+") as f:
                os.fsync(f.fileno())
            info = {"version": version, "kind": meta.kind, "timeframe": meta.timeframe,
                    "feature_set": meta.feature_set_name, "obs_size": meta.obs_size,
                    "decision_every_bars": meta.decision_every_bars,
                    "training_data_range": meta.training_data_range, "created": meta.created,
                    "sha256": digest, "size": (tmp / MODEL_FILE).stat().st_size, "imported": imported,
                    "source": str(source.resolve())}
            _write_atomic(tmp / METADATA_FILE, orjson.dumps(info, option=orjson.OPT_INDENT_2) + b"\n")
            adopt_owner(tmp, self.data_dir)
            os.rename(tmp, self.root / version)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        stored = self.get(version)
        assert stored is not None
        return stored, True

    def set_pointer(self, active: str, previous: str | None, changed: str) -> Pointer:
        """Switch atomically (call under :meth:`locked`)."""
        rec = {"active": active, "previous": previous, "changed": changed}
        _write_atomic(self.pointer_path, orjson.dumps(rec, option=orjson.OPT_INDENT_2) + b"\n")
        adopt_owner(self.root, self.data_dir)
        return Pointer(active, previous, changed)


def resolve_model(settings: Settings) -> tuple[Path, str]:
    """The model file the daemon loads and where it comes from: ``config`` (``model.path`` /
    ``ALPHAPULSE_MODEL_PATH``, which wins, so an operator can always pin a file), ``store`` (the active version
    under the state directory) or ``bundled`` (the model shipped with the package)."""
    from alphapulse.policy import default_model_path

    if settings.model_path is not None:
        return settings.model_path, "config"
    active = ModelStore(settings.data_dir).active_model()
    if active is not None:
        return active.path, "store"
    return default_model_path(), "bundled"


def model_error(settings: Settings, source: str, problem: str) -> ConfigError:
    """The one-line error for a model that cannot be used, naming where it was chosen: the configuration's
    ``model.path`` or the store's pointer (then the way back is a rollback)."""
    if source == "store":
        return ConfigError(str(ModelStore(settings.data_dir).pointer_path), "active",
                           f"{problem} (go back with 'alphapulse model rollback')")
    return ConfigError("config.yaml", "model.path", problem)
