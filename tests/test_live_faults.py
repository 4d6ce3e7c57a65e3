"""Live trading through every fault the fake WEEX can inject, kill -9 between submit and acknowledgement, and
a soak with random faults over 2,000+ decisions of compressed time.

After each run the daemon's store is compared with the exchange (:func:`tests.live_harness.book_check`):
duplicate orders, lost fills, phantom fills, position and balance differences must all be 0.  The soak writes
its figures to ``live_soak.json`` in its temporary directory and prints them (``pytest -s``).
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.daemon_harness import DaemonProc
from tests.live_harness import Books, FakeProc, book_check, live_daemon, settle_and_stop


def _assert_clean(books: Books) -> None:
    assert books.exchange_fills > 0, books
    assert books.duplicate_orders == 0, books
    assert books.lost_fills == 0 and books.phantom_fills == 0, books
    assert books.position_diff == 0 and books.balance_diff == 0, books


FAULTS = {
    "latency": "latency=250ms",
    "timeouts": "timeout=x3:ms=6000@POST/capi/v3/order",
    "5xx": "error5xx=0.3@/capi/v3/*",
    "429": "ratelimit=0.3@/capi/v3/*",
    "ws_drop": "ws_drop=x3",
    "ws_silent": "ws_silent=1.0",
    "partial_fills": "partial_fill=1.0:parts=3@POST/capi/v3/order",
    "lost_response": "lost_response=x4:mode=close@POST/capi/v3/order",
    "lost_response_5xx": "lost_response=x4:mode=5xx@POST/capi/v3/order",
    "clock_skew": "clock_skew=45000ms",
}


@pytest.mark.parametrize("name", list(FAULTS))
def test_live_daemon_trades_through_the_fault(tmp_path: Path, name: str) -> None:
    fake = FakeProc(tmp_path / "fake", speed=2000.0)
    d = live_daemon(tmp_path / "run", fake)
    try:
        d.start()
        d.wait_ready(60)
        m = d.wait_metric(lambda m: m["portfolio"]["fills"] >= 4, timeout=60)
        decisions0 = m["model"]["decisions"]
        fake.faults(FAULTS[name])
        time.sleep(6.0)  # ~40 bars of market time under the fault
        fake.clear_faults()
        m = d.wait_metric(lambda m: m["model"]["decisions"] >= decisions0 + 60 and m["trading"]["open_orders"] == 0,
                          timeout=90)
        fills0 = m["portfolio"]["fills"]
        m = d.wait_metric(lambda m: m["portfolio"]["fills"] >= fills0 + 3 and m["trading"]["open_orders"] == 0,
                          timeout=60)  # and it goes on trading afterwards
        assert m["trading"]["state"] in ("ACTIVE", "REDUCE_ONLY"), m["trading"]
        settle_and_stop(d)
        books = book_check(d, fake)
    finally:
        d.close()
        fake.stop()
    _assert_clean(books)
    alerts = (d.log_dir / "risk_alerts.json")
    text = alerts.read_text() if alerts.exists() else ""
    assert "reconciliation_" not in text, text  # nothing unexplained reached the account


def _harvest(fake: FakeProc, totals: Counter[str]) -> None:
    """Add up how often each fault fired before its rules are replaced (replacing resets the counts)."""
    for rule in fake.state()["faults"]["rules"]:
        totals[rule["kind"] + ("/" + rule["mode"] if rule["kind"] == "lost_response" else "")] += rule["fired"]


def _kill_between_submit_and_ack(d: DaemonProc, fake: FakeProc, totals: Counter[str] | None = None) -> str:
    """Hold back the answer to the next order the exchange executes, and kill -9 the daemon meanwhile."""
    if totals is not None:
        _harvest(fake, totals)
    acked0 = d.metrics()["exchange"]["broker"]["acked"]
    known = {o["clientOrderId"] for o in fake.state()["orders"]}
    fake.faults("lost_response=x1:mode=hang:ms=20000@POST/capi/v3/order")
    end = time.monotonic() + 60
    while time.monotonic() < end:
        new = [o["clientOrderId"] for o in fake.state()["orders"] if o["clientOrderId"] not in known]
        if new:
            assert d.metrics()["exchange"]["broker"]["acked"] == acked0, "must die before the acknowledgement"
            d.kill9()
            fake.clear_faults()
            return new[0]
        time.sleep(0.02)
    raise AssertionError("no order was submitted within 60 s")


def test_kill_9_between_submit_and_acknowledgement_books_the_order_once(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path / "fake", speed=2000.0)
    d = live_daemon(tmp_path / "run", fake)
    try:
        d.start()
        d.wait_ready(60)
        d.wait_metric(lambda m: m["portfolio"]["fills"] >= 3, timeout=60)
        in_flight = _kill_between_submit_and_ack(d, fake)
        d.start()
        d.wait_ready(60)
        m = d.wait_metric(lambda m: m["exchange"]["broker"]["recovered"] >= 1, timeout=30)
        fills0 = m["portfolio"]["fills"]
        d.wait_metric(lambda m: m["portfolio"]["fills"] >= fills0 + 3 and m["trading"]["open_orders"] == 0,
                      timeout=60)
        assert d.stop() == 0
        books = book_check(d, fake)
        st = fake.state()
    finally:
        d.close()
        fake.stop()
    _assert_clean(books)
    ours = [t.split(",")[8] for t in (d.log_dir / "trades.csv").read_text().splitlines()[1:]]
    assert ours.count(in_flight.removesuffix("-c").removesuffix("-o")) >= 1, "its fill was booked after restart"
    assert sum(1 for o in st["orders"] if o["clientOrderId"] == in_flight) == 1


SOAK_FAULTS = ("latency=0.05:ms=150,error5xx=0.03@/capi/v3/*,ratelimit=0.03@/capi/v3/*,"
               "lost_response=0.05:mode=close@POST/capi/v3/order,lost_response=0.03:mode=5xx@POST/capi/v3/order,"
               "partial_fill=0.2:parts=2@POST/capi/v3/order,timeout=0.01:ms=5000@POST/capi/v3/order")


@pytest.mark.slow
def test_soak_with_random_faults_over_2000_decisions(tmp_path: Path) -> None:
    rng = random.Random(20261201)
    fake = FakeProc(tmp_path / "fake", speed=3000.0, faults=SOAK_FAULTS, seed=11)
    d = live_daemon(tmp_path / "run", fake)
    kills: list[dict[str, object]] = []
    fired: Counter[str] = Counter()
    decided = 0
    try:
        d.start()
        d.wait_ready(60)
        kill_at = sorted(rng.sample(range(300, 1900), 3))
        for target in kill_at:
            m = d.wait_metric(lambda m, t=target, base=decided: base + m["model"]["decisions"] >= t, timeout=240)
            if rng.random() < 0.5:  # half of the kills land between submit and acknowledgement
                in_flight = _kill_between_submit_and_ack(d, fake, fired)
                fake.faults(SOAK_FAULTS)
                kills.append({"at_decision": decided + m["model"]["decisions"], "between_submit_and_ack": in_flight})
            else:
                d.kill9()
                kills.append({"at_decision": decided + m["model"]["decisions"], "between_submit_and_ack": None})
            decided += d_last_decisions(d)
            d.start()
            d.wait_ready(60)
            d.wait_metric(lambda m: m["model"]["decisions"] >= 50, timeout=60)
            fake.faults("ws_drop=x1", clear=False)  # and the market-data stream drops while it trades
        d.wait_metric(lambda m, base=decided: base + m["model"]["decisions"] >= 2000, timeout=300)
        _harvest(fake, fired)
        fake.clear_faults()
        d.wait_metric(lambda m: m["trading"]["open_orders"] == 0, timeout=30)
        last = d.metrics()
        settle_and_stop(d)
        books = book_check(d, fake)
        st = fake.state()
    finally:
        d.close()
        fake.stop()
    figures = {
        "decisions": decided + last["model"]["decisions"], "exchange_orders": books.exchange_orders,
        "exchange_fills": books.exchange_fills, "kills": kills, "duplicate_orders": books.duplicate_orders,
        "lost_fills": books.lost_fills, "phantom_fills": books.phantom_fills,
        "position_diff": str(books.position_diff), "balance_diff": str(books.balance_diff),
        "final_state": last["trading"]["state"], "faults_fired": dict(fired), "ws": st.get("ws"),
        "client_retries": last["exchange"]["broker"]["client"]["retries"],
        "recovered_orders": last["exchange"]["broker"]["recovered"],
    }
    (tmp_path / "live_soak.json").write_text(json.dumps(figures, indent=2))
    print("\nlive soak:", json.dumps(figures))
    assert figures["decisions"] >= 2000
    assert sum(fired.values()) > 50, fired  # the faults really fired
    _assert_clean(books)
    assert last["trading"]["state"] in ("ACTIVE", "REDUCE_ONLY")


def d_last_decisions(d: DaemonProc) -> int:
    """Decisions the killed process made: its ai_decisions.json lines since the last count (the file survives)."""
    lines = (d.log_dir / "ai_decisions.json").read_text().splitlines()
    prev = getattr(d, "_counted", 0)
    d._counted = len(lines)  # type: ignore[attr-defined]
    return len(lines) - prev


def test_silent_stream_shows_in_health_and_recovers(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path / "fake", speed=1000.0)
    d = live_daemon(tmp_path / "run", fake, service={"exchange": {"stream_silence_s": 2}})
    try:
        d.start()
        d.wait_ready(60)
        d.wait_metric(lambda m: m["model"]["decisions"] >= 5, timeout=60)
        fake.faults("ws_silent=1.0")
        end = time.monotonic() + 30
        while time.monotonic() < end:
            status, body, _ = d.http("GET", "/health")
            if status == 503:
                break
            time.sleep(0.1)
        assert status == 503 and "stream silent" in body["problem"], body
        # while it is silent, bars still come (REST polling) and decisions go on, but no new risk is taken:
        # every order the exchange receives meanwhile only reduces the position
        known = {o["clientOrderId"] for o in fake.state()["orders"]}
        decisions0 = d.metrics()["model"]["decisions"]
        d.wait_metric(lambda m: m["model"]["decisions"] >= decisions0 + 5, timeout=30)
        meanwhile = [o for o in fake.state()["orders"] if o["clientOrderId"] not in known]
        assert d.http("GET", "/health")[0] == 503  # still silent: the window above was all stalled
        assert all(o["reduceOnly"] for o in meanwhile), meanwhile
        fake.clear_faults()
        end = time.monotonic() + 60
        while time.monotonic() < end and d.http("GET", "/health")[0] != 200:
            time.sleep(0.2)
        assert d.http("GET", "/health")[0] == 200
        m = d.metrics()
        assert m["market"]["feed"]["reconnects"] >= 1 or m["market"]["feed"]["silences"] >= 1
        assert d.stop() == 0
    finally:
        d.close()
        fake.stop()
