"""Bytes to accuracy: every algorithm, same model, data, partition and seeds, run for real
(one Mosquitto, a coordinator and N agents as processes) until a target test accuracy.

Prints, per data set, total payload bytes up (model + control) and down, versions, local steps
and final accuracy, with ratios to FedAvg and to per-step synchronous averaging (FedAvg with
H = 1, the FDA paper's "Synchronous" baseline), all read from each run's events.jsonl.

    python bench/bytes_to_accuracy.py --data-dir ../shared/data            # MNIST + Fashion
    python bench/bytes_to_accuracy.py --datasets mnist --agents 8 --algos fedavg,fda
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fleet_runs import run_fleet

from fleetfl.coordinator.report import report
from fleetfl.shared.devtools.local_broker import LocalMosquitto

# name -> coordinator flags; "sync" is per-step averaging (FedAvg, H = 1)
CONFIGS = {
    "sync": ["--algo", "fedavg", "--local-steps", "1", "--eval-every", "25"],
    "fedavg": ["--algo", "fedavg", "--local-steps", "20"],
    "dga": ["--algo", "dga", "--period", "20", "--delay", "2"],
    "drpga": ["--algo", "drpga", "--period", "20", "--delay", "2", "--eval-every", "5"],
    "fda": ["--algo", "fda", "--fda-variant", "linear", "--eval-every", "1"],
    "fda-naive": ["--algo", "fda", "--fda-variant", "naive"],
    "fda-sketch": ["--algo", "fda", "--fda-variant", "sketch"],
    # Theta sweep around the calibrated default (ALGORITHMS.md 5: x 0.25 .. 4)
    "fda-theta4x": ["--algo", "fda", "--fda-variant", "linear", "--fda-theta", "10.6"],
    "fda-theta16x": ["--algo", "fda", "--fda-variant", "linear", "--fda-theta", "42.5"],
    "drpga-0.05": ["--algo", "drpga", "--period", "20", "--delay", "2", "--rate", "0.05",
                   "--eval-every", "5"],
    "drpga-walk": ["--algo", "drpga", "--period", "20", "--delay", "2", "--rate-walk",
                   "--eval-every", "5"],
    "lbgm": ["--algo", "lbgm", "--local-steps", "20"],
    # the authors' training loop takes one mini-batch per round [ALGORITHMS.md 6]
    "lbgm-h1": ["--algo", "lbgm", "--local-steps", "1", "--eval-every", "25"],
    "lbgm-d0.9": ["--algo", "lbgm", "--local-steps", "20", "--lbgm-threshold", "0.9"],
}
TARGETS = {"mnist": 0.97, "fashion": 0.80, "digits": 0.95}


@dataclass
class Result:
    name: str
    reached: bool
    versions: int
    local_steps: int
    up: int
    up_model: int
    up_control: int
    down: int
    accuracy: float
    seconds: float


def run_one(broker: LocalMosquitto, name: str, dataset: str, args: argparse.Namespace,
            workdir: Path) -> Result:
    flags = [*CONFIGS[name], "--dataset", dataset, "--partition", "dirichlet", "--alpha",
             str(args.alpha), "--target-accuracy", str(TARGETS[dataset]), "--max-versions",
             str(args.max_versions), "--seed", str(args.seed)]
    start = time.monotonic()
    events = run_fleet(broker.url, f"{dataset}-{name}", workdir, flags, args.agents,
                       args.data_dir, args.timeout)
    last = events[-1]
    accuracies = [e["accuracy"] for e in events if e["accuracy"] is not None]
    return Result(name, max(accuracies) >= TARGETS[dataset], last["version"],
                  sum(e.get("local_steps", 0) for e in events), last["bytes_up_total"],
                  last["up_model"], last["up_control"], last["bytes_down_total"],
                  accuracies[-1], time.monotonic() - start)


def ratio(a: int, b: int | None) -> str:
    return f"{a / b:.3g}" if b else "-"


def print_table(dataset: str, results: list[Result]) -> None:
    by = {r.name: r for r in results}
    fedavg, sync = by.get("fedavg"), by.get("sync")
    print(f"\n### {dataset}: target accuracy {TARGETS[dataset]}\n")
    print("| algo | reached | versions | local steps | MB up (model + control) | MB down | "
          "final acc | up / FedAvg | up / sync | total / FedAvg | total / sync | wall s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        total = r.up + r.down
        print(f"| {r.name} | {'yes' if r.reached else 'NO'} | {r.versions} | {r.local_steps} | "
              f"{r.up / 1e6:.2f} ({r.up_model / 1e6:.2f} + {r.up_control / 1e6:.3f}) | "
              f"{r.down / 1e6:.2f} | {r.accuracy:.4f} | "
              f"{ratio(r.up, fedavg and fedavg.up)} | {ratio(r.up, sync and sync.up)} | "
              f"{ratio(total, fedavg and fedavg.up + fedavg.down)} | "
              f"{ratio(total, sync and sync.up + sync.down)} | {r.seconds:.0f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="mnist,fashion")
    p.add_argument("--algos", default="sync,fedavg,dga,drpga,fda,lbgm",
                   help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--agents", type=int, default=8)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-versions", type=int, default=3000)
    p.add_argument("--timeout", type=float, default=1800.0, help="per run")
    p.add_argument("--data-dir", default=os.environ.get("FL_DATA_DIR", ""))
    p.add_argument("--keep", help="keep run directories here (default: a temp dir)")
    p.add_argument("--out", default="bench/results/bytes_to_accuracy",
                   help="fl-report plots and report.md go here, one folder per data set")
    args = p.parse_args(argv)
    workdir = Path(args.keep or tempfile.mkdtemp(prefix="fl-bytes-"))
    print(f"{args.agents} agents, Dirichlet {args.alpha}, seed {args.seed}; runs in {workdir}")
    with LocalMosquitto() as broker:
        for dataset in args.datasets.split(","):
            results = []
            for name in args.algos.split(","):
                results.append(run_one(broker, name, dataset, args, workdir))
                r = results[-1]
                print(f"  {dataset}/{name}: {r.versions} versions, acc {r.accuracy:.4f}, "
                      f"{r.up / 1e6:.2f} MB up, {r.seconds:.0f} s", flush=True)
            print_table(dataset, results)
            out = Path(args.out) / dataset
            names = args.algos.split(",")
            print("\n" + report([workdir / "runs" / f"{dataset}-{n}" for n in names], out,
                                TARGETS[dataset], baseline=f"{dataset}-fedavg",
                                title=f"Bytes to accuracy, {dataset}, {args.agents} agents"))
            print(f"fl-report plots: {out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
