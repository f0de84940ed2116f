"""BLAS threading of fleetfl's processes, chosen once where a process starts.

numpy's OpenBLAS starts one thread per core by default and its idle threads busy-wait for
work. The coordinator shares its cores with the broker, its own evaluator and, on small
deployments and in simulations, the agents, so a 2-thread BLAS call whose second thread is
descheduled stalls the whole call: the weighted mean (shared/core/weighted_sum.py) went from
7 ms to 34-140 ms median under load (issue 20). Every fleetfl process therefore runs BLAS on
ONE thread: the averaging is memory-bound (one pass over the updates), so a second thread
buys little on a quiet machine and costs a lot on a busy one; the agents' training runs on
torch's own threads (`--threads`), not on numpy's BLAS.

`FL_BLAS_THREADS=N` overrides the choice (N >= 1); an `OPENBLAS_NUM_THREADS` set by the user
is respected too. The limit reaches BLAS libraries already loaded (threadpoolctl, a
dependency of scikit-learn) and, through `OPENBLAS_NUM_THREADS` in the environment, those
loaded later and child processes.
"""

from __future__ import annotations

import logging
import os

__all__ = ["ENV", "blas_threads", "limit_blas_threads"]

ENV = "FL_BLAS_THREADS"
DEFAULT = 1

log = logging.getLogger(__name__)


def blas_threads(env: dict[str, str] | os._Environ[str] | None = None) -> int:
    """The BLAS thread count to use: FL_BLAS_THREADS, else the user's OPENBLAS_NUM_THREADS,
    else 1. A value that is not a positive integer is ignored (with a warning)."""
    env = os.environ if env is None else env
    for var in (ENV, "OPENBLAS_NUM_THREADS"):
        text = env.get(var, "").strip()
        if not text:
            continue
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value >= 1:
            return value
        log.warning("ignoring %s=%r: expected a positive integer", var, text)
    return DEFAULT


def limit_blas_threads(threads: int | None = None) -> int:
    """Limit BLAS to `threads` (default: blas_threads()) in this process and its children.
    Returns the limit. Call it first thing in a command's main()."""
    n = blas_threads() if threads is None else max(1, int(threads))
    # BLAS libraries loaded from now on (scipy's, a task's) and child processes read these
    # (OpenBLAS only: torch's own threads are set apart, by the agent's --threads)
    os.environ["OPENBLAS_NUM_THREADS"] = str(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # scikit-learn brings it; without it only later loads are limited
        log.debug("threadpoolctl not installed: BLAS already loaded keeps its threads")
        return n
    # the libraries loaded already (numpy's OpenBLAS, imported by the CLI's own imports)
    threadpool_limits(limits=n, user_api="blas")
    return n
