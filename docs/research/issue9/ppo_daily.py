"""Small learning experiment: PPO on multi-horizon trend features, daily decisions, symmetric cost-aware reward.

Env: one step = one UTC day (decision at the close of the 23:00 bar, fill at the next open).
Observation: vol-normalised returns z_d = log(c_t/c_{t-24d}) / (sigma_30d,hourly * sqrt(24 d)) for d in
{1,3,7,14,30,60,90}, clipped to +-5 and divided by 2; log vol ratios 7d/90d and 30d/365d; current position
(in action units). Action: Discrete(5) -> a in {-1,-.5,0,.5,1}; position notional / equity
w = a * min(tv / sigma_30d,ann, 0.5), tv = 10 %/yr.
Reward: (w * r_next_day - COST * |w - w_prev| - w * funding_next_day) / (tv / sqrt(365)): the
vol-scaled position return minus explicit costs, symmetric for longs/shorts, no drawdown term.
Train: every pair's days before 2023-01-01; test 2023, 2024, 2025 through the hourly simulator (same
costs and rebalance band as the rule tables).

Usage: nice -n 15 python ppo_daily.py --seed 0 --steps 200000 [--rule-feature] [--gamma 0.9]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import PPO

from common import COST, HOUR, MAX_POS, PAIRS, funding_per_bar, load_pair, metrics, simulate, trend_features
from run_rules import year_ms

torch.set_num_threads(1)
DAYS = (1, 3, 7, 14, 30, 60, 90)
TV = 0.10
ACTIONS = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
SCALES = np.array([0.0, 0.5, 1.0, 1.5, 2.0])  # --scale-rule: the action scales the rule's position
MODE = {"scale_rule": False}


def act_weight(d, i, action):
    """(action value for the observation, position weight) for decision bar i."""
    if MODE["scale_rule"]:
        k = float(SCALES[int(action)])
        return k, k * d["rule_w"][i]
    a = float(ACTIONS[int(action)])
    return a, a * d["size"][i]


def build(pair: str, rule_feature: bool):
    df = load_pair(pair)
    ts = df.index.to_numpy(np.int64)
    o = df["open"].to_numpy(float)
    c = df["close"].to_numpy(float)
    valid = df["valid"].to_numpy(bool)
    fund = funding_per_bar(pair, ts)
    f = trend_features(c, valid)
    feats = [np.clip(f[f"z{d}"], -5, 5) / 2 for d in DAYS]
    feats += [np.clip(f["vratio_7_90"], -3, 3), np.clip(f["vratio_30_365"], -3, 3)]
    if rule_feature:
        feats.append((np.tanh(f["z7"]) + np.tanh(f["z30"]) + np.tanh(f["z90"])) / 3)
    X = np.stack(feats, axis=1)
    rule_w = (np.tanh(f["z7"]) + np.tanh(f["z30"]) + np.tanh(f["z90"])) / 3 * np.minimum(TV / f["vol30_ann"], MAX_POS)
    size = np.minimum(TV / f["vol30_ann"], MAX_POS)
    ok = (f["coverage90"] > 0.95) & valid & np.isfinite(X).all(axis=1) & np.isfinite(size)
    dec = np.nonzero(((ts % (24 * HOUR)) == 23 * HOUR) & ok)[0]
    dec = dec[dec + 24 < len(ts)]
    r_next = c[dec + 24] / c[dec] - 1
    fsum = np.array([fund[i + 1: i + 25].sum() for i in dec])
    return dict(ts=ts, o=o, c=c, valid=valid, fund=fund, X=X, size=size, rule_w=rule_w, dec=dec, r_next=r_next, fsum=fsum)


class DailyEnv(gym.Env):
    def __init__(self, data, end_ms: int, ep_len: int = 365, seed: int = 0):
        self.segs = []
        for d in data:
            m = d["ts"][d["dec"]] < end_ms
            idx = np.nonzero(m)[0]
            if len(idx) > 60:
                self.segs.append((d, idx))
        self.ep_len = ep_len
        n_obs = data[0]["X"].shape[1] + 1
        self.observation_space = gym.spaces.Box(-10, 10, (n_obs,), np.float32)
        self.action_space = gym.spaces.Discrete(5)
        self.rng = np.random.default_rng(seed)

    def _obs(self):
        d, idx = self.seg
        i = d["dec"][idx[self.k]]
        return np.append(d["X"][i], self.a_prev).astype(np.float32)

    def reset(self, *, seed=None, options=None):
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        w = np.array([len(i) for _, i in self.segs], float)
        self.seg = self.segs[self.rng.choice(len(self.segs), p=w / w.sum())]
        n = len(self.seg[1])
        self.k = int(self.rng.integers(0, max(1, n - self.ep_len)))
        self.k_end = min(n - 1, self.k + self.ep_len)
        self.a_prev = 0.0
        self.w_prev = 0.0
        return self._obs(), {}

    def step(self, action):
        d, idx = self.seg
        j = idx[self.k]
        i = d["dec"][j]
        a, w = act_weight(d, i, action)
        rew = w * d["r_next"][j] - COST * abs(w - self.w_prev) - w * d["fsum"][j]
        rew /= TV / math.sqrt(365)
        self.w_prev = w * (1 + d["r_next"][j])  # drifted weight (approximately)
        self.a_prev = a
        self.k += 1
        done = self.k >= self.k_end
        return self._obs(), float(rew), done, False, {}


def evaluate(model, data, pairs, years):
    out = []
    for pair, d in zip(pairs, data):
        ts = d["ts"]
        for y in years:
            a = np.searchsorted(ts, year_ms(y))
            b = np.searchsorted(ts, year_ms(y + 1)) if y < 2025 else len(ts)
            ready = np.nonzero(d["valid"][a:b])[0]
            if b - a < 24 * 150 or len(ready) < 24 * 150:
                continue
            dec = d["dec"][(d["dec"] >= a) & (d["dec"] < b)]
            if len(dec) < 150:
                continue
            a = max(a, int(dec[0]))
            tw = np.full(len(ts), np.nan)
            a_prev = 0.0
            for i in dec:
                obs = np.append(d["X"][i], a_prev).astype(np.float32)
                act, _ = model.predict(obs, deterministic=True)
                a_prev, tw[i] = act_weight(d, i, act)
            res = simulate(ts, d["o"], d["c"], d["valid"], d["fund"], tw, a, b)
            m = metrics(res, ts[a:b])
            bh = d["c"][b - 1] / d["c"][a - 1] - 1
            acts = [tw[i] for i in dec]
            m.update(pair=pair, year=y, bh_ret=bh, frac_long=float(np.mean(np.array(acts) > 0)),
                     frac_short=float(np.mean(np.array(acts) < 0)))
            out.append(m)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=200_000)
    ap.add_argument("--gamma", type=float, default=0.9)
    ap.add_argument("--ent", type=float, default=0.01)
    ap.add_argument("--rule-feature", action="store_true")
    ap.add_argument("--scale-rule", action="store_true")
    ap.add_argument("--train-end-year", type=int, default=2023, help="train on days before Jan 1 of this year")
    ap.add_argument("--test-years", default="2023,2024,2025")
    ap.add_argument("--out", default="ppo_results.jsonl")
    ap.add_argument("--tag", default="base")
    args = ap.parse_args()
    t0 = time.time()
    MODE["scale_rule"] = args.scale_rule
    pairs = list(PAIRS)
    data = [build(p, args.rule_feature) for p in pairs]
    env = DailyEnv(data, year_ms(args.train_end_year), seed=args.seed)
    model = PPO("MlpPolicy", env, n_steps=2048, batch_size=256, n_epochs=10, gamma=args.gamma, gae_lambda=0.95,
                ent_coef=args.ent, learning_rate=3e-4, policy_kwargs=dict(net_arch=[64, 64]), seed=args.seed,
                verbose=0, device="cpu")
    model.learn(args.steps)
    train_s = time.time() - t0
    res_test = evaluate(model, data, pairs, [int(y) for y in args.test_years.split(",")])
    res_train = evaluate(model, data, pairs, [y for y in (2019, 2020, 2021, 2022) if y < args.train_end_year])
    rec = dict(train_end_year=args.train_end_year, tag=args.tag, seed=args.seed, steps=args.steps, gamma=args.gamma, ent=args.ent,
               rule_feature=args.rule_feature, scale_rule=args.scale_rule, train_seconds=train_s, test=res_test, train=res_train)
    with open(args.out, "a") as fh:
        fh.write(json.dumps(rec) + "\n")
    st = np.mean([r["sharpe"] for r in res_test])
    sr = np.mean([r["sharpe"] for r in res_train])
    print(f"{args.tag} seed {args.seed}: train-years Sharpe {sr:+.2f}, test-years Sharpe {st:+.2f}, "
          f"{time.time()-t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
