"""The sha256 of a file, read in 1 MiB blocks: one definition for the backup manifests, their offsite copies and
the model store, which all compare digests with each other's."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file's bytes (memory stays bounded whatever its size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
