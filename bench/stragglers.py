"""Stragglers: a fleet where half the devices are 4x slower (`fl-agent --slowdown 4`), same
data, model and seeds, run three ways in the same code path:

- FedAvg-wait: every round waits for every device (the slow half sets the pace);
- FedAvg-drop: rounds end at a deadline, devices that miss it are dropped (FedDrop-like);
- FedPMT: the same deadline, slow devices train only the trailing layers they can finish.

The deadline is `--deadline-factor` x the full-model round time of the k-th fastest device
(k = the number of fast devices), from measured profiles and speeds. Every configuration runs
once per seed (`--seeds`, default 3, interleaved so a change of machine load hits all three);
prints the median and range over seeds of the time to the target accuracy, the versions, the
seconds per version and the final accuracy, and the per-seed speed-ups over FedAvg-wait, all
read from each run's events.jsonl.

The regime must be one where waiting for stragglers dominates a round: the slow agents' round
must be much longer than a fast agent's round plus the coordinator's overhead per version, and
the agents must not be bound by this host's 2 cores. So every agent runs at a device's pace:
`--slowdown` makes a step take that many times its compute (a sleep after each step, no CPU),
the fast agents at `--pace` and the slow ones at `--pace` x `--straggle`. By default the pace
is chosen from one measured local step so that a fast round (H steps) takes `--fast-round`
seconds (2 s; slow rounds 8 s), and 8 agents then use under one core between them. The bench
prints the measured step, the pace and the fast and slow round times, and the 1-minute load
average with every run. (The first version of this bench slowed only the stragglers: on an
idle host LeNet-5 takes 3 ms a step, so rounds were 0.3 s against 1.2 s, and the 8 agents'
compute on 2 cores and the evaluation set the pace rather than the stragglers.)

fl-sim does not model FedPMT's layer profiles or frozen layers (sim_engine.UNMODELLED), so
this bench has no virtual-time mode.

    python bench/stragglers.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from fleet_runs import run_fleet, time_to
from timing import median_range as med

from fleetfl.coordinator.report import report
from fleetfl.shared.devtools.local_broker import LocalMosquitto


def measure_step(args: argparse.Namespace) -> float:
    """Median seconds of one local step of the job on this machine, now (one thread)."""
    from fleetfl.coordinator.sim_calibration import measure_step_s
    from fleetfl.shared.config import load_config

    return measure_step_s(load_config(None, {"task": args.dataset,
                                             "data_dir": args.data_dir or None}), repeats=50)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default=os.environ.get("FL_DATA_DIR", ""))
    p.add_argument("--agents", type=int, default=8)
    p.add_argument("--slow", type=int, default=0, help="slow agents (default: half)")
    p.add_argument("--straggle", "--slowdown", dest="straggle", type=float, default=4.0,
                   help="the slow agents' rounds take this many times a fast agent's")
    p.add_argument("--pace", type=float, default=0.0,
                   help="every agent's --slowdown (fast agents; slow ones x --straggle); "
                        "default: from --fast-round and one measured step")
    p.add_argument("--fast-round", type=float, default=2.0,
                   help="seconds of a fast agent's round when --pace is not given")
    p.add_argument("--target", type=float, default=0.98)
    p.add_argument("--seeds", default="0,1,2", help="one run per seed and configuration")
    p.add_argument("--max-versions", type=int, default=150)
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
    seeds = [int(x) for x in args.seeds.split(",")]
    step = measure_step(args)
    pace = args.pace or max(1.0, args.fast_round / (args.local_steps * step))
    fast_round = args.local_steps * step * pace
    print(f"{args.agents} agents, {slow} of them {args.straggle}x slower; {args.dataset} "
          f"Dirichlet 0.5; H = {args.local_steps}; target {args.target}; seeds {seeds}; runs "
          f"in {workdir}\nmeasured step {step * 1e3:.1f} ms (load {os.getloadavg()[0]:.1f}); "
          f"pace: fast agents --slowdown {pace:.2f}, slow {pace * args.straggle:.2f}: "
          f"fast round ~{fast_round:.2f} s, slow round ~{fast_round * args.straggle:.2f} s "
          f"(waiting adds ~{fast_round * (args.straggle - 1):.2f} s per FedAvg-wait round)")
    rows: dict[str, list[tuple]] = {name: [] for name in configs}
    with LocalMosquitto() as broker:
        for seed in seeds:
            for name, flags in configs.items():
                run = f"{name}-s{seed}"
                events = run_fleet(
                    broker.url, run, workdir,
                    [*flags, "--dataset", args.dataset, "--partition", "dirichlet",
                     "--local-steps", str(args.local_steps), "--target-accuracy",
                     str(args.target), "--max-versions", str(args.max_versions),
                     "--eval-every", "1", "--seed", str(seed)],
                    args.agents, args.data_dir,
                    agent_flags=lambda i: ["--slowdown",
                                           str(pace * (args.straggle if i >= fast else 1))])
                accuracies = [e["accuracy"] for e in events if e["accuracy"] is not None]
                versions, total = events[-1]["version"], events[-1]["time"]
                rows[name].append((seed, time_to(events, args.target), accuracies[-1],
                                   versions, total / max(versions, 1)))
                print(f"  {run}: {rows[name][-1]}, load {os.getloadavg()[0]:.1f}", flush=True)
    wait = {r[0]: r[1] for r in rows["fedavg-wait"]}
    print(f"\nmedian (range) over seeds {seeds}; load at the end {os.getloadavg()[0]:.1f}\n")
    print(f"| run | reached | time to {args.target} (s) | speed-up vs wait | versions | "
          "s / version | final acc |")
    print("|---|---|---:|---:|---:|---:|---:|")
    speedups = {}
    for name, rs in rows.items():
        times = [r[1] for r in rs if r[1] is not None]
        speedups[name] = [wait[r[0]] / r[1] for r in rs if r[1] and wait.get(r[0])]
        print(f"| {name} | {len(times)}/{len(rs)} | {med(times, '{:.1f}')} | "
              f"{med(speedups[name], '{:.2f}')}x | {med([r[3] for r in rs], '{:.0f}')} | "
              f"{med([r[4] for r in rs], '{:.2f}')} | {med([r[2] for r in rs], '{:.4f}')} |")
    out = Path(args.out)
    print("\n" + report([workdir / "runs" / f"{name}-s{seeds[0]}" for name in configs], out,
                        args.target, baseline=f"fedavg-wait-s{seeds[0]}",
                        title=f"Stragglers: {slow} of {args.agents} agents "
                              f"{args.straggle:g}x slower (seed {seeds[0]})"))
    print(f"fl-report plots: {out}/")
    pmt = speedups["fedpmt"]
    if pmt:
        ratio = statistics.median(pmt)
        print(f"\nFedPMT vs FedAvg-wait time to target: median {ratio:.2f}x (range "
              f"{min(pmt):.2f}-{max(pmt):.2f}; goal >= 1.5x) {'PASS' if ratio >= 1.5 else 'SHORT'}")
    best = {name: statistics.median(r[2] for r in rs) for name, rs in rows.items()}
    print(f"FedPMT final accuracy (median) {best['fedpmt']:.4f} vs FedAvg-drop "
          f"{best['fedavg-drop']:.4f} (goal: >=) "
          f"{'PASS' if best['fedpmt'] >= best['fedavg-drop'] else 'SHORT'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
