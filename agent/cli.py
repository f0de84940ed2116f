"""fl-agent: run one federated-learning agent."""

from __future__ import annotations

import argparse
import sys

from fleetfl.shared.config import AgentConfig, ConfigError, load_agent_config
from fleetfl.shared.core.version import add_version_flag
from fleetfl.shared.flags import HelpFormatter, add_config_flags, refuse_renamed
from fleetfl.shared.learn.data import DataError
from fleetfl.shared.log_setup import setup_logging
from fleetfl.shared.net.mqtt_auth import add_auth_flags
from fleetfl.shared.net.transport import BrokerUnreachable
from fleetfl.shared.threads import limit_blas_threads
from fleetfl.shared.wire.signing import add_signing_flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fl-agent", formatter_class=HelpFormatter,
        description="Train locally on this device's own data and exchange model updates with "
                    "the fleetfl coordinator over MQTT. The algorithm and the task (model, "
                    "loaders, loss, metrics) come from the coordinator's job (retained model "
                    "message); the task must be installed here too.",
        epilog="Examples: fl-agent --broker mqtt://broker:1883 --run sensors --agent-id pi01 "
               "--data /var/lib/fleetfl/data (this device's own data); simulation of a fleet "
               "on a built-in data set: fl-agent ... --shard 0/16 --data-dir DIR")
    add_version_flag(p)
    p.add_argument("--config", help="YAML file with agent keys (flags override it)")
    add_auth_flags(p)
    add_signing_flags(p, "this agent", "--coordinator-key",
                      "refuse coordinator messages not signed by this public key (PEM)")
    add_config_flags(p, AgentConfig)
    refuse_renamed(p, "--partition", "--shard i/n",
                   "--partition is the coordinator's data-dealing scheme")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    limit_blas_threads()  # one BLAS thread unless FL_BLAS_THREADS (shared/threads.py)
    args = parse_args(argv)
    setup_logging(args.verbose)
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
