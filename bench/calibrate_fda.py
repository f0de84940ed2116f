"""Calibrate FDA's Theta for a target sync period (ALGORITHMS.md section 5, "Theta guidance";
the rule is `fda.theta_for_period`).

Runs FedAvg (H local steps per round) in one process (real trainer, real partitions). At a few
syncs (`--starts`: the start of training and later rounds) it forks the fleet: every agent
trains `--horizon` more steps from the common model and the true variance of the local models
is recorded after h steps, V(h). That is the curve FDA's trigger walks along between two syncs.
Per start it fits the growth law V(h) = a h^p (least squares in log-log over h >= 5) and prints
the Theta that makes FDA sync after T local steps, Theta(T) = V(h) (T / h)^p, for a few T.

The rule targets communication: a sync every T steps costs 1/T of per-step sync's uplink, and
since the variance grows fastest early in training (large gradients), a Theta taken from the
middle of training syncs more often at the start and less often later, which is FDA's point.
The old rule (median variance at a FedAvg H = 20 sync) is the row T = 20: FDA then syncs as
often as FedAvg H = 20 by construction.

    python bench/calibrate_fda.py --dataset mnist --data-dir ../shared/data --agents 8
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch

from fleetfl.shared.config import JobConfig
from fleetfl.shared.core.fda import growth_exponent, theta_for_period
from fleetfl.shared.learn.data import agent_shard, load_dataset
from fleetfl.shared.tasks.trainer import LocalTrainer


def true_variance(models: list[np.ndarray]) -> float:
    stacked = np.stack(models).astype(np.float64)
    return float(((stacked - stacked.mean(0)) ** 2).sum(1).mean())


def fork_growth(trainers: list[LocalTrainer], w: np.ndarray, horizon: int) -> np.ndarray:
    """V(h), h = 1..horizon, of the fleet trained from the common model w; the trainers'
    parameters, optimizer and data order are restored afterwards."""
    saved = [(t.optimizer.state_dict(), t.rng.bit_generator.state, t.order.copy(), t.steps)
             for t in trainers]
    saved = copy.deepcopy(saved)
    for t in trainers:
        t.params[:] = w
    curve = np.empty(horizon)
    for h in range(horizon):
        for t in trainers:
            t.step()
        curve[h] = true_variance([t.params for t in trainers])
    for t, (opt, rng, order, steps) in zip(trainers, saved, strict=True):
        t.optimizer.load_state_dict(opt)
        t.rng.bit_generator.state = rng
        t.order, t.steps = order, steps
        t.params[:] = w
    return curve


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--agents", type=int, default=8)
    p.add_argument("--local-steps", type=int, default=20, help="FedAvg H between forks")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--starts", default="0,4,8", help="rounds at which to fork the fleet")
    p.add_argument("--horizon", type=int, default=240, help="steps per fork")
    p.add_argument("--periods", default="20,50,100,200,400", help="target sync periods T")
    p.add_argument("--partition", default="dirichlet")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=JobConfig.lr)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    job = JobConfig(task=args.dataset, lr=args.lr, partition=args.partition, seed=args.seed)
    ds = load_dataset(args.dataset, args.data_dir)
    trainers = []
    for i in range(args.agents):
        x, y = agent_shard(ds, i, args.agents, job.partition, job.seed, job.alpha)
        trainers.append(LocalTrainer.on_arrays(job, x, y, seed=i))
    w = trainers[0].params.copy()
    weights = np.array([t.samples for t in trainers], dtype=np.float64)
    starts = sorted(int(s) for s in args.starts.split(","))
    periods = [int(s) for s in args.periods.split(",")]
    at_sync, curves = [], {}
    for r in range(max(starts) + 1 if starts else args.rounds):
        if r in starts:
            curves[r] = fork_growth(trainers, w, args.horizon)
        for t in trainers:
            t.params[:] = w
            for _ in range(args.local_steps):
                t.step()
        at_sync.append(true_variance([t.params for t in trainers]))
        w = (np.stack([t.params for t in trainers]) * weights[:, None]).sum(0) / weights.sum()
        w = w.astype(np.float32)
    print(f"{args.dataset}, {args.agents} agents, {args.partition}, seed {args.seed}, lr "
          f"{args.lr}; FedAvg H = {args.local_steps}: true variance at its syncs: median "
          f"{np.median(at_sync):.4g} (range {min(at_sync):.4g} .. {max(at_sync):.4g})\n")
    grid = [h for h in (1, 2, 5, 10, 20, 50, 100, 200, 400, 800) if h <= args.horizon]
    print("| fork at round | " + " | ".join(f"V({h})" for h in grid)
          + " | p (V ~ h^p) | " + " | ".join(f"Theta(T={t})" for t in periods) + " |")
    print("|---:|" + "---:|" * (len(grid) + 1 + len(periods)))
    thetas: dict[int, list[float]] = {t: [] for t in periods}
    for r, curve in curves.items():
        hs = np.arange(1, args.horizon + 1)
        fit = hs >= 5
        p_exp = growth_exponent(hs[fit], curve[fit])
        row = []
        for t in periods:
            theta = curve[t - 1] if t <= args.horizon else theta_for_period(
                curve[-1], args.horizon, t, p_exp)
            thetas[t].append(theta)
            row.append(f"{theta:.4g}" + ("" if t <= args.horizon else " (fit)"))
        print(f"| {r} | " + " | ".join(f"{curve[h - 1]:.4g}" for h in grid)
              + f" | {p_exp:.2f} | " + " | ".join(row) + " |")
    print()
    for t in periods:
        print(f"target sync period T = {t} steps: Theta = median over forks "
              f"{np.median(thetas[t]):.3g} (range {min(thetas[t]):.3g} .. {max(thetas[t]):.3g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
