"""The Jan-Apr 2025 fall (issue claim) and the per-year view of the recommended rule."""
import math

import numpy as np
import pandas as pd

from common import HOUR, MAX_POS, PAIRS, funding_per_bar, load_pair, metrics, simulate, trend_features

DAY = 24 * HOUR
t_a = int(pd.Timestamp("2025-01-01", tz="UTC").timestamp() * 1000)
t_b = int(pd.Timestamp("2025-05-01", tz="UTC").timestamp() * 1000)
print("| pair | B&H ret | strategy | Sharpe | return | MDD | worst day |")
print("|---|---|---|---|---|---|---|")
for pair in PAIRS:
    df = load_pair(pair)
    ts = df.index.to_numpy(np.int64)
    o, c = df["open"].to_numpy(float), df["close"].to_numpy(float)
    valid = df["valid"].to_numpy(bool)
    fund = funding_per_bar(pair, ts)
    f = trend_features(c, valid)
    ok = (f["coverage90"] > 0.95) & valid & np.isfinite(f["z90"])
    dec = (ts % DAY) == 23 * HOUR
    size10 = np.minimum(0.10 / f["vol30_ann"], MAX_POS)
    strats = {
        "buy_and_hold": np.where(valid, MAX_POS, np.nan),
        "tanh_blend_tv10": np.where(dec, np.where(ok, (np.tanh(f["z7"]) + np.tanh(f["z30"]) + np.tanh(f["z90"])) / 3 * size10, 0), np.nan),
        "tanh30_tv10": np.where(dec, np.where(ok, np.tanh(f["z30"]) * size10, 0), np.nan),
        "sign30_tv15": np.where(dec, np.where(ok, np.sign(f["r30"]) * np.minimum(0.15 / f["vol30_ann"], MAX_POS), 0), np.nan),
    }
    a, b = np.searchsorted(ts, t_a), np.searchsorted(ts, t_b)
    # decide at the first bar too (the rules would already hold a position on 2025-01-01)
    for name, w in strats.items():
        w = w.copy()
        if name != "buy_and_hold":
            prev = np.nonzero(~np.isnan(w[:a]))[0][-1]
            w[a] = w[prev]
        m = metrics(simulate(ts, o, c, valid, fund, w, a, b), ts[a:b])
        print(f"| {pair} | {c[b-1]/c[a-1]-1:+.0%} | {name} | {m['sharpe']:+.2f} | {m['ret']:+.1%} | {m['mdd']:.1%} | {m['worst_day']:.1%} |")
