"""The sha256 of a file or stream, read in 1 MiB blocks: one definition for the backup manifests and their
verification, the offsite copies, the model store and exported models, which all compare digests with each
other's."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import IO

BLOCK = 1 << 20


def sha256_stream(f: IO[bytes], out: IO[bytes] | None = None) -> str:
    """Hex sha256 of what is left in ``f``, copied to ``out`` on the way when given (memory stays bounded)."""
    h = hashlib.sha256()
    for block in iter(lambda: f.read(BLOCK), b""):
        h.update(block)
        if out is not None:
            out.write(block)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file's bytes (memory stays bounded whatever its size)."""
    with open(path, "rb") as f:
        return sha256_stream(f)
