"""msgpack <-> Message.

A message is a msgpack map (envelope, fields, and for each array its dtype and shape) and the
arrays' raw little-endian bytes, in the order the map lists them; version 2 puts an 8-byte
prefix with the header's length first and pads every array to a 16-byte offset (layout.py,
PROTOCOL.md section 4). Keeping the bytes after the map rather than inside it means encoding
copies each array once and decoding copies it not at all (numpy views the payload), which
matters for 40 MB models on a Pi. `encode` writes version 2 unless told 1; `decode` reads both.

Decoding never trusts the sender: the map is read with msgpack's size limits from at most
header_max bytes, every field is checked against the kind's schema, arrays against the model
size, the bytes that follow, the padding, dtype (float32; in version 2 also the integer arrays
of compressed payloads, PROTOCOL.md 15.5, with their indices' order) and finiteness. Any
problem raises CodecError with a short reason code (for counters) and a readable detail.

Signed messages (encode with a Signer): the header also carries `ts` (sender's wall clock,
float seconds) and `sig: "ed25519"`, and a 64-byte Ed25519 signature S ends the payload:

    S = Ed25519(sender's key, b"fleetfl-sig-v2\0" || SHA-256(every byte before S))
        (version 1: b"fleetfl-sig-v1\0" || SHA-256(H || A))

The header holds proto, kind, run, sender, seq, base_version, ts, sig, the fields and the
arrays' dtype and shape, so the signature binds run, sender, sequence number, base version,
timestamp and every payload byte. Signing the 32-byte digest rather than the message means one
SHA-256 pass over a large payload on each side (Ed25519 on the whole message would hash it
twice to sign). A receiver with a KeyRing (DecodeContext.keys) refuses messages that are
`unsigned`, from a sender with no key (`unknown_key`), with a signature that does not verify
(`bad_signature`), or whose ts is more than max_age_s old (`too_old`) or more than max_skew_s
ahead of its clock (`from_future`). Checks run cheapest first: the hash comes after every
header, size and padding check, and only then the finiteness scan. A receiver without keys
accepts signed and unsigned messages alike.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass

import msgpack
import numpy as np

from fleetfl.shared.core.messages import (
    ARRAY_DTYPES,
    ARRAY_MODEL,
    ARRAY_SMALL,
    ARRAY_UPTO_MODEL,
    FLOAT_DTYPE,
    SCHEMAS,
    SMALL_ARRAY_MAX,
    V2_ARRAYS,
    Kind,
    Message,
    Schema,
    valid_id,
)
from fleetfl.shared.wire.layout import (
    PREFIX_BYTES,
    CodecError,
    frame,
    nonzero_padding,
    placements,
    read_header,
)
from fleetfl.shared.wire.signing import SIGNATURE_BYTES, KeyRing, Signer

WIRE_DTYPE = FLOAT_DTYPE
# numpy dtype -> wire dtype string of the integer arrays version 2 allows (ARRAY_DTYPES)
INT_DTYPES = {np.dtype(np.int8): "|i1", np.dtype(np.uint8): "|u1",
              np.dtype(np.uint32): "<u4"}
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
ENVELOPE = ("proto", "kind", "run", "sender", "seq", "base_version")
HEADER_MAX = 64 * 1024  # what a device sends: the coordinator reads hostile input
# What the coordinator sends (avg, model, ctl, assignment, refusal): an AVG lists every
# contributor's id, ~70 KB at 10,000 agents, so a device reads a larger header from it.
DOWNLINK_HEADER_MAX = 8 * 1024 * 1024
# hello, offline and refused carry no arrays: a status message is at most the prefix, the
# largest header, its padding and a signature (65,616 bytes; 65,600 in version 1)
MAX_STATUS_BYTES = placements(2, PREFIX_BYTES + HEADER_MAX, [])[1] + SIGNATURE_BYTES
SIG_ALG = "ed25519"
DEFAULT_MAX_AGE_S = 300.0
DEFAULT_MAX_SKEW_S = 60.0


@dataclass(frozen=True)
class DecodeContext:
    """What the receiver expects: its run, the model size (None = not known yet), a size cap,
    and, if `keys` is set, that every message is signed by its sender's key and fresh."""

    run: str
    model_size: int | None = None
    max_bytes: int = DEFAULT_MAX_BYTES
    keys: KeyRing | None = None
    max_age_s: float = DEFAULT_MAX_AGE_S
    max_skew_s: float = DEFAULT_MAX_SKEW_S  # how far ahead of our clock a sender's may be
    # kinds whose ts is not checked (still signed): the coordinator's for the agents' last
    # will, which is signed when the agent starts and published by the broker much later
    ageless: frozenset[Kind] = frozenset()
    # the largest header read: HEADER_MAX from devices, DOWNLINK_HEADER_MAX on a device
    header_max: int = HEADER_MAX


def device_context(run: str, model_size: int | None = None, **kwargs) -> DecodeContext:
    """How a device reads what the coordinator sends: the downlink header limit."""
    return DecodeContext(run, model_size, header_max=DOWNLINK_HEADER_MAX, **kwargs)


def encode(msg: Message, signer: Signer | None = None, ts: float | None = None,
           proto: int | None = None) -> bytes:
    """`signer`: sign the message, stamped with `ts` (default: now, wall clock). `proto`: the
    protocol version to write, 1 or 2 (default: msg.proto, PROTOCOL_VERSION unless set)."""
    proto = msg.proto if proto is None else proto
    dtypes = {name: _wire_dtype(name, a, proto) for name, a in msg.arrays.items()}
    arrays = {name: np.ascontiguousarray(a, dtype=dtypes[name])
              for name, a in msg.arrays.items()}
    header = {
        "proto": proto,
        "kind": str(msg.kind),
        "run": msg.run,
        "sender": msg.sender,
        "seq": msg.seq,
        "base_version": msg.base_version,
        "fields": msg.fields,
        "arrays": {name: {"dtype": dtypes[name], "shape": list(a.shape)}
                   for name, a in arrays.items()},
    }
    if signer is not None:
        header["ts"] = time.time() if ts is None else float(ts)
        header["sig"] = SIG_ALG
    head = msgpack.packb(header, use_bin_type=True)
    parts = frame(proto, head, [a.data.cast("B") for a in arrays.values()])
    if signer is not None:
        digest = hashlib.sha256()
        for part in parts:  # hashed in place: no extra copy of the arrays
            digest.update(part)
        parts.append(signer.sign(digest.digest(), proto))
    return b"".join(parts)


def _wire_dtype(name: str, array: np.ndarray, proto: int) -> str:
    """Floats travel as "<f4"; the integer arrays of compressed payloads keep their type, in
    version 2 and where the array may carry it (ValueError otherwise: a bug, not input)."""
    wire = INT_DTYPES.get(np.asarray(array).dtype, WIRE_DTYPE)
    if wire not in allowed_dtypes(name, proto) or (proto < 2 and name in V2_ARRAYS):
        raise ValueError(f"array {name!r} of {np.asarray(array).dtype} cannot travel in "
                         f"version {proto}")
    return wire


def allowed_dtypes(name: str, proto: int) -> tuple[str, ...]:
    """The dtypes array `name` may carry in version `proto` (PROTOCOL.md 7.3)."""
    return ARRAY_DTYPES.get(name, (WIRE_DTYPE,)) if proto >= 2 else (WIRE_DTYPE,)


def _check_type(where: str, value: object, expected: type | tuple[type, ...]) -> None:
    # bool is an int subclass in Python; a True where a count belongs is a type error.
    if isinstance(value, bool) and bool not in (expected if isinstance(expected, tuple)
                                                 else (expected,)):
        raise CodecError("bad_type", f"{where} is a bool")
    if not isinstance(value, expected):
        raise CodecError("bad_type", f"{where} has type {type(value).__name__}")


def _array_spec(name: str, spec: object, rule: str, model_size: int | None, proto: int
                ) -> tuple[list[int], int, str]:
    """Validated shape, byte length and dtype of one array from its header entry."""
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape"}:
        raise CodecError("bad_array", f"array {name!r} is not {{dtype, shape}}")
    if proto < 2 and name in V2_ARRAYS:
        raise CodecError("bad_array", f"array {name!r} exists in version 2 only")
    allowed = allowed_dtypes(name, proto)
    if spec["dtype"] not in allowed:
        raise CodecError("bad_dtype", f"array {name!r} has dtype {spec['dtype']!r}, "
                                      f"expected {' or '.join(allowed)}")
    shape = spec["shape"]
    if (not isinstance(shape, list) or not shape or len(shape) > 8
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**40
                       for s in shape)):
        raise CodecError("bad_shape", f"array {name!r} has shape {shape!r}")
    count = 1
    for s in shape:
        count *= s
    if rule == ARRAY_SMALL and count > SMALL_ARRAY_MAX:
        raise CodecError("bad_shape", f"array {name!r} has {count} values, at most "
                                      f"{SMALL_ARRAY_MAX} allowed")
    if model_size is not None and (
            (rule == ARRAY_MODEL and count != model_size)
            or (rule == ARRAY_UPTO_MODEL and count > model_size)):
        raise CodecError("bad_shape", f"array {name!r} has {count} values, the model has "
                                      f"{model_size}")
    return shape, count * np.dtype(spec["dtype"]).itemsize, spec["dtype"]


def _check_signature_header(body: dict, kind: Kind, ctx: DecodeContext) -> bool:
    """Whether the message is signed; with keys configured, refuse what cannot pass before
    hashing anything (unsigned, unknown sender, stale or future timestamp)."""
    signed = "sig" in body
    if signed:
        if body["sig"] != SIG_ALG:
            raise CodecError("malformed", f"unknown signature scheme {body['sig']!r}")
        if "ts" not in body:
            raise CodecError("malformed", "signed message without ts")
        _check_type("ts", body["ts"], float)
        if not math.isfinite(body["ts"]):
            raise CodecError("bad_value", "ts is not finite")
    if ctx.keys is None:
        return signed
    sender = body["sender"]
    if not signed:
        raise CodecError("unsigned", f"{kind} from {sender!r} carries no signature")
    if sender not in ctx.keys:
        raise CodecError("unknown_key", f"no public key for {sender!r}")
    if kind not in ctx.ageless:
        age = time.time() - body["ts"]
        if age > ctx.max_age_s:
            raise CodecError("too_old", f"{kind} from {sender!r} is {age:.0f} s old "
                                        f"(limit {ctx.max_age_s:.0f} s)")
        if -age > ctx.max_skew_s:
            raise CodecError("from_future", f"{kind} from {sender!r} is stamped {-age:.0f} s "
                                            f"ahead of this clock (limit {ctx.max_skew_s:.0f} "
                                            "s): check NTP on both")
    return signed


def decode(payload: bytes, ctx: DecodeContext) -> Message:
    """The message in `payload`, checked in full (PROTOCOL.md), or a CodecError naming the
    first thing wrong."""
    if len(payload) > ctx.max_bytes:
        raise CodecError("oversized", f"{len(payload)} bytes > limit {ctx.max_bytes}")
    proto, body, offset = read_header(payload, ctx.header_max)
    kind = _check_envelope(body, ctx, proto)
    signed = _check_signature_header(body, kind, ctx)
    schema = SCHEMAS[kind]
    fields, arrays = body["fields"], body["arrays"]
    if not isinstance(fields, dict) or not isinstance(arrays, dict):
        raise CodecError("malformed", "fields/arrays are not maps")
    _check_fields(kind, schema, fields)
    decoded = _read_arrays(payload, proto, offset, body, kind, schema, signed, ctx)
    return Message(kind=kind, run=body["run"], sender=body["sender"], seq=body["seq"],
                   base_version=body["base_version"], fields=fields, arrays=decoded, proto=proto)


def _check_envelope(body: object, ctx: DecodeContext, layout: int) -> Kind:
    """The envelope's keys, types and values (`proto` must be the layout's version);
    returns the kind."""
    if not isinstance(body, dict):
        raise CodecError("malformed", "message is not a map")
    missing = [k for k in (*ENVELOPE, "fields", "arrays") if k not in body]
    if missing:
        raise CodecError("malformed", f"missing {', '.join(missing)}")
    _check_type("proto", body["proto"], int)
    if body["proto"] != layout:
        raise CodecError("bad_protocol", f"proto {body['proto']!r} in a version-{layout} "
                                         "layout")
    try:
        kind = Kind(body["kind"])
    except ValueError:
        raise CodecError("unknown_kind", f"kind {body['kind']!r}") from None
    for key in ("run", "sender"):
        _check_type(key, body[key], str)
    for key in ("seq", "base_version"):
        _check_type(key, body[key], int)
    if body["run"] != ctx.run:
        raise CodecError("other_run", f"run {body['run']!r}, expected {ctx.run!r}")
    if not valid_id(body["sender"]):
        raise CodecError("bad_sender", f"sender {body['sender']!r}")
    if body["seq"] < 0 or body["base_version"] < 0:
        raise CodecError("bad_value", "negative seq or base_version")
    return kind


def _check_fields(kind: Kind, schema: Schema, fields: dict) -> None:
    extra = set(fields) - set(schema.fields) - set(schema.optional)
    if extra:
        raise CodecError("bad_field", f"unexpected fields {sorted(extra)} for {kind}")
    for name, typ in schema.fields.items():
        if name not in fields:
            raise CodecError("bad_field", f"{kind} lacks field {name!r}")
        _check_type(name, fields[name], typ)
    for name, typ in schema.optional.items():
        if name in fields:
            _check_type(name, fields[name], typ)


def _read_arrays(payload: bytes, proto: int, header_end: int, body: dict, kind: Kind,
                 schema: Schema, signed: bool, ctx: DecodeContext) -> dict[str, np.ndarray]:
    """The arrays after the header (read-only views of `payload`: no copy), once the length,
    the padding and, with keys, the signature are right."""
    arrays = body["arrays"]
    rules = {**schema.arrays, **schema.optional_arrays}
    if not set(schema.arrays) <= set(arrays) <= set(rules):
        raise CodecError("bad_array", f"{kind} carries arrays {sorted(arrays)}, "
                                      f"expected {sorted(schema.arrays)}")
    specs = [(name, *_array_spec(name, spec, rules[name], ctx.model_size, proto))
             for name, spec in arrays.items()]
    sizes = [nbytes for _, _, nbytes, _ in specs]
    starts, end = placements(proto, header_end, sizes)
    need = end + (SIGNATURE_BYTES if signed else 0)
    if len(payload) != need:
        reason = "truncated" if len(payload) < need else "bad_shape"
        raise CodecError(reason, f"arrays{' and signature' if signed else ''} need "
                                 f"{need - header_end} bytes after the header, got "
                                 f"{len(payload) - header_end}")
    view = memoryview(payload)
    gap = nonzero_padding(view, header_end, starts, sizes, end)
    if gap is not None:
        raise CodecError("malformed", f"padding from byte {gap} is not all zeros")
    if ctx.keys is not None:
        digest = hashlib.sha256(view[:end]).digest()  # the one pass over the payload
        if not ctx.keys.verify(body["sender"], digest, bytes(view[end:]), proto):
            raise CodecError("bad_signature", f"{kind} from {body['sender']!r} seq "
                                              f"{body['seq']} is not signed by its key")
    decoded = {}
    for (name, shape, nbytes, dtype), start in zip(specs, starts, strict=True):
        arr = np.frombuffer(view[start:start + nbytes], dtype=dtype).reshape(shape)
        if dtype == WIRE_DTYPE and not np.isfinite(arr).all():
            raise CodecError("not_finite", f"array {name!r} contains NaN or Inf")
        if name == "indices":
            _check_indices(arr, ctx.model_size)
        decoded[name] = arr
    return decoded


def _check_indices(indices: np.ndarray, model_size: int | None) -> None:
    """Top-k indices: strictly increasing, below N (the payload checks the exact bound)."""
    flat = indices.reshape(-1).astype(np.int64)
    if (np.diff(flat) <= 0).any():
        raise CodecError("bad_value", "indices are not strictly increasing")
    if model_size is not None and flat.size and flat[-1] >= model_size:
        raise CodecError("bad_value", f"index {flat[-1]} >= model size {model_size}")
