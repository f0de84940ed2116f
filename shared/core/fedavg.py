"""FedAvg, device side (ALGORITHMS.md section 1): H local steps, send the delta, wait, replace.

The payload encoder decides what of the delta is sent (dense by default). The coordinator side
is the shared WindowAveraging (a round is a window).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fleetfl.shared.core.base import Encoder, average_window, update_message
from fleetfl.shared.core.messages import Message
from fleetfl.shared.core.payloads import DenseEncoder

if TYPE_CHECKING:
    from fleetfl.shared.core.job import JobConfig


class FedAvgDevice:
    def __init__(self, run: str, sender: str, samples: int, local_steps: int,
                 encoder: Encoder | None = None) -> None:
        if local_steps < 1:
            raise ValueError("local_steps (H) must be >= 1")
        self.run, self.sender, self.samples, self.local_steps = run, sender, samples, local_steps
        self.encoder = encoder or DenseEncoder()
        self.w_base: np.ndarray | None = None
        self.base_version = 0
        self.window = 1
        self.steps = 0
        self.waiting = False
        self.needs_resync = False
        self.applied_average: np.ndarray | None = None

    @property
    def blocked(self) -> bool:
        return self.waiting or not self.encoder.ready(self.window)

    def start(self, version: int, next_window: int, params: np.ndarray,
              last_avg: np.ndarray | None = None) -> None:
        self.w_base = params.copy()
        self.base_version, self.window = version, next_window
        self.steps, self.waiting, self.needs_resync = 0, False, False

    def after_step(self, params: np.ndarray) -> list[Message]:
        self.steps += 1
        if self.steps < self.local_steps or self.waiting:
            return []
        return [self._end_round(params)]

    def _end_round(self, params: np.ndarray) -> Message:
        self.waiting = True
        enc = self.encoder.encode(params - self.w_base, self.window)
        msg = update_message(self.run, self.sender, self.base_version, self.window,
                             self.samples, self.steps, enc.values)
        msg.fields.update(enc.fields)
        return msg

    def on_message(self, msg: Message, params: np.ndarray) -> list[Message]:
        window = average_window(self.encoder, msg)
        if window is None:
            return []
        if window < self.window:  # a QoS 1 duplicate or an average from before we joined
            return []
        if window > self.window:  # we missed an average: our base is gone
            self.needs_resync = True
            return []
        avg = self.encoder.expand(window, msg["delta"], params.size)
        self.encoder.settle(window, included=self.sender in msg["contributors"])
        # Unsent work of a round we missed is discarded, as in FedAvg (ALGORITHMS.md 1).
        np.add(self.w_base, avg, out=params)
        self.w_base[:] = params
        self.applied_average = avg
        self.base_version, self.window = msg["version"], window + 1
        self.steps, self.waiting = 0, False
        return []


def round_device(job: JobConfig, run: str, sender: str, samples: int, size: int,
                 encoder: Encoder) -> FedAvgDevice:
    """Round timing (FedAvg, LBGM, FedPMT): H = job.local_steps steps, send, wait."""
    return FedAvgDevice(run, sender, samples, job.local_steps, encoder)
