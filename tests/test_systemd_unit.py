"""Checks for systemd/alphapulse-trading.service.

Three layers, because each catches what the others cannot:

* the unit text carries the settings the daemon's contract relies on (notify, watchdog,
  restart policy, directories, core sandboxing);
* systemd's own tooling accepts it: ``systemd-analyze verify`` prints nothing about it and
  ``systemd-analyze security --offline=true`` rates its exposure 1.2 or lower (it scores 1.1);
* the sandbox really fits the software: every native library the daemon loads can live
  under ``MemoryDenyWriteExecute=yes``, and both the Python stack piece by piece
  (onnxruntime on the shipped policy, numpy, SQLite, uvloop + aiohttp on loopback,
  sd_notify) and the real ``alphapulse run`` work under the unit's own seccomp rules
  (SystemCallFilter=, MemoryDenyWriteExecute=, RestrictAddressFamilies=,
  SystemCallErrorNumber=), rebuilt with libseccomp the way systemd.exec(5) describes them.
  A hardening option that breaks the daemon would otherwise only show up on a production
  host.

Not reproduced here (no systemd as PID 1): the namespace options (ProtectSystem=,
PrivateTmp=, ProtectProc=, PrivateUsers=, User=...). systemd-analyze checks them
statically; the unit's comments record what was measured by hand for them.

systemd-analyze comes from ``scripts/install_test_tools.sh`` (Debian package ``systemd``).
Where it is missing the tests skip, except under CI=true, where a missing tool fails them
so that a green CI run always means the unit was checked.
"""

from __future__ import annotations

import configparser
import ctypes.util
import errno
import importlib.metadata
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT_NAME = "alphapulse-trading.service"
UNIT_PATH = REPO / "systemd" / UNIT_NAME
INSTALL_SCRIPT = REPO / "scripts" / "install_test_tools.sh"
SHIPPED_EXEC_START = "/opt/alphapulse-rl/current/venv/bin/alphapulse run"  # scripts/install.sh makes it
MAX_EXPOSURE = 1.2  # the unit scores 1.1; a regression by one notch fails

Unit = dict[str, dict[str, list[str]]]


# --------------------------------------------------------------------------- helpers


def parse_unit(text: str) -> Unit:
    """Parse a unit file into {section: {key: [values in order]}}.

    configparser cannot be used as is: systemd allows a key several times (each
    Environment= adds a variable, SystemCallFilter= lines combine) and joins lines ending
    in a backslash. Values are kept verbatim so tests see what systemd sees.
    """
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        if section is None or "=" not in line:
            raise ValueError(f"not a unit-file assignment: {raw!r}")
        key, value = line.split("=", 1)
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def last(unit: Unit, section: str, key: str) -> str | None:
    """Effective value of a single-valued setting: systemd lets the last assignment win."""
    values = unit.get(section, {}).get(key)
    return values[-1] if values else None


def environment(unit: Unit) -> dict[str, str]:
    """Variables set by Environment= lines (space-separated assignments, no quoting used)."""
    env: dict[str, str] = {}
    for line in unit["Service"].get("Environment", []):
        for assignment in line.split():
            name, value = assignment.split("=", 1)
            env[name] = value
    return env


@pytest.fixture(scope="module")
def unit() -> Unit:
    return parse_unit(UNIT_PATH.read_text(encoding="utf-8"))


def require_systemd_analyze() -> str:
    """Path of systemd-analyze; skip without it, but fail under CI where it must be installed."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        reason = "systemd-analyze not installed (run scripts/install_test_tools.sh as root)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; CI=true, so this is an error, not a skip")
        pytest.skip(reason)
    return tool


def run_analyze(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run systemd-analyze with plain, untranslated, colourless output so it can be parsed."""
    env = dict(os.environ, SYSTEMD_COLORS="0", SYSTEMD_PAGER="", LC_ALL="C.UTF-8")
    return subprocess.run(
        [require_systemd_analyze(), "--no-pager", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def runnable_copy(directory: Path, *, extra_lines: str = "") -> Path:
    """Copy the unit with ExecStart= pointing at a binary that exists here.

    `systemd-analyze verify` fails when the ExecStart binary is missing, and
    /opt/alphapulse-rl/current/venv is a production path. The venv's own console script is the
    closest stand-in; the interpreter running the tests always exists.
    """
    script = Path(sys.prefix) / "bin" / "alphapulse"
    binary = script if script.is_file() and os.access(script, os.X_OK) else Path(sys.executable)
    text = UNIT_PATH.read_text(encoding="utf-8")
    exec_line = f"ExecStart={SHIPPED_EXEC_START}"
    assert exec_line in text
    text = text.replace(exec_line, f"ExecStart={binary} run")
    if extra_lines:
        text = text.replace("[Service]\n", f"[Service]\n{extra_lines}\n", 1)
    copy = directory / UNIT_NAME
    copy.write_text(text, encoding="utf-8")
    return copy


def lines_about(output: str, unit_file: Path) -> list[str]:
    """Diagnostics that concern our unit: systemd names it by file path or by unit name."""
    return [line for line in output.splitlines() if unit_file.name in line or str(unit_file) in line]


# ----------------------------------------------------------------- unit text contract

REQUIRED_SERVICE_SETTINGS = {
    "Type": "notify",
    "NotifyAccess": "main",
    "WatchdogSec": "30",
    "ExecStart": SHIPPED_EXEC_START,
    "Restart": "on-failure",
    "RestartSec": "5",
    "RestartPreventExitStatus": "78",
    "TimeoutStopSec": "15",
    "KillSignal": "SIGTERM",
    "EnvironmentFile": "-/etc/alphapulse/alphapulse.env",
    "StateDirectory": "alphapulse",
    "LogsDirectory": "alphapulse",
    "ConfigurationDirectory": "alphapulse",
    "User": "alphapulse",  # the system user scripts/install.sh creates (tests/test_install.py)
    "Group": "alphapulse",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
    "SystemCallErrorNumber": "EPERM",
    "UMask": "0077",
    "MemoryMax": "1G",
}


@pytest.mark.parametrize(("key", "expected"), sorted(REQUIRED_SERVICE_SETTINGS.items()))
def test_service_setting(unit: Unit, key: str, expected: str) -> None:
    assert last(unit, "Service", key) == expected


def test_daemon_directories_come_from_systemd(unit: Unit) -> None:
    """The daemon finds its directories through these variables; %S/%L/%E follow StateDirectory= & co."""
    env = environment(unit)
    assert env["ALPHAPULSE_DATA_DIR"] == "%S/alphapulse"
    assert env["ALPHAPULSE_LOG_DIR"] == "%L/alphapulse"
    assert env["ALPHAPULSE_CONFIG_DIR"] == "%E/alphapulse"


def test_no_capabilities_and_only_needed_socket_families(unit: Unit) -> None:
    service = unit["Service"]
    assert service["CapabilityBoundingSet"] == [""]
    assert service["AmbientCapabilities"] == [""]
    # AF_UNIX carries sd_notify; AF_INET/AF_INET6 the exchange and the loopback control server.
    assert set(service["RestrictAddressFamilies"][-1].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert service["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    # The live exchange needs the public internet through changing CDN addresses (see the unit).
    assert "IPAddressDeny" not in service and "PrivateNetwork" not in service


def test_unit_is_wanted_by_multi_user_and_waits_for_network(unit: Unit) -> None:
    assert last(unit, "Install", "WantedBy") == "multi-user.target"
    assert "network-online.target" in unit["Unit"]["After"][-1].split()
    assert "network-online.target" in unit["Unit"]["Wants"][-1].split()


def test_parser_keeps_duplicates_and_continuations() -> None:
    parsed = parse_unit("[Service]\n# c\nEnvironment=A=1\nEnvironment=B=2 \\\n  C=3\nX=\n")
    assert parsed["Service"]["Environment"] == ["A=1", "B=2 C=3"]
    assert parsed["Service"]["X"] == [""]


# ---------------------------------------------------------------- systemd-analyze


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    copy = runnable_copy(tmp_path)
    result = run_analyze("verify", str(copy))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert lines_about(output, copy) == [], output


def test_verify_check_detects_a_broken_unit(tmp_path: Path) -> None:
    """Control for the test above: a misspelt key must produce a diagnostic we recognise."""
    copy = runnable_copy(tmp_path, extra_lines="ProtectSytem=strict")
    result = run_analyze("verify", str(copy))
    complaints = lines_about(result.stdout + result.stderr, copy)
    assert any("ProtectSytem" in line for line in complaints), result.stdout + result.stderr


def parse_exposure(output: str) -> float:
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match, f"no exposure line in:\n{output}"
    return float(match.group(1))


def test_security_exposure_stays_at_1_2_or_lower() -> None:
    result = run_analyze("security", "--offline=true", str(UNIT_PATH))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    exposure = parse_exposure(output)
    assert exposure <= MAX_EXPOSURE, output


def test_security_score_reacts_to_weaker_sandbox(tmp_path: Path) -> None:
    """Control: without the sandbox the same command must report a worse score."""
    weak = tmp_path / UNIT_NAME
    kept = [
        line
        for line in UNIT_PATH.read_text(encoding="utf-8").splitlines()
        if not line.startswith(("Protect", "Private", "Restrict", "SystemCall", "User", "Group", "Capability"))
    ]
    weak.write_text("\n".join(kept) + "\n", encoding="utf-8")
    result = run_analyze("security", "--offline=true", str(weak))
    assert parse_exposure(result.stdout + result.stderr) > MAX_EXPOSURE + 3


# ----------------------------------------- MemoryDenyWriteExecute= vs native libraries

PT_DYNAMIC = 2
PT_GNU_STACK = 0x6474E551
PF_X = 0x1
DT_TEXTREL = 22
DT_FLAGS = 30
DF_TEXTREL = 0x4


def exec_memory_needs(path: Path) -> list[str]:
    """Why loading this ELF object would need W+X memory, which MemoryDenyWriteExecute= forbids.

    The dynamic loader makes the stack executable when an object's PT_GNU_STACK has PF_X,
    and patches code pages (mprotect to PROT_EXEC afterwards) for text relocations; both
    are refused under the unit's seccomp rules, and the import then fails.
    """
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:  # only ELF64 little-endian
        return []
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    reasons = []
    for i in range(phnum):
        p_type, p_flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if p_type == PT_GNU_STACK and p_flags & PF_X:
            reasons.append("executable stack")
        if p_type == PT_DYNAMIC:
            for off in range(p_offset, p_offset + p_filesz - 15, 16):
                tag, val = struct.unpack_from("<qQ", data, off)
                if tag == DT_TEXTREL or (tag == DT_FLAGS and val & DF_TEXTREL):
                    reasons.append("text relocations")
    return reasons


def runtime_distributions() -> list[importlib.metadata.Distribution]:
    """The daemon's declared dependencies and theirs, as installed (extras such as [test] left out)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8")).get("project", {})
    todo = list(project.get("dependencies", []))
    if not todo:  # declared in setup.cfg instead
        cfg = configparser.ConfigParser()
        cfg.read(REPO / "setup.cfg", encoding="utf-8")
        todo = [line.strip() for line in cfg["options"]["install_requires"].splitlines() if line.strip()]
    seen: dict[str, importlib.metadata.Distribution] = {}
    while todo:
        requirement = todo.pop()
        if "extra ==" in requirement:
            continue
        name_match = re.match(r"[A-Za-z0-9._-]+", requirement)
        assert name_match, requirement
        key = re.sub(r"[-_.]+", "-", name_match.group(0)).lower()
        if key in seen:
            continue
        try:
            dist = importlib.metadata.distribution(key)
        except importlib.metadata.PackageNotFoundError:
            continue
        seen[key] = dist
        todo.extend(dist.requires or [])
    return list(seen.values())


def native_objects() -> Iterator[Path]:
    for dist in runtime_distributions():
        for file in dist.files or []:
            if re.search(r"\.so(\.|$)", file.name):
                yield Path(str(dist.locate_file(file)))
    yield Path(os.path.realpath(sys.executable))
    libdir, ldlibrary = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
    if libdir and ldlibrary and (Path(libdir) / ldlibrary).is_file():
        yield Path(libdir) / ldlibrary
    dynload = sysconfig.get_config_var("DESTSHARED")  # the stdlib's _sqlite3, _ctypes, ...
    if dynload and Path(dynload).is_dir():
        yield from sorted(Path(dynload).glob("*.so"))


def test_native_libraries_need_no_writable_executable_memory() -> None:
    scanned: dict[Path, list[str]] = {path: exec_memory_needs(path) for path in native_objects() if path.is_file()}
    names = {path.name for path in scanned}
    assert any(name.startswith("onnxruntime_pybind11_state") for name in names), "onnxruntime not scanned"
    assert any(name.startswith("_multiarray_umath") for name in names), "numpy not scanned"
    assert any(name.startswith("_sqlite3") for name in names), "stdlib sqlite3 not scanned"
    offenders = {str(path): why for path, why in scanned.items() if why}
    assert offenders == {}, "remove MemoryDenyWriteExecute=yes from the unit or replace these libraries"


def test_elf_check_flags_an_executable_stack(tmp_path: Path) -> None:
    """Control for the scan: a copy of a real library with PF_X set on PT_GNU_STACK is caught."""
    source = Path(sysconfig.get_config_var("DESTSHARED")) / next(
        p.name for p in Path(sysconfig.get_config_var("DESTSHARED")).glob("_sqlite3*.so")
    )
    data = bytearray(source.read_bytes())
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        at = phoff + i * phentsize
        p_type, p_flags = struct.unpack_from("<II", data, at)
        if p_type == PT_GNU_STACK:
            struct.pack_into("<I", data, at + 4, p_flags | PF_X)
    patched = tmp_path / "patched.so"
    patched.write_bytes(bytes(data))
    assert exec_memory_needs(source) == []
    assert exec_memory_needs(patched) == ["executable stack"]


# ------------------------------------------- the real stack under the unit's seccomp rules

# Runs in a fresh interpreter: install the filters the unit asks systemd for, then exec
# cfg["argv"] so that interpreter start-up and every import happen inside them, as under systemd.
SECCOMP_LOADER = r"""
import ctypes, json, os, sys
cfg = json.loads(sys.argv[1])
lib = ctypes.CDLL(cfg["libseccomp"], use_errno=True)
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
lib.seccomp_release.argtypes = [ctypes.c_void_p]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]

class Cmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]

def load(default, rules):
    # Several filters, like systemd installs them: the kernel applies the strictest verdict.
    ctx = lib.seccomp_init(default)
    for action, name, cmps in rules:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:
            continue  # not a syscall on this architecture
        arr = (Cmp * max(1, len(cmps)))(*[Cmp(*c) for c in cmps])
        rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr if cmps else None)
        if rc < 0:
            raise OSError(-rc, "seccomp_rule_add " + name)
    rc = lib.seccomp_load(ctx)
    lib.seccomp_release(ctx)
    if rc < 0:
        raise OSError(-rc, "seccomp_load")

ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS, as NoNewPrivileges=yes
for f in cfg["filters"]:
    load(f["default"], f["rules"])
os.execv(cfg["argv"][0], cfg["argv"])
"""

WORKLOAD = r"""
import asyncio, ctypes, errno, json, mmap, os, socket, sqlite3, sys
model_path, notify_path = sys.argv[1], sys.argv[2]
out = {}

import numpy as np
import onnxruntime as ort
so = ort.SessionOptions()
session = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])
inp = session.get_inputs()[0]
shape = [d if isinstance(d, int) else 1 for d in inp.shape]
probs = session.run(None, {inp.name: np.linspace(-1, 1, int(np.prod(shape)), dtype=np.float32).reshape(shape)})[0]
out["onnx_shape"] = list(probs.shape)
out["onnx_finite"] = bool(np.isfinite(probs).all())
a = np.arange(90000, dtype=np.float64).reshape(300, 300) / 9e4
out["numpy_matmul"] = float((a @ a.T).trace())

db = sqlite3.connect(os.path.join(os.environ["ALPHAPULSE_DATA_DIR"], "state.db"))
out["sqlite_journal"] = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
db.execute("CREATE TABLE t (x)"); db.execute("INSERT INTO t VALUES (1)"); db.commit()
out["sqlite_rows"] = db.execute("SELECT count(*) FROM t").fetchone()[0]

with open("/proc/self/status") as f:
    out["rss_kb"] = int(next(l for l in f if l.startswith("VmRSS:")).split()[1])
out["ctypes_callback"] = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(lambda x: x + 1)(41)

def refused(call):
    try:
        call()
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    return None
out["wx_mmap"] = refused(lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC))
out["netlink_socket"] = refused(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW))
out["setpriority"] = refused(lambda: os.setpriority(os.PRIO_PROCESS, 0, 1))

import uvloop
from aiohttp import ClientSession, web

async def serve_and_fetch():
    app = web.Application()
    app.router.add_get("/health", lambda request: web.json_response({"ok": True}))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/health") as response:
            out["http"] = await response.json()
    out["executor"] = await asyncio.get_running_loop().run_in_executor(None, sum, range(10))
    await runner.cleanup()

uvloop.run(serve_and_fetch())
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
    s.sendto(b"READY=1\nSTATUS=sandbox check", notify_path)
print(json.dumps(out))
"""


def syscall_groups(listing: str) -> dict[str, list[str]]:
    """Parse `systemd-analyze syscall-filter`: '@group' headers, indented members, '#' comments."""
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in listing.splitlines():
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        if not line[0].isspace():
            current = groups.setdefault(item, []) if item.startswith("@") else None
        elif current is not None:
            current.append(item)
    return groups


def expand(groups: dict[str, list[str]], item: str) -> set[str]:
    if not item.startswith("@"):
        return {item}
    return set().union(*(expand(groups, member) for member in groups[item]))


def seccomp_filters(unit: Unit, groups: dict[str, list[str]]) -> list[dict[str, object]]:
    """Translate the unit's seccomp settings into libseccomp filters, following systemd.exec(5)."""
    service = unit["Service"]
    allow_action = 0x7FFF0000  # SCMP_ACT_ALLOW

    def errno_action(name: str) -> int:
        return 0x00050000 | getattr(errno, name)  # SCMP_ACT_ERRNO(e)

    filters: list[dict[str, object]] = []
    if last(unit, "Service", "MemoryDenyWriteExecute") == "yes":
        masked_eq, prot_write_exec, prot_exec, shm_exec = 7, 0x6, 0x4, 0o100000
        filters.append(
            {
                "default": allow_action,
                "rules": [
                    (errno_action("EPERM"), "mmap", [(2, masked_eq, prot_write_exec, prot_write_exec)]),
                    (errno_action("EPERM"), "mprotect", [(2, masked_eq, prot_exec, prot_exec)]),
                    (errno_action("EPERM"), "pkey_mprotect", [(2, masked_eq, prot_exec, prot_exec)]),
                    (errno_action("EPERM"), "shmat", [(2, masked_eq, shm_exec, shm_exec)]),
                ],
            }
        )
    families = service.get("RestrictAddressFamilies", [""])[-1].split()
    if families and not families[0].startswith("~"):
        allowed = {getattr(socket, family) for family in families}
        eq, gt, af_max = 4, 6, 46
        rules: list[object] = [
            (errno_action("EAFNOSUPPORT"), "socket", [(0, eq, family, 0)])
            for family in range(af_max)
            if family not in allowed
        ]
        rules.append((errno_action("EAFNOSUPPORT"), "socket", [(0, gt, af_max - 1, 0)]))
        filters.append({"default": allow_action, "rules": rules})
    lines = service.get("SystemCallFilter", [])
    if lines:
        assert not lines[0].startswith("~"), "the unit is expected to use an allow list"
        syscalls: set[str] = set()
        for line in lines:
            deny = line.startswith("~")
            names = set().union(*(expand(groups, item) for item in line.lstrip("~").split()))
            syscalls = syscalls - names if deny else syscalls | names
        default = errno_action(last(unit, "Service", "SystemCallErrorNumber") or "EPERM")
        # Last, because it forbids seccomp() itself for any filter that would follow.
        filters.append({"default": default, "rules": [(allow_action, name, []) for name in sorted(syscalls)]})
    return filters


def expand_specifiers(value: str, dirs: dict[str, Path]) -> str:
    return re.sub(r"%([SLE])", lambda m: str(dirs[m.group(1)]), value)


def sandbox_config(unit: Unit) -> dict[str, object]:
    """The unit's seccomp rules for SECCOMP_LOADER (skips/fails like the other tool tests)."""
    libseccomp = ctypes.util.find_library("seccomp")
    if libseccomp is None:  # a dependency of the systemd package, so present wherever the tool is
        require_systemd_analyze()
        if os.environ.get("CI") == "true":
            pytest.fail("libseccomp not installed; CI=true, so this is an error, not a skip")
        pytest.skip("libseccomp not installed")
    listing = run_analyze("syscall-filter")
    assert listing.returncode == 0, listing.stderr
    filters = seccomp_filters(unit, syscall_groups(listing.stdout))
    assert len(filters) == 3, "expected MemoryDenyWriteExecute, RestrictAddressFamilies and SystemCallFilter"
    return {"libseccomp": libseccomp, "filters": filters}


def sandboxed(config: dict[str, object], argv: list[str]) -> list[str]:
    """Command line that runs argv under the given seccomp rules."""
    return [sys.executable, "-c", SECCOMP_LOADER, json.dumps({**config, "argv": argv})]


def test_python_stack_runs_under_the_units_seccomp_rules(unit: Unit, tmp_path: Path) -> None:
    """Each native piece the daemon relies on, exercised on its own so a failure names the culprit."""
    pytest.importorskip("uvloop")
    pytest.importorskip("aiohttp")
    pytest.importorskip("onnxruntime")
    models = sorted((REPO / "alphapulse" / "models").glob("*.onnx"))
    assert models, "no shipped ONNX policy in alphapulse/models"
    dirs = {"S": tmp_path / "state", "L": tmp_path / "log", "E": tmp_path / "etc"}
    for directory in dirs.values():
        (directory / "alphapulse").mkdir(parents=True)
    env = dict(os.environ)
    env.update({name: expand_specifiers(value, dirs) for name, value in environment(unit).items()})

    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(120)
        command = sandboxed(sandbox_config(unit), [sys.executable, "-c", WORKLOAD, str(models[0]), str(notify_path)])
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=180, check=False)
        assert result.returncode == 0, result.stderr
        message = notify.recv(4096).decode()

    report = json.loads(result.stdout.strip().splitlines()[-1])
    # The stack works...
    assert report["onnx_finite"] is True
    assert report["onnx_shape"][0] == 1
    assert report["numpy_matmul"] > 0
    assert (report["sqlite_journal"], report["sqlite_rows"]) == ("wal", 1)
    assert report["rss_kb"] > 10_000
    assert report["ctypes_callback"] == 42
    assert report["http"] == {"ok": True}
    assert report["executor"] == 45
    assert message.startswith("READY=1")
    # ...while each of the three filters is demonstrably in force.
    assert report["wx_mmap"] == "EPERM"
    assert report["netlink_socket"] == "EAFNOSUPPORT"
    assert report["setpriority"] == "EPERM"


def test_daemon_runs_under_the_units_seccomp_rules(
    unit: Unit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real `alphapulse run` in the sandbox: READY, watchdog pings, /health, clean SIGTERM stop.

    The process harness starts the daemon with subprocess.Popen; wrapping that call puts the
    seccomp loader in front of it without changing the harness.
    """
    harness = pytest.importorskip("tests.daemon_harness")
    config = sandbox_config(unit)
    real_popen = subprocess.Popen
    sandboxed_argvs: list[list[str]] = []

    def sandboxed_popen(argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        sandboxed_argvs.append(list(argv))
        return real_popen(sandboxed(config, list(argv)), **kwargs)  # type: ignore[call-overload]

    extra_env = {name: value for name, value in environment(unit).items() if not name.startswith("ALPHAPULSE_")}
    replay = harness.slice_bundled(tmp_path / "replay.csv", 2000)
    daemon = harness.DaemonProc(tmp_path, replay_file=replay, speed="max", watchdog_usec=2_000_000, env=extra_env)
    monkeypatch.setattr(harness.subprocess, "Popen", sandboxed_popen)
    try:
        daemon.start()
        monkeypatch.undo()
        daemon.wait_ready(60)
        daemon.wait_message("WATCHDOG=1", 10)
        status, body, _ = daemon.http("GET", "/health")
        assert status == 200, body
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(15) == 0, daemon.stderr()
        daemon.wait_message("STOPPING=1", 1)
    finally:
        daemon.close()
    assert len(sandboxed_argvs) == 1 and "run" in sandboxed_argvs[0]
    assert "Operation not permitted" not in daemon.stderr()


# ------------------------------------------------------------ install_test_tools.sh


def test_install_script_reports_an_installed_tool() -> None:
    require_systemd_analyze()
    result = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "systemd-analyze present (systemd " in result.stdout


def fake_tools(directory: Path, **scripts: str) -> dict[str, str]:
    """A PATH holding only the given shell-script stand-ins (plus head), so the install script's
    decisions can be checked without touching the machine's packages."""
    directory.mkdir()
    for name, body in scripts.items():
        tool = directory / name.replace("_", "-")
        tool.write_text(f"#!/bin/bash\n{body}\n", encoding="utf-8")
        tool.chmod(0o755)
    head = shutil.which("head")
    assert head is not None
    (directory / "head").symlink_to(head)
    return {"PATH": str(directory)}


def run_install_script(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def test_install_script_exits_zero_when_it_cannot_install(tmp_path: Path) -> None:
    """Not root and no tool: explain and exit 0, leaving skip-or-fail to the tests."""
    result = run_install_script(fake_tools(tmp_path / "bin", id="echo 1000"))
    assert result.returncode == 0, result.stderr
    assert "cannot install" in result.stdout


def test_install_script_installs_systemd_with_apt_once(tmp_path: Path) -> None:
    """As root: apt-get update, then the Debian package that ships systemd-analyze; a rerun does nothing."""
    bin_dir = tmp_path / "bin"
    calls = tmp_path / "apt-calls"
    tool = bin_dir / "systemd-analyze"
    apt_get = (  # "installing" drops a fake systemd-analyze into the PATH
        f'echo "DEBIAN_FRONTEND=$DEBIAN_FRONTEND $*" >> {calls}\n'
        f'[ "$1" = install ] && printf \'#!/bin/bash\\necho "systemd 999 (fake)"\\n\' > {tool}'
        f" && {shutil.which('chmod')} +x {tool}\n"
        "exit 0"
    )
    # the script's other tools (promtool, prometheus, logrotate, chromium) are present: only systemd here
    env = fake_tools(bin_dir, id="echo 0", apt_get=apt_get, promtool='echo "promtool, version 0 (fake)"',
                     prometheus="exit 0", logrotate='echo "logrotate 0 (fake)"', chromium='echo "Chromium 0 (fake)"')
    first = run_install_script(env)
    assert first.returncode == 0, first.stderr
    assert "installed Debian package systemd (systemd 999 (fake))" in first.stdout
    assert calls.read_text().splitlines() == [
        "DEBIAN_FRONTEND=noninteractive update -qq",
        "DEBIAN_FRONTEND=noninteractive install -y -qq --no-install-recommends systemd",
    ]
    second = run_install_script(env)
    assert second.returncode == 0, second.stderr
    assert "systemd-analyze present (systemd 999 (fake))" in second.stdout
    assert len(calls.read_text().splitlines()) == 2
