"""Bytes to accuracy: every algorithm, same model, data, partition and seeds, each run until a
target test accuracy, each configuration once per seed (default 3 seeds); prints the median
and the range over seeds of versions, local steps, uplink and downlink bytes and the final
accuracy, and the per-seed uplink bytes as a percentage of FedAvg H = 20's and the ratio of
per-step sync's (FedAvg H = 1, the FDA paper's "Synchronous" baseline) to them, as median
(range); optionally a CSV row per run (--csv) and plots (--plot): accuracy against uplink
bytes, and each run's uplink share split into bytes per version and versions to the target.

Two engines, the same algorithm code:
- `--engine sim` (default): fl-sim in this process, virtual time (coordinator/sim_engine.py).
  The training, the state machines and the encoded message sizes are the real ones; only time
  is modelled (0.05 s per step, instant links and coordinator), so bytes, versions and
  accuracies are deterministic given the seed and independent of the machine's load. FDA's
  trigger then acts on the very step its estimate crosses Theta.
- `--engine real`: one Mosquitto, a coordinator and N agents as processes (fleet_runs.py).

Configurations are named `algo[-variant][@value][+compression]`: `fedavg` (H = 20; `fedavg@5`:
H = 5), `sync` (H = 1), `fda-linear@120` (variant, Theta), `fda-naive`, `fda-sketch` (the
task's Theta), `lbgm@0.6` (delta), `lbgm-h1`, `lbgm-h5` (H = 1, 5), `dga`, `drpga` (rate 0.1),
`drpga-0.05`, `drpga@0.02` (rate), `fedbuff` (K = 20, B = min_agents), `fedbuff@4` (B).
`+q8`, `+q4`, `+topk` (density 0.01) or `+topk@0.005` (density) compresses any of them with
`--compress` (README "Compressed payloads"): `fedavg+q4`, `drpga-0.05+q4`, `fda-linear+q4`,
`fedbuff+topk@0.01`, `lbgm@0.95+q8`. All numbers come from each run's events.

The target accuracy: by default the data set's fixed one (TARGETS), and every run stops at
its first evaluation at or above it. With `--vs-fedavg N` it is relative, per seed: FedAvg
H = 20 runs N versions (no target; it runs first, whatever --algos says), and the target of
that seed is FedAvg's accuracy after N versions minus `--tolerance` (default 0.005, i.e.
0.5 pt); every configuration then runs to that target. Either way versions, local steps and
bytes are counted up to the first evaluation at or above the target (so FedAvg's own row is
its cost to the target, not to N versions); a run that never reaches it stops after
`--max-steps` local steps per agent (or --max-versions) and its row says so ("reached" k/n)
with its best accuracy. Evaluations come every version except where BASE sets eval_every (up
to eval_every - 1 versions of bytes of overshoot).

    python bench/bytes_to_accuracy.py --datasets mnist --algos fedavg,sync,fda-linear,lbgm
    python bench/bytes_to_accuracy.py --datasets mnist --algos fedavg,fda-linear@30,fda-linear@120
    python bench/bytes_to_accuracy.py --datasets mnist --vs-fedavg 20 \
        --algos fedavg+q4,drpga+q4,fedavg+topk@0.01 --csv runs.csv --plot figs/
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
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
    "fedbuff": {"algo": "fedbuff", "period": 20},  # K as FedAvg's H
}
VALUE_KEY = {"fda": "fda_theta", "lbgm": "lbgm_threshold", "fedavg": "local_steps",
             "drpga": "rate", "fedbuff": "buffer"}
INT_KEYS = {"local_steps", "buffer"}
COMPRESSIONS = ("q8", "q4", "topk")  # `+name`; only topk takes a value (its density)
TARGETS = {"mnist": 0.97, "fashion": 0.80, "digits": 0.95}
BASELINE = "fedavg"  # what --vs-fedavg measures the target from, and percentages refer to
GOALS = (0.10, 0.03)  # issue 17's shares of FedAvg's uplink bytes to the target, drawn by --plot


def job_keys(name: str) -> dict:
    """`fda-linear@120+q4` -> the job keys of fda-linear with fda_theta 120, compressed to
    4 bits; `fedavg+topk@0.005` -> FedAvg H = 20 sending the top 0.5% of values."""
    config, plus, compression = name.partition("+")
    base, _, value = config.partition("@")
    if base not in BASE:
        raise SystemExit(f"unknown configuration {name!r}; known: {', '.join(BASE)} "
                         f"(with @value for {', '.join(VALUE_KEY)}; "
                         f"+{', +'.join(COMPRESSIONS)} or +topk@density)")
    keys = dict(BASE[base])
    try:
        if value:
            key = VALUE_KEY[keys["algo"]]
            keys[key] = int(value) if key in INT_KEYS else float(value)
        if plus:
            kind, at, density = compression.partition("@")
            if kind not in COMPRESSIONS or (at and kind != "topk"):
                raise ValueError(f"compression {compression!r}: one of "
                                 f"{', '.join(COMPRESSIONS)}, or topk@density")
            keys["compress"] = kind
            if at:
                keys["topk_density"] = float(density)
                if not 0 < keys["topk_density"] <= 1:
                    raise ValueError(f"density {density}: in (0, 1]")
    except (KeyError, ValueError) as exc:
        raise SystemExit(f"configuration {name!r}: {exc}") from None
    return keys


def run_name(dataset: str, name: str, seed: int) -> str:
    """The run's folder name: `@` and `+` are kept out of paths."""
    return f"{dataset}-{name}-s{seed}".replace("@", "_").replace("+", "_")


@dataclass
class Result:
    name: str
    seed: int
    target: float
    reached: bool
    versions: int  # at the first evaluation at or above the target, else at the end
    local_steps: int
    up: int
    up_model: int
    up_control: int
    down: int
    accuracy: float  # at the last evaluation (where the run stopped)
    best: float
    kb_per_update: float  # model bytes per update: LBGM's scalars show as fewer than FedAvg's
    seconds: float
    curve: list[tuple[int, int, float]] = field(default_factory=list)  # (up, down, accuracy)


def flags_of(keys: dict) -> list[str]:
    out = []
    for k, v in keys.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def run_sim(name: str, dataset: str, seed: int, args: argparse.Namespace, workdir: Path,
            target: float, max_versions: int) -> list[dict]:
    from fleetfl.coordinator.rundir import RunDir
    from fleetfl.coordinator.simulator import DeviceProfile, SimConfig, Simulator
    from fleetfl.shared.config import load_config

    run = run_name(dataset, name, seed)
    cfg = load_config(None, {
        **job_keys(name), "run": run, "task": dataset, "data_dir": args.data_dir or None,
        "partition": "dirichlet", "alpha": args.alpha, "seed": seed,
        "target_accuracy": target, "max_versions": max_versions,
        "min_agents": args.agents})
    step_s = 0.05
    sim = SimConfig(agents=args.agents, profiles=[DeviceProfile("device", step_s)],
                    coord_version_s=0.0, max_time=args.max_steps * step_s, seed=seed)
    simulator = Simulator(cfg, sim, run_dir=workdir / "runs" / run)
    simulator.run()
    return RunDir(workdir / "runs" / run).events()


def run_real(broker, name: str, dataset: str, seed: int, args: argparse.Namespace,
             workdir: Path, target: float, max_versions: int) -> list[dict]:
    from fleet_runs import run_fleet

    keys = job_keys(name)
    flags = [*flags_of(keys), "--dataset", dataset, "--partition", "dirichlet", "--alpha",
             str(args.alpha), "--target-accuracy", str(target), "--max-versions",
             str(max_versions), "--seed", str(seed)]
    return run_fleet(broker.url, run_name(dataset, name, seed), workdir, flags, args.agents,
                     args.data_dir, args.timeout)


def summarise(name: str, seed: int, events: list[dict], target: float, seconds: float
              ) -> Result:
    """Counts up to the first evaluation at or above the target (the whole run if none)."""
    hit = next((i for i, e in enumerate(events)
                if e.get("accuracy") is not None and e["accuracy"] >= target), None)
    upto = events[: len(events) if hit is None else hit + 1]
    at = upto[-1]
    accuracies = [e["accuracy"] for e in events if e.get("accuracy") is not None]
    updates = sum(len(e.get("contributors") or ()) for e in upto)
    curve = [(e["bytes_up_total"], e["bytes_down_total"], e["accuracy"]) for e in events
             if e.get("accuracy") is not None]
    nan = float("nan")
    return Result(name, seed, target, hit is not None, at["version"],
                  sum(e.get("local_steps", 0) for e in upto), at["bytes_up_total"],
                  at["up_model"], at["up_control"], at["bytes_down_total"],
                  accuracies[-1] if accuracies else nan, max(accuracies, default=nan),
                  at["up_model"] / updates / 1e3 if updates else nan, seconds, curve)


def ratios(results: list[Result], base: list[Result]) -> list[float]:
    """Per seed: uplink bytes / the baseline's with the same seed."""
    by_seed = {r.seed: r.up for r in base}
    return [r.up / by_seed[r.seed] for r in results if by_seed.get(r.seed)]


def criterion(dataset: str, args: argparse.Namespace, results: dict[str, list[Result]]
              ) -> str:
    if not args.vs_fedavg:
        return (f"target accuracy {TARGETS[dataset]} (fixed); each run stops at its first "
                "evaluation at or above it")
    finals = ", ".join(f"seed {r.seed}: {r.accuracy:.4f} -> {r.target:.4f}"
                       for r in results[BASELINE])
    return (f"target per seed = FedAvg H=20's accuracy after {args.vs_fedavg} versions minus "
            f"{args.tolerance * 100:g} pt ({finals}); bytes, versions and steps counted up to "
            f"the first evaluation at or above it; runs that never reach it are cut at "
            f"{args.max_steps} local steps per agent (reached < n/n, best acc)")


def print_table(dataset: str, names: list[str], results: dict[str, list[Result]],
                engine: str, crit: str) -> None:
    fedavg, sync = results.get(BASELINE, []), results.get("sync", [])
    print(f"\n### {dataset}: {crit} ({engine}; median (range) over seeds "
          f"{sorted({r.seed for rs in results.values() for r in rs})})\n")
    print("| config | reached | versions | local steps (all agents) | MB up | % of FedAvg up | "
          "MB up control | MB down | % of FedAvg down | final acc | best acc | KB / update | "
          "sync / up |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        rs = results[name]
        down_ratios = [r.down / b.down for r in rs for b in fedavg if b.seed == r.seed and b.down]
        print(f"| {name} | {sum(r.reached for r in rs)}/{len(rs)} | "
              f"{med([r.versions for r in rs], '{:.0f}')} | "
              f"{med([r.local_steps for r in rs], '{:.0f}')} | "
              f"{med([r.up / 1e6 for r in rs], '{:.3f}')} | "
              f"{med([100 * x for x in ratios(rs, fedavg)], '{:.1f}%')} | "
              f"{med([r.up_control / 1e6 for r in rs], '{:.3f}')} | "
              f"{med([r.down / 1e6 for r in rs], '{:.3f}')} | "
              f"{med([100 * x for x in down_ratios], '{:.1f}%')} | "
              f"{med([r.accuracy for r in rs], '{:.4f}')} | "
              f"{med([r.best for r in rs], '{:.4f}')} | "
              f"{med([r.kb_per_update for r in rs], '{:.1f}')} | "
              f"{med([1 / x for x in ratios(rs, sync)], '{:.1f}')} |")


def write_csv(path: Path, dataset: str, results: dict[str, list[Result]]) -> None:
    """One row per run, appended (several invocations fill one file)."""
    fedavg = {r.seed: r for r in results.get(BASELINE, [])}
    fields = ["dataset", *[k for k in Result.__dataclass_fields__ if k != "curve"],
              "up_pct_of_fedavg", "down_pct_of_fedavg"]
    new = not path.exists()
    with path.open("a", newline="") as f:
        out = csv.DictWriter(f, fields)
        if new:
            out.writeheader()
        for rs in results.values():
            for r in rs:
                row = {k: v for k, v in asdict(r).items() if k != "curve"}
                base = fedavg.get(r.seed)
                out.writerow({"dataset": dataset, **row,
                              "up_pct_of_fedavg": 100 * r.up / base.up if base else "",
                              "down_pct_of_fedavg": 100 * r.down / base.down if base else ""})


def plot(path: Path, dataset: str, names: list[str], results: dict[str, list[Result]],
         crit: str) -> None:
    """Accuracy against uplink bytes (log), one panel per seed with that seed's target and
    GOALS' shares of FedAvg's bytes to it: where each curve first crosses the target line is
    its row in the table, and a goal is met by a curve that crosses it left of the goal's
    line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({r.seed for rs in results.values() for r in rs})
    fig, axes = plt.subplots(1, len(seeds), figsize=(5.2 * len(seeds), 4.8), sharey=True,
                             squeeze=False)
    for ax, seed in zip(axes[0], seeds, strict=True):
        target = next(r.target for rs in results.values() for r in rs if r.seed == seed)
        for i, name in enumerate(names):
            for r in results[name]:
                if r.seed == seed and r.curve:
                    ax.plot([max(u, 1) / 1e6 for u, _, _ in r.curve],
                            [a for _, _, a in r.curve], marker="osD^vP*X"[i % 8],
                            markersize=3, linewidth=1, label=name, color=f"C{i % 10}")
        ax.axhline(target, color="grey", linestyle=":", linewidth=1)
        base = next((r for r in results.get(BASELINE, []) if r.seed == seed and r.reached), None)
        for share in GOALS if base else ():  # a goal is met left of its line, above the target
            ax.axvline(share * base.up / 1e6, color="black", linestyle="--", linewidth=0.8)
            ax.annotate(f"{share:.0%} of FedAvg", (share * base.up / 1e6, 0.02),
                        xycoords=("data", "axes fraction"), rotation=90, fontsize=7,
                        xytext=(-3, 0), textcoords="offset points", ha="right")
        ax.annotate(f"target {target:.4f}", (0.99, target), xycoords=("axes fraction", "data"),
                    xytext=(0, 3), textcoords="offset points", ha="right", fontsize=8,
                    color="grey")
        ax.set_xscale("log")
        ax.set_ylim(target - 0.05, target + 0.02)
        ax.set_title(f"{dataset}, seed {seed}", fontsize=10)
        ax.set_xlabel("uplink bytes, all agents (MB, log)")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("test accuracy")
    handles, labels = axes[0][0].get_legend_handles_labels()
    ncol = min(len(names), 3 * len(seeds))
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8)
    fig.suptitle(crit if len(crit) < 140 else crit[:crit.index(" (")], fontsize=9)
    fig.tight_layout(rect=(0, 0.03 + 0.045 * -(-len(names) // ncol), 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_cost(path: Path, dataset: str, names: list[str], results: dict[str, list[Result]]
              ) -> None:
    """Why a share of FedAvg's uplink is what it is: share = (bytes per version / FedAvg's)
    x (versions to the target / FedAvg's). One point per run, against FedAvg with its seed;
    GOALS are the hyperbolas x y = share. Hollow: never reached (its versions a lower bound)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = {r.seed: r for r in results.get(BASELINE, []) if r.reached}
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, name in enumerate(names):
        runs = [(r, base[r.seed]) for r in results[name] if r.seed in base and r.versions]
        for reached in (True, False):
            pts = [(100 * (r.up / r.versions) / (b.up / b.versions), r.versions / b.versions)
                   for r, b in runs if r.reached == reached]
            if pts:
                ax.scatter(*zip(*pts, strict=True), marker="osD^vP*X"[i % 8], s=36,
                           color=f"C{i % 10}", facecolors=None if reached else "none",
                           label=name if reached else f"{name} (not reached)")
    xs = [10 ** (k / 20) for k in range(-40, 61)]  # 0.01% .. 1000% per version
    for share in GOALS:
        ax.plot(xs, [100 * share / x for x in xs], "k--", linewidth=0.8)
        ax.annotate(f"{share:.0%} of FedAvg's uplink", (100 * share / 0.25, 0.25), fontsize=8,
                    rotation=-38, ha="center", va="bottom")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(0.3, 150)
    ax.set_ylim(0.15, 12)
    ax.set_xlabel("uplink bytes per version, % of FedAvg's (log)")
    ax.set_ylabel("versions to the target / FedAvg's (log)")
    ax.set_title(f"{dataset}: uplink share = per-version share x versions ratio (per seed)",
                 fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_one(name: str, dataset: str, seed: int, args: argparse.Namespace, workdir: Path,
            broker, target: float, max_versions: int) -> list[dict]:
    runner = run_sim if broker is None else lambda *a: run_real(broker, *a)
    return runner(name, dataset, seed, args, workdir, target, max_versions)


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
    p.add_argument("--vs-fedavg", type=int, default=0, metavar="N",
                   help="target per seed: FedAvg H=20's accuracy after N versions minus "
                        "--tolerance (0: the data set's fixed target)")
    p.add_argument("--tolerance", type=float, default=0.005,
                   help="with --vs-fedavg: accuracy below FedAvg's allowed (0.005 = 0.5 pt)")
    p.add_argument("--timeout", type=float, default=1800.0, help="real: per run")
    p.add_argument("--data-dir", default=os.environ.get("FL_DATA_DIR", ""))
    p.add_argument("--keep", help="keep run directories here (default: a temp dir)")
    p.add_argument("--csv", help="append one row per run to this CSV file")
    p.add_argument("--plot", help="write accuracy-vs-uplink plots (one per data set) here")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.algos.split(",")
    for name in names:
        job_keys(name)
    if args.vs_fedavg and BASELINE not in names:  # the target is measured from it
        names.insert(0, BASELINE)
    import torch

    torch.set_num_threads(1)
    workdir = Path(args.keep or tempfile.mkdtemp(prefix="fl-bytes-"))
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
                target = TARGETS[dataset]
                order = names
                if args.vs_fedavg:  # FedAvg first: its accuracy sets this seed's target
                    order = [BASELINE] + [n for n in names if n != BASELINE]
                for name in order:
                    start = time.monotonic()
                    budget = (0.0, args.vs_fedavg) if args.vs_fedavg and name == BASELINE \
                        else (target, args.max_versions)
                    events = run_one(name, dataset, seed, args, workdir, broker, *budget)
                    if args.vs_fedavg and name == BASELINE:
                        final = [e["accuracy"] for e in events if e.get("accuracy") is not None]
                        target = final[-1] - args.tolerance
                    r = summarise(name, seed, events, target, time.monotonic() - start)
                    results[name].append(r)
                    print(f"  {dataset}/{name}/seed {seed}: {r.versions} versions, acc "
                          f"{r.accuracy:.4f}{'' if r.reached else ' (NOT reached)'} "
                          f"(target {target:.4f}), {r.up / 1e6:.3f} MB up, "
                          f"{r.seconds:.0f} s wall, load {os.getloadavg()[0]:.1f}",
                          file=sys.stderr, flush=True)
            crit = criterion(dataset, args, results)
            print_table(dataset, names, results, args.engine, crit)
            if args.csv:
                write_csv(Path(args.csv), dataset, results)
            if args.plot:
                Path(args.plot).mkdir(parents=True, exist_ok=True)
                plot(Path(args.plot) / f"accuracy_vs_uplink_{dataset}.png", dataset, names,
                     results, crit)
                plot_cost(Path(args.plot) / f"uplink_share_{dataset}.png", dataset, names,
                          results)
    finally:
        if broker is not None:
            broker.__exit__(None, None, None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
