"""Bounded-memory latency statistics.

A long-running bot must not keep every sample: :class:`LatencyHistogram` has fixed log-spaced buckets
(about 4 % wide), so p50/p99 over millions of candles cost a few kilobytes, forever.  It also counts the same
samples on :data:`PROM_LE_US`, the fixed ladder the Prometheus histograms expose, so a scrape reads exact
``le`` counts instead of re-binning log buckets whose edges never coincide with the ladder's.
"""

from __future__ import annotations

import math
from bisect import bisect_left

_GROWTH = 1.04
_MIN_US = 0.5
_N_BUCKETS = 400  # 0.5 µs .. ~3e6 µs

#: Upper bounds (µs, inclusive as Prometheus' ``le``) of the exported histogram buckets: 10 µs .. 10 s in
#: 1-2.5-5 steps, so the alert thresholds (inference 500 ms / 1 s, API 1 s / 5 s) are bucket edges and the
#: sub-millisecond candle path still has several buckets for ``histogram_quantile``.  ``+Inf`` is implicit.
PROM_LE_US: tuple[float, ...] = (
    10.0, 25.0, 50.0, 100.0, 250.0, 500.0,
    1e3, 2.5e3, 5e3, 1e4, 2.5e4, 5e4,
    1e5, 2.5e5, 5e5, 1e6, 2.5e6, 5e6, 1e7,
)


class LatencyHistogram:
    """Log-bucketed histogram of microsecond durations; quantiles are accurate to a bucket width."""

    __slots__ = ("count", "counts", "le_counts", "max", "total")

    def __init__(self) -> None:
        self.counts = [0] * _N_BUCKETS
        self.le_counts = [0] * (len(PROM_LE_US) + 1)  # per ladder step (not cumulative); last: above 10 s
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    @staticmethod
    def _bucket(us: float) -> int:
        if us <= _MIN_US:
            return 0
        return min(_N_BUCKETS - 1, int(math.log(us / _MIN_US) / math.log(_GROWTH)) + 1)

    @staticmethod
    def _upper(i: int) -> float:
        return _MIN_US * _GROWTH**i

    def add(self, us: float) -> None:
        self.counts[self._bucket(us)] += 1
        self.le_counts[bisect_left(PROM_LE_US, us)] += 1  # first edge >= us: counted where us <= le
        self.count += 1
        self.total += us
        if us > self.max:
            self.max = us

    def quantile(self, q: float) -> float:
        """Upper edge of the bucket holding quantile ``q`` (0 when empty), capped at the observed max."""
        if self.count == 0:
            return 0.0
        rank = q * self.count
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank and c:
                return min(self._upper(i), self.max)
        return self.max

    def cumulative(self) -> tuple[list[int], float]:
        """Cumulative counts at each :data:`PROM_LE_US` edge then ``+Inf`` (which equals :attr:`count`), and the
        sum of all samples in µs: a Prometheus histogram's ``_bucket`` and ``_sum``, read in one go."""
        out: list[int] = []
        seen = 0
        for c in self.le_counts:
            seen += c
            out.append(seen)
        return out, self.total

    def summary(self) -> dict[str, float]:
        return {
            "count": self.count,
            "p50": round(self.quantile(0.5), 2),
            "p99": round(self.quantile(0.99), 2),
            "max": round(self.max, 2),
            "mean": round(self.total / self.count, 2) if self.count else 0.0,
        }
