"""PPO vs rules on the same 2023-2025 test pair-folds (and in-sample 2019-2022)."""
import json

import numpy as np
import pandas as pd

rules = pd.read_csv("rules_results.csv")
recs = [json.loads(x) for x in open("ppo_results.jsonl")]
out = []
for part in ("test", "train"):
    lines = [f"### PPO {part} pair-folds ({'2023-2025, out of sample' if part == 'test' else '2019-2022, in sample'})", "",
             "| config | seed | n | Sharpe falling | Sharpe rising | Sharpe all | worst MDD | worst day | turnover x/yr | long/short share of days |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    keys = None
    for r in recs:
        d = pd.DataFrame(r[part])
        d["dir"] = np.where(d.bh_ret > 0, "rising", "falling")
        keys = set(zip(d.pair, d.year))
        f = d[d.dir == "falling"].sharpe
        ri = d[d.dir == "rising"].sharpe
        se = lambda x: x.std(ddof=1) / np.sqrt(len(x)) if len(x) > 1 else float("nan")
        lines.append(f"| {r['tag']} | {r['seed']} | {len(d)} | {f.mean():+.2f} ± {se(f):.2f} | {ri.mean():+.2f} ± {se(ri):.2f} | "
                     f"{d.sharpe.mean():+.2f} ± {se(d.sharpe):.2f} | {d.mdd.max()*100:.1f}% | {d.worst_day.max()*100:.1f}% | "
                     f"{d.turnover.mean():.1f} | {d.frac_long.mean():.2f}/{d.frac_short.mean():.2f} |")
    for s in ("buy_and_hold", "sma_12_48_1h", "tanh_blend_tv10", "tanh30_tv10", "sign30_tv10"):
        g = rules[(rules.strategy == s) & np.array([(p, y) in keys for p, y in zip(rules.pair, rules.year)])]
        f = g[g.dir == "falling"].sharpe
        ri = g[g.dir == "rising"].sharpe
        se = lambda x: x.std(ddof=1) / np.sqrt(len(x)) if len(x) > 1 else float("nan")
        lines.append(f"| rule {s} | - | {len(g)} | {f.mean():+.2f} ± {se(f):.2f} | {ri.mean():+.2f} ± {se(ri):.2f} | "
                     f"{g.sharpe.mean():+.2f} ± {se(g.sharpe):.2f} | {g.mdd.max()*100:.1f}% | {g.worst_day.max()*100:.1f}% | "
                     f"{g.turnover.mean():.1f} | |")
    out += lines + [""]
    if part == "test":
        # per pair-fold
        rows = []
        for r in recs:
            for x in r["test"]:
                rows.append({"cfg": f"{r['tag']}/s{r['seed']}", "pf": f"{x['year']} {x['pair']}", "sharpe": x["sharpe"]})
        p = pd.DataFrame(rows).pivot(index="pf", columns="cfg", values="sharpe")
        for s in ("buy_and_hold", "tanh_blend_tv10"):
            g = rules[rules.strategy == s]
            p[s] = [g[(g.year == int(i.split()[0])) & (g.pair == i.split()[1])].sharpe.iloc[0] for i in p.index]
        out += ["Per test pair-fold Sharpe:", "", "| pair-fold | " + " | ".join(p.columns) + " |", "|---" * (len(p.columns) + 1) + "|"]
        out += [f"| {i} | " + " | ".join(f"{v:+.2f}" for v in row.values) + " |" for i, row in p.iterrows()] + [""]
open("ppo_tables.md", "w").write("\n".join(out))
print("\n".join(out))
