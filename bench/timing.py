"""Side-by-side timing for the micro-benchmarks: every candidate runs once per repetition,
in rotated order, so drifting machine load hits them all alike."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable


def interleaved(fns: dict[str, Callable[[], object]], repeats: int
                ) -> dict[str, tuple[float, float]]:
    """(median, min) seconds of each function.

    Results are kept until after the timed call so that freeing them is not timed; the
    garbage collector is off while timing, as in timeit.
    """
    names = list(fns)
    for fn in fns.values():  # warm-up: first touch of allocator pools, lazy imports
        fn()
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for rep in range(repeats):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                t0 = time.perf_counter()
                result = fns[name]()
                t1 = time.perf_counter()
                samples[name].append(t1 - t0)
                del result
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: (statistics.median(v), min(v)) for name, v in samples.items()}


def medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    return {name: med for name, (med, _) in interleaved(fns, repeats).items()}


def median_range(values: list[float], form: str = "{:.2f}", empty: str = "-") -> str:
    """"median (min-max)" of the values, the way every bench reports repeated runs (a single
    value, or equal ones, print alone; no values print `empty`)."""
    if not values:
        return empty
    m = form.format(statistics.median(values))
    return m if min(values) == max(values) else \
        f"{m} ({form.format(min(values))}-{form.format(max(values))})"
