"""The simulator at scale: 16, 100 and 1,000 agents; virtual time to a target accuracy for
FedAvg, DGA and FDA, and the simulator's own wall time.

What is simulated: every agent trains for real (digits MLP, its own iid shard, its own optimizer
state swapped into one shared model), on a Raspberry-Pi-like device profile (`--step-s` virtual
seconds per local step, +-20 % jitter) behind its own slow link (`--latency` one way, each
direction; `--bandwidth` bytes/s). The state machines, the message sizes (encoded) and the
evaluation are the real ones; only time is modelled (see coordinator/simulator.py).

With 1,000 agents digits gives each agent 1-2 training samples (1,437 in all): a test of the
machinery at scale more than of learning, which the accuracy column shows honestly.

Run: ``.venv/bin/python bench/simulator_scale.py [--agents 16,100,1000 --algos fedavg,dga,fda]``
(about 10 minutes on 2 cores with the defaults; ``--agents 16,100`` takes about one).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from fleetfl.coordinator.report import load_run, reached, report
from fleetfl.coordinator.simulator import DeviceProfile, SimConfig, Simulator
from fleetfl.shared.config import ALGOS, load_config
from fleetfl.shared.devtools.link_proxy import LinkSpec


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", default="16,100,1000", help="comma-separated fleet sizes")
    p.add_argument("--algos", default="fedavg,dga,fda",
                   help="comma-separated algorithms (those not in the registry are skipped)")
    p.add_argument("--target", type=float, default=0.9, help="target test accuracy")
    p.add_argument("--max-versions", type=int, default=60)
    p.add_argument("--step-s", type=float, default=0.05, help="virtual seconds per step")
    p.add_argument("--latency", type=float, default=0.5, help="one-way link latency, s")
    p.add_argument("--bandwidth", type=float, default=1e6, help="bytes/s per direction")
    p.add_argument("--steps", type=int, default=10, help="FedAvg H = DGA K")
    p.add_argument("--delay", type=int, default=30, help="DGA D (covers the round trip)")
    p.add_argument("--out", default="bench/results/simulator_scale", help="plots and runs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    sizes = [int(n) for n in args.agents.split(",")]
    algos = [a for a in args.algos.split(",") if a in ALGOS]
    skipped = sorted(set(args.algos.split(",")) - set(algos))
    out = Path(args.out)
    link = LinkSpec(args.latency, bandwidth=args.bandwidth)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fleetfl-scale-") as tmp:
        for n in sizes:
            dirs = []
            for algo in algos:
                run = f"{algo}-{n}"
                cfg = load_config(None, {
                    "run": run, "algo": algo, "min_agents": n, "max_versions": args.max_versions,
                    "target_accuracy": args.target, "local_steps": args.steps,
                    "period": args.steps, "delay": args.delay, "window_timeout": 60.0})
                sim = SimConfig(agents=n, profiles=[DeviceProfile("pi", args.step_s, 1, 0.2)],
                                up=link, down=link, coord_version_s=0.05)
                print(f"{n} agents, {algo} ...", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                simulator = Simulator(cfg, sim, run_dir=Path(tmp) / run)
                setup = time.perf_counter() - t0
                reason = simulator.run()
                dirs.append(Path(tmp) / run)
                hit = reached(load_run(dirs[-1]), args.target)
                best = max((e["accuracy"] or 0) for e in simulator.events)
                rows.append((n, algo, hit, best, simulator.core.version,
                             simulator.events[-1]["time"], setup, simulator.wall_s,
                             simulator.total_steps, reason))
            report(dirs, out / f"agents{n}", args.target, "fedavg" if "fedavg" in algos
                   else None, title=f"{n} simulated agents")
    print(f"\nDigits MLP, iid; device {args.step_s} s/step (+-20 %), link {args.latency} s "
          f"one way + {args.bandwidth / 1e6:g} MB/s each direction; FedAvg H = DGA K = "
          f"{args.steps}, DGA D = {args.delay}; target accuracy {args.target}.\n")
    print("| agents | algo | virtual s to target | versions to target | MB to target "
          "| best acc | virtual s total | sim wall s (setup + run) | steps / wall s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for n, algo, hit, best, _versions, vtime, setup, wall, steps, reason in rows:
        t = f"{hit.time:.1f}" if hit else f"n/a ({reason})"
        print(f"| {n} | {algo} | {t} | {hit.version if hit else '-'} "
              f"| {hit.bytes / 1e6 if hit else float('nan'):.1f} | {best:.3f} | {vtime:.1f} "
              f"| {setup:.1f} + {wall:.1f} | {steps / wall:,.0f} |")
    for n in sizes:
        base = next((r for r in rows if r[0] == n and r[1] == "fedavg"), None)
        for r in rows:
            if r[0] == n and r[1] != "fedavg" and base and base[2] and r[2]:
                print(f"ratio fedavg / {r[1]} virtual time to target at {n} agents: "
                      f"{base[2].time / r[2].time:.2f}")
    if skipped:
        print(f"skipped (not in the registry): {', '.join(skipped)}")
    print(f"plots: {out}/agents*/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
