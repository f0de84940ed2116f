"""Messages larger than the broker's packet limit, split into chunks and put back together.

Mosquitto refuses any packet above its `max_packet_size` by dropping the sender's connection
(and paho then resends the same packet after reconnecting, forever). So a payload whose
PUBLISH packet would exceed the limit travels as N chunk messages on sub-topics
`<topic>/chunk/<i>`; the normal topic keeps its meaning, and subscribers of `<filter>` also
subscribe `<filter>/chunk/+` (a `+` level never matches deeper levels).

A chunk is a fixed 54-byte header, then a slice of the payload:

    magic "FLCK" | version u8 | flags u8 (bit 0: the original was retained; others 0)
    | digest (32) | index u32 | count u32 | total length u64

big-endian. All chunks but the last carry the same number of bytes. The digest is a hash
list: SHA-256 over the SHA-256 of each chunk's data, in index order (`set_digest`). So the
receiver hashes each chunk as it arrives, in whatever order, and the last one costs no more
than the others: with one hash of the whole payload (format 1), chunks arriving in reverse
order made the last add() hash the whole 48 MB message on paho's network thread.

The receiver (`Reassembler`: pure, no MQTT, no clock of its own) keys sets by (base topic,
digest), checks every header against the topic and the set, and delivers the whole payload
once the digest matches. Incomplete sets are dropped after `timeout` seconds without a chunk;
the bytes held are capped, per sender (an agent owns two topics) and in all; everything
dropped or refused is logged and counted, and nothing in here raises on bad input.

Retained messages (the model) are published with every chunk retained. Stale retained
chunks are the one real hazard: a complete older set left on the broker would hand a late
joiner an older model. The publisher therefore clears them (see `stale_retained_topics`).
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from fleetfl.shared.wire.topics import topic_owner

log = logging.getLogger(__name__)

MAGIC = b"FLCK"
FORMAT_VERSION = 2  # 1: a SHA-256 of the whole payload
FLAG_RETAIN = 0x01
HEADER = struct.Struct(">4sBB32sIIQ")
HEADER_BYTES = HEADER.size  # 54
CHUNK_LEVEL = "chunk"
MAX_COUNT = 0xFFFFFFFF

# The broker role's max_packet_size is 64 MiB; the margin covers the PUBLISH header, a long
# topic and MQTT v5 properties someone may add later.
DEFAULT_MAX_PACKET_BYTES = 64 * 1024 * 1024 - 64 * 1024
DEFAULT_TIMEOUT_S = 30.0
# an agent owns two topics and had 4 sets on each, the coordinator publishes on three (a
# joiner may get the retained model while averages and evaluations arrive)
DEFAULT_SETS_PER_SENDER = 8
# Bookkeeping of one stored chunk (dict slots, memoryview, its digest): counted against the
# byte cap, so a flood of one-byte chunks cannot hold unbounded memory either.
CHUNK_OVERHEAD = 128
# Allowance for MQTT v5 properties on a PUBLISH (paho sends none by default).
PROPERTIES_ALLOWANCE = 32


class ChunkError(ValueError):
    """A chunk payload that is not one of ours (wrong magic, version, flags or length)."""


# -- topics ----------------------------------------------------------------------------------

def chunk_topic(base: str, index: int) -> str:
    return f"{base}/{CHUNK_LEVEL}/{index}"


def chunk_filter(topic_filter: str) -> str | None:
    """The extra subscription that catches the chunks of `topic_filter` (None: it does
    already, as a filter ending in `#` matches every deeper level)."""
    if topic_filter == "#" or topic_filter.endswith("/#"):
        return None
    return f"{topic_filter}/{CHUNK_LEVEL}/+"


def parse_chunk_topic(topic: str) -> tuple[str, int] | None:
    """(base topic, index) of `<base>/chunk/<i>`, else None. Cheap: runs per message."""
    head, sep, tail = topic.rpartition("/")
    if not sep or not tail.isdigit() or not tail.isascii() or len(tail) > 10:
        return None
    base, sep, level = head.rpartition("/")
    if not sep or level != CHUNK_LEVEL or not base:
        return None
    return base, int(tail)


# -- sending ---------------------------------------------------------------------------------

def _varint_len(n: int) -> int:
    return 1 if n < 128 else 2 if n < 16384 else 3 if n < 2097152 else 4


def packet_bytes(topic: str, payload_len: int) -> int:
    """Size of a QoS 1 PUBLISH packet as sent (fixed header, topic, packet id, properties),
    rounded up: Mosquitto counts a little less (measured: it omits the length bytes)."""
    remaining = 2 + len(topic.encode()) + 2 + 1 + PROPERTIES_ALLOWANCE + payload_len
    return 1 + _varint_len(remaining) + remaining


def needs_chunking(topic: str, payload_len: int, max_packet_bytes: int) -> bool:
    return max_packet_bytes > 0 and packet_bytes(topic, payload_len) > max_packet_bytes


def chunk_data_bytes(topic: str, max_packet_bytes: int) -> int:
    """Payload bytes per chunk so that every chunk packet of `topic` fits the limit."""
    # the longest index a u32 count can have, so the estimate holds for every chunk
    overhead = packet_bytes(chunk_topic(topic, MAX_COUNT), 0) + HEADER_BYTES
    data = max_packet_bytes - overhead
    if data < 1:
        raise ValueError(f"max_packet_bytes {max_packet_bytes} leaves no room for a chunk "
                         f"on {topic!r} (needs > {overhead})")
    return data


def chunk_digest(data: bytes | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def set_digest(chunk_digests: Iterable[bytes]) -> bytes:
    """The header's digest: SHA-256 over the chunks' own digests, in index order."""
    return hashlib.sha256(b"".join(chunk_digests)).digest()


def split(topic: str, payload: bytes, retain: bool, max_packet_bytes: int
          ) -> list[tuple[str, bytes]]:
    """(chunk topic, chunk payload) pairs for `payload`, in index order."""
    size = chunk_data_bytes(topic, max_packet_bytes)
    total = len(payload)
    count = max(1, -(-total // size))
    if count > MAX_COUNT:
        raise ValueError(f"{total} bytes need more than {MAX_COUNT} chunks")
    view = memoryview(payload)
    slices = [view[i * size:(i + 1) * size] for i in range(count)]
    digest = set_digest(map(chunk_digest, slices))
    flags = FLAG_RETAIN if retain else 0
    return [(chunk_topic(topic, i),
             HEADER.pack(MAGIC, FORMAT_VERSION, flags, digest, i, count, total) + data)
            for i, data in enumerate(slices)]


def stale_retained_topics(topic: str, previous: int | None, now: int) -> list[str]:
    """Topics to clear (empty retained publish) before publishing a retained message on
    `topic` as `now` chunks (0: unchunked), when `previous` chunks were published there last
    (0: unchunked; None: unknown, e.g. since this process started).

    - Unchunked after chunked: clear all those chunks. After unknown: clear chunk 0; an
      older set then misses a chunk for good, so no joiner can complete it (its other chunks
      expire at the receiver, and are overwritten by the next chunked publish).
    - Chunked after unchunked or unknown: clear the base topic, or a joiner would get the
      older unchunked message too. The new chunks overwrite 0..now-1, which already breaks
      any older set; chunks now..previous-1 of a larger one are cleared as well.
    """
    if now == 0:
        return [chunk_topic(topic, i) for i in range(1 if previous is None else previous)]
    base = [topic] if not previous else []
    return base + [chunk_topic(topic, i) for i in range(now, previous or 0)]


# -- receiving -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChunkHeader:
    digest: bytes
    index: int
    count: int
    total: int
    retain: bool


def parse_chunk(payload: bytes) -> tuple[ChunkHeader, memoryview]:
    """Header and data of a chunk payload; ChunkError if it is not a valid chunk."""
    if len(payload) <= HEADER_BYTES:
        raise ChunkError(f"{len(payload)} bytes: shorter than a chunk header")
    magic, version, flags, digest, index, count, total = HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise ChunkError("bad magic")
    if version != FORMAT_VERSION:
        raise ChunkError(f"chunk format version {version}, expected {FORMAT_VERSION}")
    if flags & ~FLAG_RETAIN:
        raise ChunkError(f"unknown flags {flags:#x}")
    if count < 1 or index >= count or total < count:
        raise ChunkError(f"index {index}, count {count}, total {total} do not fit")
    return (ChunkHeader(digest, index, count, total, bool(flags & FLAG_RETAIN)),
            memoryview(payload)[HEADER_BYTES:])


@dataclass(frozen=True)
class Reassembled:
    topic: str  # the base topic
    payload: bytes
    retain: bool  # the MQTT retain flag of the chunk that completed it (as for one message)


@dataclass(eq=False)
class _Set:
    base: str
    owner: str  # who may publish on `base` (topic_owner): the unit of the caps
    digest: bytes
    count: int
    total: int
    retain: bool
    first: float
    last: float
    parts: dict[int, memoryview] = field(default_factory=dict)
    received: int = 0  # payload bytes
    held: int = 0  # payload bytes plus bookkeeping, what the cap counts
    chunk_size: int = 0  # of every chunk but the last, once known
    last_size: int = 0  # of the last chunk, once known
    repeat: bool = False  # the same (topic, hash) was delivered shortly before
    digests: dict[int, bytes] = field(default_factory=dict)  # index -> chunk_digest


class Reassembler:
    """Collects chunk messages and returns whole payloads. Not thread-safe (one lock in the
    caller); time comes in as `now`, so tests drive the clock.

    Limits: a message may not exceed `max_message_bytes`; partial sets hold at most
    `max_held_bytes` together (default twice `max_message_bytes`) and at most
    `max_sets_per_sender` per sender. The sender of a base topic is `owner(topic)`, by default
    the agent that owns fl/<run>/up/<id> and fl/<run>/status/<id> under the broker ACL (one
    agent, two topics: counted by topic, an agent splitting 2 x 40 MiB over them evicted
    another's 60 MiB set). When the byte cap is reached the least recently active set of the
    sender holding the most bytes is dropped, so a flooding sender evicts its own sets before
    anyone else's.
    """

    def __init__(self, max_message_bytes: int, *, max_held_bytes: int | None = None,
                 max_sets_per_sender: int = DEFAULT_SETS_PER_SENDER,
                 timeout: float = DEFAULT_TIMEOUT_S,
                 owner: Callable[[str], str] = topic_owner) -> None:
        if max_message_bytes < 1 or max_sets_per_sender < 1 or timeout <= 0:
            raise ValueError("max_message_bytes, max_sets_per_sender and timeout must be > 0")
        self.max_message_bytes = max_message_bytes
        self.max_held_bytes = max(max_held_bytes or 2 * max_message_bytes,
                                  max_message_bytes + CHUNK_OVERHEAD)
        self.max_sets_per_sender = max_sets_per_sender
        self.timeout = timeout
        self.owner = owner
        self.held = 0
        self.stats: Counter[str] = Counter()
        self._sets: dict[tuple[str, bytes], _Set] = {}
        # recently delivered (base, digest): a set that starts again with the same key is
        # most likely late QoS 1 duplicates; it is still delivered if it completes (the same
        # bytes may be sent twice), but if it expires it counts as stale_duplicates, quietly
        self._done: OrderedDict[tuple[str, bytes], float] = OrderedDict()
        self._next_expiry = 0.0

    # -- API ---------------------------------------------------------------------------------
    def add(self, topic: str, payload: bytes, now: float | None = None,
            retained: bool = False) -> Reassembled | None:
        """Take one message from a chunk topic; return the whole payload once complete.
        `retained`: the MQTT retain flag (the chunk came from the broker's store)."""
        now = time.monotonic() if now is None else now
        self.expire(now)
        where = parse_chunk_topic(topic)
        if where is None:
            return self._refuse("malformed", topic, "not a chunk topic")
        base, index = where
        self.stats["chunks"] += 1
        if not payload:
            self.stats["cleared"] += 1  # a stale retained chunk being cleared
            return None
        try:
            head, data = parse_chunk(payload)
        except ChunkError as exc:
            return self._refuse("malformed", topic, str(exc))
        refusal = self._header_refusal(head, index, retained)
        if refusal is not None:
            return self._refuse(refusal[0], topic, refusal[1])
        key = (base, head.digest)
        cset = self._set_for(key, base, head, now)
        if cset is None:
            return self._refuse("inconsistent", topic, "count, length or retain differ from "
                                "the set's first chunk")
        cset.last = now
        if index in cset.parts:
            self.stats["duplicates"] += 1
            return None
        problem = self._misfit(cset, index, len(data))
        if problem:
            self._forget_if_empty(key, cset)
            return self._refuse("inconsistent", topic, problem)
        if self._store(key, cset, index, data, now) and len(cset.parts) == cset.count:
            return self._finish(key, cset, retained, now)
        return None

    def _header_refusal(self, head: ChunkHeader, index: int, retained: bool
                        ) -> tuple[str, str] | None:
        """(reason, detail) when a chunk's header alone disqualifies it."""
        if head.index != index:
            return "inconsistent", f"header says index {head.index}"
        if head.total > self.max_message_bytes:
            return "too_large", f"{head.total} bytes > {self.max_message_bytes}"
        if retained and not head.retain:
            return "inconsistent", "retained, but its header says not"
        return None

    def _set_for(self, key: tuple[str, bytes], base: str, head: ChunkHeader, now: float
                 ) -> _Set | None:
        """The set this chunk belongs to (opened by its first chunk); None if it disagrees
        with the set's first chunk."""
        cset = self._sets.get(key)
        if cset is None:
            owner = self.owner(base)
            self._limit_sender(owner)
            cset = _Set(base, owner, head.digest, head.count, head.total, head.retain, now,
                        now, repeat=key in self._done)
            self._sets[key] = cset
        elif (head.count, head.total, head.retain) != (cset.count, cset.total, cset.retain):
            return None
        return cset

    def _store(self, key: tuple[str, bytes], cset: _Set, index: int, data: bytes,
               now: float) -> bool:
        """Keep one chunk within the memory cap; False if the cap evicted its own set."""
        cost = len(data) + CHUNK_OVERHEAD
        self._make_room(cost, now)
        if self._sets.get(key) is not cset:  # the cap evicted this very set
            self.stats["refused_chunks"] += 1
            return False
        cset.parts[index] = data
        cset.digests[index] = chunk_digest(data)  # this chunk only, whatever the order
        cset.received += len(data)
        cset.held += cost
        self.held += cost
        if index < cset.count - 1:
            cset.chunk_size = len(data)
        else:
            cset.last_size = len(data)
        return True

    def expire(self, now: float) -> int:
        """Drop sets that got no chunk for `timeout` seconds; checked at most once a second."""
        if now < self._next_expiry:
            return 0
        self._next_expiry = now + min(1.0, self.timeout / 4)
        stale = [k for k, s in self._sets.items() if now - s.last > self.timeout]
        for key in stale:
            cset = self._sets[key]
            self._drop(key, "stale_duplicates" if cset.repeat else "timeouts",
                       f"{len(cset.parts)} of {cset.count} chunks after "
                       f"{now - cset.last:.0f} s without one", quiet=cset.repeat)
        while self._done and next(iter(self._done.values())) < now - self.timeout:
            self._done.popitem(last=False)
        return len(stale)

    def snapshot(self, now: float | None = None) -> dict[str, int]:
        """Counters plus what is held now (for logs and metrics)."""
        self.expire(time.monotonic() if now is None else now)
        return {**self.stats, "sets_in_flight": len(self._sets), "bytes_held": self.held}

    # -- internals ---------------------------------------------------------------------------
    def _misfit(self, cset: _Set, index: int, size: int) -> str:
        """Why a chunk cannot belong to its set ("" if it can). All chunks but the last have
        one size S, and the last has total - (count - 1) * S, between 1 and S bytes."""
        if cset.received + size > cset.total:
            return f"{cset.received + size} bytes > the announced {cset.total}"
        rest = cset.count - 1
        if index < rest:
            if cset.chunk_size and size != cset.chunk_size:
                return f"{size} bytes, the set's other chunks have {cset.chunk_size}"
            if not 1 <= cset.total - rest * size <= size:
                return f"{cset.count} chunks of {size} bytes do not make {cset.total}"
            if cset.last_size and rest * size + cset.last_size != cset.total:
                return f"chunks of {size} bytes do not fit the last one's {cset.last_size}"
        elif cset.chunk_size and rest * cset.chunk_size + size != cset.total:
            return f"last chunk of {size} bytes does not make {cset.total}"
        elif rest == 0 and size != cset.total:
            return f"a single chunk of {size} bytes, announced {cset.total}"
        return ""

    def _finish(self, key: tuple[str, bytes], cset: _Set, retained: bool,
                now: float) -> Reassembled | None:
        del self._sets[key]
        self.held -= cset.held
        if cset.received != cset.total:
            return self._refuse("inconsistent", cset.base, f"{cset.received} bytes in "
                                f"{cset.count} chunks, announced {cset.total}")
        if set_digest(cset.digests[i] for i in range(cset.count)) != cset.digest:
            return self._refuse("bad_hash", cset.base, f"{cset.count} chunks, "
                                f"{cset.total} bytes")
        payload = b"".join(cset.parts[i] for i in range(cset.count))
        self._done[key] = now
        self._done.move_to_end(key)
        while len(self._done) > 256:
            self._done.popitem(last=False)
        self.stats["messages"] += 1
        return Reassembled(cset.base, payload, retained)

    def _limit_sender(self, owner: str) -> None:
        mine = sorted((s.last, k) for k, s in self._sets.items() if s.owner == owner)
        while len(mine) >= self.max_sets_per_sender:
            _, key = mine.pop(0)
            self._drop(key, "evicted_per_sender", f"more than {self.max_sets_per_sender} "
                       f"sets in flight from {owner}")

    def _make_room(self, cost: int, now: float) -> None:
        while self.held + cost > self.max_held_bytes and self._sets:
            per_sender: Counter[str] = Counter()
            for s in self._sets.values():
                per_sender[s.owner] += s.held
            greedy = per_sender.most_common(1)[0][0]
            key = min((k for k, s in self._sets.items() if s.owner == greedy),
                      key=lambda k: self._sets[k].last)
            self._drop(key, "evicted_memory", f"{self.held} bytes held, cap "
                       f"{self.max_held_bytes}")

    def _drop(self, key: tuple[str, bytes], reason: str, detail: str,
              quiet: bool = False) -> None:
        cset = self._sets.pop(key)
        self.held -= cset.held
        self.stats[reason] += 1
        log.log(logging.DEBUG if quiet else logging.WARNING,
                "dropped a chunked message on %s (%s): %s", cset.base, reason, detail)

    def _forget_if_empty(self, key: tuple[str, bytes], cset: _Set) -> None:
        if not cset.parts:
            del self._sets[key]

    def _refuse(self, reason: str, topic: str, detail: str) -> None:
        self.stats[reason] += 1
        log.warning("refused chunk on %s (%s): %s", topic, reason, detail)
        return None
