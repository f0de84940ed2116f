"""DGA, device side (ALGORITHMS.md section 3): send every K steps, apply the average D steps
later with w <- w - own_sent + average, block if it has not arrived by then.

`own_sent` is what the coordinator reconstructs from our message (the payload encoder says),
so with a partial or look-back payload whatever was not sent stays in the residual:
`anchor` tracks the parameters minus that residual, so the next window's delta is
`params - anchor` (own steps since the last send plus everything not sent yet), without
copying params on every step. With D = 0 and a dense payload this is FedAvg (H = K).

A window the device is told to sit out (participant selection, FedPMT) is skipped at once:
it sends nothing for it, and its average is applied (own part zero) as soon as it arrives,
as is every average still due then: an idle device has no steps to overlap them with, and
it comes back to training on the newest model rather than one too stale for the bound.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fleetfl.shared.core.base import Encoder, average_window, update_message
from fleetfl.shared.core.messages import Message
from fleetfl.shared.core.payloads import DenseEncoder
from fleetfl.shared.core.selection import sits_out

if TYPE_CHECKING:
    from fleetfl.shared.core.job import JobConfig


class DGADevice:
    def __init__(self, run: str, sender: str, samples: int, period: int, delay: int,
                 encoder: Encoder | None = None) -> None:
        if period < 1 or delay < 0:
            raise ValueError("DGA needs period K >= 1 and delay D >= 0")
        self.run, self.sender, self.samples = run, sender, samples
        self.period, self.delay = period, delay
        self.encoder = encoder or DenseEncoder()
        self.anchor: np.ndarray | None = None
        self.step = 0
        self.window = 1
        self.steps_in_window = 0
        self.base_version = 0
        self.last_applied = 0
        # window -> (own sent, due step); own None: the window was sat out, nothing sent
        self.sent: dict[int, tuple[np.ndarray | None, int]] = {}
        # window -> (version, dense average, were we among its contributors)
        self.arrived: dict[int, tuple[int, np.ndarray, bool]] = {}
        self.needs_resync = False

    def start(self, version: int, next_window: int, params: np.ndarray,
              last_avg: np.ndarray | None = None) -> None:
        self.anchor = params.copy()
        self.base_version, self.window = version, next_window
        self.last_applied = next_window - 1
        self.step = self.steps_in_window = 0
        self.sent.clear()
        self.arrived.clear()
        self.needs_resync = False
        self._skip()

    @property
    def blocked(self) -> bool:
        return not self.encoder.ready(self.window) or any(
            due <= self.step and s not in self.arrived for s, (_, due) in self.sent.items())

    def after_step(self, params: np.ndarray) -> list[Message]:
        self.step += 1
        self.steps_in_window += 1
        out = []
        if self.steps_in_window == self.period:
            enc = self.encoder.encode(params - self.anchor, self.window)
            self.anchor += enc.own  # what was sent leaves the residual
            self.sent[self.window] = (enc.own, self.step + self.delay)
            msg = update_message(self.run, self.sender, self.base_version, self.window,
                                 self.samples, self.steps_in_window, enc.values)
            msg.fields.update(enc.fields)
            out.append(msg)
            self.window += 1
            self.steps_in_window = 0
            self._skip()
        self._apply_due(params)
        return out

    def _skip(self) -> None:
        """Pass over the windows this device is told to sit out, not yet started. Only those
        surely decided: an ASSIGN says "from this window on", and the coordinator decides a
        window D // K + 2 after the last average (selection.py), so no further than D // K + 1
        past the last average seen (the one after may be on its way)."""
        seen = max([self.last_applied, *self.arrived])
        skipped = False
        while self.steps_in_window == 0 and self.window <= seen + self.delay // self.period + 1 \
                and sits_out(self.encoder, self.window):
            self.sent[self.window] = (None, self.step)
            self.window += 1
            skipped = True
        if skipped:  # idle, nothing to overlap the averages with: every one is due now, so
            # the device comes back on the newest model (not too stale for the bound)
            self.sent = {w: (own, min(due, self.step)) for w, (own, due) in self.sent.items()}

    def on_message(self, msg: Message, params: np.ndarray) -> list[Message]:
        window = average_window(self.encoder, msg)
        self._skip()  # an ASSIGN may have told us to sit the current window out
        if window is None:
            return []
        if window <= self.last_applied or window in self.arrived:
            return []  # QoS 1 duplicate, or published before we joined
        # Buffer it even if early: applying before the due step would make replicas depend
        # on arrival time.
        avg = self.encoder.expand(window, msg["delta"], params.size)
        self.arrived[window] = (msg["version"], avg, self.sender in msg["contributors"])
        self._apply_due(params)
        return []

    def _apply_due(self, params: np.ndarray) -> None:
        for window in sorted(self.sent):
            own, due = self.sent[window]
            if due > self.step or window not in self.arrived:
                break  # corrections are applied in window order
            if window != self.last_applied + 1:
                self.needs_resync = True  # an average went missing
                return
            version, avg, included = self.arrived.pop(window)
            if own is not None:  # nothing of ours to settle in a window we sat out
                self.encoder.settle(window, included)
            correction = avg if own is None else avg - own
            params += correction
            self.anchor += correction
            del self.sent[window]
            self.base_version, self.last_applied = version, window


def delayed_device(job: JobConfig, run: str, sender: str, samples: int, size: int,
                   encoder: Encoder) -> DGADevice:
    """Delayed timing (DGA, DRPGA): send every K = job.period steps, apply D = job.delay
    steps later."""
    return DGADevice(run, sender, samples, job.period, job.delay, encoder)
