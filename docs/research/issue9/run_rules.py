"""Walk-forward evaluation of buy-and-hold, SMA 12/48 (1h) and vol-targeted TSMOM variants.

Usage: nice -n 15 .venv/bin/python docs/research/issue9/run_rules.py   (writes rules_results.csv, rules_tables.md)
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np
import pandas as pd

from common import HOUR, MAX_POS, PAIRS, funding_per_bar, load_pair, metrics, simulate, trend_features

YEARS = [2018, 2019, 2020, 2021, 2022, 2023, 2024, 2025]
DAY = 24 * HOUR


def year_ms(y: int) -> int:
    return int(pd.Timestamp(f"{y}-01-01", tz="UTC").timestamp() * 1000)


def variants():
    """name -> function(features) -> signal in [-1, 1] per bar (before vol sizing)."""
    v = {}
    v["sign30"] = lambda f: np.sign(f["r30"])
    v["tanh30"] = lambda f: np.tanh(f["z30"])
    v["sign_blend"] = lambda f: (np.sign(f["r7"]) + np.sign(f["r30"]) + np.sign(f["r90"])) / 3
    v["tanh_blend"] = lambda f: (np.tanh(f["z7"]) + np.tanh(f["z30"]) + np.tanh(f["z90"])) / 3
    v["sign_blend_long"] = lambda f: np.maximum(v["sign_blend"](f), 0.0)
    v["sign30_long"] = lambda f: np.maximum(np.sign(f["r30"]), 0.0)
    return v


def main() -> None:
    t0 = time.time()
    rows = []
    tvs = [0.10, 0.15, 0.20]
    vars_ = variants()
    for pair in PAIRS:
        df = load_pair(pair)
        ts = df.index.to_numpy(np.int64)
        o = df["open"].to_numpy(float)
        c = df["close"].to_numpy(float)
        valid = df["valid"].to_numpy(bool)
        fund = funding_per_bar(pair, ts)
        f = trend_features(c, valid)
        decide_daily = (ts % DAY) == 23 * HOUR  # bar closing at 00:00 UTC
        ok = (f["coverage90"] > 0.95) & valid & np.isfinite(f["z90"]) & np.isfinite(f["vol30_ann"])
        # strategies: name -> target weight array (notional / equity), NaN = no decision at that bar
        strats: dict[str, np.ndarray] = {}
        strats["buy_and_hold"] = np.where(valid, MAX_POS, np.nan)
        lc = pd.Series(c)
        sma12 = lc.rolling(12).mean().to_numpy()
        sma48 = lc.rolling(48).mean().to_numpy()
        strats["sma_12_48_1h"] = np.where(valid & np.isfinite(sma48), np.where(sma12 > sma48, MAX_POS, -MAX_POS), np.nan)
        for name, fn in vars_.items():
            sig = fn(f)
            for tv in tvs:
                w = sig * np.minimum(tv / f["vol30_ann"], MAX_POS)
                w = np.where(ok, w, 0.0)
                strats[f"{name}_tv{int(tv*100)}"] = np.where(decide_daily, w, np.nan)
        # extra target vols for the tanh rules, and decision-hour robustness of the recommended rule
        for name in ("tanh30", "tanh_blend"):
            sig = vars_[name](f)
            for tv in (0.08, 0.12):
                w = np.where(ok, sig * np.minimum(tv / f["vol30_ann"], MAX_POS), 0.0)
                strats[f"{name}_tv{int(tv*100)}"] = np.where(decide_daily, w, np.nan)
        sig = vars_["tanh_blend"](f)
        w = np.where(ok, sig * np.minimum(0.10 / f["vol30_ann"], MAX_POS), 0.0)
        for hh in (8, 16):
            strats[f"tanh_blend_tv10_at{hh:02d}h"] = np.where((ts % DAY) == ((hh - 1) % 24) * HOUR, w, np.nan)
        strats["tanh_blend_tv10_hourly"] = w
        # cadence check: the 30d sign rule decided every hour (as the shipped policy would)
        w = np.sign(f["r30"]) * np.minimum(0.15 / f["vol30_ann"], MAX_POS)
        strats["sign30_tv15_hourly"] = np.where(ok, w, 0.0)
        strats["tanh_blend_tv15_nobands"] = strats["tanh_blend_tv15"]
        for y in YEARS:
            a = np.searchsorted(ts, year_ms(y))
            b = np.searchsorted(ts, year_ms(y + 1)) if y < 2025 else len(ts)
            # start the fold at the first bar whose 90-day warm-up is covered (SOL 2024 restarts on 01-01)
            ready = np.nonzero(f["coverage90"][a:b] > 0.95)[0]
            if len(ready) == 0:
                print(f"skip {pair} {y}: no warm-up", file=sys.stderr)
                continue
            a = a + int(ready[0])
            if b - a < 24 * 150:
                print(f"skip {pair} {y}: < 150 days after warm-up", file=sys.stderr)
                continue
            cover = valid[a:b].mean()
            warm = f["coverage90"][a]
            if cover < 0.7 or not (warm > 0.95):
                print(f"skip {pair} {y}: coverage {cover:.2f}, warm-up coverage {warm}", file=sys.stderr)
                continue
            bh_ret = c[b - 1] / c[a - 1] - 1
            for sname, tw in strats.items():
                band = 0.0 if sname.endswith("nobands") else 0.10
                res = simulate(ts, o, c, valid, fund, tw, a, b, band=band)
                m = metrics(res, ts[a:b])
                rows.append({"pair": pair, "year": y, "bh_ret": bh_ret, "dir": "rising" if bh_ret > 0 else "falling",
                             "strategy": sname, "years": (b - a) / 8760, **m})
        print(f"{pair} done {time.time()-t0:.0f}s", file=sys.stderr)
    out = pd.DataFrame(rows)
    out.to_csv("rules_results.csv", index=False)
    print(f"total {time.time()-t0:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
