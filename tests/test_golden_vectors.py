"""The golden vectors of the wire (tests/golden/, PROTOCOL.md; issue 18): the Python codec decodes
every valid one, of protocol versions 2 and 1, to its description, reassembles every chunked
one, refuses every invalid one with its reason, and scripts/golden-vectors.py writes the same
bytes again. The layout (prefix, offsets, padding) is checked with the spec's arithmetic, not
the codec's."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

from fleetfl.shared.core.base import Decoder, Rejected
from fleetfl.shared.core.job import JobConfig, job_with
from fleetfl.shared.core.layers import Layer, LayerTable
from fleetfl.shared.core.messages import COORDINATOR_ID, PROTOCOL_VERSION, PROTOCOL_VERSIONS, Kind
from fleetfl.shared.core.registry import make_decoder
from fleetfl.shared.wire import chunking
from fleetfl.shared.wire.codec import CodecError, DecodeContext, decode
from fleetfl.shared.wire.signing import KeyRing, load_public_key

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
INDEX = json.loads((GOLDEN / "vectors.json").read_text())
VECTORS = INDEX["vectors"]


def context(spec: dict) -> DecodeContext:
    keys = None
    if spec["keys"]:
        public = load_public_key(GOLDEN / "TEST-ONLY-ed25519.pub")
        keys = KeyRing({"pi01": public, COORDINATOR_ID: public})
    return DecodeContext(spec["run"], spec["model_size"], spec["max_bytes"], keys=keys,
                         ageless=frozenset() if spec.get("check_age", True) else frozenset(Kind))


def same(a: object, b: object) -> bool:
    """Equal with the same types all the way down (1 is not 1.0, True is not 1)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def check(payload: bytes, vector: dict) -> None:
    expect = vector["expect"]
    msg = decode(payload, context(vector["context"]))
    assert (str(msg.kind), msg.run, msg.sender, msg.seq, msg.base_version, msg.proto) == (
        expect["kind"], expect["run"], expect["sender"], expect["seq"], expect["base_version"],
        expect["proto"])
    assert same(msg.fields, expect["fields"]), (msg.fields, expect["fields"])
    assert list(msg.arrays) == list(expect["arrays"])
    for name, arr in msg.arrays.items():
        want = expect["arrays"][name]
        assert list(arr.shape) == want["shape"]
        assert arr.reshape(-1)[:4].tolist() == want["first"]
        assert hashlib.sha256(arr.tobytes()).hexdigest() == want["sha256"]
    assert len(payload) == expect["total_bytes"]
    check_layout(payload, expect, msg.arrays)


def align(offset: int, proto: int) -> int:
    """PROTOCOL.md section 4: version 2 pads to the next multiple of 16, version 1 not."""
    return offset + (-offset % 16 if proto == 2 else 0)


def check_layout(payload: bytes, expect: dict, arrays: dict[str, np.ndarray]) -> None:
    """Prefix, header span, each array where the spec puts it, zero padding, signature last."""
    proto, h = expect["proto"], expect["header_bytes"]
    if proto == 2:
        assert payload[:8] == b"FLM\x02" + h.to_bytes(4, "little")
        assert expect["header_offset"] == 8
    else:
        assert payload[0] in (*range(0x80, 0x90), 0xDE, 0xDF) and expect["header_offset"] == 0
    offset, zeros = expect["header_offset"] + h, []
    for name, arr in arrays.items():
        start = align(offset, proto)
        zeros.append(payload[offset:start])
        assert expect["arrays"][name]["offset"] == start
        assert payload[start:start + arr.nbytes] == arr.tobytes()  # "<f4", or as its dtype
        offset = start + arr.nbytes
    end = align(offset, proto)
    zeros.append(payload[offset:end])
    assert all(z == bytes(len(z)) for z in zeros)
    assert expect["arrays_end"] == end == len(payload) - 64 * expect["signed"]


@pytest.mark.parametrize("vector", [v for v in VECTORS if "expect" in v
                                    and "chunk_topics" not in v],
                         ids=lambda v: v["name"])
def test_valid_vectors_decode_to_their_description(vector):
    check((GOLDEN / vector["files"][0]).read_bytes(), vector)


@pytest.mark.parametrize("vector", [v for v in VECTORS if "chunk_topics" in v],
                         ids=lambda v: v["name"])
def test_chunked_vectors_reassemble_in_any_order(vector):
    chunks = [(topic, (GOLDEN / f).read_bytes())
              for topic, f in zip(vector["chunk_topics"], vector["files"], strict=True)]
    assert len(chunks) >= 3
    whole_file = GOLDEN / vector["whole"]
    for order in (chunks, chunks[::-1]):
        reassembler = chunking.Reassembler(64 * 1024 * 1024)
        done = [reassembler.add(t, p, now=0.0, retained=vector["expect"]["retain"])
                for t, p in order]
        assert done[:-1] == [None] * (len(order) - 1) and done[-1] is not None
        assert done[-1].topic == vector["expect"]["topic"]
        assert done[-1].payload == whole_file.read_bytes()
        check(done[-1].payload, vector)
    for topic, payload in chunks:  # each chunk packet fits the limit it was cut for
        assert chunking.packet_bytes(topic, len(payload)) <= vector["max_packet_bytes"]


@pytest.mark.parametrize("vector", [v for v in VECTORS if "refused" in v],
                         ids=lambda v: v["name"])
def test_invalid_vectors_are_refused_with_their_reason(vector):
    with pytest.raises(CodecError) as refused:
        decode((GOLDEN / vector["files"][0]).read_bytes(), context(vector["context"]))
    assert refused.value.reason == vector["refused"], refused.value


def test_every_kind_is_there_signed_and_unsigned_in_every_version_read():
    described = {(v["expect"]["kind"], v["expect"]["signed"], v["proto"])
                 for v in VECTORS if "expect" in v}
    assert described == {(k.value, s, p) for k in Kind for s in (False, True)
                         for p in PROTOCOL_VERSIONS}
    assert all(v["proto"] == v["expect"]["proto"] for v in VECTORS if "expect" in v)
    assert INDEX["protocol"] == PROTOCOL_VERSION


@pytest.mark.parametrize("proto", PROTOCOL_VERSIONS)
def test_every_codec_reason_has_an_invalid_vector(proto):
    source = "".join((ROOT / "shared/wire" / f).read_text() for f in ("codec.py", "layout.py"))
    reasons = set(re.findall(r"CodecError\(\s*\"([a-z_]+)\"", source)) | {"truncated"}
    assert reasons - {v["refused"] for v in VECTORS if "refused" in v and v["proto"] == proto} \
        == set()


def test_the_version_2_vectors_cover_the_layouts_own_faults():
    """Padding, header length, magic version, proto/layout mismatch, cut prefix or array."""
    refused = {v["name"]: v["refused"] for v in VECTORS if "refused" in v and v["proto"] == 2}
    for name in ("padding_after_header", "padding_after_array", "padding_before_signature",
                 "header_length_short", "header_length_long", "header_length_over_limit",
                 "prefix_cut", "bad_magic"):
        assert refused[name] == "malformed", name
    assert refused["magic_version_3"] == refused["proto_1"] == "bad_protocol"
    assert refused["truncated_in_array"] == "truncated"
    assert refused["signed_with_v1_tag"] == "bad_signature"
    v1 = {v["name"]: v["refused"] for v in VECTORS if "refused" in v and v["proto"] == 1}
    assert v1["v1/proto_2"] == "bad_protocol"


COMPRESSED = json.loads((GOLDEN / "compressed.json").read_text())


def payload_decoder(vector: dict) -> Decoder:
    """The coordinator's decoder for the vector's job keys over its layer table."""
    offsets = np.cumsum([0, *vector["layers"][:-1]])
    layers = LayerTable(tuple(Layer(f"l{i}", int(o), (s,)) for i, (o, s)
                              in enumerate(zip(offsets, vector["layers"], strict=True))))
    return make_decoder(job_with(JobConfig(), vector["payload"]), layers, None)


@pytest.mark.parametrize("vector", [v for v in COMPRESSED["vectors"] if "expect" in v],
                         ids=lambda v: v["name"])
def test_compressed_vectors_decode_to_their_description_with_their_dtypes(vector):
    payload = (GOLDEN / vector["files"][0]).read_bytes()
    check(payload, vector)
    msg = decode(payload, context(vector["context"]))
    assert {n: a.dtype.str for n, a in msg.arrays.items()} == \
        {n: a["dtype"] for n, a in vector["expect"]["arrays"].items()}
    if msg.kind is Kind.UPDATE:  # and the payload reads them
        decoded = payload_decoder(vector).decode(msg.sender, msg)
        assert decoded.dense.size == COMPRESSED["model_size"]


@pytest.mark.parametrize("vector", [v for v in COMPRESSED["vectors"] if "refused" in v],
                         ids=lambda v: v["name"])
def test_compressed_invalid_vectors_are_refused_by_the_codec(vector):
    with pytest.raises(CodecError) as refused:
        decode((GOLDEN / vector["files"][0]).read_bytes(), context(vector["context"]))
    assert refused.value.reason == vector["refused"], refused.value


@pytest.mark.parametrize("vector", [v for v in COMPRESSED["vectors"]
                                    if "refused_by_payload" in v], ids=lambda v: v["name"])
def test_compressed_payload_vectors_decode_and_are_refused_by_the_payload(vector):
    msg = decode((GOLDEN / vector["files"][0]).read_bytes(), context(vector["context"]))
    with pytest.raises(Rejected) as refused:
        payload_decoder(vector).decode(msg.sender, msg)
    assert refused.value.reason == vector["refused_by_payload"], refused.value


def test_the_compressed_vectors_cover_each_form_and_fault():
    names = {v["name"].split("/", 1)[1] for v in COMPRESSED["vectors"]}
    assert {"update.q8", "update.q4", "update.topk", "avg.q8", "update.q8.signed",
            "topk_index_out_of_range", "topk_unsorted_indices", "q8_nan_scale",
            "q4_wrong_byte_count", "v1_int8_delta", "v1_scales"} <= names


def test_the_test_key_is_marked_and_used_only_here():
    assert "TEST ONLY" in INDEX["test_key"] or "never trust it" in INDEX["test_key"]
    assert (GOLDEN / "TEST-ONLY-ed25519.key").read_text().startswith("-----BEGIN PRIVATE KEY")


def test_the_generator_writes_the_same_bytes(tmp_path):
    spec = importlib.util.spec_from_file_location("golden_vectors",
                                                  ROOT / "scripts" / "golden-vectors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write(tmp_path)
    module.write_compressed(tmp_path)
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(GOLDEN) for p in GOLDEN.rglob("*") if p.is_file())
    assert written == committed
    for rel in written:
        assert (tmp_path / rel).read_bytes() == (GOLDEN / rel).read_bytes(), rel
