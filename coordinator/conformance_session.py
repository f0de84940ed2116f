"""fl-conformance's session: the checker as the coordinator of one run, against devices under
test started from a command template, over a real broker (PROTOCOL.md).

Every message a device sends passes `admit` (decodes with the codec, topic, sender, retain
flag, layout version, seq growing) and then the rules of its kind (`_on_hello`, `_on_update`,
`_on_state`); a rule broken raises Failed, whose text becomes the row's detail. The checker
averages what the devices send as a coordinator would (sample-weighted), so their next
updates show whether they applied each average (`base_version`, PROTOCOL.md section 14).
"""

from __future__ import annotations

import queue
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from paho.mqtt.subscribeoptions import SubscribeOptions

from fleetfl.coordinator.conformance_wire import (
    avg_message,
    encode_as,
    finite_nonnegative,
    layout_of,
)
from fleetfl.shared.core.messages import COORDINATOR_ID, Kind, Message
from fleetfl.shared.core.pmt import SITS_OUT
from fleetfl.shared.core.selection import History, in_force, told
from fleetfl.shared.net.broker_url import parse_broker_url
from fleetfl.shared.net.transport import CONNECTED, MqttLink
from fleetfl.shared.wire import chunking, layout
from fleetfl.shared.wire.codec import CodecError, DecodeContext, decode
from fleetfl.shared.wire.topics import Topics

MAX_SAMPLES = 10**7  # the coordinator's default bound on a hello's samples (section 16)
UPLINK_KINDS = {Kind.HELLO, Kind.OFFLINE, Kind.REFUSED, Kind.UPDATE, Kind.FDA_STATE,
                Kind.METRICS}


class Failed(Exception):
    """A rule the device broke, or a wait that ran out: the row's detail."""


@dataclass
class Agent:
    """What the checker knows of one device id."""

    id: str
    hello: Message | None = None
    first_window: int = 0
    join_version: int = 0
    last_seq: int = -1
    online: bool = False
    released: bool = False  # killed or stopped by the checker: may exit
    hellos: int = 0
    first_hello_seq: int | None = None  # of the running process
    offlines: list[Message] = field(default_factory=list)


class Device:
    """One device process, its output in a log file."""

    def __init__(self, command: str, log: Path) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(shlex.split(command), stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT)

    def exited(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def tail(self, lines: int = 3) -> str:
        text = self.log.read_text(errors="replace").strip().splitlines()
        return " | ".join(line[-160:] for line in text[-lines:])


class _Link(MqttLink):
    # the checker sees the publisher's retain flag on every message (Retain As Published)
    def _options(self, topic: str) -> SubscribeOptions:
        return SubscribeOptions(qos=1, retainAsPublished=True)


@dataclass
class Plan:
    """The run the checker coordinates: job, model, version and window to start from."""

    run: str
    job: dict
    params: np.ndarray
    protocol: int
    metrics: tuple[str, ...] = ()  # the task's metric names, besides loss
    version: int = 2  # != next_window - 1: a device must take versions from the messages
    next_window: int = 4
    timeout: float = 20.0  # for each awaited message once the devices run
    join_timeout: float = 60.0  # a device's start (imports, data) and first hello


class Session:
    def __init__(self, broker_url: str, template: str, plan: Plan, workdir: Path) -> None:
        self.plan, self.template, self.workdir = plan, template, workdir
        self.broker_url = broker_url
        self.run = plan.run
        self.topics = Topics(self.run)
        self.params = plan.params.astype(np.float32).copy()
        self.version, self.next_window = plan.version, plan.next_window
        self.version_of: dict[int, int] = {}  # window -> the version its average made
        self.ctx = DecodeContext(self.run, model_size=self.params.size)
        self.agents: dict[str, Agent] = {}
        self.devices: dict[str, Device] = {}
        self.pending: dict[int, dict[str, Message]] = {}  # window -> agent -> update
        self.states: dict[int, dict[str, int]] = {}  # FDA: window -> agent -> last step
        self.synced: set[int] = set()
        self.markers: set[int] = set()  # versions of bad messages: never a real base
        self.assigned: dict[str, History] = {}  # participant selection: what each was told
        self.on_hello: Callable[[Message], None] | None = None  # e.g. answer with ASSIGNs
        self.connections = 0
        self.seq = time.time_ns() // 1000
        self.inbox: queue.Queue = queue.Queue()
        self.link = _Link(parse_broker_url(broker_url), f"fl-{self.run}-{COORDINATOR_ID}",
                          self.inbox, max_packet_bytes=0)
        self.link.subscribe(self.topics.up_all)
        self.link.subscribe(self.topics.status_all)
        self.link.connect(timeout=10.0)

    # -- the job's timing -------------------------------------------------------------------
    @property
    def algo(self) -> str:
        return self.plan.job["algo"]

    def expected_base(self, agent: Agent, window: int) -> int:
        """The base_version of an agent's message for `window`: the version of the last
        average it must have applied (delayed timing: the one due D steps after its send)."""
        period, delay = (self.plan.job["period"], self.plan.job["delay"]) \
            if self.algo == "dga" else (1, 0)
        last = window - -(-(delay + 1) // period)  # window - ceil((D + 1) / K)
        return agent.join_version if last < agent.first_window else self.version_of[last]

    # -- sending ----------------------------------------------------------------------------
    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def publish(self, msg: Message) -> None:
        topic, retain = self.topics.for_outgoing(msg)
        self.link.publish(topic, encode_as(msg, self.plan.protocol), retain=retain)

    def publish_raw(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.link.client.publish(topic, payload, qos=1, retain=retain)

    def model_message(self, job: dict | None = None) -> Message:
        return Message(Kind.MODEL, self.run, COORDINATOR_ID, self.next_seq(), self.version,
                       {"version": self.version, "next_window": self.next_window,
                        "job": job or self.plan.job}, {"params": self.params})

    def publish_model(self, job: dict | None = None) -> None:
        self.publish(self.model_message(job))

    def publish_avg(self, window: int, updates: dict[str, Message], variant: str = "") -> int:
        """Average `updates` (sample-weighted), publish it in `variant` (large_header,
        unknown_key, chunked) and the model after it; the version it made."""
        weights = np.array([u["samples"] for u in updates.values()], np.float64)
        deltas = np.stack([u["delta"].astype(np.float64) for u in updates.values()])
        delta = (weights @ deltas / weights.sum()).astype(np.float32)
        self.version += 1
        self.version_of[window], self.next_window = self.version, window + 1
        self.params += delta
        contributors = sorted(updates)
        if variant == "large_header":  # ~130 KB of ids: a device MUST read 8 MiB headers
            contributors += [f"{'x' * 60}{i:04d}" for i in range(2000)]
        msg = avg_message(self.run, self.next_seq(), window, self.version, delta, contributors)
        payload = encode_as(msg, self.plan.protocol)
        if variant == "unknown_key":  # readers ignore unknown top-level keys (section 19)
            payload = layout.edit_header(payload, lambda h: h.__setitem__("x_later", [1, "a"]))
        if variant == "chunked":
            for topic, chunk in chunking.split(self.topics.avg, payload, False, 4096):
                self.publish_raw(topic, chunk)
        else:
            self.publish_raw(self.topics.avg, payload)
        self.publish_model()
        return self.version

    def sync(self, window: int) -> None:
        self.publish(Message(Kind.SYNC, self.run, COORDINATOR_ID, self.next_seq(), self.version,
                             {"version": self.version, "window": window, "estimate": 1.5}))
        self.synced.add(window)

    def assign(self, window: int, first_layer: dict[str, int]) -> None:
        """Tell agents what they train from `window` on: 0 all, SITS_OUT nothing (14.5)."""
        self.publish(Message(Kind.ASSIGN, self.run, COORDINATOR_ID, self.next_seq(), self.version,
                             {"window": window, "first_layer": first_layer, "deadline": 0.0}))
        for agent, first in first_layer.items():
            self.assigned[agent] = told(self.assigned.get(agent, []), window, first)

    def sits_out(self, agent: str, window: int) -> bool:
        return in_force(self.assigned.get(agent, []), window) == SITS_OUT

    def stop_run(self, reason: str) -> None:
        self.publish(Message(Kind.STOP, self.run, COORDINATOR_ID, self.next_seq(), self.version,
                             {"reason": reason}))

    # -- devices ----------------------------------------------------------------------------
    def start_device(self, agent_id: str) -> Device:
        state = self.workdir / f"state-{agent_id}"
        state.mkdir(parents=True, exist_ok=True)
        try:
            command = self.template.format(broker=self.broker_url, run=self.run, id=agent_id,
                                           state=state)
        except (KeyError, IndexError) as exc:
            raise Failed(f"--device: unknown placeholder {exc} (use {{broker}}, {{run}}, "
                         "{id}, {state})") from None
        try:
            device = Device(command, self.workdir / f"{self.run}-{agent_id}.log")
        except (OSError, ValueError) as exc:  # no such program, an unbalanced quote
            raise Failed(f"cannot start the device ({command}): {exc}") from None
        self.devices[agent_id] = device
        agent = self.agents.setdefault(agent_id, Agent(agent_id))
        agent.released, agent.first_hello_seq = False, None
        return device

    def _check_alive(self) -> None:
        for agent_id, device in self.devices.items():
            code = device.exited()
            if code is not None and not self.agents[agent_id].released:
                raise Failed(f"{agent_id} exited with code {code}: {device.tail()}")

    def released(self, agent_id: str) -> None:
        """This device may exit now (killed, stopped): no failure when it does."""
        self.agents[agent_id].released = True

    # -- receiving --------------------------------------------------------------------------
    def receive(self, deadline: float) -> tuple[str, Message, bool] | None:
        """The next device message, admitted (topic, message, retained); None at `deadline`."""
        while (left := deadline - time.monotonic()) > 0:
            try:
                item = self.inbox.get(timeout=min(left, 0.2))
            except queue.Empty:
                self._check_alive()
                continue
            if item.topic == CONNECTED:
                self.connections += 1
                continue
            if item.payload:
                return item.topic, self.admit(item.topic, item.payload, item.retain), item.retain
        return None

    def admit(self, topic: str, payload: bytes, retained: bool) -> Message:
        """The device message in `payload`, after the rules every message follows."""
        sender = self.topics.sender_of(topic)
        if sender not in self.agents:
            raise Failed(f"a message on {topic}, which is no device's topic under test")
        try:
            msg = decode(payload, self.ctx)
        except CodecError as exc:
            raise Failed(f"{sender} sent a message the codec refuses on {topic}: {exc.reason} "
                         f"({exc.detail})") from None
        want_topic, want_retain = self.topics.for_outgoing(msg) if msg.kind in UPLINK_KINDS \
            else (None, None)
        if msg.sender != sender or want_topic != topic:
            raise Failed(f"{msg.kind} from {msg.sender!r} on {topic}: the sender must be the "
                         "topic's id and each kind has its topic (section 7.1)")
        if retained != want_retain:
            raise Failed(f"{sender}'s {msg.kind} was published with retain={retained} "
                         "(status messages are retained, up/ ones never: section 3.3)")
        version = layout_of(payload)
        # the will alone is in the device's newest version (checked by the last-will step)
        if msg.kind is not Kind.OFFLINE and version != self.plan.protocol:
            raise Failed(f"{sender}'s {msg.kind} is in protocol {version}; the model it joined "
                         f"or refused is {self.plan.protocol} (section 19)")
        agent = self.agents[sender]
        if msg.kind is not Kind.OFFLINE:
            again = msg.kind is Kind.HELLO and retained and agent.hello is not None \
                and msg.seq == agent.hello.seq
            if msg.seq <= agent.last_seq and not again:
                raise Failed(f"{sender}'s {msg.kind} has seq {msg.seq}, not above its previous "
                             f"{agent.last_seq} (one growing counter: section 10)")
            agent.last_seq = max(agent.last_seq, msg.seq)
        return msg

    def await_reconnect(self, timeout: float) -> None:
        """Wait until our link is connected again (device messages are handled meanwhile)."""
        before, deadline = self.connections, time.monotonic() + timeout
        while self.connections == before:
            if time.monotonic() > deadline:
                raise Failed(f"the checker did not reconnect within {timeout:.0f} s")
            received = self.receive(min(deadline, time.monotonic() + 0.2))
            if received is not None:
                self.dispatch(received[1], self.next_window)

    def await_kind(self, kind: Kind, agent_id: str, timeout: float) -> tuple[Message, bool]:
        """The next `kind` from `agent_id`, others handled as they come."""
        deadline = time.monotonic() + timeout
        while (got := self.receive(deadline)) is not None:
            _, msg, retained = got
            if msg.kind is kind and msg.sender == agent_id:
                if kind is Kind.HELLO:
                    self._on_hello(msg)
                return msg, retained
            self.dispatch(msg, self.next_window)
        raise Failed(f"no {kind} from {agent_id} within {timeout:.0f} s")

    def await_offline(self, agent_ids: list[str], timeout: float) -> dict[str, Message]:
        """The next `offline` of each of `agent_ids` (in any order), others handled."""
        known = {a: len(self.agents[a].offlines) for a in agent_ids}
        deadline = time.monotonic() + timeout
        while True:
            new = {a: self.agents[a].offlines[n] for a, n in known.items()
                   if len(self.agents[a].offlines) > n}
            if len(new) == len(known):
                return new
            received = self.receive(deadline)
            if received is None:
                missing = ", ".join(sorted(set(known) - set(new)))
                raise Failed(f"no offline from {missing} within {timeout:.0f} s")
            self.dispatch(received[1], self.next_window)

    def linger(self, seconds: float) -> None:
        """Handle what the devices send for `seconds`: the rules of its kind fail whatever
        may not come now (an update for a window its sender sits out)."""
        deadline = time.monotonic() + seconds
        while (received := self.receive(deadline)) is not None:
            self.dispatch(received[1], self.next_window)

    def dispatch(self, msg: Message, window: int) -> None:
        agent = self.agents[msg.sender]
        if msg.kind is Kind.HELLO:
            self._on_hello(msg)
        elif msg.kind is Kind.UPDATE:
            self._on_update(agent, msg, window)
        elif msg.kind is Kind.FDA_STATE:
            self._on_state(agent, msg, window)
        elif msg.kind is Kind.OFFLINE:
            agent.offlines.append(msg)
            agent.online = False
        elif msg.kind is Kind.REFUSED:
            raise Failed(f"{msg.sender} refused the job: {msg['reason']}")

    # -- the rules of each kind -------------------------------------------------------------
    def _on_hello(self, msg: Message) -> None:
        agent = self.agents[msg.sender]
        samples, valid = msg["samples"], msg.fields.get("validation_samples", 0)
        if not (1 <= samples <= MAX_SAMPLES and 0 <= valid <= MAX_SAMPLES):
            raise Failed(f"{msg.sender}'s hello claims {samples} training and {valid} "
                         f"validation samples (1 .. {MAX_SAMPLES:,} and 0 .. {MAX_SAMPLES:,})")
        protocols = msg.fields.get("capabilities", {}).get("protocols", [1])
        if not isinstance(protocols, list) or self.plan.protocol not in protocols:
            raise Failed(f"{msg.sender}'s hello lists protocols {protocols!r} without the "
                         f"run's {self.plan.protocol} (section 19)")
        point = (msg.base_version, msg["first_window"])
        earlier = (agent.hello.base_version, agent.hello["first_window"]) if agent.hello else None
        if point != (self.version, self.next_window) and point != earlier:
            raise Failed(f"{msg.sender}'s hello has base_version {point[0]}, first_window "
                         f"{point[1]}: the model says version {self.version}, next_window "
                         f"{self.next_window} (section 13.1)")
        if point == (self.version, self.next_window):  # a join or a resynchronisation
            agent.first_window, agent.join_version = msg["first_window"], msg.base_version
            for updates in self.pending.values():
                updates.pop(msg.sender, None)
        agent.hello, agent.online = msg, True
        agent.hellos += 1
        if agent.first_hello_seq is None:
            agent.first_hello_seq = msg.seq
        if self.on_hello is not None:
            self.on_hello(msg)

    def _on_update(self, agent: Agent, msg: Message, window: int) -> None:
        who, w = agent.id, msg["window"]
        job = self.plan.job
        ahead = job["delay"] // job["period"] if self.algo == "dga" else 0
        if agent.hello is None:
            raise Failed(f"{who} sent an update before its hello")
        if self.sits_out(who, w):  # checked first: it may come after the window closed
            raise Failed(f"{who} sent an update for window {w}, which an assign told it to "
                         "sit out (-1: section 14.5; a coordinator refuses it, not_assigned)")
        if not (max(window, agent.first_window) <= w <= window + ahead):
            raise Failed(f"{who} sent an update for window {w}; the open window is {window}")
        if who in self.pending.get(w, {}):
            raise Failed(f"{who} sent two updates for window {w}")
        base = self.expected_base(agent, w)
        if msg.base_version != base:
            why = " (the version of a bad message: it acted on it)" \
                if msg.base_version in self.markers else ""
            raise Failed(f"{who}'s update for window {w} has base_version {msg.base_version}, "
                         f"expected {base}: the version of the last average it must have "
                         f"applied (section 14){why}")
        steps = {"fedavg": job["local_steps"], "dga": job["period"]}.get(self.algo)
        if not 1 <= msg["samples"] <= agent.hello["samples"]:
            raise Failed(f"{who}'s update claims {msg['samples']} samples; its hello "
                         f"{agent.hello['samples']}")
        if (steps is not None and msg["steps"] != steps) or msg["steps"] < 1:
            raise Failed(f"{who}'s update has steps {msg['steps']}, the {self.algo} timing "
                         f"sends after {steps or 'at least 1'} (section 14)")
        if self.algo == "fda" and msg["steps"] < self.states.get(w, {}).get(who, 0):
            raise Failed(f"{who}'s update has steps {msg['steps']}, fewer than its last state")
        if {"scalars", "first_layer"} & set(msg.fields):
            raise Failed(f"{who}'s update has payload fields of another payload (dense job)")
        if "step_seconds" in msg.fields and not finite_nonnegative(msg["step_seconds"]):
            raise Failed(f"{who}'s step_seconds {msg['step_seconds']!r} is not finite, >= 0")
        if msg["delta"].size != self.params.size:
            raise Failed(f"{who}'s dense delta has {msg['delta'].size} values, the model "
                         f"{self.params.size}")
        self.pending.setdefault(w, {})[who] = msg

    def _on_state(self, agent: Agent, msg: Message, window: int) -> None:
        who = agent.id
        if self.algo != "fda":
            raise Failed(f"{who} sent an fda_state in a {self.algo} run")
        if self.sits_out(who, window):
            raise Failed(f"{who} sent an fda_state in window {window}, which an assign told "
                         "it to sit out (-1: section 14.5)")
        if who in self.pending.get(window, {}):
            raise Failed(f"{who} sent an fda_state while waiting for an average (14.3)")
        base = self.expected_base(agent, window)
        step, rtc = msg["step"], self.plan.job["rtc_steps"]
        if msg.base_version != base or step < 1 or step % rtc:
            raise Failed(f"{who}'s fda_state has base_version {msg.base_version} (expected "
                         f"{base}), step {step} (a multiple of rtc_steps {rtc})")
        if not finite_nonnegative(msg["drift_sq"]) or "projection" in msg.fields \
                or msg.arrays:
            raise Failed(f"{who}'s fda_state (naive) has drift_sq {msg['drift_sq']!r}, fields "
                         f"{sorted(msg.fields)}, arrays {sorted(msg.arrays)}")
        self.states.setdefault(window, {})[who] = step

    # -- windows ----------------------------------------------------------------------------
    def expected(self, window: int) -> set[str]:
        return {a.id for a in self.agents.values() if a.online and a.hello is not None
                and a.first_window <= window and not self.sits_out(a.id, window)}

    def collect(self, window: int, timeout: float | None = None) -> dict[str, Message]:
        """Every expected device's update for `window` (FDA: sync once each reported twice)."""
        deadline = time.monotonic() + (timeout or self.plan.timeout)
        while True:
            expected, got = self.expected(window), self.pending.get(window, {})
            if expected and expected <= set(got):
                return {a: got[a] for a in sorted(expected)}
            states = self.states.get(window, {})
            if self.algo == "fda" and expected and window not in self.synced \
                    and all(states.get(a, 0) >= 2 * self.plan.job["rtc_steps"] for a in expected):
                self.sync(window)
            # nobody online is waited out too: after a broker restart the devices' wills can
            # be read before the hellos they send once reconnected (a CI run saw it)
            received = self.receive(deadline)
            if received is None:
                if not expected:
                    raise Failed(f"no device is online for window {window} within "
                                 f"{timeout or self.plan.timeout:.0f} s")
                missing = ", ".join(sorted(expected - set(got)))
                raise Failed(f"no update for window {window} from {missing} within "
                             f"{timeout or self.plan.timeout:.0f} s")
            self.dispatch(received[1], window)

    def window(self, variant: str = "") -> int:
        """Collect the open window, average it; the version made."""
        w = self.next_window
        return self.publish_avg(w, self.collect(w), variant)

    def quiet(self, seconds: float) -> None:
        """Nothing may come from the devices for `seconds` (they wait for an average)."""
        received = self.receive(time.monotonic() + seconds)
        if received is not None:
            _, msg, _ = received
            extra = f" for window {msg['window']}" if msg.kind is Kind.UPDATE else ""
            raise Failed(f"{msg.sender} sent {msg.kind}{extra} while it had to wait for the "
                         f"average of window {self.next_window}")

    def close(self) -> None:
        for device in self.devices.values():
            device.kill()
        for topic in [self.topics.model, *(self.topics.status(a) for a in self.agents)]:
            self.publish_raw(topic, b"", retain=True)  # leave no retained message behind
        self.link.close()
