"""Participant selection (README "Participant selection"): per window, `select` of the online
agents train (a count >= 1, or a fraction in (0, 1) of those online, rounded up); the others
sit the window out.

Rule. When window w is averaged the coordinator decides window w + `ahead` (2; DGA: its lag
+ 2), so the decision is on the devices before they can reach that window (an ASSIGN and an
AVG travel on different topics and are not ordered). Candidates are the agents online (and,
under FedPMT, not too slow for the deadline). Each has a wait: the windows since its last
update taken into an average (before any: since the last window averaged before its first
hello), counted from a window already decided for it when it is selected there (it is
expected to be served then). The `count` candidates with the longest wait are selected,
ties broken by SHA-256(seed, window, agent), so a run is reproducible from the job seed and a
restarted coordinator continues the same rotation. A selected agent whose update is not in
the average (dropped at a deadline, or it sent nothing) keeps its wait, so it comes first at
the next decision; a second miss in a row counts as served, so a silent agent is not
selected every window. With every selected agent contributing the rule is a round robin:
each online agent is selected at least once in every ceil(N / count) windows. The first
`ahead` windows, which no average precedes, take every agent.

Devices are told through FedPMT's ASSIGN (PROTOCOL.md 14.3): per decided window, 0 (every
layer; under FedPMT its assigned first group) for the selected, SITS_OUT (-1) for the others,
"from that window on", only where it changes what the device was told. An update for a
window its sender sits out is refused (`not_assigned`). Only the coordinator's own records
move a wait (averages it published, windows it decided): a hello, replayed or repeated,
sets nothing but the starting point of an agent never seen before.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fleetfl.shared.core.messages import COORDINATOR_ID, Kind, Message
from fleetfl.shared.core.payloads import Encoded
from fleetfl.shared.core.pmt import SITS_OUT, Assigner, History, in_force, told

HISTORY_WINDOWS = 64  # a device keeps what it was told for this many windows back


def valid_select(select: float) -> bool:
    """0 (off), a whole count >= 1, or a fraction in (0, 1)."""
    return select == 0 or 0 < select < 1 or (select >= 1 and select == int(select))


def selection_count(select: float, online: int) -> int:
    """How many of `online` agents a window takes: all for 0 (selection off) or a count at
    least `online`; else the count, or the fraction rounded up, and at least 1."""
    if select <= 0 or online == 0:
        return online
    if select < 1:  # round() first: 0.3 * 10 is 3.0000000000000004, which is 3
        return min(online, max(1, math.ceil(round(select * online, 9))))
    return min(online, int(select))


def tie_key(seed: int, window: int, agent: str) -> bytes:
    """The seeded tie-break: the same on every run and after a restart."""
    return hashlib.sha256(f"{seed}:{window}:{agent}".encode()).digest()


def pruned(history: History, window: int) -> History:
    """`history` without what no window from `window` on reads: bounded memory."""
    keep = [i for i, (since, _) in enumerate(history) if since <= window]
    return history[keep[-1]:] if keep else history


@dataclass
class Selector:
    """The coordinator side: decides each window's agents and keeps what each was told."""

    select: float  # a count >= 1, or a fraction in (0, 1)
    seed: int
    run: str
    ahead: int = 2  # windows decided ahead of the open one (also the warm-up windows)
    inner: Assigner | None = None  # FedPMT's layer plan / the round deadline
    layered: bool = False  # suffix payload: the selected train the plan's layer groups
    assigned: dict[str, History] = field(default_factory=dict)  # what each agent was told
    since: dict[str, int] = field(default_factory=dict)  # agent -> its wait counts from
    strikes: dict[str, int] = field(default_factory=dict)  # agent -> selections missed in a row
    chosen: dict[int, list[str]] = field(default_factory=dict)  # decided, not yet averaged
    decided: int = 0  # the last window decided (0: still in the warm-up)
    log: list[tuple[int, list[str]]] = field(default_factory=list)  # for the shell

    def __post_init__(self) -> None:
        if self.select == 0 or not valid_select(self.select):
            raise ValueError(f"select {self.select}: a count >= 1 or a fraction in (0, 1)")
        self.decided = max(self.decided, self.ahead)

    @property
    def deadline(self) -> float:
        return self.inner.deadline if self.inner is not None else 0.0

    def first_layer(self, agent: str, window: int) -> int | None:
        return in_force(self.assigned.get(agent, []), window)

    def selected(self, agent: str, window: int) -> bool:
        first = self.first_layer(agent, window)
        return first is not None and first != SITS_OUT

    def _plan(self, agent: str, window: int) -> int | None:
        """What a selected agent trains in `window`: every layer, or FedPMT's plan (None:
        no plan yet, SITS_OUT: too slow for the deadline)."""
        if self.inner is None:
            return 0
        first = self.inner.first_layer(agent, window)
        if self.layered:
            return first
        return SITS_OUT if first == SITS_OUT else 0  # dense: a plan only says who is too slow

    def _wanted(self, agent: str, window: int) -> int | None:
        if window > self.ahead and agent not in self.chosen.get(window, ()):
            return SITS_OUT
        return self._plan(agent, window)

    # -- inputs ---------------------------------------------------------------------------
    def on_hello(self, agent: str, profile: object, first_window: int, closed: int
                 ) -> list[Message]:
        """A hello (checked, rate-limited): tell the agent every decided window from its
        first on (it may have restarted and lost what it was told)."""
        if self.inner is not None:  # checks the profile; its ASSIGNs are ours to send
            self.inner.on_hello(agent, profile, first_window)
        self.since.setdefault(agent, closed)  # the coordinator's count, not the hello's
        # FedPMT: a hello may change everyone's plan (a derived deadline)
        agents = sorted(self.since) if self.inner is not None else [agent]
        return self._tell([*agents, agent], max(first_window, closed + 1), always=agent)

    def averaged(self, window: int, contributors: Iterable[str]) -> None:
        """Window `window` was averaged with these agents' updates."""
        served = set(contributors)
        for agent in served:
            self.since[agent] = window
            self.strikes.pop(agent, None)
        for agent in set(self.chosen.get(window, ())) - served:
            self.strikes[agent] = self.strikes.get(agent, 0) + 1
            if self.strikes[agent] >= 2:  # twice in a row: back into the rotation
                self.since[agent], self.strikes[agent] = window, 0
        for w in [w for w in self.chosen if w <= window]:
            del self.chosen[w]
        for agent, history in self.assigned.items():  # FedBuff updates may name older
            self.assigned[agent] = pruned(history, window + 1 - HISTORY_WINDOWS)  # windows

    def active(self, window: int) -> list[str] | None:
        """The agents chosen for `window` (None: a warm-up window, everyone)."""
        return self.chosen.get(window) if window > self.ahead else None

    def decide(self, window: int, online: list[str], closed: int) -> list[Message]:
        """Decide every window up to `window` not yet decided, from `online` (sorted)."""
        if self.inner is not None:
            self.inner.reassign(window)  # the plan follows the measured speeds
        out: list[Message] = []
        while self.decided < window:
            self.decided += 1
            self._choose(self.decided, online, closed)
            out += self._tell(sorted({*self.assigned, *online}), self.decided)
        return out

    def _choose(self, window: int, online: list[str], closed: int) -> None:
        candidates = [a for a in online if self._plan(a, window) not in (None, SITS_OUT)]
        count = selection_count(self.select, len(candidates))

        def last(agent: str) -> int:  # a window decided for it counts as served
            pending = [w for w in range(closed + 1, window) if self.selected(agent, w)]
            return max([self.since.get(agent, closed), *pending])

        ranked = sorted(candidates, key=lambda a: (last(a), tie_key(self.seed, window, a)))
        self.chosen[window] = sorted(ranked[:count])
        self.log.append((window, self.chosen[window]))

    def _tell(self, agents: Iterable[str], start: int, always: str | None = None
              ) -> list[Message]:
        """ASSIGNs bringing `agents` in line with the decisions from window `start` to the
        last decided one (at least `start`): one per window, only what changes, in order."""
        out = []
        for window in range(start, max(start, self.decided) + 1):
            changed = {}
            for agent in dict.fromkeys(agents):
                first = self._wanted(agent, window)
                history = self.assigned.get(agent, [])
                if first is None or (in_force(history, window) == first
                                     and not (agent == always and window == start)):
                    continue
                self.assigned[agent] = told(history, window, first)
                changed[agent] = first
            if changed:
                out.append(Message(Kind.ASSIGN, self.run, COORDINATOR_ID, 0, 0,
                                   {"window": window, "first_layer": changed,
                                    "deadline": self.deadline}))
        return out

    # -- checkpoints ----------------------------------------------------------------------
    def state(self) -> dict:
        return {"assigned": {a: [list(e) for e in h] for a, h in self.assigned.items()},
                "since": dict(self.since),
                "strikes": dict(self.strikes),
                "chosen": [[w, a] for w, a in sorted(self.chosen.items())],
                "decided": self.decided}

    def load_state(self, state: dict) -> None:
        self.assigned = {a: [(int(w), int(f)) for w, f in h]
                         for a, h in state["assigned"].items()}
        self.since = {a: int(w) for a, w in state["since"].items()}
        self.strikes = {a: int(n) for a, n in state["strikes"].items()}
        self.chosen = {int(w): list(a) for w, a in state["chosen"]}
        self.decided = int(state["decided"])


class SelectionGate:
    """Device side, around any payload's encoder: train a window only when told so (an
    ASSIGN naming this agent selected for it); the rest goes to the payload."""

    def __init__(self, inner: Any, sender: str) -> None:
        self.inner, self.sender = inner, sender
        self.assigned: History = []

    def __getattr__(self, name: str) -> Any:  # the payload's own state (residuals, masks)
        return getattr(self.inner, name)

    def assign(self, msg: Message) -> None:
        first = msg["first_layer"].get(self.sender)
        if isinstance(first, int) and not isinstance(first, bool) and first >= SITS_OUT:
            # an assignment is sent a few windows ahead of need: older ones are long past
            self.assigned = told(pruned(self.assigned, msg["window"] - HISTORY_WINDOWS),
                                 msg["window"], first)
        self.inner.assign(msg)

    def trainable_from(self, window: int) -> int | None:
        first = in_force(self.assigned, window)
        if first is None or first == SITS_OUT:
            return first
        return self.inner.trainable_from(window)

    def sits_out(self, window: int) -> bool:
        """Told to sit `window` out (not merely: not told yet)."""
        return in_force(self.assigned, window) == SITS_OUT

    def ready(self, window: int) -> bool:
        first = in_force(self.assigned, window)
        return first is not None and first != SITS_OUT and self.inner.ready(window)

    def encode(self, delta: np.ndarray, window: int) -> Encoded:
        return self.inner.encode(delta, window)

    def settle(self, window: int, included: bool) -> None:
        self.inner.settle(window, included)

    def arrived(self, msg: Message) -> None:
        self.inner.arrived(msg)

    def expand(self, window: int, values: np.ndarray, size: int) -> np.ndarray:
        return self.inner.expand(window, values, size)


def sits_out(encoder: Any, window: int) -> bool:
    """Has the device been told to sit `window` out (selection or FedPMT)?"""
    check: Callable[[int], bool] | None = getattr(encoder, "sits_out", None)
    if check is not None:
        return check(window)
    return encoder.trainable_from(window) == SITS_OUT
