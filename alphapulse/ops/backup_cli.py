"""``alphapulse backup``: create, list, verify, restore and prune backups (see :mod:`alphapulse.ops.backup`).

Exit codes: 0 done, 1 failed or refused (a verification problem, a restore while the daemon runs, an offsite
error), 2 usage (an unknown backup name or component), 78 a configuration problem (one line naming the source,
the key and the problem, as every command prints it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alphapulse.config import ConfigError, load_settings, report_config_error
from alphapulse.ops.backup import (
    BACKUP_DIR_ENV,
    COMPONENTS,
    EXIT_FAIL,
    EXIT_OK,
    EXIT_USAGE,
    MANIFEST,
    NAME_RE,
    PRE_RESTORE,
    TYPES,
    BackupError,
    Roots,
    create_backup,
    iter_backups,
    prune_backups,
    read_manifest,
    restore_backup,
    verify_backup,
)
from alphapulse.ops.backup_crypto import KEY_ENV, BackupCryptoError


def _find(roots: Roots, name: str, fetch_remote: bool = True) -> Path:
    """A backup's directory by name, fetched from the offsite bucket when it is only there."""
    if not NAME_RE.match(name):
        raise BackupError(f"not a backup name: {name!r} (see: alphapulse backup list)", EXIT_USAGE)
    bdir = roots.backup_dir / name
    if (bdir / MANIFEST).is_file():
        return bdir
    if fetch_remote:
        from alphapulse.ops.backup_s3 import OffsiteError, download, remote_names, s3_target

        target = s3_target()
        if target is not None:
            try:
                if name in remote_names(target, MANIFEST):
                    tmp = roots.backup_dir / f".fetch-{name}-{os.getpid()}"
                    shutil.rmtree(tmp, ignore_errors=True)
                    download(target, name, tmp)
                    os.replace(tmp, bdir)
                    print(f"fetched {name} from s3://{target.bucket}/{target.prefix}{name}/")
                    return bdir
            except OffsiteError as e:
                raise BackupError(f"offsite copy of {name}: {e}") from None
    raise BackupError(f"no backup named {name} in {roots.backup_dir}", EXIT_USAGE)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _cmd_create(a: argparse.Namespace, roots: Roots) -> int:
    from alphapulse.ops.backup_s3 import OffsiteError, s3_target, upload

    target = None if a.no_offsite else s3_target()  # a bad offsite setting fails before any work
    bdir = create_backup(roots, a.type, include_secrets=a.include_secrets, passphrase=os.environ.get(KEY_ENV))
    m = read_manifest(bdir)
    print(f"created {bdir.name}: {len(m['files'])} files, {_human(m['payload']['size'])}"
          f"{', encrypted' if m['encrypted'] else ''} in {roots.backup_dir}")
    for lo in m["left_out"]:
        print(f"  left out (secret): {lo['path']}" + (f" {', '.join(lo['keys'])}" if lo.get("keys") else ""))
    if target is not None:
        try:
            upload(target, bdir, MANIFEST)
        except OffsiteError as e:
            print(f"alphapulse backup: offsite copy failed (the local backup is kept): {e}", file=sys.stderr)
            return EXIT_FAIL
        print(f"offsite: s3://{target.bucket}/{target.prefix}{bdir.name}/")
    return EXIT_OK


def _cmd_list(a: argparse.Namespace, roots: Roots) -> int:
    rows: list[dict[str, Any]] = []
    for p, m, problem in iter_backups(roots.backup_dir):
        rows.append({"name": p.name, "type": m["type"] if m else None, "created": m["created"] if m else None,
                     "size": m["payload"]["size"] if m else None, "files": len(m["files"]) if m else None,
                     "encrypted": m["encrypted"] if m else None, "components": m["components"] if m else None,
                     "status": "ok" if problem is None else problem})
    remote: list[str] | None = None
    if a.remote:
        from alphapulse.ops.backup_s3 import OffsiteError, remote_names, s3_target

        target = s3_target()
        if target is None:
            raise ConfigError("environment", "BACKUP_S3_ENABLED", "--remote needs BACKUP_S3_ENABLED=true")
        try:
            remote = remote_names(target, MANIFEST)
        except OffsiteError as e:
            raise BackupError(str(e)) from None
    if a.json:
        print(json.dumps({"backup_dir": str(roots.backup_dir), "backups": rows, "remote": remote}))
        return EXIT_OK
    if not rows:
        print(f"no backups in {roots.backup_dir}")
    for r in rows:
        if r["type"] is None:
            print(f"{r['name']:<44} {r['status']}")
        else:
            size = _human(float(r["size"]))
            print(f"{r['name']:<44} {r['type']:<10} {r['created']}  {size:>10}  {r['files']:>4} files"
                  f"{'  encrypted' if r['encrypted'] else ''}  {r['status']}")
    if remote is not None:
        print(f"offsite ({len(remote)}): " + (", ".join(remote) if remote else "none"))
    return EXIT_OK


def _cmd_verify(a: argparse.Namespace, roots: Roots) -> int:
    bdir = _find(roots, a.name)
    problems = verify_backup(bdir, os.environ.get(KEY_ENV))
    for p in problems:
        print(f"FAIL {p}")
    if problems:
        return EXIT_FAIL
    m = read_manifest(bdir)
    print(f"ok {bdir.name}: {len(m['files'])} files match their sha256"
          + (f", {len(m['databases'])} database(s) pass integrity_check" if m["databases"] else ""))
    return EXIT_OK


def _cmd_restore(a: argparse.Namespace, roots: Roots) -> int:
    comps = [c.strip() for c in a.components.split(",") if c.strip()] if a.components else None
    for c in comps or ():
        if c not in COMPONENTS:
            raise BackupError(f"--components: unknown component {c!r} (known: {', '.join(COMPONENTS)})", EXIT_USAGE)
    bdir = _find(roots, a.backup_name)
    plan, pre = restore_backup(bdir, roots, comps, dry_run=a.dry_run, passphrase=os.environ.get(KEY_ENV))
    verb = "would be" if a.dry_run else "were"
    for action in ("added", "changed", "removed"):
        for c in plan.by(action):
            print(f"{action:<8} {c.target}")
    print(f"{'dry run: ' if a.dry_run else ''}{plan.backup} ({', '.join(plan.components)}): "
          f"{len(plan.by('added'))} added, {len(plan.by('changed'))} changed, {len(plan.by('removed'))} removed, "
          f"{len(plan.by('unchanged'))} unchanged files {verb} restored")
    if pre is not None:
        print(f"what was replaced is in {pre.name}")
    return EXIT_OK


def _cmd_prune(a: argparse.Namespace, roots: Roots) -> int:
    kept, removed = prune_backups(roots.backup_dir, a.keep_daily, a.keep_weekly, a.keep_monthly, a.type, a.dry_run)
    for n in removed:
        print(f"{'would remove' if a.dry_run else 'removed'} {n}")
    print(f"kept {len(kept)}, {'would remove' if a.dry_run else 'removed'} {len(removed)}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alphapulse backup", description="Backups of state, logs, config and models "
                                f"(kept in ${BACKUP_DIR_ENV}, default: 'backups' beside the state directory)")
    p.add_argument("--config-dir", help="configuration directory (default: $ALPHAPULSE_CONFIG_DIR)")
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("create", help="make a backup (safe while the daemon runs)")
    c.add_argument("--type", choices=tuple(TYPES), default="full")
    c.add_argument("--include-secrets", action="store_true",
                   help=f"keep keys and tokens; the backup is then encrypted with ${KEY_ENV}")
    c.add_argument("--no-offsite", action="store_true", help="skip the S3 copy even when BACKUP_S3_ENABLED")
    c.set_defaults(func=_cmd_create)
    li = sub.add_parser("list", help="list the backups")
    li.add_argument("--json", action="store_true")
    li.add_argument("--remote", action="store_true", help="also list the offsite copies")
    li.set_defaults(func=_cmd_list)
    r = sub.add_parser("restore", help="restore a backup (refused while the daemon runs)")
    r.add_argument("--backup-name", required=True)
    r.add_argument("--components", help=f"comma-separated subset of {','.join(COMPONENTS)} (default: all it has)")
    r.add_argument("--dry-run", action="store_true", help="list what would be added, changed and removed")
    r.set_defaults(func=_cmd_restore)
    v = sub.add_parser("verify", help="check every file's sha256 and each database's integrity")
    v.add_argument("name")
    v.set_defaults(func=_cmd_verify)
    pr = sub.add_parser("prune", help="delete old backups, per type")
    pr.add_argument("--keep-daily", type=int, default=7)
    pr.add_argument("--keep-weekly", type=int, default=4)
    pr.add_argument("--keep-monthly", type=int, default=0)
    pr.add_argument("--type", choices=(*TYPES, PRE_RESTORE), help="only this type (default: each type)")
    pr.add_argument("--dry-run", action="store_true")
    pr.set_defaults(func=_cmd_prune)
    return p


def backup_main(argv: Sequence[str]) -> int:
    a = build_parser().parse_args(list(argv))
    for k in ("keep_daily", "keep_weekly", "keep_monthly"):
        if getattr(a, k, 0) < 0:
            build_parser().error(f"--{k.replace('_', '-')} must be >= 0")
    try:
        settings = load_settings(Path(a.config_dir) if a.config_dir else None)
        roots = Roots.from_settings(settings)
        return int(a.func(a, roots))
    except ConfigError as e:
        return report_config_error(e)
    except BackupError as e:
        print(f"alphapulse backup: {e}", file=sys.stderr)
        return e.code
    except BackupCryptoError as e:
        print(f"alphapulse backup: {e}", file=sys.stderr)
        return EXIT_FAIL
    except OSError as e:
        print(f"alphapulse backup: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return EXIT_FAIL
