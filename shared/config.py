"""Run configuration: defaults < YAML file < command-line flags, validated in one place.

The coordinator owns the job (algorithm, hyperparameters, data set, model) and hands it to the
agents inside the retained model message, so a fleet is reconfigured from one file.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fleetfl.shared.core.messages import ID_RULE, valid_id
from fleetfl.shared.core.robust import parse_aggregate
from fleetfl.shared.wire.signing import KeyFileError, KeyRing, load_private_key, load_public_key


class ConfigError(ValueError):
    """A bad configuration value; the message says which key and what is allowed."""


ALGOS = ("fedavg", "dga", "drpga", "fda", "lbgm", "pmt")
PAYLOADS = ("", "dense", "partial", "lbgm", "suffix")
FDA_VARIANTS = ("naive", "linear", "sketch")
RATES = (0.02, 0.05, 0.1, 0.2, 0.4, 1.0)
SCHEMES = ("iid", "dirichlet", "shards", "roles")
OPTIMIZERS = ("sgd", "adam")
FEDERATED_EVAL = ("auto", "on", "off")
MAX_SEED = 2**32 - 1  # FDA derives uint64 hash seeds from seed * 7919: keep that in range


@dataclass
class JobConfig:
    """What every agent must agree on; travels in the model message."""

    algo: str = "fedavg"
    # the task (model, data loaders, loss, metrics): an entry point name such as the built-in
    # digits, mnist, fashion, shakespeare, or "module.path:attribute" (shared/tasks/task.py)
    task: str = "digits"
    # name@version:hash of the task's layer table; set by the coordinator, checked by agents
    task_fingerprint: str = ""
    local_steps: int = 20  # FedAvg H
    period: int = 10  # DGA K
    delay: int = 2  # DGA D
    lr: float = 0.05
    momentum: float = 0.9
    optimizer: str = "sgd"
    batch_size: int = 32
    partition: str = "iid"
    alpha: float = 0.5
    seed: int = 0
    payload: str = ""  # what is sent: dense, partial, lbgm; empty: the algorithm's own
    rate: float = 0.1  # DRPGA update rate (a rung of the ladder 0.02 .. 1.0)
    rate_walk: bool = False  # DRPGA: random walk over neighbouring rates
    fda_variant: str = "linear"
    fda_theta: float = 0.0  # 0: the calibrated default for the model (see registry)
    rtc_steps: int = 5  # FDA: local steps between two local-state reports
    lbgm_threshold: float = 0.2  # LBGM delta: largest sin^2 sent as a scalar


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


def _coerce(name: str, value: Any, default: Any) -> Any:
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{name}: expected {kind.__name__}, got {value!r}")
    # NaN compares false with every bound (`max_message_age: nan` passed `<= 0` and switched
    # the freshness check off) and no setting means anything at infinity: refuse both here,
    # for every float key of every config, before any range check sees them
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{name}: expected a finite number, got {value!r}")
    return value


def _check_id(key: str, value: str, hint: str = "") -> None:
    if not valid_id(value):
        raise ConfigError(f"{key} {value!r}: {hint}use {ID_RULE}")


# Job keys of earlier versions: renamed ones are read under their new name, removed ones
# refused with what replaces them.
RENAMED_JOB_KEYS = {"dataset": "task"}
REMOVED_JOB_KEYS = {"model": "the task defines the model: give job.task (built-in tasks: "
                             "digits, mnist, fashion, shakespeare, or module.path:attribute)"}


def _job_aliases(values: dict, prefix: str) -> dict:
    values = dict(values)
    for old, new in RENAMED_JOB_KEYS.items():
        if values.get(old) is not None:
            if values.get(new) is not None and values[new] != values[old]:
                raise ConfigError(f"{prefix}{old} and {prefix}{new} disagree; {old} is the "
                                  f"old name of {new}: give only {prefix}{new}")
            values[new] = values.pop(old)
        values.pop(old, None)
    for old, why in REMOVED_JOB_KEYS.items():
        if values.get(old):
            raise ConfigError(f"{prefix}{old} is no longer a key: {why}")
        values.pop(old, None)
    return values


def _merge(obj: Any, values: dict, prefix: str = "") -> None:
    if isinstance(obj, JobConfig):
        values = _job_aliases(values, prefix)
    known = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if value is None:
            continue
        if key not in known:
            raise ConfigError(f"unknown key '{prefix}{key}'; known: {', '.join(sorted(known))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{key}: expected a mapping")
            _merge(current, value, f"{prefix}{key}.")
        else:
            setattr(obj, key, _coerce(prefix + key, value, current))


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
        job_keys = {f.name for f in dataclasses.fields(JobConfig)} | set(RENAMED_JOB_KEYS) \
            | set(REMOVED_JOB_KEYS)
        _merge(cfg, {k: v for k, v in overrides.items() if k not in job_keys})
        _merge(cfg.job, {k: v for k, v in overrides.items() if k in job_keys}, "job.")
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


def job_from_dict(data: dict) -> JobConfig:
    """The job as received from the coordinator, validated like a local config."""
    cfg = RunConfig()
    _merge(cfg.job, data, "job.")
    validate(cfg)
    return cfg.job


def validate(cfg: RunConfig) -> None:
    job = cfg.job
    _check_id("run", cfg.run)
    checks = [
        (job.algo in ALGOS, f"algo {job.algo!r}: choose one of {', '.join(ALGOS)}"),
        (bool(job.task), "task must name a task (e.g. digits or module.path:attribute)"),
        (cfg.federated_eval in FEDERATED_EVAL,
         f"federated_eval {cfg.federated_eval!r}: one of {', '.join(FEDERATED_EVAL)}"),
        (job.partition in SCHEMES, f"partition {job.partition!r}: one of {', '.join(SCHEMES)}"),
        (job.optimizer in OPTIMIZERS, f"optimizer {job.optimizer!r}: one of sgd, adam"),
        (job.payload in PAYLOADS, f"payload {job.payload!r}: one of {', '.join(PAYLOADS[1:])}"),
        (job.rate in RATES, f"rate {job.rate}: one of {', '.join(map(str, RATES))}"),
        (job.fda_variant in FDA_VARIANTS, f"fda_variant {job.fda_variant!r}: one of "
                                          f"{', '.join(FDA_VARIANTS)}"),
        (job.fda_theta >= 0, "fda_theta must be >= 0"),
        (job.rtc_steps >= 1, "rtc_steps must be >= 1"),
        (0.0 <= job.lbgm_threshold <= 1.0, "lbgm_threshold must be in [0, 1]"),
        (job.local_steps >= 1, "local_steps must be >= 1"),
        (job.period >= 1, "period (K) must be >= 1"),
        (job.delay >= 0, "delay (D) must be >= 0"),
        (job.lr > 0, "lr must be > 0"),
        (job.batch_size >= 1, "batch_size must be >= 1"),
        (job.alpha > 0, "alpha must be > 0"),
        # a negative seed passed and then crashed every agent (numpy refuses it) in a loop
        (0 <= job.seed <= MAX_SEED, f"seed must be in 0..{MAX_SEED}"),
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
    return dataclasses.asdict(cfg)
