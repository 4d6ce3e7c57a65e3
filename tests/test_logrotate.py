"""The shipped logrotate configuration, run by the real ``logrotate`` binary (Debian's package).

Against a real daemon that keeps writing (real 5m candles replayed at 50 bars a second): every rotation renames
the operator files under the daemon's open descriptors, the daemon reopens them, and in the end the lines found
across the current and all rotated files (compressed or not) are exactly the database's records, each whole and
parseable, in order, none twice; a restart after a rotation appends nothing again.  Retention: the operator
files keep the number of generations the config names, the daily JSON logs the age the config names.
"""

from __future__ import annotations

import csv
import grp
import gzip
import io
import json
import os
import pwd
import re
import shutil
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from alphapulse import store as store_module
from alphapulse.operator_files import last_incident_id, last_record, rotated_chain
from alphapulse.report import iter_trades, last_data_ms
from alphapulse.store import OperatorFiles
from tests.daemon_harness import REPO, DaemonProc, slice_bundled

TEMPLATE = REPO / "config" / "logrotate" / "alphapulse"
OPERATOR_FILES = ("trades.csv", "ai_decisions.json", "risk_alerts.json", "incidents.log")
LOGROTATE = shutil.which("logrotate") or ("/usr/sbin/logrotate" if Path("/usr/sbin/logrotate").exists() else None)

if LOGROTATE is None and os.environ.get("CI") == "true":
    pytest.fail("logrotate is missing (scripts/install_test_tools.sh installs it)", pytrace=False)
needs_logrotate = pytest.mark.skipif(LOGROTATE is None, reason="logrotate not installed (apt-get install "
                                     "logrotate; scripts/install_test_tools.sh does it)")


def render_config(log_dir: Path, dest: Path) -> Path:
    """The template with the placeholders install.sh fills, for the user running the tests."""
    text = TEMPLATE.read_text()
    text = (text.replace("@LOG_DIR@", str(log_dir)).replace("@USER@", pwd.getpwuid(os.getuid()).pw_name)
            .replace("@GROUP@", grp.getgrgid(os.getgid()).gr_name))
    assert "@" not in re.sub(r"#.*", "", text), "a placeholder was left unfilled"
    dest.write_text(text)
    dest.chmod(0o644)
    return dest


def logrotate(conf: Path, state: Path, force: bool = True) -> None:
    assert LOGROTATE is not None
    proc = subprocess.run([LOGROTATE, *(["-f"] if force else []), "-s", str(state), str(conf)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def read_stream(path: Path) -> list[bytes]:
    """Every line of ``path`` and its rotated generations, oldest first (name.N.gz ... name.1, name)."""
    parts = sorted(path.parent.glob(path.name + ".*"), key=lambda p: -int(p.name[len(path.name) + 1:].split(".")[0]))
    lines: list[bytes] = []
    for p in [*parts, path]:
        data = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
        assert data == b"" or data.endswith(b"\n"), f"{p} ends with a torn line"
        lines.extend(data.splitlines())
    return lines


def reopened(log_dir: Path) -> Counter[str]:
    """How often the daemon reopened each file, from its own log ("log files reopened after rotation")."""
    n: Counter[str] = Counter()
    for f in log_dir.glob("alphapulse_*.log"):
        for line in f.read_bytes().splitlines():
            if b"log files reopened after rotation" in line:
                n.update(json.loads(line)["files"])
    return n


def db_rows(data_dir: Path, sql: str) -> list[tuple[object, ...]]:
    con = sqlite3.connect(f"file:{data_dir / 'alphapulse.db'}?mode=ro", uri=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def check_files_against_store(d: DaemonProc) -> tuple[int, int]:
    """Every decision and fill in the store is in the rotated+current files exactly once, in order, whole."""
    decisions = read_stream(d.log_dir / "ai_decisions.json")
    recs = [json.loads(line) for line in decisions]  # every line parses
    times = [r["candle_time"] for r in recs]
    assert times == sorted(times) and len(set(times)) == len(times), "decisions out of order or repeated"
    db_decisions = db_rows(d.data_dir, "SELECT COUNT(*) FROM decisions")[0][0]
    assert len(recs) == db_decisions

    trades = read_stream(d.log_dir / "trades.csv")
    header = trades[0].decode()
    body = [line.decode() for line in trades if not line.startswith(b"timestamp,")]
    rows = list(csv.DictReader(io.StringIO(header + "\n" + "\n".join(body) + "\n")))
    assert all(len(r) == 11 and None not in r for r in rows), "a trades.csv line has the wrong number of fields"
    ids = [int(r["fill_id"]) for r in rows]
    db_ids = [r[0] for r in db_rows(d.data_dir, "SELECT fill_id FROM fills ORDER BY fill_id")]
    assert ids == db_ids
    return len(recs), len(ids)


@pytest.mark.slow
@needs_logrotate
def test_rotation_under_a_writing_daemon_loses_and_tears_nothing(tmp_path: Path) -> None:
    replay = slice_bundled(tmp_path / "replay.csv", 6000, start=20_000)
    d = DaemonProc(tmp_path, replay_file=replay, speed="15000")  # a 5m bar every 20 ms
    conf = render_config(d.log_dir, tmp_path / "logrotate.conf")
    state = tmp_path / "logrotate.state"
    rounds = 4
    try:
        d.start()
        d.wait_ready(60)
        d.wait_metric(lambda m: m["model"]["decisions"] >= 50, timeout=60)
        for _ in range(rounds):
            before = d.metrics()["model"]["decisions"]
            seen = reopened(d.log_dir)
            logrotate(conf, state)
            deadline = time.monotonic() + 20
            # the daemon noticed both new files (logrotate renames them one after the other: two events at times)
            while any(reopened(d.log_dir)[k] == seen[k] for k in ("trades", "decisions")):
                assert time.monotonic() < deadline, "the daemon did not reopen the rotated files"
                time.sleep(0.05)
            # it writes on into the new file
            d.wait_metric(lambda m, b=before: m["model"]["decisions"] >= b + 50, timeout=30)
            assert (d.log_dir / "ai_decisions.json").stat().st_size > 0
            assert (d.log_dir / "trades.csv").read_bytes().startswith(b"timestamp,symbol,")
        assert d.metrics()["market"]["feed"].get("finished") is not True, "the replay ended too early to test"
        assert d.stop() == 0
    finally:
        d.close()

    # generations 1..rounds exist: .1 plain (delaycompress), the older ones gzip
    assert (d.log_dir / "ai_decisions.json.1").exists()
    assert all((d.log_dir / f"ai_decisions.json.{i}.gz").exists() for i in range(2, rounds + 1))
    for i in range(1, rounds + 1):  # every generation has lines: the daemon wrote into each new file
        p = d.log_dir / f"ai_decisions.json.{i}{'' if i == 1 else '.gz'}"
        assert (gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()).count(b"\n") > 0
    n_dec, n_fills = check_files_against_store(d)
    assert n_dec > 200 and n_fills > 0, (n_dec, n_fills)
    # alphapulse report reads across the generations too: yesterday's lines are in name.1 after a rotation
    db_ids = [str(r[0]) for r in db_rows(d.data_dir, "SELECT fill_id FROM fills ORDER BY fill_id")]
    assert [t.fill_id for t in iter_trades(d.log_dir / "trades.csv")] == db_ids
    first = db_rows(d.data_dir, "SELECT MIN(candle_ts), MAX(candle_ts) FROM decisions")[0]
    assert last_data_ms(d.log_dir) == first[1]

    # rotated while stopped: the current files are empty, and a restart must not write history again
    logrotate(conf, state)
    assert (d.log_dir / "ai_decisions.json").stat().st_size == 0
    d2 = DaemonProc(tmp_path, replay_file=replay, speed="15000")
    try:
        d2.start()
        d2.wait_ready(60)
        assert d2.stop() == 0
    finally:
        d2.close()
    assert check_files_against_store(d2)[0] >= n_dec


@needs_logrotate
def test_operator_files_keep_the_configured_generations(tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    conf = render_config(log_dir, tmp_path / "logrotate.conf")
    keep = int(re.search(r"^\s*rotate\s+(\d+)", TEMPLATE.read_text(), re.M).group(1))  # type: ignore[union-attr]
    state = tmp_path / "state"
    for i in range(keep + 3):
        (log_dir / "trades.csv").write_text(f"timestamp,symbol\nline {i}\n")
        (log_dir / "incidents.log").write_text("")  # empty: notifempty leaves it alone
        logrotate(conf, state)
    gens = sorted(p.name for p in log_dir.glob("trades.csv.*"))
    assert len(gens) == keep and "trades.csv.1" in gens and f"trades.csv.{keep}.gz" in gens
    assert not (log_dir / f"trades.csv.{keep + 1}.gz").exists()
    oldest = gzip.decompress((log_dir / f"trades.csv.{keep}.gz").read_bytes())
    assert oldest == b"timestamp,symbol\nline 3\n"  # runs 0..2 fell out of the window
    assert not list(log_dir.glob("incidents.log.*"))
    assert oct((log_dir / "trades.csv").stat().st_mode & 0o777) == "0o640"  # "create 0640"


@needs_logrotate
def test_daily_logs_keep_the_configured_age(tmp_path: Path) -> None:
    """Daily JSON logs last written more than the configured days ago go; today's, being written, stays even
    under ``logrotate -f``."""
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    conf = render_config(log_dir, tmp_path / "logrotate.conf")
    days = int(re.search(r"-mtime \+(\d+)", TEMPLATE.read_text()).group(1))  # type: ignore[union-attr]
    now = time.time()
    kept, removed = [], []
    for prefix in ("alphapulse_", "monitor_"):  # the daemon's and the monitor's daily logs
        for age in (0, 1, 7, days - 1, days, days + 1, days + 2, 90):
            name = f"{prefix}{time.strftime('%Y%m%d', time.gmtime(now - age * 86400))}.log"
            p = log_dir / name
            p.write_text('{"event":"x"}\n')
            t = now - age * 86400 - (0 if age == 0 else 3600)
            os.utime(p, (t, t))
            (kept if age <= days else removed).append(name)
    other = log_dir / "notes.log"  # not ours: left alone whatever its age
    other.write_text("x\n")
    os.utime(other, (now - 400 * 86400, now - 400 * 86400))
    (log_dir / "trades.csv").write_text("timestamp,symbol\n")  # the stanza rotates, so its lastaction runs
    logrotate(conf, tmp_path / "state")
    left = sorted(p.name for p in log_dir.glob("*_*.log"))
    assert left == sorted(kept) and other.exists()
    assert not any((log_dir / n).exists() for n in removed)


def test_reopen_and_last_record_follow_renamed_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the daemon does after logrotate renamed its files, on real files: it reopens the paths (a new
    trades.csv gets its header; lines written before the reopen are whole in the renamed file), and the last
    record is found in the newest rotated generation that has one, compressed or not."""
    files = OperatorFiles(tmp_path)
    try:
        files._write("trades", b"2026-01-01T00:00:00.000Z,BTCUSDT,buy,1,1,0,0,0,o-1,1,policy\n")
        assert files.reopen_rotated() == []  # nothing moved
        os.rename(tmp_path / "trades.csv", tmp_path / "trades.csv.1")
        os.rename(tmp_path / "ai_decisions.json", tmp_path / "ai_decisions.json.1")
        files._write("trades", b"2026-01-01T00:05:00.000Z,BTCUSDT,sell,1,1,0,0,0,o-2,2,policy\n")  # old inode
        # renamed but not created again yet: the daemon must not create the paths itself (logrotate's "create"
        # would then put its own file over the daemon's, orphaning every line written in between)
        assert files.reopen_rotated() == []
        assert not (tmp_path / "trades.csv").exists() and not (tmp_path / "ai_decisions.json").exists()
        for name in ("trades.csv", "ai_decisions.json"):  # what logrotate's "create 0640" leaves
            (tmp_path / name).touch(mode=0o640)
        assert sorted(files.reopen_rotated()) == ["decisions", "trades"]
        files._write("trades", b"2026-01-01T00:10:00.000Z,BTCUSDT,buy,1,1,0,0,0,o-3,3,policy\n")
        # a rotation without "create": after the grace the daemon creates the path itself
        os.rename(tmp_path / "incidents.log", tmp_path / "incidents.log.1")
        monkeypatch.setattr(store_module, "REOPEN_CREATE_AFTER_S", 0.0)
        assert files.reopen_rotated() == ["incidents"]
        assert (tmp_path / "incidents.log").exists()
    finally:
        files.close()
    assert (tmp_path / "trades.csv.1").read_bytes().splitlines()[-1].endswith(b",2,policy")
    assert (tmp_path / "trades.csv").read_bytes().splitlines() == [
        b"timestamp,symbol,side,qty,price,fee,pnl,realized_pnl,order_id,fill_id,reason",
        b"2026-01-01T00:10:00.000Z,BTCUSDT,buy,1,1,0,0,0,o-3,3,policy"]

    chain = tmp_path / "chain"
    chain.mkdir()
    header = b"timestamp,symbol\n"
    (chain / "trades.csv").write_bytes(header)  # rotated a moment ago
    (chain / "trades.csv.1").write_bytes(header)  # a day without fills
    (chain / "trades.csv.2.gz").write_bytes(gzip.compress(header + b"a,1\nb,2\n"))
    (chain / "trades.csv.3.gz").write_bytes(gzip.compress(header + b"z,0\n"))
    assert [p.name for p in rotated_chain(chain / "trades.csv")] == [
        "trades.csv", "trades.csv.1", "trades.csv.2.gz", "trades.csv.3.gz"]
    assert last_record(chain / "trades.csv", header=b"timestamp,") == b"b,2"
    (chain / "trades.csv").write_bytes(header + b"c,3\n")
    assert last_record(chain / "trades.csv", header=b"timestamp,") == b"c,3"
    assert last_record(chain / "nothing.json") is None
    (chain / "incidents.log").write_bytes(b"")
    (chain / "incidents.log.1").write_bytes(b"2026-01-02T00:00:00.000Z MODEL_PROMOTED {}\n")  # no id: not the store's
    (chain / "incidents.log.2.gz").write_bytes(gzip.compress(
        b'2026-01-01T00:00:00.000Z HALTED incident_id=7 {"reason": "x"}\n'))
    assert last_incident_id(chain / "incidents.log") == 7
