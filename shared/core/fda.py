"""FDA, federated dynamic averaging (ALGORITHMS.md section 5): agents train continuously and
report a tiny local state every `rtc_steps` steps; the coordinator estimates the variance of
the local models and, only when it exceeds Theta, triggers a synchronisation (a FedAvg round).

Estimators: naive (||d||^2), linear (+ the projection of d on the last global move xi) and
sketch (+ an AMS sketch of d). All three upper-bound the true variance (sketch w.h.p.).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from fleetfl.shared.core.base import Encoder, Rejected
from fleetfl.shared.core.choices import FdaVariant
from fleetfl.shared.core.fedavg import FedAvgDevice
from fleetfl.shared.core.messages import COORDINATOR_ID, Kind, Message
from fleetfl.shared.core.payloads import sm64

if TYPE_CHECKING:
    from fleetfl.shared.core.job import JobConfig

VARIANTS = tuple(FdaVariant)
SKETCH_DEPTH, SKETCH_WIDTH = 5, 250  # the AMS sketch every agent and the coordinator share
PRIME = np.uint64(2**31 - 1)


# -- AMS sketch -------------------------------------------------------------------------------
def _poly_hash(coefficients: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Polynomial hash over GF(2^31 - 1): degree 3 gives 4-wise independence."""
    h = np.full(x.shape, coefficients[0], dtype=np.uint64)
    for a in coefficients[1:]:
        h = (h * x + a) % PRIME  # both factors < 2^31: the product fits in 64 bits
    return h


class AMSSketch:
    """depth x width AMS sketch with hash tables shared by every agent through the seed."""

    def __init__(self, size: int, seed: int, depth: int = SKETCH_DEPTH,
                 width: int = SKETCH_WIDTH) -> None:
        self.depth, self.width = depth, width
        coeffs = sm64(np.arange(depth * 6, dtype=np.uint64) ^ np.uint64(seed)) % PRIME
        coeffs = coeffs.reshape(depth, 6)
        x = np.arange(size, dtype=np.uint64)
        self.buckets = np.stack([_poly_hash(c[:2], x) % np.uint64(width) for c in coeffs]
                                ).astype(np.intp)
        self.signs = np.stack([1.0 - 2.0 * (_poly_hash(c[2:], x) & np.uint64(1))
                               for c in coeffs]).astype(np.float32)

    @property
    def epsilon(self) -> float:
        return 1.0 / np.sqrt(self.width)

    def sketch(self, vector: np.ndarray) -> np.ndarray:
        return np.stack([np.bincount(self.buckets[r], weights=self.signs[r] * vector,
                                     minlength=self.width) for r in range(self.depth)]
                        ).astype(np.float32)

    @staticmethod
    def norm_sq(sketch: np.ndarray) -> float:
        """Estimate of ||x||^2 from Sk(x): the median over rows of the row's energy."""
        return float(np.median((sketch.astype(np.float64) ** 2).sum(axis=1)))


def seeded_unit_vector(size: int, seed: int) -> np.ndarray:
    """xi before the second sync: the same on every agent (no numpy Generator: streams
    differ across numpy versions)."""
    bits = sm64(np.arange(size, dtype=np.uint64) ^ np.uint64(seed * 7919 + 1))
    v = (bits >> np.uint64(11)).astype(np.float64) / 2.0**53 - 0.5
    return (v / np.linalg.norm(v)).astype(np.float32)


# -- estimates --------------------------------------------------------------------------------
@dataclass
class LocalState:
    drift_sq: float
    projection: float = 0.0
    sketch: np.ndarray | None = None


def estimate_variance(states: list[LocalState], variant: str, epsilon: float = 0.0) -> float:
    """E >= Var = mean ||d_i||^2 - ||mean d_i||^2 (plain mean over agents, as the code)."""
    first = float(np.mean([s.drift_sq for s in states]))
    if variant == "naive":
        return first
    if variant == "linear":
        return first - float(np.mean([s.projection for s in states])) ** 2
    mean_sketch = np.mean([s.sketch for s in states], axis=0)
    return first - AMSSketch.norm_sq(mean_sketch) / (1.0 + epsilon)


# -- Theta from a target sync period ---------------------------------------------------------
def growth_exponent(steps: np.ndarray, variances: np.ndarray) -> float:
    """p of the growth law V(h) = a h^p: the least-squares slope of log V over log h."""
    steps, variances = np.asarray(steps, np.float64), np.asarray(variances, np.float64)
    keep = (steps > 0) & (variances > 0)
    if keep.sum() < 2:
        raise ValueError("the growth law needs two points with h > 0 and V > 0")
    return float(np.polyfit(np.log(steps[keep]), np.log(variances[keep]), 1)[0])


def theta_for_period(variance: float, steps: int, period: int, exponent: float) -> float:
    """Theta that makes FDA sync every `period` local steps, when the fleet's variance was
    `variance` `steps` steps after a sync and grows as h^exponent: V(h) (period / h)^p.
    bench/calibrate_fda.py measures V(h) and p; the built-in tasks' Theta is this rule's value
    at their default period (shared/tasks/builtin.py)."""
    if variance < 0 or steps < 1 or period < 1:
        raise ValueError("variance >= 0, steps >= 1 and period >= 1")
    return float(variance) * (period / steps) ** exponent


# -- device side ------------------------------------------------------------------------------
class FDADevice(FedAvgDevice):
    """A FedAvg device whose rounds end on the coordinator's SYNC, not after H steps."""

    def __init__(self, run: str, sender: str, samples: int, variant: str, rtc_steps: int,
                 seed: int, size: int, encoder: Encoder | None = None) -> None:
        super().__init__(run, sender, samples, local_steps=1, encoder=encoder)
        if variant not in VARIANTS or rtc_steps < 1:
            raise ValueError(f"FDA variant must be one of {VARIANTS}, rtc_steps >= 1")
        self.variant, self.rtc_steps = variant, rtc_steps
        self.xi = seeded_unit_vector(size, seed) if variant == "linear" else None
        self.ams = AMSSketch(size, seed) if variant == "sketch" else None

    def start(self, version: int, next_window: int, params: np.ndarray,
              last_avg: np.ndarray | None = None) -> None:
        super().start(version, next_window, params)
        if self.xi is not None and last_avg is not None:
            self._set_xi(last_avg)

    def _set_xi(self, move: np.ndarray) -> None:
        norm = float(np.linalg.norm(move))
        if norm > 0.0:
            self.xi = (move / norm).astype(np.float32)

    def after_step(self, params: np.ndarray) -> list[Message]:
        self.steps += 1
        if self.waiting or self.steps % self.rtc_steps:
            return []
        drift = params - self.w_base
        fields: dict = {"step": self.steps, "drift_sq": float(drift.astype(np.float64) @ drift)}
        arrays = {}
        if self.xi is not None:
            fields["projection"] = float(self.xi @ drift)
        if self.ams is not None:
            arrays["sketch"] = self.ams.sketch(drift)
        return [Message(Kind.FDA_STATE, self.run, self.sender, 0, self.base_version, fields,
                        arrays)]

    def on_message(self, msg: Message, params: np.ndarray) -> list[Message]:
        if msg.kind is Kind.SYNC:
            if msg["window"] == self.window and not self.waiting \
                    and self.encoder.ready(self.window):  # not when sitting it out
                return [self._end_round(params)]
            if msg["window"] > self.window:
                self.needs_resync = True
            return []
        applied = self.applied_average
        out = super().on_message(msg, params)
        if self.xi is not None and self.applied_average is not applied:
            self._set_xi(self.applied_average)
        return out


# -- coordinator side -------------------------------------------------------------------------
@dataclass
class FDAMonitor:
    variant: str
    theta: float
    states: dict[str, LocalState] = field(default_factory=dict)
    version: int = -1
    triggered: bool = False
    last_estimate: float = 0.0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"FDA variant must be one of {VARIANTS}")
        self.epsilon = 1.0 / np.sqrt(SKETCH_WIDTH) if self.variant == "sketch" else 0.0

    def on_state(self, msg: Message, version: int, window: int, run: str,
                 expected: set[str]) -> list[Message]:
        if msg.base_version != version:
            return []  # from before the last sync: it says nothing about the current round
        if self.version != version:
            self.version, self.triggered = version, False
            self.states.clear()
        self.states[msg.sender] = self._state(msg)
        if self.triggered or not expected or not expected <= set(self.states):
            return []
        self.last_estimate = estimate_variance([self.states[a] for a in sorted(expected)],
                                               self.variant, self.epsilon)
        if self.last_estimate <= self.theta:
            return []
        self.triggered = True
        return [Message(Kind.SYNC, run, COORDINATOR_ID, 0, version,
                        {"version": version, "window": window,
                         "estimate": self.last_estimate})]

    def _state(self, msg: Message) -> LocalState:
        if not np.isfinite(msg["drift_sq"]) or msg["drift_sq"] < 0:
            raise Rejected("bad_value", f"drift {msg['drift_sq']!r}")
        state = LocalState(msg["drift_sq"])
        if self.variant == "linear":
            if "projection" not in msg.fields or not np.isfinite(msg["projection"]):
                raise Rejected("bad_value", "linear FDA state needs a finite projection")
            state.projection = msg["projection"]
        if self.variant == "sketch":
            sketch = msg.arrays.get("sketch")
            if sketch is None or sketch.shape != (SKETCH_DEPTH, SKETCH_WIDTH):
                shape = None if sketch is None else sketch.shape
                raise Rejected("bad_shape", f"sketch of shape {shape}, expected "
                                 f"({SKETCH_DEPTH}, {SKETCH_WIDTH})")
            state.sketch = sketch
        return state


# Theta when neither the job nor the task gives one (tasks carry their calibrated value:
# bench/calibrate_fda.py, ALGORITHMS.md 5).
DEFAULT_FDA_THETA = 0.1


def fda_device(job: JobConfig, run: str, sender: str, samples: int, size: int,
               encoder: Encoder) -> FDADevice:
    """FDA timing: a round ends on the coordinator's SYNC, triggered by the variance."""
    return FDADevice(run, sender, samples, job.fda_variant, job.rtc_steps, job.seed, size,
                     encoder)


def fda_monitor(job: JobConfig) -> FDAMonitor:
    return FDAMonitor(job.fda_variant, job.fda_theta or DEFAULT_FDA_THETA)
