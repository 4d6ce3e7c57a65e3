"""Encryption of backup archives that carry secrets, with AES-256-GCM from the ``cryptography`` package.

A backup that includes the exchange keys or the control token must not be readable by whoever can read the
backup directory or the offsite bucket.  The key is derived from the operator's passphrase
(``ALPHAPULSE_BACKUP_KEY``) with scrypt and a random salt per archive; AES-GCM authenticates the whole archive,
so a flipped bit or a wrong passphrase fails decryption instead of yielding a damaged archive.  No cipher is
built here: scrypt and AES-GCM are the library's.

File layout: ``MAGIC`` (8 bytes) | salt (16) | nonce (12) | ciphertext+tag; the first 36 bytes are also the
associated data, so the header cannot be swapped either.  The archive is encrypted in one piece, in memory:
state backups of this daemon are megabytes; :data:`MAX_BYTES` bounds it with a clear error.
"""

from __future__ import annotations

import os
from pathlib import Path

MAGIC = b"APBKGCM1"
SALT_LEN = 16
NONCE_LEN = 12
HEADER_LEN = len(MAGIC) + SALT_LEN + NONCE_LEN
#: scrypt cost: 2**15 x 8 x 1 takes ~0.1 s and 32 MiB, the cost the ``cryptography`` docs suggest for interactive use.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
MAX_BYTES = 1 << 30
KEY_ENV = "ALPHAPULSE_BACKUP_KEY"
MIN_PASSPHRASE = 12


class BackupCryptoError(Exception):
    """Encryption or decryption failed: no key, a wrong key, or a damaged archive."""


def _derive(passphrase: str, salt: bytes) -> bytes:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    return Scrypt(salt=salt, length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(passphrase.encode())


def check_passphrase(passphrase: str | None) -> str | None:
    """Why this passphrase cannot be used (None when it can): a short one would make scrypt the only defence."""
    if not passphrase:
        return f"not set; set {KEY_ENV} to a passphrase to encrypt or decrypt a backup with secrets"
    if len(passphrase) < MIN_PASSPHRASE:
        return f"too short ({len(passphrase)} characters); use at least {MIN_PASSPHRASE}"
    return None


def encrypt_file(src: Path, dst: Path, passphrase: str) -> None:
    """Write ``src`` encrypted to ``dst`` (fsynced)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if src.stat().st_size > MAX_BYTES:
        raise BackupCryptoError(f"{src.name} is larger than {MAX_BYTES >> 20} MiB; an encrypted backup is made "
                                "in memory: back up the secrets alone (--type config --include-secrets)")
    salt, nonce = os.urandom(SALT_LEN), os.urandom(NONCE_LEN)
    header = MAGIC + salt + nonce
    sealed = AESGCM(_derive(passphrase, salt)).encrypt(nonce, src.read_bytes(), header)
    with open(dst, "wb") as f:
        f.write(header + sealed)
        f.flush()
        os.fsync(f.fileno())


def decrypt_bytes(blob: bytes, passphrase: str) -> bytes:
    """The plaintext of an encrypted archive; :class:`BackupCryptoError` for a wrong key or damaged data."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if len(blob) < HEADER_LEN + 16 or not blob.startswith(MAGIC):
        raise BackupCryptoError("not an AlphaPulse encrypted archive (bad header)")
    header = blob[:HEADER_LEN]
    salt = blob[len(MAGIC):len(MAGIC) + SALT_LEN]
    nonce = blob[len(MAGIC) + SALT_LEN:HEADER_LEN]
    try:
        return AESGCM(_derive(passphrase, salt)).decrypt(nonce, blob[HEADER_LEN:], header)
    except InvalidTag:
        raise BackupCryptoError(f"cannot decrypt: wrong {KEY_ENV} or a damaged archive") from None
