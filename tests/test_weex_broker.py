"""The live broker's order path in one process against the fake WEEX on 127.0.0.1 (no daemon around it).

What the daemon relies on between a decision and its acknowledgement: an order leaves only after ``release()``,
``wait_answered`` returns as soon as the exchange has answered (so the daemon's own bookkeeping does not sit on
the loop while the answer is on its way back), it gives up after its bound when the answer is lost, and the
latency split adds up to the decision-to-acknowledgement time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from alphapulse.domain import Fill, Order, Side
from alphapulse.exchange.weex.broker import WeexBroker
from alphapulse.exchange.weex.client import WeexClient
from alphapulse.exchange.weex.fake import FakeWeex

pytestmark = pytest.mark.timeout(30)

DATA_1H = Path(__file__).resolve().parent.parent / "alphapulse" / "data" / "BTC_USDT_USDT-1h.csv.gz"


class Sink:
    """Records what the broker reports, as the daemon's ExecutionSink would book it."""

    def __init__(self) -> None:
        self.fills: list[Fill] = []
        self.statuses: list[tuple[str, str]] = []

    def on_fills(self, fills: list[Fill]) -> None:
        self.fills.extend(fills)

    def on_order_status(self, client_order_id: str, status: str, exchange_order_id: str | None, detail: str) -> None:
        self.statuses.append((client_order_id, status))


@pytest.fixture
async def venue() -> AsyncIterator[tuple[FakeWeex, WeexBroker, Sink]]:
    fake = FakeWeex(DATA_1H, speed=1.0, seed=3)
    await fake.start()
    client = WeexClient(fake.url, fake.api_key, fake.secret_key, fake.passphrase, timeout_s=5.0, max_retries=0)
    broker = WeexBroker(client, "BTCUSDT", poll_interval_s=0.05)
    await broker.start()
    sink = Sink()
    task = asyncio.create_task(broker.run(sink))
    try:
        yield fake, broker, sink
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()
        await fake.stop()


def _order(n: int) -> Order:
    return Order(f"t-{n}", "BTCUSDT", Side.BUY, Decimal("0.001"), False, int(time.time() * 1000))


def _fake_orders(fake: FakeWeex) -> list[Any]:
    return list(fake.engine.orders.values())


async def test_an_order_leaves_only_after_release_and_wait_answered_returns_on_the_ack(
        venue: tuple[FakeWeex, WeexBroker, Sink]) -> None:
    fake, broker, sink = venue
    assert broker.submit(_order(1))
    await asyncio.sleep(0.2)  # several of the broker's polls: an unreleased intent must not leave
    assert _fake_orders(fake) == [] and broker.sent == 0

    t0 = time.monotonic()
    broker.release()
    assert await broker.wait_answered(2.0) is True
    waited = time.monotonic() - t0
    assert broker.acked == 1 and len(_fake_orders(fake)) == 1
    assert ("t-1", "open") in sink.statuses
    assert waited < 1.0  # answered by the exchange, not by the bound

    stages = broker.describe()["decision_to_ack_stages_us"]
    total = broker.decision_to_ack.total
    parts = sum(s["mean"] * s["count"] for s in stages.values())
    assert all(s["count"] == 1 for s in stages.values())
    # the three stages tile the decision-to-ack interval (each is rounded to 0.01 µs in the summary)
    assert parts == pytest.approx(total, abs=1.0)


async def test_wait_answered_gives_up_after_its_bound_when_the_answer_is_lost(
        venue: tuple[FakeWeex, WeexBroker, Sink]) -> None:
    fake, broker, _ = venue
    fake.set_faults("lost_response=x1:mode=hang:ms=3000@POST/capi/v3/order")
    assert broker.submit(_order(2))
    broker.release()
    t0 = time.monotonic()
    assert await broker.wait_answered(0.3) is False
    assert 0.25 <= time.monotonic() - t0 < 1.5
    assert broker.acked == 0
    # the exchange did take the order: it is followed as ever once the answer (or a look-up) comes
    assert len(_fake_orders(fake)) == 1


async def test_wait_answered_returns_at_once_with_nothing_in_flight(venue: tuple[FakeWeex, WeexBroker, Sink]) -> None:
    _, broker, _ = venue
    t0 = time.monotonic()
    assert await broker.wait_answered(5.0) is True
    assert time.monotonic() - t0 < 0.1
