"""msgpack <-> Message.

A message is one msgpack map (envelope, fields, and for each array its dtype and shape)
followed by the arrays' raw little-endian bytes, in the order the map lists them. Keeping the
bytes after the map rather than inside it means encoding copies each array once and decoding
copies it not at all (numpy views the payload), which matters for 40 MB models on a Pi.

Decoding never trusts the sender: the map is read with msgpack's size limits from at most
HEADER_MAX bytes, every field is checked against the kind's schema, arrays against the model
size, the bytes that follow, dtype and finiteness. Any problem raises CodecError with a short
reason code (for counters) and a readable detail.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
import numpy as np

from .protocol import (
    ARRAY_MODEL,
    ARRAY_SMALL,
    ARRAY_UPTO_MODEL,
    PROTOCOL_VERSION,
    SCHEMAS,
    SMALL_ARRAY_MAX,
    Kind,
    Message,
    valid_id,
)

WIRE_DTYPE = "<f4"
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
ENVELOPE = ("proto", "kind", "run", "sender", "seq", "base_version")
HEADER_MAX = 64 * 1024


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


def encode(msg: Message) -> bytes:
    arrays = {name: np.ascontiguousarray(a, dtype=WIRE_DTYPE) for name, a in msg.arrays.items()}
    header = {
        "proto": msg.proto,
        "kind": str(msg.kind),
        "run": msg.run,
        "sender": msg.sender,
        "seq": msg.seq,
        "base_version": msg.base_version,
        "fields": msg.fields,
        "arrays": {name: {"dtype": WIRE_DTYPE, "shape": list(a.shape)}
                   for name, a in arrays.items()},
    }
    head = msgpack.packb(header, use_bin_type=True)
    return b"".join([head, *(a.data.cast("B") for a in arrays.values())])


def _check_type(where: str, value: object, expected: type | tuple[type, ...]) -> None:
    # bool is an int subclass in Python; a True where a count belongs is a type error.
    if isinstance(value, bool) and bool not in (expected if isinstance(expected, tuple)
                                                 else (expected,)):
        raise CodecError("bad_type", f"{where} is a bool")
    if not isinstance(value, expected):
        raise CodecError("bad_type", f"{where} has type {type(value).__name__}")


def _array_spec(name: str, spec: object, rule: str, model_size: int | None
                ) -> tuple[list[int], int]:
    """Validated shape and byte length of one array from its header entry."""
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape"}:
        raise CodecError("bad_array", f"array {name!r} is not {{dtype, shape}}")
    if spec["dtype"] != WIRE_DTYPE:
        raise CodecError("bad_dtype", f"array {name!r} has dtype {spec['dtype']!r}, "
                                      f"expected {WIRE_DTYPE}")
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
    return shape, count * 4


def _read_header(payload: bytes) -> tuple[object, int]:
    unpacker = msgpack.Unpacker(
        raw=False, strict_map_key=True, use_list=True, max_buffer_size=HEADER_MAX,
        max_bin_len=0, max_str_len=1 << 16, max_array_len=1 << 16, max_map_len=1 << 10,
        max_ext_len=0,
    )
    unpacker.feed(payload[:HEADER_MAX])
    try:
        header = unpacker.unpack()
    except msgpack.OutOfData:
        raise CodecError("malformed", "truncated or over-long message header") from None
    except (ValueError, msgpack.FormatError, msgpack.StackError, TypeError) as exc:
        raise CodecError("malformed", f"not a msgpack message ({exc})") from None
    return header, unpacker.tell()


def decode(payload: bytes, ctx: DecodeContext) -> Message:
    if len(payload) > ctx.max_bytes:
        raise CodecError("oversized", f"{len(payload)} bytes > limit {ctx.max_bytes}")
    body, offset = _read_header(payload)
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
    rules = {**schema.arrays, **schema.optional_arrays}
    if not set(schema.arrays) <= set(arrays) <= set(rules):
        raise CodecError("bad_array", f"{kind} carries arrays {sorted(arrays)}, "
                                      f"expected {sorted(schema.arrays)}")
    layout = [(name, *_array_spec(name, spec, rules[name], ctx.model_size))
              for name, spec in arrays.items()]
    total = sum(nbytes for _, _, nbytes in layout)
    if len(payload) - offset != total:
        reason = "truncated" if len(payload) - offset < total else "bad_shape"
        raise CodecError(reason, f"arrays need {total} bytes after the header, "
                                 f"got {len(payload) - offset}")
    decoded, view = {}, memoryview(payload)
    for name, shape, nbytes in layout:
        # A read-only view of the payload: no copy.
        arr = np.frombuffer(view[offset:offset + nbytes], dtype=WIRE_DTYPE).reshape(shape)
        if not np.isfinite(arr).all():
            raise CodecError("not_finite", f"array {name!r} contains NaN or Inf")
        decoded[name] = arr
        offset += nbytes
    return Message(kind=kind, run=body["run"], sender=body["sender"], seq=body["seq"],
                   base_version=body["base_version"], fields=fields, arrays=decoded)
