"""LBGM's premise on our models and data (ALGORITHMS.md section 6; Azam et al. 2022: "the top
few principal components of the gradient history explain 95-99% of its variance"), measured
per layer, and what LBGM's rule would decide on that history.

Runs FedAvg (H local steps per round, N agents, Dirichlet partition) in one process with the
real trainer and records every agent's update (w after H steps - w at the round's start) per
round, plus a centralised run (one trainer on all the data, the paper's setting) whose H-step
updates form the same kind of history. Per parameter tensor it prints:
- PCA of the update history as the paper does (centred, like sklearn's PCA): the explained
  variance of the top component and how many components reach 95% and 99%, of at most R - 1;
- the uncentred share of the top direction (what one look-back vector can carry);
- the median sin^2 between successive updates (what LBGM compares when it refreshes each round);
- for each delta, the share of rounds LBGM's rule (look-back = last full update, scalar when
  sin^2 <= delta) sends the tensor as one scalar, and that share weighted by tensor size (the
  uplink saving), replayed on the FedAvg history.

    python bench/lbgm_premise.py --dataset mnist --data-dir ../shared/data
    python bench/lbgm_premise.py --dataset mnist --data-dir ../shared/data \
        --local-steps 1 --rounds 200
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from fleetfl.shared.config import JobConfig
from fleetfl.shared.core.payloads import lookback_fit
from fleetfl.shared.learn.data import agent_shard, load_dataset
from fleetfl.shared.tasks.trainer import LocalTrainer


def pca_ratios(history: np.ndarray) -> np.ndarray:
    """Explained variance ratios of the rows' principal components (centred, as sklearn)."""
    centred = history - history.mean(0)
    s = np.linalg.svd(centred.astype(np.float64), compute_uv=False)
    energy = s ** 2
    return energy / energy.sum() if energy.sum() > 0 else energy


def top_share(history: np.ndarray) -> float:
    """Uncentred: the share of the history's energy along its top singular direction."""
    s = np.linalg.svd(history.astype(np.float64), compute_uv=False)
    return float(s[0] ** 2 / (s ** 2).sum()) if s.size and s[0] > 0 else 0.0


def components_for(ratios: np.ndarray, level: float) -> int:
    return int(np.searchsorted(np.cumsum(ratios), level - 1e-12) + 1)


def lbgm_replay(history: np.ndarray, delta: float) -> float:
    """Share of rounds LBGM's rule sends as a scalar on this history of one tensor."""
    lookback, scalars = None, 0
    for g in history:
        if lookback is not None and float(lookback @ lookback) > 0:
            _, sin2 = lookback_fit(g, lookback)
            if sin2 <= delta:
                scalars += 1
                continue
        lookback = g
    return scalars / len(history)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--agents", type=int, default=8)
    p.add_argument("--local-steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--partition", default="dirichlet")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deltas", default="0.2,0.4,0.6,0.8,0.9")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    job = JobConfig(task=args.dataset, partition=args.partition, seed=args.seed)
    ds = load_dataset(args.dataset, args.data_dir)
    trainers = []
    for i in range(args.agents):
        x, y = agent_shard(ds, i, args.agents, job.partition, job.seed, job.alpha)
        trainers.append(LocalTrainer.on_arrays(job, x, y, seed=i))
    layers = trainers[0].layers.layers
    weights = np.array([t.samples for t in trainers], dtype=np.float64)
    w = trainers[0].params.copy()
    history = np.empty((args.agents, args.rounds, w.size), dtype=np.float32)
    for r in range(args.rounds):
        for i, t in enumerate(trainers):
            t.params[:] = w
            for _ in range(args.local_steps):
                t.step()
            history[i, r] = t.params - w
        w = (w + (history[:, r] * weights[:, None]).sum(0) / weights.sum()).astype(np.float32)
    # centralised: one trainer on the whole training set, the paper's premise
    x, y = agent_shard(ds, 0, 1, "iid", job.seed, job.alpha)
    central = LocalTrainer.on_arrays(job, x, y, seed=0)
    central_history = np.empty((args.rounds, w.size), dtype=np.float32)
    for r in range(args.rounds):
        start = central.params.copy()
        for _ in range(args.local_steps):
            central.step()
        central_history[r] = central.params - start
    deltas = [float(d) for d in args.deltas.split(",")]
    print(f"{args.dataset}, {args.agents} agents, {args.partition}, seed {args.seed}: "
          f"{args.rounds} rounds of H = {args.local_steps} steps (medians over agents; "
          f"PCA of at most {args.rounds - 1} components)\n")
    print("| tensor | size | PCA top-1 | PCs to 95% | PCs to 99% | central: top-1 / to 95% | "
          "uncentred top-1 | sin^2 successive | "
          + " | ".join(f"scalar @ {d}" for d in deltas) + " |")
    print("|---|---:|" + "---:|" * (6 + len(deltas)))
    weighted = dict.fromkeys(deltas, 0.0)
    total = sum(la.size for la in layers)
    for layer in layers:
        per_agent = [history[i, :, layer.slice] for i in range(args.agents)]
        ratios = [pca_ratios(h) for h in per_agent]
        c = pca_ratios(central_history[:, layer.slice])
        sin2 = [lookback_fit(h[r], h[r - 1])[1] for h in per_agent
                for r in range(1, args.rounds)]
        shares = {d: float(np.median([lbgm_replay(h, d) for h in per_agent])) for d in deltas}
        for d in deltas:
            weighted[d] += shares[d] * layer.size / total
        print(f"| {layer.name} | {layer.size} | {np.median([r[0] for r in ratios]):.2f} | "
              f"{np.median([components_for(r, 0.95) for r in ratios]):.0f} | "
              f"{np.median([components_for(r, 0.99) for r in ratios]):.0f} | "
              f"{c[0]:.2f} / {components_for(c, 0.95)} | "
              f"{np.median([top_share(h) for h in per_agent]):.2f} | "
              f"{np.median(sin2):.2f} | " + " | ".join(f"{shares[d]:.2f}" for d in deltas)
              + " |")
    print("\nshare of uplink model bytes LBGM would not send (size-weighted scalar share): "
          + ", ".join(f"delta {d}: {weighted[d]:.2f}" for d in deltas))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
