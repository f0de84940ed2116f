#!/usr/bin/env python3
"""Write the golden vectors of the fleetfl wire (PROTOCOL.md, issue 18) to tests/golden/.

Deterministic: fixed sequence numbers, timestamps and values, and a fixed Ed25519 key made for
these vectors only (Ed25519 signatures are deterministic), so running it again rewrites the
same bytes; tests/test_golden_vectors.py checks that, and that the Python codec decodes every
valid vector to its description and refuses every invalid one with its reason.

    .venv/bin/python scripts/golden-vectors.py [--out tests/golden]

Every vector exists in protocol version 2 (the current layout) and in version 1 (still read
for one release, PROTOCOL.md section 19); each entry of vectors.json says its `proto`. Layout
of the folder:
    vectors.json                  one entry per vector: file(s), context, what it holds or
                                  the reason it must be refused for
    valid/<kind>.bin              every kind, unsigned (version 2)
    valid/<kind>.signed.bin       every kind, signed with the test key
    chunked/<name>/<i>.bin        chunk i of a message split for a small packet limit
    invalid/<name>.bin            refused, each with its reason
    v1/valid, v1/chunked, v1/invalid   the same in version 1
    compressed/                   compressed payloads (PROTOCOL.md 15.5, version 2 only),
                                  indexed apart in compressed.json: valid/, invalid/ (refused by
                                  the codec) and payload/ (decodes, refused by the payload)
    TEST-ONLY-ed25519.key/.pub    the test key (NEVER use it for anything but these vectors)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from pathlib import Path

import msgpack
import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetfl.shared.core.base import update_message
from fleetfl.shared.core.choices import Compression
from fleetfl.shared.core.messages import (
    COORDINATOR_ID,
    PROTOCOL_VERSION,
    PROTOCOL_VERSIONS,
    Kind,
    Message,
)
from fleetfl.shared.core.quantized import make_quantizer
from fleetfl.shared.wire import chunking
from fleetfl.shared.wire.codec import encode
from fleetfl.shared.wire.layout import (
    MAX_DEPTH,
    PREFIX,
    edit_header,
    join,
    placements,
    read_header,
)
from fleetfl.shared.wire.signing import DOMAINS, Signer
from fleetfl.shared.wire.topics import Topics

ROOT = Path(__file__).resolve().parents[1]
RUN = "golden"
AGENT = "pi01"
N = 6  # the model's parameter count in every vector
TS = 1767225600.0  # 2026-01-01T00:00:00Z: the signed vectors' timestamp
FUTURE_TS = 4102444800.0  # 2100-01-01: stamped ahead of any clock that reads these
SEQ = 1767225600000001  # an agent's first seq: microseconds since the epoch at its start
KEY_SEED = hashlib.sha256(b"fleetfl golden vectors: TEST ONLY, NEVER A REAL KEY").digest()
CHUNK_PACKET_BYTES = 180  # a packet limit that splits the chunked vectors into a few chunks


def test_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(KEY_SEED)


def nested(levels: int) -> object:
    """`levels` arrays, one inside the other, around a 1: [[...[1]...]]."""
    value: object = 1
    for _ in range(levels):
        value = [value]
    return value


# hello.fields.capabilities is level 3 of the header (the header map is 1): a free-form
# value there reaches the depth limit (PROTOCOL.md section 5) with MAX_DEPTH - 3 more levels
CAPABILITY_LEVEL = 3


def values(n: int, start: float = -0.5, step: float = 0.25) -> np.ndarray:
    return (start + step * np.arange(n)).astype(np.float32)


def samples() -> list[tuple[str, Message]]:
    """(name, message): every kind, with its optional fields and arrays where it has them."""
    job = {"algo": "fedavg", "task": "digits", "task_fingerprint": "digits@1:0123456789abcdef",
           "local_steps": 20, "period": 10, "delay": 2, "lr": 0.05, "momentum": 0.9,
           "optimizer": "sgd", "batch_size": 32, "partition": "iid", "alpha": 0.5, "seed": 0,
           "payload": "", "rate": 0.1, "rate_walk": False, "fda_variant": "linear",
           "fda_theta": 0.0, "rtc_steps": 5, "lbgm_threshold": 0.2}
    a, c = AGENT, COORDINATOR_ID
    profile = {"f": [0.001, 0.002], "b": [0.002, 0.004]}
    return [
        ("hello", Message(Kind.HELLO, RUN, a, SEQ + 1, 3, {
            "samples": 1000, "first_window": 4, "validation_samples": 200,
            "capabilities": {"protocols": [1, 2], "cpus": 4, "machine": "aarch64",
                             "torch": "2.13.0", "slowdown": 1.0, "profile": profile}})),
        ("hello.deepest", Message(Kind.HELLO, RUN, a, SEQ + 1, 3, {
            "samples": 1000, "first_window": 4, "capabilities": {
                "protocols": [1, 2], "nested": nested(MAX_DEPTH - CAPABILITY_LEVEL)}})),
        ("offline", Message(Kind.OFFLINE, RUN, a, SEQ, 0)),
        ("refused", Message(Kind.REFUSED, RUN, a, SEQ + 1, 0, {
            "reason": "task sensor@2 not installed here", "task": "sensor@2:00ff00ff00ff00ff"})),
        ("update", Message(Kind.UPDATE, RUN, a, SEQ + 2, 3, {
            "window": 4, "samples": 1000, "steps": 20, "step_seconds": 0.0125},
            {"delta": values(N, -0.01, 0.004)})),
        ("update.lbgm", Message(Kind.UPDATE, RUN, a, SEQ + 3, 4, {
            "window": 5, "samples": 1000, "steps": 20, "scalars": [[0.5, 4], None]},
            {"delta": values(2, 0.125, 0.125)})),
        ("update.suffix", Message(Kind.UPDATE, RUN, a, SEQ + 4, 5, {
            "window": 6, "samples": 1000, "steps": 20, "first_layer": 1, "step_seconds": 0.5},
            {"delta": values(3, 1.0, -0.5)})),
        ("fda_state", Message(Kind.FDA_STATE, RUN, a, SEQ + 5, 5, {
            "step": 10, "drift_sq": 0.0, "projection": -0.25})),
        ("fda_state.sketch", Message(Kind.FDA_STATE, RUN, a, SEQ + 6, 5, {
            "step": 15, "drift_sq": 2.5}, {"sketch": values(10, 0.0, 0.5).reshape(2, 5)})),
        ("metrics", Message(Kind.METRICS, RUN, a, SEQ + 7, 5, {
            "version": 5, "samples": 200, "values": {"loss": 0.375, "accuracy": 0.875}})),
        ("model", Message(Kind.MODEL, RUN, c, SEQ, 3, {
            "version": 3, "next_window": 4, "job": job}, {"params": values(N)})),
        ("model.fda_linear", Message(Kind.MODEL, RUN, c, SEQ + 1, 3, {
            "version": 3, "next_window": 4, "job": {**job, "algo": "fda"}},
            {"params": values(N), "last_avg": values(N, 0.0625, -0.0125)})),
        ("avg", Message(Kind.AVG, RUN, c, SEQ + 2, 3, {
            "window": 4, "version": 4, "contributors": ["pi01", "pi02"]},
            {"delta": values(N, 0.01, -0.002)})),
        ("sync", Message(Kind.SYNC, RUN, c, SEQ + 3, 4, {
            "version": 4, "window": 5, "estimate": 1.0})),
        ("assign", Message(Kind.ASSIGN, RUN, c, SEQ + 4, 0, {
            "window": 6, "first_layer": {"pi01": 1, "pi02": -1}, "deadline": 2.0})),
        ("stop", Message(Kind.STOP, RUN, c, SEQ + 5, 9, {"reason": "max_versions reached"})),
        ("evaluate", Message(Kind.EVALUATE, RUN, c, SEQ + 6, 4, {"version": 4},
                             {"params": values(N, 0.5, 0.125)})),
        ("refusal", Message(Kind.REFUSAL, RUN, c, SEQ + 7, 4, {
            "agent": "pi01", "reason": "window_ahead", "seq": SEQ + 2, "refused_kind": "update",
            "detail": "window 9, open is 5", "suppressed": 0})),
    ]


def folder(proto: int) -> str:
    """Where a version's vectors live: the current one at the top, older ones in v<N>/."""
    return "" if proto == PROTOCOL_VERSION else f"v{proto}/"


def offsets(payload: bytes) -> tuple[int, int, dict[str, int], int]:
    """(where the header starts, its length h, each array's offset, where the arrays and
    their padding end) of a valid payload."""
    proto, header, end = read_header(payload, len(payload))
    arrays = header["arrays"]
    sizes = [np.dtype(spec["dtype"]).itemsize * math.prod(spec["shape"])
             for spec in arrays.values()]
    starts, stop = placements(proto, end, sizes)
    begin = 0 if proto == 1 else PREFIX.size
    return begin, end - begin, dict(zip(arrays, starts, strict=True)), stop


def describe(msg: Message, payload: bytes, signed: bool, proto: int) -> dict:
    topic, retain = Topics(RUN).for_outgoing(msg)
    begin, length, starts, end = offsets(payload)
    return {
        "kind": str(msg.kind), "proto": proto, "run": msg.run, "sender": msg.sender,
        "seq": msg.seq, "base_version": msg.base_version, "fields": msg.fields,
        "arrays": {name: {"shape": list(a.shape), "first": [float(v) for v in a.reshape(-1)[:4]],
                          "sha256": hashlib.sha256(np.ascontiguousarray(a, wire_dtype(a))
                                                   .tobytes()).hexdigest(),
                          "offset": starts[name]}
                   for name, a in msg.arrays.items()},
        "signed": signed, "ts": TS if signed else None, "topic": topic, "retain": retain,
        "header_offset": begin, "header_bytes": length, "arrays_end": end,
        "total_bytes": len(payload),
    }


def wire_dtype(a: np.ndarray) -> str:
    """Integer arrays (compressed payloads) travel as they are, everything else as "<f4"."""
    return a.dtype.str if a.dtype.kind in "iu" else "<f4"


CONTEXT = {"run": RUN, "model_size": N, "max_bytes": 64 * 1024 * 1024, "keys": False}
# with keys: the test key for pi01 and the coordinator; the vectors' fixed ts is not aged
KEYED = {**CONTEXT, "keys": True, "check_age": False}


Invalid = tuple[str, bytes, str, dict, str]  # (name, payload, reason, context, what is wrong)


def invalid(valid: dict[str, bytes], signed: dict[str, bytes], proto: int) -> list[Invalid]:
    """What every version must refuse, made from that version's valid vectors."""
    upd, hello, fda = valid["update"], valid["hello"], valid["fda_state"]

    def setter(path: str, value):
        def change(h):
            target = h
            keys = path.split(".")
            for k in keys[:-1]:
                target = target[k]
            target[keys[-1]] = value
        return change

    def dropper(path: str):
        def change(h):
            target = h
            keys = path.split(".")
            for k in keys[:-1]:
                target = target[k]
            del target[keys[-1]]
        return change

    begin, length, starts, _ = offsets(upd)
    head_end, delta = begin + length, starts["delta"]
    nan = bytearray(upd)
    nan[delta + 4:delta + 8] = np.array([math.nan], "<f4").tobytes()
    flipped = bytearray(signed["update"])
    flipped[offsets(signed["update"])[2]["delta"]] ^= 0x01  # one bit of the first value
    ext = join(proto, {"proto": proto, "kind": "hello", "run": RUN, "sender": AGENT, "seq": 1,
                       "base_version": 0, "fields": {"samples": msgpack.ExtType(1, b"x"),
                                                     "first_window": 1}, "arrays": {}}, b"")
    other = 3 - proto  # the other version's proto in this version's layout
    return [
        ("oversized", upd, "oversized", {**CONTEXT, "max_bytes": 64},
         "larger than the receiver's max_message_bytes (64 here)"),
        ("not_a_map", join(proto, [1, "hello"], b""), "malformed", CONTEXT,
         "the header is a msgpack array, not a map"),
        ("header_cut", upd[:head_end - 3], "malformed", CONTEXT, "the header map is cut short"),
        ("binary_in_header", edit_header(hello, setter("fields.capabilities.blob", b"\x00\x01")),
         "malformed", CONTEXT, "a msgpack bin value in the header"),
        ("extension_in_header", ext, "malformed", CONTEXT, "a msgpack extension value"),
        ("integer_key", edit_header(hello, setter("fields.capabilities", {1: "x"})), "malformed",
         CONTEXT, "a map key that is not a str"),
        ("header_over_64k", edit_header(hello, setter("fields.capabilities.pad", "x" * 65600)),
         "malformed", CONTEXT, "a header longer than 65,536 bytes"),
        ("nested_too_deep", edit_header(hello, setter(
            "fields.capabilities.nested", nested(MAX_DEPTH - CAPABILITY_LEVEL + 1))),
         "malformed", CONTEXT, f"arrays nested {MAX_DEPTH + 1} levels deep (the header map is "
         f"level 1; at most {MAX_DEPTH})"),
        ("map_over_1024", edit_header(hello, setter("fields.capabilities",
                                               {f"k{i}": i for i in range(1025)})),
         "malformed", CONTEXT, "a map of 1,025 entries"),
        ("missing_envelope_key", edit_header(upd, dropper("base_version")), "malformed", CONTEXT,
         "no base_version"),
        ("arrays_inside_map", edit_header(upd, setter("arrays.delta.data",
                                                 upd[delta:delta + 4 * N])),
         "malformed", CONTEXT, "the array's bytes inside the map as {dtype, shape, data: bin} "
         "(an old README's wrong layout): bin is not allowed in the header"),
        ("arrays_as_float_list", edit_header(upd, setter("arrays.delta.data", [0.0] * N)),
         "bad_array", CONTEXT, "the array inside the map as {dtype, shape, data: [floats]}"),
        (f"proto_{other}", edit_header(upd, setter("proto", other)), "bad_protocol", CONTEXT,
         f"proto {other} in a version-{proto} layout"),
        ("unknown_kind", edit_header(upd, setter("kind", "gossip")), "unknown_kind", CONTEXT,
         "kind gossip"),
        ("seq_as_float", edit_header(upd, setter("seq", float(SEQ))), "bad_type", CONTEXT,
         "seq written as a float"),
        ("int_for_float", edit_header(fda, setter("fields.drift_sq", 0)), "bad_type", CONTEXT,
         "drift_sq 0.0 written as the integer 0 (what JS writers do by default)"),
        ("float_for_int", edit_header(upd, setter("fields.window", 4.0)), "bad_type", CONTEXT,
         "window written as the float 4.0"),
        ("bool_for_int", edit_header(upd, setter("fields.samples", True)), "bad_type", CONTEXT,
         "samples written as true"),
        ("other_run", edit_header(upd, setter("run", "other")), "other_run", CONTEXT,
         "run 'other'"),
        ("bad_sender", edit_header(upd, setter("sender", "../pi01")), "bad_sender", CONTEXT,
         "sender '../pi01' is not an id"),
        ("negative_seq", edit_header(upd, setter("seq", -1)), "bad_value", CONTEXT, "seq -1"),
        ("extra_field", edit_header(upd, setter("fields.priority", 1)), "bad_field", CONTEXT,
         "a field update does not have"),
        ("missing_field", edit_header(upd, dropper("fields.steps")), "bad_field", CONTEXT,
         "update without steps"),
        ("unknown_array", edit_header(upd, lambda h: h["arrays"].update(
            extra=h["arrays"].pop("delta"))), "bad_array", CONTEXT, "array named 'extra'"),
        ("float64_dtype", edit_header(upd, setter("arrays.delta.dtype", "<f8")), "bad_dtype",
         CONTEXT, "dtype <f8"),
        ("empty_shape", edit_header(upd, setter("arrays.delta.shape", [])), "bad_shape", CONTEXT,
         "shape []"),
        ("larger_than_model", edit_header(valid["model"], setter("arrays.params.shape", [N + 1]))
         + b"\x00" * 4, "bad_shape", CONTEXT, f"params of {N + 1} values, the model has {N}"),
        ("trailing_byte", upd + b"\x00", "bad_shape", CONTEXT, "one byte after the arrays"),
        ("truncated", upd[:-1], "truncated", CONTEXT, "the last byte missing"),
        ("nan", bytes(nan), "not_finite", CONTEXT, "a NaN in delta"),
        ("unknown_sig_scheme", edit_header(signed["update"], setter("sig", "rsa")), "malformed",
         CONTEXT, "sig 'rsa'"),
        ("sig_without_ts", edit_header(signed["update"], dropper("ts")), "malformed", CONTEXT,
         "sig without ts"),
        ("unsigned_with_keys", upd, "unsigned", KEYED, "no signature where keys are set"),
        ("unknown_key", edit_header(signed["update"], setter("sender", "pi02")), "unknown_key",
         KEYED, "signed by pi02, which has no key"),
        ("bad_signature", bytes(flipped), "bad_signature", KEYED,
         "one bit of the first array value changed after signing"),
        ("too_old", signed["update"], "too_old", {**KEYED, "check_age": True},
         f"ts {TS:.0f}, checked against the clock with max_message_age 300 s"),
        ("from_future", encode(next(m for n, m in samples() if n == "update"),
                               Signer(test_key()), ts=FUTURE_TS, proto=proto), "from_future",
         {**KEYED, "check_age": True}, f"ts {FUTURE_TS:.0f} (2100), far ahead of the clock"),
    ]


def invalid_v2(valid: dict[str, bytes], signed: dict[str, bytes]) -> list[Invalid]:
    """What only the version-2 layout can get wrong: prefix, header length, padding."""
    upd, hello = valid["update"], valid["hello"]
    begin, length, starts, end = offsets(upd)
    head_end, delta = begin + length, starts["delta"]

    def poked(payload: bytes, at: int) -> bytes:
        assert payload[at] == 0, "not a padding byte"
        return payload[:at] + b"\x01" + payload[at + 1:]

    def prefixed(payload: bytes, version: int, h: int) -> bytes:
        return PREFIX.pack(b"FLM", version, h) + payload[PREFIX.size:]

    assert delta > head_end and end > delta + 4 * N, "the update has no padding to spoil"
    resigned = bytearray(signed["update"])  # a v2 message signed with version 1's domain tag
    resigned[-64:] = test_key().sign(DOMAINS[1] + hashlib.sha256(resigned[:-64]).digest())
    return [
        ("padding_after_header", poked(upd, head_end), "malformed", CONTEXT,
         "a nonzero byte between the header and the first array"),
        ("padding_after_array", poked(upd, end - 1), "malformed", CONTEXT,
         "a nonzero byte in the padding after the last array"),
        ("padding_before_signature", poked(signed["update"], len(signed["update"]) - 65),
         "malformed", CONTEXT, "a nonzero padding byte just before the signature"),
        ("header_length_short", prefixed(upd, 2, length - 1), "malformed", CONTEXT,
         "the prefix says the header is one byte shorter than its map"),
        ("header_length_long", prefixed(upd, 2, length + 1), "malformed", CONTEXT,
         "the prefix says the header is one byte longer than its map"),
        ("header_length_beyond_payload", prefixed(hello, 2, len(hello)), "malformed", CONTEXT,
         "the prefix's header length runs past the end of the message"),
        ("header_length_over_limit", prefixed(upd, 2, 65537), "malformed", CONTEXT,
         "the prefix's header length is 65,537, above the 65,536 a device may send"),
        ("magic_version_3", prefixed(upd, 3, length), "bad_protocol", CONTEXT,
         "FLM with layout version 3"),
        ("magic_version_1", prefixed(upd, 1, length), "bad_protocol", CONTEXT,
         "FLM with layout version 1 (version 1 has no prefix)"),
        ("bad_magic", b"FLX" + upd[3:], "malformed", CONTEXT,
         "FLX: neither the prefix nor a msgpack map"),
        ("prefix_cut", upd[:6], "malformed", CONTEXT, "6 bytes: the prefix cut short"),
        ("truncated_in_array", upd[:delta + 4], "truncated", CONTEXT,
         "cut after the first value of delta"),
        ("signed_with_v1_tag", bytes(resigned), "bad_signature", KEYED,
         "signed over fleetfl-sig-v1 instead of fleetfl-sig-v2"),
    ]


def write(out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    for proto in PROTOCOL_VERSIONS:
        for sub in ("valid", "invalid", "chunked"):
            (out / folder(proto) / sub).mkdir(parents=True, exist_ok=True)
            for old in (out / folder(proto) / sub).rglob("*.bin"):
                old.unlink()
    key = test_key()
    (out / "TEST-ONLY-ed25519.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (out / "TEST-ONLY-ed25519.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    entries = []
    for proto in sorted(PROTOCOL_VERSIONS, reverse=True):  # the current version first
        entries += version_entries(out, proto, Signer(key))
    index = {
        "about": "fleetfl wire golden vectors, protocol versions 2 (current) and 1 (still "
                 "read), PROTOCOL.md. Written by scripts/golden-vectors.py; checked by "
                 "tests/test_golden_vectors.py.",
        "protocol": PROTOCOL_VERSION,
        "protocols": sorted(PROTOCOL_VERSIONS, reverse=True),
        "model_size": N,
        "test_key": "TEST-ONLY-ed25519.key (public: .pub) signs every signed vector, as pi01 "
                    "and as the coordinator. Made from a fixed seed for these vectors only: "
                    "never trust it anywhere else.",
        "context": "what the receiver expects: run, model_size, max_bytes; keys: the test key "
                   "for pi01 and coordinator, nothing else; check_age false: the vectors' "
                   "fixed ts is not aged (true: max_message_age 300 s, 60 s ahead at most)",
        "expect": "offsets are from the payload's start: header_offset (8 in version 2, after "
                  "the prefix; 0 in version 1), header_bytes (h), each array's offset, "
                  "arrays_end (where the signature starts, or the end)",
        "vectors": entries,
    }
    (out / "vectors.json").write_text(json.dumps(index, indent=1, sort_keys=False) + "\n")
    return index


def version_entries(out: Path, proto: int, signer: Signer) -> list[dict]:
    """The vectors of one protocol version, written under folder(proto)."""
    where, entries, valid, signed = folder(proto), [], {}, {}
    for name, msg in samples():
        for is_signed in (False, True):
            payload = encode(msg, signer if is_signed else None, ts=TS, proto=proto)
            (valid if not is_signed else signed)[name] = payload
            file = f"{where}valid/{name}{'.signed' if is_signed else ''}.bin"
            (out / file).write_bytes(payload)
            entries.append({"name": f"{where}{name}{'.signed' if is_signed else ''}",
                            "proto": proto, "files": [file],
                            "context": KEYED if is_signed else CONTEXT,
                            "expect": describe(msg, payload, is_signed, proto)})
    for name, is_signed in (("update", False), ("model", True)):
        msg = next(m for n, m in samples() if n == name)
        payload = signed[name] if is_signed else valid[name]
        topic, retain = Topics(RUN).for_outgoing(msg)
        parts = chunking.split(topic, payload, retain, CHUNK_PACKET_BYTES)
        chunks = f"{where}chunked/{name}{'.signed' if is_signed else ''}"
        (out / chunks).mkdir(exist_ok=True)
        files = []
        for i, (_, chunk) in enumerate(parts):
            files.append(f"{chunks}/{i}.bin")
            (out / files[-1]).write_bytes(chunk)
        entries.append({"name": chunks, "proto": proto, "files": files,
                        "whole": f"{where}valid/{name}{'.signed' if is_signed else ''}.bin",
                        "chunk_topics": [t for t, _ in parts],
                        "max_packet_bytes": CHUNK_PACKET_BYTES,
                        "context": KEYED if is_signed else CONTEXT,
                        "expect": describe(msg, payload, is_signed, proto)})
    refused = invalid(valid, signed, proto) + (invalid_v2(valid, signed) if proto == 2 else [])
    for name, payload, reason, context, what in refused:
        file = f"{where}invalid/{name}.bin"
        (out / file).write_bytes(payload)
        entries.append({"name": f"{where}{name}", "proto": proto, "files": [file],
                        "context": context, "refused": reason, "what": what})
    return entries


# -- compressed payloads (PROTOCOL.md 15.5) ------------------------------------------------------
LAYERS = [4, 2]  # the layer table of the compressed vectors: two layers over the N values
COMPRESSED = {"q8": {"compress": "q8"}, "q4": {"compress": "q4"},
              "topk": {"compress": "topk", "topk_density": 0.5}}


def compressed_arrays(kind: str, v: np.ndarray) -> dict[str, np.ndarray]:
    job = COMPRESSED[kind]
    return make_quantizer(Compression(job["compress"]), job.get("topk_density", 0.01)).pack(
        v, LAYERS)[0]


def compressed_update(kind: str, arrays: dict | None = None) -> Message:
    msg = update_message(RUN, AGENT, 3, 4, 1000, 20,
                         arrays or compressed_arrays(kind, values(N, -0.5, 0.3)))
    msg.seq = SEQ + 2
    return msg


def compressed_entries(out: Path, signer: Signer) -> list[dict]:
    """Every compressed form, valid and invalid, in version 2 under compressed/."""
    where = "compressed/"
    for sub in ("valid", "invalid", "payload"):
        (out / where / sub).mkdir(parents=True, exist_ok=True)
        for old in (out / where / sub).glob("*.bin"):
            old.unlink()
    avg = Message(Kind.AVG, RUN, COORDINATOR_ID, SEQ + 2, 3, {
        "window": 4, "version": 4, "contributors": ["pi01", "pi02"]},
        compressed_arrays("q8", values(N, 0.01, -0.004)))
    valid = [(f"update.{k}", compressed_update(k), k, False) for k in COMPRESSED]
    valid += [("update.q8.signed", compressed_update("q8"), "q8", True),
              ("avg.q8", avg, "q8", False)]
    entries, payloads = [], {}
    for name, msg, kind, signed in valid:
        payload = encode(msg, signer if signed else None, ts=TS)
        payloads[name] = payload
        (out / f"{where}valid/{name}.bin").write_bytes(payload)
        expect = describe(msg, payload, signed, PROTOCOL_VERSION)
        for array, spec in expect["arrays"].items():
            spec["dtype"] = wire_dtype(msg.arrays[array])
        entries.append({"name": f"{where}{name}", "proto": PROTOCOL_VERSION,
                        "files": [f"{where}valid/{name}.bin"], "payload": COMPRESSED[kind],
                        "layers": LAYERS, "context": KEYED if signed else CONTEXT,
                        "expect": expect})

    def topk(indices: list[int]) -> bytes:
        return encode(compressed_update("topk", {
            "delta": values(3, 0.5, 0.25), "indices": np.array(indices, np.uint32)}), ts=TS)

    q8 = compressed_update("q8")
    nan_scale = dict(q8.arrays, scales=np.array([math.nan, 0.01], np.float32))
    v1 = encode(next(m for n, m in samples() if n == "update"), proto=1)
    codec = [
        ("topk_index_out_of_range", topk([1, 4, N]), "bad_value", f"index {N}, the model has "
         f"{N} values"),
        ("topk_unsorted_indices", topk([4, 1, 5]), "bad_value", "indices 4, 1, 5"),
        ("topk_repeated_index", topk([1, 1, 5]), "bad_value", "indices 1, 1, 5"),
        ("q8_nan_scale", encode(compressed_update("q8", nan_scale), ts=TS), "not_finite",
         "a NaN scale"),
        ("q8_int16_codes", edit_header(payloads["update.q8"], lambda h: h["arrays"]["delta"]
                                       .update(dtype="<i2")), "bad_dtype", "codes as <i2"),
        ("indices_as_f4", edit_header(payloads["update.topk"], lambda h: h["arrays"]["indices"]
                                      .update(dtype="<f4")), "bad_dtype", "indices as <f4"),
        ("v1_int8_delta", edit_header(v1, lambda h: h["arrays"]["delta"].update(dtype="|i1")),
         "bad_dtype", "an int8 delta in a version-1 message"),
        ("v1_scales", edit_header(v1, lambda h: h["arrays"].update(
            scales={"dtype": "<f4", "shape": [0]})), "bad_array",
         "a scales array in a version-1 message"),
    ]
    short_q4 = dict(compressed_arrays("q4", values(N, -0.5, 0.3)))
    short_q4["delta"] = short_q4["delta"][:-1]
    minus_128 = dict(q8.arrays, delta=np.array([-128, 0, 0, 0, 0, 0], np.int8))
    dense_topk = {"delta": values(4, 0.5, 0.25), "indices": np.arange(4, dtype=np.uint32)}
    payload_level = [
        ("q4_wrong_byte_count", compressed_update("q4", short_q4), "q4", "bad_shape",
         f"2 bytes for {N} codes (needs 3)"),
        ("q8_wrong_code_count", compressed_update("q8", dict(q8.arrays, delta=q8["delta"][:5])),
         "q8", "bad_shape", f"5 codes for {N} values"),
        ("q8_code_minus_128", compressed_update("q8", minus_128), "q8", "bad_value",
         "code -128"),
        ("topk_densified", compressed_update("topk", dense_topk), "topk", "bad_shape",
         "4 values where k = ceil(0.5 x 6) = 3"),
    ]
    for name, payload, reason, what in codec:
        (out / f"{where}invalid/{name}.bin").write_bytes(payload)
        entries.append({"name": f"{where}{name}", "proto": PROTOCOL_VERSION if "v1" not in name
                        else 1, "files": [f"{where}invalid/{name}.bin"], "context": CONTEXT,
                        "refused": reason, "what": what})
    for name, msg, kind, reason, what in payload_level:
        (out / f"{where}payload/{name}.bin").write_bytes(encode(msg, ts=TS))
        entries.append({"name": f"{where}{name}", "proto": PROTOCOL_VERSION,
                        "files": [f"{where}payload/{name}.bin"], "context": CONTEXT,
                        "payload": COMPRESSED[kind], "layers": LAYERS,
                        "refused_by_payload": reason, "what": what})
    return entries


def write_compressed(out: Path) -> dict:
    index = {
        "about": "fleetfl compressed payloads (PROTOCOL.md 15.5), protocol version 2 only: "
                 "valid/ decode to their description (dtype per array); invalid/ are refused "
                 "by the codec with `refused`; payload/ decode, then the coordinator's payload "
                 "decoder for `payload` (job keys) over `layers` refuses them with "
                 "`refused_by_payload`. Written by scripts/golden-vectors.py.",
        "model_size": N, "layers": LAYERS,
        "vectors": compressed_entries(out, Signer(test_key())),
    }
    (out / "compressed.json").write_text(json.dumps(index, indent=1) + "\n")
    return index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "golden")
    args = parser.parse_args()
    index = write(args.out)
    compressed = write_compressed(args.out)
    print(f"{len(index['vectors'])} vectors and {len(compressed['vectors'])} compressed ones "
          f"in {args.out}")


if __name__ == "__main__":
    main()
