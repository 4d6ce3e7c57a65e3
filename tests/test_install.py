"""scripts/install.sh and scripts/deploy.sh, run for real into a throwaway root.

install.sh builds a real venv (``--venv-from`` the test interpreter's environment: the checkout is pip-installed
with --no-deps, no network) and the tests check the files, modes, units (``systemd-analyze verify``) and the
logrotate file it produces, and that a second run changes nothing the operator owns.  deploy.sh upgrades a
real running daemon: the restart command is a stand-in for ``systemctl restart`` (no systemd as PID 1 here)
that stops the daemon by its pid and starts ``current``'s ``alphapulse run``; the health gate is the release's
real ``alphapulse health``.  No user is created (``--no-create-user``): the tests must not change the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.daemon_harness import BASELINE_MODEL, REPO, clean_env, free_port, slice_bundled

INSTALL = REPO / "scripts" / "install.sh"
DEPLOY = REPO / "scripts" / "deploy.sh"
VENV = Path(sys.prefix)  # the environment running the tests has every dependency


def release_env() -> dict[str, str]:
    """The daemon's clean environment without PYTHONPATH: a release must run its own copy of the package, not
    the checkout the tests import."""
    return {k: v for k, v in clean_env().items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def run_install(root: Path, *args: str, src: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(src / "scripts" / "install.sh"), "--root", str(root), "--venv-from", str(VENV),
                           "--no-create-user", *args], capture_output=True, text=True, timeout=300,
                          env=release_env())


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_install_into_a_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    r = run_install(root, "--version", "1.0-test")
    assert r.returncode == 0, r.stdout + r.stderr
    opt = root / "opt" / "alphapulse-rl"
    release = opt / "releases" / "1.0-test"
    assert os.readlink(opt / "current") == "releases/1.0-test"
    assert (release / ".complete").exists()

    # directories and modes
    assert mode(root / "var" / "lib" / "alphapulse") == 0o700
    assert mode(root / "var" / "log" / "alphapulse") == 0o700
    env_file = root / "etc" / "alphapulse" / "alphapulse.env"
    assert mode(env_file) == 0o600
    assert env_file.read_text() == (REPO / "config" / "alphapulse.env.example").read_text()
    for name in ("config.yaml", "trading_params.yaml"):
        assert mode(root / "etc" / "alphapulse" / name) == 0o644
        assert (root / "etc" / "alphapulse" / name).read_text() == (REPO / "config" / name).read_text()

    # the venv is real, holds the package (not the checkout), and its console script runs
    out = subprocess.run([str(opt / "current" / "venv" / "bin" / "python"), "-c",
                          "import alphapulse, alphapulse.policy as p; print(alphapulse.__file__); "
                          "print(p.default_model_path().is_file())"], capture_output=True, text=True, cwd="/",
                         timeout=120, env=release_env())
    assert out.returncode == 0, out.stderr
    where, model_ok = out.stdout.split()
    assert Path(where).resolve().is_relative_to(release / "venv") and model_ok == "True"
    ver = subprocess.run([str(opt / "current" / "venv" / "bin" / "alphapulse"), "--version"], capture_output=True,
                         text=True, timeout=60, cwd="/", env=release_env())
    assert ver.returncode == 0 and ver.stdout.startswith("alphapulse "), ver.stderr
    assert not (release / "src" / "build").exists() and not list((release / "src").glob("*.egg-info"))

    # the unit: installed verbatim (the default user), ExecStart through `current`, and systemd accepts it
    unit = root / "etc" / "systemd" / "system" / "alphapulse-trading.service"
    assert mode(unit) == 0o644
    text = unit.read_text()
    assert text == (REPO / "systemd" / "alphapulse-trading.service").read_text()
    assert "ExecStart=/opt/alphapulse-rl/current/venv/bin/alphapulse run" in text
    assert "\nUser=alphapulse\n" in text and "DynamicUser" not in text.split("[Service]")[1].split("# ---")[0]
    # every unit of the checkout, the backup template and its timers too, all starting `current`'s alphapulse
    unit_dir = root / "etc" / "systemd" / "system"
    shipped = sorted(p.name for p in (REPO / "systemd").glob("alphapulse-*") if p.suffix in (".service", ".timer"))
    assert sorted(p.name for p in unit_dir.iterdir()) == shipped
    assert {"alphapulse-backup@.service", "alphapulse-backup-full.timer"} <= set(shipped)
    for name in shipped:
        assert mode(unit_dir / name) == 0o644
        for line in (unit_dir / name).read_text().splitlines():
            if line.startswith(("ExecStart=", "ExecStartPost=")):
                assert line.split("=", 1)[1].startswith("/opt/alphapulse-rl/current/venv/bin/alphapulse "), line
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze missing (scripts/install_test_tools.sh installs it)")
    else:
        # verify resolves ExecStart: point it into the root, where install.sh put the real script
        verify_dir = tmp_path / "verify"
        verify_dir.mkdir()
        for name in shipped:
            (verify_dir / name).write_text((unit_dir / name).read_text().replace("=/opt/", f"={root}/opt/"))
        targets = [n.replace("@.service", "@data.service") for n in shipped]
        env = dict(os.environ, SYSTEMD_COLORS="0", SYSTEMD_PAGER="", LC_ALL="C.UTF-8")
        v = subprocess.run([tool, "--no-pager", "verify", *targets], capture_output=True, text=True, timeout=120,
                           cwd=verify_dir, env=env)
        assert v.returncode == 0 and v.stdout.strip() == "" and v.stderr.strip() == "", v.stdout + v.stderr
        (verify_dir / unit.name).write_text(text.replace("ExecStart=/opt/", f"ExecStart={tmp_path}/missing/opt/"))
        v = subprocess.run([tool, "--no-pager", "verify", unit.name], capture_output=True, text=True, timeout=120,
                           cwd=verify_dir, env=env)  # control: a unit whose program is missing fails
        assert v.returncode != 0 and "is not executable" in v.stdout + v.stderr

    # logrotate: the template with the runtime log directory and the service user
    lr = root / "etc" / "logrotate.d" / "alphapulse"
    assert mode(lr) == 0o644
    lr_text = lr.read_text()
    assert "@" not in lr_text.replace("@LOG_DIR@", "")  # comments may name the placeholder; nothing else left
    assert "/var/log/alphapulse/trades.csv /var/log/alphapulse/ai_decisions.json" in lr_text
    assert "su alphapulse alphapulse" in lr_text and "create 0640 alphapulse alphapulse" in lr_text

    # the operator's CLI wrapper carries the unit's directories
    wrapper = (opt / "bin" / "alphapulse").read_text()
    assert mode(opt / "bin" / "alphapulse") == 0o755
    backup_unit = (unit_dir / "alphapulse-backup@.service").read_text()
    backup_dir = next(x.split("=", 2)[2] for x in backup_unit.splitlines()
                      if x.startswith("Environment=ALPHAPULSE_BACKUP_DIR="))
    assert backup_dir == "%S/alphapulse-backups"  # what the wrapper must say too (health's backup check)
    for line in ("ALPHAPULSE_DATA_DIR=/var/lib/alphapulse", "ALPHAPULSE_LOG_DIR=/var/log/alphapulse",
                 "ALPHAPULSE_BACKUP_DIR=/var/lib/alphapulse-backups",
                 "exec /opt/alphapulse-rl/current/venv/bin/alphapulse"):
        assert line in wrapper
    assert mode(root / "var" / "lib" / "alphapulse-backups") == 0o700


def test_install_again_keeps_what_the_operator_owns(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert run_install(root, "--version", "1.0-test").returncode == 0
    env_file = root / "etc" / "alphapulse" / "alphapulse.env"
    env_file.write_text("TRADING_MODE=live\nWEEX_API_KEY=kept-key\n")
    env_file.chmod(0o644)  # someone loosened it
    cfg = root / "etc" / "alphapulse" / "config.yaml"
    cfg.write_text("mode: paper\n")
    unit = root / "etc" / "systemd" / "system" / "alphapulse-trading.service"
    unit.write_text("stale\n")
    venv_python = root / "opt" / "alphapulse-rl" / "releases" / "1.0-test" / "venv" / "bin" / "python"
    built = venv_python.lstat().st_mtime_ns

    r = run_install(root, "--version", "1.0-test")
    assert r.returncode == 0, r.stderr
    assert "release /opt/alphapulse-rl/releases/1.0-test exists; kept" in r.stdout
    assert env_file.read_text() == "TRADING_MODE=live\nWEEX_API_KEY=kept-key\n" and mode(env_file) == 0o600
    assert cfg.read_text() == "mode: paper\n"
    assert unit.read_text() == (REPO / "systemd" / "alphapulse-trading.service").read_text()  # units are code
    assert venv_python.lstat().st_mtime_ns == built
    assert [p.name for p in (root / "opt" / "alphapulse-rl" / "releases").iterdir()] == ["1.0-test"]


def test_an_interrupted_release_is_rebuilt(tmp_path: Path) -> None:
    root = tmp_path / "root"
    partial = root / "opt" / "alphapulse-rl" / "releases" / "1.0-test"
    partial.mkdir(parents=True)
    (partial / "junk").write_text("half a build")  # no .complete marker
    r = run_install(root, "--version", "1.0-test", "--no-venv")
    assert r.returncode == 0, r.stderr
    assert not (partial / "junk").exists() and (partial / ".complete").exists()


def test_another_service_user_reaches_unit_and_logrotate(tmp_path: Path) -> None:
    root = tmp_path / "root"
    r = run_install(root, "--version", "1.0-test", "--no-venv", "--user", "trader", "--group", "trading")
    assert r.returncode == 0, r.stderr
    assert "user trader does not exist (or not root): leaving file owners as they are" in r.stdout
    unit = (root / "etc" / "systemd" / "system" / "alphapulse-trading.service").read_text()
    assert "\nUser=trader\nGroup=trading\n" in unit and "User=alphapulse" not in unit
    lr = (root / "etc" / "logrotate.d" / "alphapulse").read_text()
    assert "su trader trading" in lr and "create 0640 trader trading" in lr


@pytest.mark.parametrize(("args", "message"), [
    (("--user", "Bad User"), "install.sh: --user: not a valid user name: Bad User"),
    (("--version", "../x"), "install.sh: --version: use letters, digits and ._+- only: ../x"),
    (("--frobnicate",), "install.sh: unknown option: --frobnicate (see --help)"),
    (("--venv-from", "/nonexistent"), "install.sh: --venv-from: no /nonexistent/bin/python"),
])
def test_install_rejects_bad_options_in_one_line(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    r = subprocess.run(["bash", str(INSTALL), "--root", str(tmp_path / "root"), *args], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and r.stderr.strip() == message


# ---- deploy.sh -------------------------------------------------------------------------------------------

RESTART = '''\
"""Stand-in for `systemctl restart alphapulse-trading`: stop the daemon by its pid, start current's."""
import os, signal, subprocess, sys, time
from pathlib import Path

pidfile = Path(os.environ["TEST_PIDFILE"])

def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"

if pidfile.exists():
    pid = int(pidfile.read_text())
    if alive(pid):
        os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + 15
        while alive(pid) and time.monotonic() < end:
            time.sleep(0.05)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
exe = Path(os.environ["DEPLOY_OPT"]) / "current" / "venv" / "bin" / "alphapulse"
log = open(os.environ["TEST_DAEMON_LOG"], "ab")
p = subprocess.Popen([str(exe), "run"], stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/",
                     start_new_session=True)
pidfile.write_text(str(p.pid))
'''


class Site:
    """A root with an installed release, a daemon environment and the deploy commands."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.root = tmp / "root"
        self.opt = self.root / "opt" / "alphapulse-rl"
        self.data = tmp / "data"
        self.pidfile = tmp / "daemon.pid"
        self.daemon_log = tmp / "daemon.log"
        self.backups_log = tmp / "backups.log"
        self.port = free_port()
        config = tmp / "config"
        config.mkdir()
        params = yaml.safe_load((REPO / "config" / "trading_params.yaml").read_text())
        params["timeframe"] = "5m"
        (config / "trading_params.yaml").write_text(yaml.safe_dump(params))
        base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
        base["model"]["path"] = str(BASELINE_MODEL)
        (config / "config.yaml").write_text(yaml.safe_dump(base))
        (tmp / "restart.py").write_text(RESTART)
        self.env = release_env()
        self.env.update({
            "ALPHAPULSE_CONFIG_DIR": str(config), "ALPHAPULSE_DATA_DIR": str(self.data),
            "ALPHAPULSE_LOG_DIR": str(tmp / "log"), "ALPHAPULSE_CONTROL_PORT": str(self.port),
            "ALPHAPULSE_REPLAY_FILE": str(slice_bundled(tmp / "replay.csv", 3000)),
            "ALPHAPULSE_REPLAY_SPEED": "300",  # a 5m bar a second: the daemon is still replaying at the end
            "TEST_PIDFILE": str(self.pidfile), "TEST_DAEMON_LOG": str(self.daemon_log),
        })

    def deploy(self, script: Path, version: str, timeout_s: int = 60) -> subprocess.CompletedProcess[str]:
        # the real backup tool of the running release, and a note of which release that was
        backup = (f'echo "$(readlink $DEPLOY_OPT/current)" >> {self.backups_log} && '
                  '"$DEPLOY_OPT/current/venv/bin/alphapulse" backup create --type data')
        health = '"$DEPLOY_OPT/current/venv/bin/alphapulse" health --skip service --skip monitor'
        return subprocess.run(["bash", str(script), "--root", str(self.root), "--version", version, "--venv-from",
                               str(VENV), "--health-timeout", str(timeout_s), "--backup-cmd", backup,
                               "--restart-cmd", f"{sys.executable} {self.tmp / 'restart.py'}",
                               "--health-cmd", health], capture_output=True, text=True, env=self.env,
                              timeout=timeout_s * 3 + 300)

    def daemon_release(self) -> str:
        """Which release the running daemon's interpreter comes from (its argv[0] is the venv's python)."""
        pid = int(self.pidfile.read_text())
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        assert state != "Z", "the daemon is not running"
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return next(a.decode() for a in argv if b"/releases/" in a).split("/releases/")[1].split("/")[0]

    def metrics(self) -> dict[str, object]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.pidfile.exists():
            pid = int(self.pidfile.read_text())
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                return
            end = time.monotonic() + 15
            while time.monotonic() < end and Path(f"/proc/{pid}").exists():
                try:
                    if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                        return
                except OSError:
                    return
                time.sleep(0.05)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    try:
        yield s
    finally:
        s.stop()


def broken_checkout(dest: Path) -> Path:
    """A copy of the checkout whose daemon cannot start: what a bad release looks like to the operator."""
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(".git", ".venv", "var", "build", "*.egg-info",
                                                              "__pycache__", ".*_cache", ".bench"))
    cli = dest / "alphapulse" / "cli.py"
    text = cli.read_text()
    marker = "def cmd_run(args: argparse.Namespace) -> int:\n"
    assert marker in text
    cli.write_text(text.replace(marker, marker + "    raise SystemExit('this release is broken (test)')\n"))
    return dest


@pytest.mark.slow
def test_deploy_upgrades_and_rolls_back_a_broken_release(site: Site, tmp_path: Path) -> None:
    r = run_install(site.root, "--version", "v1")
    assert r.returncode == 0, r.stderr
    subprocess.run([sys.executable, str(tmp_path / "restart.py")], env={**site.env, "DEPLOY_OPT": str(site.opt)},
                   check=True, timeout=60)  # the service runs v1

    good = site.deploy(DEPLOY, "v2")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "upgraded: releases/v1 -> releases/v2, healthy" in good.stdout
    assert os.readlink(site.opt / "current") == "releases/v2"
    assert site.daemon_release() == "v2"
    assert site.backups_log.read_text().splitlines() == ["releases/v1"]  # backed up before the switch
    processed = site.metrics()["market"]["candles_processed"]  # type: ignore[index]

    bad = site.deploy(broken_checkout(tmp_path / "broken") / "scripts" / "deploy.sh", "v3-broken", timeout_s=30)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "ROLLBACK: releases/v3-broken is not healthy; back to releases/v2" in bad.stdout
    assert "rolled back to releases/v2, healthy" in bad.stdout
    assert os.readlink(site.opt / "current") == "releases/v2"
    assert site.daemon_release() == "v2"
    assert "this release is broken (test)" in site.daemon_log.read_text()  # the broken one really ran
    assert (site.opt / "releases" / "v3-broken" / ".complete").exists()  # kept for inspection
    assert site.backups_log.read_text().splitlines() == ["releases/v1", "releases/v2"]
    assert len(list((site.tmp / "backups").glob("*data*"))) == 2  # alphapulse backup's own directory
    # the old release carries on from the same store
    assert site.metrics()["market"]["candles_processed"] > 0  # type: ignore[index,operator]
    assert processed > 0
    health = subprocess.run([str(site.opt / "current" / "venv" / "bin" / "alphapulse"), "health", "--skip",
                             "service", "--skip", "monitor"], env=site.env, capture_output=True, text=True,
                            timeout=120)
    assert health.returncode == 0, health.stdout


def test_deploy_stops_before_changing_anything_when_the_backup_fails(site: Site) -> None:
    assert run_install(site.root, "--version", "v1", "--no-venv").returncode == 0
    r = subprocess.run(["bash", str(DEPLOY), "--root", str(site.root), "--version", "v2", "--backup-cmd", "exit 3",
                        "--restart-cmd", "echo restarted >> /dev/null", "--health-cmd", "true"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "backup failed: nothing changed, not upgrading" in r.stdout
    assert os.readlink(site.opt / "current") == "releases/v1"
    assert not (site.opt / "releases" / "v2").exists()


def test_deploy_keeps_releases_and_reports_an_unhealthy_rollback(tmp_path: Path) -> None:
    """deploy.sh's own logic with stand-in commands: old releases pruned to --keep (never current or previous),
    and exit 2 when the release rolled back to is not healthy either."""
    root = tmp_path / "root"
    opt = root / "opt" / "alphapulse-rl"
    assert run_install(root, "--version", "v1", "--no-venv").returncode == 0
    restarts = tmp_path / "restarts"

    def deploy(version: str, health: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(DEPLOY), "--root", str(root), "--version", version, "--no-venv",
                               "--keep", "2", "--health-timeout", "1", "--backup-cmd", "true",
                               "--restart-cmd", f'readlink "$DEPLOY_OPT/current" >> {restarts}',
                               "--health-cmd", health], capture_output=True, text=True, timeout=120)

    outs = []
    for i, (prev, v) in enumerate((("v1", "v2"), ("v2", "v3"), ("v3", "v4"))):
        t = time.time() - 100 + i  # releases age in the order they were made, whatever the clock's resolution
        os.utime(opt / "releases" / prev, (t, t))
        r = deploy(v, "true")
        assert r.returncode == 0, r.stdout + r.stderr
        outs.append(r.stdout)
    assert sorted(p.name for p in (opt / "releases").iterdir()) == ["v3", "v4"]
    assert "removed" not in outs[0]  # v1 is the previous release then: kept
    assert "removed old release releases/v1" in outs[1] and "removed old release releases/v2" in outs[2]

    # v5 never gets healthy, and neither does v4 after the rollback (the health command fails everywhere)
    r = deploy("v5", "exit 1")
    assert r.returncode == 2, r.stdout
    assert "rolled back to releases/v4 but it is not healthy either" in r.stdout
    assert os.readlink(opt / "current") == "releases/v4"
    assert restarts.read_text().splitlines()[-2:] == ["releases/v5", "releases/v4"]


def test_deploy_without_an_installation_says_so(tmp_path: Path) -> None:
    r = subprocess.run(["bash", str(DEPLOY), "--root", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stdout.strip() == f"deploy.sh: no installation at {tmp_path}/opt/alphapulse-rl/current: run " \
                               "scripts/install.sh first"
    r = subprocess.run(["bash", str(DEPLOY), "--health-timeout", "soon"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 64 and r.stderr.strip() == "deploy.sh: --health-timeout: whole seconds >= 1"
