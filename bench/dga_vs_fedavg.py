"""Wall time per version: DGA vs FedAvg, real processes over a real broker on loopback.

What is measured: one local Mosquitto is started, then for each algorithm a whole fleet
(``LocalFleet``: one ``fl-coordinator`` and N ``fl-agent`` processes) runs to completion on the
same broker. From the coordinator's ``events.jsonl`` the script takes the seconds per version
(median of the time deltas between consecutive versions, skipping the first few versions as
warm-up: process start, data loading, first model download), the final test accuracy, the
total wall time and the upload volume per version.

Why: FedAvg agents stop after H local steps and wait for the average; DGA agents keep training
while the average is in flight (it is applied D steps later), so with the same number of local
steps per version (K = H) DGA should publish versions faster (ratio
fedavg_s_per_version / dga_s_per_version > 1; the goal here is >= 1.0, DGA at least as fast)
at a similar accuracy. On one 2-core machine all processes share the cores, so this mostly
measures how much waiting DGA removes, not network latency.

Run: ``.venv/bin/python bench/dga_vs_fedavg.py [--agents 4 --versions 30 --dataset digits
--repeats 3]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from timing import median_range

from fleetfl.coordinator.local_fleet import LocalFleet
from fleetfl.coordinator.rundir import RunDir
from fleetfl.shared.devtools.local_broker import LocalMosquitto

GOAL = 1.0
ALGOS = ("fedavg", "dga")


@dataclass
class Result:
    algo: str
    versions: int
    wall_s: float
    span_s: float
    s_per_version: float
    accuracy: float | None
    mb_up_per_version: float
    exit_code: int | None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Seconds per version of DGA vs FedAvg with N local agent processes on one "
                    "local Mosquitto (loopback).")
    p.add_argument("--agents", type=int, default=4, help="agent processes (default 4)")
    p.add_argument("--versions", type=int, default=30, help="versions per run (default 30)")
    p.add_argument("--dataset", default="digits", help="digits (embedded), mnist or fashion")
    p.add_argument("--data-dir", default=os.environ.get("FL_DATA_DIR", ""),
                   help="data folder for mnist/fashion (default $FL_DATA_DIR)")
    p.add_argument("--partition", default="iid", help="iid, dirichlet or shards (default iid)")
    p.add_argument("--local-steps", type=int, default=10,
                   help="FedAvg H and DGA K: local steps per version (default 10)")
    p.add_argument("--delay", type=int, default=2, help="DGA D (default 2)")
    p.add_argument("--warmup", type=int, default=3,
                   help="versions skipped before timing (default 3)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds one run may take before it is stopped (default 300)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs per algorithm, interleaved so drifting load hits both alike; "
                        "the ratio is reported as median (range) over repeats (default 3)")
    p.add_argument("--keep", action="store_true", help="keep run and log folders, print them")
    return p.parse_args(argv)


def coordinator_args(args: argparse.Namespace, algo: str, run_dir: Path) -> list[str]:
    common = ["--algo", algo, "--dataset", args.dataset, "--partition", args.partition,
              "--min-agents", str(args.agents), "--max-versions", str(args.versions),
              "--run-dir", str(run_dir), "--local-steps", str(args.local_steps)]
    if algo == "dga":
        common += ["--period", str(args.local_steps), "--delay", str(args.delay)]
    return common


def seconds_per_version(events: list[dict], warmup: int) -> float:
    times = [e["time"] for e in sorted(events, key=lambda e: e["version"])]
    deltas = [b - a for a, b in zip(times, times[1:], strict=False)]
    timed = deltas[warmup:] or deltas
    if not timed:
        raise RuntimeError("fewer than two versions were recorded")
    return statistics.median(timed)


def run_one(args: argparse.Namespace, broker: LocalMosquitto, algo: str, work: Path,
            repeat: int) -> Result:
    run = f"bench-{algo}-{os.getpid()}-r{repeat}"
    run_dir, logs = work / "runs", work / f"logs-{algo}-r{repeat}"
    start = time.monotonic()
    code: int | None = None
    with LocalFleet(broker.url, run, logs, coordinator_args(args, algo, run_dir),
                    data_dir=args.data_dir) as fleet:
        fleet.start_coordinator()
        fleet.start_agents(args.agents)
        try:
            code = fleet.wait_coordinator(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"{algo}: timed out after {args.timeout:.0f} s; stopping the fleet",
                  file=sys.stderr)
        fleet.wait_agents(timeout=15)
        wall = time.monotonic() - start
        events = RunDir(run_dir / run).events()
        if code != 0 or not events:
            print(f"{algo}: coordinator exited with {code}; its log:\n"
                  f"{fleet.log('coordinator')[-3000:]}", file=sys.stderr)
    if not events:
        raise RuntimeError(f"{algo}: no versions recorded (logs in {logs})")
    accuracies = [e["accuracy"] for e in events if e.get("accuracy") is not None]
    last = max(events, key=lambda e: e["version"])
    first = min(events, key=lambda e: e["version"])
    return Result(algo=algo, versions=last["version"], wall_s=wall,
                  span_s=last["time"] - first["time"],
                  s_per_version=seconds_per_version(events, args.warmup),
                  accuracy=accuracies[-1] if accuracies else None,
                  mb_up_per_version=last["bytes_up_total"] / 1e6 / max(1, len(events)),
                  exit_code=code)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.versions <= args.warmup + 1:
        print("--versions must exceed --warmup + 1", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="fleetfl-bench-"))
    results: dict[str, list[Result]] = {algo: [] for algo in ALGOS}
    try:
        with LocalMosquitto() as broker:
            for rep in range(args.repeats):
                for algo in ALGOS[rep % 2:] + ALGOS[:rep % 2]:  # alternate who goes first
                    print(f"running {algo} (repeat {rep + 1}/{args.repeats}): {args.agents} "
                          f"agents, {args.versions} versions, load {os.getloadavg()[0]:.1f} ...",
                          file=sys.stderr, flush=True)
                    results[algo].append(run_one(args, broker, algo, work, rep))
    except RuntimeError as exc:
        print(f"dga_vs_fedavg: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"run and log folders kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    print(f"{args.agents} agents, {args.dataset} ({args.partition}), local steps per version "
          f"H = K = {args.local_steps}, DGA D = {args.delay}; s / version = median of the "
          f"deltas v -> v+1 for v >= {args.warmup + 1}; span = first to last version; wall "
          f"includes process start-up (torch import, data loading); {args.repeats} repeats, "
          f"load at the end {os.getloadavg()[0]:.1f}\n")
    print("| algo | repeat | versions | s / version | versions / s | final accuracy | span s "
          "| wall s | MB up / version | exit |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for runs in results.values():
        for rep, r in enumerate(runs):
            acc = f"{r.accuracy:.4f}" if r.accuracy is not None else "n/a"
            print(f"| {r.algo} | {rep + 1} | {r.versions} | {r.s_per_version:.3f} | "
                  f"{1 / r.s_per_version:.1f} | {acc} | {r.span_s:.2f} | {r.wall_s:.1f} | "
                  f"{r.mb_up_per_version:.3f} | {r.exit_code} |")
    for algo, runs in results.items():
        print(f"\n{algo}: s / version {median_range([r.s_per_version for r in runs], '{:.3f}')}")
    ratios = [f.s_per_version / d.s_per_version
              for f, d in zip(results["fedavg"], results["dga"], strict=True)]
    ratio = statistics.median(ratios)
    verdict = "PASS" if ratio >= GOAL else "SHORT"
    print(f"\nratio fedavg_s_per_version / dga_s_per_version, per repeat: "
          f"{median_range(ratios, '{:.3f}')} (goal >= {GOAL}) {verdict}")
    return 0 if all(r.exit_code == 0 for runs in results.values() for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
