"""``alphapulse report``: numbers, periods, exit codes and the HTML, on operator files of a REAL daemon run.

The fixture runs the daemon over three weeks of the bundled real BTCUSDT 5m candles (tight risk
limits, so the run also raises real risk alerts and blocks real decisions).  Every expectation is
recomputed here from the same files with plain loops - not with the report's own helpers - so a
wrong filter, a float sum or a shifted period shows up as a mismatch.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from alphapulse.report import Report, period_for, report_main, run
from tests.daemon_harness import REPO, DaemonProc, slice_bundled

WEEKS3 = 6048  # 3 weeks of 5m bars: 2024-12-31 00:00 .. 2025-01-20 23:55 UTC


# --------------------------------------------------------------------------- fixture: a real daemon run


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("daemon")
    replay = slice_bundled(root / "replay.csv", WEEKS3)
    d = DaemonProc(root, replay_file=replay, args=("--exit-at-end",))
    params = yaml.safe_load((d.config_dir / "trading_params.yaml").read_text())
    params["risk"]["daily_loss_limit_pct"] = 0.5  # tight limits: real alerts, REDUCE_ONLY and a HALT
    params["risk"]["max_drawdown_pct"] = 4
    (d.config_dir / "trading_params.yaml").write_text(yaml.safe_dump(params))
    try:
        d.start()
        rc = d.wait_exit(timeout=120)
    finally:
        d.close()
    assert rc == 0, d.stderr()[-3000:]
    for name in ("trades.csv", "ai_decisions.json", "risk_alerts.json"):
        assert (d.log_dir / name).stat().st_size > 0, name
    return d.log_dir


# --------------------------------------------------------------------------- independent reading


def ms(text: str) -> int:
    dt = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return round(dt.timestamp() * 1000)


def day_ms(d: date) -> int:
    return int(datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp()) * 1000


def read_trades(logs: Path) -> list[dict[str, str]]:
    with (logs / "trades.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def expected(logs: Path, start: int, end: int) -> dict[str, Any]:
    """Everything the report should say about [start, end), computed the plain way."""
    trades = [t for t in read_trades(logs) if start <= ms(t["timestamp"]) < end]
    decisions = read_jsonl(logs / "ai_decisions.json")
    inside = [d for d in decisions if start <= ms(d["candle_time"]) < end]
    before = [d for d in decisions if ms(d["candle_time"]) < start]
    curve = ([float(before[-1]["equity"])] if before else []) + [float(d["equity"]) for d in inside]
    peak, mdd = -1.0, 0.0
    for e in curve:
        peak = max(peak, e)
        mdd = max(mdd, (peak - e) / peak)
    pnls = [Decimal(t["pnl"]) for t in trades]
    closing = [Decimal(t["pnl"]) for t in trades if Decimal(t["realized_pnl"]) != 0 and t["side"] in ("buy", "sell")]
    confs = [d["confidence"] for d in inside]
    alerts = [a for a in read_jsonl(logs / "risk_alerts.json") if start <= ms(a["timestamp"]) < end]
    return {
        "trades": trades,
        "count": len(trades),
        "net": sum(pnls, Decimal(0)),
        "fees": sum((Decimal(t["fee"]) for t in trades), Decimal(0)),
        "largest_loss": min(pnls) if pnls and min(pnls) < 0 else None,
        "win_rate": sum(1 for p in closing if p > 0) / len(closing) if closing else 0.0,
        "curve": curve,
        "mdd": mdd,
        "ret": curve[-1] / curve[0] - 1 if len(curve) > 1 else 0.0,
        "confs": confs,
        "executed": sum(1 for d in inside if d["allowed"]),
        "not_executed": Counter(d["reason"] for d in inside if not d["allowed"]),
        "alerts": alerts,
    }


def busiest_day(logs: Path) -> date:
    """The day with the most fills that also has a risk alert (so every section has content), after the
    first day (whose first hours are the features' warm-up, with no decision)."""
    alert_days = {a["timestamp"][:10] for a in read_jsonl(logs / "risk_alerts.json")} - {"2024-12-31"}
    per_day = Counter(t["timestamp"][:10] for t in read_trades(logs) if t["timestamp"][:10] in alert_days)
    return date.fromisoformat(per_day.most_common(1)[0][0])


def report_for(logs: Path, kind: str, day: date | None, out: Path) -> Report:
    report, path = run(kind, day, logs, out)
    assert path == out and out.exists()
    return report


def check_numbers(r: Report, exp: dict[str, Any]) -> None:
    assert len(r.data.trades) == exp["count"]
    assert r.net_pnl == exp["net"]  # Decimal: exact, to the last satoshi of USDT
    assert r.fees == exp["fees"]
    assert (r.largest_loss.pnl if r.largest_loss else None) == exp["largest_loss"]
    assert r.win_rate == pytest.approx(exp["win_rate"], abs=1e-12)
    assert r.data.equity == pytest.approx(exp["curve"], rel=1e-12)
    assert r.max_dd == pytest.approx(exp["mdd"], abs=1e-12)
    assert r.period_return == pytest.approx(exp["ret"], abs=1e-12)
    confs = exp["confs"]
    assert r.data.decisions == len(confs)
    assert r.conf_mean == pytest.approx(float(np.mean(confs)), abs=1e-12)
    assert r.conf_median == pytest.approx(float(np.median(confs)), abs=1e-12)
    assert r.conf_p10 == pytest.approx(float(np.percentile(confs, 10)), abs=1e-12)
    assert r.conf_p90 == pytest.approx(float(np.percentile(confs, 90)), abs=1e-12)
    assert r.conf_share == pytest.approx(sum(1 for c in confs if c >= r.threshold) / len(confs), abs=1e-12)
    assert r.data.executed == exp["executed"]
    assert r.risk_blocked + r.other_not_executed == exp["not_executed"]
    assert [a.alert_id for a in r.data.alerts] == [a["alert_id"] for a in exp["alerts"]]
    assert r.alerts_by_limit == Counter(a["limit"] for a in exp["alerts"])


# --------------------------------------------------------------------------- numbers


def test_daily_numbers_match_an_independent_computation(logs: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    day = busiest_day(logs)
    start = day_ms(day)
    exp = expected(logs, start, start + 86_400_000)
    assert exp["count"] >= 2 and exp["alerts"], "fixture should give the busiest day fills and an alert"
    r = report_for(logs, "daily", day, tmp_path / "d.html")
    check_numbers(r, exp)
    # the opening equity is the previous day's close, so the day's first bar counts
    assert len(r.data.equity) == 288 + 1
    assert r.data.opening_from_before
    # risk blocks in the fixture are real: REDUCE_ONLY after the daily loss alert
    assert r.risk_blocked, r.data.reasons

    rc = report_main(["--daily", "--date", day.isoformat(), "--logs", str(logs), "--out", str(tmp_path / "o.html")])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"AlphaPulse daily report {day.isoformat()}" in out
    assert re.search(rf"Trades \(fills\)\s+{exp['count']}\n", out)
    assert re.search(rf"Realized PnL, net of fees\s+{re.escape(format(exp['net'], 'f'))}\n", out)
    assert re.search(rf"Fees\s+{re.escape(format(exp['fees'], 'f'))}\n", out)
    assert re.search(rf"Max drawdown\s+{exp['mdd'] * 100:.2f}%\n", out)
    assert out.rstrip().endswith(str(tmp_path / "o.html"))


def test_weekly_numbers_and_the_days_of_the_week_add_up(logs: Path, tmp_path: Path) -> None:
    day = date(2025, 1, 15)  # a Wednesday: the week is Mon 13 .. Sun 19 January 2025
    monday = day_ms(date(2025, 1, 13))
    exp = expected(logs, monday, monday + 7 * 86_400_000)
    r = report_for(logs, "weekly", day, tmp_path / "w.html")
    assert r.data.period.label == "2025-W03"
    check_numbers(r, exp)
    assert len(r.data.equity) == 7 * 288 + 1

    daily = [report_for(logs, "daily", date(2025, 1, 13) + timedelta(days=i), tmp_path / f"{i}.html")
             for i in range(7)]
    assert sum((d.net_pnl for d in daily), Decimal(0)) == r.net_pnl
    assert sum(len(d.data.trades) for d in daily) == len(r.data.trades)
    assert sum(d.data.decisions for d in daily) == r.data.decisions
    # compounding the daily returns gives the weekly return: the days tile the week with no gap or overlap
    assert np.prod([1 + d.period_return for d in daily]) - 1 == pytest.approx(r.period_return, abs=1e-12)


def test_sharpe_and_sortino_use_the_bar_frequency_of_the_logs(logs: Path, tmp_path: Path) -> None:
    r = report_for(logs, "weekly", date(2025, 1, 8), tmp_path / "w.html")
    assert r.bar_ms == 300_000  # inferred from candle_time spacing
    e = np.asarray(r.data.equity)
    rets = e[1:] / e[:-1] - 1
    ppy = 365 * 86_400_000 / 300_000
    assert r.sharpe == pytest.approx(rets.mean() / rets.std(ddof=1) * np.sqrt(ppy), rel=1e-9)
    downside = np.sqrt(np.mean(np.minimum(rets, 0) ** 2)) * np.sqrt(ppy)
    assert r.sortino == pytest.approx(rets.mean() * ppy / downside, rel=1e-9)


def test_default_period_is_the_last_one_with_data(logs: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "logs"
    shutil.copytree(logs, work)
    assert report_main(["--daily", "--logs", str(work)]) == 0
    assert report_main(["--weekly", "--logs", str(work)]) == 0
    out = capsys.readouterr().out
    # the last candle is 2025-01-20 23:55; its decision is stamped 2025-01-21T00:00 but is about the 20th
    assert "AlphaPulse daily report 2025-01-20" in out
    assert "AlphaPulse weekly report 2025-W04" in out  # Monday 20 January 2025 starts ISO week 4
    assert (work / "reports" / "report_daily_20250120.html").is_file()
    assert (work / "reports" / "report_weekly_2025-W04.html").is_file()


def test_threshold_comes_from_the_configuration(logs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "config"
    cfg.mkdir()
    params = yaml.safe_load((REPO / "config" / "trading_params.yaml").read_text())
    params["confidence_threshold"] = 0.75
    (cfg / "trading_params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setenv("ALPHAPULSE_CONFIG_DIR", str(cfg))
    assert report_main(["--daily", "--date", "2025-01-10", "--logs", str(logs), "--out", str(tmp_path / "r.html")]) == 0
    out = capsys.readouterr().out
    confs = expected(logs, day_ms(date(2025, 1, 10)), day_ms(date(2025, 1, 11)))["confs"]
    share = sum(1 for c in confs if c >= 0.75) / len(confs)
    assert re.search(rf"Share >= 0\.75 \(config\)\s+{share * 100:.1f}%", out), out


# --------------------------------------------------------------------------- period boundaries


def boundary_logs(logs: Path, dest: Path) -> Path:
    """Two real fills re-stamped one millisecond either side of Sunday 5 / Monday 6 January 2025 midnight."""
    dest.mkdir()
    with (logs / "trades.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    header, a, b = rows[0], rows[1], rows[2]
    a[0], b[0] = "2025-01-05T23:59:59.999Z", "2025-01-06T00:00:00.000Z"
    with (dest / "trades.csv").open("w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([header, a, b])
    return dest


@pytest.mark.parametrize(("kind", "day", "stamp"), [
    ("daily", "2025-01-05", "2025-01-05T23:59:59.999Z"),
    ("daily", "2025-01-06", "2025-01-06T00:00:00.000Z"),
    ("weekly", "2025-01-05", "2025-01-05T23:59:59.999Z"),  # Sunday: last ms of ISO week 2025-W01
    ("weekly", "2025-01-06", "2025-01-06T00:00:00.000Z"),  # Monday: first ms of 2025-W02
    ("weekly", "2025-01-12", "2025-01-06T00:00:00.000Z"),  # the Sunday that ends W02
])
def test_a_fill_belongs_to_exactly_one_day_and_week(logs: Path, tmp_path: Path, kind: str, day: str,
                                                    stamp: str) -> None:
    work = boundary_logs(logs, tmp_path / "logs")
    r = report_for(work, kind, date.fromisoformat(day), tmp_path / "r.html")
    assert [t.ts_ms for t in r.data.trades] == [ms(stamp)]
    with (work / "trades.csv").open(newline="") as f:
        row = next(t for t in csv.DictReader(f) if t["timestamp"] == stamp)
    assert r.net_pnl == Decimal(row["pnl"])


def test_period_for_iso_weeks_across_the_year_end() -> None:
    p = period_for("weekly", date(2024, 12, 31))  # a Tuesday in ISO week 2025-W01
    assert p.label == "2025-W01" and p.slug == "weekly_2025-W01"
    assert p.start_ms == day_ms(date(2024, 12, 30)) and p.end_ms == day_ms(date(2025, 1, 6))
    d = period_for("daily", date(2025, 3, 9))
    assert d.slug == "daily_20250309" and d.end_ms - d.start_ms == 86_400_000


# --------------------------------------------------------------------------- exit codes


def test_a_date_without_data_exits_1_with_one_line(logs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report_main(["--daily", "--date", "2024-06-01", "--logs", str(logs)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no data" in err and "2024-06-01" in err
    assert not (logs / "reports" / "report_daily_20240601.html").exists()
    assert report_main(["--weekly", "--date", "2025-03-01", "--logs", str(logs)]) == 1
    assert "2025-W09" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["2025-13-01", "2025-02-30", "20250105", "yesterday", "2025-W02-1"])
def test_a_bad_date_is_a_usage_error(logs: Path, bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert report_main(["--daily", "--date", bad, "--logs", str(logs)]) == 2
    assert "invalid date" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["--daily", "--weekly"], ["--monthly"]])
def test_other_usage_errors_exit_2(argv: list[str]) -> None:
    assert report_main(argv) == 2


def test_missing_or_empty_logs_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report_main(["--daily", "--logs", str(tmp_path / "nope")]) == 1
    assert "log directory not found" in capsys.readouterr().err
    (tmp_path / "trades.csv").write_text("timestamp,symbol,side,qty,price,fee,pnl,realized_pnl,order_id,fill_id,"
                                         "reason\n")
    (tmp_path / "ai_decisions.json").write_text("")
    assert report_main(["--weekly", "--logs", str(tmp_path)]) == 1
    assert "empty" in capsys.readouterr().err


def test_as_a_process_errors_are_one_line_not_a_traceback(logs: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "alphapulse.report"]
    p = subprocess.run([*cmd, "--daily", "--date", "2024-06-01", "--logs", str(logs)], capture_output=True,
                       text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().startswith("alphapulse report: no data")
    p = subprocess.run([*cmd, "--weekly", "--date", "2025-1-5", "--logs", str(logs)], capture_output=True,
                       text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "invalid date" in p.stderr
    p = subprocess.run([*cmd, "--weekly", "--date", "2025-01-08", "--logs", str(logs), "--out",
                        str(tmp_path / "w.html")], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "AlphaPulse weekly report 2025-W02" in p.stdout and (tmp_path / "w.html").is_file()


# --------------------------------------------------------------------------- robustness of the reader


def test_torn_lines_are_skipped_and_reordered_json_is_still_read(logs: Path, tmp_path: Path) -> None:
    day = date(2025, 1, 9)
    want = report_for(logs, "daily", day, tmp_path / "a.html")
    work = tmp_path / "logs"
    shutil.copytree(logs, work, ignore=shutil.ignore_patterns("reports"))
    # a backtest writing keys in another order must not defeat the fast timestamp filter
    lines = (work / "ai_decisions.json").read_text().splitlines()
    (work / "ai_decisions.json").write_text(
        "\n".join(json.dumps(json.loads(line), sort_keys=True) for line in lines)
        + '\n{"timestamp":"2025-01-09T12:00:00.000Z","candle_time":"2025-01-09T11:55:00.000Z","conf')
    with (work / "trades.csv").open("a") as f:
        f.write("2025-01-09T12:00:00.000Z,BTCUSDT,buy,0.0")  # a crash mid-line
    got = report_for(work, "daily", day, tmp_path / "b.html")
    assert got.data.skipped == Counter({"ai_decisions.json": 1, "trades.csv": 1})
    assert got.net_pnl == want.net_pnl and got.data.equity == want.data.equity
    assert got.data.confidences == want.data.confidences
    assert "Skipped malformed lines" in (tmp_path / "b.html").read_text()


# --------------------------------------------------------------------------- HTML


class TagChecker(HTMLParser):
    """Fails on any end tag that does not close the innermost open element."""

    VOID = frozenset({"meta", "br", "hr", "img", "input", "link"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: Counter[str] = Counter()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] += 1
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] += 1

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()


def test_html_is_self_contained_and_well_formed(logs: Path, tmp_path: Path) -> None:
    out = tmp_path / "w.html"
    r = report_for(logs, "weekly", date(2025, 1, 15), out)
    text = out.read_text()
    checker = TagChecker()
    checker.feed(text)
    checker.close()
    assert not checker.errors and checker.stack == [], (checker.errors, checker.stack)
    assert text.startswith("<!DOCTYPE html>")
    assert not re.search(r"https?://", text)  # nothing to fetch: no CDN, font, or namespace URL
    assert checker.tags["script"] == 0 and checker.tags["link"] == 0 and checker.tags["img"] == 0
    assert not re.search(r"\b(src|href)\s*=", text) and "@import" not in text and "url(" not in text

    svgs = re.findall(r"<svg\b.*?</svg>", text, flags=re.S)
    assert len(svgs) == 3 == checker.tags["svg"]
    equity, drawdown, pnl = (ET.fromstring(s) for s in svgs)  # each chart is well-formed XML

    # equity curve: one vertex per mark, and date labels on the time axis
    line = equity.find("polyline")
    assert line is not None and len(line.attrib["points"].split()) == len(r.data.equity)
    labels = [t.text or "" for t in equity.iter("text")]
    assert {"Mon 13 Jan", "Sun 19 Jan"} <= set(labels), labels
    assert any(re.fullmatch(r"9,\d{3}", s) for s in labels), labels  # equity values on the y axis
    # drawdown: an area, its y axis in per cent, its deepest point the reported maximum
    assert drawdown.find("polygon") is not None
    assert any(s.endswith("%") for s in (t.text or "" for t in drawdown.iter("text")))
    assert f"max {r.max_dd * 100:.2f}%" in (drawdown.find("text").text or "")  # type: ignore[union-attr]
    # per-fill PnL: one bar per fill, green for a gain and red for a loss
    bars = [b for b in pnl.iter("rect") if b.find("title") is not None]
    assert len(bars) == len(r.data.trades) > 0
    for bar, t in zip(bars, r.data.trades, strict=True):
        assert bar.attrib["fill"] == ("#1a9850" if t.pnl > 0 else "#d73027")
        assert format(t.pnl, "f") in (bar.find("title").text or "")  # type: ignore[union-attr]

    # the same numbers as the text table
    assert format(r.net_pnl, "f") in text and format(r.fees, "f") in text
    for a in r.data.alerts:
        assert a.limit in text
    assert text.count("<tr>") >= len(r.data.trades) + len(r.data.alerts)


def test_html_charts_of_a_period_without_fills(logs: Path, tmp_path: Path) -> None:
    out = tmp_path / "d.html"
    # trading halted on 17 January (max drawdown 4 %): the 20th has decisions but no fill
    r = report_for(logs, "daily", date(2025, 1, 20), out)
    assert r.data.trades == [] and r.data.decisions == 288
    assert r.risk_blocked["state_halted"] > 0
    text = out.read_text()
    svgs = [ET.fromstring(s) for s in re.findall(r"<svg\b.*?</svg>", text, flags=re.S)]
    assert len(svgs) == 3
    assert "no fills in this period" in "".join(svgs[2].itertext())
    assert "Profit factor" in text and "n/a" in text
