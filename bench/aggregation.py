"""Aggregation: the coordinator's ``weighted_mean`` vs the fastest plain numpy sum.

What is measured: the sample-weighted mean of K updates of N float32 parameters (default 16 x
1M) with ``fleetfl.shared.core.weighted_sum.weighted_mean`` (one scale + K-1 BLAS saxpy
calls), next to the fastest plain numpy *unweighted* sum of the same arrays,
``out = a0.copy(); for a in rest: out += a`` (in place, no temporaries, no stacking copy). All
candidates are timed in the same loop, interleaved, with ``time.perf_counter``; medians are
reported.

Why: averaging is the coordinator's per-window hot path, so a weighted mean should cost about
as much as a plain sum (goal: baseline_time / weighted_mean_time >= 0.5, i.e. at most twice
the unweighted in-place sum). A few other plain-numpy ways to get the same weighted mean are
shown for context: with a temporary per update, allocation-free with a scratch buffer, and
``np.stack`` + ``weights @ matrix`` (sgemv) with and without the stacking copy.

BLAS threading is the coordinator's (issue 20): ``fleetfl.shared.threads.limit_blas_threads()``,
the call fl-coordinator and fl-agent make first thing, one BLAS thread unless FL_BLAS_THREADS
says otherwise. ``--blas env`` leaves it as the environment sets it (numpy's default: one
thread per core), as before issue 20, and adds a diagnostic second pass with one thread. The
thread count is printed when threadpoolctl is installed.

Run: ``.venv/bin/python bench/aggregation.py [--updates 16 --params 1000000 --load 2]``
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.synchronize
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import numpy as np
from timing import interleaved

from fleetfl.shared.core.weighted_sum import weighted_mean
from fleetfl.shared.threads import limit_blas_threads

GOAL = 0.5
SUBJECT = "weighted_mean (scale + saxpy)"
BASELINE = "baseline: copy + in-place +="


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="weighted_mean of K float32 updates vs the fastest plain numpy sum "
                    "(medians, interleaved repetitions).")
    p.add_argument("--updates", type=int, default=16, help="number of updates K (default 16)")
    p.add_argument("--params", type=int, default=1_000_000,
                   help="parameters per update N (default 1000000)")
    p.add_argument("--repeats", type=int, default=40, help="timed repetitions (default 40)")
    p.add_argument("--load", type=int, default=0,
                   help="start this many busy-looping processes while timing, to mimic a "
                        "coordinator sharing its cores with agents (default 0)")
    p.add_argument("--blas", choices=("fleetfl", "env"), default="fleetfl",
                   help="BLAS threads: fleetfl = as fl-coordinator sets them (one, or "
                        "FL_BLAS_THREADS; the default), env = as the environment leaves them "
                        "(numpy's default: one per core; before issue 20)")
    return p.parse_args(argv)


def _spin(stop: multiprocessing.synchronize.Event) -> None:
    while not stop.is_set():
        sum(range(10_000))


@contextmanager
def cpu_load(processes: int) -> Iterator[None]:
    """Keep `processes` CPU cores busy for the duration of the block."""
    if processes <= 0:
        yield
        return
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    procs = [ctx.Process(target=_spin, args=(stop,), daemon=True) for _ in range(processes)]
    for proc in procs:
        proc.start()
    try:
        time.sleep(0.5)  # let them start spinning
        yield
    finally:
        stop.set()
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join()


def one_blas_thread() -> AbstractContextManager[object] | None:
    """Diagnostic only: BLAS limited to 1 thread for a block (threadpoolctl), else None."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    import scipy.linalg.blas  # noqa: F401 - so scipy's OpenBLAS is limited too

    return threadpool_limits(limits=1, user_api="blas")


def blas_threads() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (threadpoolctl not installed)"
    import scipy.linalg.blas  # noqa: F401 - load scipy's BLAS too, so it is listed

    pools = [f"{p['internal_api']} {p['num_threads']} threads ({p['prefix']})"
             for p in threadpool_info() if p["user_api"] == "blas"]
    return ", ".join(pools) or "none found"


def candidates(vectors: list[np.ndarray], weights: list[float]
               ) -> dict[str, Callable[[], np.ndarray]]:
    total = float(sum(weights))
    scaled = [np.float32(w / total) for w in weights]
    w_vec = np.asarray(scaled, dtype=np.float32)
    stacked = np.stack(vectors)  # for the "already stacked" what-if only
    scratch = np.empty_like(vectors[0])

    def baseline() -> np.ndarray:
        out = vectors[0].copy()
        for a in vectors[1:]:
            out += a
        return out

    def add_reduce_pairs() -> np.ndarray:
        out = np.add(vectors[0], vectors[1])
        for a in vectors[2:]:
            np.add(out, a, out=out)
        return out

    def weighted_temporaries() -> np.ndarray:
        out = vectors[0] * scaled[0]
        for a, w in zip(vectors[1:], scaled[1:], strict=True):
            out += a * w
        return out

    def weighted_scratch() -> np.ndarray:
        out = np.multiply(vectors[0], scaled[0])
        for a, w in zip(vectors[1:], scaled[1:], strict=True):
            np.multiply(a, w, out=scratch)
            out += scratch
        return out

    return {
        SUBJECT: lambda: weighted_mean(vectors, weights),
        BASELINE: baseline,
        "unweighted: np.add(a0, a1) + out= adds": add_reduce_pairs,
        "unweighted: np.add.reduce(np.stack(...))": lambda: np.add.reduce(np.stack(vectors)),
        "weighted: out += a * w (temporaries)": weighted_temporaries,
        "weighted: multiply into scratch, += (no alloc)": weighted_scratch,
        "weighted: w @ np.stack(...) (sgemv + stack copy)": lambda: w_vec @ np.stack(vectors),
        "weighted: w @ pre-stacked matrix (sgemv only)": lambda: w_vec @ stacked,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.blas == "fleetfl":
        limit_blas_threads()
    rng = np.random.default_rng(0)
    vectors = [rng.standard_normal(args.params, dtype=np.float32) for _ in range(args.updates)]
    weights = [float(w) for w in rng.integers(200, 2000, size=args.updates)]

    fns = candidates(vectors, weights)
    expected = np.average(np.stack(vectors).astype(np.float64), axis=0, weights=weights)
    got = weighted_mean(vectors, weights)
    assert got.dtype == np.float32 and np.allclose(got, expected, atol=1e-5), "wrong mean"

    diag: dict[str, tuple[float, float]] = {}
    with cpu_load(args.load):
        med = interleaved(fns, args.repeats)
        limiter = one_blas_thread() if args.blas == "env" else None
        if limiter is not None:
            with limiter:
                diag = interleaved({SUBJECT: fns[SUBJECT], BASELINE: fns[BASELINE]},
                                   args.repeats)
    mb_in = args.updates * args.params * 4 / 1e6
    base = med[BASELINE][0]
    print(f"numpy {np.__version__}; BLAS ({args.blas}): {blas_threads()}")
    print(f"{args.updates} updates x {args.params:,} float32 params = {mb_in:.0f} MB read per "
          f"aggregation; medians of {args.repeats} interleaved repetitions; "
          f"{args.load} busy background processes\n")
    print("| method | median ms | min ms | input GB/s (median) | baseline / method |")
    print("|---|---:|---:|---:|---:|")
    for name, (sec, best) in med.items():
        label = f"**{name}**" if name in (SUBJECT, BASELINE) else name
        print(f"| {label} | {sec * 1e3:.2f} | {best * 1e3:.2f} | {mb_in / 1e3 / sec:.1f} "
              f"| {base / sec:.2f} |")
    ratio = base / med[SUBJECT][0]
    verdict = "PASS" if ratio >= GOAL else "SHORT"
    print(f"\nratio baseline_time / weighted_mean_time: {ratio:.2f} (goal >= {GOAL}) {verdict}")
    best_name = min(med, key=lambda name: med[name][0])
    print(f"fastest: {best_name} ({med[best_name][0] * 1e3:.2f} ms)")
    if diag:
        ratio1 = diag[BASELINE][0] / diag[SUBJECT][0]
        print("\nDiagnostic, not the headline: BLAS limited to 1 thread (threadpoolctl) for a "
              "second pass:\n\n| method | median ms | min ms |\n|---|---:|---:|")
        for name, (sec, best) in diag.items():
            print(f"| {name} (1 BLAS thread) | {sec * 1e3:.2f} | {best * 1e3:.2f} |")
        print(f"\nratio with 1 BLAS thread: {ratio1:.2f} "
              f"({'PASS' if ratio1 >= GOAL else 'SHORT'} against the same goal)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
