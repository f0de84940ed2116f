"""Stragglers: a fleet where half the devices are 4x slower (`fl-agent --slowdown 4`), same
data, model and seeds, run three ways in the same code path:

- FedAvg-wait: every round waits for every device (the slow half sets the pace);
- FedAvg-drop: rounds end at a deadline, devices that miss it are dropped (FedDrop-like);
- FedPMT: the same deadline, slow devices train only the trailing layers they can finish.

The deadline is `--deadline-factor` x the full-model round time of the k-th fastest device
(k = the number of fast devices), from measured profiles and speeds. Prints time to the target
accuracy and final accuracy, with ratios to FedAvg-wait, read from each run's events.jsonl.

    python bench/stragglers.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from fleet_runs import run_fleet, time_to

from fleetfl.coordinator.report import report
from fleetfl.shared.devtools.local_broker import LocalMosquitto


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default=os.environ.get("FL_DATA_DIR", ""))
    p.add_argument("--agents", type=int, default=8)
    p.add_argument("--slow", type=int, default=0, help="slow agents (default: half)")
    p.add_argument("--slowdown", type=float, default=4.0)
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--max-versions", type=int, default=120)
    p.add_argument("--deadline-factor", type=float, default=1.5)
    p.add_argument("--local-steps", type=int, default=100,
                   help="H; rounds must be compute-bound for deadlines to matter")
    p.add_argument("--keep", help="keep run directories here")
    p.add_argument("--out", default="bench/results/stragglers",
                   help="fl-report plots and report.md go here")
    args = p.parse_args(argv)
    slow = args.slow or args.agents // 2
    fast = args.agents - slow
    deadline = ["--deadline-rank", str(fast), "--deadline-factor", str(args.deadline_factor)]
    configs = {
        "fedavg-wait": ["--algo", "fedavg"],
        "fedavg-drop": ["--algo", "fedavg", *deadline],
        "fedpmt": ["--algo", "pmt", *deadline],
    }
    workdir = Path(args.keep or tempfile.mkdtemp(prefix="fl-stragglers-"))
    print(f"{args.agents} agents, {slow} of them {args.slowdown}x slower; {args.dataset} "
          f"Dirichlet 0.5; H = {args.local_steps}; target {args.target}; runs in {workdir}")
    rows = {}
    with LocalMosquitto() as broker:
        for name, flags in configs.items():
            events = run_fleet(
                broker.url, name, workdir,
                [*flags, "--dataset", args.dataset, "--partition", "dirichlet",
                 "--local-steps", str(args.local_steps), "--target-accuracy",
                 str(args.target), "--max-versions", str(args.max_versions),
                 "--eval-every", "2"],
                args.agents, args.data_dir,
                agent_flags=lambda i: ["--slowdown", str(args.slowdown)] if i >= fast else [])
            accuracies = [e["accuracy"] for e in events if e["accuracy"] is not None]
            rows[name] = (time_to(events, args.target), max(accuracies), accuracies[-1],
                          events[-1]["version"], events[-1]["time"])
            print(f"  {name}: {rows[name]}", flush=True)
    base = rows["fedavg-wait"][0]
    print(f"\n| run | time to {args.target} (s) | speed-up vs wait | best acc | final acc | "
          "versions | run s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (t, best, final, versions, total) in rows.items():
        speed = f"{base / t:.2f}x" if t and base else "-"
        print(f"| {name} | {t if t is not None else 'not reached'} | {speed} | {best:.4f} | "
              f"{final:.4f} | {versions} | {total:.0f} |")
    out = Path(args.out)
    print("\n" + report([workdir / "runs" / name for name in configs], out, args.target,
                        baseline="fedavg-wait",
                        title=f"Stragglers: {slow} of {args.agents} agents "
                              f"{args.slowdown:g}x slower"))
    print(f"fl-report plots: {out}/")
    pmt, wait, drop = rows["fedpmt"], rows["fedavg-wait"], rows["fedavg-drop"]
    if pmt[0] and wait[0]:
        ratio = wait[0] / pmt[0]
        print(f"\nFedPMT vs FedAvg-wait time to target: {ratio:.2f}x (goal >= 1.5x) "
              f"{'PASS' if ratio >= 1.5 else 'SHORT'}")
    print(f"FedPMT best accuracy {pmt[1]:.4f} vs FedAvg-drop {drop[1]:.4f} (goal: >=) "
          f"{'PASS' if pmt[1] >= drop[1] else 'SHORT'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
