"""Offsite copies of backups in an S3 bucket (boto3, the optional ``s3`` extra).

Configured from the environment only, like the daemon's secrets: ``BACKUP_S3_ENABLED`` (true/false),
``BACKUP_S3_BUCKET``, ``BACKUP_S3_PREFIX`` (default ``alphapulse/``), ``BACKUP_S3_ENDPOINT_URL`` (any
S3-compatible server; the tests use moto's) and ``BACKUP_S3_REGION``; credentials come from boto3's usual chain
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, an instance role, ...).  A backup is uploaded as
``<prefix><name>/<file>``, the payload first and the manifest last, so a remote manifest means a whole copy; each
object carries its sha256 as metadata and is checked by size after the upload.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alphapulse.config import ConfigError
from alphapulse.filehash import sha256_file

TRUE = ("1", "true", "yes", "on")
FALSE = ("", "0", "false", "no", "off")


class OffsiteError(Exception):
    """The bucket could not be written or read."""


@dataclass(frozen=True)
class S3Target:
    bucket: str
    prefix: str
    endpoint_url: str | None
    region: str | None


def s3_target(env: Mapping[str, str] | None = None) -> S3Target | None:
    """The offsite target, None when offsite copies are off; :class:`ConfigError` for a bad setting."""
    env = os.environ if env is None else env
    enabled = env.get("BACKUP_S3_ENABLED", "").strip().lower()
    if enabled in FALSE:
        return None
    if enabled not in TRUE:
        raise ConfigError("environment", "BACKUP_S3_ENABLED", f"must be true or false, got {enabled!r}")
    bucket = env.get("BACKUP_S3_BUCKET", "").strip()
    if not bucket:
        raise ConfigError("environment", "BACKUP_S3_BUCKET", "required when BACKUP_S3_ENABLED is true")
    endpoint = env.get("BACKUP_S3_ENDPOINT_URL", "").strip() or None
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise ConfigError("environment", "BACKUP_S3_ENDPOINT_URL",
                          f"must be an http:// or https:// URL, got {endpoint!r}")
    prefix = env.get("BACKUP_S3_PREFIX", "alphapulse/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    try:
        import boto3  # noqa: F401
    except ImportError:
        raise ConfigError("environment", "BACKUP_S3_ENABLED",
                          "offsite copies need boto3: pip install 'alphapulse-rl[s3]'") from None
    return S3Target(bucket, prefix, endpoint, env.get("BACKUP_S3_REGION", "").strip() or None)


def _client(t: S3Target) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=t.endpoint_url, region_name=t.region)


def upload(t: S3Target, backup: Path, manifest_name: str) -> list[str]:
    """Copy one backup directory to the bucket (manifest last); returns the object keys written."""
    from botocore.exceptions import BotoCoreError, ClientError

    s3 = _client(t)
    files = sorted((p for p in backup.iterdir() if p.is_file()), key=lambda p: p.name == manifest_name)
    keys = []
    try:
        for p in files:
            key = f"{t.prefix}{backup.name}/{p.name}"
            s3.upload_file(str(p), t.bucket, key, ExtraArgs={"Metadata": {"sha256": sha256_file(p)}})
            head = s3.head_object(Bucket=t.bucket, Key=key)
            if int(head["ContentLength"]) != p.stat().st_size:
                raise OffsiteError(f"s3://{t.bucket}/{key}: {head['ContentLength']} bytes stored, "
                                   f"{p.stat().st_size} sent")
            keys.append(key)
    except (BotoCoreError, ClientError) as e:
        raise OffsiteError(f"s3://{t.bucket}/{t.prefix}{backup.name}: {e}") from None
    return keys


def remote_names(t: S3Target, manifest_name: str) -> list[str]:
    """Names of the backups whose manifest is in the bucket (whole copies only)."""
    from botocore.exceptions import BotoCoreError, ClientError

    s3 = _client(t)
    names = []
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=t.bucket, Prefix=t.prefix):
            for obj in page.get("Contents", []):
                rest = obj["Key"][len(t.prefix):]
                name, _, file = rest.partition("/")
                if file == manifest_name:
                    names.append(name)
    except (BotoCoreError, ClientError) as e:
        raise OffsiteError(f"s3://{t.bucket}/{t.prefix}: {e}") from None
    return sorted(names)


def download(t: S3Target, name: str, dest: Path) -> None:
    """Fetch every object of backup ``name`` into the directory ``dest`` (created), checking each sha256."""
    from botocore.exceptions import BotoCoreError, ClientError

    s3 = _client(t)
    dest.mkdir(parents=True, exist_ok=True)
    prefix = f"{t.prefix}{name}/"
    try:
        objs = [o for page in s3.get_paginator("list_objects_v2").paginate(Bucket=t.bucket, Prefix=prefix)
                for o in page.get("Contents", [])]
        if not objs:
            raise OffsiteError(f"no backup {name} in s3://{t.bucket}/{t.prefix}")
        for o in objs:
            file = o["Key"][len(prefix):]
            if not file or "/" in file or file.startswith("."):
                continue
            target = dest / file
            s3.download_file(t.bucket, o["Key"], str(target))
            want = s3.head_object(Bucket=t.bucket, Key=o["Key"]).get("Metadata", {}).get("sha256")
            if want and sha256_file(target) != want:
                raise OffsiteError(f"s3://{t.bucket}/{o['Key']}: sha256 differs from the one recorded at upload")
    except (BotoCoreError, ClientError) as e:
        raise OffsiteError(f"s3://{t.bucket}/{prefix}: {e}") from None
