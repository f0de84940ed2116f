"""Time to accuracy under latency and stragglers together (issue 17, item 5): 16 agents, a 1 s
emulated round trip (0.5 s each way), half the agents 4x slower; how long each timing takes to
the accuracy FedAvg-wait ends at.

Target rule: FedAvg-wait runs a fixed `--versions` (by data set, PRESETS); the target is the
median over seeds of its final accuracy minus `--margin` (1 pt). Times count from version 1 of
each run (`fl-report --time-origin first`: process start-up excluded, real and simulated
alike). Speed-up = FedAvg-wait's time to target / the configuration's, per seed (same seed,
same shards and initial model); the tables give median (range) over seeds, never a best run.

Stages (one data set per call; state in `<out>/<dataset>/runs.csv` and `plan.json`):

- `sim`: the sweep in fl-sim (virtual time, deterministic: load does not change its figures),
  every configuration the simulator models (`configs()`): FedAvg-wait, FedAvg-drop (a window
  closes (deadline factor - 1) x a fast round after its first update: the slow half misses it), DGA
  with a few D, FedBuff with a few B, and combinations (DGA + drop, FedBuff + smaller K,
  FedBuff + 8-bit payloads). Devices: fast agents `--fast-round` / H seconds a step, slow ones
  `--straggle` times that; the MQTT hop measured on a local broker; a checkpoint measured as
  the coordinator's time per version (its evaluation runs beside its loop). Non-baseline runs
  stop at the target (or at FedAvg-wait's longest run x `--time-cap`). Picks the best
  configuration: highest median speed-up among those that reach the target in every seed.
- `real`: real processes (one Mosquitto, the coordinator, an `fl-agent` per agent, each agent
  through its own link proxy: dga_latency.real_run), FedAvg-wait, the best simulated
  configuration and FedPMT (deadline `--deadline-factor` x the fast agents' full round, as in
  stragglers.py; fl-sim does not model it), one run per `--real-seeds` seed and configuration,
  interleaved; other runs already in runs.csv are kept, so the runs can be split over quiet
  windows. Agents run at a device's pace (`fl-agent --slowdown`, from one measured step so that
  a fast step takes `--fast-round` / H s; the slow half x `--straggle`). Non-baseline runs stop
  at the simulated target + 0.5 pt; the real target comes from the real FedAvg-wait runs. The
  1-minute load average is recorded with every run. Needs a quiet machine.
- `agree`: the simulator re-run for FedAvg-wait and the best configuration with the step time
  the real FedAvg-wait runs achieved (their median version interval, less what the simulated
  interval has besides the slow agents' compute); real / simulated time to the real target,
  and whether the ranking agrees.
- `summary`: rewrite summary.md from runs.csv.

Every stage writes `<out>/<dataset>/summary.md` (the tables) and fl-report plots of seed 0 per
part (`sim/`, `real/`: accuracy against time, versions, bytes). Run folders go to `--work`.

    bench=".venv/bin/python bench/time_to_accuracy.py --data-dir ../shared/data"
    nice -n 10 $bench --dataset mnist --stage sim   # then on a quiet machine:
    $bench --dataset mnist --stage real
    nice -n 10 $bench --dataset mnist --stage agree
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from dga_latency import outcome, real_run
from timing import median_range

from fleetfl.coordinator.report import load_run, report
from fleetfl.coordinator.rundir import RunDir
from fleetfl.coordinator.simulator import (
    UNMODELLED,
    DeviceProfile,
    SimConfig,
    Simulator,
    measure_hop_s,
    measure_step_s,
)
from fleetfl.shared.config import load_config
from fleetfl.shared.devtools.link_proxy import LinkSpec, ProxyHost
from fleetfl.shared.devtools.local_broker import LocalMosquitto
from fleetfl.shared.learn.torch_binding import bind_flat
from fleetfl.shared.tasks.task import load_task

# Per data set: partition, FedAvg-wait's versions (its final accuracy sets the target) and job
# keys. Shakespeare: charlstm trains with Adam lr 0.01 (dga_latency.PRESETS).
PRESETS: dict[str, dict] = {
    "mnist": {"partition": "dirichlet", "versions": 30, "job": {}},
    "shakespeare": {"partition": "roles", "versions": 30,
                    "job": {"optimizer": "adam", "lr": 0.01}},
    "digits": {"partition": "dirichlet", "versions": 20, "job": {}},
}
WAIT_S = 600.0  # a window that waits for every agent
BASE = "fedavg-wait"
GOAL = 4.0
FIELDS = ["part", "config", "seed", "target", "to_target", "versions", "final", "s_per_version",
          "load", "path"]


@dataclass
class Row:
    part: str  # sim, real or agree
    config: str
    seed: int
    target: float
    to_target: float | None  # seconds from version 1
    versions: int | None  # versions to target
    final: float  # last evaluated accuracy
    s_per_version: float
    load: float  # 1-minute load average when the run ended
    path: str


def configs(h: int, fast_round: float, fast_agents: int, deadline_factor: float
            ) -> dict[str, dict]:
    """Name -> run-config keys (fl-coordinator's and fl-sim's alike). H = K = `h`. "drop":
    a window closes (deadline_factor - 1) x `fast_round` after its first update, i.e. at
    deadline_factor x the fast agents' round from its start (FedAvg-drop's deadline in
    stragglers.py), which the slow half misses."""
    def wait(**keys: object) -> dict:
        return {"window_timeout": WAIT_S, **keys}

    def drop(**keys: object) -> dict:
        return {**keys, "window_timeout": round((deadline_factor - 1) * fast_round, 3)}

    return {
        BASE: wait(algo="fedavg", local_steps=h),
        "fedavg-drop": drop(algo="fedavg", local_steps=h),
        f"dga-D{2 * h}": wait(algo="dga", period=h, delay=2 * h),
        f"dga-D{2 * h}-drop": drop(algo="dga", period=h, delay=2 * h),
        f"dga-D{4 * h}-drop": drop(algo="dga", period=h, delay=4 * h),
        # the drop with a quorum of the fast agents: a window never follows one shard when
        # arrivals spread (real fleets; README `window_quorum`)
        f"dga-D{2 * h}-drop-quorum": drop(algo="dga", period=h, delay=2 * h,
                                          window_quorum=fast_agents),
        "fedbuff-B4": wait(algo="fedbuff", period=h, buffer=4),
        "fedbuff-B8": wait(algo="fedbuff", period=h, buffer=8),
        # eta_g = B / N: a buffer of B deltas moves the model B / N of a FedAvg round
        "fedbuff-B8-lr0.5": wait(algo="fedbuff", period=h, buffer=8, server_lr=0.5),
        f"fedbuff-B8-K{h // 2}-lr0.5": wait(algo="fedbuff", period=h // 2, buffer=8,
                                           server_lr=0.5),
        "fedbuff-B8-lr0.5-q8": wait(algo="fedbuff", period=h, buffer=8, server_lr=0.5,
                                    compress="q8"),
        # real only (sim_engine.UNMODELLED): layer assignments against a deadline
        "fedpmt": {"algo": "pmt", "local_steps": h, "deadline_rank": fast_agents,
                   "deadline_factor": deadline_factor},
        "fedpmt-quorum": {"algo": "pmt", "local_steps": h, "deadline_rank": fast_agents,
                          "deadline_factor": deadline_factor, "window_quorum": fast_agents},
    }


def flags(keys: dict) -> list[str]:
    """fl-coordinator flags of run-config keys (its flags are the keys, dashed)."""
    return [x for k, v in keys.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("sim", "real", "agree", "summary"), required=True)
    p.add_argument("--dataset", default="mnist", help="mnist, shakespeare (or digits: tests)")
    p.add_argument("--data-dir", default=os.environ.get("FL_DATA_DIR", ""))
    p.add_argument("--agents", type=int, default=16, help="half of them slow")
    p.add_argument("--rtt", type=float, default=1.0, help="update -> average, seconds")
    p.add_argument("--straggle", type=float, default=4.0, help="slow agents' step / fast")
    p.add_argument("--steps", type=int, default=10, help="FedAvg H = DGA and FedBuff K")
    p.add_argument("--fast-round", type=float, default=1.0,
                   help="seconds of a fast agent's H steps (slow: x --straggle)")
    p.add_argument("--versions", type=int, default=0,
                   help="FedAvg-wait's versions (default by data set, PRESETS)")
    p.add_argument("--margin", type=float, default=0.01,
                   help="target = FedAvg-wait's median final accuracy - this")
    p.add_argument("--target", type=float, default=0.0,
                   help="sim: this target instead of the rule's (0: the rule)")
    p.add_argument("--time-cap", type=float, default=1.0,
                   help="sim: other runs stop at FedAvg-wait's longest time x this")
    p.add_argument("--deadline-factor", type=float, default=1.5,
                   help="FedPMT's deadline (x the fast round) and the drop timeout "
                        "((this - 1) x the fast round)")
    p.add_argument("--seeds", default="0,1,2", help="sim seeds")
    p.add_argument("--configs", default="", help="sim: only these (comma-separated)")
    p.add_argument("--real-seeds", default="0,1,2",
                   help="real: one run per seed and configuration, interleaved; other runs "
                        "already in runs.csv are kept (split the runs over quiet windows)")
    p.add_argument("--real-configs", default="",
                   help="real: configurations (default: fedavg-wait, the best simulated, "
                        "fedpmt)")
    p.add_argument("--agree-seeds", default="0,1,2", help="agree: seeds re-simulated")
    p.add_argument("--reuse", action="store_true",
                   help="sim, agree: keep the runs already finished in --work (same flags)")
    p.add_argument("--hop-s", type=float, default=-1.0,
                   help="MQTT hop in the simulator (default: measured on a local broker)")
    p.add_argument("--work", default="/tmp/fleetfl-time-to-accuracy",
                   help="run folders and logs (not committed)")
    p.add_argument("--out", default="bench/results/time_to_accuracy")
    args = p.parse_args(argv)
    preset = PRESETS.get(args.dataset, PRESETS["digits"])
    args.partition, args.job = preset["partition"], preset["job"]
    args.versions = args.versions or preset["versions"]
    args.fast = args.agents - args.agents // 2
    args.configs_all = configs(args.steps, args.fast_round, args.fast, args.deadline_factor)
    args.dir = Path(args.out) / args.dataset
    args.work = Path(args.work) / args.dataset
    return args


# -- state: runs.csv, plan.json -----------------------------------------------------------
def load_rows(args: argparse.Namespace) -> list[Row]:
    path = args.dir / "runs.csv"
    if not path.exists():
        return []
    with path.open() as f:
        return [Row(r["part"], r["config"], int(r["seed"]), float(r["target"]),
                    float(r["to_target"]) if r["to_target"] else None,
                    int(r["versions"]) if r["versions"] else None, float(r["final"]),
                    float(r["s_per_version"]), float(r["load"]), r["path"])
                for r in csv.DictReader(f)]


def save_rows(args: argparse.Namespace, rows: list[Row]) -> None:
    args.dir.mkdir(parents=True, exist_ok=True)
    with (args.dir / "runs.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in asdict(r).items()})


def plan(args: argparse.Namespace, **update: object) -> dict:
    path = args.dir / "plan.json"
    state = json.loads(path.read_text()) if path.exists() else {}
    if update:
        state.update(update)
        args.dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
    return state


def measure(path: Path, part: str, config: str, seed: int, target: float) -> Row:
    o = outcome(path, target, config)
    accs = [p["accuracy"] for p in load_run(path, config, origin="first").points()]
    return Row(part, config, seed, target, o.to_target, o.versions, accs[-1] if accs else 0.0,
               o.s_per_version, os.getloadavg()[0], str(path))


def target_of(rows: list[Row], margin: float) -> float:
    """The rule: FedAvg-wait's median final accuracy over seeds, minus the margin."""
    finals = [r.final for r in rows if r.config == BASE]
    if not finals:
        raise SystemExit(f"no {BASE} runs to set the target")
    return round(statistics.median(finals) - margin, 4)


def retarget(rows: list[Row], target: float) -> list[Row]:
    """Every run's time to `target`, read again from its events."""
    out = []
    for r in rows:
        new = measure(Path(r.path), r.part, r.config, r.seed, target)
        new.load = r.load  # the load when the run ended, not now
        out.append(new)
    return out


def speedups(rows: list[Row]) -> dict[str, list[float]]:
    """Per configuration: FedAvg-wait's time to target / its own, seed by seed."""
    base = {r.seed: r.to_target for r in rows if r.config == BASE}
    out: dict[str, list[float]] = {}
    for r in rows:
        out.setdefault(r.config, [])
        if r.to_target and base.get(r.seed):
            out[r.config].append(base[r.seed] / r.to_target)
    return out


def ranking(rows: list[Row]) -> list[str]:
    """Configurations by median speed-up over FedAvg-wait, fastest first."""
    ups = speedups(rows)
    return sorted(ups, key=lambda c: -statistics.median(ups[c] or [0.0]))


def best_config(rows: list[Row]) -> str | None:
    """Highest median speed-up among the configurations that reach the target in every seed."""
    ups = speedups(rows)
    seeds = {r.seed for r in rows if r.config == BASE}
    ok = {c: statistics.median(v) for c, v in ups.items()
          if c != BASE and len(v) == len(seeds) and v}
    return max(ok, key=ok.get) if ok else None


# -- the stages ------------------------------------------------------------------------------
def job_keys(args: argparse.Namespace, seed: int) -> dict:
    return {"dataset": args.dataset, "data_dir": args.data_dir, "partition": args.partition,
            "min_agents": args.agents, "seed": seed, "eval_every": 1, **args.job}


def simulate(args: argparse.Namespace, run: str, keys: dict, seed: int, fast_step: float,
             hop_s: float, version_s: float, max_versions: int, target: float = 0.0,
             max_time: float = 1e7) -> Path:
    cfg = load_config(None, {**job_keys(args, seed), "run": run, "max_versions": max_versions,
                             "target_accuracy": target, **keys})
    link = LinkSpec(args.rtt / 2)
    profiles = [DeviceProfile("fast", fast_step, args.fast),
                DeviceProfile("slow", fast_step * args.straggle, args.agents - args.fast)]
    sim = SimConfig(agents=args.agents, profiles=profiles, up=link, down=link, hop_s=hop_s,
                    coord_version_s=version_s, max_time=max_time, seed=seed)
    path = args.work / "runs" / run
    done = path / "bench-done"  # written once the run ended: --reuse skips it
    if not (args.reuse and done.exists()):
        Simulator(cfg, sim, run_dir=path).run()
        done.touch()
    return path


def checkpoint_s(args: argparse.Namespace, repeats: int = 5) -> float:
    """Median seconds of one checkpoint of the job's model: what a version costs the
    coordinator's loop. Its evaluation runs beside the loop (BackgroundEvaluator, skipping
    versions when busy), so it is not charged to the simulated coordinator."""
    cfg = load_config(None, job_keys(args, 0))
    params, _ = bind_flat(load_task(cfg.job.task).build_model(0))
    times = []
    with tempfile.TemporaryDirectory(prefix="fleetfl-tta-") as tmp:
        for _ in range(repeats):
            t0 = time.perf_counter()
            RunDir(tmp).save_checkpoint(params, {"version": 0})
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def calibrate(args: argparse.Namespace) -> tuple[float, float]:
    """(MQTT hop, coordinator seconds per version) on this machine."""
    hop = args.hop_s
    if hop < 0:
        with LocalMosquitto() as broker:
            hop = measure_hop_s(broker.url)
    return hop, checkpoint_s(args)


def sweep(args: argparse.Namespace, names: list[str], seeds: list[int], part: str,
          fast_step: float, hop: float, version_s: float, target: float | None) -> list[Row]:
    """FedAvg-wait first (sets the target unless given), then the others, stopping at it."""
    rows: list[Row] = []
    for seed in seeds:
        path = simulate(args, f"{part}-{BASE}-s{seed}", args.configs_all[BASE], seed,
                        fast_step, hop, version_s, args.versions)
        rows.append(measure(path, part, BASE, seed, 0.0))
        print(f"  {part} {BASE} s{seed}: final {rows[-1].final:.4f}", flush=True)
    target = target if target is not None else target_of(rows, args.margin)
    rows = retarget(rows, target)
    cap = args.time_cap * max(RunDir(Path(r.path)).events()[-1]["time"] for r in rows)
    for name in (n for n in names if n != BASE):
        for seed in seeds:
            path = simulate(args, f"{part}-{name}-s{seed}", args.configs_all[name], seed,
                            fast_step, hop, version_s, 50 * args.versions, target, cap)
            rows.append(measure(path, part, name, seed, target))
            print(f"  {part} {name} s{seed}: to {target}: {rows[-1].to_target}", flush=True)
    return rows


def stage_sim(args: argparse.Namespace) -> None:
    hop, version_s = calibrate(args)
    fast_step = args.fast_round / args.steps
    names = [n for n in (args.configs.split(",") if args.configs else args.configs_all)
             if args.configs_all[n]["algo"] not in UNMODELLED]
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"sim: {args.dataset} {args.partition}, {args.agents} agents ({args.fast} fast, "
          f"step {fast_step * 1e3:.0f} ms; slow x{args.straggle:g}), rtt {args.rtt} s, hop "
          f"{hop * 1e3:.1f} ms, version {version_s * 1e3:.0f} ms; {names}", flush=True)
    rows = sweep(args, [BASE, *names], seeds, "sim", fast_step, hop, version_s,
                 args.target or None)
    rows = retarget(merged(args, "sim", rows), rows[0].target)
    best = best_config(rows)
    plan(args, sim_target=rows[0].target, best=best, hop_s=hop, version_s=version_s,
         sim_fast_step=fast_step, sim_date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    save_rows(args, [r for r in load_rows(args) if r.part != "sim"] + rows)


def merged(args: argparse.Namespace, part: str, rows: list[Row]) -> list[Row]:
    """`rows` and the runs of `part` already in runs.csv that they do not replace."""
    done = {(r.config, r.seed) for r in rows}
    return [r for r in load_rows(args) if r.part == part and (r.config, r.seed) not in done
            ] + rows


def stage_real(args: argparse.Namespace) -> None:
    state = plan(args)
    names = (args.real_configs.split(",") if args.real_configs
             else [BASE, *([state["best"]] if state.get("best") else []), "fedpmt"])
    sim_rows = [r for r in load_rows(args) if r.part == "sim"]
    sim_versions = {c: max((r.versions or 0) for r in sim_rows if r.config == c)
                    for c in {r.config for r in sim_rows}}
    step = measure_step_s(load_config(None, job_keys(args, 0)), repeats=50)
    pace = args.fast_round / args.steps / step
    stop = state.get("sim_target", 0.0) + 0.005
    print(f"real: {names}; measured step {step * 1e3:.1f} ms -> fast agents --slowdown "
          f"{pace:.1f}, slow {pace * args.straggle:.1f}; others stop at {stop:.4f}", flush=True)
    seeds = [int(s) for s in args.real_seeds.split(",")]
    args.slowdown = pace  # real_run's default agent flags; ours below set each agent's
    rows: list[Row] = []
    with LocalMosquitto() as broker, ProxyHost() as host:
        for seed in seeds:
            for name in names:
                keys = args.configs_all[name]
                cap = args.versions if name == BASE else 3 * max(
                    sim_versions.get(name, 0), args.versions)
                job = flags({**job_keys(args, seed), "max_versions": cap,
                             "target_accuracy": 0.0 if name == BASE else stop, **keys})
                if args.job:  # fl-coordinator has no --optimizer flag: a YAML job
                    job_yaml = args.work / "job.yaml"
                    job_yaml.parent.mkdir(parents=True, exist_ok=True)
                    job_yaml.write_text(yaml.safe_dump({"job": args.job}))
                    job = ["--config", str(job_yaml), *strip(job, args.job)]
                load0 = os.getloadavg()[0]
                run = f"real-{name}-s{seed}"
                shutil.rmtree(args.work / "runs" / run, ignore_errors=True)
                path = real_run(args, broker, host, args.work, run,
                                strip(job, {"data_dir": 0}), args.rtt / 2,
                                agent_flags=lambda i: ["--slowdown", str(
                                    pace * (args.straggle if i >= args.fast else 1))])
                rows.append(measure(path, "real", name, seed, 0.0))
                print(f"  real {name} s{seed}: final {rows[-1].final:.4f}, load {load0:.1f} -> "
                      f"{rows[-1].load:.1f}", flush=True)
    rows = merged(args, "real", rows)
    rows = retarget(rows, target_of(rows, args.margin))
    dates = plan(args).get("real_dates", []) + [time.strftime("%Y-%m-%d %H:%M UTC",
                                                              time.gmtime())]
    plan(args, real_pace=pace, real_step=step, real_target=rows[0].target, real_dates=dates)
    save_rows(args, [r for r in load_rows(args) if r.part != "real"] + rows)


def strip(job: list[str], keys: dict) -> list[str]:
    """Flags without those of `keys` (set elsewhere: the YAML job, LocalFleet's --data-dir)."""
    drop = {f"--{k.replace('_', '-')}" for k in keys}
    pairs = zip(job[::2], job[1::2], strict=True)
    return [x for f, v in pairs if f not in drop for x in (f, v)]


def stage_agree(args: argparse.Namespace) -> None:
    state, rows = plan(args), load_rows(args)
    real = [r for r in rows if r.part == "real"]
    names = [BASE, state["best"]]
    intervals = [float(np.median(np.diff([e["time"] for e in RunDir(Path(r.path)).events()])))
                 for r in real if r.config == BASE]
    sim_wait = [r for r in rows if r.part == "sim" and r.config == BASE]
    sim_interval = statistics.median(r.s_per_version for r in sim_wait)
    # the slow agents' H steps set FedAvg-wait's interval: move them by the difference
    slow_step = (state["sim_fast_step"] * args.straggle
                 + (statistics.median(intervals) - sim_interval) / args.steps)
    fast_step = slow_step / args.straggle
    print(f"agree: real FedAvg-wait {statistics.median(intervals):.2f} s / version, sim "
          f"{sim_interval:.2f}: fast step {fast_step * 1e3:.0f} ms", flush=True)
    seeds = [int(s) for s in args.agree_seeds.split(",")]
    out = sweep(args, names, seeds, "agree", fast_step, state["hop_s"], state["version_s"],
                state["real_target"])
    plan(args, agree_fast_step=fast_step)
    save_rows(args, [r for r in rows if r.part != "agree"] + out)


# -- summary ---------------------------------------------------------------------------------
def table(rows: list[Row], title: str) -> list[str]:
    ups = speedups(rows)
    target, real = rows[0].target, rows[0].part == "real"  # load: wall-clock runs only
    out = [f"**{title}** (target {target:.4f}; median (range) over seeds "
           f"{sorted({r.seed for r in rows})})", "",
           f"| configuration | reached | time to {target:.4f} (s) | speed-up vs {BASE} | "
           "versions to target | s / version | final acc | load |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name in dict.fromkeys(r.config for r in rows):
        rs = [r for r in rows if r.config == name]
        times = [r.to_target for r in rs if r.to_target is not None]
        out.append(
            f"| {name} | {len(times)}/{len(rs)} | {median_range(times, '{:.1f}')} | "
            f"{median_range(ups[name])}{'x' if ups[name] else ''} | "
            f"{median_range([r.versions for r in rs if r.versions], '{:.0f}')} | "
            f"{median_range([r.s_per_version for r in rs])} | "
            f"{median_range([r.final for r in rs], '{:.4f}')} | "
            f"{median_range([r.load for r in rs], '{:.1f}') if real else '-'} |")
    return out + [""]


def summary(args: argparse.Namespace) -> str:
    rows, state = load_rows(args), plan(args)
    lines = [f"# Time to accuracy: {args.dataset} ({args.partition}), {args.agents} agents, "
             f"{args.agents - args.fast} of them {args.straggle:g}x slower, rtt {args.rtt} s",
             "", "```", json.dumps(state, indent=1, sort_keys=True), "```", ""]
    parts = {"sim": "simulated (fl-sim)", "real": "real processes through the link proxy",
             "agree": "simulated with the real runs' step (agreement)"}
    for part, title in parts.items():
        rs = [r for r in rows if r.part == part]
        if rs:
            lines += table(rs, title)
            made = [r for r in rs if r.seed == rs[0].seed and Path(r.path).is_dir()]
            if part != "agree" and made:
                report([r.path for r in made], args.dir / part, rs[0].target, baseline=BASE,
                       labels=[r.config for r in made], origin="first",
                       title=f"{title}, {args.dataset}, seed {rs[0].seed}")
    real, agree = ([r for r in rows if r.part == p] for p in ("real", "agree"))
    if real and agree:
        agree = retarget(agree, real[0].target)  # the real target may have moved since
        lines += ["**Agreement** (time to the real target, median over the seeds run both "
                  "ways)", "",
                  "| configuration | real (s) | simulated (s) | real / sim |",
                  "|---|---:|---:|---:|"]
        seeds = {r.seed for r in agree} & {r.seed for r in real}  # the same seeds
        for name in dict.fromkeys(r.config for r in agree):
            rt = [r.to_target for r in real if r.config == name and r.to_target
                  and r.seed in seeds]
            st = [r.to_target for r in agree if r.config == name and r.to_target
                  and r.seed in seeds]
            if rt and st:
                a, b = statistics.median(rt), statistics.median(st)
                lines.append(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.2f} |")
        shared = {r.config for r in agree}
        order = {p: ranking([r for r in rs if r.config in shared and r.seed in seeds])
                 for p, rs in (("real", real), ("agree", agree))}
        lines += ["", f"Ranking real {order['real']} vs simulated {order['agree']}: "
                  f"{'agrees' if order['real'] == order['agree'] else 'DIFFERS'}", ""]
    for part, rs in (("sim", [r for r in rows if r.part == "sim"]), ("real", real)):
        ups = {c: statistics.median(v) for c, v in speedups(rs).items() if v and c != BASE}
        if ups:
            best = max(ups, key=ups.get)
            lines.append(f"Goal ({part}): best {best} {ups[best]:.2f}x FedAvg-wait to its final "
                         f"accuracy - {args.margin:g} (goal >= {GOAL:g}x): "
                         f"{'PASS' if ups[best] >= GOAL else 'MISSED'}")
    text = "\n".join(lines) + "\n"
    args.dir.mkdir(parents=True, exist_ok=True)
    (args.dir / "summary.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # as an agent and fl-sim: one thread per device
    {"sim": stage_sim, "real": stage_real, "agree": stage_agree,
     "summary": lambda a: None}[args.stage](args)
    print(summary(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
