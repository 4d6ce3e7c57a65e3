"""Performance metrics for ``alphapulse evaluate``, the backtest summary and the daily/weekly reports.

Pure numpy, no I/O, so the same numbers come out of a backtest, a live report and a test.  The
ratios follow empyrical (empyrical-reloaded) exactly - ``tests/test_performance.py`` checks them
against it to 1e-9 on real BTC returns - because that is the definition quants reading a report
expect.  Two deliberate differences, both because every result ends up in JSON (reports, the
control API, ``evaluate --json``) where NaN and inf are not valid:

* where empyrical answers NaN (no data, zero dispersion, no drawdown) these return ``0.0``;
* where the true value is infinite (no downside, no losses) or beyond ``RATIO_CAP`` these
  saturate at ``±RATIO_CAP`` (1e6), which no real strategy reaches and reads as "unbounded".

Annualisation: crypto trades 24/7, so a year is ``365 * 86_400_000 / bar_ms`` bars (8760 for 1h,
105120 for 5m), not 252 trading days.  Risk-free rate and required return are 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "MS_PER_YEAR",
    "RATIO_CAP",
    "SUMMARY_KEYS",
    "FillRecord",
    "annual_return",
    "calmar_ratio",
    "drawdown_series",
    "max_drawdown",
    "periods_per_year",
    "returns_from_equity",
    "sharpe_ratio",
    "sortino_ratio",
    "summarize",
    "total_return",
    "trade_stats",
]

MS_PER_YEAR = 365 * 86_400_000
# Stand-in for +inf (no downside / no losses) and ceiling for absurd values (e.g. the CAGR of a
# two-bar window): large enough that no real strategy is clipped, finite so JSON accepts it.
RATIO_CAP = 1e6

SUMMARY_KEYS: tuple[str, ...] = (
    "total_return",
    "annual_return",
    "sharpe",
    "sortino",
    "max_drawdown",
    "calmar",
    "win_rate",
    "profit_factor",
    "trades",
    "exposure",
    "turnover",
    "fees",
    "final_equity",
    "initial_equity",
    "bars",
)

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class FillRecord:
    """One fill as the metrics need it.

    ``net_pnl`` is the realized PnL of the fill after its fee (an opening fill carries ``-fee``),
    ``notional`` is ``qty * price`` (its sign is ignored), ``closing`` is True when the fill
    reduced or closed a position - only those count for the win rate.
    """

    net_pnl: float
    fee: float
    notional: float
    closing: bool


# --------------------------------------------------------------------------- helpers


def _ratio(x: float) -> float:
    """A JSON-safe ratio: NaN -> 0.0, anything beyond ±RATIO_CAP (including inf) saturates."""
    if math.isnan(x):
        return 0.0
    return float(min(max(x, -RATIO_CAP), RATIO_CAP))


def _finite(x: float) -> float:
    """A JSON-safe money amount: non-finite -> 0.0 (money is never clipped)."""
    return float(x) if math.isfinite(x) else 0.0


def _as_array(values: npt.ArrayLike) -> FloatArray:
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _as_returns(returns: npt.ArrayLike) -> FloatArray:
    """Finite returns only: a NaN bar (e.g. a gap in a live equity curve) carries no information."""
    r = _as_array(returns)
    return r[np.isfinite(r)]


# --------------------------------------------------------------------------- basics


def periods_per_year(bar_ms: int) -> float:
    """Bars in a 365-day year (24/7 market).  ``ValueError`` for ``bar_ms <= 0``: that is a
    configuration bug, and a silent 0 would make every annualised number 0 without a trace."""
    if bar_ms <= 0:
        raise ValueError(f"bar_ms must be > 0, got {bar_ms}")
    return MS_PER_YEAR / bar_ms


def returns_from_equity(equity: npt.ArrayLike) -> FloatArray:
    """Simple per-bar returns ``e[t] / e[t-1] - 1`` (length ``n - 1``).

    A bar that starts from non-positive equity (a wiped-out account) has no defined return; it is
    0.0 so one liquidation does not turn every later statistic into NaN.
    """
    e = _as_array(equity)
    if e.size < 2:
        return np.zeros(0, dtype=np.float64)
    prev, cur = e[:-1], e[1:]
    out = np.zeros(e.size - 1, dtype=np.float64)
    ok = prev > 0
    np.divide(cur, prev, out=out, where=ok)
    out[ok] -= 1.0
    return out


def total_return(equity: npt.ArrayLike) -> float:
    """``e[-1] / e[0] - 1``; 0.0 for fewer than two bars or a non-positive start."""
    e = _as_array(equity)
    if e.size < 2 or not e[0] > 0:
        return 0.0
    return _ratio(float(e[-1] / e[0] - 1.0))


# --------------------------------------------------------------------------- ratios (empyrical semantics)


def annual_return(returns: npt.ArrayLike, ppy: float) -> float:
    """CAGR as ``empyrical.annual_return``: ``prod(1 + r) ** (ppy / n) - 1``.

    0.0 without returns.  A final wealth ``<= 0`` (account wiped out, possible with leverage) is
    -1.0: empyrical would raise a negative number to a fractional power and return NaN.
    """
    r = _as_returns(returns)
    if r.size == 0 or not ppy > 0:
        return 0.0
    ending = float(np.prod(1.0 + r))
    if ending <= 0:
        return -1.0
    with np.errstate(over="ignore"):
        growth = np.float64(ending) ** (ppy / r.size)
    return _ratio(float(growth) - 1.0)


def sharpe_ratio(returns: npt.ArrayLike, ppy: float) -> float:
    """Annualised Sharpe as ``empyrical.sharpe_ratio`` (rf 0): ``mean / std(ddof=1) * sqrt(ppy)``.

    0.0 for fewer than two returns or zero dispersion (empyrical: NaN / inf).  Zero dispersion is
    tested as ``max == min`` like empyrical, because the float std of identical values can be a
    1e-18 residue that would otherwise produce a meaningless 1e15 ratio.
    """
    r = _as_returns(returns)
    if r.size < 2 or not ppy > 0 or r.max() == r.min():
        return 0.0
    std = float(np.std(r, ddof=1))
    if not std > 0:
        return 0.0
    return _ratio(float(np.mean(r)) / std * math.sqrt(ppy))


def sortino_ratio(returns: npt.ArrayLike, ppy: float) -> float:
    """Annualised Sortino as ``empyrical.sortino_ratio`` (required return 0).

    ``mean(r) * ppy / (sqrt(mean(min(r, 0)**2)) * sqrt(ppy))`` - the downside deviation averages
    over ALL periods, not only losing ones.  0.0 for fewer than two returns (empyrical: NaN).
    With no downside empyrical returns inf (mean > 0) or NaN (mean == 0); here ``RATIO_CAP`` and
    0.0, since inf is not valid JSON.
    """
    r = _as_returns(returns)
    if r.size < 2 or not ppy > 0:
        return 0.0
    mean = float(np.mean(r))
    downside = np.minimum(r, 0.0)
    dd_risk = math.sqrt(float(np.mean(downside * downside))) * math.sqrt(ppy)
    if dd_risk == 0.0:
        return RATIO_CAP if mean > 0 else 0.0
    return _ratio(mean * ppy / dd_risk)


def drawdown_series(equity: npt.ArrayLike) -> FloatArray:
    """Fraction below the running peak at each bar (>= 0, same length as ``equity``).

    The first bar is the first peak, exactly as empyrical anchors its cumulative curve before the
    first return.  Bars whose running peak is not positive (no capital to draw down) are 0.
    """
    e = _as_array(equity)
    if e.size == 0:
        return np.zeros(0, dtype=np.float64)
    peak = np.fmax.accumulate(e)  # fmax: a NaN bar does not poison the peak
    out = np.zeros(e.size, dtype=np.float64)
    ok = np.isfinite(e) & (peak > 0)
    np.divide(peak - e, peak, out=out, where=ok)
    return out


def max_drawdown(equity: npt.ArrayLike) -> float:
    """Largest peak-to-trough fall as a POSITIVE fraction (0.12 = 12%).

    empyrical's ``max_drawdown`` takes returns and is negative: it equals ``-max_drawdown(equity)``.
    """
    dd = drawdown_series(equity)
    return float(dd.max()) if dd.size else 0.0


def _max_drawdown_of_returns(r: FloatArray) -> float:
    """Max drawdown of the wealth curve ``1, 1+r0, (1+r0)(1+r1), ...`` (how empyrical builds it)."""
    wealth = np.empty(r.size + 1, dtype=np.float64)
    wealth[0] = 1.0
    np.cumprod(1.0 + r, out=wealth[1:])
    return max_drawdown(wealth)


def calmar_ratio(returns: npt.ArrayLike, ppy: float) -> float:
    """``annual_return / max_drawdown`` as ``empyrical.calmar_ratio``; 0.0 when there is no drawdown
    (empyrical: NaN)."""
    r = _as_returns(returns)
    if r.size == 0 or not ppy > 0:
        return 0.0
    mdd = _max_drawdown_of_returns(r)
    if not mdd > 0:
        return 0.0
    return _ratio(annual_return(r, ppy) / mdd)


# --------------------------------------------------------------------------- trades


def trade_stats(net_pnls: Sequence[float], closing: Sequence[bool]) -> dict[str, float]:
    """Win rate and profit factor over fills.

    ``win_rate``: share of CLOSING fills with net PnL > 0 (an opening fill only pays a fee, so
    counting it would make every round trip half a loss); 0.0 with no closing fill.
    ``profit_factor``: gross profit / |gross loss| over ALL fills, so opening fees count as losses;
    0.0 with neither, ``RATIO_CAP`` with profit but no loss.
    """
    if len(net_pnls) != len(closing):
        raise ValueError(f"net_pnls ({len(net_pnls)}) and closing ({len(closing)}) differ in length")
    pnl = _as_array(net_pnls)
    pnl = np.where(np.isfinite(pnl), pnl, 0.0)
    is_closing = np.asarray(closing, dtype=bool).reshape(-1)

    n_closing = int(is_closing.sum())
    win_rate = float((pnl[is_closing] > 0).sum()) / n_closing if n_closing else 0.0

    profit = float(pnl[pnl > 0].sum())
    loss = float(-pnl[pnl < 0].sum())
    if loss > 0:
        profit_factor = _ratio(profit / loss)
    else:
        profit_factor = RATIO_CAP if profit > 0 else 0.0
    return {"win_rate": win_rate, "profit_factor": profit_factor}


# --------------------------------------------------------------------------- summary


def summarize(
    equity: npt.ArrayLike,
    position: npt.ArrayLike,
    fills: Sequence[FillRecord],
    bar_ms: int,
) -> dict[str, float]:
    """Every headline number of a run, keyed exactly as ``SUMMARY_KEYS``; all values finite.

    ``equity``: mark-to-market equity at each bar close.  ``position``: signed position qty at each
    bar close (same length; ``ValueError`` otherwise - a misaligned exposure would be silently
    wrong).  ``trades`` and ``bars`` are ints, everything else a float.  ``turnover`` is traded
    notional in multiples of the starting equity (0.0 if that is not positive).
    """
    e = _as_array(equity)
    pos = _as_array(position)
    if pos.size != e.size:
        raise ValueError(f"position ({pos.size}) and equity ({e.size}) must have one value per bar")
    ppy = periods_per_year(bar_ms)
    r = returns_from_equity(e)
    stats = trade_stats([f.net_pnl for f in fills], [f.closing for f in fills])
    initial = _finite(float(e[0])) if e.size else 0.0
    notional = sum(abs(f.notional) for f in fills)
    out: dict[str, float] = {
        "total_return": total_return(e),
        "annual_return": annual_return(r, ppy),
        "sharpe": sharpe_ratio(r, ppy),
        "sortino": sortino_ratio(r, ppy),
        "max_drawdown": max_drawdown(e),
        "calmar": calmar_ratio(r, ppy),
        "win_rate": stats["win_rate"],
        "profit_factor": stats["profit_factor"],
        "trades": len(fills),
        "exposure": float(np.count_nonzero(pos != 0)) / pos.size if pos.size else 0.0,
        "turnover": _finite(notional / initial) if initial > 0 else 0.0,
        "fees": _finite(float(sum(f.fee for f in fills))),
        "final_equity": _finite(float(e[-1])) if e.size else 0.0,
        "initial_equity": initial,
        "bars": int(e.size),
    }
    return out
