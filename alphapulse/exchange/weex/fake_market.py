"""Market data of the fake WEEX exchange: the contract's specification, the candle series and the funding schedule.

Pure and read-only: the engine and the HTTP/WebSocket layers query them by market time.  Candles come from the
repo's own loader (:func:`alphapulse.market.replay.load_candles`) and pass the live validator
(:func:`alphapulse.market.validate.valid_mask`), so the fake serves exactly the bars the daemon would accept.
"""

from __future__ import annotations

import bisect
import gzip
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np

from alphapulse.domain import Candle, timeframe_ms
from alphapulse.market.replay import load_candles
from alphapulse.market.validate import valid_mask

FUNDING_INTERVAL_MS = 8 * 3_600_000
ZERO = Decimal(0)


@dataclass(frozen=True)
class MarketSpec:
    """One contract as ``/capi/v3/market/exchangeInfo`` describes it; quantities are in the base asset."""

    symbol: str = "BTCUSDT"
    base: str = "BTC"
    quote: str = "USDT"
    price_precision: int = 1
    quantity_precision: int = 3
    min_order_size: Decimal = Decimal("0.001")
    max_order_size: Decimal = Decimal("1200")
    maker_fee: Decimal = Decimal("0.0002")
    taker_fee: Decimal = Decimal("0.0006")
    min_leverage: int = 1
    max_leverage: int = 400

    @property
    def tick(self) -> Decimal:
        return Decimal(1).scaleb(-self.price_precision)

    @property
    def step(self) -> Decimal:
        return Decimal(1).scaleb(-self.quantity_precision)

    def price(self, value: Decimal) -> Decimal:
        return value.quantize(self.tick)

    def to_json(self) -> dict[str, Any]:
        return {
            "symbol": self.symbol,
            "baseAsset": self.base,
            "quoteAsset": self.quote,
            "marginAsset": self.quote,
            "pricePrecision": str(self.price_precision),
            "quantityPrecision": str(self.quantity_precision),
            "baseAssetPrecision": str(self.quantity_precision),
            "quotePrecision": "8",
            "contractVal": format(self.step, "f"),
            "delivery": ["00:00:00", "08:00:00", "16:00:00"],
            "forwardContractFlag": True,
            "minLeverage": str(self.min_leverage),
            "maxLeverage": str(self.max_leverage),
            "buyLimitPriceRatio": "0.05",
            "sellLimitPriceRatio": "0.05",
            "makerFeeRate": format(self.maker_fee, "f"),
            "takerFeeRate": format(self.taker_fee, "f"),
            "minOrderSize": format(self.min_order_size, "f"),
            "maxOrderSize": format(self.max_order_size, "f"),
            "maxPositionSize": format(self.max_order_size * 5, "f"),
            "marketOpenLimitSize": format(self.max_order_size, "f"),
        }


class CandleSeries:
    """The candle file as numpy columns (only rows the live validator accepts), queried by market time."""

    def __init__(self, columns: dict[str, np.ndarray], timeframe: str, price_precision: int) -> None:
        self.timeframe = timeframe
        self.bar_ms = timeframe_ms(timeframe)
        keep = valid_mask(columns, self.bar_ms)
        self.ts: np.ndarray = np.asarray(columns["ts"], dtype=np.int64)[keep]
        self.cols = {k: np.asarray(columns[k], dtype=np.float64)[keep]
                     for k in ("open", "high", "low", "close", "volume")}
        if len(self.ts) == 0:
            raise ValueError("no valid candles")
        self.price_precision = price_precision
        self._tick = Decimal(1).scaleb(-price_precision)

    @classmethod
    def from_source(cls, source: Sequence[Candle] | str | Path, timeframe: str,
                    price_precision: int | None) -> CandleSeries:
        """From a list of candles or a candle file (parsed by the repo's loader, never a second CSV parser)."""
        if isinstance(source, (str, Path)):
            columns = load_candles(source)
        else:
            rows = list(source)
            columns = {"ts": np.array([c.ts for c in rows], dtype=np.int64)}
            for i, key in enumerate(("open", "high", "low", "close", "volume"), start=1):
                columns[key] = np.array([c[i] for c in rows], dtype=np.float64)
        if price_precision is None:
            price_precision = _infer_precision(columns["open"][:2000])
        return cls(columns, timeframe, price_precision)

    def __len__(self) -> int:
        return len(self.ts)

    def dec(self, x: float) -> Decimal:
        """A file price as a Decimal on the tick grid (8-decimal floats round-trip through repr)."""
        return Decimal(repr(float(x))).quantize(self._tick)

    def closed_count(self, now: int) -> int:
        """How many bars have closed by ``now`` (bar i closed when ts[i] + bar_ms <= now)."""
        return int(np.searchsorted(self.ts, now - self.bar_ms, side="right"))

    def index_at(self, t: int) -> int | None:
        """Index of the bar containing ``t``, None in a data hole or outside the data."""
        i = int(np.searchsorted(self.ts, t, side="right")) - 1
        if i >= 0 and t < int(self.ts[i]) + self.bar_ms:
            return i
        return None

    def row(self, i: int) -> tuple[int, float, float, float, float, float]:
        c = self.cols
        return (int(self.ts[i]), float(c["open"][i]), float(c["high"][i]), float(c["low"][i]), float(c["close"][i]),
                float(c["volume"][i]))

    def partial(self, i: int, now: int) -> tuple[int, float, float, float, float, float]:
        """The forming bar ``i`` as seen at ``now`` (see the module docstring)."""
        ts, o, h, lo, c, v = self.row(i)
        f = min(1.0, max(0.0, (now - ts) / self.bar_ms))
        return ts, o, o + (h - o) * f, o + (lo - o) * f, o + (c - o) * f, v * f

    def reference_price(self, t: int) -> Decimal:
        """Price a market order gets at ``t``: the open of the bar containing it, else the last close known."""
        i = self.index_at(t)
        if i is not None:
            return self.dec(self.cols["open"][i])
        k = self.closed_count(t)
        if k == 0:
            return self.dec(self.cols["open"][0])
        return self.dec(self.cols["close"][k - 1])

    def last_price(self, t: int) -> Decimal:
        """Last traded price at ``t``: the forming bar's partial close, else the last close known."""
        i = self.index_at(t)
        if i is not None:
            return self.dec(self.partial(i, t)[4])
        return self.reference_price(t)


def _infer_precision(opens: np.ndarray) -> int:
    """Decimals the file's prices use (at most 8), so a fill at a bar's open is on the tick grid."""
    places = 0
    for x in opens.tolist():
        text = repr(float(x))
        if "e" in text or "E" in text:
            return 8
        if "." in text:
            places = max(places, len(text.split(".")[1].rstrip("0")))
    return min(max(places, 0), 8)


class FundingSchedule:
    """Funding events: a constant rate every 8 h (00/08/16 UTC), or the times and rates of a funding file."""

    def __init__(self, rate: Decimal = Decimal("0.0001"), times: Sequence[int] | None = None,
                 rates: Sequence[Decimal] | None = None) -> None:
        self.rate = rate
        self.times = list(times) if times is not None else None
        self.rates = list(rates) if rates is not None else None

    @classmethod
    def from_file(cls, path: str | Path) -> FundingSchedule:
        """Parse a ``timestamp,funding_rate`` gzip/plain CSV (the shared data's funding format)."""
        p = Path(path)
        with open(p, "rb") as raw:
            gz = raw.read(2) == b"\x1f\x8b"
        opener = gzip.open(p, "rt", encoding="utf-8") if gz else open(p, encoding="utf-8")
        times: list[int] = []
        rates: list[Decimal] = []
        with opener as f:
            header = f.readline().strip().lower()
            if header != "timestamp,funding_rate":
                raise ValueError(f"{p}: expected header timestamp,funding_rate, got {header!r}")
            for line in f:
                parts = line.strip().split(",")
                if len(parts) != 2:
                    continue
                times.append(int(float(parts[0])))
                rates.append(Decimal(parts[1]))
        order = sorted(range(len(times)), key=times.__getitem__)
        return cls(times=[times[i] for i in order], rates=[rates[i] for i in order])

    def between(self, after: int, upto: int) -> list[tuple[int, Decimal]]:
        """Funding events with ``after < t <= upto``, in time order."""
        if upto <= after:
            return []
        if self.times is not None and self.rates is not None:
            lo = _bisect_right(self.times, after)
            hi = _bisect_right(self.times, upto)
            return [(self.times[i], self.rates[i]) for i in range(lo, hi)]
        first = (after // FUNDING_INTERVAL_MS + 1) * FUNDING_INTERVAL_MS
        return [(t, self.rate) for t in range(first, upto + 1, FUNDING_INTERVAL_MS)]

    def next_after(self, t: int) -> tuple[int, Decimal]:
        if self.times is not None and self.rates is not None:
            i = _bisect_right(self.times, t)
            if i < len(self.times):
                return self.times[i], self.rates[i]
            return (t // FUNDING_INTERVAL_MS + 1) * FUNDING_INTERVAL_MS, self.rates[-1] if self.rates else ZERO
        return (t // FUNDING_INTERVAL_MS + 1) * FUNDING_INTERVAL_MS, self.rate

    def last_at(self, t: int) -> tuple[int, Decimal] | None:
        if self.times is not None and self.rates is not None:
            i = _bisect_right(self.times, t) - 1
            return (self.times[i], self.rates[i]) if i >= 0 else None
        return (t // FUNDING_INTERVAL_MS) * FUNDING_INTERVAL_MS, self.rate


def _bisect_right(xs: Sequence[int], x: int) -> int:
    return bisect.bisect_right(xs, x)
