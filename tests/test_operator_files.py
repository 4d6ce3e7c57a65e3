"""The operator files defined once (alphapulse.operator_files): what the real writer writes, the readers read back,
whatever the order of the JSON keys or the CSV columns, and a torn last line is skipped and counted."""

from __future__ import annotations

import datetime as dt
import json
import random
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest

from alphapulse import operator_files as of
from alphapulse.backtest import BacktestError, parse_time, run_backtest
from alphapulse.config import DEFAULT_TIMEFRAME, load_settings
from alphapulse.domain import TIMEFRAME_MS, Decision, DecisionRecord, Fill, Incident, Order, RiskAlert, Side, StepResult
from alphapulse.fetch import UsageError, parse_iso
from alphapulse.market.replay import load_candles
from alphapulse.policy import Policy
from alphapulse.portfolio import Portfolio
from alphapulse.report import _default_bar_ms, build_report, collect, period_for
from alphapulse.store import OperatorFiles, Store
from alphapulse.timeutil import iso_ms, parse_utc_ms
from alphapulse.training.data import DataError, parse_utc
from tests.daemon_harness import BASELINE_MODEL, slice_bundled

D = Decimal
SYM = "BTCUSDT"
MEANINGS = ("short_full", "short_half", "flat", "long_half", "long_full")
T0 = 1_736_000_000_000  # 2025-01-04T14:13:20Z


def _empty_dir(path: Path) -> Path:
    """A configuration directory without files: the built-in defaults."""
    path.mkdir(parents=True, exist_ok=True)
    return path


def _state(pf: Portfolio) -> dict[str, object]:
    return {"portfolio": pf.snapshot(), "trading_state": "ACTIVE", "state_reason": "", "last_candle_ts": None,
            "equity": str(pf.equity)}


def _write_steps(tmp_path: Path) -> tuple[Store, OperatorFiles, Portfolio]:
    """Three steps through the real store and the real writer: an order and its fill, a decision with an alert
    and an incident, and a closing fill."""
    store = Store(tmp_path / "data")
    files = OperatorFiles(tmp_path / "log")
    pf = Portfolio.new(SYM, D("10000"))
    reasons = {"ap-1-p": "policy", "ap-9-p": "flatten"}

    def commit(res: StepResult) -> None:
        files.write(store.commit_step(res, _state(pf)), reasons, MEANINGS, 3_600_000)

    s1 = StepResult(T0)
    s1.orders.append(Order("ap-1-p", SYM, Side.BUY, D("0.1"), False, T0, "policy"))
    s1.decision = DecisionRecord(Decision(T0 - 3_600_000, SYM, (0.05, 0.05, 0.1, 0.1, 0.7), 4, 1.0, 0.7, 12.345),
                                 True, "ok", "ap-1-p", T0)
    commit(s1)
    s2 = StepResult(T0 + 3_600_000)
    s2.fills.append(pf.apply_fill(Fill("ap-1-p", SYM, Side.BUY, D("0.1"), D("95000.5"), D("5.70003"),
                                       T0 + 3_600_000)))
    s2.alerts.append(RiskAlert(T0 + 3_600_000, "max_drawdown", 0.13, 0.12, "halted", {"peak": "10000"}))
    s2.incidents.append(Incident(T0 + 3_600_000, "HALTED", {"reason": "drawdown 13%"}))
    s2.decision = DecisionRecord(Decision(T0, SYM, (0.6, 0.1, 0.1, 0.1, 0.1), 0, -1.0, 0.6, 8.0),
                                 False, "halted", None, T0 + 3_600_000)
    commit(s2)
    s3 = StepResult(T0 + 7_200_000)
    s3.orders.append(Order("ap-9-p", SYM, Side.SELL, D("0.1"), True, T0 + 7_200_000, "flatten"))
    s3.fills.append(pf.apply_fill(Fill("ap-9-p", SYM, Side.SELL, D("0.1"), D("96000.25"), D("5.760015"),
                                       T0 + 7_200_000)))
    commit(s3)
    return store, files, pf


def test_writer_to_reader_round_trip_for_each_file(tmp_path: Path) -> None:
    store, files, pf = _write_steps(tmp_path)
    files.close()
    log = tmp_path / "log"
    skipped: Counter[str] = Counter()

    trades = list(of.read_trades(log, skipped))
    assert [(t.side, t.qty, t.price, t.fee, t.order_id, t.fill_id, t.reason) for t in trades] == [
        ("buy", D("0.1"), D("95000.5"), D("5.70003"), "ap-1-p", "1", "policy"),
        ("sell", D("0.1"), D("96000.25"), D("5.760015"), "ap-9-p", "2", "flatten")]
    assert [t.ts_ms for t in trades] == [T0 + 3_600_000, T0 + 7_200_000]
    assert trades[1].realized_pnl == D("99.975") and trades[1].closing and not trades[0].closing
    assert sum(t.pnl for t in trades) == pf.equity - pf.initial_equity  # the column's promise, to the cent

    decisions = list(of.read_decisions(log, skipped))
    assert [(d.ts_ms, d.candle_ms, d.action, d.target, d.allowed, d.reason, d.order_id) for d in decisions] == [
        (T0, T0 - 3_600_000, "long_full", 1.0, True, "ok", "ap-1-p"),
        (T0 + 3_600_000, T0, "short_full", -1.0, False, "halted", None)]
    assert decisions[0].probabilities == dict(zip(MEANINGS, (0.05, 0.05, 0.1, 0.1, 0.7), strict=True))
    assert decisions[0].confidence == 0.7 and decisions[0].inference_us == 12.35
    assert decisions[0].equity == 10000.0 and decisions[0].position == 0.0
    assert decisions[1].position == pytest.approx(0.1)

    alerts = list(of.read_alerts(log, skipped))
    assert alerts == [of.AlertRow(T0 + 3_600_000, 1, "max_drawdown", 0.13, 0.12, "halted", {"peak": "10000"},
                                  of.ALERT_EVENT)]
    assert alerts[0].detail_text == '{"peak":"10000"}'

    incidents = list(of.read_incidents(log, skipped))
    assert incidents == [of.IncidentRow(T0 + 3_600_000, "HALTED", 1, {"reason": "drawdown 13%"})]
    assert skipped == Counter()

    # the JSON files carry exactly the keys the module defines, and trades.csv its columns
    first = json.loads((log / of.DECISIONS_FILE).read_text().splitlines()[0])
    assert tuple(first) == of.DECISION_KEYS
    assert tuple(json.loads((log / of.ALERTS_FILE).read_text().splitlines()[0])) == of.ALERT_KEYS
    assert (log / of.TRADES_FILE).read_text().splitlines()[0] == ",".join(of.TRADES_COLUMNS)
    store.close()


def test_lines_with_keys_in_another_order_parse_the_same(tmp_path: Path) -> None:
    store, files, _ = _write_steps(tmp_path)
    files.close()
    store.close()
    log = tmp_path / "log"
    want = (list(of.read_trades(log)), list(of.read_decisions(log)), list(of.read_alerts(log)))
    other = tmp_path / "other"
    other.mkdir()
    for name in (of.DECISIONS_FILE, of.ALERTS_FILE):  # keys reversed: the old report's regex could not do this
        recs = [json.loads(line) for line in (log / name).read_text().splitlines()]
        (other / name).write_text("".join(json.dumps(dict(reversed(list(r.items())))) + "\n" for r in recs))
        assert (other / name).read_text().splitlines()[0].startswith('{"')
        assert not (other / name).read_text().startswith('{"timestamp"')
    rows = [line.split(",") for line in (log / of.TRADES_FILE).read_text().splitlines()]
    (other / of.TRADES_FILE).write_text("".join(",".join(reversed(r)) + "\n" for r in rows))  # columns reversed
    skipped: Counter[str] = Counter()
    got = (list(of.read_trades(other, skipped)), list(of.read_decisions(other, skipped)),
           list(of.read_alerts(other, skipped)))
    assert got == want and skipped == Counter()


def test_a_torn_last_line_is_skipped_and_counted_in_every_file(tmp_path: Path) -> None:
    store, files, _ = _write_steps(tmp_path)
    files.close()
    store.close()
    log = tmp_path / "log"
    full = {name: (log / name).read_bytes() for name in of.OPERATOR_FILES}
    for name, data in full.items():  # each file ends with the first 60% of its own last line
        last = data.rstrip(b"\n").rsplit(b"\n", 1)[-1]
        (log / name).write_bytes(data + last[: len(last) * 6 // 10])
    skipped: Counter[str] = Counter()
    assert len(list(of.read_trades(log, skipped))) == 2
    assert len(list(of.read_decisions(log, skipped))) == 2
    assert len(list(of.read_alerts(log, skipped))) == 1
    assert len(list(of.read_incidents(log, skipped))) == 1
    assert skipped == Counter({name: 1 for name in of.OPERATOR_FILES})
    # a torn trades line cut inside its last field would parse as a shorter "reason": it must not be read
    (log / of.TRADES_FILE).write_bytes(full[of.TRADES_FILE] + full[of.TRADES_FILE].splitlines(True)[-1][:-4])
    assert [t.reason for t in of.read_trades(log)] == ["policy", "flatten"]
    # a garbage line in the middle is skipped and counted too, the lines after it still read
    (log / of.ALERTS_FILE).write_bytes(b"not json\n[1,2]\n" + full[of.ALERTS_FILE])
    skipped.clear()
    assert len(list(of.read_alerts(log, skipped))) == 1 and skipped == Counter({of.ALERTS_FILE: 2})


def test_incident_lines_from_outside_the_daemon_do_not_disturb_its_crash_recovery(tmp_path: Path) -> None:
    """``alphapulse model`` appends id-less lines; a restart after a crash must neither repeat nor lose the
    store's incidents because of them."""
    store, files, _ = _write_steps(tmp_path)
    files.close()
    log = tmp_path / "log"
    of.append_incident(log, T0 + 9_000_000, "MODEL_PROMOTED", {"version": "v2", "previous": "v1"})
    assert of.last_incident_id(log / of.INCIDENTS_FILE) == 1
    # the store gains an incident the file lacks (the daemon died between commit and append)
    pf = Portfolio.new(SYM, D("10000"))
    res = StepResult(None)
    res.incidents.append(Incident(T0 + 9_500_000, "RESUME", {"from": "HALTED", "to": "ACTIVE"}))
    store.commit_step(res, _state(pf))
    again = OperatorFiles(log)
    assert again.reconcile(store, MEANINGS, 3_600_000)["incidents"] == 1
    again.close()
    rows = list(of.read_incidents(log))
    assert [(r.kind, r.incident_id) for r in rows] == [("HALTED", 1), ("MODEL_PROMOTED", None), ("RESUME", 2)]
    assert rows[1].detail == {"version": "v2", "previous": "v1"} and rows[1].ts_ms == T0 + 9_000_000
    # a torn tail left by a crash is not glued to the next line
    with (log / of.INCIDENTS_FILE).open("ab") as f:
        f.write(b"2025-01-04T17:00:00.000Z HALTED incident_id=3 {\"rea")
    of.append_incident(log, T0 + 9_900_000, "MODEL_ROLLBACK", {"version": "v1"})
    skipped: Counter[str] = Counter()
    kinds = [r.kind for r in of.read_incidents(log, skipped)]
    assert kinds[-1] == "MODEL_ROLLBACK" and skipped == Counter({of.INCIDENTS_FILE: 1})
    assert of.last_incident_id(log / of.INCIDENTS_FILE) == 2
    store.close()


def test_a_real_backtest_reads_back_through_the_readers(tmp_path: Path) -> None:
    """The backtester's buffered writer and the readers agree on every fill and decision of a real run."""
    policy = Policy.load(BASELINE_MODEL)
    cols = load_candles(slice_bundled(tmp_path / "c.csv", 1500, start=20_000))
    settings = load_settings(_empty_dir(tmp_path / "no-config"), env={})
    out = tmp_path / "bt"
    res = run_backtest(policy, cols, settings, symbol=SYM, timeframe="5m", out_dir=out,
                       action_meanings=policy.meta.action_meanings)
    skipped: Counter[str] = Counter()
    trades = list(of.read_trades(out, skipped))
    decisions = list(of.read_decisions(out, skipped))
    assert skipped == Counter()
    assert len(trades) == len(res.fills) > 0
    assert sum(t.pnl for t in trades) == res.final_equity - settings.initial_equity
    assert len(decisions) == 1500 - policy.meta.feature_set.warmup_bars + 1
    assert all(b.candle_ms - a.candle_ms == TIMEFRAME_MS["5m"] for a, b in zip(decisions, decisions[1:]))


def test_report_default_timeframe_is_the_configs(tmp_path: Path) -> None:
    """One decision cannot show the bar spacing: the report then takes the configured timeframe, and without a
    configuration the configuration's own default (1h), not a 5m guess of its own."""
    assert _default_bar_ms(None) == TIMEFRAME_MS[DEFAULT_TIMEFRAME] == TIMEFRAME_MS[
        load_settings(_empty_dir(tmp_path / "none"), env={}).timeframe]
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "trading_params.yaml").write_text("timeframe: 4h\n")
    four = load_settings(cfg, env={})
    assert _default_bar_ms(four) == TIMEFRAME_MS["4h"]
    log = tmp_path / "log"
    log.mkdir()
    rec = {"timestamp": iso_ms(T0), "candle_time": iso_ms(T0 - 3_600_000), "symbol": SYM, "confidence": 0.5,
           "allowed": False, "reason": "below_confidence_threshold", "equity": "10000", "position": "0"}
    (log / of.DECISIONS_FILE).write_text(json.dumps(rec) + "\n")
    period = period_for("daily", dt.date(2025, 1, 4))
    data = collect(log, period)
    assert build_report(data, log, 0.6, "config", _default_bar_ms(four)).bar_ms == TIMEFRAME_MS["4h"]
    assert build_report(data, log, 0.6, "default", _default_bar_ms(None)).bar_ms == TIMEFRAME_MS["1h"]


@pytest.mark.parametrize(("text", "want"), [
    ("2025-01-01", 1_735_689_600_000),
    ("2025-01-01T00:00:00.001Z", 1_735_689_600_001),  # exact: float seconds * 1000 truncated this to ...000
    ("2025-01-01T00:00:00.001", 1_735_689_600_001),  # naive is UTC
    ("2025-01-01T02:00:00+02:00", 1_735_689_600_000),
    (" 2025-01-01T12:00Z ", 1_735_732_800_000),
    (dt.date(2025, 1, 1), 1_735_689_600_000),  # what YAML makes of an unquoted date
    (dt.datetime(2025, 1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=1))), 1_735_689_600_000),
])
def test_one_time_parser_for_every_command(text: str | dt.date, want: int) -> None:
    assert parse_utc_ms(text) == want
    assert parse_utc(text) == want
    if isinstance(text, str):
        assert parse_time(text, "--from") == parse_iso(text, "--from") == want
        assert iso_ms(want) == dt.datetime.fromtimestamp(want / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[
            :-3] + "Z"


def test_a_bad_time_names_the_flag_in_each_commands_error() -> None:
    with pytest.raises(ValueError, match="not an ISO date"):
        parse_utc_ms("yesterday")
    with pytest.raises(BacktestError, match=r"^--from: not an ISO date or date-time: 'yesterday'"):
        parse_time("yesterday", "--from")
    with pytest.raises(UsageError, match=r"^--to: not an ISO date"):
        parse_iso("2025-13-01", "--to")
    with pytest.raises(DataError, match="not a UTC date/time"):
        parse_utc("01/02/2025")


def test_the_fast_path_for_operator_file_times_agrees_with_the_general_parser() -> None:
    """Lines carry ``YYYY-MM-DDTHH:MM:SS.mmmZ``, read by slicing; the answer must be fromisoformat's, and text that
    only looks like that form must still be refused."""
    rng = random.Random(7)
    for _ in range(5000):
        t = rng.randrange(-10**12, 4_102_444_800_000)
        text = iso_ms(t)
        assert parse_utc_ms(text) == t
        assert (dt.datetime.fromisoformat(text) - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(
            milliseconds=1) == t
    for bad in ("2025-01-01T24:00:00.000Z", "2025-01-01T00:60:00.000Z", "2025-02-30T00:00:00.000Z",
                "2025-01-01T-1:00:00.000Z", "2025-01-01T0\u00b2:00:00.000Z", "2025-01-01T00:00:00.0a0Z"):
        with pytest.raises(ValueError):
            parse_utc_ms(bad)
