"""Model evaluation on a worker thread, so a message loop never waits on it: the coordinator's
on its test set, an agent's on its validation split (federated evaluation).

Evaluating LeNet-5 on 10,000 MNIST images takes seconds on a small server; done inline it held
back every average, FDA trigger and deadline behind it. Versions arrive faster than that in
DGA bursts, so a version still waiting when a newer one is submitted is skipped (its accuracy
stays unknown, as with `eval_every`), unless it was submitted as `keep` (the last version).
torch runs the forward passes without the GIL, so the loop keeps going meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("fleetfl.coordinator")


@dataclass(frozen=True)
class Evaluation:
    version: int
    values: dict[str, float]  # "loss" and the task's metrics
    seconds: float  # how long the evaluation itself took

    @property
    def loss(self) -> float:
        return self.values["loss"]

    @property
    def accuracy(self) -> float | None:
        return self.values.get("accuracy")


class BackgroundEvaluator:
    def __init__(self, evaluate: Callable[[np.ndarray], dict[str, float]]) -> None:
        """`evaluate(params) -> {"loss": ..., metric: ...}` runs only on the worker thread."""
        self._evaluate = evaluate
        self._cv = threading.Condition()
        self._pending: list[tuple[int, np.ndarray, bool]] = []
        self._done: list[Evaluation] = []
        self._busy = False
        self._closed = False
        self.skipped = 0
        self._thread = threading.Thread(target=self._work, name="evaluator", daemon=True)
        self._thread.start()

    def submit(self, version: int, params: np.ndarray, keep: bool = False) -> None:
        """Evaluate a copy of `params` as `version`; skips older versions still waiting."""
        with self._cv:
            before = len(self._pending)
            self._pending = [p for p in self._pending if p[2]]
            self.skipped += before - len(self._pending)
            self._pending.append((version, params.copy(), keep))
            self._cv.notify()

    def results(self) -> list[Evaluation]:
        """Evaluations finished since the last call, oldest first."""
        with self._cv:
            done, self._done = self._done, []
        return done

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is pending or running (the end of a run)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                version, params, _ = self._pending.pop(0)
                self._busy = True
            started = time.perf_counter()
            try:
                values = self._evaluate(params)
                result = Evaluation(version, dict(values), time.perf_counter() - started)
            except Exception:  # a broken evaluation must not kill the run's bookkeeping
                log.exception("evaluating version %d failed", version)
                result = None
            with self._cv:
                if result is not None:
                    self._done.append(result)
                self._busy = False
                self._cv.notify_all()
