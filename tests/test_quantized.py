"""Compressed payloads (issue 17 item 2, PROTOCOL.md 15.5): q8, q4 and top-k with error
feedback, worked examples by hand, the error bound and residual conservation as properties,
the wire's integer arrays, every timing keeping every copy of the model equal, and config
refusals. The MNIST runs over the real broker are in tests/test_quantized_mnist.py."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from fleet_helpers import InProcessFleet
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetfl.shared.config import ConfigError, RunConfig, validate
from fleetfl.shared.core.base import Rejected, update_message
from fleetfl.shared.core.choices import Compression
from fleetfl.shared.core.job import job_from_dict, job_to_dict, job_with
from fleetfl.shared.core.layers import Layer, LayerTable
from fleetfl.shared.core.messages import Kind, Message
from fleetfl.shared.core.payloads import (
    DenseDecoder,
    DenseEncoder,
    LBGMDecoder,
    LBGMEncoder,
    PartialDecoder,
    PartialEncoder,
    PartialMasks,
)
from fleetfl.shared.core.quantized import (
    CompressedDecoder,
    CompressedEncoder,
    TopK,
    Uniform,
    compressor,
    make_quantizer,
    pack_nibbles,
)
from fleetfl.shared.core.registry import make_coordinator, make_device
from fleetfl.shared.wire.codec import CodecError, DecodeContext, decode, encode

RUN = "q"
# the worked examples' model: two layers of 3 and 2 values
X = np.array([0.3, -1.0, 0.6, 2.0, -0.5], np.float32)
SEGMENTS = [3, 2]
TABLE = LayerTable((Layer("a.weight", 0, (3,)), Layer("a.bias", 3, (2,))))


def f32(*v: float) -> np.ndarray:
    return np.array(v, np.float32)


# -- worked examples (README, "Compressed payloads"; numbers by hand) -------------------------
def test_q8_worked_example():
    # layer a.weight: max |x| = 1, s = 1/127: 0.3 * 127 = 38.1 -> 38, 0.6 * 127 = 76.2 -> 76
    # layer a.bias:   max |x| = 2, s = 2/127: -0.5 * 63.5 = -31.75 -> -32
    arrays, sent = Uniform(8).pack(X, SEGMENTS)
    assert arrays["delta"].dtype == np.int8
    assert arrays["delta"].tolist() == [38, -127, 76, 127, -32]
    np.testing.assert_array_equal(arrays["scales"], f32(1 / 127, 2 / 127))
    np.testing.assert_allclose(sent, [38 / 127, -1.0, 76 / 127, 2.0, -64 / 127], rtol=1e-6)


def test_q4_worked_example_and_nibble_order():
    # s = 1/7: 2.1 -> 2, -7, 4.2 -> 4; s = 2/7: 7, -1.75 -> -2; nibbles c + 8 = 10 1 12 15 6,
    # code 2j low and 2j+1 high in byte j: 10 | 1 << 4 = 26, 12 | 15 << 4 = 252, 6 | 0 << 4
    arrays, sent = Uniform(4).pack(X, SEGMENTS)
    assert arrays["delta"].dtype == np.uint8
    assert arrays["delta"].tolist() == [26, 252, 6]
    np.testing.assert_array_equal(arrays["scales"], f32(1 / 7, 2 / 7))
    np.testing.assert_allclose(sent, [2 / 7, -1.0, 4 / 7, 2.0, -4 / 7], rtol=1e-6)


def test_topk_worked_example_with_error_feedback():
    # density 0.4 of 5 values: k = 2, the largest |x|: -1.0 (index 1) and 2.0 (index 3)
    enc = CompressedEncoder(DenseEncoder(), TopK(0.4), TABLE)
    first = enc.encode(X.copy(), window=1).values
    assert first["indices"].tolist() == [1, 3] and first["indices"].dtype == np.uint32
    np.testing.assert_array_equal(first["delta"], f32(-1.0, 2.0))
    np.testing.assert_allclose(enc.residual, [0.3, 0, 0.6, 0, -0.5])
    # next delta 0.1 everywhere: residual 0.4 0.1 0.7 0.1 -0.4; |0.4| = |-0.4| tie: the lower
    # index (0) goes, with 0.7 (index 2)
    second = enc.encode(np.full(5, 0.1, np.float32), window=2).values
    assert second["indices"].tolist() == [0, 2]
    np.testing.assert_allclose(second["delta"], [0.4, 0.7], rtol=1e-6)
    np.testing.assert_allclose(enc.residual, [0, 0.1, 0, 0.1, -0.4], atol=1e-7)


def test_an_all_zero_layer_has_scale_zero_and_zero_codes():
    arrays, sent = Uniform(8).pack(f32(0, 0, 0, 1, -1), SEGMENTS)
    assert arrays["scales"].tolist()[0] == 0.0 and arrays["delta"].tolist()[:3] == [0, 0, 0]
    np.testing.assert_array_equal(sent, f32(0, 0, 0, 1, -1))


# -- properties ----------------------------------------------------------------------------
vectors = st.integers(0, 2**32 - 1).map(
    lambda seed: (np.random.default_rng(seed).standard_normal(37)
                  * np.random.default_rng(seed + 1).choice([1e-6, 1.0, 1e4])).astype(np.float32))
SPLIT = [10, 1, 20, 6]


@settings(max_examples=60, deadline=None)
@given(vectors, st.sampled_from([8, 4]))
def test_quantize_dequantize_error_is_at_most_half_a_scale_per_layer(x, bits):
    arrays, sent = Uniform(bits).pack(x, SPLIT)
    per = np.repeat(arrays["scales"], SPLIT).astype(np.float64)
    error = np.abs(x.astype(np.float64) - sent)
    # float32 arithmetic in x / s and c * s adds a few ulps of |x|
    assert (error <= per / 2 + 4 * np.finfo(np.float32).eps * np.abs(x)).all()


def pair(base: str, seed: int, table: LayerTable) -> tuple:
    """A device encoder and a coordinator decoder of one base payload."""
    if base == "partial":
        masks = PartialMasks(seed, table.size, 0.4, walk=True)
        return PartialEncoder(masks), PartialDecoder(masks)
    if base == "lbgm":
        return LBGMEncoder(table, 0.5), LBGMDecoder(table)
    return DenseEncoder(), DenseDecoder(table.size)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["q8", "q4", "topk"]),
       st.sampled_from(["dense", "partial", "lbgm"]))
def test_error_feedback_conserves_what_was_not_sent(seed, kind, base):
    """After any sequence: sum(what the coordinator decoded) + residual == sum(deltas)."""
    rng = np.random.default_rng(seed)
    table = LayerTable(tuple(Layer(f"l{i}", o, (s,)) for i, (o, s) in
                             enumerate(zip(np.cumsum([0, *SPLIT[:-1]]), SPLIT, strict=True))))
    inner, inner_dec = pair(base, seed, table)
    quantizer = make_quantizer(Compression(kind), 0.1)
    enc = CompressedEncoder(inner, quantizer, table)
    dec = CompressedDecoder(inner_dec, quantizer, table)
    drift = rng.standard_normal(37)  # alike deltas: LBGM sends some layers as scalars
    total, got = np.zeros(37), np.zeros(37)
    for window in range(1, int(rng.integers(2, 12))):
        delta = ((drift + 0.3 * rng.standard_normal(37))
                 * rng.choice([1e-3, 1.0, 30.0])).astype(np.float32)
        total += delta
        encoded = enc.encode(delta, window)
        msg = update_message(RUN, "a1", 0, window, 10, 5, encoded.values)
        msg.fields.update(encoded.fields)
        got += dec.decode("a1", msg).dense
    np.testing.assert_allclose(got + enc.residual, total,
                               atol=1e-5 * max(1.0, np.abs(total).max()))


# -- the wire: integer arrays in version 2 only ---------------------------------------------
def wire(arrays: dict, proto: int = 2) -> bytes:
    return encode(update_message(RUN, "a1", 0, 1, 10, 5, arrays), proto=proto)


@pytest.mark.parametrize("kind", ["q8", "q4", "topk"])
def test_compressed_updates_travel_as_small_integers_and_come_back_equal(kind):
    x = np.random.default_rng(0).standard_normal(20001).astype(np.float32)
    arrays, _ = make_quantizer(Compression(kind), 0.01).pack(x, [20000, 1])
    payload = wire(arrays)
    got = decode(payload, DecodeContext(RUN, 20001)).arrays
    assert {k: (v.dtype, v.shape) for k, v in got.items()} == \
        {k: (v.dtype, v.shape) for k, v in arrays.items()}
    for name in arrays:
        np.testing.assert_array_equal(got[name], arrays[name])
    # what travels: N bytes (q8), ceil(N/2) (q4), 8 k (top-k), plus 2 scales and a header
    carried = sum(a.nbytes for a in arrays.values())
    assert carried == {"q8": 20001 + 8, "q4": 10001 + 8, "topk": 201 * 8}[kind]
    assert carried < len(payload) < carried + 200


def test_version_1_carries_no_integer_arrays():
    arrays, _ = Uniform(8).pack(X, SEGMENTS)
    with pytest.raises(ValueError, match="version 1"):
        wire(arrays, proto=1)
    with pytest.raises(ValueError, match="cannot travel"):  # an int8 `params`: a bug
        encode(Message(Kind.MODEL, RUN, "coordinator", 1, 0, {
            "version": 0, "next_window": 1, "job": {}}, {"params": np.zeros(3, np.int8)}))


@pytest.mark.parametrize("edit, reason", [
    (lambda a: a.update(indices=np.array([3, 1], np.uint32)), "bad_value"),  # unsorted
    (lambda a: a.update(indices=np.array([1, 1], np.uint32)), "bad_value"),  # repeated
    (lambda a: a.update(indices=np.array([1, 5], np.uint32)), "bad_value"),  # >= N
    (lambda a: a.update(delta=f32(np.nan, 1)), "not_finite"),
])
def test_the_codec_refuses_bad_indices_and_values(edit, reason):
    arrays = {"delta": f32(-1, 2), "indices": np.array([1, 3], np.uint32)}
    edit(arrays)
    with pytest.raises(CodecError) as refused:
        decode(wire(arrays), DecodeContext(RUN, 5))
    assert refused.value.reason == reason


def test_the_codec_refuses_a_nan_scale():
    with pytest.raises(CodecError, match="not_finite"):
        decode(wire({"delta": np.zeros(5, np.int8), "scales": f32(np.nan, 1)}),
               DecodeContext(RUN, 5))


@pytest.mark.parametrize("kind, arrays, reason", [
    ("q8", {"delta": np.zeros(4, np.int8), "scales": f32(1, 1)}, "bad_shape"),  # 4 codes, 5
    ("q8", {"delta": np.zeros(5, np.int8), "scales": f32(1)}, "bad_shape"),  # a scale short
    ("q8", {"delta": np.full(5, -128, np.int8), "scales": f32(1, 1)}, "bad_value"),
    ("q8", {"delta": np.zeros(5, np.int8), "scales": f32(-1, 1)}, "bad_value"),
    ("q8", {"delta": np.zeros(5, np.uint8), "scales": f32(1, 1)}, "bad_shape"),  # q4's type
    ("q8", {"delta": np.zeros(5, np.float32)}, "bad_shape"),  # dense values
    ("q4", {"delta": np.full(2, 0x88, np.uint8), "scales": f32(1, 1)}, "bad_shape"),
    ("q4", {"delta": np.array([0x88, 0x88, 0x18], np.uint8), "scales": f32(1, 1)},
     "bad_value"),  # the padding nibble after the 5th code is not 0
    ("q4", {"delta": np.array([0x88, 0x80, 0x88], np.uint8), "scales": f32(1, 1)},
     "bad_value"),  # a code nibble 0
    ("topk", {"delta": f32(1, 2, 3), "indices": np.array([0, 1, 2], np.uint32)},
     "bad_shape"),  # k = ceil(0.4 * 5) = 2: a densified top-k
])
def test_the_decoder_refuses_payloads_that_do_not_fit(kind, arrays, reason):
    dec = CompressedDecoder(DenseDecoder(5), make_quantizer(Compression(kind), 0.4), TABLE)
    msg = update_message(RUN, "a1", 0, 1, 10, 5, arrays)
    with pytest.raises(Rejected) as refused:
        dec.decode("a1", msg)
    assert refused.value.reason == reason


@pytest.mark.parametrize("arrays", [
    {"delta": np.zeros(37, np.int8), "scales": f32(1, 1)},  # q8 codes in a dense run
    {"delta": np.zeros(37, np.int8)},  # int8 values, no scales
    {"delta": np.zeros(37, np.float32), "indices": np.arange(37, dtype=np.uint32)},
])
def test_a_run_without_compression_refuses_compressed_arrays(arrays):
    layers = LayerTable((Layer("w", 0, (37,)),))
    cfg = rules("fedavg", "")
    coord = make_coordinator(cfg, np.zeros(37, np.float32), layers)
    coord.on_message(Message(Kind.HELLO, RUN, "A", 1, 0, {"samples": 10,
                                                         "first_window": 1}), 0.0)
    msg = update_message(RUN, "A", 0, 1, 10, 3, arrays)
    msg.seq = 2
    with pytest.raises(Rejected, match="bad_shape"):
        coord.on_message(msg, 0.0)
    dev = make_device(cfg.job, RUN, "A", 10, layers)  # and a device its average
    with pytest.raises(Rejected, match="bad_shape"):
        dev.encoder.expand(1, np.zeros(37, np.int8), 37)


def test_nibbles_pack_low_first_and_round_trip():
    codes = np.arange(-7, 8, dtype=np.int8)
    packed = pack_nibbles(codes)
    assert packed[0] == (1 | 2 << 4) and packed[-1] == 15  # -7, -6 ... 7 and padding 0
    arrays = {"delta": packed, "scales": f32(1.0)}
    np.testing.assert_array_equal(Uniform(4).unpack(arrays, [15]), codes.astype(np.float32))


# -- every timing: the coordinator applies what it sent, every copy stays equal -------------
TIMINGS = [("fedavg", {}), ("dga", {"period": 2, "delay": 2}), ("drpga", {"period": 2,
           "delay": 2, "rate": 0.4}), ("fda", {"rtc_steps": 1, "fda_theta": 1e-9}),
           ("fedbuff", {"period": 2}), ("fedbuff", {"period": 2, "payload": "partial",
                                                    "rate": 0.4}),
           ("fedavg", {"payload": "partial", "rate": 0.4}),
           ("lbgm", {"lbgm_threshold": 0.9}), ("dga", {"payload": "lbgm", "period": 2,
                                                       "lbgm_threshold": 0.9})]


def rules(algo: str, compress: str, **job) -> RunConfig:
    c = RunConfig()
    c.run, c.min_agents, c.buffer = RUN, 3, 2
    c.job = job_with(c.job, {"algo": algo, "compress": compress, "local_steps": 3,
                             "topk_density": 0.2, **job})
    validate(c)
    return c


@pytest.mark.parametrize("algo, job", TIMINGS, ids=[t[0] + "-" + str(t[1].get("payload", ""))
                                                     for t in TIMINGS])
@pytest.mark.parametrize("compress", ["q8", "q4", "topk"])
def test_every_timing_keeps_every_copy_equal_and_sends_compressed_both_ways(algo, job,
                                                                           compress):
    layers = LayerTable((Layer("w", 0, (30,)), Layer("b", 30, (7,))))
    cfg = rules(algo, compress, **job)
    coord = make_coordinator(cfg, np.zeros(37, np.float32), layers)
    devices = {a: make_device(cfg.job, RUN, a, 10, layers) for a in "ABC"}
    fleet = InProcessFleet(coord, devices, {a: np.zeros(37, np.float32) for a in "ABC"})
    rng = np.random.default_rng(7)
    sent: list[Message] = []
    original = coord.on_message

    scalars = 0  # LBGM layers sent as one look-back multiplier

    def spy(msg, now):
        nonlocal scalars
        scalars += sum(s is not None for s in msg.fields.get("scalars", []))
        out = original(msg, now)  # a look-back the sides disagree on raises here
        sent.extend(m for m in out if m.kind is Kind.AVG)
        return out

    coord.on_message = spy
    drift = rng.standard_normal(37).astype(np.float32)  # steps alike: LBGM finds look-backs
    for _ in range(24):
        for a in "ABC":
            if not devices[a].blocked:
                fleet.step(a, lambda n, p: p.__iadd__(
                    (drift + rng.standard_normal(37).astype(np.float32) * 0.2) * 0.1))
        for m in sent:  # every average travels through the codec and back
            decode(encode(m), DecodeContext(RUN, 37, header_max=1 << 20))
    assert coord.version >= 3
    assert (scalars > 0) == (cfg.job.payload == "lbgm" or algo == "lbgm")
    int_codes = compress != "topk"
    assert all(("scales" if int_codes else "indices") in m.arrays for m in sent)
    if algo == "fedbuff":  # a buffer mixes windows: compressed over all N values (14.4)
        assert all(m["delta"].size == (8 if compress == "topk" else 37 if compress == "q8"
                                       else 19) for m in sent)
    fleet.deliver()
    for a, dev in devices.items():
        if algo == "fedbuff":
            np.testing.assert_array_equal(dev.latest, coord.params)
        elif algo in ("fedavg", "fda", "lbgm") and not dev.blocked and dev.steps == 0:
            np.testing.assert_array_equal(fleet.params[a], coord.params)
    if algo in ("fedavg", "fda", "lbgm"):  # some device at a round's start: equal to the model
        assert any(devices[a].steps == 0 for a in "ABC")


def test_the_downlink_keeps_its_own_residual_and_applies_exactly_what_it_sent():
    dec = CompressedDecoder(DenseDecoder(5), TopK(0.4), TABLE)
    arrays, applied = dec.downlink(1, X.copy(), None)
    assert arrays["indices"].tolist() == [1, 3]
    np.testing.assert_array_equal(applied, f32(0, -1, 0, 2, 0))
    np.testing.assert_allclose(dec.residual, [0.3, 0, 0.6, 0, -0.5])
    arrays, applied = dec.downlink(2, np.zeros(5, np.float32), None)  # the residual goes out
    assert arrays["indices"].tolist() == [2, 4]
    np.testing.assert_allclose(applied, [0, 0, 0.6, 0, -0.5])


@pytest.mark.parametrize("algo", ["fedavg", "fedbuff"])
def test_a_resumed_coordinator_keeps_its_downlink_residual(algo):
    """A journal replay from a checkpoint must publish the averages devices already applied."""
    cfg = rules(algo, "topk")
    layers = LayerTable((Layer("w", 0, (30,)), Layer("b", 30, (7,))))
    rng = np.random.default_rng(5)
    first = make_coordinator(cfg, np.zeros(37, np.float32), layers)
    for a in "ABC":
        first.on_message(Message(Kind.HELLO, RUN, a, 1, 0, {"samples": 10,
                                                           "first_window": 1}), 0.0)

    def updates(window: int) -> list[Message]:
        out = []
        for a in "ABC":
            values = CompressedEncoder(DenseEncoder(), TopK(0.2), layers).encode(
                rng.standard_normal(37).astype(np.float32), window).values
            out.append(update_message(RUN, a, window - 1, window, 10, 3, values))
            out[-1].seq = window + 1
        return out

    for msg in updates(1):
        first.on_message(msg, 0.0)
    assert first.version == 1 and np.abs(compressor(first.decoder).residual).sum() > 0
    twin = make_coordinator(cfg, np.zeros(37, np.float32), layers)
    twin.load_state(first.state(), first.params)
    published = []
    for msg in updates(2):
        published.append((first.on_message(msg, 0.0), twin.on_message(msg, 0.0)))
    avgs = [(x, y) for a, b in published for x, y in zip(a, b, strict=True)
            if x.kind is Kind.AVG]
    assert avgs and len(avgs) == sum(m.kind is Kind.AVG for a, _ in published for m in a)
    for x, y in avgs:
        for name in x.arrays:
            np.testing.assert_array_equal(x.arrays[name], y.arrays[name])
    np.testing.assert_array_equal(first.params, twin.params)


def test_partial_downlink_sends_only_the_windows_mask():
    masks = PartialMasks(3, 5, 0.4, walk=False)
    dec = CompressedDecoder(PartialDecoder(masks), Uniform(8), TABLE)
    arrays, applied = dec.downlink(1, np.where(masks(1), X, 0).astype(np.float32), masks(1))
    assert arrays["delta"].size == int(masks(1).sum())
    assert (applied[~masks(1)] == 0).all()


# -- config ---------------------------------------------------------------------------------
@pytest.mark.parametrize("job, protocol, bad", [
    ({"compress": "q8"}, 1, "needs protocol 2"),
    ({"compress": "topk", "algo": "pmt"}, 2, "dense, partial and lbgm payloads, not 'suffix'"),
    ({"compress": "q8", "algo": "dga", "payload": "suffix"}, 2, "not 'suffix'"),
    ({"compress": "topk", "topk_density": 0.0}, 2, r"topk_density must be in \(0, 1\]"),
    ({"compress": "q16"}, 2, "choose one of 'q8', 'q4', 'topk'"),
])
def test_config_refuses_what_compression_cannot_do(job, protocol, bad):
    c = RunConfig()
    c.protocol = protocol
    with pytest.raises(ConfigError, match=bad):
        c.job = job_with(c.job, job)
        validate(c)


def test_the_readme_table_lists_exactly_the_compressions_and_the_spec_their_rules():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Compressed payloads", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| `([a-z0-9]+)` \|", section, re.M)
    assert rows == [c.value for c in Compression if c.value]
    spec = (Path(__file__).resolve().parents[1] / "PROTOCOL.md").read_text()
    text = spec.split("### 15.5", 1)[1].split("\n## ", 1)[0]
    assert "L = 127 for q8, 7 for q4" in text and Uniform(8).levels == 127 \
        and Uniform(4).levels == 7
    assert "ceil(d x len(v))" in text and TopK(0.5).k(5) == 3  # ceil(2.5)


def test_the_job_carries_the_compression_keys_only_when_compressing():
    plain_job = job_to_dict(job_with(RunConfig().job, {}))
    assert "compress" not in plain_job and "topk_density" not in plain_job
    job = job_with(RunConfig().job, {"compress": "topk", "topk_density": 0.05})
    sent = job_to_dict(job)
    assert (sent["compress"], sent["topk_density"]) == ("topk", 0.05)
    assert job_from_dict(sent) == job
    assert job_from_dict(plain_job).compress is Compression.NONE
