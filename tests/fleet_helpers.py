"""Drive device and coordinator state machines in one process, messages passed by hand.

Used by unit tests to check algorithms end to end without a broker: each agent's live
parameters are a numpy vector that a caller-supplied `step_fn` changes per local step.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fleetfl.shared.core.averaging import WindowAveraging
from fleetfl.shared.core.messages import Kind, Message


def hello(run: str, agent: str, samples: int, seq: int = 1, first_window: int = 1) -> Message:
    return Message(Kind.HELLO, run, agent, seq, 0, {"samples": samples,
                                                   "first_window": first_window})


class InProcessFleet:
    def __init__(self, coordinator: WindowAveraging, devices: dict, params: dict) -> None:
        self.coordinator, self.devices, self.params = coordinator, devices, params
        self.seq = dict.fromkeys(devices, 1)
        self.in_flight: list[Message] = []  # averages not yet delivered
        self.averages: dict[int, np.ndarray] = {}  # window -> published average
        for name, dev in devices.items():
            coordinator.on_message(hello(coordinator.run, name, dev.samples), 0.0)
            dev.start(coordinator.version, coordinator.closed_window + 1, params[name])

    def step(self, name: str, step_fn: Callable[[str, np.ndarray], None],
             deliver: bool = True) -> None:
        """One local step of one agent; its messages go to the coordinator at once, and
        averages to every agent (unless deliver=False: they wait in `in_flight`)."""
        dev, p = self.devices[name], self.params[name]
        assert not dev.blocked, f"{name} is blocked"
        step_fn(name, p)
        self._to_coordinator(name, dev.after_step(p))
        if deliver:
            self.deliver()

    def _to_coordinator(self, name: str, msgs: list[Message]) -> None:
        for msg in msgs:
            self.seq[name] += 1
            msg.seq = self.seq[name]
            for out in self.coordinator.on_message(msg, 0.0):
                self.in_flight.append(out)
                if out.kind is Kind.AVG:
                    self.averages[out["window"]] = out["delta"]

    def deliver(self) -> None:
        while self.in_flight:
            pending, self.in_flight = self.in_flight, []
            for msg in pending:
                for name, dev in self.devices.items():
                    self._to_coordinator(name, dev.on_message(msg, self.params[name]))
