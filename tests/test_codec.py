"""Codec: every kind round-trips in both protocol versions read; the version-2 layout (prefix,
header length, 16-byte aligned arrays, zero padding) is what PROTOCOL.md says; every kind of bad
input is refused with its reason."""

import hashlib
import struct

import msgpack
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetfl.shared.core.messages import (
    PROTOCOL_VERSION,
    PROTOCOL_VERSIONS,
    SCHEMAS,
    V2_ARRAYS,
    Kind,
    Message,
)
from fleetfl.shared.wire import layout
from fleetfl.shared.wire.codec import CodecError, DecodeContext, decode, encode
from fleetfl.shared.wire.signing import DOMAINS, KeyRing, Signer
from fleetfl.shared.wire.topics import Topics

D = 5
CTX = DecodeContext(run="r1", model_size=D, max_bytes=4096)


def sample(kind: Kind) -> Message:
    fields = {
        Kind.HELLO: {"samples": 10, "first_window": 1, "capabilities": {"cpus": 4}},
        Kind.OFFLINE: {},
        Kind.UPDATE: {"window": 3, "samples": 10, "steps": 20},
        Kind.AVG: {"window": 3, "version": 4, "contributors": ["a1", "a2"]},
        Kind.MODEL: {"version": 4, "next_window": 5, "job": {"algo": "dga", "lr": 0.1}},
        Kind.STOP: {"reason": "target reached"},
        Kind.REFUSAL: {"agent": "a1", "reason": "window_ahead", "seq": 3, "refused_kind": "update",
                       "detail": "window 9, open is 5", "suppressed": 0},
        Kind.FDA_STATE: {"step": 12, "drift_sq": 0.25, "projection": -0.5},
        Kind.SYNC: {"version": 4, "window": 5, "estimate": 0.7},
        Kind.ASSIGN: {"window": 5, "first_layer": {"a1": 3, "a2": -1}, "deadline": 1.5},
        Kind.EVALUATE: {"version": 4},
        Kind.METRICS: {"version": 4, "samples": 120, "values": {"loss": 0.4, "accuracy": 0.9}},
        Kind.REFUSED: {"reason": "task sensor@2 not installed here", "task": "sensor@2:ab"},
    }[kind]
    # float arrays only: the compressed payloads' integer arrays, version 2's, are
    # tests/test_quantized.py's
    names = [n for n in (*SCHEMAS[kind].arrays, *SCHEMAS[kind].optional_arrays)
             if n not in V2_ARRAYS]
    arrays = {name: np.arange(D, dtype=np.float32) * 0.5 for name in names}
    return Message(kind, "r1", "a1", 7, 2, fields, arrays)


@pytest.mark.parametrize("proto", PROTOCOL_VERSIONS)
@pytest.mark.parametrize("kind", list(Kind))
def test_round_trip_every_kind(kind, proto):
    msg = sample(kind)
    back = decode(encode(msg, proto=proto), CTX)
    assert (back.kind, back.run, back.sender, back.seq, back.base_version, back.proto) == \
        (kind, "r1", "a1", 7, 2, proto)
    assert back.fields == msg.fields
    for name, arr in msg.arrays.items():
        np.testing.assert_array_equal(back.arrays[name], arr)
        assert back.arrays[name].dtype == np.float32


def test_the_default_is_version_2_and_a_message_keeps_the_version_it_came_in():
    assert PROTOCOL_VERSION == 2 and PROTOCOL_VERSIONS == (1, 2)
    assert encode(sample(Kind.UPDATE))[:4] == b"FLM\x02"
    v1 = decode(encode(sample(Kind.UPDATE), proto=1), CTX)
    assert encode(v1)[:1] == b"\x88"  # re-encoded as it came: a fixmap of 8 entries, no prefix
    with pytest.raises(ValueError, match="no layout version 3"):
        encode(sample(Kind.UPDATE), proto=3)


def split(payload: bytes) -> tuple[dict, bytes]:
    """The msgpack header map and the bytes after it (and after its padding)."""
    _, header, rest = layout.split(payload)
    return header, rest


@pytest.mark.parametrize("proto", PROTOCOL_VERSIONS)
def test_arrays_travel_as_raw_bytes_after_the_header_not_float_lists(proto):
    values = np.arange(D, dtype=np.float32) * 0.5
    header, raw = split(encode(sample(Kind.UPDATE), proto=proto))
    assert header["arrays"]["delta"] == {"dtype": "<f4", "shape": [D]}
    assert raw[:4 * D] == values.astype("<f4").tobytes()
    assert raw[4 * D:] == bytes(12 if proto == 2 else 0)  # 20 bytes padded to 32


@pytest.mark.parametrize("proto", PROTOCOL_VERSIONS)
def test_decoded_arrays_view_the_payload_without_copying(proto):
    payload = encode(sample(Kind.UPDATE), proto=proto)
    arr = decode(payload, CTX).arrays["delta"]
    assert not arr.flags.owndata and not arr.flags.writeable


# -- the version-2 layout -----------------------------------------------------------------------

def offset_in(payload: bytes, arr: np.ndarray) -> int:
    """Where a decoded array's view starts in `payload` (it is no copy)."""
    return arr.ctypes.data - np.frombuffer(payload, np.uint8).ctypes.data


def test_the_prefix_states_the_header_length_and_the_header_ends_there():
    payload = encode(sample(Kind.MODEL))
    magic, version, h = struct.unpack("<3sBI", payload[:8])
    assert (magic, version) == (b"FLM", 2)
    header = msgpack.unpackb(payload[8:8 + h], raw=False)  # exactly h bytes: no extra data
    assert header["proto"] == 2 and header["kind"] == "model"
    assert list(header["arrays"]) == ["params", "last_avg"]


@pytest.mark.parametrize("kind", [k for k in Kind if SCHEMAS[k].arrays or
                                  SCHEMAS[k].optional_arrays])
@pytest.mark.parametrize("size", [1, 3, 4, 5, 8, 13])
def test_every_array_starts_at_a_multiple_of_16_after_zero_padding(kind, size):
    msg = sample(kind)
    msg.arrays = {n: np.full(size, 0.25 + i, np.float32) for i, n in enumerate(msg.arrays)}
    ctx = DecodeContext("r1", None, header_max=1 << 16)
    for signed in (None, Signer(Ed25519PrivateKey.generate())):
        payload = encode(msg, signed)
        h = struct.unpack_from("<I", payload, 4)[0]
        back = decode(payload, ctx)
        starts = [offset_in(payload, back.arrays[n]) for n in msg.arrays]
        assert all(s % 16 == 0 for s in starts) and starts[0] == -(-(8 + h) // 16) * 16
        ends = [s + 4 * size for s in starts]
        gaps = zip([8 + h, *ends], [*starts, -(-ends[-1] // 16) * 16], strict=True)
        assert all(payload[a:b] == bytes(b - a) and b - a < 16 for a, b in gaps)
        assert len(payload) == -(-ends[-1] // 16) * 16 + (64 if signed else 0)
        assert all(back.arrays[n].flags.aligned for n in msg.arrays)


def test_version_1_keeps_its_layout_no_prefix_and_no_padding():
    payload = encode(sample(Kind.MODEL), proto=1)
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(payload)
    assert unpacker.unpack()["proto"] == 1
    used = unpacker.tell()
    back = decode(payload, CTX)
    assert [offset_in(payload, a) for a in back.arrays.values()] == [used, used + 4 * D]
    assert len(payload) == used + 2 * 4 * D


def poke(payload: bytes, at: int, byte: int = 1) -> bytes:
    return payload[:at] + bytes([byte]) + payload[at + 1:]


def with_prefix(payload: bytes, version: int, h: int) -> bytes:
    return struct.pack("<3sBI", b"FLM", version, h) + payload[8:]


UPD = encode(sample(Kind.UPDATE))
H = struct.unpack_from("<I", UPD, 4)[0]
DELTA = -(-(8 + H) // 16) * 16  # where the update's one array starts
assert DELTA - (8 + H) > 1, "the sample update should leave padding after its header"


@pytest.mark.parametrize("payload, reason", [
    (with_prefix(UPD, 3, H), "bad_protocol"),           # another layout version
    (with_prefix(UPD, 1, H), "bad_protocol"),
    (with_prefix(UPD, 0, H), "bad_protocol"),
    (with_prefix(UPD, 2, H - 1), "malformed"),          # the map runs past the stated length
    (with_prefix(UPD, 2, H + 1), "malformed"),          # the map ends before it
    (with_prefix(UPD, 2, 2**32 - 1), "malformed"),      # beyond any limit
    (with_prefix(UPD, 2, len(UPD)), "malformed"),       # beyond the message
    (UPD[:7], "malformed"),                             # the prefix cut
    (b"FLM", "malformed"),
    (b"", "malformed"),
    (b"FLX" + UPD[3:], "malformed"),                    # neither prefix nor msgpack map
    (b"\x93" + UPD[1:], "malformed"),                   # a msgpack array, not a map
    (poke(UPD, 8 + H), "malformed"),                    # padding after the header (15 bytes
    (poke(UPD, DELTA - 1), "malformed"),                # here: 8 + h = 129)
    (poke(UPD, DELTA + 4 * D), "malformed"),            # padding after the array
    (poke(UPD, len(UPD) - 1, 0x80), "malformed"),       # its last byte
    (UPD[:DELTA + 4], "truncated"),                     # cut inside the array
    (UPD + bytes(16), "bad_shape"),                     # a padded block too many
    (layout.edit_header(UPD, lambda h: h.update(proto=1)), "bad_protocol"),
    (layout.edit_header(encode(sample(Kind.UPDATE), proto=1), lambda h: h.update(proto=2)),
     "bad_protocol"),
    (layout.edit_header(UPD, lambda h: h.update(proto=True)), "bad_type"),
    (layout.edit_header(UPD, lambda h: h.update(proto=2.0)), "bad_type"),
])
def test_version_2_layout_faults_are_refused(payload, reason):
    with pytest.raises(CodecError) as exc:
        decode(payload, CTX)
    assert exc.value.reason == reason, exc.value


def test_the_header_length_limit_is_the_receivers():
    big = sample(Kind.HELLO)
    big.fields["capabilities"] = {"pad": "x" * 65_000}  # a header of about 65 KB
    payload = encode(big)
    assert decode(payload, DecodeContext("r1", D)).kind is Kind.HELLO
    big.fields["capabilities"] = {"pad": "x" * 33_000, "more": "x" * 33_000}  # 66 KB
    with pytest.raises(CodecError, match="malformed: header length"):
        decode(encode(big), DecodeContext("r1", D))
    assert decode(encode(big), DecodeContext("r1", D, header_max=1 << 23)).kind is Kind.HELLO


def nest(levels: int) -> object:
    """`levels` containers, maps and arrays in turn, one inside the other, around a 1."""
    value: object = 1
    for i in range(levels):
        value = {"k": value} if i % 2 else [value]
    return value


@pytest.mark.parametrize("proto", PROTOCOL_VERSIONS)
def test_headers_nest_at_most_max_depth_levels(proto):
    # header (1) -> fields (2) -> capabilities (3) -> free-form value: 3 levels before it
    deepest = sample(Kind.HELLO)
    deepest.fields["capabilities"] = {"x": nest(layout.MAX_DEPTH - 3)}
    assert layout.MAX_DEPTH == 16
    assert layout.depth(layout.split(encode(deepest, proto=proto))[1]) == layout.MAX_DEPTH
    assert decode(encode(deepest, proto=proto), CTX).fields == deepest.fields
    deeper = sample(Kind.HELLO)
    deeper.fields["capabilities"] = {"x": nest(layout.MAX_DEPTH - 2)}
    with pytest.raises(CodecError, match=f"malformed: maps and arrays nested deeper than "
                                         f"{layout.MAX_DEPTH} levels"):
        decode(encode(deeper, proto=proto), CTX)


def test_the_depth_check_finds_a_container_behind_a_wide_array_and_survives_any_depth():
    # an avg's contributors are one flat array of up to 65,536 ids: checked in one pass
    avg = sample(Kind.AVG)
    avg.fields["contributors"] = [f"agent-{i}" for i in range(65_536)]
    ctx = DecodeContext("r1", D, max_bytes=1 << 22, header_max=1 << 23)
    assert len(decode(encode(avg), ctx)["contributors"]) == 65_536
    hidden = [*(["a"] * 65_535), nest(layout.MAX_DEPTH)]  # the one container last
    assert layout.depth({"c": hidden}) == layout.MAX_DEPTH + 1  # counting stops there
    assert layout.depth({"c": hidden[:-1]}) == 2 and layout.depth(7) == 0
    # far deeper than any limit: msgpack's own stack bound, refused the same way
    head = b"\x91" * 3000 + b"\x01"
    with pytest.raises(CodecError, match="malformed"):
        decode(layout.PREFIX.pack(b"FLM", 2, len(head)) + head, CTX)


@pytest.mark.parametrize("proto", PROTOCOL_VERSIONS)
def test_each_version_signs_with_its_own_tag(proto):
    key = Ed25519PrivateKey.generate()
    ring = KeyRing({"a1": key.public_key()})
    ctx = DecodeContext("r1", D, keys=ring)
    payload = encode(sample(Kind.UPDATE), Signer(key), proto=proto)
    assert decode(payload, ctx).proto == proto
    body = payload[:-64]
    key.public_key().verify(payload[-64:], DOMAINS[proto] + hashlib.sha256(body).digest())
    other = key.sign(DOMAINS[3 - proto] + hashlib.sha256(body).digest())
    with pytest.raises(CodecError, match="bad_signature"):
        decode(body + other, ctx)  # a signature over the other version's tag


@pytest.mark.parametrize("proto", PROTOCOL_VERSIONS)
def test_split_and_join_give_back_the_same_bytes(proto):
    for signer in (None, Signer(Ed25519PrivateKey.generate())):
        payload = encode(sample(Kind.MODEL), signer, proto=proto)
        assert layout.edit_header(payload, lambda h: None) == payload
        longer = layout.edit_header(payload, lambda h: h.update(seq=2**40))  # h grows
        assert decode(longer, CTX).seq == 2**40  # without keys the signature is not checked


# -- refusals, both versions ------------------------------------------------------------------

def tampered(raw: bytes | None = None, version: int = PROTOCOL_VERSION, **changes):
    """The sample update with header entries changed (`arrays__delta` for nested keys) and,
    if given, `raw` as the array bytes (padded as the layout wants)."""
    version, header, tail = layout.split(encode(sample(Kind.UPDATE), proto=version))
    for path, value in changes.items():
        target = header
        keys = path.split("__")
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value
    if raw is not None:
        tail = raw + bytes(layout.padding(version, len(raw)))
    return layout.join(version, header, tail)


def raw_of(values) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


def bad_inputs(proto: int) -> list[tuple[bytes, str]]:
    upd = encode(sample(Kind.UPDATE), proto=proto)
    return [
        (upd[:-7], "truncated"),
        (upd[:30], "malformed"),  # cut inside the header
        (b"\xc1garbage", "malformed"),
        (msgpack.packb([1, 2, 3]), "malformed"),
        (tampered(version=proto, proto=3 - proto), "bad_protocol"),
        (tampered(version=proto, proto=9), "bad_protocol"),
        (tampered(version=proto, kind="gradient"), "unknown_kind"),
        (tampered(version=proto, run="other"), "other_run"),
        (tampered(version=proto, sender="a/+/#"), "bad_sender"),
        (tampered(version=proto, seq="7"), "bad_type"),
        (tampered(version=proto, seq=True), "bad_type"),
        (tampered(version=proto, seq=-1), "bad_value"),
        (tampered(version=proto, fields__window="3"), "bad_type"),
        (tampered(version=proto, fields__extra=1), "bad_field"),
        (tampered(version=proto, fields={"window": 1, "samples": 2}), "bad_field"),
        (tampered(version=proto, arrays={}), "bad_array"),
        (tampered(raw_of(np.zeros(D + 1)), proto,
                  arrays__delta={"dtype": "<f4", "shape": [D + 1]}), "bad_shape"),
        # more and fewer bytes than the shape says (by 16: version 2 pads to 16)
        (tampered(raw_of(np.zeros(D + 4)), proto), "bad_shape"),
        (tampered(raw_of(np.zeros(D - 4)), proto), "truncated"),
        (tampered(version=proto, arrays__delta={"dtype": "<f4", "shape": [10**12, 10**12]}),
         "bad_shape"),
        (tampered(version=proto, arrays__delta={"dtype": "<f4", "shape": [-5]}), "bad_shape"),
        (tampered(np.zeros(D).tobytes(), proto, arrays__delta={"dtype": "<f8", "shape": [D]}),
         "bad_dtype"),
        (tampered(raw_of([0, 1, np.nan, 0, 0]), proto), "not_finite"),
        (tampered(raw_of([0, 1, np.inf, 0, 0]), proto), "not_finite"),
        (tampered(version=proto, arrays__delta=[0.0] * D), "bad_array"),
        (tampered(version=proto, arrays__delta={"dtype": "<f4", "shape": [D], "data": b""}),
         "bad_array"),
        (b"\x00" * 5000, "oversized"),
    ]


@pytest.mark.parametrize("payload, reason", [
    pytest.param(p, r, id=f"v{v}-{i}-{r}") for v in PROTOCOL_VERSIONS
    for i, (p, r) in enumerate(bad_inputs(v))])
def test_bad_input_refused_with_reason(payload, reason):
    with pytest.raises(CodecError) as exc:
        decode(payload, CTX)
    assert exc.value.reason == reason


def test_size_rules_model_upto_and_small():
    partial = sample(Kind.UPDATE)
    partial.arrays["delta"] = np.ones(2, np.float32)  # fewer values than the model: allowed
    assert decode(encode(partial), CTX).arrays["delta"].shape == (2,)
    model = sample(Kind.MODEL)
    model.arrays["params"] = np.ones(2, np.float32)  # the model must be whole
    with pytest.raises(CodecError, match="bad_shape"):
        decode(encode(model), CTX)
    state = sample(Kind.FDA_STATE)
    state.arrays["sketch"] = np.ones((5, 250), np.float32)
    big = DecodeContext("r1", D, max_bytes=10**6)
    assert decode(encode(state), big).arrays["sketch"].shape == (5, 250)
    state.arrays["sketch"] = np.ones((300, 300), np.float32)
    with pytest.raises(CodecError, match="bad_shape"):
        decode(encode(state), big)
    del state.arrays["sketch"]  # optional
    assert "sketch" not in decode(encode(state), CTX).arrays


def test_unknown_model_size_skips_only_the_length_check():
    ctx = DecodeContext(run="r1", model_size=None)
    assert decode(encode(sample(Kind.MODEL)), ctx).arrays["params"].shape == (D,)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash(data):
    try:
        decode(data, CTX)
    except CodecError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 200), st.integers(0, 255), st.sampled_from(PROTOCOL_VERSIONS))
def test_mutated_valid_message_is_decoded_or_refused(pos, byte, proto):
    raw = bytearray(encode(sample(Kind.UPDATE), proto=proto))
    raw[pos % len(raw)] = byte  # header or array bytes
    try:
        msg = decode(bytes(raw), CTX)
    except CodecError:
        return
    assert np.isfinite(msg.arrays["delta"]).all() and msg.arrays["delta"].shape == (D,)


def test_topics_and_sender_binding():
    t = Topics("r1")
    assert t.up("a1") == "fl/r1/up/a1" and t.model == "fl/r1/down/model"
    assert t.for_outgoing(sample(Kind.MODEL)) == ("fl/r1/down/model", True)
    assert t.for_outgoing(sample(Kind.HELLO)) == ("fl/r1/status/a1", True)
    assert t.sender_of("fl/r1/up/a7") == "a7"
    assert t.sender_of("fl/r2/up/a7") is None
