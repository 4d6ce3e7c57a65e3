"""Shared fixtures: real candles and the repository paths the core tests need.

Only real market data: the bundled BTCUSDT 5m perpetual file shipped in the package and the ETH
crash slice committed under ``tests/data`` (see its README).  Nothing here reads ``../shared/data``,
so the suite runs on a user's machine as well as in CI.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from alphapulse.domain import Candle

TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent
BUNDLED_FILE = REPO_DIR / "alphapulse" / "data" / "BTC_USDT_USDT-5m.csv.gz"
CRASH_FILE = TESTS_DIR / "data" / "ETH_USDT_USDT-5m-crash-2025-02-03.csv.gz"


def _read_candles(path: Path) -> list[Candle]:
    """Parse a ``timestamp,open,high,low,close,volume`` gzip CSV; floats round-trip the 8-decimal text."""
    with gzip.open(path, "rt", encoding="ascii") as f:
        header = f.readline().strip()
        assert header == "timestamp,open,high,low,close,volume", header
        out = []
        for line in f:
            ts, o, h, lo, c, v = line.rstrip("\n").split(",")
            out.append(Candle(int(ts), float(o), float(h), float(lo), float(c), float(v)))
    return out


@pytest.fixture(scope="session")
def repo_dir() -> Path:
    return REPO_DIR


@pytest.fixture(scope="session")
def btc_candles() -> list[Candle]:
    """All 70,272 real bundled BTCUSDT 5m candles (2024-12-31 .. 2025-08-31), parsed once per session."""
    return _read_candles(BUNDLED_FILE)


@pytest.fixture(scope="session")
def crash_candles() -> list[Candle]:
    """Real ETHUSDT perpetual 5m candles 2025-01-29 .. 2025-02-03, a 39% high-to-low fall."""
    return _read_candles(CRASH_FILE)

