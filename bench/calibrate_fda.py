"""Calibrate FDA's Theta (ALGORITHMS.md section 5, "Theta guidance"): run FedAvg with H local
steps per round in one process (real trainer, real partitions), measure the true variance of
the local models just before every sync, and print its median: the Theta to start from.

    python bench/calibrate_fda.py --dataset mnist --data-dir ../shared/data --agents 4
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from fleetfl.shared.config import JobConfig
from fleetfl.shared.learn.data import agent_shard, load_dataset
from fleetfl.shared.tasks.trainer import LocalTrainer


def true_variance(models: list[np.ndarray]) -> float:
    stacked = np.stack(models).astype(np.float64)
    return float(((stacked - stacked.mean(0)) ** 2).sum(1).mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--agents", type=int, default=4)
    p.add_argument("--local-steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--partition", default="dirichlet")
    p.add_argument("--lr", type=float, default=JobConfig.lr)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    job = JobConfig(task=args.dataset, lr=args.lr,
                    partition=args.partition)
    ds = load_dataset(args.dataset, args.data_dir)
    trainers = []
    for i in range(args.agents):
        x, y = agent_shard(ds, i, args.agents, job.partition, job.seed, job.alpha)
        trainers.append(LocalTrainer.on_arrays(job, x, y, seed=i))
    w = trainers[0].params.copy()
    weights = np.array([t.samples for t in trainers], dtype=np.float64)
    variances = []
    for _ in range(args.rounds):
        for t in trainers:
            t.params[:] = w
            for _ in range(args.local_steps):
                t.step()
        variances.append(true_variance([t.params for t in trainers]))
        w = (np.stack([t.params for t in trainers]) * weights[:, None]).sum(0) / weights.sum()
        w = w.astype(np.float32)
    v = np.array(variances)
    print(f"{args.dataset}, {args.agents} agents, H = {args.local_steps}: "
          f"true variance at sync: median {np.median(v):.4g}, quartiles "
          f"{np.percentile(v, 25):.4g} .. {np.percentile(v, 75):.4g}, first {v[0]:.4g}, "
          f"last {v[-1]:.4g}")
    print(f"suggested --fda-theta {np.median(v):.3g}; sweep x 0.25, 0.5, 1, 2, 4")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
