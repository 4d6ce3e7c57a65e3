"""``alphapulse model list|promote|rollback``: the operations manual's model-update procedure.

* ``promote PATH`` imports a model file into the versioned store under the state directory
  (:mod:`alphapulse.model_store`); ``promote VERSION`` re-activates a stored one.  Either way the model must
  first pass the very check ``alphapulse evaluate --validate`` runs (:func:`alphapulse.evaluation.validate_model`:
  ONNX checker, metadata, contract, deterministic probability outputs, feature names) and match the
  configured timeframe (the daemon refuses to start on a mismatch, so promoting one would turn the next
  restart into an outage).  A model that fails is refused and the active pointer is not touched.
* ``rollback`` switches back to the previous version in one command (and ``rollback`` again returns).
* ``list`` shows every stored version, which is active and which is previous, and what the daemon will load
  (``model.path`` in the configuration, when set, wins over the store).

The daemon loads the active version at its next start (``systemctl restart alphapulse-trading``); every
promotion, refusal and rollback is a line in ``incidents.log`` (and the daemon adds one when it starts on a
different model), so the log answers "which model traded when, and who changed it".

Exit status: 0 done (or nothing to do), 1 refused (validation failed, unknown version, nothing to roll back
to), 2 usage error, 78 invalid configuration or a damaged pointer.
"""

from __future__ import annotations

import argparse
import os
import pwd
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from alphapulse.config import ConfigError, Settings, load_settings, report_config_error
from alphapulse.model_store import ModelStore, ModelStoreError, Pointer, resolve_model
from alphapulse.operator_files import append_incident
from alphapulse.timeutil import iso_ms

PROG = "alphapulse model"
RESTART_HINT = "restart the daemon to trade it (sudo systemctl restart alphapulse-trading)"


def gate(path: Path, settings: Settings) -> list[str]:
    """Every reason ``path`` must not become the active model (empty: fit to trade with this configuration)."""
    from alphapulse.evaluation import validate_model
    from alphapulse.policy import ModelError, read_model_meta

    problems = validate_model(path)
    if problems:
        return problems
    try:
        meta = read_model_meta(path)
    except ModelError as e:  # validate_model read it a moment ago; only a concurrent change gets here
        return [e.problem]
    if meta.timeframe != settings.timeframe:
        return [f"built for {meta.timeframe} bars but trading_params.yaml timeframe is {settings.timeframe}: the "
                "daemon would refuse to start on it"]
    return []


def _user() -> str:
    """Who ran the command, for the incident line (the operator, or sudo's caller)."""
    name = os.environ.get("SUDO_USER") or os.environ.get("USER")
    if name:
        return name
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def _version_of(path: Path) -> str | None:
    """The model's own version, when its metadata can be read at all (for the refusal's incident line)."""
    from alphapulse.policy import ModelError, read_model_meta

    try:
        return read_model_meta(path).version
    except ModelError:
        return None


class _Run:
    """One command's context: settings, store, clock and the incident writer."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = ModelStore(settings.data_dir)
        self.now_ms = int(time.time() * 1000)

    def incident(self, kind: str, **detail: Any) -> None:
        append_incident(self.settings.log_dir, self.now_ms, kind, {**detail, "by": _user()})

    def pointer_or_empty(self) -> tuple[Pointer, str | None]:
        """The pointer; a damaged one reads as empty so that ``promote`` can repair it."""
        try:
            return self.store.pointer(), None
        except ConfigError as e:
            return Pointer(None, None), str(e)


def _refuse(run: _Run, candidate: str, problems: list[str], version: str | None = None) -> int:
    run.incident("MODEL_PROMOTION_REFUSED", candidate=candidate, version=version, problems=problems)
    print(f"{PROG}: refused to promote {candidate}: {len(problems)} problem(s); the active model is unchanged",
          file=sys.stderr)
    for prob in problems:
        print(f"{candidate}: {prob}", file=sys.stderr)
    return 1


def cmd_promote(run: _Run, target: str) -> int:
    from alphapulse.policy import ModelError, read_model_meta

    store = run.store
    with store.locked():
        ptr, damaged = run.pointer_or_empty()
        source = Path(target)
        if source.is_file():
            problems = gate(source, run.settings)
            if problems:
                return _refuse(run, str(source), problems, _version_of(source))
            try:
                meta = read_model_meta(source)
                stored, new = store.import_file(source, meta, iso_ms(run.now_ms))
            except (ModelError, ModelStoreError) as e:
                return _refuse(run, str(source), [str(e)], _version_of(source))
            if new:
                run.incident("MODEL_IMPORTED", version=stored.version, sha256=stored.sha256, source=str(source))
        else:
            found = store.get(target)
            if found is None:
                known = ", ".join(m.version for m in store.versions()) or "none"
                return _refuse(run, target, [f"neither a model file nor a stored version (stored: {known})"])
            stored = found
            problems = gate(stored.path, run.settings)
            if problems:
                return _refuse(run, target, problems, stored.version)
        if ptr.active == stored.version and damaged is None:
            print(f"{stored.version} is already the active model; nothing changed")
            return 0
        store.set_pointer(stored.version, ptr.active, iso_ms(run.now_ms))
    run.incident("MODEL_PROMOTED", version=stored.version, previous=ptr.active, sha256=stored.sha256,
                 repaired_pointer=damaged)
    print(f"promoted {stored.version} (previous: {ptr.active or 'none'}); {RESTART_HINT}")
    _warn_if_overridden(run.settings)
    return 0


def cmd_rollback(run: _Run) -> int:
    store = run.store
    with store.locked():
        ptr = store.pointer()
        if ptr.previous is None:
            run.incident("MODEL_ROLLBACK_REFUSED", active=ptr.active, problems=["no previous model"])
            print(f"{PROG}: nothing to roll back to: no previous model (active: {ptr.active or 'none'})",
                  file=sys.stderr)
            return 1
        prev = store.get(ptr.previous)
        problems = [f"version {ptr.previous} is missing from {store.root}"] if prev is None else \
            gate(prev.path, run.settings)
        if problems:
            run.incident("MODEL_ROLLBACK_REFUSED", active=ptr.active, previous=ptr.previous, problems=problems)
            print(f"{PROG}: refused to roll back to {ptr.previous}; the active model is unchanged", file=sys.stderr)
            for prob in problems:
                print(f"{ptr.previous}: {prob}", file=sys.stderr)
            return 1
        store.set_pointer(ptr.previous, ptr.active, iso_ms(run.now_ms))
    run.incident("MODEL_ROLLED_BACK", version=ptr.previous, previous=ptr.active)
    print(f"rolled back to {ptr.previous} (previous: {ptr.active}); {RESTART_HINT}")
    _warn_if_overridden(run.settings)
    return 0


def _warn_if_overridden(settings: Settings) -> None:
    if settings.model_path is not None:
        print(f"note: model.path is set ({settings.model_path}); the daemon loads that file, not the store's "
              "active model, until it is emptied", file=sys.stderr)


def running_version(settings: Settings, timeout_s: float = 2.0) -> str | None:
    """The model version the daemon on this configuration's control port trades now (its ``/metrics``), or None
    when no daemon answers: after a promotion, the difference says a restart (or SIGHUP) is still due."""
    url = f"http://{settings.control_host}:{settings.control_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            version = orjson.loads(resp.read())["model"]["version"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return version if isinstance(version, str) else None


def cmd_list(run: _Run, as_json: bool) -> int:
    ptr = run.store.pointer()
    models = run.store.versions()
    path, source = resolve_model(run.settings)
    running = running_version(run.settings)
    rows = [{"version": m.version, "active": m.version == ptr.active, "previous": m.version == ptr.previous,
             **{k: m.info.get(k) for k in ("kind", "timeframe", "feature_set", "training_data_range", "imported",
                                           "sha256")}} for m in models]
    if as_json:
        print(orjson.dumps({"store": str(run.store.root), "active": ptr.active, "previous": ptr.previous,
                            "changed": ptr.changed, "daemon_loads": {"path": str(path), "source": source},
                            "running": running,
                            "models": rows}).decode())
        return 0
    if not rows:
        print(f"no models in {run.store.root}")
    else:
        # columns as wide as their longest value plus two spaces: a long version (the shipped model's is 28
        # characters) or kind ("gated_rule") must not run into the next column
        cols = ("version", "kind", "timeframe", "feature_set", "imported")
        titles = {"version": "version", "kind": "kind", "timeframe": "tf", "feature_set": "features",
                  "imported": "imported"}
        width = {c: max(len(titles[c]), *(len(str(r[c] or "")) for r in rows)) + 2 for c in cols}
        print("  " + "".join(f"{titles[c]:<{width[c]}}" for c in cols) + "sha256")
        for r in rows:
            mark = "*" if r["active"] else ("-" if r["previous"] else " ")
            print(f"{mark} " + "".join(f"{r[c] or ''!s:<{width[c]}}" for c in cols)
                  + str(r["sha256"] or "")[:12])
        print("(* active, - previous: the target of 'alphapulse model rollback')")
    print(f"the daemon loads: {path} ({source}) at its next start")
    if running is None:
        print(f"no daemon answers on {run.settings.control_host}:{run.settings.control_port}")
    else:
        due = source == "store" and running != ptr.active
        print(f"the daemon runs: {running}" + (f"; the active model is {ptr.active}: restart the daemon (or send "
                                                f"it SIGHUP) to trade it" if due else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="versioned models under the state directory: list, "
                                "promote (gated by 'evaluate --validate'), rollback")
    sub = p.add_subparsers(dest="action", required=True)
    ls = sub.add_parser("list", help="stored versions, the active one and the previous one")
    ls.add_argument("--json", action="store_true", help="one JSON object")
    pr = sub.add_parser("promote", help="import a model file (or pick a stored version) and make it active")
    pr.add_argument("model", help="an ONNX file, or a version already in the store")
    sub.add_parser("rollback", help="make the previous version active again")
    return p


def model_main(argv: Sequence[str] | None = None, settings: Settings | None = None) -> int:
    """Entry point for ``alphapulse model``; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else 2
    try:
        run = _Run(settings or load_settings())
        if args.action == "list":
            return cmd_list(run, args.json)
        if args.action == "promote":
            return cmd_promote(run, args.model)
        return cmd_rollback(run)
    except ConfigError as e:
        return report_config_error(e)
    except (ModelStoreError, OSError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
