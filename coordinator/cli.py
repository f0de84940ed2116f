"""fl-coordinator: run one federated-learning job."""

from __future__ import annotations

import argparse
import sys

from fleetfl.coordinator.rundir import ResumeError
from fleetfl.shared.config import ConfigError, JobConfig, RunConfig, load_config
from fleetfl.shared.core.version import add_version_flag
from fleetfl.shared.flags import HelpFormatter, add_config_flags
from fleetfl.shared.learn.data import DataError
from fleetfl.shared.log_setup import setup_logging
from fleetfl.shared.net.mqtt_auth import add_auth_flags
from fleetfl.shared.net.transport import BrokerUnreachable
from fleetfl.shared.threads import limit_blas_threads
from fleetfl.shared.wire.signing import add_signing_flags

# The run dir cannot be resumed as it is (nothing readable is left, or going on would lose
# acknowledged updates): the operator must act, so the systemd unit does not restart on it
# (RestartPreventExitStatus=). sysexits' EX_DATAERR.
EXIT_CANNOT_RESUME = 65


# flags that are not config keys
NOT_CONFIG = ("config", "verbose", "resume", "accept_journal_loss")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fl-coordinator", formatter_class=HelpFormatter,
        description="Coordinate a fleetfl job over MQTT: collect agents' updates, average "
                    "them, publish the new global model, evaluate and checkpoint every version.",
        epilog="Example: fl-coordinator --algo dga --broker mqtt://127.0.0.1:1883 --run demo "
               "--task digits --max-versions 40. Flags override the YAML --config, which "
               "overrides the defaults shown (README: config keys).")
    add_version_flag(p)
    p.add_argument("--config", help="YAML run config (see README: config keys)")
    add_auth_flags(p)
    add_signing_flags(p, "the coordinator", "--agent-keys",
                      "YAML key list (agent id -> public key): refuse unsigned messages")
    add_config_flags(p.add_argument_group("job (sent to the agents)"), JobConfig)
    add_config_flags(p.add_argument_group("run"), RunConfig)
    p.add_argument("--resume", nargs="?", const="yes", choices=("yes", "auto"),
                   help="continue from the run dir's checkpoint and journal; 'auto': if "
                        "there is one, else start afresh (what the systemd unit uses)")
    p.add_argument("--accept-journal-loss", dest="accept_journal_loss", action="store_true",
                   help="with --resume: go on past damage in the journal, losing the records "
                        "it holds (the damaged files are kept aside); without it the "
                        f"coordinator refuses to resume and exits {EXIT_CANNOT_RESUME}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.accept_journal_loss and not args.resume:
        p.error("--accept-journal-loss goes with --resume")
    return args


def main(argv: list[str] | None = None) -> int:
    limit_blas_threads()  # one BLAS thread unless FL_BLAS_THREADS (shared/threads.py)
    args = parse_args(argv)
    setup_logging(args.verbose)
    overrides = {k: v for k, v in vars(args).items() if k not in NOT_CONFIG}
    try:
        cfg = load_config(args.config, overrides)
        from fleetfl.coordinator.runner import CoordinatorRunner  # torch import after checks

        resume = {None: False, "yes": True, "auto": "auto"}[args.resume]
        return CoordinatorRunner(cfg, resume=resume,
                                 accept_journal_loss=args.accept_journal_loss).run()
    except ResumeError as exc:
        print(f"fl-coordinator: error: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RESUME
    except (ConfigError, DataError, BrokerUnreachable) as exc:  # TaskError is a ConfigError
        print(f"fl-coordinator: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
