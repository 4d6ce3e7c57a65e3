"""The model-update procedure: versioned models under the state directory, promotion gated by the
``evaluate --validate`` check, an atomic active pointer, rollback in one command, a real daemon restarted on the
promoted model, and every step in incidents.log."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import onnx
import pytest

from alphapulse.config import ConfigError, Settings, load_settings
from alphapulse.evaluation import evaluate_main, validate_model
from alphapulse.model_cli import model_main
from alphapulse.model_store import MODEL_FILE, ModelStore, resolve_model
from alphapulse.operator_files import read_incidents
from alphapulse.policy import Policy, default_model_path
from alphapulse.timeutil import parse_utc_ms
from tests.daemon_harness import BASELINE_MODEL, DaemonProc, slice_bundled

V1 = "baseline-momentum-1"  # the bundled 5m baseline's own version


def variant(src: Path, dest: Path, **meta: str) -> Path:
    """A copy of ``src`` with some ``alphapulse.*`` metadata replaced (as an exporter would write it)."""
    model = onnx.load(str(src))
    props = {p.key: p for p in model.metadata_props}
    for key, value in meta.items():
        props[f"alphapulse.{key}"].value = value
    onnx.save(model, str(dest))
    return dest


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "candidates"
    d.mkdir()
    return {
        "v1": BASELINE_MODEL,
        "v2": variant(BASELINE_MODEL, d / "v2.onnx", version="baseline-momentum-2"),
        # loads fine (Policy.load accepts it) but fails --validate: no training range recorded
        "bad": variant(BASELINE_MODEL, d / "bad.onnx", version="baseline-momentum-bad", training_data_range=""),
        "clash": variant(BASELINE_MODEL, d / "clash.onnx", created="2026-12-01"),  # v1's name, other bytes
    }


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    cfg = tmp_path / "config"
    cfg.mkdir()
    (cfg / "trading_params.yaml").write_text("timeframe: 5m\n")
    return load_settings(cfg, env={"ALPHAPULSE_DATA_DIR": str(tmp_path / "data"),
                                   "ALPHAPULSE_LOG_DIR": str(tmp_path / "log")})


def incidents(log_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    return [(r.kind, r.detail) for r in read_incidents(log_dir)]


def test_promote_list_and_rollback_switch_the_pointer(settings: Settings, models: dict[str, Path],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    store = ModelStore(settings.data_dir)
    assert resolve_model(settings) == (default_model_path(), "bundled")
    assert model_main(["promote", str(models["v1"])], settings) == 0
    assert model_main(["promote", str(models["v2"])], settings) == 0
    ptr = store.pointer()
    assert (ptr.active, ptr.previous) == ("baseline-momentum-2", V1)
    stored = store.root / "baseline-momentum-2" / MODEL_FILE
    assert stored.read_bytes() == models["v2"].read_bytes()
    assert resolve_model(settings) == (stored, "store")
    capsys.readouterr()
    assert model_main(["list", "--json"], settings) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(m["version"], m["active"], m["previous"]) for m in listed["models"]] == [
        (V1, False, True), ("baseline-momentum-2", True, False)]
    assert listed["daemon_loads"] == {"path": str(stored), "source": "store"}
    assert model_main(["list"], settings) == 0
    text = capsys.readouterr().out
    assert "* baseline-momentum-2" in text and f"- {V1}" in text

    assert model_main(["rollback"], settings) == 0
    assert (store.pointer().active, store.pointer().previous) == (V1, "baseline-momentum-2")
    assert model_main(["rollback"], settings) == 0  # rollback of the rollback: forward again
    assert store.pointer().active == "baseline-momentum-2"
    assert model_main(["promote", V1], settings) == 0  # a stored version by name, no file needed
    assert (store.pointer().active, store.pointer().previous) == (V1, "baseline-momentum-2")
    assert model_main(["promote", V1], settings) == 0  # already active: nothing changes
    assert "already the active model" in capsys.readouterr().out
    assert (store.pointer().active, store.pointer().previous) == (V1, "baseline-momentum-2")

    kinds = [(k, d.get("version"), d.get("previous")) for k, d in incidents(settings.log_dir)]
    assert kinds == [("MODEL_IMPORTED", V1, None), ("MODEL_PROMOTED", V1, None),
                     ("MODEL_IMPORTED", "baseline-momentum-2", None),
                     ("MODEL_PROMOTED", "baseline-momentum-2", V1),
                     ("MODEL_ROLLED_BACK", V1, "baseline-momentum-2"),
                     ("MODEL_ROLLED_BACK", "baseline-momentum-2", V1),
                     ("MODEL_PROMOTED", V1, "baseline-momentum-2")]


def test_a_model_failing_validation_is_refused_and_nothing_changes(settings: Settings, models: dict[str, Path],
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    store = ModelStore(settings.data_dir)
    Policy.load(models["bad"])  # the loader alone would take it: the gate is what stops it
    assert evaluate_main(["--validate", "--model", str(models["bad"])]) == 1  # what an operator would run
    want = validate_model(models["bad"])
    assert want == ["metadata: alphapulse.training_data_range is empty"]
    assert model_main(["promote", str(models["v1"])], settings) == 0
    before = store.pointer_path.read_bytes()
    capsys.readouterr()
    assert model_main(["promote", str(models["bad"])], settings) == 1
    err = capsys.readouterr().err
    assert "refused to promote" in err and "training_data_range is empty" in err
    assert store.pointer_path.read_bytes() == before
    assert [m.version for m in store.versions()] == [V1]  # not even imported
    kind, detail = incidents(settings.log_dir)[-1]
    assert kind == "MODEL_PROMOTION_REFUSED" and detail["problems"] == want
    assert detail["version"] == "baseline-momentum-bad"

    garbage = settings.data_dir.parent / "garbage.onnx"
    garbage.write_bytes(b"\x08\x01not a protobuf" * 10)
    assert model_main(["promote", str(garbage)], settings) == 1
    assert model_main(["promote", str(default_model_path())], settings) == 1  # a 1h model for a 5m config
    assert "built for 1h bars" in capsys.readouterr().err
    assert model_main(["promote", str(models["clash"])], settings) == 1  # v1's name, other bytes
    assert "already in the store with other content" in capsys.readouterr().err
    assert model_main(["promote", "no-such-version"], settings) == 1
    assert store.pointer_path.read_bytes() == before
    assert [k for k, _ in incidents(settings.log_dir)][-4:] == ["MODEL_PROMOTION_REFUSED"] * 4


def test_rollback_needs_a_previous_model(settings: Settings, models: dict[str, Path],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert model_main(["rollback"], settings) == 1
    assert model_main(["promote", str(models["v1"])], settings) == 0
    assert model_main(["rollback"], settings) == 1
    assert "nothing to roll back to" in capsys.readouterr().err
    assert ModelStore(settings.data_dir).pointer().active == V1
    assert [k for k, _ in incidents(settings.log_dir)].count("MODEL_ROLLBACK_REFUSED") == 2


def test_the_pointer_switch_is_atomic_for_readers(settings: Settings, models: dict[str, Path]) -> None:
    """A reader (the daemon starting, `model list`) never sees a half-written or missing pointer."""
    assert model_main(["promote", str(models["v1"])], settings) == 0
    assert model_main(["promote", str(models["v2"])], settings) == 0
    store = ModelStore(settings.data_dir)
    seen: set[tuple[str | None, str | None]] = set()
    errors: list[BaseException] = []
    done = threading.Event()

    def read() -> None:
        reader = ModelStore(settings.data_dir)
        while not done.is_set():
            try:
                p = reader.pointer()
                seen.add((p.active, p.previous))
            except BaseException as e:  # any failure at all is the finding
                errors.append(e)
                return

    t = threading.Thread(target=read)
    t.start()
    try:
        for i in range(300):
            with store.locked():
                a, b = (V1, "baseline-momentum-2") if i % 2 else ("baseline-momentum-2", V1)
                store.set_pointer(a, b, f"t{i}")
    finally:
        done.set()
        t.join(10)
    assert not errors
    assert seen == {(V1, "baseline-momentum-2"), ("baseline-momentum-2", V1)}


def test_config_model_path_wins_over_the_store(settings: Settings, models: dict[str, Path], tmp_path: Path) -> None:
    assert model_main(["promote", str(models["v2"])], settings) == 0
    cfg = tmp_path / "config"
    (cfg / "config.yaml").write_text(f"model:\n  path: {models['v1']}\n")
    pinned = load_settings(cfg, env={"ALPHAPULSE_DATA_DIR": str(settings.data_dir)})
    assert resolve_model(pinned) == (models["v1"], "config")


@pytest.mark.slow
def test_a_daemon_restarted_after_promote_and_rollback_trades_that_model(tmp_path: Path,
                                                                        models: dict[str, Path]) -> None:
    d = DaemonProc(tmp_path / "d", replay_file=slice_bundled(tmp_path / "r.csv", 400),
                   service={"model": {"path": ""}}, env={"ALPHAPULSE_CONTROL_TOKEN": "t" * 32})

    def model(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "alphapulse", "model", *args], env=d.env, cwd=d.root,
                              capture_output=True, text=True, timeout=60)

    def run_daemon() -> dict[str, Any]:
        d.start()
        try:
            d.wait_ready(60)
            return d.metrics()["model"]  # type: ignore[no-any-return]
        finally:
            assert d.stop() == 0

    try:
        assert model("promote", str(models["v1"])).returncode == 0
        first = run_daemon()
        assert (first["version"], first["source"]) == (V1, "store")

        d.start()  # the usual order: promote while the daemon trades, then restart it
        d.wait_ready(60)
        r = model("promote", str(models["v2"]))
        assert r.returncode == 0, r.stderr
        listed = json.loads(model("list", "--json").stdout)
        assert (listed["running"], listed["active"]) == (V1, "baseline-momentum-2")  # a restart is due
        assert "the daemon runs: baseline-momentum-1; the active model is baseline-momentum-2" in model("list").stdout
        assert d.stop() == 0
        assert json.loads(model("list", "--json").stdout)["running"] is None
        assert (run_daemon()["version"]) == "baseline-momentum-2"

        r = model("promote", str(models["bad"]))
        assert r.returncode == 1 and "training_data_range is empty" in r.stderr
        listed = json.loads(model("list", "--json").stdout)
        assert (listed["active"], listed["previous"]) == ("baseline-momentum-2", V1)

        r = model("rollback")
        assert r.returncode == 0, r.stderr
        assert run_daemon()["version"] == V1
    finally:
        d.close()

    steps = [(k, det.get("version")) for k, det in incidents(d.log_dir) if k.startswith("MODEL_")]
    assert steps == [("MODEL_IMPORTED", V1), ("MODEL_PROMOTED", V1),
                     ("MODEL_IMPORTED", "baseline-momentum-2"), ("MODEL_PROMOTED", "baseline-momentum-2"),
                     ("MODEL_LOADED", "baseline-momentum-2"),
                     ("MODEL_PROMOTION_REFUSED", "baseline-momentum-bad"),
                     ("MODEL_ROLLED_BACK", V1), ("MODEL_LOADED", V1)]


@pytest.mark.slow
def test_a_damaged_pointer_stops_the_daemon_with_one_config_line(tmp_path: Path, models: dict[str, Path]) -> None:
    d = DaemonProc(tmp_path / "d", replay_file=slice_bundled(tmp_path / "r.csv", 300),
                   service={"model": {"path": ""}})
    try:
        r = subprocess.run([sys.executable, "-m", "alphapulse", "model", "promote", str(models["v1"])], env=d.env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        pointer = d.data_dir / "models" / "active.json"
        pointer.write_text('{"active": "../../etc"')
        d.start()
        assert d.wait_exit(60) == 78
        lines = [ln for ln in d.stderr().splitlines() if ln.startswith("alphapulse: config error")]
        assert len(lines) == 1 and str(pointer) in lines[0] and "damaged model pointer" in lines[0], d.stderr()
        r = subprocess.run([sys.executable, "-m", "alphapulse", "model", "list"], env=d.env, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 78 and str(pointer) in r.stderr
        # promoting a stored version repairs it
        r = subprocess.run([sys.executable, "-m", "alphapulse", "model", "promote", V1], env=d.env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert json.loads(pointer.read_text())["active"] == V1
    finally:
        d.close()


def test_a_pointer_to_a_missing_version_is_a_config_error(settings: Settings, models: dict[str, Path]) -> None:
    assert model_main(["promote", str(models["v1"])], settings) == 0
    store = ModelStore(settings.data_dir)
    (store.root / V1 / MODEL_FILE).unlink()
    with pytest.raises(ConfigError, match="not in"):
        resolve_model(settings)


def constant_flat(dest: Path) -> Path:
    """The baseline with +50 on the flat logit: it answers flat with probability 1.0 (to 6 decimals) on every
    bar, so each decision line shows which of the two models made it."""
    model = onnx.load(str(BASELINE_MODEL))
    bias = next(i for i in model.graph.initializer if i.name == "action_bias")
    values = onnx.numpy_helper.to_array(bias).copy()
    values[2] += 50.0
    bias.CopyFrom(onnx.numpy_helper.from_array(values, "action_bias"))
    for p in model.metadata_props:
        if p.key == "alphapulse.version":
            p.value = "constant-flat-1"
    onnx.save(model, str(dest))
    return dest


def _wait(pred: Any, timeout: float, what: str) -> None:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")


@pytest.mark.slow
def test_sighup_swaps_the_promoted_model_between_two_decisions(tmp_path: Path) -> None:
    flat = constant_flat(tmp_path / "flat.onnx")
    assert validate_model(flat) == []
    every2 = variant(BASELINE_MODEL, tmp_path / "every2.onnx", version="baseline-every-2")
    model_proto = onnx.load(str(every2))
    model_proto.metadata_props.add(key="alphapulse.decision_every_bars", value="2")
    onnx.save(model_proto, str(every2))
    d = DaemonProc(tmp_path / "d", replay_file=slice_bundled(tmp_path / "r.csv", 1500), speed="6000",
                   service={"model": {"path": ""}})

    def model(*args: str) -> None:
        r = subprocess.run([sys.executable, "-m", "alphapulse", "model", *args], env=d.env, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr

    try:
        model("promote", str(BASELINE_MODEL))
        d.start()
        d.wait_ready(60)
        d.wait_metric(lambda m: m["model"]["decisions"] >= 20, 60)
        model("promote", str(flat))
        d.signal(signal.SIGHUP)
        m = d.wait_metric(lambda m: m["model"]["version"] == "constant-flat-1", 60)
        d.wait_metric(lambda m, n=m["model"]["decisions"]: m["model"]["decisions"] >= n + 20, 60)
        d.poll_messages(0.2)
        msgs = [msg for _, msg in d.messages]
        assert "RELOADING=1" in msgs and "READY=1" in msgs[msgs.index("RELOADING=1"):]

        # a model whose cadence differs cannot be swapped in: refused, the running one keeps trading
        model("promote", str(every2))
        d.signal(signal.SIGHUP)
        _wait(lambda: any(k == "MODEL_RELOAD_REFUSED" for k, _ in incidents(d.log_dir)), 60, "refusal")
        assert d.metrics()["model"]["version"] == "constant-flat-1"
        assert d.proc is not None and d.proc.poll() is None
        assert d.stop() == 0
    finally:
        d.close()

    lines = [json.loads(ln) for ln in (d.log_dir / "ai_decisions.json").read_text().splitlines()]
    const = [ln["probabilities"]["flat"] == 1.0 and sum(ln["probabilities"].values()) == 1.0 for ln in lines]
    k = const.index(True)
    assert k >= 20 and all(const[k:]) and not any(const[:k]), "decisions of the two models interleave"
    assert len(lines) - k >= 20
    times = [parse_utc_ms(ln["candle_time"]) for ln in lines]
    assert all(b - a == 300_000 for a, b in zip(times, times[1:])), "a candle was skipped or decided twice"
    reloaded = [det for kind, det in incidents(d.log_dir) if kind == "MODEL_RELOADED"]
    assert len(reloaded) == 1 and reloaded[0]["previous"] == V1 and reloaded[0]["version"] == "constant-flat-1"
    assert reloaded[0]["after_candle"] == lines[k - 1]["candle_time"]  # the swap sat between these two decisions
    refused = [det for kind, det in incidents(d.log_dir) if kind == "MODEL_RELOAD_REFUSED"]
    assert "decision cadence differs" in refused[0]["problem"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: it is about 'sudo alphapulse model' on a service's files")
def test_sudo_leaves_files_the_service_user_can_read_and_replace(settings: Settings, models: dict[str, Path]) -> None:
    uid = gid = 4242  # the service's (dynamic) user, owner of the state and log directories
    for d in (settings.data_dir, settings.log_dir):
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, uid, gid)
    assert model_main(["promote", str(models["v1"])], settings) == 0
    assert model_main(["promote", str(models["v2"])], settings) == 0
    assert model_main(["rollback"], settings) == 0
    store = ModelStore(settings.data_dir)
    paths = [store.root, *store.root.rglob("*"), settings.log_dir / "incidents.log"]
    assert {(p.stat().st_uid, p.stat().st_gid) for p in paths} == {(uid, gid)}
    for p in (store.pointer_path, store.root / V1 / MODEL_FILE, store.root / V1 / "metadata.json"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


def test_a_stored_model_that_no_longer_loads_names_the_pointer(settings: Settings, models: dict[str, Path],
                                                               tmp_path: Path) -> None:
    assert model_main(["promote", str(models["v1"])], settings) == 0
    store = ModelStore(settings.data_dir)
    (store.root / V1 / MODEL_FILE).write_bytes(b"\x00" * 64)  # a disk error, or a hand edit
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALPHAPULSE_", "TRADING_MODE", "WEEX_"))}
    env.update({"ALPHAPULSE_CONFIG_DIR": str(tmp_path / "config"), "ALPHAPULSE_DATA_DIR": str(settings.data_dir),
                "ALPHAPULSE_LOG_DIR": str(settings.log_dir)})
    r = subprocess.run([sys.executable, "-m", "alphapulse", "check-config"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 78
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"alphapulse: config error: {store.pointer_path}: active: ")
    assert "model rollback" in lines[0]
    # and a rollback target that was damaged the same way is refused, not switched to
    assert model_main(["promote", str(models["v2"])], settings) == 0
    assert model_main(["rollback"], settings) == 1
    assert store.pointer().active == "baseline-momentum-2"


def test_a_models_backup_restores_the_store_with_its_pointer(settings: Settings, models: dict[str, Path],
                                                             tmp_path: Path) -> None:
    """`alphapulse backup --type models` (issue 11 part 1) carries this store: after a restore the same versions,
    the same active and previous, byte-identical files."""
    assert model_main(["promote", str(models["v1"])], settings) == 0
    assert model_main(["promote", str(models["v2"])], settings) == 0
    store = ModelStore(settings.data_dir)
    before = {p.relative_to(store.root): p.read_bytes() for p in store.root.rglob("*") if p.is_file()}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALPHAPULSE_", "TRADING_MODE", "WEEX_",
                                                                    "BACKUP_S3_", "AWS_"))}
    env.update({"ALPHAPULSE_CONFIG_DIR": str(tmp_path / "config"), "ALPHAPULSE_DATA_DIR": str(settings.data_dir),
                "ALPHAPULSE_LOG_DIR": str(settings.log_dir), "ALPHAPULSE_BACKUP_DIR": str(tmp_path / "backups")})

    def backup(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "alphapulse", "backup", *args], env=env, capture_output=True,
                              text=True, timeout=120)

    r = backup("create", "--type", "models")
    assert r.returncode == 0, r.stderr
    name = next(p.name for p in (tmp_path / "backups").iterdir() if p.name.startswith("alphapulse-models"))
    shutil.rmtree(store.root)
    assert resolve_model(settings)[1] == "bundled"
    r = backup("restore", "--backup-name", name, "--components", "models")
    assert r.returncode == 0, r.stderr
    after = {p.relative_to(store.root): p.read_bytes() for p in store.root.rglob("*") if p.is_file()}
    assert after == before
    assert (store.pointer().active, store.pointer().previous) == ("baseline-momentum-2", V1)
    assert model_main(["rollback"], settings) == 0 and store.pointer().active == V1
