"""Samples: what a task's data loaders return, read batch by batch so data larger than memory
can stay on disk (formats.py reads images, CSV and .npz that way)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Samples(Protocol):
    """Indexable training or evaluation samples.

    `batch(indices)` returns `(x, y)` as numpy arrays for the given sample indices (sorted or
    not); `source` says where they come from, for logs and errors."""

    source: str

    def __len__(self) -> int: ...

    def batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class ArraySamples:
    """Samples held in two in-memory (or memory-mapped) arrays."""

    def __init__(self, x: np.ndarray, y: np.ndarray, source: str = "arrays") -> None:
        if len(x) != len(y):
            raise ValueError(f"{source}: {len(x)} inputs but {len(y)} labels")
        self.x, self.y, self.source = x, y, source

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.x[indices]), np.asarray(self.y[indices])


def batches(samples: Samples, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every sample once, in order, `batch_size` at a time (evaluation)."""
    for start in range(0, len(samples), batch_size):
        yield samples.batch(np.arange(start, min(start + batch_size, len(samples))))
