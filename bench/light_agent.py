"""Lightweight FedAvg agents for the load bench: many real MQTT clients in one thread.

Each simulated agent is one paho client (its own TCP connection, client id `fl-<run>-<agent>`,
retained OFFLINE will) and speaks the real protocol through the real codec and the real device
side of the job's algorithm (`registry.make_device`: FedAvgDevice for fedavg; the core needs
numpy only), following agent/runner.py:

- subscribe down/avg and down/ctl, then down/model; the retained model gives the version, the
  next window and the model size; unsubscribe down/model;
- say hello (retained, on status/<agent>) with `samples` and `first_window` = next window;
- per window: "train" (a timer: the simulated compute time, then the model moves by a small
  random delta; no torch) and hand the device its H steps: the UPDATE it returns is published;
- every AVG goes to the device: it applies the average of its window (discarding unsent work
  if it was still computing), ignores older ones, and asks for a resynchronisation from the
  retained model when one was missed (then the agent says hello again).

Sequence numbers start at time_ns() // 1000 and grow by one per message, like the real agent.
No torch is imported; a process with 250 agents uses a few tens of MiB.

All clients of a process are driven by one selector loop through paho's external-loop API
(`loop_read`, `loop_write`, `loop_misc` and the socket callbacks), so a process holds hundreds
of connections with one thread and no locks.

Clocks: `pub_wall` (time.time(), CLOCK_REALTIME) and `pub_mono` (time.monotonic(),
CLOCK_MONOTONIC, system-wide on Linux) are read just before `client.publish()` of an update;
`avg_mono` when paho hands this agent the AVG of that window (in the read callback).

Run by bench/load_agents.py; writes one JSON file (per-update records and counters) at the end.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import resource
import selectors
import socket
import sys
import time
from dataclasses import dataclass

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleetfl.shared.core.base import DeviceSide
from fleetfl.shared.core.job import JobConfig, job_from_dict
from fleetfl.shared.core.layers import Layer, LayerTable
from fleetfl.shared.core.messages import COORDINATOR_ID, Kind, Message
from fleetfl.shared.core.registry import make_device
from fleetfl.shared.net.broker_url import parse_broker_url
from fleetfl.shared.wire.codec import (
    CodecError,
    decode,
    device_context,
    encode,
)
from fleetfl.shared.wire.topics import Topics

SESSION_EXPIRY_S = 300  # as shared/net/transport.py
JOINING, COMPUTING, WAITING, DONE = range(4)
MISC_EVERY_S = 1.0  # paho keepalive bookkeeping for every client
CONNECT_ATTEMPTS = 20  # TCP connects that time out (5 s each) before a sender gives up


@dataclass
class Options:
    broker: str
    run: str
    first: int  # index of this process's first agent (ids la0000 ...)
    count: int
    windows: int  # last window an agent sends an update for
    compute: float  # mean simulated compute seconds per window (uniform 0.5x .. 1.5x)
    straggler_frac: float  # share of (agent, window) pairs that are stragglers
    straggler_lo: float  # straggler compute seconds, uniform in [lo, hi]
    straggler_hi: float
    scale: float  # std dev of the random deltas
    seed: int
    timeout: float  # give up after this many seconds
    block_timeout: float  # waiting this long for an average -> resynchronise (agent: 120 s)
    out: str


class LightAgent:
    __slots__ = ("index", "id", "client", "samples", "seq", "state", "device", "params",
                 "epoch", "pending", "waiting_since", "subscribed_model", "hello", "connections")

    def __init__(self, index: int, samples: int) -> None:
        self.index = index
        self.id = f"la{index:04d}"
        self.client: mqtt.Client | None = None
        self.samples = samples
        self.seq = time.time_ns() // 1000
        self.state = JOINING
        self.device: DeviceSide | None = None  # the algorithm's real device side
        self.params: np.ndarray | None = None  # this agent's model
        self.epoch = 0  # bumped on every state reset: stale timers are ignored
        self.pending: list | None = None  # the record of the update awaiting its AVG
        self.waiting_since = 0.0
        self.subscribed_model = False
        self.hello: Message | None = None
        self.connections = 0

    def stamp(self, msg: Message) -> Message:
        self.seq += 1
        msg.seq = self.seq
        return msg


class SenderPool:
    def __init__(self, opts: Options) -> None:
        self.o = opts
        self.url = parse_broker_url(opts.broker)
        self.topics = Topics(opts.run)
        self.ctx = device_context(opts.run)
        self._last_payload: bytes | None = None  # _decode's one-message cache
        self._last_msg: Message | None = None
        self.model_size: int | None = None
        self.job: JobConfig | None = None
        self.layers: LayerTable | None = None
        self.rng = random.Random(opts.seed * 1_000_003 + opts.first)
        self.sel = selectors.DefaultSelector()
        self.timers: list[tuple[float, int, int, int, str]] = []  # due, n, agent, epoch, what
        self._n = 0
        self.pool: list[np.ndarray] = []
        self.agents = [LightAgent(i, 1 + i % 7) for i in range(opts.first, opts.first + opts.count)]
        self.by_client: dict[int, LightAgent] = {}
        self.records: list[list] = []  # agent, window, base, seq, pub_wall, pub_mono,
        #                                ack_mono, avg_mono, included (1/0/-1 unknown)
        self.by_mid: dict[tuple[int, int], list] = {}
        self.c = dict.fromkeys(
            ("connects", "disconnects", "reconnects", "hellos", "updates", "acked", "avgs",
             "avg_dups", "discarded", "resyncs", "block_timeouts", "decode_errors", "stops",
             "offline", "connect_retries"), 0)
        self.done = 0
        self.closing = False

    # -- timers ---------------------------------------------------------------------------
    def at(self, delay: float, agent: LightAgent, what: str) -> None:
        self._n += 1
        heapq.heappush(self.timers, (time.monotonic() + delay, self._n, agent.index - self.o.first,
                                     agent.epoch, what))

    def compute_time(self) -> float:
        if self.rng.random() < self.o.straggler_frac:
            return self.rng.uniform(self.o.straggler_lo, self.o.straggler_hi)
        return self.o.compute * self.rng.uniform(0.5, 1.5)

    # -- paho callbacks (all on this thread) ----------------------------------------------
    def _on_socket_open(self, client, userdata, sock) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sel.register(sock, selectors.EVENT_READ, client)

    def _on_socket_close(self, client, userdata, sock) -> None:
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _on_register_write(self, client, userdata, sock) -> None:
        try:
            self.sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)
        except (KeyError, ValueError):
            pass

    def _on_unregister_write(self, client, userdata, sock) -> None:
        try:
            self.sel.modify(sock, selectors.EVENT_READ, client)
        except (KeyError, ValueError):
            pass

    def _on_connect(self, client, agent: LightAgent, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            print(f"{agent.id}: connection refused: {reason_code}", file=sys.stderr)
            return
        self.c["connects"] += 1
        agent.connections += 1
        client.subscribe([(self.topics.avg, 1), (self.topics.ctl, 1)])
        if agent.state == JOINING:
            self._resubscribe_model(agent)
        elif agent.connections > 1 and agent.hello is not None and agent.state != DONE:
            # as agent/runner.py after a reconnect: hello again; if waiting, catch up
            self._publish(agent, agent.hello)
            if agent.state == WAITING:
                self._resync(agent)

    def _on_disconnect(self, client, agent: LightAgent, flags, reason_code, properties) -> None:
        if self.closing:
            return
        self.c["disconnects"] += 1
        self.at(1.0 + self.rng.random(), agent, "reconnect")

    def _on_publish(self, client, agent: LightAgent, mid, reason_code, properties) -> None:
        rec = self.by_mid.pop((agent.index, mid), None)
        if rec is not None:
            rec[6] = time.monotonic()
            self.c["acked"] += 1

    def _on_message(self, client, agent: LightAgent, message) -> None:
        arrived = time.monotonic()
        if not message.payload:
            return
        try:
            msg = self._decode(message.payload)
        except CodecError as exc:
            self.c["decode_errors"] += 1
            print(f"{agent.id}: undecodable message on {message.topic}: {exc}", file=sys.stderr)
            return
        if msg.sender != COORDINATOR_ID:
            self.c["decode_errors"] += 1
            return
        if msg.kind is Kind.MODEL:
            self._on_model(agent, msg)
        elif msg.kind is Kind.AVG:
            self._on_avg(agent, msg, arrived)
        elif msg.kind is Kind.STOP:
            self.c["stops"] += 1
            self._finish(agent)

    def _decode(self, payload: bytes) -> Message:
        """The broker hands the same AVG to each of our clients: decode it once per process
        (a device decodes only its own copy; decoding a 10,000-contributor list once per
        simulated agent made the senders, not the coordinator, the bottleneck), with the
        contributors as a set for the membership tests."""
        if payload == self._last_payload and self._last_msg is not None:
            return self._last_msg
        msg = decode(payload, self.ctx)
        if msg.kind is Kind.AVG:
            msg.fields["contributors"] = frozenset(msg.fields["contributors"])
        self._last_payload, self._last_msg = payload, msg
        return msg

    # -- protocol -------------------------------------------------------------------------
    def _resubscribe_model(self, agent: LightAgent) -> None:
        agent.subscribed_model = True
        agent.client.subscribe(self.topics.model, qos=1)

    def _on_model(self, agent: LightAgent, msg: Message) -> None:
        if not agent.subscribed_model:
            return
        agent.subscribed_model = False
        agent.client.unsubscribe(self.topics.model)  # only joiners need full models
        if self.model_size is None:
            self.model_size = int(msg["params"].size)
            self.ctx = device_context(self.o.run, self.model_size)
            self.job = job_from_dict(msg["job"])
            self.layers = LayerTable((Layer("flat", 0, (self.model_size,)),))
            rng = np.random.default_rng(self.o.seed + self.o.first)
            self.pool = [(rng.standard_normal(self.model_size) * self.o.scale).astype(np.float32)
                         for _ in range(16)]
        if agent.state == DONE:
            return
        agent.epoch += 1
        agent.params = np.array(msg["params"], dtype=np.float32)
        agent.device = make_device(self.job, self.o.run, agent.id, agent.samples, self.layers)
        agent.device.start(msg["version"], msg["next_window"], agent.params)
        agent.hello = Message(Kind.HELLO, self.o.run, agent.id, 0, msg["version"],
                              {"samples": agent.samples, "first_window": msg["next_window"],
                               "capabilities": {"light": True}})
        self._publish(agent, agent.hello)
        self.c["hellos"] += 1
        self._start_window(agent)

    def _start_window(self, agent: LightAgent) -> None:
        agent.pending = None
        if agent.device.window > self.o.windows:
            self._finish(agent)
            return
        agent.state = COMPUTING
        self.at(self.compute_time(), agent, "send")

    def _send(self, agent: LightAgent) -> None:
        device = agent.device
        agent.params += self.pool[(agent.index * 7 + device.window) % len(self.pool)]
        out: list[Message] = []
        while not out and not device.blocked:  # the job's H steps, as the trainer reports
            out = device.after_step(agent.params)
        msg = agent.stamp(out[0])
        payload = encode(msg)
        rec = [agent.index, msg["window"], msg.base_version, msg.seq, time.time(),
               time.monotonic(), None, None, -1]
        info = agent.client.publish(self.topics.up(agent.id), payload, qos=1)
        self.by_mid[(agent.index, info.mid)] = rec
        self.records.append(rec)
        self.c["updates"] += 1
        agent.pending = rec
        agent.state = WAITING
        agent.waiting_since = time.monotonic()
        self.at(self.o.block_timeout, agent, "block")

    def _on_avg(self, agent: LightAgent, msg: Message, arrived: float) -> None:
        self.c["avgs"] += 1
        if agent.state in (JOINING, DONE):
            return
        window = agent.device.window
        agent.device.on_message(msg, agent.params)
        if agent.device.needs_resync:  # we missed an average: our base is gone
            self._resync(agent)
            return
        if agent.device.window == window:  # a QoS 1 duplicate or from before we joined
            self.c["avg_dups"] += 1
            return
        if agent.state == WAITING and agent.pending is not None:
            agent.pending[7] = arrived
            agent.pending[8] = 1 if agent.id in msg["contributors"] else 0
        elif agent.state == COMPUTING:
            self.c["discarded"] += 1  # unsent work of a round we missed, as in FedAvg
        agent.epoch += 1
        self._start_window(agent)

    def _resync(self, agent: LightAgent) -> None:
        self.c["resyncs"] += 1
        agent.epoch += 1
        agent.state = JOINING
        agent.pending = None
        self._resubscribe_model(agent)

    def _publish(self, agent: LightAgent, msg: Message) -> None:
        topic, retain = self.topics.for_outgoing(agent.stamp(msg))
        agent.client.publish(topic, encode(msg), qos=1, retain=retain)

    def _finish(self, agent: LightAgent) -> None:
        if agent.state != DONE:
            agent.state = DONE
            agent.epoch += 1
            self.done += 1

    def _timer(self, agent: LightAgent, what: str) -> None:
        if what == "send" and agent.state == COMPUTING:
            self._send(agent)
        elif what == "block" and agent.state == WAITING:
            self.c["block_timeouts"] += 1
            self._resync(agent)
        elif what == "reconnect" and agent.client is not None and not self.closing:
            try:
                agent.client.reconnect()
                self.c["reconnects"] += 1
            except OSError:
                self.at(1.0, agent, "reconnect")

    # -- driving ----------------------------------------------------------------------------
    def _client(self, agent: LightAgent) -> mqtt.Client:
        c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                        client_id=f"fl-{self.o.run}-{agent.id}", protocol=mqtt.MQTTv5,
                        userdata=agent)
        offline = agent.stamp(Message(Kind.OFFLINE, self.o.run, agent.id, 0, 0))
        c.will_set(self.topics.status(agent.id), encode(offline), qos=1, retain=True)
        c.connect_timeout = 30.0  # a broker taking 20,000 connections is slow to accept
        c.on_socket_open = self._on_socket_open
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._on_register_write
        c.on_socket_unregister_write = self._on_unregister_write
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        return c

    def _poll(self, timeout: float) -> None:
        for key, mask in self.sel.select(timeout):
            client = key.data
            if mask & selectors.EVENT_READ:
                client.loop_read()
            if mask & selectors.EVENT_WRITE:
                client.loop_write()

    def run(self) -> int:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        started = last_misc = time.monotonic()
        deadline = started + self.o.timeout
        for agent in self.agents:
            agent.client = self._client(agent)
            for attempt in range(CONNECT_ATTEMPTS):  # a busy host's broker may be slow to
                try:  # accept; a real agent retries forever
                    agent.client.connect(self.url.host, self.url.port, keepalive=60,
                                         clean_start=mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                                         properties=props)
                    break
                except OSError:
                    self.c["connect_retries"] += 1
                    if attempt == CONNECT_ATTEMPTS - 1:
                        raise
                    self._poll(0.5)
            self._poll(0)  # let the broker's CONNACKs in as we go
            if time.monotonic() - last_misc >= MISC_EVERY_S:  # keepalive of those connected:
                last_misc = time.monotonic()  # connecting 20,000 takes minutes, more than
                for connected in self.agents[:agent.index - self.o.first]:  # 1.5 keepalives
                    connected.client.loop_misc()
        print(f"connected {self.o.count} clients in {time.monotonic() - started:.1f} s",
              file=sys.stderr, flush=True)
        while self.done < len(self.agents) and time.monotonic() < deadline:
            now = time.monotonic()
            wait = min(0.5, max(0.0, self.timers[0][0] - now)) if self.timers else 0.5
            self._poll(wait)
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                _, _, i, epoch, what = heapq.heappop(self.timers)
                agent = self.agents[i]
                if epoch == agent.epoch or what == "reconnect":
                    self._timer(agent, what)
            if now - last_misc >= MISC_EVERY_S:
                last_misc = now
                for agent in self.agents:
                    agent.client.loop_misc()
        timed_out = self.done < len(self.agents)
        # a clean exit, as the real agent: retained OFFLINE, then disconnect once written
        for agent in self.agents:
            self._publish(agent, Message(Kind.OFFLINE, self.o.run, agent.id, 0, 0))
            self.c["offline"] += 1
        flush_until = time.monotonic() + 10
        while self.by_mid and time.monotonic() < flush_until:
            self._poll(0.1)
        self.closing = True
        for agent in self.agents:
            agent.client.disconnect()
        close_until = time.monotonic() + 10
        while self.sel.get_map() and time.monotonic() < close_until:
            self._poll(0.1)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        result = {
            "first": self.o.first, "count": self.o.count, "timed_out": timed_out,
            "not_done": [a.id for a in self.agents if a.state != DONE],
            "counters": self.c, "cpu_s": usage.ru_utime + usage.ru_stime,
            "max_rss_mb": usage.ru_maxrss / 1024, "seconds": time.monotonic() - started,
            "fields": ["agent", "window", "base_version", "seq", "pub_wall", "pub_mono",
                       "ack_mono", "avg_mono", "included"],
            "updates": self.records,
        }
        with open(self.o.out, "w") as f:
            json.dump(result, f, separators=(",", ":"))
        print(f"done: {json.dumps(self.c)}; cpu {result['cpu_s']:.1f} s, "
              f"max RSS {result['max_rss_mb']:.0f} MiB", file=sys.stderr, flush=True)
        return 1 if timed_out else 0


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--broker", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--count", type=int, default=250)
    p.add_argument("--windows", type=int, required=True)
    p.add_argument("--compute", type=float, default=0.1)
    p.add_argument("--straggler-frac", type=float, default=0.0)
    p.add_argument("--straggler-lo", type=float, default=1.0)
    p.add_argument("--straggler-hi", type=float, default=3.0)
    p.add_argument("--scale", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--block-timeout", type=float, default=120.0)
    p.add_argument("--out", required=True)
    return Options(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return SenderPool(parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
