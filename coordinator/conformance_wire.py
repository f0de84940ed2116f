"""fl-conformance's wire tools: encode in a chosen protocol version, tell a payload's layout,
rewrite a header, and the downlink messages a conforming device must ignore.

The checker plays the coordinator with the codec's own encoder; what it sends wrong is made by
rewriting a valid message's header (or bytes), so each bad message breaks one rule only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fleetfl.shared.core.messages import COORDINATOR_ID, Kind, Message
from fleetfl.shared.wire import chunking, codec, layout
from fleetfl.shared.wire.topics import Topics

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "golden"


def encode_as(msg: Message, version: int) -> bytes:
    """`msg` in protocol `version` (the codec's public encoder)."""
    msg.proto = version
    return codec.encode(msg, proto=version)


def layout_of(payload: bytes) -> int:
    """The layout a payload uses: 2 for the "FLM\\x02" prefix, else 1 (a msgpack map)."""
    return 2 if payload[:4] == layout.MAGIC + b"\x02" else 1


@dataclass(frozen=True)
class Bad:
    """A downlink message a device must ignore, what it breaks (`why`), as the (topic,
    payload) publishes that carry it (several: chunks)."""

    why: str
    parts: tuple[tuple[str, bytes], ...]

    @classmethod
    def one(cls, why: str, topic: str, payload: bytes) -> Bad:
        return cls(why, ((topic, payload),))


def avg_message(run: str, seq: int, window: int, version: int, delta: np.ndarray,
                contributors: list[str]) -> Message:
    return Message(Kind.AVG, run, COORDINATOR_ID, seq, version - 1,
                   {"window": window, "version": version, "contributors": contributors},
                   {"delta": delta})


def bad_downlink(run: str, seq: int, window: int, size: int, version: int, topics: Topics,
                 agent: str, marker: int) -> list[Bad]:
    """Messages breaking one rule each, aimed at a device waiting for the average of `window`:
    an average it applied would carry a version from `marker` on (never a real one)."""
    def avg(n: int = size, delta: np.ndarray | None = None, w: int = window) -> bytes:
        values = np.full(n, 1e-3, np.float32) if delta is None else delta
        return encode_as(avg_message(run, seq, w, marker + len(out), values, [agent]), version)

    def field(name: str, value: object) -> Callable[[dict], None]:
        return lambda h: h["fields"].__setitem__(name, value)

    out: list[Bad] = []
    mutations: list[tuple[str, Callable[[dict], None]]] = [
        ("another run's average (other_run)", lambda h: h.__setitem__("run", run + "-other")),
        ("protocol 99 (bad_protocol)", lambda h: h.__setitem__("proto", 99)),
        ("window as the float 4.0 (bad_type)", field("window", float(window))),
        ("version as true (bad_type)", field("version", True)),
        ("contributors as a str (bad_type)", field("contributors", agent)),
        ("an extra field (bad_field)", field("extra", 1)),
        ("no contributors (bad_field)", lambda h: h["fields"].pop("contributors")),
        ("an unknown kind (unknown_kind)", lambda h: h.__setitem__("kind", "avg2")),
        ("from an agent, not the coordinator", lambda h: h.__setitem__("sender", agent)),
        ("an invalid sender id (bad_sender)", lambda h: h.__setitem__("sender", "../x")),
        ("a negative seq (bad_value)", lambda h: h.__setitem__("seq", -1)),
        ("dtype <f8 (bad_dtype)", lambda h: h["arrays"]["delta"].__setitem__("dtype", "<f8")),
        ("a bin value in the header (malformed)", field("contributors", [b"\x00"])),
        ("no base_version (malformed)", lambda h: h.pop("base_version")),
    ]
    for why, change in mutations:
        out.append(Bad.one(why, topics.avg, layout.edit_header(avg(), change)))
    good = avg()
    nan, inf = np.full(size, 1e-3, np.float32), np.full(size, 1e-3, np.float32)
    nan[0], inf[-1] = np.nan, np.inf
    out += [
        Bad.one("the last 4 bytes cut (truncated)", topics.avg, good[:-4]),
        Bad.one("4 bytes after the arrays (bad_shape)", topics.avg, good + bytes(4)),
        Bad.one("the header cut in half (malformed)", topics.avg,
                good[:(len(good) - len(layout.split(good)[2])) // 2]),
        Bad.one("a NaN in delta (not_finite)", topics.avg, avg(delta=nan)),
        Bad.one("an infinity in delta (not_finite)", topics.avg, avg(delta=inf)),
        Bad.one("N + 1 values (bad_shape)", topics.avg, avg(size + 1)),
        Bad.one("N - 1 values: a dense average needs N (bad_shape)", topics.avg, avg(size - 1)),
        Bad.one("the average of an earlier window (a duplicate)", topics.avg, avg(w=window - 1)),
        Bad.one("a msgpack array, not a map (malformed)", topics.avg, b"\x93\x01\x02\x03"),
        Bad.one("an empty-looking map (malformed)", topics.avg, b"\x80"),
        Bad.one(f"maps nested {layout.MAX_DEPTH + 1} levels deep (malformed)", topics.avg,
                layout.edit_header(avg(), field("contributors", [agent, nested(
                    layout.MAX_DEPTH - 2)]))),
        # valid, but on another kind's topic: a device MUST ignore it (section 3.2)
        Bad.one("a valid average on down/ctl, not its kind's topic", topics.ctl, avg()),
    ]
    chunks = chunking.split(topics.avg, avg(), False, 1024)
    topic0, first = chunks[0]
    corrupt = first[:-1] + bytes([first[-1] ^ 1])  # the digest no longer matches
    out.append(Bad(f"a chunked average with a corrupted chunk ({len(chunks)} chunks)",
                   ((topic0, corrupt), *chunks[1:])))
    stop = encode_as(Message(Kind.STOP, run, COORDINATOR_ID, seq, 0, {"reason": "x"}), version)
    out += [
        Bad.one("another run's stop (other_run)", topics.ctl,
            layout.edit_header(stop, lambda h: h.__setitem__("run", run + "-other"))),
        Bad.one("a stop with reason 5 (bad_type)", topics.ctl,
                layout.edit_header(stop, field("reason", 5))),
        Bad.one("a valid stop on down/avg, not its kind's topic", topics.avg, stop),
        Bad.one("a refusal of a message of ours: log it, never act on it", topics.refusal(agent),
            encode_as(Message(Kind.REFUSAL, run, COORDINATOR_ID, seq, 0, {
                "agent": agent, "reason": "replayed", "seq": 1, "refused_kind": "update",
                "detail": "fl-conformance: not a real refusal", "suppressed": 0}), version)),
    ]
    out += [Bad.one(f"golden vector {name}", topics.avg, data) for name, data in golden_invalid()]
    return out


def nested(levels: int) -> object:
    """`levels` arrays, one inside the other, around a 0."""
    value: object = 0
    for _ in range(levels):
        value = [value]
    return value


def golden_invalid() -> list[tuple[str, bytes]]:
    """tests/golden's invalid vectors (other run, uplink kinds, broken headers), if present."""
    try:
        vectors = json.loads((GOLDEN / "vectors.json").read_text())["vectors"]
    except (OSError, ValueError, KeyError):
        return []
    return [(v["name"], (GOLDEN / v["files"][0]).read_bytes()) for v in vectors
            if "refused" in v and (GOLDEN / v["files"][0]).is_file()]


def finite_nonnegative(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value >= 0
