"""The closed sets a job chooses from (the algorithms are listed by `catalog.ALGORITHMS`)."""

from __future__ import annotations

from enum import StrEnum


class Payload(StrEnum):
    """What an update carries (README, "Algorithms"); AUTO: the algorithm's own."""

    AUTO = ""
    DENSE = "dense"
    PARTIAL = "partial"
    LBGM = "lbgm"
    SUFFIX = "suffix"


class Compression(StrEnum):
    """How an update's values are compressed (README, "Payloads"); NONE: float32."""

    NONE = ""
    Q8 = "q8"
    Q4 = "q4"
    TOPK = "topk"


class FdaVariant(StrEnum):
    """How FDA estimates the fleet's variance from local states."""

    NAIVE = "naive"
    LINEAR = "linear"
    SKETCH = "sketch"


class Partition(StrEnum):
    """How a simulated fleet deals one global data set out (fl-sim, --shard i/n)."""

    IID = "iid"
    DIRICHLET = "dirichlet"
    SHARDS = "shards"
    ROLES = "roles"


class Optimizer(StrEnum):
    SGD = "sgd"
    ADAM = "adam"


# DRPGA's update rates: a ladder, so a random walk moves between neighbouring rungs
RATES = (0.02, 0.05, 0.1, 0.2, 0.4, 1.0)
