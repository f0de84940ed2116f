"""The bytes around a message's msgpack header (PROTOCOL.md section 4): which layout version a
payload is, where its header ends, where each array starts, and the zero padding between them.

    version 2:  P || H || Z_0 || A_1 || Z_1 || ... || A_n || Z_n || [S]
                P = b"FLM", the version byte 2, the header length h (u32 little-endian)
                Z = zero bytes up to the next multiple of 16 from the payload's start
    version 1:  H || A_1 || ... || A_n || [S]          (no prefix, no padding; read for one
                                                       release)

The prefix lets a small device find the arrays without a streaming msgpack parser, and the
padding lets it read floats in place (every array starts 16-byte aligned). The first byte
tells the versions apart: `F` is no msgpack map type. The schema checks are codec.py's.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

import msgpack

MAGIC = b"FLM"
PREFIX = struct.Struct("<3sBI")  # magic, layout version, header length h
PREFIX_BYTES = PREFIX.size
ALIGN = 16
# How deeply maps and arrays may nest in a header (the header map is level 1): the deepest
# legitimate one is 5 (hello.fields.capabilities.profile.f); a reader that recurses needs a
# bound (PROTOCOL.md section 5), and msgpack's own (1,024) is far above a small device's stack.
MAX_DEPTH = 16
# the first byte of a version-1 payload: fixmap, map 16, map 32
MAP_TYPES = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}
_ZEROS = bytes(ALIGN)


class CodecError(ValueError):
    """A refused message: `reason` is the short code counted (PROTOCOL.md section 17)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def padding(version: int, offset: int) -> int:
    """How many zero bytes follow `offset` so the next part starts aligned (none in v1)."""
    return 0 if version == 1 else -offset % ALIGN


def placements(version: int, header_end: int, sizes: Sequence[int]) -> tuple[list[int], int]:
    """Where each array of `sizes` bytes starts, and where the last one's padding ends (the
    signature's offset)."""
    starts, offset = [], header_end
    for size in sizes:
        offset += padding(version, offset)
        starts.append(offset)
        offset += size
    return starts, offset + padding(version, offset)


def frame(version: int, head: bytes, arrays: Sequence[memoryview]) -> list[bytes | memoryview]:
    """The parts whose concatenation is the message up to its signature. The arrays are
    referenced, not copied: the caller joins the parts once (and may hash them first)."""
    if version == 1:
        return [head, *arrays]
    if version != 2:
        raise ValueError(f"no layout version {version}")
    parts: list[bytes | memoryview] = [PREFIX.pack(MAGIC, version, len(head)), head]
    starts, end = placements(version, PREFIX_BYTES + len(head), [len(a) for a in arrays])
    offset = PREFIX_BYTES + len(head)
    for start, arr in zip(starts, arrays, strict=True):
        parts += [_ZEROS[:start - offset], arr]
        offset = start + len(arr)
    parts.append(_ZEROS[:end - offset])
    return parts


def _unpack(data: bytes | memoryview, header_max: int) -> tuple[object, int]:
    """The first msgpack object of `data` under the header's limits (PROTOCOL.md section 5),
    and the bytes it took."""
    unpacker = msgpack.Unpacker(
        raw=False, strict_map_key=True, use_list=True, max_buffer_size=header_max,
        max_bin_len=0, max_str_len=1 << 16, max_array_len=1 << 16, max_map_len=1 << 10,
        max_ext_len=0,
    )
    unpacker.feed(data)
    try:
        header = unpacker.unpack()
    except msgpack.OutOfData:
        raise CodecError("malformed", "truncated or over-long message header") from None
    except (ValueError, msgpack.FormatError, msgpack.StackError, TypeError) as exc:
        raise CodecError("malformed", f"not a msgpack message ({exc})") from None
    if depth(header) > MAX_DEPTH:
        raise CodecError("malformed", f"maps and arrays nested deeper than {MAX_DEPTH} levels")
    return header, unpacker.tell()


_CONTAINERS = frozenset({dict, list})


def depth(value: object, limit: int = MAX_DEPTH) -> int:
    """How many levels of maps and arrays `value` nests (0 for a scalar), counted up to
    `limit` + 1. Level by level, and each container's elements are type-checked in C
    (isdisjoint over map(type, ...)), so an avg's 65,536 contributor ids cost a few ms,
    about a tenth of unpacking them."""
    level, found = [value], 0
    while found <= limit:
        level = [c for c in level if type(c) in _CONTAINERS]
        if not level:
            break
        found += 1
        inner = []
        for c in level:
            items = c.values() if type(c) is dict else c
            if not _CONTAINERS.isdisjoint(map(type, items)):
                inner.extend(items)
        level = inner
    return found


def read_header(payload: bytes, header_max: int) -> tuple[int, object, int]:
    """(layout version, the header as msgpack gives it, the offset where it ends), or a
    CodecError: `bad_protocol` for a prefix of another layout version, else `malformed`."""
    if payload[:len(MAGIC)] == MAGIC:
        if len(payload) < PREFIX_BYTES:
            raise CodecError("malformed", f"{len(payload)} bytes, shorter than the "
                                          f"{PREFIX_BYTES}-byte prefix")
        _, version, length = PREFIX.unpack_from(payload)
        if version != 2:
            raise CodecError("bad_protocol", f"layout version {version}, this side reads 1 "
                                             "and 2")
        if length > header_max:
            raise CodecError("malformed", f"header length {length} > limit {header_max}")
        end = PREFIX_BYTES + length
        if end > len(payload):
            raise CodecError("malformed", f"the prefix says the header ends at byte {end}, "
                                          f"the message has {len(payload)}")
        header, used = _unpack(memoryview(payload)[PREFIX_BYTES:end], header_max)
        if used != length:
            raise CodecError("malformed", f"the header map takes {used} bytes, the prefix "
                                          f"says {length}")
        return version, header, end
    if not payload or payload[0] not in MAP_TYPES:
        raise CodecError("malformed", "neither the version-2 prefix nor a msgpack map")
    header, used = _unpack(payload[:header_max], header_max)
    return 1, header, used


def nonzero_padding(view: memoryview, header_end: int, starts: Sequence[int],
                    sizes: Sequence[int], end: int) -> int | None:
    """The offset of the first padding run that is not all zeros (None: all are)."""
    edges = [header_end, *(s + n for s, n in zip(starts, sizes, strict=True))]
    for begin, stop in zip(edges, [*starts, end], strict=True):
        if view[begin:stop] != _ZEROS[:stop - begin]:
            return begin
    return None


# -- for tools and tests that rewrite a header (fuzzers, golden vectors) -------------------

def split(payload: bytes) -> tuple[int, object, bytes]:
    """(layout version, header, the bytes after the header and its padding: the arrays, their
    padding and the signature). join() puts them back together."""
    version, header, end = read_header(payload, max(len(payload), 1))
    return version, header, payload[end + padding(version, end):]


def join(version: int, header: object, rest: bytes) -> bytes:
    """A payload of layout `version` with this header (msgpack-packed as the codec does) and
    `rest` from split(). The arrays stay aligned: their padding does not depend on h."""
    head = msgpack.packb(header, use_bin_type=True)
    return b"".join(frame(version, head, [])) + rest


def edit_header(payload: bytes, change: Callable[[dict], object]) -> bytes:
    """`payload` with its header changed in place by `change(header)`, its bytes kept."""
    version, header, rest = split(payload)
    change(header)
    return join(version, header, rest)
