"""Bounded-memory latency statistics and Prometheus text exposition.

A long-running bot must not keep every sample: :class:`LatencyHistogram` has fixed log-spaced buckets
(about 4 % wide), so p50/p99 over millions of candles cost a few kilobytes, forever.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

_GROWTH = 1.04
_MIN_US = 0.5
_N_BUCKETS = 400  # 0.5 µs .. ~3e6 µs


class LatencyHistogram:
    """Log-bucketed histogram of microsecond durations; quantiles are accurate to a bucket width."""

    __slots__ = ("count", "counts", "max", "total")

    def __init__(self) -> None:
        self.counts = [0] * _N_BUCKETS
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

    def summary(self) -> dict[str, float]:
        return {
            "count": self.count,
            "p50": round(self.quantile(0.5), 2),
            "p99": round(self.quantile(0.99), 2),
            "max": round(self.max, 2),
            "mean": round(self.total / self.count, 2) if self.count else 0.0,
        }


def prometheus_text(samples: Iterable[tuple[str, str, str, dict[str, str], float]]) -> str:
    """Render ``(name, type, help, labels, value)`` samples in the Prometheus text format 0.0.4."""
    lines: list[str] = []
    seen: set[str] = set()
    for name, typ, help_, labels, value in samples:
        if name not in seen:
            seen.add(name)
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {typ}")
        if labels:
            lab = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
            lines.append(f"{name}{{{lab}}} {_num(value)}")
        else:
            lines.append(f"{name} {_num(value)}")
    return "\n".join(lines) + "\n"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))
