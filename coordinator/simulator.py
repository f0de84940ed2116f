"""fl-sim: simulate a fleetfl job with many agents in one process on a virtual clock.

The command line; the engine is sim_engine.py (what is real and what is modelled), the
measured step, version and hop times sim_calibration.py. Its events.jsonl holds the same
records as fl-coordinator's (recorder.py), so fl-report reads both.
"""

from __future__ import annotations

import argparse
import sys

import torch

from fleetfl.coordinator.sim_calibration import (
    measure_hop_s,
    measure_step_s,
    measure_version_s,
)
from fleetfl.coordinator.sim_engine import (
    UNMODELLED,
    DeviceProfile,
    SimConfig,
    Simulator,
)
from fleetfl.shared.config import ConfigError, JobConfig, RunConfig, load_config
from fleetfl.shared.core.version import add_version_flag
from fleetfl.shared.devtools.link_proxy import LinkSpec
from fleetfl.shared.flags import HelpFormatter, add_config_flags
from fleetfl.shared.learn.data import DataError
from fleetfl.shared.log_setup import setup_logging

# what tests, benches and users import from here
__all__ = ["UNMODELLED", "DeviceProfile", "SimConfig", "Simulator", "main", "measure_hop_s",
           "measure_step_s", "measure_version_s", "parse_args"]


# -- command line -----------------------------------------------------------------------------
# fl-coordinator's run keys the simulator uses (the job keys are all of them)
SIM_RUN_KEYS = ("run", "run_dir", "data_dir", "max_versions", "target_accuracy", "min_agents",
                "window_timeout", "window_quorum", "eval_every")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fl-sim", formatter_class=HelpFormatter,
        description="Simulate a fleetfl job with many agents in one process on a virtual "
                    "clock: the same algorithms and training, modelled step times and links. "
                    "Writes <run-dir>/<run>/events.jsonl like fl-coordinator.",
        epilog="Example: fl-sim --algo dga --agents 100 --latency 0.5 --profile pi4:0.05 "
               "--max-versions 50. Job and run flags are fl-coordinator's; times are virtual.")
    add_version_flag(p)
    p.add_argument("--config", help="YAML run config (fl-coordinator's keys)")
    add_config_flags(p.add_argument_group("job"), JobConfig)
    add_config_flags(p.add_argument_group("run"), RunConfig, only=SIM_RUN_KEYS,
                     shown={"run": "sim", "min_agents": "--agents, all agents"})
    _sim_flags(p.add_argument_group("simulation"))
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _sim_flags(s: argparse._ArgumentGroup) -> None:
    s.add_argument("--agents", type=int, default=8, help="number of agents")
    s.add_argument("--profile", action="append", default=[],
                   help="device profile name:step_s[:share[:jitter]] (repeatable; seconds "
                        "per step); default: one profile with --step-time")
    s.add_argument("--step-time", type=float, default=None,
                   help="seconds per local step (default: measured on this machine)")
    s.add_argument("--latency", type=float, default=0.0, help="one-way link latency, seconds")
    s.add_argument("--jitter", type=float, default=0.0,
                   help="+- seconds on each transfer")
    s.add_argument("--bandwidth", type=float, default=0.0,
                   help="bytes/s per direction (0: unlimited)")
    s.add_argument("--host-cores", type=int, default=0,
                   help="agents share this many cores (0: one device each)")
    s.add_argument("--hop-s", type=float, default=0.0,
                   help="transport overhead per message and direction, seconds")
    s.add_argument("--coord-msg-s", type=float, default=0.0,
                   help="coordinator seconds per received message")
    s.add_argument("--coord-version-s", type=float, default=None,
                   help="coordinator seconds per version (default: measured evaluation "
                        "and checkpoint)")
    s.add_argument("--join-s", type=float, default=0.0,
                   help="agents join within this many seconds")
    s.add_argument("--max-time", type=float, default=1e7, help="limit, virtual seconds")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    sim_keys = {"agents", "profile", "step_time", "latency", "jitter", "bandwidth",
                "host_cores", "hop_s", "coord_msg_s", "coord_version_s", "join_s", "max_time",
                "config", "verbose"}
    overrides = {k: v for k, v in vars(args).items() if k not in sim_keys}
    if overrides.get("min_agents") is None:
        overrides["min_agents"] = args.agents
    if overrides.get("run") is None:
        overrides["run"] = "sim"
    try:
        cfg = load_config(args.config, overrides)
        torch.set_num_threads(1)  # as an agent: one thread per device
        simulator = Simulator(cfg, _sim_config(args, cfg))
        reason = simulator.run()
    except (ConfigError, DataError, ValueError) as exc:
        print(f"fl-sim: error: {exc}", file=sys.stderr)
        return 2
    last = simulator.events[-1] if simulator.events else None
    print(f"{reason}: version {simulator.core.version}, virtual time "
          f"{last['time'] if last else 0:.2f} s, best accuracy {simulator.best_accuracy:.4f}, "
          f"{simulator.total_steps} local steps in {simulator.wall_s:.1f} s wall; "
          f"log: {simulator.rundir.events_path}")
    return 0


def _sim_config(args: argparse.Namespace, cfg: RunConfig) -> SimConfig:
    """The simulation flags; the step and version times measured here unless given."""
    if args.profile:
        profiles = [DeviceProfile.parse(t) for t in args.profile]
    else:
        step = args.step_time if args.step_time is not None else measure_step_s(cfg)
        profiles = [DeviceProfile("default", step)]
    version_s = args.coord_version_s
    if version_s is None:
        version_s = measure_version_s(cfg)
    link = LinkSpec(args.latency, args.jitter, args.bandwidth)
    return SimConfig(agents=args.agents, profiles=profiles, up=link, down=link,
                     host_cores=args.host_cores, hop_s=args.hop_s, coord_msg_s=args.coord_msg_s,
                     coord_version_s=version_s, join_s=args.join_s, max_time=args.max_time,
                     seed=cfg.job.seed)


if __name__ == "__main__":
    sys.exit(main())
