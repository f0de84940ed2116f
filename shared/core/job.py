"""The job: what every agent must agree on. A frozen, validated dataclass all the way down;
it travels as a plain dict only inside the MODEL message (`job_to_dict` / `job_from_dict`), and
an agent validates the job it receives with the same rules as the coordinator.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from fleetfl.shared.core.catalog import ALGORITHMS, Algo
from fleetfl.shared.core.choices import (
    RATES,
    Compression,
    FdaVariant,
    Optimizer,
    Partition,
    Payload,
)
from fleetfl.shared.core.selection import valid_select

MAX_SEED = 2**32 - 1  # FDA derives uint64 hash seeds from seed * 7919: keep that in range


class ConfigError(ValueError):
    """A bad configuration value; the message says which key and what is allowed."""


@dataclass(frozen=True)
class JobConfig:
    """What every agent must agree on; travels in the model message."""

    # metadata: each key's help (and unit, shown default, aliases) for the generated
    # command-line flags (shared/flags.py)
    algo: Algo = field(default=Algo.FEDAVG, metadata={
        "help": "the algorithm: its timing, default payload and delay rule (README)"})
    # the task (model, data loaders, loss, metrics): an entry point name such as the built-in
    # digits, mnist, fashion, shakespeare, or "module.path:attribute" (shared/tasks/task.py)
    task: str = field(default="digits", metadata={
        "help": "the task: built-in digits (embedded), mnist, fashion, shakespeare, or "
                "module.path:attribute of your own (installed on the coordinator and every "
                "agent); --dataset is its old name", "aliases": ("--dataset",)})
    # name@version:hash of the task's layer table; set by the coordinator, checked by agents
    task_fingerprint: str = field(default="", metadata={
        "help": "name@version:hash of the task's layer table (set by the coordinator)",
        "flag": False})
    local_steps: int = field(default=20, metadata={
        "help": "FedAvg H: local steps per round", "unit": "steps"})
    period: int = field(default=10, metadata={
        "help": "DGA K: local steps per window", "unit": "steps"})
    delay: int = field(default=2, metadata={
        "help": "DGA D: local steps before an average is applied", "unit": "steps"})
    lr: float = field(default=0.05, metadata={"help": "local learning rate"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    optimizer: Optimizer = field(default=Optimizer.SGD, metadata={
        "help": "local optimizer (charlstm trains best with adam, lr 0.01)"})
    batch_size: int = field(default=32, metadata={
        "help": "local batch size", "unit": "samples"})
    partition: Partition = field(default=Partition.IID, metadata={
        "help": "simulation: how the task's global data set is dealt to agents given "
                "--shard i/n"})
    alpha: float = field(default=0.5, metadata={"help": "Dirichlet alpha of --partition "
                                                        "dirichlet (smaller: more skewed)"})
    seed: int = field(default=0, metadata={"help": "seed of model init, partitions and masks"})
    payload: Payload = field(default=Payload.AUTO, metadata={  # dense, partial, lbgm, suffix
        "help": "what an update carries", "shown": "the algorithm's own"})
    rate: float = field(default=0.1, metadata={  # a rung of the ladder 0.02 .. 1.0
        "help": "DRPGA update rate, one of " + ", ".join(map(str, RATES))})
    rate_walk: bool = field(default=False, metadata={
        "help": "DRPGA: random walk over neighbouring rates"})
    fda_variant: FdaVariant = field(default=FdaVariant.LINEAR, metadata={
        "help": "FDA's estimator of the fleet's variance"})
    fda_theta: float = field(default=0.0, metadata={
        "help": "FDA variance threshold (0: the task's calibrated value)"})
    rtc_steps: int = field(default=5, metadata={
        "help": "FDA: local steps between two local-state reports", "unit": "steps"})
    lbgm_threshold: float = field(default=0.2, metadata={
        "help": "LBGM delta: largest sin^2 sent as one scalar"})
    # protocol version 2 only; written into the job only when set (COMPRESSION_KEYS)
    compress: Compression = field(default=Compression.NONE, metadata={
        "help": "compress the dense, partial or lbgm payload both ways, with error "
                "feedback: q8, q4 (a scale per layer) or topk (protocol 2 only)",
        "shown": "none"})
    topk_density: float = field(default=0.01, metadata={
        "help": "--compress topk: the fraction of values sent, in (0, 1]"})
    # participant selection (selection.py); written into the job only when set
    # (SELECTION_KEYS): devices must know to wait for their selection
    select: float = field(default=0.0, metadata={
        "help": "participant selection: per window, this many of the online agents (a count "
                ">= 1) or this fraction of them (in (0, 1)), chosen by wait since last "
                "served, seeded by --seed (0: every agent)", "shown": "0 (every agent)"})


def coerce(name: str, value: Any, default: Any) -> Any:
    """`value` as the type of `default`, or a ConfigError naming `name`."""
    if isinstance(default, Enum):
        try:
            return type(default)(value)
        except ValueError:
            choices = ", ".join(repr(c.value) for c in type(default) if c.value)
            raise ConfigError(f"{name} {value!r}: choose one of {choices}") from None
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


# Job keys of earlier versions: renamed ones are read under their new name, removed ones
# refused with what replaces them.
RENAMED_JOB_KEYS = {"dataset": "task"}
REMOVED_JOB_KEYS = {"model": "the task defines the model: give job.task (built-in tasks: "
                             "digits, mnist, fashion, shakespeare, or module.path:attribute)"}
# Written into the job dict only with compression on, so jobs without it (every version-1
# job) are what they were and older agents still read them.
COMPRESSION_KEYS = ("compress", "topk_density")
SELECTION_KEYS = ("select",)  # likewise: without selection the job is what it was
JOB_KEYS = frozenset(f.name for f in dataclasses.fields(JobConfig)) | set(RENAMED_JOB_KEYS) \
    | set(REMOVED_JOB_KEYS)


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


def job_with(job: JobConfig, values: dict, prefix: str = "job.") -> JobConfig:
    """`job` with the non-None `values` merged in, each coerced to its key's type (not yet
    range-checked: `validate_job`)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.')}: expected a mapping")
    known = {f.name for f in dataclasses.fields(JobConfig)}
    changes = {}
    for key, value in _job_aliases(values, prefix).items():
        if value is None:
            continue
        if key not in known:
            raise ConfigError(f"unknown key '{prefix}{key}'; known: {', '.join(sorted(known))}")
        changes[key] = coerce(prefix + key, value, getattr(job, key))
    return dataclasses.replace(job, **changes)


def validate_job(job: JobConfig) -> None:
    checks = [
        (bool(job.task), "task must name a task (e.g. digits or module.path:attribute)"),
        (job.rate in RATES, f"rate {job.rate}: one of {', '.join(map(str, RATES))}"),
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
        # FedBuff: its agents cannot tell which buffer took an update, which look-backs and
        # layer assignments are keyed by
        (job.algo != "fedbuff" or job.payload in (Payload.AUTO, Payload.DENSE,
                                                  Payload.PARTIAL),
         f"fedbuff takes the dense or partial payload, not {job.payload.value!r}"),
        (0.0 < job.topk_density <= 1.0, "topk_density must be in (0, 1]"),
        (valid_select(job.select),
         f"select {job.select:g}: a count of agents (a whole number >= 1), a fraction in "
         "(0, 1), or 0 for every agent"),
        # suffix: its values' layout follows the assignments (not implemented)
        (not job.compress or (job.payload or ALGORITHMS[job.algo].payload)
         in (Payload.DENSE, Payload.PARTIAL, Payload.LBGM),
         f"compress {job.compress.value!r} works on the dense, partial and lbgm payloads, "
         f"not {(job.payload or ALGORITHMS[job.algo].payload).value!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def job_from_dict(data: dict) -> JobConfig:
    """The job as received (from the coordinator, a file), validated like a local config."""
    job = job_with(JobConfig(), data)
    validate_job(job)
    return job


def plain(value: Any) -> Any:
    """Dataclasses and enums as plain dicts and strings (YAML, msgpack, JSON)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    return value


def job_to_dict(job: JobConfig) -> dict:
    """The job as it travels in the MODEL message."""
    data = plain(job)
    if not job.compress:
        for key in COMPRESSION_KEYS:
            del data[key]
    if not job.select:
        for key in SELECTION_KEYS:
            del data[key]
    return data
