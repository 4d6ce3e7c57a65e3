"""PPO trained on days before 2022, tested on 2022 (every pair fell 47-82 %), vs the rules on the same pair-folds."""
import json

import numpy as np
import pandas as pd

rules = pd.read_csv("rules_results.csv")
recs = [json.loads(x) for x in open("ppo_results_2022.jsonl")]
lines = ["| config | seed | " + " | ".join(f"2022 {p}" for p in ("BTC", "ETH", "SOL", "BNB")) +
         " | mean | worst MDD | worst day | long/short share of days |", "|---" * 10 + "|"]
for r in recs:
    d = pd.DataFrame(r["test"]).set_index("pair")
    lines.append(f"| PPO {r['tag']} | {r['seed']} | " + " | ".join(f"{d.loc[p, 'sharpe']:+.2f}" for p in ("BTC", "ETH", "SOL", "BNB"))
                 + f" | {d.sharpe.mean():+.2f} | {d.mdd.max()*100:.1f}% | {d.worst_day.max()*100:.1f}% | "
                 f"{d.frac_long.mean():.2f}/{d.frac_short.mean():.2f} |")
for s in ("buy_and_hold", "sma_12_48_1h", "tanh_blend_tv10", "tanh30_tv10", "sign30_tv10"):
    g = rules[(rules.strategy == s) & (rules.year == 2022)].set_index("pair")
    lines.append(f"| rule {s} | - | " + " | ".join(f"{g.loc[p, 'sharpe']:+.2f}" for p in ("BTC", "ETH", "SOL", "BNB"))
                 + f" | {g.sharpe.mean():+.2f} | {g.mdd.max()*100:.1f}% | {g.worst_day.max()*100:.1f}% | |")
open("ppo2022_table.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
