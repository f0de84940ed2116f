"""A FedAvg round against its compute, and the start of a fleet (issue 20, item 9).

The job: N agents (default 16) on the digits MLP, FedAvg, H local steps of batch B per round
(20 x 32), lr 0.1, no momentum, iid shards, the central evaluation of every version. One run
measures, side by side:

- compute only: the same N x H steps of the project's own LocalTrainer on the same shards,
  per round, in ONE process on one torch thread; and the same agents split over 2 processes
  running at once (the 2-core ideal: a round can be no shorter on this machine);
- the real fleet: `fl-demo` (Mosquitto, one fl-coordinator, N fl-agent processes) to
  `--versions` versions, once per `--launch` mode (fork: agents forked from fl-demo after
  one import of their code; spawn: each agent a new interpreter); the round is the time
  between consecutive version records of its events.jsonl (`wall`), median (range) over
  the run's rounds;
- the start: from launching fl-demo to the broker up, the coordinator waiting for agents,
  the first and the last agent's hello, and version 1; from the agents' own logs, launch to
  connected (interpreter, imports) and connected to joined (model, data, trainer).

Prints round / compute (1 thread and 2-core ideal) with the issue's goal (<= 1.5x the 2-core
ideal) and the start with its goal (<= 10 s to version 1), and the 1-minute load average
before and after each repeat: both figures depend on what else runs on the machine, so
compare them within one run. `--repeats` (default 3) interleaves compute-only and real runs;
the summary is the median and range over repeats. `--out FILE`: every figure as JSON.

    .venv/bin/python bench/round_overhead.py [--agents 16 --versions 20 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from timing import median_range as med

from fleetfl.coordinator import events as event_log
from fleetfl.coordinator.rundir import RunDir

ROUND_GOAL = 1.5  # round / 2-core compute
START_GOAL_S = 10.0  # fl-demo launch to version 1
HELLO = re.compile(r"agent (\S+) online")
READY = "waiting for agents on"
CPU_SAMPLE_S = 0.05  # how often the fleet's CPU is read from /proc during a real run
AGENT_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=16, help="agent processes (default 16)")
    p.add_argument("--versions", type=int, default=20,
                   help="versions per real run; its rounds are versions 1->2 ... (default 20)")
    p.add_argument("--repeats", type=int, default=3,
                   help="compute-only + real run pairs, interleaved (default 3)")
    p.add_argument("--local-steps", type=int, default=20, help="H (default 20)")
    p.add_argument("--batch-size", type=int, default=32, help="B (default 32)")
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default 0.1)")
    p.add_argument("--task", default="digits", help="built-in task (default digits)")
    p.add_argument("--data-dir", default=os.environ.get("FL_DATA_DIR", ""),
                   help="data folder (default $FL_DATA_DIR; digits needs none)")
    p.add_argument("--per-agent-processes", action="store_true",
                   help="also time the compute with each agent in a process of its own, all "
                        "at once: their CPU per round, summed (default: off; N more torch "
                        "imports)")
    p.add_argument("--launch", default="fork,spawn",
                   help="fl-demo's --launch modes to run, each once per repeat "
                        "(default: fork,spawn)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds one real run may take (default 300)")
    p.add_argument("--out", help="write every figure to this JSON file")
    p.add_argument("--keep", action="store_true",
                   help="keep the run directories and logs, and print where")
    return p.parse_args(argv)


def job_overrides(args: argparse.Namespace) -> dict:
    """The job as fl-demo runs it (RunConfig keys)."""
    return {"task": args.task, "algo": "fedavg", "partition": "iid", "lr": args.lr,
            "momentum": 0.0, "local_steps": args.local_steps, "batch_size": args.batch_size,
            "data_dir": args.data_dir or None}


def load(avg: tuple[float, float, float] | None = None) -> float:
    return (avg or os.getloadavg())[0]


# -- compute only ------------------------------------------------------------------------------
def trainers(overrides: dict, agents: int, indices: list[int]) -> list:
    """The LocalTrainers of agents `indices` of `agents`, as fl-agent builds them (shard,
    seed), on one torch thread."""
    import torch

    from fleetfl.coordinator.sim_engine import simulated_task
    from fleetfl.shared.config import load_config
    from fleetfl.shared.learn.data import agent_shard
    from fleetfl.shared.tasks.samples import ArraySamples
    from fleetfl.shared.tasks.trainer import LocalTrainer
    from fleetfl.shared.threads import limit_blas_threads

    limit_blas_threads(1)
    torch.set_num_threads(1)
    cfg = load_config(None, overrides)
    job = cfg.job
    task, ds = simulated_task(cfg)
    out = []
    for i in indices:
        x, y = agent_shard(ds, i, agents, job.partition, job.seed, job.alpha)
        out.append(LocalTrainer(task, job, ArraySamples(x, y), seed=job.seed * 1000 + i))
    return out


def train_round(group: list, steps: int) -> None:
    for trainer in group:
        for _ in range(steps):
            trainer.step()


def one_thread(overrides: dict, agents: int, rounds: int, steps: int) -> list[float]:
    """CPU seconds of each round's N x H steps, all agents in this process, one after
    another (CPU, not wall: other load on the machine does not stretch it)."""
    group = trainers(overrides, agents, list(range(agents)))
    train_round(group, steps)  # warm-up: allocator, first batches
    times = []
    for _ in range(rounds):
        t0 = time.process_time()
        train_round(group, steps)
        times.append(time.process_time() - t0)
    return times


def _share(overrides: dict, agents: int, indices: list[int], rounds: int, steps: int,
           barrier, results) -> None:
    """One process of `split`: build, warm up, wait for the others, then train the rounds."""
    group = trainers(overrides, agents, indices)
    train_round(group, steps)
    barrier.wait()
    t0, cpu0 = time.monotonic(), time.process_time()  # monotonic: shared by processes
    for _ in range(rounds):
        train_round(group, steps)
    results.put((t0, time.monotonic(), time.process_time() - cpu0))


def split(overrides: dict, agents: int, rounds: int, steps: int, procs: int) -> dict:
    """The agents dealt over `procs` processes training at once, per round: `max_cpu_s` the
    CPU seconds of the busiest one (with 2: the round if each had a core of its own),
    `sum_cpu_s` of all (what the steps cost spread over that many processes, which the OS
    switches between), `wall_s` first start to last end (stretched by other load)."""
    ctx = mp.get_context("spawn")  # a clean torch in each; fork after torch is unsafe
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=_share, args=(overrides, agents,
                                                list(range(k, agents, procs)), rounds, steps,
                                                barrier, results))
               for k in range(procs)]
    for worker in workers:
        worker.start()
    try:
        spans = [results.get(timeout=600) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=30)
    wall = max(end for _, end, _ in spans) - min(start for start, _, _ in spans)
    return {"max_cpu_s": max(cpu for _, _, cpu in spans) / rounds,
            "sum_cpu_s": sum(cpu for _, _, cpu in spans) / rounds, "wall_s": wall / rounds}


def compute_only(args: argparse.Namespace) -> dict:
    before = os.getloadavg()
    rounds = args.versions - 1
    times = one_thread(job_overrides(args), args.agents, rounds, args.local_steps)
    two = split(job_overrides(args), args.agents, rounds, args.local_steps, 2)
    out = {"one_thread_s": statistics.median(times), "one_thread_min_s": min(times),
           "one_thread_max_s": max(times), "two_core_s": two["max_cpu_s"],
           "two_core_wall_s": two["wall_s"]}
    if args.per_agent_processes:  # each agent's steps in a process of its own
        out["per_agent_cpu_s"] = split(job_overrides(args), args.agents, rounds,
                                       args.local_steps, args.agents)["sum_cpu_s"]
    return {**out, "load_before": load(before), "load_after": load()}


# -- the real run ------------------------------------------------------------------------------
def _read_lines(stream, launched: float, lines: list[tuple[float, str]]) -> None:
    """fl-demo's output (the coordinator's log streams through it), each line with the
    seconds since launch at which it arrived."""
    for raw in stream:
        lines.append((time.monotonic() - launched, raw.decode(errors="replace").rstrip()))


def tree_cpu(root: int) -> float:
    """CPU seconds (user + system) of process `root` and its descendants alive now."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # from field 3 (state) on
        pid = int(entry.name)
        children.setdefault(int(fields[1]), []).append(pid)
        ticks[pid] = int(fields[11]) + int(fields[12])  # utime, stime
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo += children.get(pid, [])
    return total / os.sysconf("SC_CLK_TCK")


def _watch(proc: subprocess.Popen, timeout: float) -> tuple[int, list[tuple[float, float]]]:
    """Wait for fl-demo, sampling its process tree's CPU: (exit code, [(wall, CPU s)])."""
    deadline, samples = time.monotonic() + timeout, []
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.terminate()
            return proc.wait(timeout=60), samples
        samples.append((time.time(), tree_cpu(proc.pid)))
        time.sleep(CPU_SAMPLE_S)
    return proc.returncode, samples


def _agent_log_times(log_dir: Path, launched_wall: float) -> dict[str, list[float]]:
    """From each agent's log: seconds from launch to its first line (connected: interpreter,
    imports, broker) and to 'joined' (the model received, data, trainer built)."""
    connected, joined = [], []
    for path in sorted(log_dir.glob("agent*.log")):
        first = join = None
        for line in path.read_text(errors="replace").splitlines():
            m = AGENT_TIME.match(line)
            if not m:
                continue
            t = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp() - launched_wall
            if first is None and "connected to" in line:
                first = t
            if "joined at version" in line:
                join = t
                break
        if first is not None:
            connected.append(first)
        if join is not None:
            joined.append(join)
    return {"connected": connected, "joined": joined}


def real_run(args: argparse.Namespace, work: Path, repeat: int, launch: str) -> dict:
    run = f"round-overhead-{launch}-{repeat}"
    runs, tmp = work / "runs", work / f"tmp-{launch}-{repeat}"
    tmp.mkdir(parents=True)
    cmd = [sys.executable, "-m", "fleetfl.coordinator.demo", "--agents", str(args.agents),
           "--launch", launch,
           "--algo", "fedavg", "--partition", "iid", "--task", args.task,
           "--max-versions", str(args.versions), "--lr", str(args.lr), "--momentum", "0",
           "--local-steps", str(args.local_steps), "--batch-size", str(args.batch_size),
           "--run", run, "--run-dir", str(runs)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    before = os.getloadavg()
    lines: list[tuple[float, str]] = []
    launched_wall, launched = time.time(), time.monotonic()
    # TMPDIR: fl-demo's agent logs land in our work folder
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "TMPDIR": str(tmp)})
    reader = threading.Thread(target=_read_lines, args=(proc.stdout, launched, lines))
    reader.start()
    code, cpu = _watch(proc, args.timeout)
    reader.join(timeout=10)
    records, _ = event_log.read(RunDir(runs / run).events_path)
    versions = sorted((r for r in records if r["type"] == event_log.VERSION),
                      key=lambda r: r["version"])
    if code != 0 or len(versions) < 2:
        tail = "\n".join(text for _, text in lines[-30:])
        raise RuntimeError(f"fl-demo exited with {code} after {len(versions)} versions:\n{tail}")
    walls = [r["wall"] for r in versions]
    rounds = [b - a for a, b in zip(walls, walls[1:], strict=False)]
    evals = [r["eval_seconds"] for r in records if r["type"] == event_log.EVALUATED]
    hellos = [t for t, text in lines if HELLO.search(text)]
    ready = next((t for t, text in lines if READY in text), None)
    broker = next((t for t, text in lines if text.startswith("fl-demo: broker")), None)
    agents = _agent_log_times(next(tmp.glob("fl-demo-logs-*"), tmp), launched_wall)
    # the fleet's CPU (broker, coordinator, agents, fl-demo) from version 1 to the last
    times, used = [t for t, _ in cpu], [c for _, c in cpu]
    fleet_cpu = (float(np.interp(walls[-1], times, used) - np.interp(walls[0], times, used))
                 / len(rounds)) if len(cpu) > 1 else None
    return {"rounds_s": rounds, "round_s": statistics.median(rounds),
            "fleet_cpu_per_round_s": fleet_cpu,
            "round_min_s": min(rounds), "round_max_s": max(rounds),
            "eval_s": statistics.median(evals) if evals else None,
            "start": {"broker_s": broker, "coordinator_ready_s": ready,
                      "first_hello_s": min(hellos, default=None),
                      "last_hello_s": max(hellos, default=None), "hellos": len(hellos),
                      "version1_s": walls[0] - launched_wall,
                      "agents_connected_s": _first_median_last(agents["connected"]),
                      "agents_joined_s": _first_median_last(agents["joined"])},
            "load_before": load(before), "load_after": load()}


def _first_median_last(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"first": min(values), "median": statistics.median(values), "last": max(values)}


# -- report ------------------------------------------------------------------------------------
def summarise(results: list[dict], launch: str) -> dict:
    real = [r["real"][launch] for r in results]
    one = [r["compute"]["one_thread_s"] for r in results]
    two = [r["compute"]["two_core_s"] for r in results]
    round_s = [r["round_s"] for r in real]
    fleet = [r["fleet_cpu_per_round_s"] / c for r, c in zip(real, one, strict=True)
             if r["fleet_cpu_per_round_s"] is not None]
    return {"round_s": round_s, "one_thread_s": one, "two_core_s": two,
            "fleet_cpu_over_compute": fleet,
            "ratio_one_thread": [r / c for r, c in zip(round_s, one, strict=True)],
            "ratio_two_core": [r / c for r, c in zip(round_s, two, strict=True)],
            "version1_s": [r["start"]["version1_s"] for r in real]}


def _sec(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _spread(s: dict | None) -> str:
    return "-" if s is None else f"{s['first']:.1f} / {s['median']:.1f} / {s['last']:.1f}"


def print_report(args: argparse.Namespace, results: list[dict]) -> dict:
    launches = list(results[0]["real"])
    print(f"\n{args.agents} agents, {args.task}, FedAvg, H = {args.local_steps} steps of batch "
          f"{args.batch_size}, lr {args.lr}, momentum 0, iid, {args.versions} versions; round "
          "= median (range) of the version-to-version times of one run\n")
    print("| repeat | launch | round s | compute 1 thread s | compute 2 cores s "
          "| round / 1 thread | round / 2 cores | fleet CPU s / round | fleet CPU / compute "
          "| eval s | load before-after |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for i, r in enumerate(results):
        comp = r["compute"]
        for launch, real in r["real"].items():
            ev = "-" if real["eval_s"] is None else f"{real['eval_s']:.4f}"
            fleet = real["fleet_cpu_per_round_s"]
            fleet_text = "- | -" if fleet is None else \
                f"{fleet:.3f} | {fleet / comp['one_thread_s']:.2f}"
            print(f"| {i + 1} | {launch} | {real['round_s']:.3f} ({real['round_min_s']:.3f}-"
                  f"{real['round_max_s']:.3f}) | {comp['one_thread_s']:.3f} | "
                  f"{comp['two_core_s']:.3f} | {real['round_s'] / comp['one_thread_s']:.2f} | "
                  f"{real['round_s'] / comp['two_core_s']:.2f} | {fleet_text} | {ev} | "
                  f"{real['load_before']:.1f}-{real['load_after']:.1f} |")
    per_agent = [r["compute"]["per_agent_cpu_s"] / r["compute"]["one_thread_s"]
                 for r in results if "per_agent_cpu_s" in r["compute"]]
    if per_agent:
        print(f"\nthe same steps, each agent in a process of its own (all at once): CPU per "
              f"round {med(per_agent, '{:.2f}')} x that of one process")
    print("\nStart, seconds from launching fl-demo (agents: first / median / last):\n")
    print("| repeat | launch | broker | coordinator ready | agents connected | agents joined "
          "| hellos (first-last) | version 1 |")
    print("|---:|---|---:|---:|---|---|---|---:|")
    for i, r in enumerate(results):
        for launch, real in r["real"].items():
            s = real["start"]
            print(f"| {i + 1} | {launch} | {_sec(s['broker_s'])} | "
                  f"{_sec(s['coordinator_ready_s'])} | {_spread(s['agents_connected_s'])} | "
                  f"{_spread(s['agents_joined_s'])} | {_sec(s['first_hello_s'])}-"
                  f"{_sec(s['last_hello_s'])} ({s['hellos']}) | {s['version1_s']:.1f} |")
    loads = [r["compute"]["load_before"] for r in results] + \
        [real["load_after"] for r in results for real in r["real"].values()]
    summaries = {}
    print(f"\nmedian of {len(results)} (range); load average {min(loads):.1f}-{max(loads):.1f}")
    for launch in launches:
        summary = summaries[launch] = summarise(results, launch)
        ratio = statistics.median(summary["ratio_two_core"])
        start = statistics.median(summary["version1_s"])
        print(f"{launch}: round {med(summary['round_s'], '{:.3f}')} s; compute "
              f"{med(summary['one_thread_s'], '{:.3f}')} s on 1 thread, "
              f"{med(summary['two_core_s'], '{:.3f}')} s on 2 cores")
        print(f"{launch}: round / compute {med(summary['ratio_one_thread'], '{:.2f}')} "
              f"(1 thread), {med(summary['ratio_two_core'], '{:.2f}')} (2 cores; goal <= "
              f"{ROUND_GOAL}): {'PASS' if ratio <= ROUND_GOAL else 'SHORT'}")
        print(f"{launch}: the fleet's CPU per round / compute "
              f"{med(summary['fleet_cpu_over_compute'], '{:.2f}')}")
        print(f"{launch}: start to version 1 {med(summary['version1_s'], '{:.1f}')} s (goal "
              f"<= {START_GOAL_S:g} s): {'PASS' if start <= START_GOAL_S else 'SHORT'}")
    return summaries


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.versions < 3 or args.agents < 2:
        print("round_overhead: need --versions >= 3 and --agents >= 2", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="fleetfl-round-overhead-"))
    results = []
    try:
        for repeat in range(args.repeats):
            print(f"repeat {repeat + 1}/{args.repeats}: compute only ...", file=sys.stderr,
                  flush=True)
            compute = compute_only(args)
            real = {}
            for launch in args.launch.split(","):
                print(f"repeat {repeat + 1}/{args.repeats}: fl-demo --launch {launch}, "
                      f"{args.agents} agents ...", file=sys.stderr, flush=True)
                real[launch] = real_run(args, work, repeat, launch)
            results.append({"compute": compute, "real": real})
    except RuntimeError as exc:
        print(f"round_overhead: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"runs and logs kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    summary = print_report(args, results)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "repeats": results,
                                              "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
