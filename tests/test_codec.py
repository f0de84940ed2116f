"""Codec: every kind round-trips; every kind of bad input is refused with its reason."""

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetfl.shared.core.messages import PROTOCOL_VERSION, SCHEMAS, Kind, Message
from fleetfl.shared.wire.codec import CodecError, DecodeContext, decode, encode
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
    names = [*SCHEMAS[kind].arrays, *SCHEMAS[kind].optional_arrays]
    arrays = {name: np.arange(D, dtype=np.float32) * 0.5 for name in names}
    return Message(kind, "r1", "a1", 7, 2, fields, arrays)


@pytest.mark.parametrize("kind", list(Kind))
def test_round_trip_every_kind(kind):
    msg = sample(kind)
    back = decode(encode(msg), CTX)
    assert (back.kind, back.run, back.sender, back.seq, back.base_version) == \
        (kind, "r1", "a1", 7, 2)
    assert back.fields == msg.fields
    for name, arr in msg.arrays.items():
        np.testing.assert_array_equal(back.arrays[name], arr)
        assert back.arrays[name].dtype == np.float32


def split(payload: bytes) -> tuple[dict, bytes]:
    """The msgpack header map and the raw bytes after it."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(payload)
    header = unpacker.unpack()
    return header, payload[unpacker.tell():]


def test_arrays_travel_as_raw_bytes_after_the_header_not_float_lists():
    values = np.arange(D, dtype=np.float32) * 0.5
    header, raw = split(encode(sample(Kind.UPDATE)))
    assert header["arrays"]["delta"] == {"dtype": "<f4", "shape": [D]}
    assert raw == values.astype("<f4").tobytes()


def test_decoded_arrays_view_the_payload_without_copying():
    payload = encode(sample(Kind.UPDATE))
    arr = decode(payload, CTX).arrays["delta"]
    assert not arr.flags.owndata and not arr.flags.writeable


def tampered(raw: bytes | None = None, **changes):
    header, tail = split(encode(sample(Kind.UPDATE)))
    for path, value in changes.items():
        target = header
        keys = path.split("__")
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value
    return msgpack.packb(header, use_bin_type=True) + (tail if raw is None else raw)


def raw_of(values) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


@pytest.mark.parametrize("payload, reason", [
    (encode(sample(Kind.UPDATE))[:-7], "truncated"),
    (encode(sample(Kind.UPDATE))[:30], "malformed"),  # cut inside the header
    (b"\xc1garbage", "malformed"),
    (msgpack.packb([1, 2, 3]), "malformed"),
    (tampered(proto=PROTOCOL_VERSION + 1), "bad_protocol"),
    (tampered(kind="gradient"), "unknown_kind"),
    (tampered(run="other"), "other_run"),
    (tampered(sender="a/+/#"), "bad_sender"),
    (tampered(seq="7"), "bad_type"),
    (tampered(seq=True), "bad_type"),
    (tampered(seq=-1), "bad_value"),
    (tampered(fields__window="3"), "bad_type"),
    (tampered(fields__extra=1), "bad_field"),
    (tampered(fields={"window": 1, "samples": 2}), "bad_field"),
    (tampered(arrays={}), "bad_array"),
    (tampered(raw_of(np.zeros(D + 1)), arrays__delta={"dtype": "<f4", "shape": [D + 1]}),
     "bad_shape"),
    (tampered(raw_of(np.zeros(D + 1))), "bad_shape"),  # more bytes than the shape says
    (tampered(raw_of(np.zeros(D - 1))), "truncated"),  # fewer
    (tampered(arrays__delta={"dtype": "<f4", "shape": [10**12, 10**12]}), "bad_shape"),
    (tampered(arrays__delta={"dtype": "<f4", "shape": [-5]}), "bad_shape"),
    (tampered(np.zeros(D).tobytes(), arrays__delta={"dtype": "<f8", "shape": [D]}),
     "bad_dtype"),
    (tampered(raw_of([0, 1, np.nan, 0, 0])), "not_finite"),
    (tampered(raw_of([0, 1, np.inf, 0, 0])), "not_finite"),
    (tampered(arrays__delta=[0.0] * D), "bad_array"),
    (tampered(arrays__delta={"dtype": "<f4", "shape": [D], "data": b""}), "bad_array"),
    (b"\x00" * 5000, "oversized"),
])
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
@given(st.integers(0, 200), st.integers(0, 255))
def test_mutated_valid_message_is_decoded_or_refused(pos, byte):
    raw = bytearray(encode(sample(Kind.UPDATE)))
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
