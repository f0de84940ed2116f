"""Chunked messages: split/reassemble (pure), MqttLink against a real Mosquitto whose
max_packet_size is smaller than the model, and a FedAvg run with a late joiner through it."""

from __future__ import annotations

import hashlib
import os
import queue
import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import any_broker
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetfl.shared.devtools.local_broker import LocalMosquitto
from fleetfl.shared.net.broker_url import BrokerURL
from fleetfl.shared.net.transport import CONNECTED, Incoming, MqttLink
from fleetfl.shared.wire import chunking
from fleetfl.shared.wire.chunking import (
    HEADER,
    HEADER_BYTES,
    ChunkError,
    Reassembler,
    chunk_filter,
    chunk_topic,
    packet_bytes,
    parse_chunk,
    parse_chunk_topic,
    split,
    stale_retained_topics,
)

MB = 1024 * 1024
TOPIC = "fl/run/up/agent7"


def payload_of(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def reassemble(r: Reassembler, parts: list[tuple[str, bytes]], now: float = 0.0,
               retained: bool = False) -> list[chunking.Reassembled]:
    out = [r.add(t, p, now, retained) for t, p in parts]
    return [x for x in out if x is not None]


# -- topics and sizes --------------------------------------------------------------------------

def test_chunk_topics_round_trip_and_filters() -> None:
    assert parse_chunk_topic(chunk_topic(TOPIC, 12)) == (TOPIC, 12)
    for plain in (TOPIC, "fl/run/up/chunk", "chunk/3", "a/chunk/-1", "a/chunk/x", "a/chunk/",
                  "a/chunk/\u0663", "a/chunk/12345678901", "/chunk/1"):
        assert parse_chunk_topic(plain) is None, plain
    assert chunk_filter("fl/run/up/+") == "fl/run/up/+/chunk/+"
    assert chunk_filter("fl/run/down/#") is None and chunk_filter("#") is None


def test_every_chunk_packet_fits_the_limit() -> None:
    payload = payload_of(300_000)
    for limit in (1024, 4096, 32 * 1024, 100_003):
        parts = split(TOPIC, payload, False, limit)
        assert all(packet_bytes(t, len(p)) <= limit for t, p in parts)
        assert len(parts) == -(-len(payload) // chunking.chunk_data_bytes(TOPIC, limit))
    with pytest.raises(ValueError, match="no room"):
        split(TOPIC, payload, False, 100)


def test_needs_chunking_counts_the_packet_not_the_payload() -> None:
    limit = 10_000
    fits = max(n for n in range(limit) if packet_bytes(TOPIC, n) <= limit)
    assert not chunking.needs_chunking(TOPIC, fits, limit)
    assert chunking.needs_chunking(TOPIC, fits + 1, limit)
    assert not chunking.needs_chunking(TOPIC, 10 * limit, 0)  # 0: never chunk


def test_header_layout() -> None:
    (topic, data), *_ = split(TOPIC, b"x" * 5000, True, 2048)
    head, body = parse_chunk(data)
    assert HEADER_BYTES == 54 and data[:4] == b"FLCK" and data[4] == 2 and data[5] == 1
    assert (head.index, head.total, head.retain) == (0, 5000, True)
    # a hash list: SHA-256 over each chunk's SHA-256, in index order
    bodies = [parse_chunk(p)[1] for _, p in split(TOPIC, b"x" * 5000, True, 2048)]
    assert head.digest == hashlib.sha256(
        b"".join(hashlib.sha256(b).digest() for b in bodies)).digest()
    assert bytes(body) == b"x" * len(body) and topic == chunk_topic(TOPIC, 0)


# -- reassembly ----------------------------------------------------------------------------

def test_in_order_single_delivery() -> None:
    payload = payload_of(200_000)
    r = Reassembler(MB)
    parts = split(TOPIC, payload, False, 16 * 1024)
    out = reassemble(r, parts)
    assert [(o.topic, o.payload, o.retain) for o in out] == [(TOPIC, payload, False)]
    assert r.held == 0 and r.stats["messages"] == 1 and r.stats["chunks"] == len(parts)


def test_shuffled_with_duplicates_delivers_once() -> None:
    payload = payload_of(123_457, seed=1)
    parts = split(TOPIC, payload, False, 8 * 1024)
    noisy = parts + random.Random(2).sample(parts, 5)
    random.Random(3).shuffle(noisy)
    r = Reassembler(MB)
    out = reassemble(r, noisy)
    assert [o.payload for o in out] == [payload]
    assert r.stats["duplicates"] == 5 and r.snapshot(0.0)["sets_in_flight"] == 0
    # late duplicates after completion (QoS 1 redelivery) expire quietly, counted apart
    assert reassemble(r, parts[:3], now=1.0) == []
    assert r.snapshot(40.0)["stale_duplicates"] == 1 and r.stats["timeouts"] == 0
    # the same bytes sent again in full are delivered again, as an unchunked message would be
    assert [o.payload for o in reassemble(r, parts, now=50.0)] == [payload]
    retained = split(TOPIC, payload, True, 8 * 1024)
    assert [o.retain for o in reassemble(r, retained, now=60.0, retained=True)] == [True]


def test_two_messages_on_one_topic_interleaved() -> None:
    a, b = payload_of(50_000, 4), payload_of(60_000, 5)
    pa, pb = split(TOPIC, a, False, 4096), split(TOPIC, b, False, 4096)
    mixed = [x for pair in zip(pa, pb, strict=False) for x in pair] + pb[len(pa):]
    out = reassemble(Reassembler(MB), mixed)
    assert sorted(o.payload for o in out) == sorted([a, b])


def test_missing_chunk_times_out_and_is_counted() -> None:
    parts = split(TOPIC, payload_of(40_000), False, 4096)
    r = Reassembler(MB, timeout=30.0)
    assert reassemble(r, parts[:-1], now=100.0) == []
    assert r.held > 0
    assert r.expire(125.0) == 0  # idle for less than the timeout
    assert r.expire(131.0) == 1
    assert r.held == 0 and r.stats["timeouts"] == 1
    # the last chunk alone now opens a new set, which expires as well
    assert r.add(*parts[-1], now=132.0) is None
    assert r.snapshot(200.0)["timeouts"] == 2


def test_slow_but_steady_transfer_is_not_timed_out() -> None:
    payload = payload_of(40_000)
    parts = split(TOPIC, payload, False, 4096)
    r = Reassembler(MB, timeout=30.0)
    out = [r.add(t, p, now=20.0 * i) for i, (t, p) in enumerate(parts)]  # 20 s apart
    assert out[-1] is not None and out[-1].payload == payload


def test_wrong_hash_is_refused() -> None:
    parts = split(TOPIC, payload_of(30_000), False, 4096)
    t, p = parts[2]
    tampered = bytearray(p)
    tampered[-1] ^= 0xFF
    parts[2] = (t, bytes(tampered))
    r = Reassembler(MB)
    assert reassemble(r, parts) == []
    assert r.stats["bad_hash"] == 1 and r.held == 0


def test_inconsistent_headers_are_refused() -> None:
    payload = payload_of(30_000)
    parts = split(TOPIC, payload, False, 4096)
    r = Reassembler(MB)
    # a chunk moved to another index's topic
    assert r.add(chunk_topic(TOPIC, 3), parts[2][1], 0.0) is None
    # same hash, another count or total
    magic, ver, flags, digest, index, count, total = HEADER.unpack_from(parts[1][1])
    body = parts[1][1][HEADER_BYTES:]
    r.add(*parts[0], 0.0)
    for c, n in ((count + 1, total), (count, total + 1)):
        forged = HEADER.pack(magic, ver, flags, digest, index, c, n) + body
        assert r.add(parts[1][0], forged, 0.0) is None
    # a chunk of the wrong size
    assert r.add(parts[1][0], parts[1][1][:-10], 0.0) is None
    # retained delivery of a chunk whose header says the original was not retained
    assert r.add(*parts[1], 0.0, retained=True) is None
    assert r.stats["inconsistent"] == 5
    # the genuine chunks still complete the message
    assert [o.payload for o in reassemble(r, parts[1:])] == [payload]


def test_too_large_is_refused_before_storing() -> None:
    parts = split(TOPIC, payload_of(100_000), False, 4096)
    r = Reassembler(50_000)
    assert reassemble(r, parts) == []
    assert r.stats["too_large"] == len(parts) and r.held == 0


def test_memory_cap_evicts_the_greediest_sender_first() -> None:
    big = split("fl/run/up/greedy", payload_of(90_000, 6), False, 4096)
    small = split("fl/run/up/modest", payload_of(30_000, 7), False, 4096)
    r = Reassembler(100_000, max_held_bytes=100_000)
    reassemble(r, small[:-1], now=0.0)
    reassemble(r, big[:-1], now=1.0)  # holds ~90 KB and hits the cap with its own chunks
    assert r.held <= 100_000
    assert r.stats["evicted_memory"] >= 1
    out = r.add(*small[-1], now=2.0)
    assert out is not None and out.topic == "fl/run/up/modest"


def test_sets_per_sender_are_capped() -> None:
    """An agent's up/ and status/ topics share its cap."""
    r = Reassembler(MB, max_sets_per_sender=2)
    topics = (TOPIC, TOPIC.replace("/up/", "/status/"), TOPIC)
    sets = [split(t, payload_of(10_000, s), False, 4096) for s, t in enumerate(topics)]
    for i, parts in enumerate(sets):
        r.add(*parts[0], now=float(i))
    assert r.snapshot(3.0)["sets_in_flight"] == 2 and r.stats["evicted_per_sender"] == 1
    assert reassemble(r, sets[0][1:], now=4.0) == []  # the oldest went
    assert len(reassemble(r, sets[2][1:], now=4.0)) == 1


def test_a_sender_splitting_across_its_two_topics_cannot_evict_a_victims_set() -> None:
    """Issue 14, finding 6: an agent owns up/<id> and status/<id>. Eviction by topic saw
    2 x 40 MiB there as two modest holders and dropped the victim's 60 MiB set; by sender,
    the attacker's 80 MiB go first."""
    chunked = 4 * MB
    victim = split("fl/run/up/victim", bytes(60 * MB), False, chunked)
    attack = [split(f"fl/run/{kind}/evil", bytes(40 * MB), False, chunked)
              for kind in ("up", "status")]
    r = Reassembler(64 * MB)  # holds at most 128 MiB of partial sets
    assert reassemble(r, victim[:-1], now=0.0) == []
    for a, b in zip(attack[0][:-1], attack[1][:-1], strict=True):
        assert r.add(*a, now=1.0) is None and r.add(*b, now=1.0) is None
    assert r.stats["evicted_memory"] >= 1 and r.held <= r.max_held_bytes
    out = r.add(*victim[-1], now=2.0)
    assert out is not None and out.topic == "fl/run/up/victim" and len(out.payload) == 60 * MB


def _last_add_cpu_s(parts: list[tuple[str, bytes]]) -> float:
    r = Reassembler(64 * MB)
    for t, p in parts[:-1]:
        assert r.add(t, p, 0.0) is None
    start = time.thread_time()
    out = r.add(*parts[-1], 0.0)
    took = time.thread_time() - start
    assert out is not None
    return took


def test_the_last_chunk_does_not_hash_the_whole_set() -> None:
    """Issue 14, finding 6: chunks arriving in reverse order (index 0 last) made the last
    add() hash all 48 MiB on paho's network thread. It may copy the parts into one payload
    (a memcpy), but hash no more than its own chunk. CPU time of this thread, best of 3."""
    payload = payload_of(48 * MB, 11)
    parts = split(TOPIC, payload, False, MB)[::-1]
    bodies = [p[HEADER_BYTES:] for _, p in parts[::-1]]
    hash_s = join_s = last_s = float("inf")
    for _ in range(3):
        start = time.thread_time()
        hashlib.sha256(payload).digest()
        hash_s = min(hash_s, time.thread_time() - start)
        start = time.thread_time()
        b"".join(bodies)
        join_s = min(join_s, time.thread_time() - start)
        last_s = min(last_s, _last_add_cpu_s(parts))
    assert last_s < join_s + hash_s / 2, (last_s, join_s, hash_s)


def test_cleared_retained_chunks_are_ignored() -> None:
    r = Reassembler(MB)
    assert r.add(chunk_topic(TOPIC, 0), b"", 0.0, retained=True) is None
    assert r.stats["cleared"] == 1 and r.held == 0


def test_stale_retained_topics() -> None:
    t = "fl/run/down/model"
    assert stale_retained_topics(t, None, 0) == [chunk_topic(t, 0)]
    assert stale_retained_topics(t, 2, 0) == [chunk_topic(t, 0), chunk_topic(t, 1)]
    assert stale_retained_topics(t, 0, 0) == []
    assert stale_retained_topics(t, None, 3) == [t]
    assert stale_retained_topics(t, 0, 3) == [t]
    assert stale_retained_topics(t, 5, 3) == [chunk_topic(t, 3), chunk_topic(t, 4)]
    assert stale_retained_topics(t, 3, 5) == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12), st.binary(max_size=200)), max_size=20))
def test_garbage_on_chunk_topics_never_raises(messages: list[tuple[int, bytes]]) -> None:
    r = Reassembler(4096, max_held_bytes=8192, max_sets_per_sender=2)
    for i, (index, data) in enumerate(messages):
        assert r.add(chunk_topic(TOPIC, index), data, float(i)) is None
    assert r.held <= 8192


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_chunks_never_raise_and_never_deliver_wrong_bytes(data: st.DataObject) -> None:
    payload = payload_of(3000, data.draw(st.integers(0, 5)))
    parts = split(TOPIC, payload, False, 1024)
    r = Reassembler(4096, max_held_bytes=12_000)
    stream = list(parts)
    for _ in range(data.draw(st.integers(0, 6))):
        t, p = parts[data.draw(st.integers(0, len(parts) - 1))]
        pos = data.draw(st.integers(0, len(p) - 1))
        mutated = p[:pos] + bytes([p[pos] ^ data.draw(st.integers(1, 255))]) + p[pos + 1:]
        cut = data.draw(st.integers(0, len(mutated)))
        stream.append((t, mutated[:cut] if data.draw(st.booleans()) else mutated))
    stream = data.draw(st.permutations(stream))
    for t, p in stream:
        out = r.add(t, p, 0.0)
        if out is not None:
            assert out.payload == payload  # the hash lets nothing else through
    assert r.held <= 12_000


def test_parse_chunk_refuses_short_and_foreign_payloads() -> None:
    for bad in (b"", b"FLCK", b"x" * 100,
                HEADER.pack(b"FLCK", 1, 0, b"\0" * 32, 0, 1, 1) + b"x",  # format 1: whole hash
                HEADER.pack(b"FLCK", 2, 4, b"\0" * 32, 0, 1, 1) + b"x",
                HEADER.pack(b"FLCK", 2, 0, b"\0" * 32, 1, 1, 1) + b"x",
                HEADER.pack(b"FLCK", 2, 0, b"\0" * 32, 0, 2, 1) + b"x"):
        with pytest.raises(ChunkError):
            parse_chunk(bad)


# -- MqttLink against a real Mosquitto with a small packet limit --------------------------------

LIMIT = 32 * 1024  # the broker's max_packet_size; a LeNet-5 model is ~247 KB


@pytest.fixture(scope="module")
def small_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMosquitto]:
    with any_broker(tmp_path_factory.mktemp("small"), max_packet_size=LIMIT) as broker:
        yield broker


class Peer:
    def __init__(self, broker: LocalMosquitto, max_packet_bytes: int) -> None:
        self.inbox: queue.Queue[Incoming] = queue.Queue()
        self.backlog: list[Incoming] = []
        self.link = MqttLink(BrokerURL(broker.host, broker.port),
                             f"chunk-test-{uuid.uuid4().hex[:8]}", self.inbox,
                             max_packet_bytes=max_packet_bytes)

    def connect(self, *topics: str) -> Peer:
        for t in topics:
            self.link.subscribe(t)
        self.link.connect()
        self.expect(CONNECTED)
        # a round trip through the broker: our subscriptions are in place after it
        marker = f"test/{uuid.uuid4().hex}"
        self.link.subscribe(marker)
        self.link.publish(marker, b"m")
        self.expect(marker)
        return self

    def _next(self, deadline: float) -> Incoming | None:
        try:
            return self.inbox.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            return None

    def expect(self, topic: str, timeout: float = 10.0) -> Incoming:
        """The first message on `topic` (kept if it came while waiting for another one)."""
        for item in self.backlog:
            if item.topic == topic:
                self.backlog.remove(item)
                return item
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            item = self._next(deadline)
            if item is None or (not item.payload and item.topic != CONNECTED):
                continue  # cleared retained messages
            if item.topic == topic:
                return item
            self.backlog.append(item)
        raise AssertionError(f"nothing on {topic} within {timeout} s")

    def nothing_on(self, topic: str, wait: float) -> bool:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            item = self._next(deadline)
            if item is not None and item.topic == topic and item.payload:
                return False
        return not any(i.topic == topic for i in self.backlog)

    def close(self) -> None:
        self.link.close(flush_timeout=2.0)


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    made: list[Peer] = []
    yield made
    for p in made:
        p.close()


def test_unchunked_model_is_refused_chunked_arrives(small_broker: LocalMosquitto,
                                                    peers: list[Peer]) -> None:
    topic = f"fl/t{uuid.uuid4().hex[:6]}/down/avg"
    payload = payload_of(247_000, 9)
    sub = Peer(small_broker, 0).connect(topic)
    peers.append(sub)
    # Without chunking the broker drops the sender's connection; nothing is delivered.
    raw = Peer(small_broker, 0).connect()
    before = small_broker.log_text().count("oversize packet")
    raw.link.publish(topic, payload)
    deadline = time.monotonic() + 10
    while small_broker.log_text().count("oversize packet") == before:
        assert time.monotonic() < deadline, "the broker did not refuse the packet"
        time.sleep(0.05)
    raw.link.closing = True  # it would resend the same packet after every reconnect
    raw.link.client.disconnect()
    raw.link.client.loop_stop()
    assert sub.nothing_on(topic, 1.0)
    # With chunking (the default limit, lowered to the broker's CONNACK value) it arrives.
    pub = Peer(small_broker, chunking.DEFAULT_MAX_PACKET_BYTES).connect()
    peers.append(pub)
    assert pub.link.packet_limit == LIMIT
    pub.link.publish(topic, payload)
    got = sub.expect(topic)
    assert got.payload == payload and not got.retain
    assert pub.link.chunk_stats["chunks_sent"] == -(-len(payload) // chunking.chunk_data_bytes(
        topic, LIMIT))
    assert sub.link.chunk_stats["messages"] == 1


def test_retained_chunked_model_reaches_late_subscribers_without_stale_sets(
        small_broker: LocalMosquitto, peers: list[Peer]) -> None:
    topic = f"fl/t{uuid.uuid4().hex[:6]}/down/model"
    pub = Peer(small_broker, LIMIT).connect()
    peers.append(pub)
    big, bigger, small = payload_of(200_000, 1), payload_of(300_000, 2), b"tiny model"

    def late_joiner_gets(expected: bytes) -> None:
        assert pub.link._last is not None  # acknowledged: the broker has stored it all
        pub.link._last.wait_for_publish(5)
        joiner = Peer(small_broker, LIMIT).connect(topic)
        peers.append(joiner)
        got = joiner.expect(topic)
        assert got.payload == expected and got.retain
        assert joiner.nothing_on(topic, 0.5)  # and nothing older
        assert joiner.link.chunk_stats.get("bad_hash", 0) == 0

    pub.link.publish(topic, small, retain=True)
    late_joiner_gets(small)
    pub.link.publish(topic, bigger, retain=True)  # clears the unchunked one first
    late_joiner_gets(bigger)
    pub.link.publish(topic, big, retain=True)  # fewer chunks: the extra ones are cleared
    late_joiner_gets(big)
    pub.link.publish(topic, small, retain=True)  # unchunked again: the chunks are cleared
    late_joiner_gets(small)


def test_garbage_on_a_chunk_topic_does_not_disturb_the_link(small_broker: LocalMosquitto,
                                                             peers: list[Peer]) -> None:
    topic = f"fl/t{uuid.uuid4().hex[:6]}/up/mallory"
    sub = Peer(small_broker, LIMIT).connect("fl/+/up/+")
    peers.append(sub)
    pub = Peer(small_broker, 0).connect()
    peers.append(pub)
    for i, junk in enumerate([b"FLCK", os.urandom(500), b"\0" * 54 + b"x"]):
        pub.link.client.publish(chunk_topic(topic, i), junk, qos=1)
    pub.link.publish(topic, b"after the junk")
    assert sub.expect(topic).payload == b"after the junk"
    assert sub.link.chunk_stats["malformed"] == 3


# -- a real FedAvg run through a broker whose packet limit is below the model size -------------

@pytest.mark.integration
def test_fedavg_run_with_late_joiner_through_small_packet_limit(
        small_broker: LocalMosquitto, tmp_path: Path, shared_data_dir: Path) -> None:
    from test_integration import events_of, make_fleet, wait_for_version

    # No version cap to race: the run goes on until the joiner has contributed twice (however
    # long its start-up takes on a busy host), then the coordinator is stopped.
    run = f"chunk{uuid.uuid4().hex[:6]}"
    args = ["--algo", "fedavg", "--dataset", "mnist", "--min-agents", "2", "--max-versions",
            "100000", "--local-steps", "10", "--eval-every", "5", "--window-timeout", "20"]
    offset = len(small_broker.log_text())
    runs = tmp_path / "runs"
    with make_fleet(small_broker, tmp_path, run, args, data_dir=str(shared_data_dir)) as fleet:
        fleet.start_coordinator()
        fleet.start_agent(0, 3)
        fleet.start_agent(1, 3)
        started_at = wait_for_version(fleet, runs, 2, timeout=90)["version"]
        fleet.start_agent(2, 3)
        deadline = time.monotonic() + 180
        while sum("agent2" in e["contributors"] for e in events_of(runs, run)) < 2:
            assert time.monotonic() < deadline, fleet.log("agent2")[-3000:]
            assert fleet.coordinator.poll() is None, fleet.log("coordinator")[-3000:]
            time.sleep(0.2)
        wait_for_version(fleet, runs, events_of(runs, run)[-1]["version"] + 5, timeout=60)
        fleet.coordinator.terminate()
        assert fleet.wait_coordinator(timeout=60) == 130  # interrupted, as asked
        assert all(c == 0 for c in fleet.wait_agents(timeout=30).values())
    events = events_of(runs, run)
    versions = len(events)
    assert [e["version"] for e in events] == list(range(1, versions + 1))
    joined = int(fleet.log("agent2").split("joined at version ")[1].split(",")[0])
    assert joined >= started_at  # from the chunked retained model, not from scratch
    assert any("agent2" in e["contributors"] for e in events if e["version"] > joined)
    assert all(len(e["contributors"]) >= 2 for e in events)  # every update arrived
    last = events[-1]
    accuracies = [e["accuracy"] for e in events if e["accuracy"] is not None]
    assert last["rejected"] == {} and max(accuracies) > 0.5
    model_bytes = 61706 * 4
    assert last["up_model"] > 2 * versions * model_bytes  # dense updates, ~8 chunks each
    for name in ("coordinator", "agent0", "agent1", "agent2"):
        text = fleet.log(name)
        assert "refused chunk" not in text and "dropped a chunked" not in text, name
    assert "oversize packet" not in small_broker.log_text()[offset:]
