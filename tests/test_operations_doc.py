"""docs/OPERATIONS.md is executable: every command of its ``sh`` blocks runs against a real daemon and monitor.

The document's conventions (see its *Conventions* section):

* `` ```sh env `` is the operator's shell set-up; it runs before every command.
* `` ```sh `` blocks: every line is a command.  Each must be in :data:`EXPECT` (exit status, and a check of its
  output where that is cheap); a line the test does not know, a known line missing from the document, an
  unexpected exit status or output fails the test.
* `` ```sh root `` blocks need root and systemd as PID 1.  Not run; every ``alphapulse-*`` unit their
  ``systemctl``/``journalctl`` lines name must exist in ``systemd/``.  ``systemctl stop|start|restart`` of the
  two services and ``systemctl reload alphapulse-trading`` (the unit's ExecReload signal) are played on the
  test's own processes, so the
  restore, VACUUM and model-reload procedures run for real in the document's order.
* `` ```sh follow `` (``tail -F``): run for two seconds; still running then (``timeout``'s 124) is success.
* `` ```sh long `` / `` ```sh live `` (training; the exchange): the sub-command's ``--help`` must exit 0 and list
  every option the line uses.  ``alphapulse train``'s output is stood in by a copy of the daemon's model with a
  new version, written where the document's ``--out`` says.  A ``sh live`` line then runs for real against the
  local fake WEEX (``alphapulse fake-weex`` on 127.0.0.1, the exchange's URLs and keys in its environment).

Production paths and ports in the text are replaced by the throwaway ones (:func:`substitutions`), the same
way for the set-up block and for every command.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import pytest
import yaml

from tests.daemon_harness import BASELINE_MODEL, REPO, DaemonProc, MonitorProc, clean_env, free_port, slice_bundled

DOC = REPO / "docs" / "OPERATIONS.md"
SYSTEMD = REPO / "systemd"
SERVICES = ("alphapulse-trading", "alphapulse-monitor")
V1 = "baseline-momentum-1"  # the daemon's model in the test (the bundled 5m baseline)
V2 = "baseline-momentum-2"  # the stand-in for what `alphapulse train` writes

#: Production path or address in the document -> attribute of the test's :class:`Site` (longest first).
PRODUCTION = (
    ("/var/lib/alphapulse-backups", "backup_dir"),
    ("/var/lib/alphapulse", "data_dir"),
    ("/var/log/alphapulse", "log_dir"),
    ("/etc/alphapulse", "config_dir"),
    ("/opt/alphapulse-rl/bin", "bin_dir"),
    ("127.0.0.1:8080", "control"),
    ("127.0.0.1:8081", "monitor"),
)

BLOCK = re.compile(r"^( *)```([^\n`]*)\n(.*?)^\1```", re.S | re.M)
KINDS = {"sh", "sh env", "sh root", "sh follow", "sh long", "sh live"}


@dataclass(frozen=True)
class Line:
    kind: str
    text: str
    lineno: int


def doc_lines(text: str | None = None) -> list[Line]:
    """Every command line of the document's ``sh*`` blocks, in order (comment lines and blank lines dropped)."""
    text = DOC.read_text() if text is None else text
    out: list[Line] = []
    for m in BLOCK.finditer(text):
        info = " ".join(m.group(2).split())
        if info.split(" ")[0] not in ("sh", "bash", "shell", "console", "zsh"):
            continue  # text, ini, yaml: content, never run
        assert info in KINDS, f"docs/OPERATIONS.md line {text[:m.start()].count(chr(10)) + 1}: block kind " \
                              f"{info!r} is none of {sorted(KINDS)}"
        first = text[:m.start(3)].count("\n") + 1
        for i, raw in enumerate(m.group(3).splitlines()):
            s = raw.strip()
            if s and not s.startswith("#"):
                assert not s.endswith("\\"), f"line {first + i}: one command per line, no continuations"
                out.append(Line(info, s, first + i))
    return out


# --------------------------------------------------------------------------------------------------
# What each runnable line must do
# --------------------------------------------------------------------------------------------------

Check = Callable[[str], None]


@dataclass(frozen=True)
class Expect:
    status: frozenset[int] = frozenset({0})
    check: Check | None = None
    retry_s: float = 0.0  # re-run until the check passes (a fill, a reload between two candles)
    reason: str = ""


def has(*words: str) -> Check:
    def check(out: str) -> None:
        for w in words:
            assert w in out, f"expected {w!r} in the output"
    return check


def matches(pattern: str) -> Check:
    def check(out: str) -> None:
        assert re.search(pattern, out, re.M), f"expected /{pattern}/ in the output"
    return check


def as_json(pred: Callable[[Any], bool], what: str) -> Check:
    def check(out: str) -> None:
        value = json.loads(out)
        assert pred(value), f"{what}: got {out[:500]}"
    return check


def json_lines(pred: Callable[[Any], bool], what: str) -> Check:
    def check(out: str) -> None:
        rows = [json.loads(x) for x in out.splitlines() if x.strip()]
        assert rows and all(pred(r) for r in rows), f"{what}: got {out[:500]}"
    return check


def lines_equal(*want: str) -> Check:
    def check(out: str) -> None:
        assert out.split() == list(want), f"expected {list(want)}, got {out.split()}"
    return check


def health_table(trading_state: str | None = None, control: str = "OK") -> Check:
    """Every check but ``service`` is ok (there is no systemd as PID 1 here to ask about the unit); with
    ``trading_state``, ``control`` is ``control`` and says that trading state."""
    def check(out: str) -> None:
        rows = {m.group(1): (m.group(2), m.group(3))
                for m in re.finditer(r"^(\w+)\s+(OK|DEGRADED|FAILING)\s+(.*)$", out, re.M)}
        assert set(rows) == {"service", "control", "monitor", "feed", "model", "store", "disk", "clock", "backup"}, out
        if trading_state is not None:
            status, detail = rows.pop("control")
            assert status == control and f"trading state {trading_state}" in detail, out
        bad = {k: v for k, v in rows.items() if v[0] != "OK" and k != "service"}
        assert not bad, f"checks not ok: {bad}\n{out}"
    return check


def state(name: str) -> Check:
    return as_json(lambda v: v.get("ok") is True and v.get("state") == name, f"state {name}")


HEALTH = Expect(frozenset({0, 1, 2}), health_table(),
                reason="1 or 2 only from the service check: systemctl cannot answer without systemd as PID 1")
STOPPED_HEALTH = Expect(frozenset({1, 2}), health_table("EMERGENCY_STOP", "DEGRADED"))
MAINTENANCE_HEALTH = Expect(frozenset({0, 1, 2}), health_table("MAINTENANCE"))  # planned: not a fault
ANY_OK = Expect()

EXPECT: dict[str, Expect] = {
    # morning
    "alphapulse health": HEALTH,
    "df -h /var/lib/alphapulse /var/log/alphapulse": Expect(check=has("Filesystem")),
    "free -h": Expect(check=has("Mem:")),
    "tail -n 100 /var/log/alphapulse/alphapulse_$(date -u +%Y%m%d).log":
        Expect(check=json_lines(lambda r: "level" in r and "event" in r, "JSON log lines")),
    "tail -n 50 /var/log/alphapulse/trades.csv": Expect(check=has(",BTCUSDT,")),
    "curl -s http://127.0.0.1:8081/api/alerts | jq '.active_alerts'":
        Expect(check=as_json(lambda v: "model_confidence" in {a["rule"] for a in v}, "the open P3")),
    "curl -s http://127.0.0.1:8081/api/alerts | jq '.statistics'":
        Expect(check=as_json(lambda v: v["active"] >= 1, "statistics")),
    "grep '^TRADING_MODE=' /etc/alphapulse/alphapulse.env": Expect(check=lines_equal("TRADING_MODE=paper")),
    "alphapulse check-config": Expect(check=has("config ok: mode=paper")),
    "curl -s http://127.0.0.1:8080/health | jq .": Expect(check=as_json(lambda v: v["status"] == "ok", "health")),
    "curl -s http://127.0.0.1:8080/metrics | jq '.portfolio'":
        Expect(check=as_json(lambda v: v["equity"] > 0 and "positions" in v, "portfolio")),
    "alphapulse ctl metrics | jq '{state: .trading.state, equity: .portfolio.equity, daily_pnl: "
    ".portfolio.daily_pnl, drawdown: .portfolio.drawdown, risk: .risk.usage}'":
        Expect(check=as_json(lambda v: v["state"] == "ACTIVE" and v["equity"] > 0 and "leverage" in v["risk"],
                             "summary")),
    # evening
    "alphapulse report --daily": Expect(check=has("daily report", "HTML report:")),
    "awk -F, -v d=\"$(date -u +%F)\" 'index($1, d) == 1 {n++; pnl += $7} END {printf \"fills today: %d, PnL net "
    "of fees: %.2f\\n\", n, pnl}' /var/log/alphapulse/trades.csv": Expect(check=matches(r"^fills today: \d+, PnL")),
    "alphapulse backup list": Expect(check=matches(r"^alphapulse-full-\S+\s+full\s.*\bok$")),
    "ls -lt /var/lib/alphapulse-backups | head -n 5": Expect(check=has("alphapulse-full-")),
    "alphapulse backup verify \"$(latest_backup)\"": Expect(check=matches(r"^ok alphapulse-\S+: \d+ files match")),
    # weekly
    "alphapulse report --weekly": Expect(check=has("weekly report", "HTML report:")),
    "alphapulse evaluate --period 7d": Expect(check=has("buy_and_hold", "policy")),
    "du -sh /var/log/alphapulse/* | sort -h | tail -n 10": Expect(check=has("trades.csv")),
    "grep -h '\"level\":\"error\"' /var/log/alphapulse/alphapulse_*.log | tail -n 50": ANY_OK,
    "curl -s 'http://127.0.0.1:8081/api/logs?level=error&lines=50' | jq '.lines'":
        Expect(check=as_json(lambda v: isinstance(v, list), "a list of log records")),
    "grep -E 'MemTotal|MemAvailable|SwapFree' /proc/meminfo": Expect(check=has("MemTotal")),
    "grep -h '\"operator action\"' /var/log/alphapulse/alphapulse_*.log | tail -n 20": ANY_OK,
    # Prometheus exposition of both processes
    "curl -s 'http://127.0.0.1:8080/metrics?format=prometheus' | grep -E '^alphapulse_(equity|drawdown_ratio|ready) '":
        Expect(check=matches(r"\Aalphapulse_\w+ \S+\nalphapulse_\w+ \S+\nalphapulse_\w+ \S+\n\Z")),
    "curl -s http://127.0.0.1:8081/metrics | grep -c '^alphapulse_monitor_'":
        Expect(check=matches(r"\A[1-9]\d*\n\Z")),
    # alerts
    "curl -s -X POST -H \"Authorization: Bearer $(cat /var/lib/alphapulse/control_token)\" "
    "\"http://127.0.0.1:8081/api/alerts/$(curl -s http://127.0.0.1:8081/api/alerts | jq '[.active_alerts[] | "
    "select(.state == \"open\")][0].id')"
    "/acknowledge\" | jq '.alert | {id, rule, state}'":
        Expect(check=as_json(lambda v: isinstance(v["id"], int) and v["state"] == "acknowledged", "acknowledged")),
    "curl -s http://127.0.0.1:8080/health | jq '{status, problem, trading_state}'":
        Expect(check=as_json(lambda v: v["status"] == "ok" and v["problem"] is None, "healthy")),
    "curl -s http://127.0.0.1:8080/metrics | jq '{portfolio: .portfolio, usage: .risk.usage, limits: .risk.limits}'":
        Expect(check=as_json(lambda v: v["limits"]["daily_loss_limit_pct"] > 0, "limits")),
    "tail -n 20 /var/log/alphapulse/trades.csv": Expect(check=has(",BTCUSDT,")),
    "tail -n 20 /var/log/alphapulse/risk_alerts.json": ANY_OK,
    "ps aux --sort=-%cpu | head -n 10": Expect(check=has("PID")),
    "ps aux --sort=-%mem | head -n 10": Expect(check=has("PID")),
    "find /var/log/alphapulse -maxdepth 1 -name 'alphapulse_*.log*' -mtime +30 -print": Expect(check=lines_equal()),
    # troubleshooting
    "curl -s http://127.0.0.1:8080/metrics | jq '.system | {rss_mb, uptime_s, queue_depth}'":
        Expect(check=as_json(lambda v: v["rss_mb"] > 0, "rss")),
    "curl -s http://127.0.0.1:8080/metrics | jq '.exchange'": Expect(check=lines_equal("null"),
                                                                      reason="paper mode has no exchange"),
    "grep -h '\"logger\":\"alphapulse.exchange' /var/log/alphapulse/alphapulse_*.log | grep -E "
    "'\"level\":\"(warning|error)\"' | tail -n 20": ANY_OK,
    "alphapulse evaluate --quick": Expect(check=has("buy_and_hold", "policy")),
    "tail -n 50 /var/log/alphapulse/ai_decisions.json | jq -c '{candle_time, action, confidence, allowed, reason}'":
        Expect(check=json_lines(lambda r: 0 <= r["confidence"] <= 1 and r["reason"], "decisions")),
    "alphapulse fetch --validate": Expect(check=has("result: all checks passed")),
    "find /var/log/alphapulse -name 'alphapulse_*.log' -mtime -1 -exec grep -h '\"level\":\"error\"' {} + | "
    "tail -n 20": ANY_OK,
    "grep -h RISK_LIMIT_EXCEEDED /var/log/alphapulse/risk_alerts.json | tail -n 20": ANY_OK,
    "jq -r '.limit' /var/log/alphapulse/risk_alerts.json | sort | uniq -c": ANY_OK,
    "awk -F, 'NR > 1 {print $3}' /var/log/alphapulse/trades.csv | sort | uniq -c":
        Expect(check=matches(r"^\s*\d+ (buy|sell)$")),
    # emergency stop
    "curl -s -X POST -H \"Authorization: Bearer $(cat /var/lib/alphapulse/control_token)\" -d '{\"reason\": "
    "\"operator: extreme volatility\"}' http://127.0.0.1:8080/emergency_stop": Expect(check=state("EMERGENCY_STOP")),
    "alphapulse ctl emergency_stop": Expect(check=state("EMERGENCY_STOP")),
    "alphapulse ctl flatten_positions": Expect(check=as_json(lambda v: v["ok"] and v["action"] == "flatten_positions",
                                                             "flatten")),
    "curl -s http://127.0.0.1:8080/metrics | jq '.portfolio.positions'":
        Expect(check=lines_equal("[]"), retry_s=30, reason="a paper flatten fills at the next candle"),
    "curl -s http://127.0.0.1:8080/metrics | jq -r '.trading.state, .trading.state_reason'":
        Expect(check=matches(r"\AEMERGENCY_STOP\n")),
    "grep -h ' EMERGENCY_STOP ' /var/log/alphapulse/incidents.log | tail -n 1": Expect(check=has("EMERGENCY_STOP")),
    # recovery
    "grep -h '\"level\":\"error\"' /var/log/alphapulse/alphapulse_*.log | tail -n 100": ANY_OK,
    "alphapulse ctl resume_trading": Expect(check=state("ACTIVE")),
    "curl -s http://127.0.0.1:8080/metrics | jq -r '.trading.mode, .trading.state'":
        Expect(check=lines_equal("paper", "ACTIVE")),
    # disaster recovery
    "ls -la /var/lib/alphapulse /var/log/alphapulse /etc/alphapulse":
        Expect(check=has("alphapulse.db", "trades.csv", "alphapulse.env")),
    "alphapulse backup restore --backup-name \"$(latest_backup)\" --dry-run": Expect(check=has("dry run:")),
    "alphapulse backup restore --backup-name \"$(latest_backup)\"": Expect(check=has("restored")),
    "alphapulse evaluate --validate --model \"$(alphapulse model list --json | jq -r .daemon_loads.path)\"":
        Expect(check=matches(r"models/baseline-momentum-1/\S*\.onnx: ok$")),
    "curl -s http://127.0.0.1:8080/metrics | jq '{state: .trading.state, equity: .portfolio.equity, last_candle: "
    ".market.last_candle}'": Expect(check=as_json(lambda v: v["state"] == "ACTIVE" and v["equity"] > 0, "restored")),
    # maintenance
    "alphapulse backup create --type full": Expect(check=matches(r"^created alphapulse-full-")),
    "alphapulse ctl maintenance_mode": Expect(check=state("MAINTENANCE")),
    "sqlite3 -readonly /var/lib/alphapulse/alphapulse.db 'PRAGMA integrity_check'": Expect(check=lines_equal("ok")),
    "sqlite3 -readonly /var/lib/alphapulse/monitor.db 'PRAGMA integrity_check'": Expect(check=lines_equal("ok")),
    "sqlite3 /var/lib/alphapulse/alphapulse.db 'VACUUM'": Expect(check=lines_equal()),
    "sqlite3 /var/lib/alphapulse/monitor.db 'VACUUM'": Expect(check=lines_equal()),
    "alphapulse backup prune --keep-daily 7 --keep-weekly 4 --keep-monthly 12 --dry-run": ANY_OK,
    "curl -s http://127.0.0.1:8080/metrics | jq -r '.trading.state'": Expect(check=lines_equal("ACTIVE")),
    # model updates
    "alphapulse model promote \"$(alphapulse model list --json | jq -r .daemon_loads.path)\"":
        Expect(check=has(f"{V1} is already the active model")),
    "alphapulse evaluate --validate --model /var/lib/alphapulse/candidate.onnx": Expect(check=matches(r": ok$")),
    "alphapulse evaluate --model /var/lib/alphapulse/candidate.onnx --period 30d":
        Expect(check=has(f"model {V2}", "buy_and_hold")),
    "alphapulse model promote /var/lib/alphapulse/candidate.onnx": Expect(check=has(f"promoted {V2}")),
    "alphapulse model list": Expect(check=matches(rf"^\* {V2}\s")),
    "curl -s http://127.0.0.1:8080/metrics | jq -r '.model.version, .model.source'":
        Expect(check=lines_equal(V2, "store"), retry_s=30, reason="SIGHUP swaps the model between two candles"),
    "grep -h 'MODEL_' /var/log/alphapulse/incidents.log | tail -n 3": Expect(check=has("MODEL_")),
    "alphapulse model rollback": Expect(check=has(V1)),
    # performance, security
    "curl -s http://127.0.0.1:8080/metrics | jq '{inference_us: .model.inference_us, tick_to_order_us: "
    ".system.tick_to_order_us}'": Expect(check=as_json(lambda v: v["inference_us"]["count"] > 0, "latencies")),
    "curl -s -o /dev/null -w '%{http_code}\\n' -X POST http://127.0.0.1:8080/emergency_stop":
        Expect(check=lines_equal("401")),
    "curl -s -o /dev/null -w '%{http_code}\\n' -X POST http://127.0.0.1:8081/api/alerts/1/acknowledge":
        Expect(check=lines_equal("401")),
    # backups, incidents
    "alphapulse backup create --type data": Expect(check=matches(r"^created alphapulse-data-")),
    "alphapulse backup restore --backup-name \"$(latest_backup config)\" --components config --dry-run":
        Expect(check=has("dry run:", "(config)")),
    "curl -s http://127.0.0.1:8081/api/alerts | jq '.active_alerts[] | {id, rule, severity, message, opened_at}'":
        ANY_OK,
    "tail -n 20 /var/log/alphapulse/incidents.log": Expect(check=has("RESUME")),
}

#: (line, its n-th occurrence in the document, from 1) -> what that occurrence must do instead of EXPECT[line]:
#: the same command answers differently in another trading state.
AT: dict[tuple[str, int], Expect] = {
    ("alphapulse health", 2): STOPPED_HEALTH,  # recovery after the emergency stop, before resume_trading
    ("alphapulse health", 4): MAINTENANCE_HEALTH,  # after the maintenance window's restart, before resume_trading
}


# --------------------------------------------------------------------------------------------------
# Fast checks of the document itself
# --------------------------------------------------------------------------------------------------


def unit_names(line: str) -> list[str]:
    """The alphapulse-* units a systemctl/journalctl line names."""
    words = shlex.split(line)
    if not words or words[0] not in ("systemctl", "journalctl"):
        return []
    return [w for w in words if w.startswith("alphapulse-")]


def unit_exists(name: str) -> bool:
    files = [p.name for p in SYSTEMD.iterdir()]
    candidates = {name, f"{name}.service"}
    m = re.fullmatch(r"(alphapulse-[\w-]+)@([^.]+)(\.service)?", name)
    if m and m.group(2) != "*":
        candidates.add(f"{m.group(1)}@.service")  # an instance of a template
    if any("*" in c for c in candidates):
        return any(fnmatch.fnmatch(f, c) for f in files for c in candidates)
    return bool(candidates & set(files))


def test_every_documented_command_is_known_and_every_known_one_documented() -> None:
    runnable = {ln.text for ln in doc_lines() if ln.kind == "sh"}
    unknown = sorted(runnable - set(EXPECT))
    assert not unknown, "commands in docs/OPERATIONS.md that the test does not know:\n" + "\n".join(unknown)
    stale = sorted(set(EXPECT) - runnable)
    occurrences = [ln.text for ln in doc_lines() if ln.kind == "sh"]
    stale += [f"{t} (occurrence {n})" for t, n in AT if occurrences.count(t) < n]
    assert not stale, "commands the test expects that docs/OPERATIONS.md no longer has:\n" + "\n".join(stale)


def test_root_blocks_name_only_units_that_exist() -> None:
    named = [(ln.lineno, u) for ln in doc_lines() if ln.kind == "sh root" for u in unit_names(ln.text)]
    assert {u for _, u in named} >= {"alphapulse-trading", "alphapulse-monitor", "alphapulse-backup@full.service"}
    missing = [f"line {n}: {u}" for n, u in named if not unit_exists(u)]
    assert not missing, "units named in docs/OPERATIONS.md but not in systemd/:\n" + "\n".join(missing)
    assert not unit_exists("alphapulse-redis") and unit_exists("alphapulse-backup@data.service")


def test_the_environment_block_names_what_install_sh_and_the_units_use() -> None:
    """The operator's shell gets the service's paths: the ones install.sh writes into its CLI wrapper and the
    units set, and the backup directory the backup unit writes to."""
    env = [ln.text for ln in doc_lines() if ln.kind == "sh env"]
    assert env, "docs/OPERATIONS.md has no sh env block"
    install = (REPO / "scripts" / "install.sh").read_text()
    for var, path in (("STATE", "/var/lib/alphapulse"), ("LOGS", "/var/log/alphapulse"), ("ETC", "/etc/alphapulse"),
                      ("OPT", "/opt/alphapulse-rl"), ("BACKUPS", "/var/lib/alphapulse-backups")):
        assert re.search(rf"^{var}={re.escape(path)}(\s|$)", install, re.M), f"install.sh no longer sets {var}={path}"
    assert '"$ROOT$OPT/bin/alphapulse' in install and "export PATH=/opt/alphapulse-rl/bin:$PATH" in env
    exports = " ".join(env)
    for var, path in (("ALPHAPULSE_CONFIG_DIR", "/etc/alphapulse"), ("ALPHAPULSE_DATA_DIR", "/var/lib/alphapulse"),
                      ("ALPHAPULSE_LOG_DIR", "/var/log/alphapulse"),
                      ("ALPHAPULSE_BACKUP_DIR", "/var/lib/alphapulse-backups")):
        assert f"{var}={path}" in exports
    assert ". /etc/alphapulse/alphapulse.env" in exports
    backup_unit = (SYSTEMD / "alphapulse-backup@.service").read_text()
    assert "ALPHAPULSE_BACKUP_DIR=%S/alphapulse-backups" in backup_unit
    for unit in SERVICES:
        assert "EnvironmentFile=-/etc/alphapulse/alphapulse.env" in (SYSTEMD / f"{unit}.service").read_text()


def test_a_fresh_install_has_every_unit_path_and_program_the_document_uses(tmp_path: Path) -> None:
    """scripts/install.sh into a throwaway root: the units the root blocks name are installed (timers too), each
    unit runs the release's own alphapulse (what install.sh builds and deploy.sh switches), and the directories
    and files the commands read exist."""
    root = tmp_path / "root"
    r = subprocess.run(["bash", str(REPO / "scripts" / "install.sh"), "--root", str(root), "--no-venv",
                        "--no-systemctl", "--no-create-user", "--version", "doc-test"],
                       capture_output=True, text=True, timeout=120, env=clean_env())
    assert r.returncode == 0, r.stderr
    units = root / "etc" / "systemd" / "system"
    installed = sorted(p.name for p in units.iterdir())
    for ln in doc_lines():
        if ln.kind != "sh root":
            continue
        for name in unit_names(ln.text):
            cands = {name, f"{name}.service"}
            m = re.fullmatch(r"(alphapulse-[\w-]+)@([^.]+)(\.service)?", name)
            if m and m.group(2) != "*":
                cands.add(f"{m.group(1)}@.service")
            assert any(fnmatch.fnmatch(f, c) for f in installed for c in cands), \
                f"docs/OPERATIONS.md:{ln.lineno}: {name} is not installed by install.sh ({installed})"
    for unit in installed:
        for line in (units / unit).read_text().splitlines():
            if line.startswith(("ExecStart=", "ExecStartPost=", "ExecStartPre=")):
                program = line.split("=", 1)[1].split()[0].lstrip("-+!@:")
                assert program == "/opt/alphapulse-rl/current/venv/bin/alphapulse", f"{unit}: {line}"
    for path in ("/opt/alphapulse-rl/bin/alphapulse", "/etc/alphapulse/alphapulse.env", "/etc/alphapulse/config.yaml",
                 "/etc/alphapulse/monitoring.yaml", "/etc/logrotate.d/alphapulse", "/var/lib/alphapulse",
                 "/var/log/alphapulse"):
        assert (root / path.lstrip("/")).exists(), f"install.sh made no {path}"
    wrapper = (root / "opt/alphapulse-rl/bin/alphapulse").read_text()
    # the CLI's paths are the units': the operator's `alphapulse backup list` sees what the timers wrote
    for line in ("ALPHAPULSE_DATA_DIR=/var/lib/alphapulse", "ALPHAPULSE_LOG_DIR=/var/log/alphapulse",
                 "ALPHAPULSE_CONFIG_DIR=/etc/alphapulse", "ALPHAPULSE_BACKUP_DIR=/var/lib/alphapulse-backups",
                 ". /etc/alphapulse/alphapulse.env"):
        assert line in wrapper, f"the wrapper lacks {line}"
    assert (root / "var/lib/alphapulse-backups").is_dir()


def test_the_mode_switches_edit_the_environment_file_install_sh_ships(tmp_path: Path) -> None:
    """The gradual restart's ``sed`` lines (root blocks, not run by the slow test) on a copy of
    config/alphapulse.env.example, which install.sh installs as /etc/alphapulse/alphapulse.env: to live and back,
    touching nothing else, and the daemon's configuration loader accepts the result."""
    seds = [ln.text for ln in doc_lines() if ln.kind == "sh root" and ln.text.startswith("sed -i ")]
    to_paper = [x for x in seds if "TRADING_MODE=paper/' " in x]
    to_live = [x for x in seds if "TRADING_MODE=live/' " in x]
    assert to_paper and to_live, seds
    env = tmp_path / "alphapulse.env"
    shipped = (REPO / "config" / "alphapulse.env.example").read_text()
    env.write_text(shipped)

    def run(cmd: str) -> str:
        r = subprocess.run(["bash", "-c", cmd.replace("/etc/alphapulse/alphapulse.env", str(env))],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return env.read_text()

    assert run(to_paper[0]) == shipped  # already paper: unchanged
    live = run(to_live[0])
    assert live == shipped.replace("\nTRADING_MODE=paper\n", "\nTRADING_MODE=live\n") != shipped
    assert run(to_paper[0]) == shipped
    from alphapulse.config import ConfigError, load_settings

    values = dict(line.split("=", 1) for line in live.splitlines() if line and not line.startswith("#"))
    assert set(values) == {"TRADING_MODE", "WEEX_API_KEY", "WEEX_SECRET_KEY", "WEEX_PASSPHRASE"}
    with pytest.raises(ConfigError, match="live mode needs WEEX_API_KEY"):  # the keys are the operator's to add
        load_settings(None, values)
    keys = {"WEEX_API_KEY": "k" * 24, "WEEX_SECRET_KEY": "s" * 32, "WEEX_PASSPHRASE": "p" * 12}
    assert load_settings(None, {**values, **keys}).mode == "live"


def test_the_parser_refuses_an_unknown_block_kind_and_continuations() -> None:
    assert [ln.text for ln in doc_lines("```sh\necho a\n# c\n\necho b\n```\n```text\nx\n```\n")] == ["echo a",
                                                                                                  "echo b"]
    with pytest.raises(AssertionError, match="block kind"):
        doc_lines("```sh maybe\necho a\n```\n")
    with pytest.raises(AssertionError, match="continuations"):
        doc_lines("```sh\necho a \\\n```\n")


# --------------------------------------------------------------------------------------------------
# Running the document
# --------------------------------------------------------------------------------------------------


@dataclass
class Site:
    """The throwaway installation: a daemon, a monitor and the paths the document's commands use."""

    root: Path
    daemon: DaemonProc
    monitor: MonitorProc
    backup_dir: Path
    bin_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.daemon.data_dir

    @property
    def log_dir(self) -> Path:
        return self.daemon.log_dir

    @property
    def config_dir(self) -> Path:
        return self.daemon.config_dir

    @property
    def control(self) -> str:
        return f"127.0.0.1:{self.daemon.port}"

    @property
    def monitor_addr(self) -> str:
        return f"127.0.0.1:{self.monitor.port}"

    def substitute(self, text: str) -> str:
        for prod, attr in PRODUCTION:
            value = self.monitor_addr if attr == "monitor" else str(getattr(self, attr))
            text = text.replace(prod, value)
        return text

    def bash(self, setup: str, command: str, timeout: float = 120,
             extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        script = self.substitute(setup + "\n" + command)
        return subprocess.run(["bash", "-c", script], env={**self.env, **(extra_env or {})}, cwd=self.root,
                              capture_output=True, text=True, timeout=timeout)

    def proc(self, unit: str) -> DaemonProc:
        return {"alphapulse-trading": self.daemon, "alphapulse-monitor": self.monitor}[unit]


def make_site(tmp_path: Path) -> Site:
    replay = slice_bundled(tmp_path / "replay.csv", 8000, start=20_000)
    # The store, not a pinned file, decides the model (model.path empty, as shipped): promote/rollback matter.
    d = DaemonProc(tmp_path, replay_file=replay, speed="3000", service={"model": {"path": ""}})
    rules = yaml.safe_load((REPO / "config" / "monitoring.yaml").read_text())["rules"]
    rules["model_confidence_min"] = 0.99  # an alert that is surely open, for the acknowledge command
    m = MonitorProc(d, monitoring={"rules": rules})
    site = Site(tmp_path, d, m, backup_dir=tmp_path / "backups", bin_dir=tmp_path / "bin")
    site.bin_dir.mkdir()
    launcher = site.bin_dir / "alphapulse"  # stands for install.sh's /opt/alphapulse-rl/bin/alphapulse
    launcher.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m alphapulse \"$@\"\n")
    launcher.chmod(0o755)
    # The environment file the units read: what the operator chose, no directories (the units set those).
    keep = ("ALPHAPULSE_CONTROL_PORT", "ALPHAPULSE_REPLAY_FILE", "ALPHAPULSE_REPLAY_SPEED")
    lines = ["TRADING_MODE=paper", f"ALPHAPULSE_MONITOR_PORT={m.port}"]
    lines += [f"{k}={d.env[k]}" for k in keep]
    (site.config_dir / "alphapulse.env").write_text("\n".join(lines) + "\n")
    env = clean_env()
    env.update({"PYTHONPATH": str(REPO), "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(k, None)
    site.env = env
    return site


def reload_signal() -> signal.Signals:
    """The signal ``systemctl reload alphapulse-trading`` sends: the unit's ``ExecReload=/bin/kill -SIG $MAINPID``."""
    unit = (SYSTEMD / "alphapulse-trading.service").read_text()
    m = re.search(r"^ExecReload=/bin/kill -(\w+) \$MAINPID$", unit, re.M)
    assert m, "alphapulse-trading.service has no ExecReload=/bin/kill -SIG $MAINPID"
    return signal.Signals[f"SIG{m.group(1)}"]


def played(site: Site, line: str) -> bool:
    """Play a systemctl line on the test's processes; False when the line is not one that is played."""
    words = shlex.split(line)
    if words[:2] == ["systemctl", "reload"]:
        assert words[2:] == ["alphapulse-trading"], line
        site.daemon.signal(reload_signal())
        return True
    if len(words) < 3 or words[0] != "systemctl" or words[1] not in ("stop", "start", "restart"):
        return False
    if not set(words[2:]) <= set(SERVICES):
        return False
    for unit in words[2:]:
        p = site.proc(unit)
        if words[1] in ("stop", "restart") and p.proc is not None and p.proc.poll() is None:
            assert p.stop(30) == 0, f"{unit} did not stop cleanly:\n{p.stderr()[-2000:]}"
        if words[1] in ("start", "restart"):
            drain(p)  # an old READY=1 still queued on the notify socket must not pass for the new process's
            p.start()
            p.wait_ready(90)
    return True


def drain(*procs: DaemonProc) -> None:
    """Read what the processes sent to their notify sockets (systemd would): unread, the datagrams fill the
    socket's buffer and the services' sd_notify calls start failing."""
    for p in procs:
        if p.sock is not None:
            p.poll_messages(0)


def help_covers(site: Site, setup: str, line: str) -> None:
    """``alphapulse SUB ...``: ``alphapulse SUB --help`` exits 0 and lists every ``--option`` of the line."""
    words = shlex.split(line)
    assert words[0] == "alphapulse" and len(words) > 1, line
    r = site.bash(setup, f"alphapulse {words[1]} --help", timeout=60)
    assert r.returncode == 0, f"{line}: --help exited {r.returncode}\n{r.stderr}"
    for opt in (w for w in words if w.startswith("--")):
        assert opt in r.stdout, f"{line}: {opt} is not an option of 'alphapulse {words[1]}'"


LIVE_KEYS = {"WEEX_API_KEY": "doc-api-key", "WEEX_SECRET_KEY": "doc-secret-key-never-printed",
             "WEEX_PASSPHRASE": "doc-passphrase"}


def start_fake_exchange(site: Site) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """``alphapulse fake-weex`` on a free loopback port, and the environment that points a command at it."""
    port = free_port()
    out = open(site.root / "fake-weex.txt", "wb")
    # its server clock starts at the wall clock, as the exchange's would (else the clock check fails, rightly)
    proc = subprocess.Popen([sys.executable, "-m", "alphapulse", "fake-weex", "--port", str(port), "--data",
                             str(REPO / "alphapulse" / "data" / "BTC_USDT_USDT-5m.csv.gz"), "--timeframe", "5m",
                             "--start-ms", str(int(time.time() * 1000)),
                             "--api-key", LIVE_KEYS["WEEX_API_KEY"], "--secret-key", LIVE_KEYS["WEEX_SECRET_KEY"],
                             "--passphrase", LIVE_KEYS["WEEX_PASSPHRASE"]], env=site.env, cwd=site.root,
                            stdout=out, stderr=subprocess.STDOUT)
    out.close()
    deadline = time.monotonic() + 60
    while b"listening on" not in (site.root / "fake-weex.txt").read_bytes():
        assert proc.poll() is None and time.monotonic() < deadline, (site.root / "fake-weex.txt").read_text()
        time.sleep(0.1)
    return proc, {"WEEX_REST_URL": f"http://127.0.0.1:{port}", "WEEX_WS_URL": f"ws://127.0.0.1:{port}/v3/ws",
                  **LIVE_KEYS}


def stand_in_for_training(site: Site, line: str) -> None:
    """What ``alphapulse train ... --out FILE`` leaves: a model file, here the daemon's with a new version."""
    words = shlex.split(site.substitute(line))
    out = Path(words[words.index("--out") + 1])
    model = onnx.load(str(BASELINE_MODEL))
    for p in model.metadata_props:
        if p.key == "alphapulse.version":
            p.value = V2
    onnx.save(model, str(out))


#: What the documented commands call besides alphapulse (scripts/install_test_tools.sh installs the missing ones).
TOOLS = ("bash", "curl", "jq", "sqlite3", "ps", "free", "awk", "timeout", "du", "df")


def require_tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        msg = f"the manual's commands need {', '.join(missing)} (scripts/install_test_tools.sh installs them)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)


def store_count(data_dir: Path, table: str) -> int:
    """Rows of a store table, read-only (the daemon is stopped when this is called)."""
    import sqlite3

    con = sqlite3.connect(f"{(data_dir / 'alphapulse.db').as_uri()}?mode=ro", uri=True)
    try:
        return int(con.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        con.close()


@pytest.mark.slow
def test_the_operations_manual_runs_as_written(tmp_path: Path) -> None:
    require_tools()
    lines = doc_lines()
    setup = "\n".join(ln.text for ln in lines if ln.kind == "sh env")
    site = make_site(tmp_path)
    d, m = site.daemon, site.monitor
    exchange: subprocess.Popen[bytes] | None = None
    exchange_env: dict[str, str] = {}
    started = time.monotonic()
    try:
        # The host as the document finds it: the model the service trades in the model store, both services
        # running for a while, and last night's backup (the timer's) in place.
        r = site.bash(setup, f"alphapulse model promote {BASELINE_MODEL}")
        assert r.returncode == 0, r.stderr
        d.start()
        d.wait_ready(90)
        m.start()
        m.wait_ready(60)
        d.wait_metric(lambda x: x["trading"]["orders"] >= 2 and x["portfolio"]["fills"] >= 2
                      and x["model"]["decisions"] >= 100, timeout=90)
        m.wait_alerts(lambda b: any(a["rule"] == "model_confidence" for a in b["active_alerts"]), timeout=60)
        r = site.bash(setup, "alphapulse backup create --type full")
        assert r.returncode == 0, r.stderr

        seen: set[str] = set()
        count: dict[str, int] = {}
        for ln in lines:
            where = f"docs/OPERATIONS.md:{ln.lineno}: {ln.text}"
            drain(d, m)
            if ln.kind == "sh env":
                continue
            if ln.kind == "sh root":
                for unit in unit_names(ln.text):
                    assert unit_exists(unit), f"{where}: no unit {unit} in systemd/"
                if played(site, ln.text):
                    site.log.append(f"played  {ln.text}")
                continue
            if ln.kind == "sh follow":
                r = site.bash(setup, f"timeout 2 {ln.text}", timeout=30)
                assert r.returncode == 124, f"{where}: exited {r.returncode} before Ctrl-C\n{r.stderr}"
                assert r.stdout.strip(), f"{where}: printed nothing"
                site.log.append(f"followed 2 s   {ln.text}")
                continue
            if ln.kind in ("sh long", "sh live"):
                help_covers(site, setup, ln.text)
                if shlex.split(ln.text)[1] == "train":
                    stand_in_for_training(site, ln.text)
                site.log.append(f"--help covers  {ln.text}")
                if ln.kind == "sh live":
                    if exchange is None:
                        exchange, exchange_env = start_fake_exchange(site)
                    r = site.bash(setup, ln.text, timeout=60, extra_env=exchange_env)
                    assert r.returncode == 0 and r.stdout.rstrip().endswith("result: all checks passed"), \
                        f"{where}: against the fake exchange: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
                    assert LIVE_KEYS["WEEX_SECRET_KEY"] not in r.stdout + r.stderr, f"{where}: printed the secret"
                    site.log.append(f"ran {r.returncode} (fake exchange)   {ln.text}")
                continue
            count[ln.text] = count.get(ln.text, 0) + 1
            exp = AT.get((ln.text, count[ln.text])) or EXPECT.get(ln.text)
            assert exp is not None, f"{where}: a command the test does not know"
            restore = "backup restore" in ln.text and "--dry-run" not in ln.text
            if restore:  # the daemon is stopped: how far the store got, to see the restore rewind it
                decisions_before = store_count(site.data_dir, "decisions")
            deadline = time.monotonic() + exp.retry_s
            while True:
                r = site.bash(setup, ln.text)
                try:
                    assert r.returncode in exp.status, f"exit status {r.returncode}, expected {sorted(exp.status)}"
                    if exp.check is not None:
                        exp.check(r.stdout)
                    break
                except (AssertionError, ValueError, KeyError, TypeError) as e:
                    if time.monotonic() < deadline:
                        time.sleep(0.5)
                        continue
                    raise AssertionError(f"{where}\n{e}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n"
                                         f"{r.stderr[-3000:]}\n--- daemon\n{d.stderr()[-1500:]}") from e
            if restore:
                restored = store_count(site.data_dir, "decisions")
                assert 0 < restored < decisions_before, f"{where}: the store was not rewound to the backup " \
                                                        f"({decisions_before} decisions before, {restored} after)"
            seen.add(ln.text)
            site.log.append(f"ran {r.returncode}   {ln.text}")

        assert seen == set(EXPECT)
        # The document's last model step was a rollback and a reload: the daemon trades the first model again.
        d.wait_metric(lambda x: x["model"]["version"] == V1 and x["model"]["source"] == "store", timeout=30)
        assert d.metrics()["trading"]["state"] == "ACTIVE"
        assert time.monotonic() - started < 300, "the manual's commands took too long"
    finally:
        (tmp_path / "commands.log").write_text("\n".join(site.log) + "\n")
        if exchange is not None:
            exchange.terminate()
            exchange.wait(15)
        for p in (m, d):
            if p.proc is not None and p.proc.poll() is None:
                p.stop(30)
            p.close()
