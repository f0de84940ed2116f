"""Interfaces of the pure algorithm core (DESIGN.md, "The core's interface").

Device and coordinator sides are state machines: they take finished steps, arriving messages
and clock ticks and return messages to publish. They never touch MQTT, threads, files or the
wall clock (the coordinator is handed `now`). Sequence numbers are stamped by the shell.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from fleetfl.shared.core.messages import Kind, Message


class Rejected(Exception):
    """An incoming message refused by a state machine; `reason` is a short counter key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class DeviceSide(Protocol):
    """One per agent. Holds algorithm state, not the model: `params` is the live flat vector,
    corrected in place."""

    @property
    def blocked(self) -> bool:
        """True while the next local step must not start (waiting for an average)."""
        ...

    @property
    def needs_resync(self) -> bool:
        """True when state was lost (a gap in averages): reload the retained model."""
        ...

    def start(self, version: int, next_window: int, params: np.ndarray,
              last_avg: np.ndarray | None = None) -> None:
        """(Re)start from the global model; `last_avg` is its last move (FDA-linear)."""
        ...

    def after_step(self, params: np.ndarray) -> list[Message]: ...

    def on_message(self, msg: Message, params: np.ndarray) -> list[Message]: ...


class CoordinatorSide(Protocol):
    def on_message(self, msg: Message, now: float) -> list[Message]: ...

    def on_tick(self, now: float) -> list[Message]: ...

    def state(self) -> dict: ...


def update_message(run: str, sender: str, base_version: int, window: int, samples: int,
                   steps: int, delta: np.ndarray) -> Message:
    return Message(kind=Kind.UPDATE, run=run, sender=sender, seq=0, base_version=base_version,
                   fields={"window": window, "samples": samples, "steps": steps},
                   arrays={"delta": delta})
