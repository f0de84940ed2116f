"""Federated evaluation on the agent: the coordinator's global model of a version, evaluated
on this device's validation split on a worker thread (training never waits), reported back as
a METRICS message with the sample count."""

from __future__ import annotations

import numpy as np

from fleetfl.shared.config import JobConfig
from fleetfl.shared.core.messages import Kind, Message
from fleetfl.shared.learn.evaluator import BackgroundEvaluator
from fleetfl.shared.learn.torch_binding import bind_flat
from fleetfl.shared.tasks.evaluation import evaluate
from fleetfl.shared.tasks.samples import Samples
from fleetfl.shared.tasks.task import Task


class FederatedEvaluator:
    def __init__(self, task: Task, job: JobConfig, validation: Samples | None) -> None:
        self.validation = validation
        self._unanswered: list[int] = []  # versions asked while we have nothing to evaluate
        self._worker: BackgroundEvaluator | None = None
        if validation is not None:
            # its own model: the trainer's parameters keep changing meanwhile
            self._model = task.build_model(job.seed)
            self._params, _ = bind_flat(self._model)
            self._task = task
            self._worker = BackgroundEvaluator(self._evaluate)

    @property
    def samples(self) -> int:
        return len(self.validation) if self.validation is not None else 0

    def _evaluate(self, params: np.ndarray) -> dict[str, float]:
        self._params[:] = params
        return evaluate(self._task, self._model, self.validation)

    def submit(self, version: int, params: np.ndarray) -> None:
        if self._worker is None:
            self._unanswered.append(version)  # answered at once: nothing to wait for
        else:
            self._worker.submit(version, params)

    def reports(self, run: str, sender: str) -> list[Message]:
        """METRICS messages for the evaluations finished since the last call."""
        out = [Message(Kind.METRICS, run, sender, 0, v, {"version": v, "samples": 0,
                                                         "values": {}})
               for v in self._unanswered]
        self._unanswered.clear()
        if self._worker is not None:
            out += [Message(Kind.METRICS, run, sender, 0, ev.version,
                            {"version": ev.version, "samples": self.samples,
                             "values": ev.values})
                    for ev in self._worker.results()]
        return out

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
