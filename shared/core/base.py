"""Interfaces of the pure algorithm core (README, "Architecture").

Device and coordinator sides are state machines: they take finished steps, arriving messages
and clock ticks and return messages to publish. They never touch MQTT, threads, files or the
wall clock (the coordinator is handed `now`). Sequence numbers are stamped by the shell.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

from fleetfl.shared.core.messages import Kind, Message

if TYPE_CHECKING:  # annotations only: these modules import this one
    from fleetfl.shared.core.averaging import AgentRecord, Contribution, WindowResult
    from fleetfl.shared.core.payloads import Decoded, Encoded


class Rejected(Exception):
    """An incoming message refused by a state machine; `reason` is a short counter key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Encoder(Protocol):
    """Device side of a payload: what of a local delta is sent (payloads.py, pmt.py)."""

    def encode(self, delta: np.ndarray, window: int) -> Encoded: ...

    def settle(self, window: int, included: bool) -> None:
        """The average of `window` arrived; `included`: it counted our update."""
        ...

    def assign(self, msg: Message) -> None:
        """A FedPMT layer assignment (ignored by other payloads)."""
        ...

    def arrived(self, msg: Message) -> None:
        """An `avg` arrived (compressed payloads read their arrays from it in `expand`)."""
        ...

    def ready(self, window: int) -> bool:
        """False while this device may not train for `window` yet (FedPMT: no assignment)."""
        ...

    def trainable_from(self, window: int) -> int | None:
        """First layer group trained in `window` (None: all)."""
        ...

    def expand(self, window: int, values: np.ndarray, size: int) -> np.ndarray:
        """Our own sent values as a full-size vector (what the average counted of us)."""
        ...

    def expand_all(self, window: int, values: np.ndarray, size: int) -> np.ndarray:
        """An average sent over all N values whatever the payload's mask (fedbuff)."""
        ...


class Decoder(Protocol):
    """Coordinator side of a payload: an update back to a (partly covered) dense delta."""

    def decode(self, sender: str, msg: Message) -> Decoded: ...

    def compress(self, window: int, avg: np.ndarray, coverage: np.ndarray | None
                 ) -> np.ndarray: ...

    def forget(self, sender: str) -> None: ...


class DeviceSide(Protocol):
    """One per agent, the algorithm's timing. Holds algorithm state, not the model: `params`
    is the live flat vector, corrected in place."""

    encoder: Encoder  # what is sent
    window: int  # the window the next update is for

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
    """The coordinator's state machine (averaging.WindowAveraging), as the shells use it."""

    params: np.ndarray  # the global model
    version: int
    agents: dict[str, AgentRecord]  # everyone who said hello
    pending: dict[int, dict[str, Contribution]]  # window -> accepted, not yet averaged
    results: list[WindowResult]  # averages published since the shell last took them

    def on_message(self, msg: Message, now: float) -> list[Message]: ...

    def on_tick(self, now: float) -> list[Message]: ...

    def model_message(self) -> Message:
        """The retained full model for joiners and restarts."""
        ...

    def state(self) -> dict:
        """Everything a checkpoint needs besides the parameters."""
        ...

    def load_state(self, state: dict, params: np.ndarray) -> None: ...


def average_window(encoder: Encoder, msg: Message) -> int | None:
    """The window of an AVG (None for any other kind); a FedPMT assignment, and the AVG
    itself, go to `encoder` on their way."""
    if msg.kind is Kind.ASSIGN:
        encoder.assign(msg)
    if msg.kind is not Kind.AVG:
        return None
    encoder.arrived(msg)
    return msg["window"]


def update_message(run: str, sender: str, base_version: int, window: int, samples: int,
                   steps: int, delta: np.ndarray | dict[str, np.ndarray]) -> Message:
    """`delta`: the payload's values, or every array of a compressed payload."""
    return Message(kind=Kind.UPDATE, run=run, sender=sender, seq=0, base_version=base_version,
                   fields={"window": window, "samples": samples, "steps": steps},
                   arrays=dict(delta) if isinstance(delta, dict) else {"delta": delta})
