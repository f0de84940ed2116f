"""Model poisoning: accuracy of each aggregation rule with hostile agents vs a clean run.

One local Mosquitto; for each scenario a whole fleet of real processes (`LocalFleet`: one
fl-coordinator, N agents). In attacked scenarios the last M agents are hostile
(`bench/malicious_agent.py`: the real agent whose updates are corrupted before publishing),
cycling through the attacks sign_flip (x -10), scale (x 100) and noise (N(0, 1) per
coordinate). Every scenario uses the same seed, data split and number of versions; the table
gives the final test accuracy (the coordinator's evaluation of the last version) and its
distance to the clean run with the plain mean. Goal: every robust rule within 2 points of
clean while under attack.

Run: `.venv/bin/python bench/poisoning.py [--agents 16 --malicious 3 --versions 30]`
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from malicious_agent import ATTACKS
from proc_stats import pss_mb, rss_mb

from fleetfl.coordinator.local_fleet import LocalFleet
from fleetfl.coordinator.rundir import RunDir
from fleetfl.shared.devtools.local_broker import LocalMosquitto

BENCH_DIR = Path(__file__).resolve().parent
GOAL_PT = 2.0


@dataclass(frozen=True)
class Scenario:
    attacked: bool
    aggregate: str = "mean"
    clip_median: float = 0.0

    @property
    def label(self) -> str:
        clip = f" + clip {self.clip_median:g} x median norm" if self.clip_median else ""
        return f"{'attacked' if self.attacked else 'clean'}: {self.aggregate}{clip}"


@dataclass
class Outcome:
    scenario: Scenario
    versions: int
    final: float | None
    best: float | None
    wall_s: float
    agent_rss_mb: float | None
    agent_pss_mb: float | None
    coordinator_rss_mb: float | None
    exit_code: int | None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", type=int, default=16, help="agent processes (default 16)")
    p.add_argument("--malicious", type=int, default=3, help="hostile among them (default 3)")
    p.add_argument("--versions", type=int, default=30, help="versions per run (default 30)")
    p.add_argument("--dataset", default="digits", help="digits (embedded), mnist or fashion")
    p.add_argument("--data-dir", default=os.environ.get("FL_DATA_DIR", ""))
    p.add_argument("--local-steps", type=int, default=20, help="FedAvg H (default 20)")
    p.add_argument("--rules", default="median,trimmed_mean:0.2",
                   help="robust rules to run under attack (default median,trimmed_mean:0.2)")
    p.add_argument("--clip-median", type=float, default=1.0,
                   help="also run the mean clipped to F x the median norm (0: skip)")
    p.add_argument("--clean-robust", action="store_true",
                   help="also run every robust rule without attackers (its cost when clean)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per run at most")
    p.add_argument("--keep", action="store_true", help="keep run and log folders")
    return p.parse_args(argv)


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    rules = [r for r in args.rules.split(",") if r]
    out = [Scenario(False), Scenario(True)]
    if args.clip_median:
        out.append(Scenario(True, "mean", args.clip_median))
    out += [Scenario(True, rule) for rule in rules]
    if args.clean_robust:
        out += [Scenario(False, rule) for rule in rules]
    return out


def run_one(args: argparse.Namespace, broker: LocalMosquitto, sc: Scenario, n: int,
            work: Path) -> Outcome:
    run = f"poison-{n}-{os.getpid()}"
    run_dir, logs = work / "runs", work / f"logs-{n}"
    coordinator = ["--algo", "fedavg", "--dataset", args.dataset, "--partition", "iid",
                   "--min-agents", str(args.agents), "--max-versions", str(args.versions),
                   "--local-steps", str(args.local_steps), "--window-timeout", "10",
                   "--run-dir", str(run_dir), "--aggregate", sc.aggregate,
                   "--clip-median", str(sc.clip_median)]
    hostile = args.malicious if sc.attacked else 0
    start, code = time.monotonic(), None
    agent_rss = agent_pss = coordinator_rss = None
    with LocalFleet(broker.url, run, logs, coordinator, ["--block-timeout", "20"],
                    data_dir=args.data_dir) as fleet:
        fleet.env["PYTHONPATH"] = os.pathsep.join(
            [str(BENCH_DIR), *filter(None, [os.environ.get("PYTHONPATH")])])
        fleet.start_coordinator()
        for i in range(args.agents):
            if i < args.agents - hostile:
                fleet.start_agent(i, args.agents)
            else:
                attack = ATTACKS[(i - (args.agents - hostile)) % len(ATTACKS)]
                fleet.start_agent(i, args.agents, extra=["--attack", attack],
                                  module="malicious_agent")
        deadline = start + args.timeout
        while fleet.coordinator.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            if agent_rss is None and any(e["version"] >= 2
                                         for e in RunDir(run_dir / run).events()):
                agent_rss = mean_of([rss_mb(p.pid) for p in fleet.agents.values()])
                agent_pss = mean_of([pss_mb(p.pid) for p in fleet.agents.values()])
                coordinator_rss = rss_mb(fleet.coordinator.pid)
        code = fleet.coordinator.poll()
        if code is None:
            print(f"{sc.label}: timed out after {args.timeout:.0f} s", file=sys.stderr)
        fleet.wait_agents(timeout=10)
    events = RunDir(run_dir / run).events()
    accuracies = [e["accuracy"] for e in events if e.get("accuracy") is not None]
    return Outcome(sc, events[-1]["version"] if events else 0,
                   accuracies[-1] if accuracies else None,
                   max(accuracies) if accuracies else None,
                   time.monotonic() - start, agent_rss, agent_pss, coordinator_rss, code)


def mean_of(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def report(args: argparse.Namespace, outcomes: list[Outcome]) -> int:
    attacks = ", ".join(ATTACKS[i % len(ATTACKS)] for i in range(args.malicious))
    print(f"\n{args.agents} agents ({args.malicious} hostile when attacked: {attacks}), "
          f"FedAvg H = {args.local_steps}, {args.dataset} iid, {args.versions} versions\n")
    print("| scenario | versions | final accuracy | best | vs clean (pt) | wall s "
          "| agent RSS / PSS MiB | coordinator RSS MiB | exit |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    clean = outcomes[0].final
    failed = 0
    for o in outcomes:
        gap = None if o.final is None or clean is None else 100 * (o.final - clean)
        print(f"| {o.scenario.label} | {o.versions} | {fmt(o.final, '.4f')} "
              f"| {fmt(o.best, '.4f')} | {fmt(gap, '+.1f')} | {o.wall_s:.0f} "
              f"| {fmt(o.agent_rss_mb, '.0f')} / {fmt(o.agent_pss_mb, '.0f')} "
              f"| {fmt(o.coordinator_rss_mb, '.0f')} "
              f"| {o.exit_code} |")
    print()
    for o in outcomes:
        robust = o.scenario.attacked and (o.scenario.aggregate != "mean"
                                          or o.scenario.clip_median)
        if not robust:
            continue
        ok = o.final is not None and clean is not None and 100 * (clean - o.final) <= GOAL_PT
        failed += not ok
        print(f"{o.scenario.label}: {fmt(o.final, '.4f')} vs clean {fmt(clean, '.4f')} "
              f"(goal within {GOAL_PT:g} pt) {'PASS' if ok else 'SHORT'}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not 0 <= args.malicious < args.agents:
        print("--malicious must be in [0, --agents)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="fleetfl-poison-"))
    outcomes = []
    try:
        with LocalMosquitto() as broker:
            for n, sc in enumerate(scenarios(args)):
                print(f"running {sc.label} ...", file=sys.stderr, flush=True)
                outcomes.append(run_one(args, broker, sc, n, work))
                o = outcomes[-1]
                print(f"  -> final {fmt(o.final, '.4f')} after {o.versions} versions, "
                      f"{o.wall_s:.0f} s", file=sys.stderr, flush=True)
    finally:
        if args.keep:
            print(f"run and log folders kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return report(args, outcomes)


if __name__ == "__main__":
    raise SystemExit(main())
