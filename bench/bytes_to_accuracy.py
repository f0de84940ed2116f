"""Bytes to accuracy: every algorithm, same model, data, partition and seeds, each run until a
target test accuracy, each configuration once per seed (default 3 seeds); prints the median
and the range over seeds of versions, local steps, uplink and downlink bytes and the final
accuracy, and the per-seed ratios of uplink bytes to FedAvg H = 20 and to per-step sync
(FedAvg H = 1, the FDA paper's "Synchronous" baseline), as median (range).

Two engines, the same algorithm code:
- `--engine sim` (default): fl-sim in this process, virtual time (coordinator/sim_engine.py).
  The training, the state machines and the encoded message sizes are the real ones; only time
  is modelled (0.05 s per step, instant links and coordinator), so bytes, versions and
  accuracies are deterministic given the seed and independent of the machine's load. FDA's
  trigger then acts on the very step its estimate crosses Theta.
- `--engine real`: one Mosquitto, a coordinator and N agents as processes (fleet_runs.py).

Configurations are named `algo[-variant][@value]`: `fedavg` (H = 20), `sync` (H = 1),
`fda-linear@120` (variant, Theta), `fda-naive`, `fda-sketch` (the task's Theta), `lbgm@0.6`
(delta), `lbgm-h1`, `lbgm-h5` (H = 1, 5), `dga`, `drpga`, `drpga-0.05`. All numbers come
from each run's events.

    python bench/bytes_to_accuracy.py --datasets mnist --algos fedavg,sync,fda-linear,lbgm
    python bench/bytes_to_accuracy.py --datasets mnist --algos fedavg,fda-linear@30,fda-linear@120
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from timing import median_range as med

# name -> job keys (flat, as load_config takes them) and eval_every
BASE = {
    "sync": {"algo": "fedavg", "local_steps": 1, "eval_every": 25},
    "fedavg": {"algo": "fedavg", "local_steps": 20},
    "dga": {"algo": "dga", "period": 20, "delay": 2},
    "drpga": {"algo": "drpga", "period": 20, "delay": 2, "eval_every": 5},
    "drpga-0.05": {"algo": "drpga", "period": 20, "delay": 2, "rate": 0.05, "eval_every": 5},
    "fda": {"algo": "fda", "fda_variant": "linear"},
    "fda-naive": {"algo": "fda", "fda_variant": "naive"},
    "fda-linear": {"algo": "fda", "fda_variant": "linear"},
    "fda-sketch": {"algo": "fda", "fda_variant": "sketch"},
    "lbgm": {"algo": "lbgm", "local_steps": 20},
    # the authors' training loop takes one mini-batch per round [ALGORITHMS.md 6]
    "lbgm-h1": {"algo": "lbgm", "local_steps": 1, "eval_every": 25},
    "lbgm-h5": {"algo": "lbgm", "local_steps": 5, "eval_every": 5},
}
VALUE_KEY = {"fda": "fda_theta", "lbgm": "lbgm_threshold", "fedavg": "local_steps",
             "drpga": "rate"}
TARGETS = {"mnist": 0.97, "fashion": 0.80, "digits": 0.95}


def job_keys(name: str) -> dict:
    """`fda-linear@120` -> the job keys of fda-linear with fda_theta 120."""
    base, _, value = name.partition("@")
    if base not in BASE:
        raise SystemExit(f"unknown configuration {name!r}; known: {', '.join(BASE)} "
                         f"(with @value for {', '.join(VALUE_KEY)})")
    keys = dict(BASE[base])
    if value:
        key = VALUE_KEY[keys["algo"]]
        keys[key] = int(value) if key == "local_steps" else float(value)
    return keys


@dataclass
class Result:
    name: str
    seed: int
    reached: bool
    versions: int
    local_steps: int
    up: int
    up_model: int
    up_control: int
    down: int
    accuracy: float
    kb_per_update: float  # model bytes per update: LBGM's scalars show as fewer than FedAvg's
    seconds: float


def flags_of(keys: dict) -> list[str]:
    out = []
    for k, v in keys.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def run_sim(name: str, dataset: str, seed: int, args: argparse.Namespace, workdir: Path
            ) -> list[dict]:
    from fleetfl.coordinator.rundir import RunDir
    from fleetfl.coordinator.simulator import DeviceProfile, SimConfig, Simulator
    from fleetfl.shared.config import load_config

    run = f"{dataset}-{name}-s{seed}".replace("@", "_")
    cfg = load_config(None, {
        **job_keys(name), "run": run, "task": dataset, "data_dir": args.data_dir or None,
        "partition": "dirichlet", "alpha": args.alpha, "seed": seed,
        "target_accuracy": TARGETS[dataset], "max_versions": args.max_versions,
        "min_agents": args.agents})
    step_s = 0.05
    sim = SimConfig(agents=args.agents, profiles=[DeviceProfile("device", step_s)],
                    coord_version_s=0.0, max_time=args.max_steps * step_s, seed=seed)
    simulator = Simulator(cfg, sim, run_dir=workdir / "runs" / run)
    simulator.run()
    return RunDir(workdir / "runs" / run).events()


def run_real(broker, name: str, dataset: str, seed: int, args: argparse.Namespace,
             workdir: Path) -> list[dict]:
    from fleet_runs import run_fleet

    keys = job_keys(name)
    flags = [*flags_of(keys), "--dataset", dataset, "--partition", "dirichlet", "--alpha",
             str(args.alpha), "--target-accuracy", str(TARGETS[dataset]), "--max-versions",
             str(args.max_versions), "--seed", str(seed)]
    return run_fleet(broker.url, f"{dataset}-{name}-s{seed}".replace("@", "_"), workdir,
                     flags, args.agents, args.data_dir, args.timeout)


def summarise(name: str, seed: int, events: list[dict], target: float, seconds: float
              ) -> Result:
    last = events[-1]
    accuracies = [e["accuracy"] for e in events if e.get("accuracy") is not None]
    updates = sum(len(e.get("contributors") or ()) for e in events)
    return Result(name, seed, bool(accuracies) and max(accuracies) >= target, last["version"],
                  sum(e.get("local_steps", 0) for e in events), last["bytes_up_total"],
                  last["up_model"], last["up_control"], last["bytes_down_total"],
                  accuracies[-1] if accuracies else float("nan"),
                  last["up_model"] / updates / 1e3 if updates else float("nan"), seconds)


def ratios(results: list[Result], base: list[Result]) -> list[float]:
    """Per seed: uplink bytes / the baseline's with the same seed."""
    by_seed = {r.seed: r.up for r in base}
    return [r.up / by_seed[r.seed] for r in results if by_seed.get(r.seed)]


def print_table(dataset: str, names: list[str], results: dict[str, list[Result]],
                engine: str) -> None:
    fedavg, sync = results.get("fedavg", []), results.get("sync", [])
    print(f"\n### {dataset}: target accuracy {TARGETS[dataset]} ({engine}; median (range) "
          f"over seeds {sorted({r.seed for rs in results.values() for r in rs})})\n")
    print("| config | reached | versions | local steps (all agents) | MB up | MB up control | "
          "MB down | final acc | KB / update | up / FedAvg H=20 | FedAvg / up | sync / up |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        rs = results[name]
        to_fedavg = ratios(rs, fedavg)
        print(f"| {name} | {sum(r.reached for r in rs)}/{len(rs)} | "
              f"{med([r.versions for r in rs], '{:.0f}')} | "
              f"{med([r.local_steps for r in rs], '{:.0f}')} | "
              f"{med([r.up / 1e6 for r in rs])} | "
              f"{med([r.up_control / 1e6 for r in rs], '{:.3f}')} | "
              f"{med([r.down / 1e6 for r in rs])} | {med([r.accuracy for r in rs], '{:.4f}')} | "
              f"{med([r.kb_per_update for r in rs], '{:.1f}')} | {med(to_fedavg, '{:.3f}')} | "
              f"{med([1 / x for x in to_fedavg], '{:.1f}')} | "
              f"{med([1 / x for x in ratios(rs, sync)], '{:.1f}')} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="mnist")
    p.add_argument("--algos", default="fedavg,sync,fda-linear,lbgm",
                   help="comma list of configurations (see above)")
    p.add_argument("--engine", choices=("sim", "real"), default="sim")
    p.add_argument("--seeds", default="0,1,2", help="one run per seed and configuration")
    p.add_argument("--agents", type=int, default=8)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--max-versions", type=int, default=3000)
    p.add_argument("--max-steps", type=int, default=3000,
                   help="sim: local steps per agent before a run is cut (FDA that never syncs)")
    p.add_argument("--timeout", type=float, default=1800.0, help="real: per run")
    p.add_argument("--data-dir", default=os.environ.get("FL_DATA_DIR", ""))
    p.add_argument("--keep", help="keep run directories here (default: a temp dir)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    workdir = Path(args.keep or tempfile.mkdtemp(prefix="fl-bytes-"))
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.algos.split(",")
    for name in names:
        job_keys(name)
    print(f"{args.agents} agents, Dirichlet {args.alpha}, seeds {seeds}, engine {args.engine}; "
          f"runs in {workdir}; load {os.getloadavg()[0]:.1f}", flush=True)
    broker = None
    if args.engine == "real":
        from fleetfl.shared.devtools.local_broker import LocalMosquitto

        broker = LocalMosquitto().__enter__()
    try:
        for dataset in args.datasets.split(","):
            results: dict[str, list[Result]] = {n: [] for n in names}
            for seed in seeds:  # interleaved: a load change hits every configuration
                for name in names:
                    start = time.monotonic()
                    events = (run_sim(name, dataset, seed, args, workdir) if broker is None
                              else run_real(broker, name, dataset, seed, args, workdir))
                    r = summarise(name, seed, events, TARGETS[dataset], time.monotonic() - start)
                    results[name].append(r)
                    print(f"  {dataset}/{name}/seed {seed}: {r.versions} versions, acc "
                          f"{r.accuracy:.4f}{'' if r.reached else ' (NOT reached)'}, "
                          f"{r.up / 1e6:.2f} MB up, {r.seconds:.0f} s wall, load "
                          f"{os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
            print_table(dataset, names, results, args.engine)
    finally:
        if broker is not None:
            broker.__exit__(None, None, None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
