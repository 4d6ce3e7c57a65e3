"""alphapulse.performance against empyrical on real BTC returns, plus hand-computed and degenerate cases.

Every equity curve here comes from the bundled real candles (``alphapulse/data/BTC_USDT_USDT-5m.csv.gz``):
buy-and-hold of half the capital over the whole file (5m and resampled to 1h), 2,000-bar windows that
rise, fall and drift, and a long/short moving-average strategy with fees whose fills feed ``summarize``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from alphapulse.performance import (
    RATIO_CAP,
    SUMMARY_KEYS,
    FillRecord,
    annual_return,
    calmar_ratio,
    drawdown_series,
    max_drawdown,
    periods_per_year,
    returns_from_equity,
    sharpe_ratio,
    sortino_ratio,
    summarize,
    total_return,
    trade_stats,
)

ep: Any = pytest.importorskip("empyrical")

DATA_FILE = Path(__file__).resolve().parent.parent / "alphapulse" / "data" / "BTC_USDT_USDT-5m.csv.gz"
MS_5M = 300_000
MS_1H = 3_600_000
CAPITAL = 10_000.0
WINDOW = 2_000
REL = 1e-9

Array = npt.NDArray[np.float64]


# --------------------------------------------------------------------------- real curves


@pytest.fixture(scope="module")
def closes() -> Array:
    """Close prices of all bundled 5m bars; the file must be gap-free and start on an hour."""
    data = np.loadtxt(DATA_FILE, delimiter=",", skiprows=1, usecols=(0, 4))
    ts = data[:, 0].astype(np.int64)
    assert data.shape[0] > 50_000
    assert np.all(np.diff(ts) == MS_5M)
    assert ts[0] % MS_1H == 0
    return np.ascontiguousarray(data[:, 1])


def hold_half(prices: Array) -> Array:
    """Buy-and-hold with half the capital: the other half stays in cash."""
    qty = CAPITAL / 2 / prices[0]
    return CAPITAL / 2 + qty * prices


def ma_strategy(
    prices: Array, lookback: int = 288, band: float = 0.01, fee_rate: float = 0.0005
) -> tuple[Array, Array, list[FillRecord]]:
    """Trend-following with hysteresis: go long above the trailing mean + band, short below it - band,
    go flat when the price crosses back over the mean; taker fees on notional, trades at the close.

    A reversal is booked as two fills (close, then open) so every fill is purely opening or closing.
    The position is flattened on the last bar, so the fills' net PnL reconciles to the equity change.
    """
    qty_unit = CAPITAL * 0.5 / prices[0]
    csum = np.concatenate(([0.0], np.cumsum(prices)))
    equity = np.empty(prices.size)
    position = np.zeros(prices.size)
    fills: list[FillRecord] = []
    cash, pos, entry = CAPITAL, 0.0, 0.0
    for t, price in enumerate(prices):
        price = float(price)
        target = pos
        if t < lookback or t == prices.size - 1:
            target = 0.0
        else:
            mean = (csum[t + 1] - csum[t + 1 - lookback]) / lookback
            if price > mean * (1 + band):
                target = qty_unit
            elif price < mean * (1 - band):
                target = -qty_unit
            elif (pos > 0 and price < mean) or (pos < 0 and price > mean):
                target = 0.0
        if target != pos and pos != 0.0:  # close the current position
            fee = abs(pos) * price * fee_rate
            pnl = pos * (price - entry) - fee
            cash += pnl
            fills.append(FillRecord(net_pnl=pnl, fee=fee, notional=abs(pos) * price, closing=True))
            pos = 0.0
        if target != pos:  # open the new one
            fee = abs(target) * price * fee_rate
            cash -= fee
            fills.append(FillRecord(net_pnl=-fee, fee=fee, notional=abs(target) * price, closing=False))
            pos, entry = target, price
        position[t] = pos
        equity[t] = cash + pos * (price - entry)
    return equity, position, fills


@pytest.fixture(scope="module")
def window_starts(closes: Array) -> dict[str, int]:
    """Start index of the most falling, most rising and one middling 2,000-bar window."""
    starts = np.arange(0, closes.size - WINDOW, WINDOW)
    moves = closes[starts + WINDOW - 1] / closes[starts] - 1
    chosen = {
        "falling": int(starts[np.argmin(moves)]),
        "rising": int(starts[np.argmax(moves)]),
        "middle": int(starts[np.argsort(moves)[moves.size // 2]]),
    }
    assert moves.min() < -0.05 < 0.05 < moves.max()
    return chosen


@pytest.fixture(scope="module")
def curves(closes: Array, window_starts: dict[str, int]) -> dict[str, Array]:
    out = {
        "hold_5m_full": hold_half(closes),
        "hold_1h_full": hold_half(closes[11::12]),  # close of the last 5m bar of each hour
        "ma_strategy_5m_full": ma_strategy(closes)[0],
    }
    for name, start in window_starts.items():
        out[f"hold_5m_{name}"] = hold_half(closes[start : start + WINDOW])
    out["ma_strategy_5m_falling"] = ma_strategy(closes[window_starts["falling"] : window_starts["falling"] + WINDOW])[0]
    return out


CURVE_NAMES = [
    "hold_5m_full",
    "hold_1h_full",
    "ma_strategy_5m_full",
    "hold_5m_falling",
    "hold_5m_rising",
    "hold_5m_middle",
    "ma_strategy_5m_falling",
]


# --------------------------------------------------------------------------- against empyrical


@pytest.mark.parametrize("bar_ms", [MS_5M, MS_1H], ids=["ppy5m", "ppy1h"])
@pytest.mark.parametrize("name", CURVE_NAMES)
def test_ratios_match_empyrical_on_real_returns(curves: dict[str, Array], name: str, bar_ms: int) -> None:
    equity = curves[name]
    ppy = periods_per_year(bar_ms)
    r = returns_from_equity(equity)
    assert r.size == equity.size - 1

    expected_mdd = ep.max_drawdown(r)
    assert expected_mdd < 0  # every chosen curve has a real drawdown
    assert max_drawdown(equity) == pytest.approx(abs(expected_mdd), rel=REL)

    checks = {
        "annual_return": (annual_return(r, ppy), ep.annual_return(r, annualization=ppy)),
        "sharpe": (sharpe_ratio(r, ppy), ep.sharpe_ratio(r, annualization=ppy)),
        "sortino": (sortino_ratio(r, ppy), ep.sortino_ratio(r, annualization=ppy)),
        "calmar": (calmar_ratio(r, ppy), ep.calmar_ratio(r, annualization=ppy)),
    }
    for metric, (ours, theirs) in checks.items():
        assert math.isfinite(theirs) and theirs != 0.0, (metric, theirs)
        assert abs(theirs) < RATIO_CAP, (metric, theirs)  # the comparison is not hiding a saturation
        assert ours == pytest.approx(theirs, rel=REL), metric
        assert type(ours) is float


def test_falling_window_has_negative_return_and_ratios(curves: dict[str, Array]) -> None:
    equity = curves["hold_5m_falling"]
    ppy = periods_per_year(MS_5M)
    r = returns_from_equity(equity)
    assert total_return(equity) < -0.025
    assert annual_return(r, ppy) < 0
    assert sharpe_ratio(r, ppy) < 0
    assert sortino_ratio(r, ppy) < 0
    assert calmar_ratio(r, ppy) < 0
    assert max_drawdown(equity) > 0.025


def test_total_return_is_last_over_first(curves: dict[str, Array]) -> None:
    equity = curves["hold_5m_full"]
    assert total_return(equity) == pytest.approx(equity[-1] / equity[0] - 1, rel=1e-15)
    assert total_return(equity) == pytest.approx(ep.cum_returns_final(returns_from_equity(equity)), rel=REL)


def test_drawdown_series_matches_empyrical(curves: dict[str, Array]) -> None:
    equity = curves["ma_strategy_5m_full"]
    dd = drawdown_series(equity)
    assert dd.shape == equity.shape
    assert dd[0] == 0.0 and np.all(dd >= 0)
    theirs = -ep.stats.drawdown_series(returns_from_equity(equity))  # one per return: bars 1..n-1
    np.testing.assert_allclose(dd[1:], theirs, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- summarize on a real strategy


def test_summarize_real_strategy(closes: Array) -> None:
    equity, position, fills = ma_strategy(closes)
    s = summarize(equity, position, fills, MS_5M)
    assert tuple(s) == SUMMARY_KEYS
    assert set(s) == {
        "total_return", "annual_return", "sharpe", "sortino", "max_drawdown", "calmar", "win_rate",
        "profit_factor", "trades", "exposure", "turnover", "fees", "final_equity", "initial_equity", "bars",
    }  # fmt: skip
    json.dumps(s, allow_nan=False)

    assert s["bars"] == closes.size and type(s["bars"]) is int
    assert s["trades"] == len(fills) > 100 and type(s["trades"]) is int
    assert s["initial_equity"] == CAPITAL
    assert s["final_equity"] == equity[-1]
    # the strategy's books reconcile: net PnL of all fills is the whole equity change (flat at the end)
    assert position[-1] == 0.0
    assert sum(f.net_pnl for f in fills) == pytest.approx(equity[-1] - CAPITAL, abs=1e-6)
    assert s["fees"] == pytest.approx(sum(f.fee for f in fills), rel=1e-12) and s["fees"] > 0
    assert s["turnover"] == pytest.approx(sum(f.notional for f in fills) / CAPITAL, rel=1e-12)
    assert 0 < s["exposure"] < 1
    assert s["exposure"] == pytest.approx(np.count_nonzero(position) / position.size, rel=1e-12)
    closing_pnls = [f.net_pnl for f in fills if f.closing]
    assert s["win_rate"] == pytest.approx(sum(p > 0 for p in closing_pnls) / len(closing_pnls), rel=1e-12)
    assert 0 < s["win_rate"] < 1 and s["profit_factor"] > 0

    r = returns_from_equity(equity)
    ppy = periods_per_year(MS_5M)
    assert s["sharpe"] == pytest.approx(ep.sharpe_ratio(r, annualization=ppy), rel=REL)
    assert s["calmar"] == pytest.approx(ep.calmar_ratio(r, annualization=ppy), rel=REL)
    assert s["max_drawdown"] == pytest.approx(-ep.max_drawdown(r), rel=REL)


@pytest.mark.parametrize("name", CURVE_NAMES)
def test_summarize_is_json_safe_for_every_real_curve(curves: dict[str, Array], name: str) -> None:
    equity = curves[name]
    s = summarize(equity, np.ones_like(equity), [], MS_5M)
    assert tuple(s) == SUMMARY_KEYS
    assert all(math.isfinite(v) for v in s.values())
    json.dumps(s, allow_nan=False)
    assert s["exposure"] == 1.0


# --------------------------------------------------------------------------- hand-computed cases


def test_periods_per_year() -> None:
    assert periods_per_year(MS_1H) == 8760.0
    assert periods_per_year(MS_5M) == 105_120.0
    assert periods_per_year(86_400_000) == 365.0
    with pytest.raises(ValueError):
        periods_per_year(0)


def test_returns_and_drawdown_by_hand() -> None:
    np.testing.assert_allclose(returns_from_equity(np.array([100.0, 110.0, 99.0])), [0.1, -0.1], rtol=1e-15)
    assert returns_from_equity(np.array([100.0])).size == 0
    dd = drawdown_series(np.array([100.0, 120.0, 90.0, 120.0, 130.0, 65.0]))
    np.testing.assert_allclose(dd, [0.0, 0.0, 0.25, 0.0, 0.0, 0.5], rtol=1e-15)
    assert max_drawdown(np.array([100.0, 120.0, 90.0, 120.0, 130.0, 65.0])) == 0.5


def test_trade_stats_by_hand() -> None:
    # open (fee), win, open (fee), loss, open (fee), win
    pnls = [-1.0, 10.0, -0.5, -4.0, -0.5, 3.0]
    closing = [False, True, False, True, False, True]
    stats = trade_stats(pnls, closing)
    assert stats["win_rate"] == pytest.approx(2 / 3, rel=1e-15)
    assert stats["profit_factor"] == pytest.approx(13.0 / 6.0, rel=1e-15)


def test_trade_stats_edges() -> None:
    assert trade_stats([], []) == {"win_rate": 0.0, "profit_factor": 0.0}
    # only opening fills: no closed trade to win, fees are pure loss
    assert trade_stats([-1.0, -2.0], [False, False]) == {"win_rate": 0.0, "profit_factor": 0.0}
    # a break-even close is not a win; profit without any loss saturates instead of inf
    assert trade_stats([0.0, 5.0], [True, True]) == {"win_rate": 0.5, "profit_factor": RATIO_CAP}
    assert trade_stats([0.0], [True]) == {"win_rate": 0.0, "profit_factor": 0.0}
    with pytest.raises(ValueError):
        trade_stats([1.0], [True, False])


def test_summarize_by_hand() -> None:
    equity = np.array([1000.0, 1010.0, 990.0, 1030.0])
    position = np.array([0.0, 0.01, 0.01, 0.0])
    fills = [
        FillRecord(net_pnl=-0.5, fee=0.5, notional=500.0, closing=False),
        FillRecord(net_pnl=29.0, fee=0.52, notional=520.0, closing=True),
    ]
    s = summarize(equity, position, fills, MS_1H)
    assert tuple(s) == SUMMARY_KEYS
    assert s["total_return"] == pytest.approx(0.03, rel=1e-12)
    assert s["max_drawdown"] == pytest.approx(20.0 / 1010.0, rel=1e-12)
    assert s["trades"] == 2
    assert s["exposure"] == 0.5
    assert s["turnover"] == pytest.approx(1.02, rel=1e-12)
    assert s["fees"] == pytest.approx(1.02, rel=1e-12)
    assert s["win_rate"] == 1.0
    assert s["profit_factor"] == pytest.approx(58.0, rel=1e-12)
    assert (s["initial_equity"], s["final_equity"], s["bars"]) == (1000.0, 1030.0, 4)
    r = returns_from_equity(equity)
    assert 1.03 ** (8760 / 3) - 1 > RATIO_CAP  # +3% in three hours annualises to ~3e37
    assert s["annual_return"] == RATIO_CAP
    assert s["calmar"] == RATIO_CAP
    assert s["sharpe"] == pytest.approx(ep.sharpe_ratio(r, annualization=8760), rel=REL)
    assert s["sortino"] == pytest.approx(ep.sortino_ratio(r, annualization=8760), rel=REL)


def test_summarize_rejects_misaligned_position() -> None:
    with pytest.raises(ValueError):
        summarize(np.array([1.0, 2.0]), np.array([0.0]), [], MS_5M)


# --------------------------------------------------------------------------- degenerate cases


def _assert_zero_metrics(s: dict[str, float]) -> None:
    for key in SUMMARY_KEYS:
        if key not in ("final_equity", "initial_equity", "bars"):
            assert s[key] == 0.0, key
    json.dumps(s, allow_nan=False)


def test_flat_equity_is_all_zeros() -> None:
    equity = np.full(500, CAPITAL)
    s = summarize(equity, np.zeros(500), [], MS_5M)
    _assert_zero_metrics(s)
    assert (s["initial_equity"], s["final_equity"], s["bars"]) == (CAPITAL, CAPITAL, 500)
    # where empyrical has no answer (NaN), we report 0
    r = returns_from_equity(equity)
    assert math.isnan(ep.sharpe_ratio(r, annualization=8760)) or math.isinf(ep.sharpe_ratio(r, annualization=8760))
    assert math.isnan(ep.calmar_ratio(r, annualization=8760))


def test_single_bar_and_empty() -> None:
    s = summarize(np.array([CAPITAL]), np.array([0.0]), [], MS_5M)
    _assert_zero_metrics(s)
    assert (s["initial_equity"], s["final_equity"], s["bars"]) == (CAPITAL, CAPITAL, 1)
    s = summarize(np.array([]), np.array([]), [], MS_5M)
    _assert_zero_metrics(s)
    assert (s["initial_equity"], s["final_equity"], s["bars"]) == (0.0, 0.0, 0)
    empty = np.array([])
    ppy = periods_per_year(MS_5M)
    assert annual_return(empty, ppy) == sharpe_ratio(empty, ppy) == sortino_ratio(empty, ppy) == 0.0
    assert calmar_ratio(empty, ppy) == max_drawdown(empty) == total_return(empty) == 0.0
    one = np.array([0.01])  # empyrical: NaN for Sharpe/Sortino with fewer than two returns
    assert sharpe_ratio(one, ppy) == sortino_ratio(one, ppy) == 0.0


def test_zero_std_sharpe_is_zero() -> None:
    r = np.full(100, 0.001)
    ppy = periods_per_year(MS_1H)
    assert sharpe_ratio(r, ppy) == 0.0
    assert not math.isfinite(ep.sharpe_ratio(r, annualization=ppy))  # empyrical: inf


def test_no_downside_sortino_caps(closes: Array) -> None:
    # a real curve that never falls: the running maximum of BTC's close
    equity = hold_half(np.maximum.accumulate(closes[:WINDOW]))
    r = returns_from_equity(equity)
    ppy = periods_per_year(MS_5M)
    assert np.all(r >= 0) and r.mean() > 0
    assert math.isinf(ep.sortino_ratio(r, annualization=ppy))  # what we must not emit
    assert sortino_ratio(r, ppy) == RATIO_CAP
    assert max_drawdown(equity) == 0.0
    assert calmar_ratio(r, ppy) == 0.0  # empyrical: NaN
    assert sharpe_ratio(r, ppy) == pytest.approx(ep.sharpe_ratio(r, annualization=ppy), rel=REL)
    assert sortino_ratio(np.zeros(10), ppy) == 0.0  # no downside and no mean either
    json.dumps(summarize(equity, np.ones_like(equity), [], MS_5M), allow_nan=False)


def test_wiped_out_and_nan_equity_stay_finite() -> None:
    ppy = periods_per_year(MS_5M)
    wiped = np.array([1000.0, 500.0, 0.0, 0.0, 0.0])
    r = returns_from_equity(wiped)
    np.testing.assert_array_equal(r, [-0.5, -1.0, 0.0, 0.0])
    assert annual_return(r, ppy) == -1.0
    assert max_drawdown(wiped) == 1.0
    for equity in (wiped, np.array([1000.0, 900.0, -50.0, 10.0]), np.array([1000.0, np.nan, 990.0, 1010.0])):
        s = summarize(equity, np.ones_like(equity), [FillRecord(-1.0, 1.0, 100.0, False)], MS_5M)
        assert all(math.isfinite(v) for v in s.values()), s
        json.dumps(s, allow_nan=False)


def test_absurd_cagr_saturates() -> None:
    # +50% in two 5m bars annualises to ~1e9254: beyond float range, reported as the cap
    r = np.array([0.2, 0.25])
    assert annual_return(r, periods_per_year(MS_5M)) == RATIO_CAP
