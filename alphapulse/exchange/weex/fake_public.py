"""Public market-data endpoints of the fake WEEX exchange, and the small helpers every handler shares.

A mixin of :class:`~alphapulse.exchange.weex.fake.FakeWeex`, split out only to keep files readable: it reads the
fake's candle series and clock and never changes state.
"""

from __future__ import annotations

import json
import time
from decimal import Decimal
from typing import Any

import numpy as np
from aiohttp import web

from alphapulse.exchange.weex.fake_engine import Engine, WeexError, fmt
from alphapulse.exchange.weex.fake_market import CandleSeries, MarketSpec


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, separators=(",", ":")), status=status, content_type="application/json")


def _ok() -> dict[str, Any]:
    """The acknowledgement of a settings call; ccxt treats ``{"code": "200", "msg": "success"}`` as no error."""
    return {"code": "200", "msg": "success", "requestTime": int(time.time() * 1000)}


class MarketDataRoutes:
    """``/capi/v3/market/*`` and the spot endpoints ccxt's ``load_markets`` needs."""

    series: CandleSeries
    market: MarketSpec
    engine: Engine
    timeframe: str

    def _sync(self) -> int:
        raise NotImplementedError

    def server_time_ms(self) -> int:
        raise NotImplementedError

    def _symbol(self, params: dict[str, Any], required: bool = True) -> str | None:
        symbol = params.get("symbol")
        if not symbol:
            if required:
                raise WeexError(-1141, "Parameter symbol cannot be empty.")
            return None
        if symbol != self.market.symbol:
            raise WeexError(-1121, "Invalid symbol.")
        return str(symbol)

    @staticmethod
    def _int(params: dict[str, Any], name: str, default: int | None = None) -> int | None:
        value = params.get(name)
        if value in (None, ""):
            return default
        try:
            return int(str(value))
        except ValueError:
            raise WeexError(-1142, f"Parameter {name} is invalid.") from None

    async def _time(self, request: web.Request) -> web.Response:
        return _json({"serverTime": self.server_time_ms()})

    async def _exchange_info(self, request: web.Request) -> web.Response:
        return _json({"timezone": "UTC", "serverTime": self.server_time_ms(), "symbols": [self.market.to_json()]})

    async def _spot_coins(self, request: web.Request) -> web.Response:
        return _json([])

    async def _spot_exchange_info(self, request: web.Request) -> web.Response:
        return _json({"symbols": []})

    def _check_interval(self, params: dict[str, Any]) -> None:
        interval = params.get("interval")
        if not interval:
            raise WeexError(-1141, "Parameter interval cannot be empty.")
        if interval != self.timeframe:
            raise WeexError(-1140, f"interval {interval} is not served by this fake (data is {self.timeframe}).")

    def _kline_row(self, row: tuple[int, float, float, float, float, float]) -> list[Any]:
        ts, o, h, lo, c, v = row
        p, dec = self.market.price_precision, self.series.dec
        vol = Decimal(repr(v)).quantize(Decimal("0.00000001")).normalize()
        close_dec = dec(c)
        return [ts, fmt(dec(o), p), fmt(dec(h), p), fmt(dec(lo), p), fmt(close_dec, p), format(vol, "f"),
                ts + self.series.bar_ms - 1, format((vol * close_dec).quantize(Decimal("0.0001")), "f")]

    async def _klines(self, request: web.Request) -> web.Response:
        params = dict(request.query)
        self._symbol(params)
        self._check_interval(params)
        limit = self._int(params, "limit", 100)
        assert limit is not None
        if not 1 <= limit <= 1000:
            raise WeexError(-1140, "Parameter validation failed. limit must be between 1 and 1000.")
        now = self._sync()
        k = self.series.closed_count(now)
        forming = self.series.index_at(now)
        n_closed = limit - 1 if forming is not None else limit
        rows = [self._kline_row(self.series.row(i)) for i in range(max(0, k - n_closed), k)]
        if forming is not None:
            rows.append(self._kline_row(self.series.partial(forming, now)))
        return _json(rows)

    async def _history_klines(self, request: web.Request) -> web.Response:
        params = dict(request.query)
        self._symbol(params)
        self._check_interval(params)
        now = self._sync()
        bar = self.series.bar_ms
        limit = self._int(params, "limit", 100)
        assert limit is not None
        if not 1 <= limit <= 100:
            raise WeexError(-1140, "Parameter validation failed. limit must be between 1 and 100.")
        end = self._int(params, "endTime", now)
        assert end is not None
        start = self._int(params, "startTime", end - limit * bar)
        assert start is not None
        if start > end:
            raise WeexError(-1171, "startTime cannot be greater than endTime.")
        k = self.series.closed_count(now)
        lo = int(np.searchsorted(self.series.ts, start, side="left"))
        hi = min(k, int(np.searchsorted(self.series.ts, end, side="right")))
        rows = [self._kline_row(self.series.row(i)) for i in range(lo, min(hi, lo + limit))]
        return _json(rows)

    def _ticker_json(self, now: int) -> dict[str, Any]:
        s, p = self.series, self.market.price_precision
        k = s.closed_count(now)
        day = max(1, 86_400_000 // s.bar_ms)
        lo_i = max(0, k - day)
        rows = [s.row(i) for i in range(lo_i, k)]
        forming = s.index_at(now)
        if forming is not None:
            rows.append(s.partial(forming, now))
        last = s.last_price(now)
        first_open = s.dec(rows[0][1]) if rows else last
        high = max((r[2] for r in rows), default=float(last))
        low = min((r[3] for r in rows), default=float(last))
        volume = sum(r[5] for r in rows)
        change = last - first_open
        return {
            "symbol": self.market.symbol,
            "priceChange": fmt(change, p),
            "priceChangePercent": format((change / first_open).quantize(Decimal("0.000001")), "f"),
            "lastPrice": fmt(last, p),
            "openPrice": fmt(first_open, p),
            "highPrice": fmt(s.dec(high), p),
            "lowPrice": fmt(s.dec(low), p),
            "volume": format(Decimal(repr(volume)).quantize(Decimal("0.001")), "f"),
            "quoteVolume": format((Decimal(repr(volume)) * last).quantize(Decimal("0.01")), "f"),
            "openTime": now - 86_400_000,
            "closeTime": now,
            "markPrice": fmt(last, p),
            "indexPrice": fmt(last, p),
        }

    async def _ticker(self, request: web.Request) -> web.Response:
        symbol = self._symbol(dict(request.query), required=False)
        ticker = self._ticker_json(self._sync())
        return _json(ticker if symbol else [ticker])

    def _premium_json(self, now: int) -> dict[str, Any]:
        p = self.market.price_precision
        last = self.series.last_price(now)
        nxt, next_rate = self.engine.funding.next_after(now)
        prev = self.engine.funding.last_at(now)
        return {
            "symbol": self.market.symbol,
            "markPrice": fmt(last, p),
            "indexPrice": fmt(last, p),
            "forecastFundingRate": format(next_rate, "f"),
            "lastFundingRate": format(prev[1] if prev else next_rate, "f"),
            "interestRate": "0.0001",
            "nextFundingTime": nxt,
            "time": now,
            "collectCycle": 480,
        }

    async def _premium_index(self, request: web.Request) -> web.Response:
        symbol = self._symbol(dict(request.query), required=False)
        entry = self._premium_json(self._sync())
        return _json(entry if symbol else [entry])

    async def _funding_rate(self, request: web.Request) -> web.Response:
        params = dict(request.query)
        self._symbol(params)
        now = self._sync()
        limit = self._int(params, "limit", 100)
        assert limit is not None
        if not 1 <= limit <= 1000:
            raise WeexError(-1140, "Parameter validation failed. limit must be between 1 and 1000.")
        end = min(now, self._int(params, "endTime", now) or now)
        start = self._int(params, "startTime", None)
        events = self.engine.funding.between((start - 1) if start is not None else int(self.series.ts[0]), end)
        events = events[:limit] if start is not None else events[-limit:]
        p = self.market.price_precision
        return _json([{"symbol": self.market.symbol, "fundingRate": format(r, "f"), "fundingTime": t,
                       "markPrice": fmt(self.series.reference_price(t), p)} for t, r in events])
