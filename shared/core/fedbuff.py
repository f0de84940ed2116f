"""Buffered asynchronous timing (FedBuff: Nguyen et al., "Federated Learning with Buffered
Asynchronous Aggregation", AISTATS 2022; README "FedBuff", PROTOCOL.md section 14.4).

Device: every K = job.period local steps, send the delta from the model it started from, then
go on from the newest global model it has received (its own copy, kept current by every `avg`),
without waiting. What the payload did not send stays in the residual (error feedback).

Coordinator: accepted updates go into the open buffer whatever window they name; every B
arrivals (`buffer`, or `window_timeout` after the buffer's first) the buffer is applied as

    w <- w + eta_g * sum_i n_i s(tau_i) d_i / sum_i n_i,    s(tau) = 1 / sqrt(1 + tau)

with d_i the deltas (new minus old, so "+" where the paper's client deltas, old minus new,
take "-"), tau_i = the version the buffer makes - 1 - base_version (its staleness), n_i the
samples each claims and eta_g the server learning rate. With equal n_i this is the paper's
(1/B) sum_i s(tau_i) d_i; the sample weights make B = N, tau = 0, eta_g = 1 exactly FedAvg's
sample-weighted mean. Not normalised by sum s(tau_i): a buffer of stale updates moves the
model less, which is the point of the scaling. Updates more than `max_staleness` versions old
are refused (`stale`).

One update per agent and buffer (the contributors list names agents): a second one from an
agent whose update is already in the open buffer goes into the next buffer, and its staleness
is counted there.

Participant selection (selection.py) limits concurrency: a buffer's window is decided like any
other, and only the agents selected for the next average train; one passed over stops when
the average arrives, and while it waits it follows the global model, its unsent work kept
(error feedback). A buffer takes min(B, its selected agents online) arrivals.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fleetfl.shared.core.averaging import Contribution, WindowAveraging
from fleetfl.shared.core.base import Decoder, Encoder, Rejected, average_window, update_message
from fleetfl.shared.core.messages import Message
from fleetfl.shared.core.payloads import Decoded, DenseEncoder
from fleetfl.shared.core.quantized import compressor

if TYPE_CHECKING:
    from fleetfl.shared.core.job import JobConfig

# Default staleness bound: s(8) = 1/3, so an older update would count less than a third of a
# fresh one; refusing it tells its agent to resynchronise rather than keep sending.
MAX_STALENESS = 8


def staleness_weight(tau: int) -> float:
    """FedBuff's s(tau) = 1 / sqrt(1 + tau)."""
    return 1.0 / math.sqrt(1.0 + tau)


class FedBuffDevice:
    def __init__(self, run: str, sender: str, samples: int, period: int,
                 encoder: Encoder | None = None) -> None:
        if period < 1:
            raise ValueError("FedBuff needs period K >= 1")
        self.run, self.sender, self.samples, self.period = run, sender, samples, period
        self.encoder = encoder or DenseEncoder()
        self.base: np.ndarray | None = None  # the model the current delta is measured from
        self.latest: np.ndarray | None = None  # the newest global model received
        self.base_version = self.latest_version = 0
        self.window = 1  # the next average expected: the window its updates name
        self.steps = 0
        self.needs_resync = False

    @property
    def blocked(self) -> bool:
        return not self.encoder.ready(self.window)  # never waits for an average

    def start(self, version: int, next_window: int, params: np.ndarray,
              last_avg: np.ndarray | None = None) -> None:
        self.base, self.latest = params.copy(), params.copy()
        self.base_version = self.latest_version = version
        self.window, self.steps, self.needs_resync = next_window, 0, False

    def after_step(self, params: np.ndarray) -> list[Message]:
        self.steps += 1
        if self.steps < self.period:
            return []
        delta = params - self.base
        enc = self.encoder.encode(delta, self.window)
        msg = update_message(self.run, self.sender, self.base_version, self.window,
                             self.samples, self.steps, enc.values)
        msg.fields.update(enc.fields)
        # Pull the newest model: go on from it, plus what was not sent (zero when dense).
        if enc.own is delta:
            params[:] = self.latest
        else:
            np.add(self.latest, delta - enc.own, out=params)
        self.base[:] = self.latest
        self.base_version, self.steps = self.latest_version, 0
        return [msg]

    def on_message(self, msg: Message, params: np.ndarray) -> list[Message]:
        window = average_window(self.encoder, msg)
        if window is None:
            return []
        if window < self.window:  # a QoS 1 duplicate or an average from before we joined
            return []
        if window > self.window:  # we missed an average: our copy of the model is gone
            self.needs_resync = True
            return []
        avg = self.encoder.expand_all(window, msg["delta"], params.size)  # AllValuesDownlink
        self.encoder.settle(window, included=self.sender in msg["contributors"])
        # the coordinator's own float32 addition, in the same order: the copies stay equal
        self.latest += avg
        self.latest_version, self.window = msg["version"], window + 1
        if not self.encoder.ready(self.window):  # not training: go on from the newest model,
            params += self.latest - self.base  # the unsent work kept on top of it
            self.base[:] = self.latest
            self.base_version = self.latest_version
        return []


def buffered_device(job: JobConfig, run: str, sender: str, samples: int, size: int,
                    encoder: Encoder) -> FedBuffDevice:
    """Buffered timing (FedBuff): send every K = job.period steps, go on from the newest
    model."""
    return FedBuffDevice(run, sender, samples, job.period, encoder)


class AllValuesDownlink:
    """A payload decoder whose averages carry all N values: a buffer mixes updates of
    several windows (partial payloads: several masks), so no one window's mask covers its
    average. Float32, or compressed over all N values (q8, q4, top-k) with the coordinator's
    residual, so a compressed run's downlink stays compressed."""

    def __init__(self, inner: Decoder) -> None:
        self.inner = inner

    def decode(self, sender: str, msg: Message) -> Decoded:
        return self.inner.decode(sender, msg)

    def compress(self, window: int, avg: np.ndarray, coverage: np.ndarray | None
                 ) -> np.ndarray:
        return avg

    def downlink(self, window: int, avg: np.ndarray, coverage: np.ndarray | None
                 ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(arrays of the AVG, the dense delta they carry)."""
        inner = compressor(self.inner)
        return ({"delta": avg}, avg) if inner is None else inner.downlink_all(avg)

    def forget(self, sender: str) -> None:
        self.inner.forget(sender)


@dataclass
class BufferedAveraging(WindowAveraging):
    """The coordinator side: WindowAveraging whose windows are buffers of `buffer` arrivals."""

    max_staleness: int = MAX_STALENESS
    buffer: int = 1  # B
    server_lr: float = 1.0  # eta_g

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.buffer < 1 or not 0.0 < self.server_lr < math.inf:
            raise ValueError("FedBuff needs buffer B >= 1 and a finite server_lr > 0")
        self.decoder = AllValuesDownlink(self.decoder)

    def _place(self, msg: Message) -> tuple[int, int]:
        # An honest device names the next average it expects: never past the open buffer.
        if not 1 <= msg["window"] <= self.closed_window + 1:
            raise Rejected("window_ahead", f"window {msg['window']}, open is "
                                           f"{self.closed_window + 1}")
        behind = self.version - msg.base_version
        if behind < 0:
            raise Rejected("bad_version", f"base version {msg.base_version} > {self.version}")
        window = self.closed_window + 1
        while msg.sender in self.pending.get(window, {}):
            window += 1  # its previous update is in that buffer: the next one
        staleness = behind + window - self.closed_window - 1  # when that buffer is applied
        if staleness > self.max_staleness:
            raise Rejected("stale", f"staleness {staleness} > bound {self.max_staleness}")
        return window, staleness

    def expected(self, window: int) -> frozenset[str]:
        return frozenset()  # a buffer waits for arrivals, not for anyone in particular

    def _all_in(self, window: int, got: dict[str, Contribution]) -> bool:
        selected = self.selected_online(window)  # selection: fewer may be training
        return len(got) >= (self.buffer if selected is None
                            else max(1, min(self.buffer, selected)))

    def _average(self, kept: list[Contribution]) -> tuple[np.ndarray, np.ndarray | None]:
        # Scaling the vectors, not the weights: the sample-weighted rule then gives
        # sum n s d / sum n (not / sum n s), and a robust rule sees the scaled updates.
        scaled = [c if c.staleness == 0 else dataclasses.replace(c, decoded=Decoded(
            c.decoded.dense * np.float32(staleness_weight(c.staleness)), c.decoded.coverage))
            for c in kept]
        avg, union = super()._average(scaled)
        if self.server_lr != 1.0:
            avg *= np.float32(self.server_lr)
        return avg, union
