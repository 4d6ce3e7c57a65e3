"""Candle validation: the single gate between raw market data and every stage after it.

A bad candle (NaN from a broken parser, a zero price from an exchange hiccup, a duplicate or
out-of-order bar after a reconnect) would otherwise flow into features and the policy and turn
into a real order.  The validator is pure apart from remembering the last *accepted* timestamp,
so a rejected candle can never move the stream's notion of "now", and the same rules are
available in vectorised form (:func:`valid_mask`) for backtests and feature warm-up, which must
see exactly the candles the live daemon would have accepted.
"""

from __future__ import annotations

import collections
import math

import numpy as np

from alphapulse.domain import Candle

NON_FINITE = "non_finite"
NON_POSITIVE_PRICE = "non_positive_price"
HIGH_BELOW_LOW = "high_below_low"
OPEN_OUTSIDE_RANGE = "open_outside_range"
CLOSE_OUTSIDE_RANGE = "close_outside_range"
NEGATIVE_VOLUME = "negative_volume"
MISALIGNED_TS = "misaligned_ts"
DUPLICATE_TS = "duplicate_ts"
OUT_OF_ORDER_TS = "out_of_order_ts"

#: Every reason code :meth:`CandleValidator.check` can return, in the order the checks run.
REJECT_REASONS: tuple[str, ...] = (
    NON_FINITE,
    NON_POSITIVE_PRICE,
    HIGH_BELOW_LOW,
    OPEN_OUTSIDE_RANGE,
    CLOSE_OUTSIDE_RANGE,
    NEGATIVE_VOLUME,
    MISALIGNED_TS,
    DUPLICATE_TS,
    OUT_OF_ORDER_TS,
)


def content_problem(c: Candle, timeframe_ms: int) -> str | None:
    """Reason code for a candle that is wrong on its own (independent of the stream), else None.

    Split from the ordering checks so the rules can be reused without a validator's state.
    Non-finite comes first because every later comparison is meaningless on NaN.
    """
    if not all(math.isfinite(x) for x in (c.ts, c.open, c.high, c.low, c.close, c.volume)):
        return NON_FINITE
    if c.open <= 0 or c.high <= 0 or c.low <= 0 or c.close <= 0:
        return NON_POSITIVE_PRICE
    if c.high < c.low:
        return HIGH_BELOW_LOW
    if not c.low <= c.open <= c.high:
        return OPEN_OUTSIDE_RANGE
    if not c.low <= c.close <= c.high:
        return CLOSE_OUTSIDE_RANGE
    if c.volume < 0:
        return NEGATIVE_VOLUME
    if c.ts % timeframe_ms != 0:
        return MISALIGNED_TS
    return None


class CandleValidator:
    """Accepts or rejects candles of one stream and counts why.

    Stateful only for the previous accepted timestamp (to catch duplicates, reordering and
    gaps); pass ``last_ts`` after a restart so the first new candle is checked against the
    last one already decided.
    """

    def __init__(self, timeframe_ms: int, last_ts: int | None = None) -> None:
        if timeframe_ms <= 0:
            raise ValueError(f"timeframe_ms must be > 0, got {timeframe_ms}")
        self.timeframe_ms = timeframe_ms
        self.last_ts: int | None = last_ts
        #: Missing bars between the previous accepted candle and the last checked one (0 when
        #: contiguous or rejected), so the caller can log a gap right after ``check``.
        self.last_gap_bars = 0
        self.rejected: collections.Counter[str] = collections.Counter()
        self.accepted = 0
        self.gaps = 0
        self.missing_bars = 0

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def check(self, c: Candle) -> str | None:
        """None if ``c`` is accepted (and becomes the previous candle), else a reason code."""
        self.last_gap_bars = 0
        reason = content_problem(c, self.timeframe_ms)
        if reason is None and self.last_ts is not None:
            if c.ts == self.last_ts:
                reason = DUPLICATE_TS
            elif c.ts < self.last_ts:
                reason = OUT_OF_ORDER_TS
        if reason is not None:
            self.rejected[reason] += 1
            return reason
        if self.last_ts is not None:
            missing = (c.ts - self.last_ts) // self.timeframe_ms - 1
            if missing > 0:
                self.last_gap_bars = int(missing)
                self.gaps += 1
                self.missing_bars += int(missing)
        self.last_ts = int(c.ts)
        self.accepted += 1
        return None

    def stats(self) -> dict[str, object]:
        """Counters as plain JSON-able values (for /health and logs)."""
        return {
            "accepted": self.accepted,
            "rejected": dict(self.rejected),
            "gaps": self.gaps,
            "missing_bars": self.missing_bars,
            "last_ts": self.last_ts,
        }


def valid_mask(columns: dict[str, np.ndarray], timeframe_ms: int, last_ts: int | None = None) -> np.ndarray:
    """Boolean mask of the rows a :class:`CandleValidator` fed them in order would accept.

    Vectorised so a 500k-row backtest or a warm-up lookup does not loop in Python.  Ordering
    works without a loop because accepted timestamps strictly increase: the last accepted ts
    before row i equals the running max of the ts of content-valid rows before it (a
    content-valid row that was rejected for ordering has ts <= that max, so it cannot raise it).
    """
    ts = np.asarray(columns["ts"], dtype=np.int64)
    o, h, lo, c, v = (np.asarray(columns[k], dtype=np.float64) for k in ("open", "high", "low", "close", "volume"))
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(o) & np.isfinite(h) & np.isfinite(lo) & np.isfinite(c) & np.isfinite(v)
        ok &= (o > 0) & (h > 0) & (lo > 0) & (c > 0)
        ok &= (h >= lo) & (lo <= o) & (o <= h) & (lo <= c) & (c <= h) & (v >= 0)
    ok &= ts % timeframe_ms == 0
    floor = np.iinfo(np.int64).min
    start = floor if last_ts is None else last_ts
    candidates = np.where(ok, ts, floor)
    prev_max = np.maximum.accumulate(np.concatenate(([start], candidates[:-1]))) if len(ts) else candidates
    result: np.ndarray = ok & (ts > prev_max)
    return result
