"""Every attack of issue 14 from one agent credential, in turn (tests/test_hostile_fleet.py).

    python bench/malicious_agent.py --attack all --victim pi01 <fl-agent flags>

The real agent (it joins, trains and keeps its MQTT session like any other) that, before each
of its updates, runs the next step below, then sends the update twice: once claiming 2**62
samples (refused on arrival) and once as deltas of 3e38 (finite on the wire, left out of the
average). Each step logs `ATTACK <step> ...`, and every raw publish its broker's PUBACK code
(`ATTACK <step> topic=T puback=0xNN`), so a test can count refusals the coordinator never
sees (the ACL's):

| step          | what it sends                                            | refused as          |
| ------------- | -------------------------------------------------------- | ------------------- |
| hello_samples | a hello declaring 2**40 samples (above max_samples)      | samples_claim       |
| bad_profile   | a hello with an all-zero FedPMT profile                  | bad_profile         |
| hello_flood   | FLOOD valid hellos at once                               | hello_rate          |
| impersonate   | an update naming the victim as sender, on its own topic; | sender_mismatch;    |
|               | the same on the victim's up/ and status/ topics          | ACL (PUBACK 0x87)   |
| acl_park      | retained data under chunk levels the ACL does not open   | ACL (PUBACK 0x87)   |
| retained_up   | retained data on its own up/ topic and chunk topics      | parked_retained     |
| chunk_split   | incomplete chunk sets split over its up/ and status/     | evicted_memory,     |
|               | topics: BIG_SETS of 40 MiB, then SMALL_SETS of 1 KiB     | evicted_per_sender  |
| (every update)| 2**62 samples; then 3e38 deltas                          | samples_claim;      |
|               |                                                          | out_of_bounds       |
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading

import numpy as np
from malicious_agent import OVERFLOW, MaliciousAgent

from fleetfl.agent.runner import AgentRunner
from fleetfl.shared.config import AgentConfig
from fleetfl.shared.core.messages import Kind, Message
from fleetfl.shared.wire import chunking
from fleetfl.shared.wire.codec import encode

log = logging.getLogger("fleetfl.agent")

STEPS = ("hello_samples", "bad_profile", "hello_flood", "impersonate", "acl_park",
         "retained_up", "chunk_split")
FLOOD = 40  # hellos: the coordinator allows a burst of 5 (averaging.HELLO_BURST)
CLAIMED_SAMPLES = 2**62
HELLO_SAMPLES = 2**40  # above the default max_samples (10**7)
OVERFLOW_VALUE = 3e38
# chunk_split: 4 x 40 MiB from one agent exceed what the coordinator holds for partial sets
# (2 x max_message_bytes, 128 MiB), and 10 more sets the 8 sets one sender may have in flight
BIG_SETS, BIG_CHUNK, BIG_TOTAL = 4, 40 * 1024 * 1024, 64 * 1024 * 1024
SMALL_SETS, SMALL_CHUNK = 10, 1024
PUBACK_TIMEOUT = 60.0  # a 40 MiB chunk over TLS on a loaded machine


class HostileAgent(MaliciousAgent):
    def __init__(self, cfg: AgentConfig, victim: str) -> None:
        super().__init__(cfg, OVERFLOW)
        self.victim = victim
        self.steps = list(STEPS)
        self.pubacks: dict[int, int] = {}  # mid -> PUBACK reason code
        self.acked = threading.Condition()
        self.link.client.on_publish = self._on_puback  # MqttLink itself does not use it

    # -- raw publishes, PUBACK code logged -------------------------------------------
    def _on_puback(self, client, userdata, mid, reason_code, properties) -> None:
        with self.acked:
            self.pubacks[mid] = reason_code.value
            self.acked.notify_all()

    def _raw(self, step: str, topic: str, payload: bytes, retain: bool = False) -> int:
        info = self.link.client.publish(topic, payload, qos=1, retain=retain)
        with self.acked:
            if not self.acked.wait_for(lambda: info.mid in self.pubacks, PUBACK_TIMEOUT):
                raise TimeoutError(f"no PUBACK for {topic}")
            code = self.pubacks.pop(info.mid)
        log.warning("ATTACK %s topic=%s puback=0x%02x", step, topic, code)
        return code

    # -- steps ----------------------------------------------------------------------
    def _hello(self, **fields) -> None:
        assert self.hello is not None
        self._publish(dataclasses.replace(self.hello, fields={**self.hello.fields, **fields}))

    def hello_samples(self) -> None:
        self._hello(samples=HELLO_SAMPLES)

    def bad_profile(self) -> None:
        # the exact profile of the issue: zero seconds per batch, so a derived deadline of 0
        zeros = {**self.profile, "f": [0.0] * len(self.profile["f"]),
                 "b": [0.0] * len(self.profile["b"])}
        self._hello(capabilities={**self.hello.fields["capabilities"], "profile": zeros})

    def hello_flood(self) -> None:
        for _ in range(FLOOD):
            self._hello()

    def impersonate(self, update: Message) -> None:
        posing = dataclasses.replace(update, sender=self.victim, seq=self.seq + 1)
        payload = encode(posing, self.signer)
        self._raw("impersonate", self.topics.up(self.cfg.agent_id), payload)  # sender_mismatch
        self._raw("impersonate", self.topics.up(self.victim), payload)
        self._raw("impersonate", self.topics.status(self.victim), payload, retain=True)

    def acl_park(self) -> None:
        me = self.cfg.agent_id
        for topic in (f"{self.topics.up(me)}/chunk/2", f"{self.topics.up(me)}/chunk/not-a-number",
                      f"{self.topics.status(me)}/chunk/4294967295"):
            self._raw("acl_park", topic, b"parked " * 1000, retain=True)

    def retained_up(self) -> None:
        up = self.topics.up(self.cfg.agent_id)
        for topic in (up, chunking.chunk_topic(up, 0), chunking.chunk_topic(up, 1)):
            self._raw("retained_up", topic, os.urandom(4096), retain=True)

    def chunk_split(self) -> None:
        """Chunk 0 of sets that never complete, alternating between the agent's two topics
        (the reassembler used to count them per topic, so a victim's set was evicted)."""
        me = self.cfg.agent_id
        bases = (self.topics.up(me), self.topics.status(me))
        sets = [(BIG_CHUNK, BIG_TOTAL)] * BIG_SETS + [(SMALL_CHUNK, 2 * SMALL_CHUNK)] * SMALL_SETS
        for n, (size, total) in enumerate(sets):
            head = chunking.HEADER.pack(chunking.MAGIC, chunking.FORMAT_VERSION, 0,
                                        os.urandom(32), 0, 2, total)
            self._raw("chunk_split", chunking.chunk_topic(bases[n % 2], 0),
                      head + os.urandom(size))

    # -- every update -----------------------------------------------------------------
    def _publish_update(self, out: Message) -> None:
        if out.kind is not Kind.UPDATE:
            AgentRunner._publish_update(self, out)
            return
        if self.steps:
            step = self.steps.pop(0)
            log.warning("ATTACK %s before window %d", step, out["window"])
            if step == "impersonate":
                self.impersonate(out)
            else:
                getattr(self, step)()
        claim = dataclasses.replace(out, fields={**out.fields, "samples": CLAIMED_SAMPLES},
                                    arrays={k: np.full_like(v, 1e20)
                                            for k, v in out.arrays.items()})
        self._publish(claim)  # refused on arrival: the window still waits for the one below
        out.arrays["delta"] = np.full_like(out.arrays["delta"], OVERFLOW_VALUE)
        AgentRunner._publish_update(self, out)  # accepted, then left out of the average
