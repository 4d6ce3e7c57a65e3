"""Funding: the rate file, the (t0, t1] event schedule with its default outside coverage, and the payment.

Uses the real Binance BTC/USDT:USDT funding-rate file (``tests/data/BTC_USDT_USDT-funding_rate.csv.gz``, a copy
of ``shared/data/futures/BTC_USDT_USDT-funding_rate.csv.gz``): 2,405 events in two runs,
2021-06-29 16:00 -> 2023-01-08 00:00 and 2024-12-31 00:00 -> 2025-08-31 16:00 UTC.
"""

from __future__ import annotations

import datetime as dt
import gzip
from decimal import Decimal
from pathlib import Path

import pytest

from alphapulse.costs import funding_payment, money
from alphapulse.funding import (
    DEFAULT_FUNDING_INTERVAL_MS,
    DEFAULT_FUNDING_RATE,
    FundingError,
    FundingEvent,
    FundingSchedule,
    funding_file_for,
    load_funding_events,
)

DATA = Path(__file__).resolve().parent / "data"
BTC_FUNDING = DATA / "BTC_USDT_USDT-funding_rate.csv.gz"
H = 3_600_000


def ms(text: str) -> int:
    return int(dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp() * 1000)


@pytest.fixture(scope="module")
def btc() -> FundingSchedule:
    return FundingSchedule.from_file(BTC_FUNDING)


# ------------------------------------------------------------------ the real file


def test_real_file_values_and_coverage(btc: FundingSchedule) -> None:
    events = btc.events
    assert len(events) == 2_405
    assert events[0] == FundingEvent(ms("2021-06-29T16:00"), Decimal("0.00003883"), "file")
    assert events[1] == FundingEvent(ms("2021-06-30T00:00"), Decimal("0.0001"), "file")
    assert events[-1] == FundingEvent(ms("2025-08-31T16:00"), Decimal("0.0001"), "file")
    assert all(a.ts < b.ts for a, b in zip(events, events[1:], strict=False))
    assert btc.coverage == ((ms("2021-06-29T16:00"), ms("2023-01-08T00:00")),
                            (ms("2024-12-31T00:00"), ms("2025-08-31T16:00")))
    # FTX week, 2022-11-11: negative funding (shorts paid longs), exactly as in the file
    day = btc.events_between(ms("2022-11-10T23:00"), ms("2022-11-11T16:00"))
    assert [(e.ts, e.rate, e.source) for e in day] == [
        (ms("2022-11-11T00:00"), Decimal("-0.00019452"), "file"),
        (ms("2022-11-11T08:00"), Decimal("-0.00007277"), "file"),
        (ms("2022-11-11T16:00"), Decimal("-0.00005802"), "file"),
    ]
    assert btc.rate_sum(ms("2022-11-10T23:00"), ms("2022-11-11T16:00")) == Decimal("-0.00032531")


def test_interval_is_half_open(btc: FundingSchedule) -> None:
    t = ms("2022-11-11T08:00")
    assert [e.ts for e in btc.events_between(t - H, t)] == [t]  # event exactly at t1: included
    assert btc.events_between(t, t + H) == []  # event exactly at t0: excluded
    assert btc.events_between(t, t) == [] and btc.events_between(t, t - H) == []
    # consecutive 1h bars over two years count every event exactly once
    start, end = ms("2021-06-01T00:00"), ms("2023-06-01T00:00")
    per_bar = [e for t0 in range(start, end, H) for e in btc.events_between(t0, t0 + H)]
    assert per_bar == btc.events_between(start, end)
    assert len({e.ts for e in per_bar}) == len(per_bar)


def test_default_before_after_and_in_the_hole(btc: FundingSchedule) -> None:
    # before the file starts: 0.01 % at 00/08/16 UTC
    before = btc.events_between(ms("2021-06-28T00:00"), ms("2021-06-29T00:00"))
    assert [(e.ts, e.rate, e.source) for e in before] == [
        (ms("2021-06-28T08:00"), DEFAULT_FUNDING_RATE, "default"),
        (ms("2021-06-28T16:00"), DEFAULT_FUNDING_RATE, "default"),
        (ms("2021-06-29T00:00"), DEFAULT_FUNDING_RATE, "default"),
    ]
    # the file's first event (16:00) takes over exactly where coverage starts; 08:00 is still default
    edge = btc.events_between(ms("2021-06-29T00:00"), ms("2021-06-30T00:00"))
    assert [(e.ts, e.source) for e in edge] == [(ms("2021-06-29T08:00"), "default"),
                                                (ms("2021-06-29T16:00"), "file"), (ms("2021-06-30T00:00"), "file")]
    # the 2023-01-08 -> 2024-12-31 hole: defaults from the first 8 h step after the last event
    hole = btc.events_between(ms("2023-01-07T20:00"), ms("2023-01-08T20:00"))
    assert [(e.ts, e.source) for e in hole] == [(ms("2023-01-08T00:00"), "file"), (ms("2023-01-08T08:00"), "default"),
                                                (ms("2023-01-08T16:00"), "default")]
    year = btc.events_between(ms("2023-12-31T00:00"), ms("2024-12-30T00:00"))
    assert len(year) == 365 * 3 and {e.source for e in year} == {"default"}
    assert btc.rate_sum(ms("2023-12-31T00:00"), ms("2024-12-30T00:00")) == Decimal("0.1095")
    # after the file ends
    after = btc.events_between(ms("2025-08-31T16:00"), ms("2025-09-01T08:00"))
    assert [(e.ts, e.source) for e in after] == [(ms("2025-09-01T00:00"), "default"),
                                                 (ms("2025-09-01T08:00"), "default")]
    assert not btc.covered(ms("2024-06-01T00:00")) and btc.covered(ms("2022-06-01T04:00"))


def test_no_file_is_the_default_schedule() -> None:
    sched = FundingSchedule()
    evs = sched.events_between(ms("2025-01-01T00:00"), ms("2025-01-02T00:00"))
    assert [e.ts for e in evs] == [ms("2025-01-01T08:00"), ms("2025-01-01T16:00"), ms("2025-01-02T00:00")]
    assert all(e.rate == Decimal("0.0001") and e.source == "default" for e in evs)
    assert DEFAULT_FUNDING_INTERVAL_MS == 8 * H
    custom = FundingSchedule(default_rate=Decimal("0"))
    assert custom.rate_sum(0, 10 * 24 * H) == 0


def test_shortened_intervals_stay_covered() -> None:
    """The exchange shortens funding to 2 h in stress: those events are used and no default is mixed in."""
    t = ms("2022-11-10T00:00")
    events = [FundingEvent(t + i * 2 * H, Decimal("-0.0005")) for i in range(13)]  # 2-hourly for a day
    sched = FundingSchedule(events)
    got = sched.events_between(t - H, t + 24 * H)
    assert [e.ts for e in got] == [e.ts for e in events] and {e.source for e in got} == {"file"}
    assert sched.rate_sum(t - H, t + 24 * H) == Decimal("-0.0065")
    with pytest.raises(ValueError, match="two funding events"):
        FundingSchedule([events[0], events[0]])


# ------------------------------------------------------------------ the payment


def test_payment_sign_conventions() -> None:
    qty, mark = Decimal("0.5"), Decimal("60000")
    assert funding_payment(qty, mark, Decimal("0.0001")) == Decimal("3.00000000")  # long, rate > 0: pays
    assert funding_payment(-qty, mark, Decimal("0.0001")) == Decimal("-3.00000000")  # short, rate > 0: receives
    assert funding_payment(qty, mark, Decimal("-0.0002")) == Decimal("-6.00000000")  # long, rate < 0: receives
    assert funding_payment(-qty, mark, Decimal("-0.0002")) == Decimal("6.00000000")  # short, rate < 0: pays
    assert funding_payment(Decimal(0), mark, Decimal("0.0003")) == 0


def test_payment_is_quantised_like_money() -> None:
    # 0.003 * 12345.67 * 0.00003883 = 37.03701 * 0.00003883 = 0.0014381471... -> 0.00143815 (1e-8 USDT)
    assert Decimal("0.003") * Decimal("12345.67") * Decimal("0.00003883") == Decimal("0.0014381470983")
    p = funding_payment(Decimal("0.003"), Decimal("12345.67"), Decimal("0.00003883"))
    assert p == Decimal("0.00143815") and p.as_tuple().exponent == -8
    assert funding_payment(Decimal("1"), Decimal("0.000000025"), Decimal("1")) == Decimal("0.00000002")  # half-even


def test_payments_over_a_month_are_exact_sums(btc: FundingSchedule) -> None:
    qty, mark = Decimal("-0.137"), Decimal("16843.21")
    t0, t1 = ms("2022-11-01T00:00"), ms("2022-12-01T00:00")
    total, booked = btc.payments(qty, mark, t0, t1)
    assert len(booked) == 90 and all(e.source == "file" for e, _ in booked)
    assert total == sum((money(qty * mark * e.rate) for e, _ in booked), Decimal(0))
    assert all(p == funding_payment(qty, mark, e.rate) for e, p in booked)
    # per-event quantisation moves the total by at most half a unit per event from the unrounded product
    assert abs(total - qty * mark * btc.rate_sum(t0, t1)) <= Decimal("0.000000005") * len(booked)
    # bar by bar, the same events book the same total
    by_bar = sum((btc.payments(qty, mark, t, t + H)[0] for t in range(t0, t1, H)), Decimal(0))
    assert by_bar == total


# ------------------------------------------------------------------ files and names


def test_bad_files_are_refused(tmp_path: Path) -> None:
    bad_header = tmp_path / "a.csv"
    bad_header.write_text("time,rate\n1,0.1\n")
    with pytest.raises(FundingError, match="header"):
        load_funding_events(bad_header)
    bad_row = tmp_path / "b.csv.gz"
    with gzip.open(bad_row, "wt") as fh:
        fh.write("timestamp,funding_rate\n1624982400000,abc\n")
    with pytest.raises(FundingError, match=":2"):
        load_funding_events(bad_row)
    conflict = tmp_path / "c.csv"
    conflict.write_text("timestamp,funding_rate\n1624982400000,0.0001\n1624982400004,0.0002\n")
    with pytest.raises(FundingError, match="two different rates"):
        load_funding_events(conflict)
    with pytest.raises(FundingError, match="cannot be read"):
        load_funding_events(tmp_path / "missing.csv.gz")


def test_jittered_timestamps_round_to_the_minute(tmp_path: Path) -> None:
    f = tmp_path / "j.csv"
    f.write_text("timestamp,funding_rate\n1624982400004,0.0001\n1624982400000,0.0001\n1625011199990,-0.00002\n")
    assert load_funding_events(f) == [FundingEvent(1624982400000, Decimal("0.0001")),
                                      FundingEvent(1625011200000, Decimal("-0.00002"))]


@pytest.mark.parametrize("symbol", ["BTCUSDT", "BTC/USDT", "BTC/USDT:USDT", "btc_usdt"])
def test_funding_file_for(symbol: str) -> None:
    assert funding_file_for(symbol, "/d") == Path("/d/BTC_USDT_USDT-funding_rate.csv.gz")
    assert funding_file_for(symbol, DATA).name == BTC_FUNDING.name
    with pytest.raises(ValueError):
        funding_file_for("BTCUSD", "/d")
