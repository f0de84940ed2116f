"""FedPMT, layer-wise partial model training (ALGORITHMS.md section 7).

A slow device trains only the trailing layer groups it can finish within the round deadline;
backpropagation stops before the frozen ones, so they cost it no gradient compute. Pieces:
- choosing L (how many trailing groups) from a device's measured profile and the deadline;
- the coordinator's Assigner: profiles in, deadline and assignments out (ASSIGN on down/ctl);
- the suffix payload: the agent sends its trained groups only, the coordinator checks them
  against the assignment and averages each group over the agents that trained it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fleetfl.shared.core.base import Rejected
from fleetfl.shared.core.layers import LayerGroup
from fleetfl.shared.core.messages import COORDINATOR_ID, Kind, Message
from fleetfl.shared.core.payloads import Decoded, DenseEncoder, Encoded

SITS_OUT = -1
# Plausible per-batch times (issue 14): no device runs a forward and backward pass of one batch
# in under a microsecond (an all-zero profile gave a deadline of 0 and silenced the fleet, and
# a zero prediction can never be corrected by measurement), and an hour per batch is no device
# anyone trains on (1e300 passed as finite and overflowed the round cost).
MIN_STEP_SECONDS = 1e-6
MAX_STEP_SECONDS = 3600.0


@dataclass(frozen=True)
class Profile:
    forward: tuple[float, ...]  # seconds per batch, input-side group first
    backward: tuple[float, ...]

    def scaled(self, factor: float) -> Profile:
        return Profile(tuple(v * factor for v in self.forward),
                       tuple(v * factor for v in self.backward))

    def round_cost(self, local_steps: int, trained: int) -> float:
        """Seconds for a round of `local_steps` steps training the last `trained` groups."""
        return local_steps * (sum(self.forward) + sum(self.backward[len(self.backward)
                                                                    - trained:]))


def parse_profile(data: object, groups: int) -> Profile:
    """A profile from a hello, checked: one finite, non-negative f and b per group, and a
    step plausible for a real device (MIN_STEP_SECONDS to MAX_STEP_SECONDS)."""
    if not isinstance(data, dict) or not {"f", "b"} <= set(data):
        raise Rejected("bad_profile", "profile needs per-group lists f and b")
    f, b = data["f"], data["b"]
    for name, values in (("f", f), ("b", b)):
        if not isinstance(values, list) or len(values) != groups:
            raise Rejected("bad_profile", f"profile {name} has "
                                          f"{len(values) if isinstance(values, list) else '?'} "
                                          f"entries, the model has {groups} layer groups")
        if not all(isinstance(v, float | int) and not isinstance(v, bool)
                   and math.isfinite(v) and v >= 0 for v in values):
            raise Rejected("bad_profile", f"profile {name} has negative or non-numeric times")
    profile = Profile(tuple(map(float, f)), tuple(map(float, b)))
    cheapest, dearest = profile.round_cost(1, 1), profile.round_cost(1, groups)
    if not MIN_STEP_SECONDS <= cheapest <= dearest <= MAX_STEP_SECONDS:
        raise Rejected("bad_profile", f"a step of {cheapest:.3g} to {dearest:.3g} s is not "
                                      f"plausible ({MIN_STEP_SECONDS:g} to "
                                      f"{MAX_STEP_SECONDS:g} s)")
    return profile


def trailing_groups(profile: Profile, local_steps: int, deadline: float,
                    margin: float = 0.1) -> int:
    """The largest L whose round fits in (1 - margin) * deadline; 0: it cannot even train
    the output group in time and sits out."""
    budget = (1.0 - margin) * deadline
    fitting = [n for n in range(1, len(profile.backward) + 1)
               if profile.round_cost(local_steps, n) <= budget]
    return max(fitting, default=0)


History = list[tuple[int, int]]  # (from window, first layer or SITS_OUT), oldest first


def in_force(history: History, window: int) -> int | None:
    """What `history` says for `window` (None: nothing yet)."""
    current = None
    for since, first in history:
        if since <= window:
            current = first
    return current


def told(history: History, window: int, first: int) -> History:
    """`history` after an ASSIGN of `first` from `window` on: it replaces what was said for
    `window` and later, on the device as on the coordinator."""
    return [*[(w, f) for w, f in history if w < window], (window, first)]


@dataclass
class Assigner:
    """Coordinator side: fixes the deadline (given, or `factor` x the full-model round time
    of the `rank`-th fastest agent once `rank` profiles are in) and assigns groups.

    A derived deadline never drops below what the median agent needs to train its output
    group: however fast one agent claims to be, at least half of the fleet keeps training
    (issue 14: one all-zero profile set the deadline to 0 and everyone else sat out)."""

    groups: int
    local_steps: int
    run: str
    deadline: float = 0.0  # seconds; 0: derive it from the profiles
    rank: int = 1
    factor: float = 1.0
    margin: float = 0.1
    profiles: dict[str, Profile] = field(default_factory=dict)
    # measured / profiled step time per agent: load, contention and thermal throttling
    # make real steps slower than the profile taken at start
    scale: dict[str, float] = field(default_factory=dict)
    derived: bool = False  # the deadline follows the fleet (rank x factor), not fixed
    # agent -> [(from window, first trained group or SITS_OUT)], oldest first
    assigned: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.derived = self.deadline <= 0.0

    def on_hello(self, agent: str, profile: object, first_window: int) -> list[Message]:
        self.profiles[agent] = parse_profile(profile, self.groups)
        self.scale.pop(agent, None)
        if self.derived:
            if len(self.profiles) < self.rank:
                return []
            self._derive_deadline()
            # the agent gets its assignment (it may have restarted and lost it), the others
            # only a change: a repeated hello costs one entry, not one per agent
            return self._assign(sorted(self.profiles), first_window, only_changes=True,
                                always=agent)
        return self._assign([agent], first_window, only_changes=False)

    def observe(self, agent: str, first: int, step_seconds: float) -> None:
        """An update reported its real time per step while training from group `first`;
        an implausible one (not in MIN_STEP_SECONDS..MAX_STEP_SECONDS) is ignored."""
        profile = self.profiles.get(agent)
        predicted = profile.round_cost(1, self.groups - first) if profile else 0.0
        if predicted > 0.0 and MIN_STEP_SECONDS <= step_seconds <= MAX_STEP_SECONDS:
            ratio = step_seconds / predicted
            self.scale[agent] = 0.5 * (self.scale.get(agent, ratio) + ratio)

    def reassign(self, window: int) -> list[Message]:
        """After a round: follow the measured speeds from `window` on."""
        if not self.assigned:
            return []
        if self.derived:
            self._derive_deadline()
        return self._assign(sorted(self.assigned), window, only_changes=True)

    def _effective(self, agent: str) -> Profile:
        return self.profiles[agent].scaled(self.scale.get(agent, 1.0))

    def _derive_deadline(self) -> None:
        effective = [self._effective(a) for a in self.profiles]
        costs = sorted(p.round_cost(self.local_steps, self.groups) for p in effective)
        # the upper median of the output-group-only rounds: one agent among n >= 2 cannot
        # move it below the need of an honest one
        needs = sorted(p.round_cost(self.local_steps, 1) for p in effective)
        floor = needs[len(needs) // 2] / (1.0 - self.margin) * (1.0 + 1e-9)  # rounding
        self.deadline = max(self.factor * costs[min(self.rank, len(costs)) - 1], floor)

    def _assign(self, agents: list[str], window: int, only_changes: bool,
                always: str | None = None) -> list[Message]:
        changed = {}
        for agent in agents:
            trained = trailing_groups(self._effective(agent), self.local_steps, self.deadline,
                                      self.margin)
            first = self.groups - trained if trained else SITS_OUT
            if only_changes and agent != always and self.first_layer(agent, window) == first:
                continue
            self.assigned[agent] = told(self.assigned.get(agent, []), window, first)
            changed[agent] = first
        if not changed:
            return []
        return [Message(Kind.ASSIGN, self.run, COORDINATOR_ID, 0, 0,
                        {"window": window, "first_layer": changed, "deadline": self.deadline})]

    def first_layer(self, agent: str, window: int) -> int | None:
        """The assignment in force for `agent` in `window` (None: none yet)."""
        return in_force(self.assigned.get(agent, []), window)

    def current(self) -> dict[str, int]:
        return {a: h[-1][1] for a, h in sorted(self.assigned.items())}


class SuffixEncoder(DenseEncoder):
    """Device side: send the trained suffix of the delta, as assigned per window."""

    def __init__(self, groups: list[LayerGroup], sender: str) -> None:
        self.groups, self.sender = groups, sender
        self.assigned: list[tuple[int, int]] = []

    def assign(self, msg: Message) -> None:
        first = msg["first_layer"].get(self.sender)
        if isinstance(first, int) and SITS_OUT <= first < len(self.groups):
            self.assigned = told(self.assigned, msg["window"], first)

    def trainable_from(self, window: int) -> int | None:
        return in_force(self.assigned, window)

    def ready(self, window: int) -> bool:
        first = self.trainable_from(window)
        return first is not None and first != SITS_OUT

    def encode(self, delta: np.ndarray, window: int) -> Encoded:
        first = self.trainable_from(window)
        start = self.groups[first].start
        own = np.zeros_like(delta)
        own[start:] = delta[start:]
        return Encoded({"first_layer": first}, delta[start:], own)


class SuffixDecoder:
    def __init__(self, groups: list[LayerGroup], assigner: Assigner) -> None:
        self.groups, self.assigner = groups, assigner
        self.size = groups[-1].end

    def decode(self, sender: str, msg: Message) -> Decoded:
        first = msg.fields.get("first_layer")
        expected = self.assigner.first_layer(sender, msg["window"])
        if expected is None or expected == SITS_OUT:
            raise Rejected("not_assigned", f"{sender} has no layers assigned in window "
                                           f"{msg['window']}")
        if first != expected:
            raise Rejected("not_assigned", f"update trains from group {first}, "
                                           f"assigned {expected}")
        start = self.groups[first].start
        values = msg["delta"].reshape(-1)
        if values.size != self.size - start:
            raise Rejected("bad_shape", f"suffix from group {first} needs "
                                        f"{self.size - start} values, got {values.size}")
        dense = np.zeros(self.size, dtype=np.float32)
        dense[start:] = values
        coverage = np.zeros(self.size, dtype=bool)
        coverage[start:] = True
        return Decoded(dense, coverage)

    def compress(self, window: int, avg: np.ndarray, coverage: np.ndarray | None) -> np.ndarray:
        return avg

    def forget(self, sender: str) -> None:
        pass
