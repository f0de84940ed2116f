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

Every payload can be aggregated this way (issue 14). Partial (DRPGA) and suffix (FedPMT)
updates carry a coverage mask: each rule runs per coordinate over the senders that sent it,
and clipping measures only what was sent. LBGM updates reach the rules already decoded to
dense vectors (rho times the look-back), like dense ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from fleetfl.shared.core.weighted_sum import covered_mean

Coverages = Sequence[np.ndarray | None] | None  # per vector: coordinates sent (None: all)
Aggregator = Callable[[list[np.ndarray], list[float], Coverages], np.ndarray]
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


def _sent(vec: np.ndarray, cov: np.ndarray | None) -> np.ndarray:
    return vec if cov is None else vec[cov]


def _each(coverages: Coverages, n: int) -> Sequence[np.ndarray | None]:
    return [None] * n if coverages is None else coverages


def clip(vectors: Sequence[np.ndarray], bound: float | Sequence[float],
         coverages: Coverages = None) -> list[np.ndarray]:
    """Each vector scaled down to L2 norm `bound` (one for all, or one per vector) if what it
    sent is longer (shorter ones unchanged)."""
    bounds = [bound] * len(vectors) if np.isscalar(bound) else bound
    out = []
    for vec, cov, b in zip(vectors, _each(coverages, len(vectors)), bounds, strict=True):
        norm = float(np.linalg.norm(_sent(vec, cov)))
        out.append(vec * np.float32(b / norm) if norm > b else vec)
    return out


def median_clip(vectors: Sequence[np.ndarray], factor: float, coverages: Coverages = None
                ) -> list[np.ndarray]:
    """Clip to `factor` times the median L2 norm of the vectors. Norms are compared per
    coordinate sent (norm / sqrt(count)): a FedPMT agent that trained the whole model is not
    cut to the size of one that trained the output layer only. With equal coverage (dense,
    DRPGA's shared masks) this is factor x the median norm."""
    covs = _each(coverages, len(vectors))
    counts = [max(1, vec.size if cov is None else int(np.count_nonzero(cov)))
              for vec, cov in zip(vectors, covs, strict=True)]
    norms = [float(np.linalg.norm(_sent(v, c))) for v, c in zip(vectors, covs, strict=True)]
    per_coordinate = float(np.median([n / np.sqrt(k) for n, k in zip(norms, counts,
                                                                      strict=True)]))
    return clip(vectors, [factor * per_coordinate * np.sqrt(k) for k in counts], coverages)


def by_chunks(vectors: Sequence[np.ndarray], coverages: Coverages,
              rule: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply a per-coordinate `rule(block, counts)` to (n, chunk) float32 slices of the
    stacked vectors, each column sorted ascending with the senders that did not cover it
    last (NaN), `counts` the senders per column; 0 where nobody sent a coordinate. The
    temporaries stay at n x CHUNK values instead of n copies of the model (a Pi's memory);
    rules sum in float64."""
    covs = _each(coverages, len(vectors))
    out = np.zeros(vectors[0].size, dtype=np.float32)
    for start in range(0, out.size, CHUNK):
        end = min(start + CHUNK, out.size)
        block = np.empty((len(vectors), end - start), dtype=np.float32)
        for row, vec, cov in zip(block, vectors, covs, strict=True):
            row[:] = vec[start:end]
            if cov is not None:
                row[~cov[start:end]] = np.nan
        block.sort(axis=0)  # NaN sorts last
        counts = len(vectors) - np.count_nonzero(np.isnan(block), axis=0)
        sent = counts > 0
        if sent.all():  # dense: no copy of the block
            out[start:end] = rule(block, counts)
        else:
            out[start:end][sent] = rule(block[:, sent], counts[sent])
    return out


def _rows(block: np.ndarray, index: np.ndarray) -> np.ndarray:
    """block[index[j], j] for each column j."""
    return np.take_along_axis(block, index[None, :], axis=0)[0]


def coordinate_median(vectors: Sequence[np.ndarray], coverages: Coverages = None
                      ) -> np.ndarray:
    return by_chunks(vectors, coverages, lambda block, counts: 0.5 * (
        _rows(block, (counts - 1) // 2).astype(np.float64) + _rows(block, counts // 2)))


def trimmed_mean(vectors: Sequence[np.ndarray], fraction: float, coverages: Coverages = None
                 ) -> np.ndarray:
    def rule(block: np.ndarray, counts: np.ndarray) -> np.ndarray:
        k = (fraction * counts).astype(np.int64)  # < counts / 2: one value at least is left
        rows = np.arange(block.shape[0])[:, None]
        kept = (rows >= k) & (rows < counts - k)
        return np.where(kept, block, 0.0).sum(axis=0, dtype=np.float64) / (counts - 2 * k)

    return by_chunks(vectors, coverages, rule)


def make_aggregator(aggregate: str = "mean", clip_norm: float = 0.0,
                    clip_median: float = 0.0) -> Aggregator | None:
    """The aggregator for these options, or None for the plain weighted mean without
    clipping (WindowAveraging's own path). An aggregator takes the window's vectors, their
    sample weights and coverages (None: all dense) and returns the average."""
    rule, fraction = parse_aggregate(aggregate)
    if clip_norm < 0 or clip_median < 0 or (clip_norm and clip_median):
        raise ValueError("clipping: give clip_norm or clip_median (> 0), not both")
    if rule == "mean" and not clip_norm and not clip_median:
        return None

    def aggregator(vectors: list[np.ndarray], weights: list[float],
                   coverages: Coverages = None) -> np.ndarray:
        if clip_norm:
            vectors = clip(vectors, clip_norm, coverages)
        elif clip_median:
            vectors = median_clip(vectors, clip_median, coverages)
        if rule == "median":
            return coordinate_median(vectors, coverages)
        if rule == "trimmed_mean":
            return trimmed_mean(vectors, fraction, coverages)
        return covered_mean(vectors, weights, _each(coverages, len(vectors)))[0]

    return aggregator
