"""Coordinator side shared by FedAvg and DGA: collect the deltas of each window (a FedAvg round
is a window), average them weighted by samples, publish the average and the new model.

Windows close in order, when every expected agent has reported or `window_timeout` seconds
after the first report (or at a round deadline), then only with `window_quorum` reports in if
set (or every expected agent online, if fewer are). The first window also waits for
`min_agents` reports so a run does not start with whoever came first (the start barrier).
With `start_timeout`, the barrier lifts that long after the first hello if at least
`start_quorum` reports are in (0: a majority of min_agents): a rack with a dead Pi still
starts, one with half its Pis down does not. Its clock starts at a hello, an input the
journal holds, so a replay lifts it at the same point.

Nothing one agent sends can make the model non-finite (issue 14): the samples an update
claims are bounded by its hello's, and the hello's by `max_samples`; sums are float64; and
before a window's average is applied, each contribution that would move a parameter beyond
`max_param` is refused (`out_of_bounds`), the average taken over the others. The rules are
per-coordinate convex combinations (mean, median, trimmed mean of clipped vectors), so an
average of sane contributions is sane; it is checked once more all the same, and if it is
not, the window publishes a zero delta: the previous model stays and no agent is left
waiting for an average.

Participant selection (selection.py): with a Selector, each window waits only for the agents
selected for it, and an update for a window its sender sits out is refused (`not_assigned`).
A decided window nobody can serve, as every agent selected for it is offline, or none of them
sent anything `window_timeout` after it started (not under FDA, whose windows have no
length), closes with no contribution: a version equal to the one before, so the agents
waiting on it go on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from fleetfl.shared.core.base import Rejected
from fleetfl.shared.core.fda import FDAMonitor
from fleetfl.shared.core.messages import COORDINATOR_ID, Kind, Message
from fleetfl.shared.core.payloads import Decoded, DenseDecoder, plain_values
from fleetfl.shared.core.pmt import SITS_OUT, Assigner
from fleetfl.shared.core.quantized import compressor
from fleetfl.shared.core.selection import Selector
from fleetfl.shared.core.weighted_sum import covered_mean

OUT_OF_BOUNDS = "out_of_bounds"  # refusal reason of a contribution the bound check dropped
# Hellos per agent: a burst, then one per interval. Each hello may re-plan FedPMT and publish
# assignments, so a flood must not cost the fleet more than a trickle. Honest agents say
# hello when they start (systemd restarts them 10 s apart at most) and when they resync.
HELLO_BURST = 5
HELLO_INTERVAL = 10.0  # seconds


@dataclass
class AgentRecord:
    samples: int = 0
    first_window: int = 1
    online: bool = True
    last_seq: int = -1
    last_seen: float = 0.0
    base_version: int = 0
    accepted: int = 0
    missed: int = 0
    validation_samples: int = 0  # declared at hello: bounds its federated-evaluation reports
    hello_tokens: float = HELLO_BURST  # hello rate limit: a token bucket ...
    hello_at: float = 0.0  # ... last refilled then (the state machine's clock)


@dataclass
class Contribution:
    decoded: Decoded
    samples: int
    staleness: int
    steps: int
    seq: int = -1  # the update's sequence number: accounting says which update went where


@dataclass
class WindowResult:
    """What the shell logs for each published version."""

    window: int
    version: int
    contributors: list[str]
    staleness: dict[str, int]
    missing: list[str]
    timed_out: bool
    local_steps: int  # local steps behind the averaged updates
    assignments: dict[str, int] = field(default_factory=dict)  # FedPMT: first trained group
    seqs: dict[str, int] = field(default_factory=dict)  # sender -> seq of its update
    # senders whose update was accepted but left out of the average -> why (OUT_OF_BOUNDS)
    refused: dict[str, str] = field(default_factory=dict)
    # participant selection: [window, agents selected] decided since the previous version
    selected: list[list] = field(default_factory=list)


@dataclass
class WindowAveraging:
    params: np.ndarray
    run: str
    job: dict
    max_staleness: int = 0
    max_ahead: int = 1
    window_timeout: float = 30.0
    window_quorum: int = 0  # fewest updates a timed-out window closes with (0: any)
    min_agents: int = 1
    start_timeout: float = 0.0  # seconds after the first hello (0: wait for min_agents)
    start_quorum: int = 0  # fewest reports the lifted barrier takes (0: a majority)
    staleness_exponent: float = 0.0
    decoder: object = None  # what is sent: payloads.*Decoder (dense by default)
    monitor: FDAMonitor | None = None  # when: FDA triggers (None: every window)
    # how: None is the sample-weighted mean over each coordinate's senders; else a robust
    # aggregator f(vectors, weights, coverages) -> vector (robust.py)
    aggregator: Callable[[list[np.ndarray], list[float], list[np.ndarray | None]],
                         np.ndarray] | None = None
    # FedPMT and deadline rounds: assigns layers from profiles, fixes the round deadline
    assigner: Assigner | None = None
    # participant selection: who trains each window (None: everyone); wraps `assigner`
    selector: Selector | None = None
    max_samples: int = 10**7  # most samples a hello may declare
    max_param: float = 1e6  # no average may move a parameter beyond +-max_param
    # the run's last version (0: none): windows ready together are not averaged past it
    max_versions: int = 0
    version: int = 0
    closed_window: int = 0
    agents: dict[str, AgentRecord] = field(default_factory=dict)
    pending: dict[int, dict[str, Contribution]] = field(default_factory=dict)
    opened_at: dict[int, float] = field(default_factory=dict)  # first update arrived
    started_at: dict[int, float] = field(default_factory=dict)  # previous average published
    results: list[WindowResult] = field(default_factory=list)
    # the start barrier's clock: not checkpointed, as checkpoints come after version 1
    first_hello_at: float | None = None

    def __post_init__(self) -> None:
        self.params = np.array(self.params, dtype=np.float32)  # owned copy
        self.decoder = self.decoder or DenseDecoder(self.params.size)
        self.last_avg = np.zeros_like(self.params)
        # expected() is asked after every update: it is cached per window and recomputed only
        # when the roster changes (a hello, an agent going offline or coming back, FedPMT
        # assignments, a new agents dict from load_state), so a round of N updates costs
        # O(N), not O(N^2) (bench/load_agents.py: 1,000 agents)
        self._roster = 0
        self._expected: tuple[int, int, dict, frozenset[str]] | None = None

    # -- inputs -------------------------------------------------------------------------
    def on_message(self, msg: Message, now: float) -> list[Message]:
        if msg.kind is Kind.HELLO:
            return self._on_hello(msg, now)
        if msg.kind is Kind.OFFLINE:
            if msg.sender in self.agents:
                self.agents[msg.sender].online = False
                self._roster += 1
            return []
        if msg.kind is Kind.UPDATE:
            self._accept_update(msg, now)
            return self._close_ready(now)
        if msg.kind is Kind.FDA_STATE and self.monitor is not None:
            rec = self._sender(msg)
            rec.last_seq, rec.last_seen = msg.seq, now
            expected = self.expected(self.closed_window + 1)
            if self.closed_window == 0 and len(expected) < self.min_agents \
                    and not self.barrier_lifted(len(expected), now):
                expected = set()  # start barrier: no trigger before the fleet is there
            return self.monitor.on_state(msg, self.version, self.closed_window + 1, self.run,
                                         expected)
        raise Rejected("unexpected_kind", f"{msg.kind} is not sent to the coordinator")

    def on_tick(self, now: float) -> list[Message]:
        return self._close_ready(now)

    def model_message(self) -> Message:
        """Full model for joiners and restarts (retained on down/model)."""
        arrays = {"params": self.params}
        if self.monitor is not None and self.monitor.variant == "linear":
            arrays["last_avg"] = self.last_avg  # joiners derive FDA's xi from it
        return Message(kind=Kind.MODEL, run=self.run, sender=COORDINATOR_ID, seq=0,
                       base_version=self.version,
                       fields={"version": self.version, "next_window": self.closed_window + 1,
                               "job": self.job},
                       arrays=arrays)

    def _on_hello(self, msg: Message, now: float) -> list[Message]:
        rec = self.agents.get(msg.sender)
        if rec is not None and msg.seq < rec.last_seq:
            raise Rejected("replayed", f"hello seq {msg.seq} < {rec.last_seq}")
        if msg["samples"] <= 0:
            raise Rejected("bad_value", f"hello with {msg['samples']} samples")
        validation = msg.fields.get("validation_samples", 0)
        # both weigh what the agent later sends (updates; federated-evaluation reports)
        for what, claimed in (("samples", msg["samples"]), ("validation_samples", validation)):
            if not 0 <= claimed <= self.max_samples:
                raise Rejected("samples_claim", f"hello with {claimed} {what} outside "
                                                f"0..max_samples {self.max_samples}")
        tokens = HELLO_BURST if rec is None else min(
            HELLO_BURST, rec.hello_tokens + max(0.0, now - rec.hello_at) / HELLO_INTERVAL)
        if tokens < 1.0:
            raise Rejected("hello_rate", f"more than {HELLO_BURST} hellos, then one per "
                                         f"{HELLO_INTERVAL:g} s")
        assignments = []
        profile = msg.fields.get("capabilities", {}).get("profile")
        if self.selector is not None:  # checks the profile before anything is recorded
            assignments = self.selector.on_hello(msg.sender, profile, msg["first_window"],
                                                 self.closed_window)
        elif self.assigner is not None:
            assignments = self.assigner.on_hello(msg.sender, profile, msg["first_window"])
        rec = rec or self.agents.setdefault(msg.sender, AgentRecord())
        rec.hello_tokens, rec.hello_at = tokens - 1.0, now
        if msg.seq > rec.last_seq:
            self.decoder.forget(msg.sender)  # a (re)joining agent starts its state afresh
        rec.samples, rec.first_window = msg["samples"], msg["first_window"]
        rec.validation_samples = validation
        rec.online, rec.last_seq, rec.last_seen, rec.missed = True, msg.seq, now, 0
        self._roster += 1
        if self.first_hello_at is None:
            self.first_hello_at = now
        return assignments

    def _sender(self, msg: Message) -> AgentRecord:
        """The sender's record, if it is known and the message is not a replay."""
        rec = self.agents.get(msg.sender)
        if rec is None:
            raise Rejected("unknown_agent", f"{msg.sender!r} never said hello")
        if msg.seq <= rec.last_seq:
            raise Rejected("replayed", f"seq {msg.seq} <= last accepted {rec.last_seq}")
        return rec

    def _accept_update(self, msg: Message, now: float) -> None:
        rec = self._sender(msg)
        window, staleness = self._place(msg)
        if self.selector is not None and not self.selector.selected(msg.sender, msg["window"]):
            raise Rejected("not_assigned", f"{msg.sender} is not selected for window "
                                           f"{msg['window']}")
        if msg["samples"] <= 0 or msg["steps"] < 0:
            raise Rejected("bad_value", f"{msg['samples']} samples, {msg['steps']} steps")
        if msg["samples"] > rec.samples:  # the weight of its update: no more than declared
            raise Rejected("samples_claim", f"{msg['samples']} samples, its hello declared "
                                            f"{rec.samples}")
        if msg.sender in self.pending.get(window, {}):
            raise Rejected("duplicate", f"second update for window {window}")
        if compressor(self.decoder) is None:
            if set(msg.arrays) != {"delta"}:
                raise Rejected("bad_shape", f"arrays {sorted(msg.arrays)} without compression")
            plain_values(msg["delta"])
        decoded = self.decoder.decode(msg.sender, msg)  # last check; may keep look-backs
        if not np.isfinite(decoded.dense).all():
            # finite on the wire yet not once decoded: an LBGM rho of 1e300 times its look-back
            raise Rejected("not_finite", "the decoded update overflows float32")
        contributions = self.pending.setdefault(window, {})
        contributions[msg.sender] = Contribution(decoded, msg["samples"], staleness,
                                                 msg["steps"], msg.seq)
        if self.assigner is not None and "step_seconds" in msg.fields:
            self.assigner.observe(msg.sender, msg.fields.get("first_layer", 0),
                                  msg["step_seconds"])
        self.opened_at.setdefault(window, now)
        rec.last_seq, rec.last_seen, rec.base_version = msg.seq, now, msg.base_version
        if not rec.online:
            self._roster += 1
        rec.accepted, rec.online, rec.missed = rec.accepted + 1, True, 0

    def _place(self, msg: Message) -> tuple[int, int]:
        """(window, staleness) an update is filed under, or Rejected: the window it names
        (buffered timing, fedbuff.py: the open buffer)."""
        window, staleness = msg["window"], self.version - msg.base_version
        if staleness < 0:
            raise Rejected("bad_version", f"base version {msg.base_version} > {self.version}")
        if staleness > self.max_staleness:
            raise Rejected("stale", f"staleness {staleness} > bound {self.max_staleness}")
        if window <= self.closed_window:
            raise Rejected("window_closed", f"window {window} already averaged")
        if window > self.closed_window + self.max_ahead:
            raise Rejected("window_ahead", f"window {window}, open is {self.closed_window + 1}")
        return window, staleness

    # -- closing windows ----------------------------------------------------------------
    def expected(self, window: int) -> frozenset[str]:
        """Agents whose update window `window` waits for (cached; do not modify)."""
        cached = self._expected
        if cached is not None and cached[0] == window and cached[1] == self._roster \
                and cached[2] is self.agents:
            return cached[3]
        expected = frozenset(a for a, r in self.agents.items() if r.online
                             and r.first_window <= window and self._trains(a, window))
        # the dict itself is kept, not its id: a replaced one is never mistaken for it
        self._expected = (window, self._roster, self.agents, expected)
        return expected

    def _trains(self, agent: str, window: int) -> bool:
        """Told to train `window` (selection: never told is not expected), or not told to
        sit it out (FedPMT)."""
        if self.selector is not None:
            return self.selector.selected(agent, window)
        return self.assigner is None or self.assigner.first_layer(agent, window) != SITS_OUT

    def _past_deadline(self, window: int, now: float) -> bool:
        deadline = self.assigner.deadline if self.assigner is not None else 0.0
        return deadline > 0.0 and window in self.started_at \
            and now - self.started_at[window] >= deadline

    def _close_ready(self, now: float) -> list[Message]:
        out: list[Message] = []
        while not (self.max_versions and self.version >= self.max_versions):
            window = self.closed_window + 1
            got = self.pending.get(window)
            if not got:
                if not self._abandoned(window, now):
                    return out
                out.extend(self._publish(window, True, now))  # selection: nobody to wait for
                continue
            if window == 1 and len(got) < self.min_agents \
                    and not self.barrier_lifted(len(got), now):
                return out  # start barrier
            timed_out = (now - self.opened_at[window] >= self.window_timeout
                         or self._past_deadline(window, now)) and self._quorate(window, got)
            if not (timed_out or self._all_in(window, got)):
                return out
            out.extend(self._publish(window, timed_out, now))
        return out

    def _quorate(self, window: int, got: dict[str, Contribution]) -> bool:
        """May a window past its timeout close? With `window_quorum` Q, once it holds Q
        updates, or as many as it expects of agents online (fewer are left to come)."""
        if self.window_quorum <= 1:
            return True
        return len(got) >= min(self.window_quorum, len(self.expected(window) | got.keys()))

    def _abandoned(self, window: int, now: float) -> bool:
        """A decided window without an update that nobody selected for it will serve (see
        the module's docstring); only while some agent is online to take the next ones."""
        active = self.selector.active(window) if self.selector is not None else None
        if active is None or not any(r.online for r in self.agents.values()):
            return False
        if not any(self.agents[a].online for a in active if a in self.agents):
            return True
        started = self.started_at.get(window)
        return self.monitor is None and started is not None \
            and now - started >= self.window_timeout

    def selected_online(self, window: int) -> int | None:
        """How many agents selected for `window` are online (None: no selection there)."""
        active = self.selector.active(window) if self.selector is not None else None
        if active is None:
            return None
        return sum(1 for a in active if a in self.agents and self.agents[a].online)

    @property
    def quorum(self) -> int:
        """Reports the start barrier takes once start_timeout has passed."""
        return min(self.min_agents, self.start_quorum or self.min_agents // 2 + 1)

    def barrier_lifts_at(self) -> float | None:
        """When start_timeout lifts the start barrier (None: no timeout, or no hello yet)."""
        if self.start_timeout <= 0 or self.first_hello_at is None:
            return None
        return self.first_hello_at + self.start_timeout

    def barrier_lifted(self, count: int, now: float) -> bool:
        """Has start_timeout lifted the start barrier, `count` reports being in?"""
        lifts_at = self.barrier_lifts_at()
        return lifts_at is not None and now >= lifts_at and count >= self.quorum

    def barrier_count(self) -> int | None:
        """What the start barrier counts while it may hold the first window (None once it is
        averaged): its updates, or under FDA, where none come before the first trigger, the
        agents online."""
        if self.closed_window > 0:
            return None
        return len(self.expected(1)) if self.monitor is not None \
            else len(self.pending.get(1, {}))

    def _all_in(self, window: int, got: dict[str, Contribution]) -> bool:
        expected = self.expected(window)
        # counting first: the subset test runs about once per window, not per update
        return len(got) >= len(expected) and expected <= got.keys()

    def _publish(self, window: int, timed_out: bool, now: float) -> list[Message]:
        got = self.pending.pop(window, {})
        self.opened_at.pop(window, None)
        self.started_at.pop(window, None)
        self.started_at[window + 1] = now
        peak = float(np.max(np.abs(self.params), initial=0.0))
        refused = {a: OUT_OF_BOUNDS for a, c in got.items()
                   if self._out_of_bounds(c.decoded.dense, peak)}
        names = sorted(set(got) - set(refused))
        avg, union = self._average([got[a] for a in names])
        if self._out_of_bounds(avg, peak):  # defence in depth: sane inputs, sane average
            refused.update(dict.fromkeys(names, OUT_OF_BOUNDS))
            names, avg, union = [], np.zeros_like(self.params), None
        arrays, avg = self._downlink(window, avg, union)
        self.params += avg  # exactly what the avg carries: every copy stays equal
        self.last_avg = avg
        self.version += 1
        self.closed_window = window
        missing = sorted(self.expected(window) - set(got))
        for a in missing:
            self.agents[a].missed += 1
        told = self._next_assignments(window, names)
        self.results.append(WindowResult(window, self.version, names,
                                         {a: got[a].staleness for a in names}, missing,
                                         timed_out, sum(got[a].steps for a in names),
                                         self.assigner.current() if self.assigner else {},
                                         {a: c.seq for a, c in got.items()}, refused,
                                         self._selections()))
        avg_msg = Message(kind=Kind.AVG, run=self.run, sender=COORDINATOR_ID, seq=0,
                          base_version=self.version - 1,
                          fields={"window": window, "version": self.version,
                                  "contributors": names},
                          arrays=arrays)
        return [avg_msg, self.model_message(), *told]

    def _next_assignments(self, window: int, averaged: list[str]) -> list[Message]:
        """After `window`'s average: FedPMT's plan from window + 2 on, or the selection of
        the windows `ahead` (selection.py)."""
        if self.selector is not None:
            self.selector.averaged(window, averaged)
            online = sorted(a for a, r in self.agents.items() if r.online)
            told = self.selector.decide(window + self.selector.ahead, online, window)
        elif self.assigner is not None:
            told = self.assigner.reassign(window + 2)
        else:
            return []
        self._roster += 1  # assignments may have changed
        return told

    def _selections(self) -> list[list]:
        """The selections decided since the previous version (events.jsonl `selected`)."""
        if self.selector is None:
            return []
        log, self.selector.log = self.selector.log, []
        return [[w, list(agents)] for w, agents in log]

    def _downlink(self, window: int, avg: np.ndarray, union: np.ndarray | None
                  ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The AVG's arrays and the dense delta they carry. A compressed payload
        (quantized.py) sends the average compressed, its error kept for the next one."""
        downlink = getattr(self.decoder, "downlink", None)  # compressed; fedbuff's all-N
        if downlink is not None:
            return downlink(window, avg, union)
        return {"delta": self.decoder.compress(window, avg, union)}, avg

    def _average(self, kept: list[Contribution]) -> tuple[np.ndarray, np.ndarray | None]:
        """The configured rule over the kept contributions; a zero delta without any."""
        if not kept:
            return np.zeros_like(self.params), None
        weights = [c.samples * (1.0 + c.staleness) ** -self.staleness_exponent for c in kept]
        vectors = [c.decoded.dense for c in kept]
        coverages = [c.decoded.coverage for c in kept]
        if self.aggregator is None:
            return covered_mean(vectors, weights, coverages)
        union = None
        if any(c is not None for c in coverages):
            union = np.zeros(self.params.size, dtype=bool)
            for c in coverages:
                union |= True if c is None else c
        return self.aggregator(vectors, weights, coverages), union

    def _out_of_bounds(self, delta: np.ndarray, peak: float) -> bool:
        """Would params + delta put a parameter beyond +-max_param (or make it non-finite)?
        A parameter already beyond the bound (a model initialised so) may only come back.
        `peak`: max |params|, computed once per window.
        Why 1e6 by default: a trained network's parameters are O(1), and past 1e6 a float32
        step is 0.06 or more, so SGD's small updates vanish and the model can no longer
        learn; products of such parameters in a forward pass are still far from overflow."""
        # fast path, one pass: the triangle inequality bounds every coordinate at once
        if float(np.max(np.abs(delta), initial=0.0)) + peak <= self.max_param:
            return False
        with np.errstate(over="ignore", invalid="ignore"):
            new = np.abs(self.params + delta)  # overflow to inf is caught here too
            return not ((new <= self.max_param) | (new <= np.abs(self.params))).all()

    # -- checkpoints --------------------------------------------------------------------
    def state(self) -> dict:
        """Everything needed to resume, pending contributions and window clocks included:
        their senders' seqs are already recorded, so a resumed coordinator that lost them
        would refuse them as replays when the broker delivers them again. Kept too: a
        compressed downlink's residual (quantized.py), so a journal replay publishes the
        averages the devices already applied. Not kept: payload decoders' per-agent state
        (LBGM look-backs), the FDA monitor and FedPMT's assigner. The selection is kept, so
        a resumed coordinator goes on with the same rotation."""
        pending = [[w, a, c.seq, c.samples, c.staleness, c.steps,
                    np.ascontiguousarray(c.decoded.dense, "<f4").tobytes(),
                    None if c.decoded.coverage is None else c.decoded.coverage.tobytes()]
                   for w, got in sorted(self.pending.items()) for a, c in sorted(got.items())]
        state = {"version": self.version, "closed_window": self.closed_window,
                 "agents": {a: asdict(r) for a, r in self.agents.items()},
                 "pending": pending,
                 "opened_at": sorted(self.opened_at.items()),
                 "started_at": sorted(self.started_at.items())}
        downlink = compressor(self.decoder)
        if downlink is not None:
            state["downlink_residual"] = np.ascontiguousarray(downlink.residual,
                                                              "<f4").tobytes()
        if self.selector is not None:
            state["selection"] = self.selector.state()
        return state

    def load_state(self, state: dict, params: np.ndarray) -> None:
        self.params = np.array(params, dtype=np.float32)
        self.version, self.closed_window = state["version"], state["closed_window"]
        self.agents = {a: AgentRecord(**r) for a, r in state["agents"].items()}
        self.pending.clear()
        for w, a, seq, samples, staleness, steps, dense, coverage in state.get("pending", []):
            decoded = Decoded(np.frombuffer(dense, "<f4").astype(np.float32),
                              None if coverage is None
                              else np.frombuffer(coverage, np.bool_).copy())
            self.pending.setdefault(w, {})[a] = Contribution(decoded, samples, staleness,
                                                             steps, seq)
        self.opened_at = {w: t for w, t in state.get("opened_at", [])}
        self.started_at = {w: t for w, t in state.get("started_at", [])}
        residual = state.get("downlink_residual")
        downlink = compressor(self.decoder)
        if residual is not None and downlink is not None:
            held = np.frombuffer(residual, "<f4")
            if held.size != self.params.size:
                raise ValueError(f"checkpoint residual of {held.size} values, model "
                                 f"{self.params.size}")
            downlink.residual = held.astype(np.float32)
        if self.selector is not None and "selection" in state:
            self.selector.load_state(state["selection"])
