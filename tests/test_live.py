"""The real daemon trading live against our fake WEEX: books that match the exchange's, start-up refusals,
restarts, and every planted mismatch caught by reconciliation.

Both are real processes on 127.0.0.1; the fake replays real BTCUSDT 5m perpetual candles 3,000x faster than
real time, and the daemon trades them with the 5m baseline model (a confidence threshold of 0.3 so it trades
often).  After each run :func:`tests.live_harness.book_check` compares the daemon's store with the exchange.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from tests.daemon_harness import DaemonProc
from tests.live_harness import Books, FakeProc, book_check, live_daemon, settle_and_stop

D = Decimal


@pytest.fixture
def fake(tmp_path: Path) -> FakeProc:
    f = FakeProc(tmp_path / "fake")
    yield f  # type: ignore[misc]
    f.stop()


def _assert_books_match(books: Books) -> None:
    assert books.exchange_fills > 0 and books.exchange_orders > 0
    assert books.duplicate_orders == 0, books
    assert books.lost_fills == 0 and books.phantom_fills == 0, books
    assert books.position_diff == 0, books
    assert books.balance_diff == 0, books


def _trades(d: DaemonProc) -> list[dict[str, str]]:
    lines = (d.log_dir / "trades.csv").read_text().splitlines()
    head = lines[0].split(",")
    return [dict(zip(head, line.split(","))) for line in lines[1:]]


def _alerts(d: DaemonProc) -> list[dict[str, object]]:
    path = d.log_dir / "risk_alerts.json"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_live_trading_books_match_the_exchange_to_the_cent(tmp_path: Path, fake: FakeProc) -> None:
    d = live_daemon(tmp_path / "run", fake)
    try:
        d.start()
        d.wait_ready(60)
        m = d.wait_metric(lambda m: m["portfolio"]["fills"] >= 25, timeout=90)
        assert m["trading"]["mode"] == "live" and m["market"]["feed"]["kind"] == "weex"
        assert m["exchange"]["reconciliation"]["runs"] >= 1
        assert m["exchange"]["broker"]["acked"] >= 25
        ack = m["exchange"]["broker"]["decision_to_ack_us"]  # per order, submit -> first leg acknowledged
        assert 0 < ack["count"] <= m["exchange"]["broker"]["acked"] and 0 < ack["p50"] <= ack["p99"] <= ack["max"]
        # the opening leg of an order that crosses zero may still be on its way when /metrics is read
        assert m["exchange"]["broker"]["decision_to_last_ack_us"]["count"] <= ack["count"]
        settle_and_stop(d)
    finally:
        d.close()
    books = book_check(d, fake)
    _assert_books_match(books)
    trades = _trades(d)
    # prices and fees are the exchange's own, fill by fill
    st = fake.state()
    ex = {(D(f["price"]), D(f["qty"]), D(f["commission"])) for f in st["fills"]}
    ours = {(D(t["price"]), D(t["qty"]), D(t["fee"])) for t in trades if t["side"] in ("buy", "sell")}
    assert ours == ex
    # trades.csv pnl sums to the equity change (funding, when a position spans a funding time, included)
    assert sum(D(t["pnl"]) for t in trades) == D(st["balance"]["balance"]) - D(st["initial_balance"])
    assert sum((D(t["pnl"]) for t in trades if t["side"] == "funding"), D(0)) == D(st["total_funding"])
    assert not any(a["limit"].startswith("reconciliation") for a in _alerts(d))  # type: ignore[union-attr]


def test_live_start_with_keys_the_exchange_rejects_exits_78_and_trades_nothing(tmp_path: Path,
                                                                              fake: FakeProc) -> None:
    d = live_daemon(tmp_path / "run", fake, env={"WEEX_SECRET_KEY": "not-the-secret"})
    try:
        d.start()
        rc = d.wait_exit(60)
    finally:
        d.close()
    assert rc == 78
    lines = [x for x in d.stderr().splitlines() if x.startswith("alphapulse: config error")]
    assert len(lines) == 1 and "WEEX_API_KEY" in lines[0] and "rejected the credentials" in lines[0], d.stderr()
    assert "not-the-secret" not in d.stderr()
    assert fake.state()["orders"] == []


def test_restart_on_the_same_store_resumes_without_mismatch_or_repeat(tmp_path: Path, fake: FakeProc) -> None:
    d = live_daemon(tmp_path / "run", fake)
    try:
        d.start()
        d.wait_ready(60)
        d.wait_metric(lambda m: m["portfolio"]["fills"] >= 8, timeout=90)
        assert d.stop() == 0
        first = book_check(d, fake)
        d.start()
        d.wait_ready(60)
        d.wait_metric(lambda m: m["portfolio"]["fills"] >= first.our_fills + 8, timeout=90)
        assert d.stop() == 0
    finally:
        d.close()
    _assert_books_match(book_check(d, fake))
    decisions = [json.loads(x)["candle_time"] for x in (d.log_dir / "ai_decisions.json").read_text().splitlines()]
    assert len(decisions) == len(set(decisions)), "no candle decided twice across the restart"
    assert not any(str(a["limit"]).startswith("reconciliation") for a in _alerts(d))


@pytest.mark.parametrize(("plant", "kind", "halts"), [
    ({"type": "position", "side": "LONG", "size": "0.05"}, "position", True),
    ({"type": "order", "order": {"side": "BUY", "positionSide": "LONG", "type": "LIMIT", "quantity": "0.01",
                                 "price": "1000", "newClientOrderId": "manual-1"}}, "foreign_order", True),
    ({"type": "transfer", "amount": "-123.45"}, "balance", False),
])
def test_planted_mismatch_is_caught_resolved_and_alerted(tmp_path: Path, fake: FakeProc, plant: dict[str, object],
                                                         kind: str, halts: bool) -> None:
    d = live_daemon(tmp_path / "run", fake, trading={"confidence_threshold": 0.99})  # trades nothing itself
    try:
        d.start()
        d.wait_ready(60)
        d.wait_metric(lambda m: m["exchange"]["reconciliation"]["runs"] >= 1, timeout=30)
        fake.plant(plant)
        m = d.wait_metric(lambda m: m["exchange"]["reconciliation"]["mismatches"].get(kind, 0) >= 1, timeout=30)
        assert m["trading"]["state"] == ("HALTED" if halts else "ACTIVE")
        if kind == "position":
            assert m["portfolio"]["positions"][0]["qty"] == pytest.approx(0.05)  # the exchange is the truth
        if kind == "balance":
            assert m["portfolio"]["cash"] == pytest.approx(10000 - 123.45)
        runs = m["exchange"]["reconciliation"]["runs"]
        m = d.wait_metric(lambda m: m["exchange"]["reconciliation"]["runs"] >= runs + 2, timeout=30)
        # resolved (or, for an order still there, already reported): the next reconciliations add nothing
        assert m["exchange"]["reconciliation"]["mismatches"][kind] == 1
        if halts:  # the halt outlives the reconciliations that follow: only an operator lifts it
            assert m["trading"]["state"] == "HALTED", m["trading"]
            status, body = d.http("POST", "/resume_trading", token=d.token())[:2]
            assert status == 200 and body["state"] == "ACTIVE", body
            runs = m["exchange"]["reconciliation"]["runs"]
            m = d.wait_metric(lambda m: m["exchange"]["reconciliation"]["runs"] >= runs + 2, timeout=30)
            # the adopted position or the reported order does not halt it again
            assert m["trading"]["state"] == "ACTIVE", m["trading"]
            assert m["exchange"]["reconciliation"]["mismatches"][kind] == 1
        assert d.stop() == 0
    finally:
        d.close()
    alerts = [a for a in _alerts(d) if a["limit"] == f"reconciliation_{kind}"]
    assert alerts and alerts[0]["detail"]["kind"] == kind  # type: ignore[index]
    incidents = (d.log_dir / "incidents.log").read_text()
    assert "RECONCILIATION" in incidents and (("HALTED" in incidents) == halts)
    if kind == "balance":  # the correction is a ledger line: pnl still sums to the equity change
        trades = _trades(d)
        assert [t["pnl"] for t in trades if t["side"] == "adjustment"] == ["-123.45000000"]
        assert sum(D(t["pnl"]) for t in trades) == D("-123.45")


def test_a_corrupt_bar_from_the_exchange_is_rejected_counted_and_never_decided_on(tmp_path: Path,
                                                                                fake: FakeProc) -> None:
    """The venue serves a bar with its high below its low (REST and WebSocket alike): the daemon's validator, the
    same one replay files go through, rejects and counts it; no decision is taken on it and trading goes on."""
    import sqlite3

    d = live_daemon(tmp_path / "run", fake)
    try:
        d.start()
        d.wait_ready(60)
        m = d.wait_metric(lambda m: m["model"]["decisions"] >= 3, timeout=60)
        assert m["market"]["rejected_candles"] == 0
        bad_ts = fake.plant({"type": "bad_bar"})["ts"]
        m = d.wait_metric(lambda m: m["market"]["rejected_by_reason"].get("high_below_low", 0) >= 1, timeout=30)
        assert m["market"]["rejected_candles"] == 1, m["market"]
        decisions = m["model"]["decisions"]
        m = d.wait_metric(lambda m: m["model"]["decisions"] >= decisions + 5, timeout=60)  # it goes on deciding
        assert m["market"]["rejected_candles"] == 1 and m["market"]["gaps"] >= 1  # the hole is announced
        assert d.stop() == 0
    finally:
        d.close()
    with sqlite3.connect(d.data_dir / "alphapulse.db") as db:
        decided = [ts for (ts,) in db.execute("SELECT candle_ts FROM decisions ORDER BY candle_ts")]
    assert bad_ts not in decided
    assert any(ts > bad_ts for ts in decided) and any(ts < bad_ts for ts in decided)
    assert "candle rejected" in d.stderr_path.read_text()  # and the operator reads why in the journal


def test_paper_mode_follows_the_live_market_without_touching_the_account(tmp_path: Path, fake: FakeProc) -> None:
    """ALPHAPULSE_FEED=weex in paper mode: real exchange candles, simulated fills, no key, no order sent."""
    from alphapulse.costs import price_with_slippage
    from alphapulse.domain import Side
    from alphapulse.market.replay import load_candles
    from tests.daemon_harness import BUNDLED

    d = live_daemon(tmp_path / "run", fake, env={"TRADING_MODE": "paper", "ALPHAPULSE_FEED": "weex",
                                                  "WEEX_API_KEY": "", "WEEX_SECRET_KEY": "", "WEEX_PASSPHRASE": ""})
    try:
        d.start()
        d.wait_ready(60)
        m = d.wait_metric(lambda m: m["portfolio"]["fills"] >= 10, timeout=90)
        assert m["trading"]["mode"] == "paper" and m["market"]["feed"]["kind"] == "weex" and m["exchange"] is None
        assert d.stop() == 0
    finally:
        d.close()
    st = fake.state()
    assert st["orders"] == [] and st["fills"] == []
    assert not any(k.startswith(("POST /capi/v3/order", "GET /capi/v3/account")) for k in st["request_counts"])
    cols = load_candles(BUNDLED)
    opens = dict(zip(cols["ts"].tolist(), cols["open"].tolist()))
    for t in _trades(d):  # a paper fill is the next exchange candle's open, with the configured slippage
        from datetime import datetime

        ts = int(datetime.fromisoformat(t["timestamp"].replace("Z", "+00:00")).timestamp() * 1000)
        want = price_with_slippage(Side(t["side"]), D(repr(opens[ts])), D("2.0"))
        assert D(t["price"]) == want, t


def test_switching_a_paper_store_to_live_adopts_the_exchange_account(tmp_path: Path, fake: FakeProc) -> None:
    """The operator's procedure: stop, set TRADING_MODE=live and the keys, start again on the same store."""
    paper_env = {"TRADING_MODE": "paper", "ALPHAPULSE_FEED": "weex", "WEEX_API_KEY": "", "WEEX_SECRET_KEY": "",
                 "WEEX_PASSPHRASE": ""}
    d = live_daemon(tmp_path / "run", fake, env=paper_env)
    live = live_daemon(tmp_path / "run", fake)  # the same directories, the live environment
    try:
        d.start()
        d.wait_ready(60)
        m = d.wait_metric(lambda m: m["portfolio"]["fills"] >= 6, timeout=90)
        assert m["portfolio"]["cash"] != 10000.0  # the paper books moved
        assert d.stop() == 0
        live.start()
        live.wait_ready(60)
        m = live.metrics()
        assert m["trading"]["mode"] == "live" and m["trading"]["state"] != "HALTED"  # expected difference
        live.wait_metric(lambda m: m["exchange"]["broker"]["acked"] >= 6, timeout=90)
        assert live.stop() == 0
    finally:
        d.close()
        live.close()
    _assert_books_match(book_check(live, fake))
    incidents = (live.log_dir / "incidents.log").read_text()
    assert "RECONCILIATION" in incidents and "HALTED" not in incidents
    # the paper books were carried to the exchange's balance by one adjustment line: cash was 10,000 then
    trades = _trades(live)
    adj = [i for i, t in enumerate(trades) if t["side"] == "adjustment"]
    assert len(adj) == 1
    assert sum(D(t["pnl"]) for t in trades[: adj[0] + 1]) == 0  # initial 10,000 + paper pnl + adjustment


def test_live_funding_is_booked_from_the_exchange(tmp_path: Path, fake: FakeProc) -> None:
    """A position held across a funding time: the exchange's payment becomes a funding line in trades.csv."""
    d = live_daemon(tmp_path / "run", fake)
    try:
        d.start()
        d.wait_ready(60)
        d.wait_metric(lambda m: bool(m["portfolio"]["positions"]), timeout=60)
        assert d.http("POST", "/maintenance_mode", token=d.token())[0] == 200  # hold the position still
        d.wait_metric(lambda m: m["trading"]["open_orders"] == 0 and bool(m["portfolio"]["positions"]), timeout=30)
        now = fake.state()["now_ms"]
        fake.admin("POST", "/fake/clock", {"advance_ms": (now // 28_800_000 + 1) * 28_800_000 - now + 60_000})
        m = d.wait_metric(lambda m: m["exchange"]["reconciliation"]["runs"] >= 2 and any(
            t["side"] == "funding" for t in _trades(d)), timeout=30)
        assert m["trading"]["state"] == "MAINTENANCE"
        assert d.stop() == 0
        books = book_check(d, fake)
        st = fake.state()
    finally:
        d.close()
    _assert_books_match(books)
    trades = _trades(d)
    funding = [D(t["pnl"]) for t in trades if t["side"] == "funding"]
    assert funding and sum(funding) == D(st["total_funding"]) != 0
    assert sum(D(t["pnl"]) for t in trades) == D(st["balance"]["balance"]) - D(st["initial_balance"])
    assert not any(str(a["limit"]).startswith("reconciliation") for a in _alerts(d))


def test_a_passing_5xx_on_leverage_does_not_fail_the_start(tmp_path: Path, fake: FakeProc) -> None:
    """Setting leverage is safe to repeat: two 503s on it at start are ridden out, not an exit 1."""
    fake.faults("error5xx=x2@POST/capi/v3/account/leverage")
    d = live_daemon(tmp_path / "run", fake)
    try:
        d.start()
        d.wait_ready(60)
        assert d.metrics()["trading"]["mode"] == "live"
        assert d.stop() == 0
    finally:
        d.close()
    assert fake.state()["request_counts"]["POST /capi/v3/account/leverage"] == 3
