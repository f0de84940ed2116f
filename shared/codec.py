"""msgpack <-> Message. Arrays travel as {dtype, shape, data: raw little-endian bytes}.

Decoding never trusts the sender: size limits are enforced inside msgpack itself, then every
field is checked against the kind's schema, arrays against the model size, dtype and finiteness.
Any problem raises CodecError with a short reason code (for counters) and a readable detail.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
import numpy as np

from .protocol import ARRAY_MODEL, PROTOCOL_VERSION, SCHEMAS, Kind, Message, valid_id

WIRE_DTYPE = "<f4"
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
ENVELOPE = ("proto", "kind", "run", "sender", "seq", "base_version")


class CodecError(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DecodeContext:
    """What the receiver expects: its run, the model size (None = not known yet), a size cap."""

    run: str
    model_size: int | None = None
    max_bytes: int = DEFAULT_MAX_BYTES


def _pack_array(arr: np.ndarray) -> dict:
    a = np.ascontiguousarray(arr, dtype=WIRE_DTYPE)
    return {"dtype": WIRE_DTYPE, "shape": list(a.shape), "data": a.data}


def encode(msg: Message) -> bytes:
    body = {
        "proto": msg.proto,
        "kind": str(msg.kind),
        "run": msg.run,
        "sender": msg.sender,
        "seq": msg.seq,
        "base_version": msg.base_version,
        "fields": msg.fields,
        "arrays": {name: _pack_array(a) for name, a in msg.arrays.items()},
    }
    return msgpack.packb(body, use_bin_type=True)


def _check_type(where: str, value: object, expected: type | tuple[type, ...]) -> None:
    # bool is an int subclass in Python; a True where a count belongs is a type error.
    if isinstance(value, bool) and bool not in (expected if isinstance(expected, tuple)
                                                 else (expected,)):
        raise CodecError("bad_type", f"{where} is a bool")
    if not isinstance(value, expected):
        raise CodecError("bad_type", f"{where} has type {type(value).__name__}")


def _unpack_array(name: str, spec: object, expected_len: int | None) -> np.ndarray:
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data"}:
        raise CodecError("bad_array", f"array {name!r} is not {{dtype, shape, data}}")
    if spec["dtype"] != WIRE_DTYPE:
        raise CodecError("bad_dtype", f"array {name!r} has dtype {spec['dtype']!r}, "
                                      f"expected {WIRE_DTYPE}")
    shape, data = spec["shape"], spec["data"]
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise CodecError("bad_shape", f"array {name!r} has shape {shape!r}")
    if not isinstance(data, bytes):
        raise CodecError("bad_array", f"array {name!r} data is not bytes")
    count = int(np.prod(shape, dtype=np.int64))
    if count * 4 != len(data):
        raise CodecError("bad_shape", f"array {name!r}: shape {shape} needs {count * 4} bytes, "
                                      f"got {len(data)}")
    if expected_len is not None and count != expected_len:
        raise CodecError("bad_shape", f"array {name!r} has {count} values, the model has "
                                      f"{expected_len}")
    arr = np.frombuffer(data, dtype=WIRE_DTYPE).reshape(shape)
    if not np.isfinite(arr).all():
        raise CodecError("not_finite", f"array {name!r} contains NaN or Inf")
    return arr.astype(np.float32, copy=False)


def decode(payload: bytes, ctx: DecodeContext) -> Message:
    if len(payload) > ctx.max_bytes:
        raise CodecError("oversized", f"{len(payload)} bytes > limit {ctx.max_bytes}")
    try:
        body = msgpack.unpackb(
            payload, raw=False, strict_map_key=True, use_list=True,
            max_bin_len=ctx.max_bytes, max_str_len=1 << 16,
            max_array_len=1 << 16, max_map_len=1 << 10, max_ext_len=0,
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
            TypeError) as exc:
        raise CodecError("malformed", f"not a msgpack message ({exc})") from None
    if not isinstance(body, dict):
        raise CodecError("malformed", "message is not a map")
    missing = [k for k in (*ENVELOPE, "fields", "arrays") if k not in body]
    if missing:
        raise CodecError("malformed", f"missing {', '.join(missing)}")
    if body["proto"] != PROTOCOL_VERSION:
        raise CodecError("bad_protocol", f"protocol {body['proto']!r}, "
                                        f"this side speaks {PROTOCOL_VERSION}")
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

    schema = SCHEMAS[kind]
    fields, arrays = body["fields"], body["arrays"]
    if not isinstance(fields, dict) or not isinstance(arrays, dict):
        raise CodecError("malformed", "fields/arrays are not maps")
    allowed = set(schema.fields) | set(schema.optional)
    extra = set(fields) - allowed
    if extra:
        raise CodecError("bad_field", f"unexpected fields {sorted(extra)} for {kind}")
    for name, typ in schema.fields.items():
        if name not in fields:
            raise CodecError("bad_field", f"{kind} lacks field {name!r}")
        _check_type(name, fields[name], typ)
    for name, typ in schema.optional.items():
        if name in fields:
            _check_type(name, fields[name], typ)
    if set(arrays) != set(schema.arrays):
        raise CodecError("bad_array", f"{kind} carries arrays {sorted(arrays)}, "
                                      f"expected {sorted(schema.arrays)}")
    decoded = {}
    for name, size_rule in schema.arrays.items():
        expected = ctx.model_size if size_rule == ARRAY_MODEL else None
        decoded[name] = _unpack_array(name, arrays[name], expected)
    return Message(kind=kind, run=body["run"], sender=body["sender"], seq=body["seq"],
                   base_version=body["base_version"], fields=fields, arrays=decoded)
