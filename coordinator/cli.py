"""fl-coordinator: run one federated-learning job."""

from __future__ import annotations

import argparse
import logging
import sys

from fleetfl.coordinator.rundir import ResumeError
from fleetfl.shared.config import ALGOS, OPTIMIZERS, SCHEMES, ConfigError, load_config
from fleetfl.shared.learn.data import DataError
from fleetfl.shared.net.mqtt_auth import add_auth_flags
from fleetfl.shared.net.transport import BrokerUnreachable
from fleetfl.shared.wire.signing import add_signing_flags

# The run dir cannot be resumed as it is (nothing readable is left, or going on would lose
# acknowledged updates): the operator must act, so the systemd unit does not restart on it
# (RestartPreventExitStatus=). sysexits' EX_DATAERR.
EXIT_CANNOT_RESUME = 65


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fl-coordinator",
        description="Coordinate a fleetfl job over MQTT: collect agents' updates, average "
                    "them, publish the new global model, evaluate and checkpoint every version.",
        epilog="Example: fl-coordinator --algo dga --broker mqtt://127.0.0.1:1883 --run demo "
               "--dataset digits --max-versions 40. Flags override the YAML --config.")
    p.add_argument("--config", help="YAML run config (see README: config keys)")
    p.add_argument("--algo", choices=ALGOS, help="fedavg (default), dga, drpga, fda, lbgm, pmt")
    p.add_argument("--broker", help="MQTT broker URL (default mqtt://127.0.0.1:1883)")
    p.add_argument("--run", help="job id (topic prefix fl/<run>/...; run dir name)")
    p.add_argument("--run-dir", dest="run_dir", help="parent folder of run directories")
    p.add_argument("--data-dir", dest="data_dir", help="data folder (default $FL_DATA_DIR)")
    p.add_argument("--task", "--dataset", dest="task",
                   help="the task: built-in digits (default, embedded), mnist, fashion, "
                        "shakespeare, or module.path:attribute of your own (must be installed "
                        "on the coordinator and every agent); --dataset is its old name")
    p.add_argument("--partition", choices=SCHEMES,
                   help="simulation: how agents given --partition i/n split the task's "
                        "global data set")
    p.add_argument("--alpha", type=float, help="Dirichlet alpha for --partition dirichlet")
    p.add_argument("--local-steps", dest="local_steps", type=int, help="FedAvg H")
    p.add_argument("--period", type=int, help="DGA K: local steps per window")
    p.add_argument("--delay", type=int, help="DGA D: steps before an average is applied")
    p.add_argument("--lr", type=float, help="local learning rate")
    p.add_argument("--optimizer", choices=OPTIMIZERS,
                   help="local optimizer (default sgd; charlstm trains best with adam, lr 0.01)")
    p.add_argument("--momentum", type=float, help="SGD momentum (default 0.9)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="local batch size")
    p.add_argument("--seed", type=int, help="seed of model init and partitions")
    p.add_argument("--max-versions", dest="max_versions", type=int, help="stop after N")
    p.add_argument("--target-accuracy", dest="target_accuracy", type=float,
                   help="stop once test accuracy reaches this (0..1)")
    p.add_argument("--min-agents", dest="min_agents", type=int,
                   help="agents that must report before the first average")
    p.add_argument("--window-timeout", dest="window_timeout", type=float,
                   help="seconds a window waits for missing agents after the first report")
    p.add_argument("--max-staleness", dest="max_staleness", type=int,
                   help="refuse updates more than this many versions old")
    add_auth_flags(p)
    add_signing_flags(p, "the coordinator", "--agent-keys",
                      "YAML key list (agent id -> public key): refuse unsigned messages")
    p.add_argument("--payload", choices=("dense", "partial", "lbgm", "suffix"),
                   help="what is sent (default: the algorithm's own)")
    p.add_argument("--rate", type=float, help="DRPGA update rate (0.02 .. 1.0 ladder)")
    p.add_argument("--rate-walk", dest="rate_walk", action="store_true", default=None,
                   help="DRPGA: random walk over neighbouring rates")
    p.add_argument("--fda-variant", dest="fda_variant", choices=("naive", "linear", "sketch"))
    p.add_argument("--fda-theta", dest="fda_theta", type=float,
                   help="FDA variance threshold (default: calibrated per model)")
    p.add_argument("--rtc-steps", dest="rtc_steps", type=int,
                   help="FDA: local steps between local-state reports")
    p.add_argument("--lbgm-threshold", dest="lbgm_threshold", type=float,
                   help="LBGM: largest sin^2 sent as one scalar")
    p.add_argument("--round-deadline", dest="round_deadline", type=float,
                   help="seconds per round; late agents are dropped (FedPMT's budget)")
    p.add_argument("--deadline-rank", dest="deadline_rank", type=int,
                   help="deadline = factor x full round time of the k-th fastest agent")
    p.add_argument("--deadline-factor", dest="deadline_factor", type=float,
                   help="multiplier for --deadline-rank (default 1)")
    p.add_argument("--eval-every", dest="eval_every", type=int,
                   help="evaluate every N versions (default 1)")
    p.add_argument("--federated-eval", dest="federated_eval", choices=("auto", "on", "off"),
                   help="ask agents to evaluate versions on their validation data and log "
                        "the sample-weighted result (auto, the default: when the task has no "
                        "central test set)")
    p.add_argument("--aggregate",
                   help="mean (default), median or trimmed_mean:F (dense payloads only)")
    p.add_argument("--clip-norm", dest="clip_norm", type=float,
                   help="clip each update to this L2 norm before aggregating (0: off)")
    p.add_argument("--clip-median", dest="clip_median", type=float,
                   help="clip each update to F times the window's median norm (0: off)")
    p.add_argument("--metrics-port", dest="metrics_port", type=int,
                   help="serve Prometheus metrics on this port (0: off, the default)")
    p.add_argument("--resume", nargs="?", const="yes", choices=("yes", "auto"),
                   help="continue from the run dir's checkpoint and journal; 'auto': if "
                        "there is one, else start afresh (what the systemd unit uses)")
    p.add_argument("--accept-journal-loss", dest="accept_journal_loss", action="store_true",
                   help="with --resume: go on past damage in the journal, losing the records "
                        "it holds (the damaged files are kept aside); without it the "
                        f"coordinator refuses to resume and exits {EXIT_CANNOT_RESUME}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    if args.accept_journal_loss and not args.resume:
        p.error("--accept-journal-loss goes with --resume")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = {k: v for k, v in vars(args).items()
                 if k not in ("config", "verbose", "resume", "accept_journal_loss")}
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
