"""fl-demo: a whole fleet on this machine. Starts a local Mosquitto (or uses --broker), a
coordinator and N agents as separate processes, and prints the accuracy of every version."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from fleetfl.coordinator.local_fleet import LocalFleet
from fleetfl.coordinator.rundir import RunDir
from fleetfl.shared.config import ALGOS
from fleetfl.shared.devtools.local_broker import BrokerError, LocalMosquitto


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fl-demo", description=__doc__)
    p.add_argument("--agents", type=int, default=4, help="number of agent processes")
    p.add_argument("--algo", default="dga", choices=ALGOS)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default="")
    p.add_argument("--partition", default="dirichlet")
    p.add_argument("--max-versions", type=int, default=40)
    p.add_argument("--target-accuracy", type=float, default=0.0)
    p.add_argument("--run", default=f"demo-{time.strftime('%Y%m%d-%H%M%S')}")
    p.add_argument("--run-dir", default="runs")
    p.add_argument("--broker", default="", help="use this broker instead of a local one")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this long")
    p.add_argument("extra", nargs="*", help="more fl-coordinator flags, after --")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    broker = None
    try:
        if not args.broker:
            broker = LocalMosquitto().start()
        url = args.broker or broker.url
        print(f"fl-demo: broker {url}, run {args.run}, {args.agents} agents, {args.algo} on "
              f"{args.dataset}", flush=True)
        coordinator_args = ["--algo", args.algo, "--dataset", args.dataset,
                            "--partition", args.partition, "--min-agents", str(args.agents),
                            "--max-versions", str(args.max_versions),
                            "--target-accuracy", str(args.target_accuracy),
                            "--run-dir", args.run_dir, *args.extra]
        start = time.monotonic()
        logs = Path(tempfile.mkdtemp(prefix="fl-demo-logs-"))
        with LocalFleet(url, args.run, logs, coordinator_args, data_dir=args.data_dir) as fleet:
            fleet.start_coordinator(stream=True)
            fleet.start_agents(args.agents)
            code = fleet.wait_coordinator(timeout=args.timeout)
            fleet.wait_agents(timeout=30)
        elapsed = time.monotonic() - start
        events = RunDir(Path(args.run_dir) / args.run).events()
        if code != 0 or not events:
            print(f"fl-demo: coordinator exited with {code}; logs in {logs}", file=sys.stderr)
            return 1
        curve = ", ".join(f"{e['accuracy']:.3f}" for e in events if e["accuracy"] is not None)
        last = events[-1]
        print(f"\nfl-demo: {len(events)} versions in {elapsed:.1f} s; test accuracy per version: "
              f"{curve}\nfl-demo: final accuracy {last['accuracy']:.4f}, uploaded "
              f"{last['bytes_up_total'] / 1e6:.2f} MB; run log {args.run_dir}/{args.run}/"
              f"events.jsonl; agent logs {logs}")
        return 0
    except BrokerError as exc:
        print(f"fl-demo: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if broker is not None:
            broker.close()


if __name__ == "__main__":
    sys.exit(main())
