"""Sample-weighted mean of many float32 vectors, the coordinator's hot path.

BLAS saxpy (y += a*x) does the scale and the add in one pass over memory, so a weighted mean
of N updates costs about as much as a plain sum of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.linalg.blas import saxpy


def weighted_mean(vectors: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    if not vectors or len(vectors) != len(weights):
        raise ValueError("need one weight per vector and at least one vector")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError("weights must sum to a positive number")
    out = np.multiply(vectors[0], np.float32(weights[0] / total), dtype=np.float32)
    for vec, w in zip(vectors[1:], weights[1:], strict=True):
        out = saxpy(np.ascontiguousarray(vec, dtype=np.float32), out, a=w / total)
    return out


def covered_mean(vectors: Sequence[np.ndarray], weights: Sequence[float],
                 coverages: Sequence[np.ndarray | None]) -> tuple[np.ndarray, np.ndarray | None]:
    """Per coordinate, the weighted mean over the vectors whose coverage contains it (None:
    all of it); 0 where nobody covered it. Returns (mean, union of coverages or None)."""
    if all(c is None for c in coverages):
        return weighted_mean(vectors, weights), None
    size = vectors[0].size
    total = np.zeros(size, dtype=np.float32)
    weight = np.zeros(size, dtype=np.float32)
    for vec, w, cov in zip(vectors, weights, coverages, strict=True):
        if cov is None:
            total += np.float32(w) * vec
            weight += np.float32(w)
        else:
            total[cov] += np.float32(w) * vec[cov]
            weight[cov] += np.float32(w)
    union = weight > 0
    mean = np.zeros(size, dtype=np.float32)
    np.divide(total, weight, out=mean, where=union)
    return mean, union
