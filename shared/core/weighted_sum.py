"""Sample-weighted mean of many float32 vectors, the coordinator's hot path.

Weights and sums are float64 (issue 14): a float32 running sum drops small terms once it is
large (at 1e5 its step is 0.008) and a claimed weight times a large value overflows it. The
vectors are taken GROUP at a time and CHUNK coordinates at a time into a float64 block, and a
BLAS matrix-vector product (dgemv) sums the block with the weights: the block stays in the CPU
cache and the extra memory is that block (1 MiB), not float64 copies of the model (a Pi's
memory). About half the speed of a plain float32 sum (bench/aggregation.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CHUNK = 1 << 13  # coordinates per slice
GROUP = 16  # vectors per block: 16 x CHUNK float64 = 1 MiB


def weighted_mean(vectors: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    return covered_mean(vectors, weights, [None] * len(vectors))[0]


def covered_mean(vectors: Sequence[np.ndarray], weights: Sequence[float],
                 coverages: Sequence[np.ndarray | None]) -> tuple[np.ndarray, np.ndarray | None]:
    """Per coordinate, the weighted mean over the vectors whose coverage contains it (None:
    all of it); 0 where nobody covered it. Returns (float32 mean, union of coverages or
    None)."""
    if not vectors or len(vectors) != len(weights) or len(vectors) != len(coverages):
        raise ValueError("need one weight and one coverage per vector, and a vector")
    w = np.asarray(weights, dtype=np.float64)
    if not (np.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
        raise ValueError("weights must be finite, >= 0 and sum to a positive number")
    size = vectors[0].size
    dense = all(c is None for c in coverages)
    mean = np.zeros(size, dtype=np.float32)
    union = None if dense else np.zeros(size, dtype=bool)
    block = np.empty((min(GROUP, len(vectors)), min(size, CHUNK)), dtype=np.float64)
    sent = None if dense else np.empty_like(block)  # 1 where the vector covers it
    if dense:
        w = w / w.sum()  # the weighted sum is the mean: no per-coordinate division
    for start in range(0, size, CHUNK):
        end = min(start + CHUNK, size)
        total = np.zeros(end - start)
        weight = np.zeros(end - start)
        for first in range(0, len(vectors), GROUP):
            last = min(first + GROUP, len(vectors))
            for row, i in enumerate(range(first, last)):
                block[row, :end - start] = vectors[i][start:end]
                if sent is not None:
                    cov = coverages[i]
                    sent[row, :end - start] = 1.0 if cov is None else cov[start:end]
            rows = slice(0, last - first)
            if sent is not None:
                block[rows, :end - start] *= sent[rows, :end - start]
                weight += w[first:last] @ sent[rows, :end - start]
            total += w[first:last] @ block[rows, :end - start]
        if union is None:
            mean[start:end] = total
            continue
        covered = weight > 0
        mean[start:end] = np.divide(total, weight, out=np.zeros_like(total), where=covered)
        union[start:end] = covered
    return mean, union
