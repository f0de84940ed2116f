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
from fleetfl.shared.core.choices import Optimizer, Partition
from fleetfl.shared.core.job import (
    JOB_KEYS,
    ConfigError,
    JobConfig,
    coerce,
    job_with,
    plain,
    validate_job,
)
from fleetfl.shared.core.messages import ID_RULE, valid_id
from fleetfl.shared.core.robust import parse_aggregate
from fleetfl.shared.wire.signing import KeyFileError, KeyRing, load_private_key, load_public_key

# the choices as plain tuples (CLI choices); the job's types are the enums in core/
ALGOS = tuple(a.value for a in Algo)
SCHEMES = tuple(p.value for p in Partition)
OPTIMIZERS = tuple(o.value for o in Optimizer)
FEDERATED_EVAL = ("auto", "on", "off")


@dataclass
class RunConfig:
    run: str = "demo"
    broker: str = ""  # empty: start a local mosquitto
    run_dir: str = "runs"
    data_dir: str = ""
    max_versions: int = 50
    target_accuracy: float = 0.0  # 0: no target, run max_versions
    window_timeout: float = 60.0
    min_agents: int = 1
    max_staleness: int = -1  # -1: the algorithm's default
    max_message_bytes: int = 64 * 1024 * 1024
    # larger MQTT packets are sent in chunks (shared/wire/chunking.py; 0: never). Below the broker
    # role's 64 MiB max_packet_size; a broker announcing a lower limit lowers it.
    max_packet_bytes: int = 64 * 1024 * 1024 - 64 * 1024
    # MQTT over TLS with credentials (see shared/net/mqtt_auth.py; FL_MQTT_* variables fill gaps)
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    username: str = ""
    password_file: str = ""
    insecure_credentials: bool = False  # a password without TLS (refused otherwise)
    eval_every: int = 1  # evaluate the global model every N versions (and at the end)
    # agents evaluate the global model on their validation data: auto = when the task gives
    # the coordinator no test set
    federated_eval: str = "auto"
    # Round deadline (FedPMT's budget; FedAvg drops whoever misses it): fixed seconds, or
    # deadline_factor x the full-model round time of the deadline_rank-th fastest agent.
    round_deadline: float = 0.0
    deadline_rank: int = 0  # 0: no deadline unless round_deadline is set (pmt: fastest)
    deadline_factor: float = 1.0
    # robust aggregation, any payload (shared/core/robust.py)
    aggregate: str = "mean"  # mean, median or trimmed_mean:F
    clip_norm: float = 0.0  # clip each update to this L2 norm (0: off)
    clip_median: float = 0.0  # or to this factor times the window's median norm (0: off)
    # Bounds on what one agent can claim (issue 14): samples at hello (an update may claim no
    # more than its hello did), and how far an average may move a parameter (|p| beyond it:
    # the contribution that would cause it is refused, `out_of_bounds`)
    max_samples: int = 10**7
    max_param: float = 1e6
    metrics_port: int = 0  # Prometheus metrics over HTTP on this port (0: off)
    # Signed messages (shared/wire/signing.py): sign what we publish with signing_key; with
    # agent_keys (YAML id -> public key) refuse agents' messages not signed by their key or
    # stamped more than max_message_age seconds ago.
    signing_key: str = ""
    agent_keys: str = ""
    max_message_age: float = 300.0
    job: JobConfig = field(default_factory=JobConfig)


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


@dataclass
class AgentConfig:
    run: str = "demo"
    broker: str = "mqtt://127.0.0.1:1883"
    agent_id: str = ""
    # i/n: simulate a fleet by dealing shard i of n of the task's global data set
    partition: str = "0/1"
    data_dir: str = ""  # where the task's global data set is (simulation)
    data: str = ""  # this device's own data folder, read by the task's loaders
    block_timeout: float = 120.0  # waiting longer for an average -> resync from the model
    max_message_bytes: int = 64 * 1024 * 1024
    max_packet_bytes: int = 64 * 1024 * 1024 - 64 * 1024  # as RunConfig's
    threads: int = 1  # torch threads; a Pi has few cores and agents may share a host
    slowdown: float = 1.0  # behave like a device this many times slower (sleeps)
    progress_interval: float = 30.0  # seconds between progress lines (no terminal)
    # Signed messages: sign ours with signing_key; with coordinator_key (its public key file)
    # refuse downstream messages not signed by it or older than max_message_age seconds.
    signing_key: str = ""
    coordinator_key: str = ""
    max_message_age: float = 300.0
    # MQTT over TLS with credentials (see shared/net/mqtt_auth.py; FL_MQTT_* variables fill gaps)
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    username: str = ""
    password_file: str = ""
    insecure_credentials: bool = False  # a password without TLS (refused otherwise)


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
    if path:
        _merge(cfg, _read_yaml(path))
    _merge(cfg, overrides or {})
    _check_id("agent_id", cfg.agent_id, "give --agent-id; ")
    _check_id("run", cfg.run)
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
        (cfg.max_staleness >= -1, "max_staleness must be >= 0 (or -1 for the default)"),
        (cfg.max_message_bytes >= 1024, "max_message_bytes must be >= 1024"),
        (cfg.max_packet_bytes == 0 or cfg.max_packet_bytes >= 1024,
         "max_packet_bytes must be 0 (never chunk) or >= 1024"),
        (cfg.eval_every >= 1, "eval_every must be >= 1"),
        (cfg.round_deadline >= 0 and cfg.deadline_rank >= 0 and cfg.deadline_factor > 0,
         "round_deadline and deadline_rank must be >= 0, deadline_factor > 0"),
        (cfg.clip_norm >= 0 and cfg.clip_median >= 0, "clip_norm, clip_median must be >= 0"),
        (not (cfg.clip_norm and cfg.clip_median), "give clip_norm or clip_median, not both"),
        (cfg.max_samples >= 1, "max_samples must be >= 1"),
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
