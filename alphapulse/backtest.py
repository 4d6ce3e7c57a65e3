"""Backtests through the daemon's own pipeline step, with a simulated clock.

The driver is the only thing that differs from the daemon: candles come from a file, the clock is the
candle's close time and the files are written buffered.  Every rule (features, policy call, confidence
threshold, risk limits, next-open fills, fees, slippage, accounting) is :class:`alphapulse.engine.Engine`'s,
so a backtest trades exactly what a paper run of the daemon over the same candles trades
(tests/test_backtest.py checks it).  A run ends flat: the last position is closed at the last close, so
the sum of ``pnl`` in its trades.csv equals final minus initial equity to the cent.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from alphapulse.builder import build_engine, policy_cadence, policy_feature_set
from alphapulse.config import Settings
from alphapulse.domain import CASH_FLOW_SIDES, TIMEFRAME_MS, Candle
from alphapulse.engine import Cadence, DecisionPolicy, StepResult
from alphapulse.features import FeatureSet, FeatureSource, PrecomputedFeatures
from alphapulse.funding import DEFAULT_FUNDING_RATE, FundingSchedule
from alphapulse.market.validate import valid_mask
from alphapulse.performance import FillRecord, summarize
from alphapulse.store import OperatorFiles, RowIds, build_rows
from alphapulse.timeutil import iso_ms, parse_utc_ms

_NAME = re.compile(r"^(?P<base>[A-Z0-9]+)_(?P<quote>[A-Z0-9]+)(?:_[A-Z0-9]+)?-(?P<tf>\d+[mhd])(?:-[a-z]+)?$")


#: What a summary says when no funding file was given.
DEFAULT_FUNDING_SOURCE = f"default rate {DEFAULT_FUNDING_RATE} per 8 h (00/08/16 UTC)"


class BacktestError(Exception):
    """A problem with the backtest's inputs (data, period, timeframe), stated for the user."""


def infer_market(path: Path, ts: np.ndarray) -> tuple[str, str]:
    """Symbol and timeframe from a shared/data file name (``BTC_USDT-1h.csv.gz``), else from the data."""
    stem = path.name
    for suffix in (".gz", ".csv"):
        stem = stem.removesuffix(suffix)
    m = _NAME.match(stem)
    if m and m["tf"] in TIMEFRAME_MS:
        return f"{m['base']}{m['quote']}", m["tf"]
    if len(ts) < 2:
        raise BacktestError(f"{path}: cannot infer the timeframe from fewer than 2 candles")
    step = int(np.median(np.diff(ts)))
    for tf, ms in TIMEFRAME_MS.items():
        if ms == step:
            return stem.upper(), tf
    raise BacktestError(f"{path}: candle spacing {step} ms is not a known timeframe")


def parse_time(text: str, flag: str) -> int:
    """ISO date or datetime (UTC when no zone) -> ms (:func:`alphapulse.timeutil.parse_utc_ms`), as a
    :class:`BacktestError` naming ``flag`` when it is not one."""
    try:
        return parse_utc_ms(text)
    except ValueError as e:
        raise BacktestError(f"{flag}: {e}") from None


def select(cols: dict[str, np.ndarray], start_ms: int | None, end_ms: int | None, bar_ms: int) -> dict[str, np.ndarray]:
    """Valid candles (the daemon's validation) whose bar lies in [start, end)."""
    keep = valid_mask(cols, bar_ms)
    ts = cols["ts"]
    if start_ms is not None:
        keep &= ts >= start_ms
    if end_ms is not None:
        keep &= ts < end_ms
    return {k: v[keep] for k, v in cols.items()}


@dataclass
class BacktestResult:
    symbol: str
    timeframe: str
    candles: int
    start_ms: int
    end_ms: int
    initial_equity: Decimal
    final_equity: Decimal
    fees: Decimal
    realized_pnl: Decimal
    funding: Decimal  # net funding booked (signed like trades.csv's pnl: negative = paid)
    funding_source: str  # where the rates came from, stated in the summary
    metrics: dict[str, float]
    elapsed_s: float
    equity: np.ndarray = field(repr=False)
    position: np.ndarray = field(repr=False)
    fills: list[FillRecord] = field(repr=False, default_factory=list)
    out_dir: Path | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "symbol": self.symbol, "timeframe": self.timeframe, "candles": self.candles,
            "from": iso_ms(self.start_ms), "to": iso_ms(self.end_ms),
            "initial_equity": str(self.initial_equity), "final_equity": str(self.final_equity),
            "pnl": str(self.final_equity - self.initial_equity), "fees": str(self.fees),
            "realized_pnl": str(self.realized_pnl), "funding": str(self.funding),
            "funding_source": self.funding_source, "metrics": self.metrics,
            "candles_per_s": round(self.candles / self.elapsed_s, 1) if self.elapsed_s > 0 else None,
            "out_dir": str(self.out_dir) if self.out_dir else None,
        }


def run_backtest(
    policy: DecisionPolicy,
    cols: dict[str, np.ndarray],
    settings: Settings,
    *,
    symbol: str,
    timeframe: str,
    out_dir: Path | None = None,
    action_meanings: tuple[str, ...] = (),
    streaming_features: bool = False,
    funding: FundingSchedule | None = None,
    funding_source: str | None = None,
    feature_set: FeatureSet | None = None,
    cadence: Cadence | None = None,
) -> BacktestResult:
    """Drive :class:`Engine` over ``cols`` (already selected and validated) and end flat.

    The features are the policy's feature set (``feature_set`` overrides it) in its batch form;
    ``streaming_features`` uses the daemon's streaming form instead (identical to 1e-9; the batch form is
    faster).  ``funding`` books simulated funding (None: none; the CLI always passes a schedule, the default
    rate when no file is given).  With ``out_dir`` the daemon's operator files are written there, plus
    ``equity.csv`` and ``summary.json``.
    """
    n = len(cols["ts"])
    if n == 0:
        raise BacktestError("no candles in the selected period")
    bar_ms = TIMEFRAME_MS[timeframe]
    fs = feature_set if feature_set is not None else policy_feature_set(policy)
    if fs.timeframe is not None and fs.timeframe != timeframe:
        raise BacktestError(f"feature set {fs.name} is defined on {fs.timeframe} bars, the data is {timeframe}")
    feats: FeatureSource = fs.streaming() if streaming_features else PrecomputedFeatures(
        fs.batch(cols["open"], cols["high"], cols["low"], cols["close"], cols["volume"]))
    try:
        engine = build_engine(settings, policy, symbol=symbol, timeframe=timeframe, features=feats, feature_set=fs,
                              cadence=cadence if cadence is not None else policy_cadence(policy), funding=funding)
    except ValueError as e:
        raise BacktestError(str(e)) from None
    if funding_source is None:
        funding_source = "none" if funding is None else DEFAULT_FUNDING_SOURCE
    files = OperatorFiles(out_dir, buffered=True) if out_dir is not None else None
    ids = RowIds()
    reasons: dict[str, str] = {}
    equity = np.empty(n + 1)
    position = np.empty(n + 1)
    fills: list[FillRecord] = []
    pf = engine.portfolio
    ts, o, h, lo, c, v = (cols[k].tolist() for k in ("ts", "open", "high", "low", "close", "volume"))
    eq_lines: list[bytes] = []

    def record(res: StepResult, i: int, t_ms: int) -> None:
        for order in res.orders:
            reasons[order.client_order_id] = order.reason
        for f in res.fills:
            if f.side in CASH_FLOW_SIDES:  # funding: in the equity curve and the ledger, not a trade
                continue
            fills.append(FillRecord(float(f.realized_pnl - f.fee), float(f.fee), float(f.qty * f.price),
                                    f.realized_pnl != 0))
        eq = pf.equity
        equity[i] = float(eq)
        position[i] = float(pf.position.qty)
        if files is not None:
            rows = build_rows(res, ids, str(eq), str(pf.position.qty))
            files.write(rows, reasons, action_meanings, bar_ms)
            eq_lines.append(f"{iso_ms(t_ms)},{eq},{pf.position.qty},{pf.mark_price}\n".encode())

    t0 = time.perf_counter()
    step = engine.step
    # float() of a Decimal goes through its digits; between fills (and always while flat) equity and quantity
    # are the same objects from bar to bar, so convert only when they were replaced.
    last_eq, last_eq_f, last_q, last_q_f = None, 0.0, None, 0.0
    for i, candle in enumerate(map(Candle, ts, o, h, lo, c, v)):
        res = step(candle)
        if files is None and not res.fills:  # the common case, inline: no files, nothing booked
            eq, q = pf.equity, pf.position.qty
            if eq is not last_eq:
                last_eq, last_eq_f = eq, float(eq)
            if q is not last_q:
                last_q, last_q_f = q, float(q)
            equity[i] = last_eq_f
            position[i] = last_q_f
            continue
        record(res, i, candle.ts + bar_ms)
    # End flat: close what is left at the last close (the next price a live run would get), with costs.
    last_close_ms = ts[-1] + bar_ms
    record(engine.close_out(last_close_ms, c[-1], "end_of_backtest"), n, last_close_ms)
    elapsed = time.perf_counter() - t0

    metrics = summarize(equity, position, fills, bar_ms)
    result = BacktestResult(symbol, timeframe, n, ts[0], last_close_ms, pf.initial_equity, pf.equity, pf.fees_paid,
                            pf.realized_pnl, pf.funding, funding_source, metrics, elapsed, equity, position, fills,
                            out_dir)
    if files is not None and out_dir is not None:
        files.close()
        (out_dir / "equity.csv").write_bytes(b"timestamp,equity,position,price\n" + b"".join(eq_lines))
        (out_dir / "summary.json").write_bytes(orjson.dumps(result.summary(), option=orjson.OPT_INDENT_2))
    return result
