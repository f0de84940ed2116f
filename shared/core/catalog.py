"""The algorithms fleetfl knows, one line each: a new algorithm is its device-side module plus
one line here (README, "Architecture").

Each algorithm is three separate pieces: its timing on the device (when an update is sent),
its default payload (what is sent; `job.payload` swaps it), and its delay rule (whether
updates are applied D steps late, so they may be D // K versions stale), plus, for FDA, the
coordinator's trigger.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from fleetfl.shared.core.choices import Payload
from fleetfl.shared.core.dga import delayed_device
from fleetfl.shared.core.fda import FDAMonitor, fda_device, fda_monitor
from fleetfl.shared.core.fedavg import round_device
from fleetfl.shared.core.fedbuff import buffered_device

if TYPE_CHECKING:
    from fleetfl.shared.core.base import DeviceSide, Encoder
    from fleetfl.shared.core.job import JobConfig

    # (job, run, sender, samples, model size, encoder) -> the device side
    DeviceFactory = Callable[[JobConfig, str, str, int, int, Encoder], DeviceSide]


@dataclass(frozen=True)
class Algorithm:
    device: DeviceFactory  # timing: when a device sends
    payload: Payload  # what it sends unless job.payload says otherwise
    delayed: bool = False  # averages applied D steps late (DGA): D // K versions of lag
    monitor: Callable[[JobConfig], FDAMonitor] | None = None  # coordinator-side trigger
    buffered: bool = False  # averages every B arrivals whatever their window (FedBuff)


ALGORITHMS: dict[str, Algorithm] = {
    "fedavg": Algorithm(round_device, Payload.DENSE),
    "dga": Algorithm(delayed_device, Payload.DENSE, delayed=True),
    "drpga": Algorithm(delayed_device, Payload.PARTIAL, delayed=True),
    "lbgm": Algorithm(round_device, Payload.LBGM),
    "fda": Algorithm(fda_device, Payload.DENSE, monitor=fda_monitor),
    "pmt": Algorithm(round_device, Payload.SUFFIX),  # with a round deadline (registry)
    "fedbuff": Algorithm(buffered_device, Payload.DENSE, buffered=True),
}

# The job's `algo` choices, from the table above (so they are listed once).
Algo = StrEnum("Algo", {name.upper(): name for name in ALGORITHMS})
