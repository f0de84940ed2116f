"""Federated evaluation on the coordinator: ask the agents online to evaluate a version on
their validation data, and combine what they report into sample-weighted means.

Reports are hostile input like any other: one per agent and version, only from agents asked,
sample counts bounded by what the agent declared at hello, values finite and limited to the
task's names; sums in float64. A version closes when every agent asked has answered (agents
without validation data answer with 0 samples; an answer for a newer version means the agent
skipped this one) or when `timeout` seconds have passed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fleetfl.shared.core.base import Rejected
from fleetfl.shared.core.messages import Message

MAX_ABS_VALUE = 1e9  # a loss or metric beyond this is not a measurement


@dataclass
class _Open:
    asked: set[str]
    opened_at: float
    answered: set[str] = field(default_factory=set)
    samples: int = 0
    reporters: int = 0
    sums: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class FederatedResult:
    version: int
    values: dict[str, float]  # sample-weighted means; empty when nobody had samples
    samples: int
    reporters: int  # agents that evaluated (samples > 0)
    missing: int  # agents asked that never answered


class FederatedEvaluation:
    def __init__(self, names: list[str], timeout: float) -> None:
        self.names = frozenset(names)  # "loss" and the task's metrics
        self.timeout = timeout
        self.open: dict[int, _Open] = {}

    def request(self, version: int, agents: set[str], now: float) -> None:
        self.open[version] = _Open(set(agents), now)

    def report(self, msg: Message, declared: int) -> None:
        """Take one METRICS message; Rejected (with a reason to count) if it is not a
        believable answer to an open request."""
        version, samples, values = msg["version"], msg["samples"], msg["values"]
        pending = self.open.get(version)
        if pending is None or msg.sender not in pending.asked:
            raise Rejected("unasked_metrics", f"metrics for version {version} not asked of "
                                              f"{msg.sender}")
        if msg.sender in pending.answered:
            raise Rejected("duplicate_metrics", f"second metrics for version {version}")
        if not 0 <= samples <= declared:
            raise Rejected("bad_metrics", f"{samples} samples, declared {declared} at hello")
        if samples and set(values) != self.names:
            raise Rejected("bad_metrics", f"values {sorted(values)[:8]}, expected "
                                          f"{sorted(self.names)}")
        if samples and not all(isinstance(v, int | float) and not isinstance(v, bool)
                               and math.isfinite(v) and abs(v) <= MAX_ABS_VALUE
                               for v in values.values()):
            raise Rejected("bad_metrics", "a value is not a finite number")
        pending.answered.add(msg.sender)
        # An agent evaluates the newest version it was sent and skips older ones still
        # waiting (shared/learn/evaluator.py): it will not answer those, so stop waiting for it.
        for older, waiting in self.open.items():
            if older < version and msg.sender in waiting.asked:
                waiting.answered.add(msg.sender)
        if samples:
            pending.reporters += 1
            pending.samples += samples
            for name in self.names:
                pending.sums[name] = pending.sums.get(name, 0.0) + float(values[name]) * samples

    def closed(self, now: float, force: bool = False) -> list[FederatedResult]:
        """Versions now complete (everyone answered, timed out, or `force`), oldest first."""
        done = [v for v, p in sorted(self.open.items())
                if force or p.answered >= p.asked or now - p.opened_at >= self.timeout]
        return [self._result(v, self.open.pop(v)) for v in done]

    def waiting(self) -> bool:
        return bool(self.open)

    @staticmethod
    def _result(version: int, p: _Open) -> FederatedResult:
        values = {k: s / p.samples for k, s in p.sums.items()} if p.samples else {}
        return FederatedResult(version, values, p.samples, p.reporters,
                               len(p.asked - p.answered))
