"""Shared research code for issue 9: data loading, funding, features, the hourly cost-accurate simulator.

Costs follow the repo: taker 0.06 % + 2 bps slippage on traded notional, fills at the next bar's open,
funding at each funding event from ../shared/data/futures/*-funding_rate.csv.gz (0.01 %/8 h at
00/08/16 UTC outside the files' coverage), positive rate -> longs pay.
Prices: Binance *spot* 1h candles (perp 1h candles do not cover 2017-2019 and 2023-2024); spot and perp
trade within a few bps of each other, which is immaterial at daily cadence.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

DATA = os.environ.get("ALPHAPULSE_SHARED_DATA", str(Path(__file__).resolve().parents[3].parent / "shared" / "data"))
PAIRS = ("BTC", "ETH", "SOL", "BNB")
HOUR = 3_600_000
FEE = 0.0006
SLIP = 0.0002
COST = FEE + SLIP
DEFAULT_FUNDING = 0.0001
MAX_POS = 0.5  # max position notional / equity (risk.max_position_pct = 50)
BAND = 0.10  # rebalance band: skip same-side resizes smaller than 10 % of the max position
ANN = 8760


def load_pair(pair: str) -> pd.DataFrame:
    df = pd.read_csv(f"{DATA}/{pair}_USDT-1h.csv.gz")
    df = df.drop_duplicates("timestamp").set_index("timestamp").sort_index()
    grid = np.arange(df.index[0], df.index[-1] + HOUR, HOUR)
    out = df.reindex(grid)
    out["valid"] = out["close"].notna()
    out["close"] = out["close"].ffill()
    out["open"] = out["open"].fillna(out["close"])
    out.index.name = "timestamp"
    return out


def funding_per_bar(pair: str, ts: np.ndarray) -> np.ndarray:
    """Summed funding rate of the events in (ts[i-1], ts[i]] ... attributed to bar i whose *open* is ts[i]:
    events in (open_i, open_i + 1h] are paid by the position held during bar i (mirrors FundingSchedule
    over (t0, t1] with t0/t1 the bar's open/close)."""
    f = pd.read_csv(f"{DATA}/futures/{pair}_USDT_USDT-funding_rate.csv.gz")
    ev_ts = f["timestamp"].to_numpy(np.int64)
    ev_rate = f["funding_rate"].to_numpy(float)
    # coverage runs: a gap > 8h + 1min between events means "no file coverage" -> default schedule
    starts = [ev_ts[0]]
    ends = []
    for a, b in zip(ev_ts[:-1], ev_ts[1:]):
        if b - a > 8 * HOUR + 60_000:
            ends.append(a)
            starts.append(b)
    ends.append(ev_ts[-1])
    out = np.zeros(len(ts))
    bar_end = ts + HOUR
    # default events every 8h at 00/08/16 UTC, closing the bar (ts+1h) when (ts+1h) % 8h == 0
    default_ev = (bar_end % (8 * HOUR)) == 0
    covered = np.zeros(len(ts), bool)
    for s, e in zip(starts, ends):
        covered |= (bar_end >= s) & (bar_end <= e)
    out[default_ev & ~covered] = DEFAULT_FUNDING
    # file events: bar i gets events with open_i < t <= open_i + 1h
    idx = np.searchsorted(ts, ev_ts, side="left") - 1  # ts[idx] < t <= ts[idx+1]
    ok = (idx >= 0) & (idx < len(ts))
    np.add.at(out, idx[ok], ev_rate[ok])
    return out


# ------------------------------------------------------------------------------------- features
def trend_features(close: np.ndarray, valid: np.ndarray) -> dict[str, np.ndarray]:
    """Vol-normalised log returns over 1..90 days and vol regime, per hourly bar (uses closes <= t)."""
    lc = np.log(close)
    r = np.zeros_like(lc)
    r[1:] = np.diff(lc)
    s = pd.Series(r)
    out: dict[str, np.ndarray] = {}
    vol30 = s.rolling(720).std(ddof=0).to_numpy()
    vol7 = s.rolling(168).std(ddof=0).to_numpy()
    vol90 = s.rolling(2160).std(ddof=0).to_numpy()
    vol365 = s.rolling(8760, min_periods=2160).std(ddof=0).to_numpy()
    out["vol30_ann"] = vol30 * math.sqrt(ANN)
    out["vol7_ann"] = vol7 * math.sqrt(ANN)
    for d in (1, 3, 7, 14, 30, 60, 90, 180):
        n = 24 * d
        rr = np.full_like(lc, np.nan)
        rr[n:] = lc[n:] - lc[:-n]
        out[f"r{d}"] = rr
        out[f"z{d}"] = rr / (vol30 * math.sqrt(n))
    out["vratio_7_90"] = np.log(vol7 / vol90)
    out["vratio_30_365"] = np.log(vol30 / vol365)
    cov = pd.Series(valid.astype(float)).rolling(2160).mean().to_numpy()
    out["coverage90"] = cov
    return out


# ------------------------------------------------------------------------------------- simulator
def simulate(ts, open_, close, valid, funding, target_w, start, end, equity0=10_000.0, band=BAND):
    """Hourly simulation of one pair-fold.

    target_w[i]: desired position notional / equity decided at the *close* of bar i (NaN = no decision);
    filled at open[i+1] with COST on traded notional; quantity is held constant between fills.
    Funding: bar i's summed rate, paid on the position held during bar i at bar i's close price.
    Returns dict of metrics and the hourly equity path.
    """
    eq = equity0
    q = 0.0
    pend = None
    fees = fund = traded = 0.0
    n_trades = 0
    eqs = np.empty(end - start)
    prev_close = close[start - 1]
    for k, i in enumerate(range(start, end)):
        o = open_[i]
        c = close[i]
        eq += q * (o - prev_close)
        if pend is not None and valid[i]:
            dq = pend - q
            cost = abs(dq) * o * COST
            eq -= cost
            fees += cost
            traded += abs(dq) * o
            n_trades += 1
            q = pend
        pend = None
        eq += q * (c - o)
        if funding[i] != 0.0 and q != 0.0:
            pay = q * c * funding[i]
            eq -= pay
            fund += pay
        eqs[k] = eq
        prev_close = c
        w = target_w[i]
        if i + 1 < end and not math.isnan(w):
            w = max(-MAX_POS, min(MAX_POS, w))
            desired = w * eq / c
            cur_n = q * c
            des_n = desired * c
            same_side = (desired > 0 and q > 0) or (desired < 0 and q < 0)
            if desired == q or (same_side and abs(des_n - cur_n) < band * MAX_POS * eq):
                continue
            pend = desired
    return {"equity": eqs, "fees": fees, "funding": fund, "traded": traded, "n_trades": n_trades}


def metrics(res, ts_slice, equity0=10_000.0):
    e = np.concatenate([[equity0], res["equity"]])
    r = np.diff(e) / e[:-1]
    sd = r.std()
    sharpe = r.mean() / sd * math.sqrt(ANN) if sd > 0 else 0.0
    peak = np.maximum.accumulate(e)
    mdd = float(((peak - e) / peak).max())
    # worst intraday loss vs start-of-UTC-day equity (what the 3 % daily limit watches)
    day = (ts_slice // (24 * HOUR))
    ee = res["equity"]
    start_eq = {}
    worst = 0.0
    prev = equity0
    for d, v in zip(day, ee):
        if d not in start_eq:
            start_eq[d] = prev
        worst = max(worst, (start_eq[d] - v) / start_eq[d])
        prev = v
    years = len(r) / ANN
    return {
        "sharpe": sharpe,
        "ret": e[-1] / equity0 - 1,
        "mdd": mdd,
        "worst_day": worst,
        "turnover": res["traded"] / equity0 / years,  # x equity per year (vs initial equity)
        "fees": res["fees"] / equity0,
        "funding": res["funding"] / equity0,
        "trades_per_year": res["n_trades"] / years,
    }
