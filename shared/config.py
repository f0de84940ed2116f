"""Run configuration: defaults < YAML file < command-line flags, validated in one place.

The coordinator owns the job (algorithm, hyperparameters, data set, model) and hands it to the
agents inside the retained model message, so a fleet is reconfigured from one file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fleetfl.shared.core.catalog import Algo
from fleetfl.shared.core.job import (
    JOB_KEYS,
    ConfigError,
    JobConfig,
    coerce,
    job_with,
    plain,
    validate_job,
)
from fleetfl.shared.core.messages import (
    ID_RULE,
    PROTOCOL_VERSION,
    PROTOCOL_VERSIONS,
    valid_id,
)
from fleetfl.shared.core.robust import parse_aggregate
from fleetfl.shared.wire.signing import KeyFileError, KeyRing, load_private_key, load_public_key

# the algorithms' names (tests, benches); the job's types are the enums in core/, the flags'
# choices come from them (shared/flags.py)
ALGOS = tuple(a.value for a in Algo)
FEDERATED_EVAL = ("auto", "on", "off")


# Help text, unit and shown default of each key, in the field's metadata: the command-line
# flags are generated from them (shared/flags.py). Keys both configs have share their text.
_S = "seconds"
_MIB64 = 64 * 1024 * 1024
_META = {
    "broker": {"help": "MQTT broker URL: mqtt://HOST[:PORT] (plain TCP, port 1883) or "
                       "mqtts://HOST[:PORT] (TLS, port 8883, verified against the system CA "
                       "store unless --tls-ca)"},
    "max_message_bytes": {"help": "larger messages are refused before decoding",
                          "shown": f"{_MIB64} bytes = 64 MiB"},
    # below the broker role's 64 MiB max_packet_size; a broker announcing a lower limit lowers it
    "max_packet_bytes": {"help": "a message whose MQTT packet would be larger travels in chunks "
                                 "(0: never chunk; lowered to the broker's max_packet_size)",
                         "shown": f"{_MIB64 - 64 * 1024} bytes = 64 MiB - 64 KiB"},
    "tls_ca": {"help": "CA certificate (PEM) of the broker: use TLS verified against it"},
    "tls_cert": {"help": "client certificate (PEM)"},
    "tls_key": {"help": "client certificate's key (PEM)"},
    "username": {"help": "MQTT username (an agent's defaults to its id)"},
    "password_file": {"help": "file with the MQTT password (first line); needs TLS"},
    "insecure_credentials": {"help": "send the password without TLS (a network you trust)"},
    "signing_key": {"help": "sign what we publish with this Ed25519 private key (PEM)"},
    "max_message_age": {"help": "with the peers' keys given: refuse signed messages stamped "
                                "more than this long ago", "unit": _S},
}


def _key(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING,
         **metadata: Any) -> Any:
    """A config key: its default and its metadata (help, unit, shown, aliases, choices)."""
    return field(default=default, default_factory=factory, metadata=metadata)


@dataclass
class BrokerAccess:
    """How a process reaches the broker: MQTT over TLS with credentials (shared/net/
    mqtt_auth.py; FL_MQTT_* variables fill gaps). The coordinator's and agents' settings."""

    tls_ca: str = _key("", **_META["tls_ca"])
    tls_cert: str = _key("", **_META["tls_cert"])
    tls_key: str = _key("", **_META["tls_key"])
    username: str = _key("", **_META["username"])
    password_file: str = _key("", **_META["password_file"])
    insecure_credentials: bool = _key(False, **_META["insecure_credentials"])


@dataclass
class RunConfig(BrokerAccess):
    run: str = _key("demo", help="job id: topic prefix fl/<run>/ and run directory name")
    broker: str = _key("", shown="mqtt://127.0.0.1:1883", **_META["broker"])
    run_dir: str = _key("runs", help="parent folder of run directories (<run_dir>/<run>/)")
    data_dir: str = _key("", help="the task's data folder: its central test set and global "
                                  "data set (built-ins: IDX files, shakespeare/input.txt)",
                         shown="$FL_DATA_DIR")
    max_versions: int = _key(50, help="stop after this many published averages",
                             unit="versions")
    target_accuracy: float = _key(0.0, help="stop once accuracy (0..1) reaches this; 0: no "
                                            "target, run max_versions")
    window_timeout: float = _key(60.0, help="how long a window/round waits for missing agents "
                                            "after its first update", unit=_S)
    # Drop at a timeout without following one agent: arrivals spread in a real fleet, so a
    # short timeout alone closes windows on the first one or two updates (issue 17, item 5).
    window_quorum: int = _key(0, help="fewest updates a window closes with at its timeout or "
                                      "deadline: it keeps waiting for more, up to every agent "
                                      "expected online (0: any)", unit="updates")
    min_agents: int = _key(1, help="agents that must report before the first average (start "
                                   "barrier)")
    # Off by default: a run that starts short-handed trains without those agents' data, so
    # the operator opts in. The coordinator names who it waits for every 30 s meanwhile.
    start_timeout: float = _key(0.0, help="the start barrier's timeout: this long after the "
                                          "first hello, the first average goes ahead with the "
                                          "updates in if there are at least start_quorum (0: "
                                          "wait for min_agents however long)", unit=_S)
    start_quorum: int = _key(0, help="fewest updates the first average takes once "
                                     "start_timeout has passed; fewer: it keeps waiting",
                             shown="0: a majority of min_agents, min_agents // 2 + 1")
    max_staleness: int = _key(-1, help="refuse updates more than this many versions old (-1: "
                                       "the algorithm's own, FedAvg 0, DGA D // K)",
                              shown="-1: the algorithm's own")
    max_message_bytes: int = _key(_MIB64, **_META["max_message_bytes"])
    # larger MQTT packets are sent in chunks (shared/wire/chunking.py; 0: never)
    max_packet_bytes: int = _key(_MIB64 - 64 * 1024, **_META["max_packet_bytes"])
    # The wire version the coordinator writes (PROTOCOL.md section 19); agents of this release
    # read both and answer in the model's, and the coordinator reads both from agents.
    protocol: int = _key(PROTOCOL_VERSION, choices=PROTOCOL_VERSIONS,
                         help="wire protocol version the coordinator writes: 2 (arrays 16-byte "
                              "aligned after a header-length prefix) or 1 (while devices of "
                              "an older release, which read only 1, are being upgraded)")
    eval_every: int = _key(1, help="evaluate the global model every N versions (and at the "
                                   "last)")
    # agents evaluate the global model on their validation data: auto = when the task gives
    # the coordinator no test set
    federated_eval: str = _key("auto", choices=FEDERATED_EVAL,
                               help="ask agents to evaluate versions on their validation data "
                                    "and log the sample-weighted result; auto: when the task "
                                    "has no central test set")
    # Round deadline (FedPMT's budget; FedAvg drops whoever misses it): fixed seconds, or
    # deadline_factor x the full-model round time of the deadline_rank-th fastest agent.
    round_deadline: float = _key(0.0, help="fixed round deadline: late agents are dropped "
                                           "(FedPMT's budget; 0: none)", unit=_S)
    deadline_rank: int = _key(0, help="deadline = deadline_factor x the full-model round time "
                                      "of the k-th fastest agent (0: none unless "
                                      "round_deadline; pmt: the fastest)")
    deadline_factor: float = _key(1.0, help="multiplier of the deadline_rank agent's round "
                                            "time")
    # robust aggregation, any payload (shared/core/robust.py)
    aggregate: str = _key("mean", help="mean (sample-weighted), median or trimmed_mean:F")
    clip_norm: float = _key(0.0, help="clip each update to this L2 norm before aggregating "
                                      "(0: off)")
    clip_median: float = _key(0.0, help="clip each update to this factor times the window's "
                                        "median norm (0: off)")
    # FedBuff (--algo fedbuff, shared/core/fedbuff.py): coordinator-only, so not job keys (a
    # new job key would make agents of older releases refuse every job: PROTOCOL.md 19)
    buffer: int = _key(0, help="FedBuff B: apply the buffered updates every B arrivals",
                       shown="0: min_agents", unit="updates")
    server_lr: float = _key(1.0, help="FedBuff eta_g: the server learning rate the buffer's "
                                      "staleness-weighted mean is applied with")
    # Bounds on what one agent can claim (issue 14): samples at hello (an update may claim no
    # more than its hello did), and how far an average may move a parameter (|p| beyond it:
    # the contribution that would cause it is refused, `out_of_bounds`)
    max_samples: int = _key(10**7, help="most training (and validation) samples an agent's "
                                        "hello may declare", unit="samples")
    max_param: float = _key(1e6, help="an update that would move a parameter of the global "
                                      "model beyond +-this is left out of the average")
    metrics_port: int = _key(0, help="serve Prometheus metrics over HTTP on this port (0: off)")
    # Signed messages (shared/wire/signing.py): sign what we publish with signing_key; with
    # agent_keys (YAML id -> public key) refuse agents' messages not signed by their key or
    # stamped more than max_message_age seconds ago.
    signing_key: str = _key("", **_META["signing_key"])
    agent_keys: str = _key("", help="YAML key list (agent id -> public key): refuse agents' "
                                    "messages not signed by their key")
    max_message_age: float = _key(300.0, **_META["max_message_age"])
    job: JobConfig = _key(factory=JobConfig, help="the job (its keys are flags of their own)",
                          flag=False)


def _check_id(key: str, value: str, hint: str = "") -> None:
    if not valid_id(value):
        raise ConfigError(f"{key} {value!r}: {hint}use {ID_RULE}")


def _merge(obj: Any, values: dict, prefix: str = "") -> None:
    known = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if value is None:
            continue
        if key not in known:
            raise ConfigError(f"unknown key '{prefix}{key}'; known: {', '.join(sorted(known))}")
        current = getattr(obj, key)
        if isinstance(current, JobConfig):
            setattr(obj, key, job_with(current, value, f"{prefix}{key}."))
        else:
            setattr(obj, key, coerce(prefix + key, value, current))


# agent keys of earlier versions -> (new key, why): refused with a message naming the new one
RENAMED_AGENT_KEYS = {"partition": ("shard", "the shard i/n this agent trains on; partition "
                                             "is the coordinator's data-dealing scheme")}


@dataclass
class AgentConfig(BrokerAccess):
    run: str = _key("demo", help="job id (topic prefix fl/<run>/...)")
    broker: str = _key("mqtt://127.0.0.1:1883", **_META["broker"])
    agent_id: str = _key("", help="this device's id, unique in the run (also its MQTT "
                                  "username)")
    # i/n: simulate a fleet by dealing shard i of n of the task's global data set
    shard: str = _key("0/1", help="simulation: train on shard i (0-based) of n of the task's "
                                  "global data set (demos, tests, benches)")
    data_dir: str = _key("", help="simulation: folder with the task's global data set",
                         shown="$FL_DATA_DIR")
    data: str = _key("", help="this device's own data folder, read by the job's task (its "
                              "train/validation loaders)")
    connect_timeout: float = _key(0.0, help="give up on the first connection to the broker "
                                           "after this long (0: never; a device may boot "
                                           "before its server: retries back off to 30 s)",
                                  unit=_S)
    block_timeout: float = _key(120.0, help="how long to wait for a late average before "
                                            "resynchronising from the model", unit=_S)
    max_message_bytes: int = _key(_MIB64, **_META["max_message_bytes"])
    max_packet_bytes: int = _key(_MIB64 - 64 * 1024, **_META["max_packet_bytes"])
    threads: int = _key(1, help="torch threads (a Pi has few cores and agents may share a "
                                "host)")
    slowdown: float = _key(1.0, help="behave like a device this many times slower (sleeps)")
    # The sequence counter's file (agent/sequence.py): numbers keep growing across restarts
    # even when the clock steps back (a Pi has no real-time clock).
    state_dir: str = _key("", help="folder of this agent's state: <agent_id>.seq, its "
                                   "message counter, which must outlive the process",
                          shown="$STATE_DIRECTORY (systemd's StateDirectory=), else "
                                "$XDG_STATE_HOME/fleetfl or ~/.local/state/fleetfl")
    progress_interval: float = _key(30.0, help="time between progress log lines when not on a "
                                               "terminal (on one: a progress bar)", unit=_S)
    # Signed messages: sign ours with signing_key; with coordinator_key (its public key file)
    # refuse downstream messages not signed by it or older than max_message_age seconds.
    signing_key: str = _key("", **_META["signing_key"])
    coordinator_key: str = _key("", help="refuse coordinator messages not signed by this "
                                         "public key (PEM)")
    max_message_age: float = _key(300.0, **_META["max_message_age"])


def _read_yaml(path: str | Path) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of keys to values")
    return data


def load_config(path: str | Path | None, overrides: dict | None = None) -> RunConfig:
    """Defaults, then the YAML file (if any), then non-None `overrides` (job keys may be
    given flat: `lr` means `job.lr`)."""
    cfg = RunConfig()
    if path:
        _merge(cfg, _read_yaml(path))
    if overrides:
        _merge(cfg, {k: v for k, v in overrides.items() if k not in JOB_KEYS})
        cfg.job = job_with(cfg.job, {k: v for k, v in overrides.items() if k in JOB_KEYS})
    validate(cfg)
    return cfg


def load_agent_config(path: str | Path | None, overrides: dict | None = None) -> AgentConfig:
    cfg = AgentConfig()
    for values, where in ((_read_yaml(path) if path else {}, f"{path}: "), (overrides or {}, "")):
        for old, (new, what) in RENAMED_AGENT_KEYS.items():
            if values.get(old) is not None:
                raise ConfigError(f"{where}agent key '{old}' is now '{new}' (--{new}: {what})")
        _merge(cfg, values)
    _check_id("agent_id", cfg.agent_id, "give --agent-id; ")
    index, sep, total = cfg.shard.strip().partition("/")
    if not (sep and index.isdigit() and total.isdigit() and int(index) < int(total)):
        raise ConfigError(f"shard {cfg.shard!r}: expected i/n, integers with 0 <= i < n "
                          "(i is 0-based), e.g. 3/16")
    _check_id("run", cfg.run)
    if cfg.connect_timeout < 0:
        raise ConfigError("connect_timeout must be >= 0 seconds (0: retry forever)")
    if cfg.block_timeout <= 0 or cfg.threads < 1 or cfg.slowdown < 1:
        raise ConfigError("block_timeout must be > 0, threads >= 1 and slowdown >= 1")
    if cfg.progress_interval <= 0:
        raise ConfigError("progress_interval must be > 0 seconds")
    if cfg.max_packet_bytes != 0 and cfg.max_packet_bytes < 1024:
        raise ConfigError("max_packet_bytes must be 0 (never chunk) or >= 1024")
    _check_key_files(cfg, {"signing_key": load_private_key, "coordinator_key": load_public_key})
    return cfg


def _check_key_files(cfg: RunConfig | AgentConfig, loaders: dict) -> None:
    """Each configured key file must exist and parse: a typo fails at start-up with the key's
    name, not later as every message refused."""
    for key, loader in loaders.items():
        if getattr(cfg, key):
            try:
                loader(getattr(cfg, key))
            except KeyFileError as exc:
                raise ConfigError(f"{key}: {exc}") from None
    if cfg.max_message_age <= 0:
        raise ConfigError("max_message_age must be > 0 seconds")


def validate(cfg: RunConfig) -> None:
    job = cfg.job
    _check_id("run", cfg.run)
    validate_job(job)
    checks = [
        (cfg.federated_eval in FEDERATED_EVAL,
         f"federated_eval {cfg.federated_eval!r}: one of {', '.join(FEDERATED_EVAL)}"),
        (cfg.max_versions >= 1, "max_versions must be >= 1"),
        (0.0 <= cfg.target_accuracy <= 1.0, "target_accuracy must be in [0, 1]"),
        (cfg.window_timeout > 0, "window_timeout must be > 0"),
        (cfg.min_agents >= 1, "min_agents must be >= 1"),
        (cfg.start_timeout >= 0, "start_timeout must be >= 0 seconds (0: no timeout)"),
        (cfg.window_quorum >= 0, "window_quorum must be >= 0 (0: any)"),
        (0 <= cfg.start_quorum <= cfg.min_agents,
         "start_quorum must be in 0..min_agents (0: a majority of min_agents)"),
        (cfg.max_staleness >= -1, "max_staleness must be >= 0 (or -1 for the default)"),
        (cfg.max_message_bytes >= 1024, "max_message_bytes must be >= 1024"),
        (cfg.max_packet_bytes == 0 or cfg.max_packet_bytes >= 1024,
         "max_packet_bytes must be 0 (never chunk) or >= 1024"),
        (cfg.protocol in PROTOCOL_VERSIONS,
         f"protocol {cfg.protocol}: one of {', '.join(map(str, PROTOCOL_VERSIONS))}"),
        # quantized codes and indices are integer arrays, which only version 2 carries
        (cfg.protocol >= 2 or not cfg.job.compress,
         f"compress {cfg.job.compress.value!r} needs protocol 2 (version 1 carries float32 "
         "arrays only)"),
        (cfg.eval_every >= 1, "eval_every must be >= 1"),
        (cfg.round_deadline >= 0 and cfg.deadline_rank >= 0 and cfg.deadline_factor > 0,
         "round_deadline and deadline_rank must be >= 0, deadline_factor > 0"),
        (cfg.clip_norm >= 0 and cfg.clip_median >= 0, "clip_norm, clip_median must be >= 0"),
        (not (cfg.clip_norm and cfg.clip_median), "give clip_norm or clip_median, not both"),
        (cfg.max_samples >= 1, "max_samples must be >= 1"),
        (cfg.buffer >= 0 and cfg.server_lr > 0, "buffer must be >= 0 (0: min_agents), "
                                                "server_lr > 0"),
        (0 < cfg.max_param < float("inf"), "max_param must be a finite number > 0"),
        (0 <= cfg.metrics_port <= 65535, "metrics_port must be in 0..65535 (0: off)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    try:
        parse_aggregate(cfg.aggregate)
    except ValueError as exc:
        raise ConfigError(f"aggregate {exc}") from None
    _check_key_files(cfg, {"signing_key": load_private_key, "agent_keys": KeyRing.from_file})


def to_dict(cfg: RunConfig) -> dict:
    return plain(cfg)
