"""fl-agent: run one federated-learning agent."""

from __future__ import annotations

import argparse
import logging
import sys

from fleetfl.shared.config import ConfigError, load_agent_config
from fleetfl.shared.learn.data import DataError
from fleetfl.shared.net.mqtt_auth import add_auth_flags
from fleetfl.shared.net.transport import BrokerUnreachable
from fleetfl.shared.wire.signing import add_signing_flags


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fl-agent",
        description="Train locally on this device's own data and exchange model updates with "
                    "the fleetfl coordinator over MQTT. The algorithm and the task (model, "
                    "loaders, loss, metrics) come from the coordinator's job (retained model "
                    "message); the task must be installed here too.",
        epilog="Examples: fl-agent --broker mqtt://broker:1883 --run sensors --agent-id pi01 "
               "--data /var/lib/fleetfl/data (this device's own data); simulation of a fleet "
               "on a built-in data set: fl-agent ... --partition 0/16 --data-dir DIR")
    p.add_argument("--config", help="YAML file with agent keys (flags override it)")
    p.add_argument("--broker", help="MQTT broker URL, e.g. mqtt://127.0.0.1:1883")
    p.add_argument("--run", help="job id (topic prefix fl/<run>/...)")
    p.add_argument("--agent-id", dest="agent_id", help="this device's id (unique in the run)")
    p.add_argument("--data", help="this device's own data folder, read by the job's task "
                                   "(its train/validation loaders)")
    p.add_argument("--partition", help="simulation: train on shard i (0-based) of n of the "
                                       "task's global data set (demos, tests, benches)")
    p.add_argument("--data-dir", dest="data_dir",
                   help="simulation: folder with the global data set, e.g. MNIST IDX files "
                        "(default: $FL_DATA_DIR)")
    p.add_argument("--block-timeout", dest="block_timeout", type=float,
                   help="seconds to wait for a late average before resynchronising")
    add_auth_flags(p)
    add_signing_flags(p, "this agent", "--coordinator-key",
                      "refuse coordinator messages not signed by this public key (PEM)")
    p.add_argument("--threads", type=int, help="torch threads (default 1)")
    p.add_argument("--slowdown", type=float,
                   help="behave like a device F times slower (sleeps; default 1)")
    p.add_argument("--progress-interval", dest="progress_interval", type=float,
                   help="seconds between progress log lines when not on a terminal "
                        "(default 30; on a terminal a progress bar is shown)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "verbose")}
    try:
        from fleetfl.agent.runner import AgentRunner  # torch import after argument checks

        cfg = load_agent_config(args.config, overrides)
        if not cfg.data_dir:
            from fleetfl.shared.learn.data import resolve_data_dir
            cfg.data_dir = str(resolve_data_dir(None) or "")
        return AgentRunner(cfg).run()
    except (ConfigError, DataError, BrokerUnreachable, ValueError) as exc:
        print(f"fl-agent: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
