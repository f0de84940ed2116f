"""The message vocabulary: kinds, their fields, and the id rule (the README, "Wire contract").

Every message is one envelope (protocol version, kind, run, sender, sequence number, base
version) plus kind-specific scalar fields and named float32 arrays. The schema below is what the
codec validates against, so adding a kind means adding one entry here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

# the version this release writes by default, and those it reads (PROTOCOL.md section 19:
# version 1, without the prefix and the alignment, is read for one release)
PROTOCOL_VERSION = 2
PROTOCOL_VERSIONS = (1, 2)
COORDINATOR_ID = "coordinator"


class Kind(StrEnum):
    HELLO = "hello"  # agent -> all (status, retained): samples, first window, capabilities
    OFFLINE = "offline"  # agent -> all (status, retained): last will or clean exit
    UPDATE = "update"  # agent -> coordinator: delta of one window/round (dense or encoded)
    FDA_STATE = "fda_state"  # agent -> coordinator: FDA local state after a monitoring step
    AVG = "avg"  # coordinator -> agents: averaged delta of one window, new version
    MODEL = "model"  # coordinator -> agents (retained): full model + job for joiners
    SYNC = "sync"  # coordinator -> agents: FDA trigger, send your update now
    ASSIGN = "assign"  # coordinator -> agents: FedPMT, the layer groups each agent trains
    STOP = "stop"  # coordinator -> agents: the run is over
    EVALUATE = "evaluate"  # coordinator -> agents: evaluate this global model on your data
    METRICS = "metrics"  # agent -> coordinator: loss and metrics on its validation split
    REFUSED = "refused"  # agent -> all (status, retained): will not join, and why
    REFUSAL = "refusal"  # coordinator -> one agent: a message of its was refused, and why


# Array size rules the codec checks: "model" means exactly the flat model's length, "upto"
# at most that (encoded payloads: partial, look-back; the algorithm checks the exact length),
# "small" a few thousand values (FDA sketches).
ARRAY_MODEL = "model"
ARRAY_UPTO_MODEL = "upto"
ARRAY_SMALL = "small"
SMALL_ARRAY_MAX = 1 << 16

# Array dtypes (PROTOCOL.md 7.3): every array is "<f4" but these, which protocol version 2
# allows for compressed payloads (section 15.5): quantized codes in `delta` (q8: int8, q4: two
# codes a byte) and top-k's `indices`; `scales` and `indices` exist in version 2 only.
FLOAT_DTYPE = "<f4"
ARRAY_DTYPES = {"delta": (FLOAT_DTYPE, "|i1", "|u1"), "indices": ("<u4",)}
V2_ARRAYS = frozenset({"scales", "indices"})
COMPRESSED_ARRAYS = {"scales": ARRAY_SMALL, "indices": ARRAY_UPTO_MODEL}


@dataclass(frozen=True)
class Schema:
    fields: dict[str, type | tuple[type, ...]]
    arrays: dict[str, str] = field(default_factory=dict)
    optional: dict[str, type | tuple[type, ...]] = field(default_factory=dict)
    optional_arrays: dict[str, str] = field(default_factory=dict)


SCHEMAS: dict[Kind, Schema] = {
    Kind.HELLO: Schema(
        fields={"samples": int, "first_window": int},
        # validation_samples: the most a METRICS message from this agent may claim
        optional={"capabilities": dict, "validation_samples": int},
    ),
    Kind.OFFLINE: Schema(fields={}),
    Kind.UPDATE: Schema(
        fields={"window": int, "samples": int, "steps": int},
        arrays={"delta": ARRAY_UPTO_MODEL},
        # LBGM: one entry per layer, a look-back multiplier or None where the layer is sent;
        # FedPMT: the first trained layer group (the delta covers it and all after it)
        # and the agent's measured wall time per local step in this round
        optional={"scalars": list, "first_layer": int, "step_seconds": float},
        optional_arrays=COMPRESSED_ARRAYS,
    ),
    Kind.FDA_STATE: Schema(
        fields={"step": int, "drift_sq": float},
        optional={"projection": float},
        optional_arrays={"sketch": ARRAY_SMALL},
    ),
    Kind.AVG: Schema(
        fields={"window": int, "version": int, "contributors": list},
        arrays={"delta": ARRAY_UPTO_MODEL},
        optional_arrays=COMPRESSED_ARRAYS,
    ),
    Kind.MODEL: Schema(
        fields={"version": int, "next_window": int, "job": dict},
        arrays={"params": ARRAY_MODEL},
        optional_arrays={"last_avg": ARRAY_MODEL},  # FDA-linear joiners derive xi from it
    ),
    Kind.SYNC: Schema(fields={"version": int, "window": int, "estimate": float}),
    # from `window` on, agent -> first trained layer group (-1: sits out, too slow)
    Kind.ASSIGN: Schema(fields={"window": int, "first_layer": dict, "deadline": float}),
    Kind.STOP: Schema(fields={"reason": str}),
    # federated evaluation: the global model of `version`, and what an agent measured on it
    # (`values`: "loss" and the task's metrics, sample means over `samples` samples)
    Kind.EVALUATE: Schema(fields={"version": int}, arrays={"params": ARRAY_MODEL}),
    Kind.METRICS: Schema(fields={"version": int, "samples": int, "values": dict}),
    # the job's task is missing or differs here, or this device's data is unusable
    Kind.REFUSED: Schema(fields={"reason": str, "task": str}),
    # the coordinator refused a message that came on `agent`'s topics: the reason code, the
    # refused message's seq and kind (-1 and "" when it could not be read), a readable detail,
    # and how many refusals of this agent went unreported before this one (rate limit)
    Kind.REFUSAL: Schema(fields={"agent": str, "reason": str, "seq": int, "refused_kind": str,
                                 "detail": str, "suppressed": int}),
}


@dataclass
class Message:
    kind: Kind
    run: str
    sender: str
    seq: int
    base_version: int
    fields: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    proto: int = PROTOCOL_VERSION

    def __getitem__(self, key: str) -> Any:
        """Scalar field or array by name, so algorithm code reads `msg["window"]`."""
        if key in self.arrays:
            return self.arrays[key]
        return self.fields[key]


# Run and agent ids become topic levels, file and directory names (the run directory, key
# files) and log fields: ASCII only (no look-alike Unicode letters), no wildcard, separator or
# control character, and no leading '.' (`.` and `..` would name a directory's parent).
ID_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
ID_RULE = "1 to 64 ASCII letters, digits, '-', '_' or '.', not starting with '.'"


def valid_id(name: object) -> bool:
    return isinstance(name, str) and ID_PATTERN.fullmatch(name) is not None
