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
from fleetfl.shared.config import JobConfig, RunConfig
from fleetfl.shared.core.version import add_version_flag
from fleetfl.shared.devtools.local_broker import BrokerError, LocalMosquitto
from fleetfl.shared.flags import HelpFormatter, add_config_flags, given, to_argv

# fl-coordinator's run keys fl-demo does not offer: it starts the broker and sets min_agents
# to --agents; TLS, credentials and signing belong to a real fleet
NOT_IN_DEMO = ("broker", "min_agents", "tls_ca", "tls_cert", "tls_key", "username",
               "password_file", "insecure_credentials", "signing_key", "agent_keys",
               "max_message_age")
# passed to the fleet by LocalFleet itself, not as coordinator flags
FLEET_KEYS = ("run", "data_dir")
DEMO_DEFAULTS = {"algo": "dga", "partition": "dirichlet", "max_versions": 40,
                 "run": f"demo-{time.strftime('%Y%m%d-%H%M%S')}", "run_dir": "runs"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fl-demo", description=__doc__, formatter_class=HelpFormatter,
        epilog="Job and run flags are fl-coordinator's, with the demo's own defaults shown; "
               "more fl-coordinator flags may follow --.")
    add_version_flag(p)
    p.add_argument("--agents", type=int, default=4, help="number of agent processes")
    p.add_argument("--broker", default="",
                   help="use this broker (URL) instead of starting a local Mosquitto "
                        "(default: a local one)")
    p.add_argument("--launch", choices=("fork", "spawn"), default="fork",
                   help="fork: agents forked from fl-demo once it has imported their code "
                        "(torch) one time; spawn: each agent a new interpreter importing it "
                        "all again, as on separate devices (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="give up on the coordinator after this long "
                        "(default: %(default)s seconds)")
    job = add_config_flags(p.add_argument_group("job"), JobConfig, defaults=DEMO_DEFAULTS)
    run = add_config_flags(p.add_argument_group("run"), RunConfig, exclude=NOT_IN_DEMO,
                           defaults=DEMO_DEFAULTS)
    p.add_argument("extra", nargs="*", help="more fl-coordinator flags, after --")
    p.set_defaults(coordinator_keys=[k for k in job + run if k not in FLEET_KEYS])
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    broker = None
    try:
        if not args.broker:
            broker = LocalMosquitto().start()
        url = args.broker or broker.url
        print(f"fl-demo: broker {url}, run {args.run}, {args.agents} agents, {args.algo} on "
              f"{args.task}", flush=True)
        coordinator_args = [*to_argv(given(args, args.coordinator_keys)),
                            "--min-agents", str(args.agents), *args.extra]
        start = time.monotonic()
        logs = Path(tempfile.mkdtemp(prefix="fl-demo-logs-"))
        with LocalFleet(url, args.run, logs, coordinator_args, data_dir=args.data_dir or "",
                        fork_agents=args.launch == "fork") as fleet:
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
