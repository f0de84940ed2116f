"""Robust aggregation: how the updates of one window become one average when some senders may
be faulty or hostile (issue 8, item 4).

Two independent knobs, each a plain function of the window's updates:

- clipping, applied first: every update's L2 norm is cut to a bound, either fixed
  (`clip_norm`) or `clip_median` times the median norm of the window's updates (scale-free:
  no bound to tune per model, and a minority of huge updates cannot move the median);
- the rule: `mean` (sample-weighted, the default), `median` (coordinate-wise, unweighted) or
  `trimmed_mean:F` (per coordinate, drop the floor(F * n) largest and smallest values and take
  the unweighted mean of the rest; 0 <= F < 0.5).

Median and trimmed mean ignore the sample weights: a weight is a claim by the sender, and a
robust rule that trusts it can be taken over by one device claiming many samples.

Only dense payloads can be aggregated this way: partial payloads are averaged per coordinate
over whoever sent it, and LBGM scalars are not vectors (registry.make_coordinator refuses).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .weighted_sum import weighted_mean

Aggregator = Callable[[list[np.ndarray], list[float]], np.ndarray]
RULES = ("mean", "median", "trimmed_mean")
CHUNK = 1 << 16  # coordinates per slice in median and trimmed mean


def parse_aggregate(spec: str) -> tuple[str, float]:
    """'mean' | 'median' | 'trimmed_mean:F' -> (rule, F); F is 0 except for trimmed_mean."""
    rule, sep, arg = spec.partition(":")
    if rule not in RULES:
        raise ValueError(f"{spec!r}: use mean, median or trimmed_mean:F (0 <= F < 0.5)")
    if rule != "trimmed_mean":
        if sep:
            raise ValueError(f"{spec!r}: {rule} takes no argument")
        return rule, 0.0
    try:
        fraction = float(arg)
    except ValueError:
        raise ValueError(f"{spec!r}: trimmed_mean needs a fraction, e.g. trimmed_mean:0.2"
                         ) from None
    if not 0.0 <= fraction < 0.5:
        raise ValueError(f"{spec!r}: the trimmed fraction must be in [0, 0.5)")
    return rule, fraction


def clip(vectors: Sequence[np.ndarray], bound: float) -> list[np.ndarray]:
    """Each vector scaled down to L2 norm `bound` if it is longer (shorter ones unchanged)."""
    out = []
    for vec in vectors:
        norm = float(np.linalg.norm(vec))
        out.append(vec * np.float32(bound / norm) if norm > bound else vec)
    return out


def median_clip(vectors: Sequence[np.ndarray], factor: float) -> list[np.ndarray]:
    """Clip to `factor` times the median L2 norm of the vectors."""
    norms = [float(np.linalg.norm(v)) for v in vectors]
    return clip(vectors, factor * float(np.median(norms)))


def by_chunks(vectors: Sequence[np.ndarray], rule: Callable[[np.ndarray], np.ndarray]
              ) -> np.ndarray:
    """Apply a per-coordinate `rule` to (n, chunk) slices of the stacked vectors: the
    temporaries stay at n x CHUNK values instead of n copies of the model (a Pi's memory)."""
    out = np.empty(vectors[0].size, dtype=np.float32)
    for start in range(0, out.size, CHUNK):
        block = np.stack([v[start:start + CHUNK] for v in vectors])
        out[start:start + CHUNK] = rule(block)
    return out


def coordinate_median(vectors: Sequence[np.ndarray]) -> np.ndarray:
    return by_chunks(vectors, lambda block: np.median(block, axis=0))


def trimmed_mean(vectors: Sequence[np.ndarray], fraction: float) -> np.ndarray:
    n = len(vectors)
    k = int(fraction * n)  # fraction < 0.5, so at least one value per coordinate is left
    return by_chunks(vectors, lambda block: np.sort(block, axis=0)[k:n - k].mean(
        axis=0, dtype=np.float64))


def make_aggregator(aggregate: str = "mean", clip_norm: float = 0.0,
                    clip_median: float = 0.0) -> Aggregator | None:
    """The aggregator for these options, or None for the plain weighted mean without
    clipping (WindowAveraging's own path, which also handles partial payloads)."""
    rule, fraction = parse_aggregate(aggregate)
    if clip_norm < 0 or clip_median < 0 or (clip_norm and clip_median):
        raise ValueError("clipping: give clip_norm or clip_median (> 0), not both")
    if rule == "mean" and not clip_norm and not clip_median:
        return None

    def aggregator(vectors: list[np.ndarray], weights: list[float]) -> np.ndarray:
        if clip_norm:
            vectors = clip(vectors, clip_norm)
        elif clip_median:
            vectors = median_clip(vectors, clip_median)
        if rule == "median":
            return coordinate_median(vectors)
        if rule == "trimmed_mean":
            return trimmed_mean(vectors, fraction)
        return weighted_mean(vectors, weights)

    return aggregator
