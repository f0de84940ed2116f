"""PROTOCOL.md and the code say the same (issue 18): every kind, field (with its type), array,
envelope key, job key and refusal reason of the code is in the spec's tables, and every entry
of those tables is in the code; the constants the spec states are the code's."""

from __future__ import annotations

import dataclasses
import json
import re
from enum import Enum
from pathlib import Path

import numpy as np
import pytest

from fleetfl.coordinator import runner as coordinator_runner
from fleetfl.shared.config import AgentConfig, RunConfig
from fleetfl.shared.core import messages
from fleetfl.shared.core.averaging import OUT_OF_BOUNDS
from fleetfl.shared.core.catalog import ALGORITHMS
from fleetfl.shared.core.job import ConfigError, JobConfig, job_from_dict
from fleetfl.shared.core.messages import PROTOCOL_VERSION, SCHEMAS, Kind, Message
from fleetfl.shared.wire import chunking, codec, layout, signing
from fleetfl.shared.wire.topics import Topics

ROOT = Path(__file__).resolve().parents[1]
SPEC = (ROOT / "PROTOCOL.md").read_text()
TYPE_NAMES = {"int": int, "float": float, "str": str, "map": dict, "array": list, "bool": bool}


def section(title: str) -> str:
    """The text of the section whose heading starts with `title`, up to the next heading of
    the same or a higher level."""
    match = re.search(rf"^(#+) {re.escape(title)}.*$", SPEC, re.M)
    assert match, f"PROTOCOL.md has no section {title!r}"
    level = len(match.group(1))
    end = re.compile(rf"^#{{1,{level}}} ", re.M).search(SPEC, match.end())
    return SPEC[match.end():end.start() if end else None]


def rows(text: str, columns: int) -> list[list[str]]:
    """Table rows with `columns` cells whose first cell is code (`...`), cells stripped."""
    found = []
    for line in text.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == columns, f"table row with {len(cells)} cells: {line}"
        found.append(cells)
    return found


def code(cell: str) -> str:
    match = re.fullmatch(r"`([^`]*)`", cell)
    assert match, f"expected a `code` cell, got {cell!r}"
    return match.group(1)


# -- kinds, topics, fields, arrays ----------------------------------------------------------

def test_the_kinds_table_lists_exactly_the_kinds():
    table = rows(section("7.1 Kinds"), 5)
    assert sorted(code(r[0]) for r in table) == sorted(k.value for k in Kind)


def test_each_kind_travels_on_the_topic_and_retain_flag_the_spec_names():
    topics = Topics("r1")
    for kind_cell, _, topic_cell, retained, _ in rows(section("7.1 Kinds"), 5):
        kind = Kind(code(kind_cell))
        sender = messages.COORDINATOR_ID if "coordinator ->" in _ else "pi01"
        fields = {"agent": "pi01"} if kind is Kind.REFUSAL else {}
        topic, retain = topics.for_outgoing(Message(kind, "r1", sender, 1, 0, fields))
        assert topic == "fl/r1/" + code(topic_cell).replace("<id>", "pi01"), kind
        assert retain == (retained == "yes"), kind


def test_the_field_table_is_the_schemas():
    spec: dict[tuple[str, str], tuple[type, bool]] = {}
    for kind_cell, field_cell, typ, req, _ in rows(section("7.2 Fields"), 5):
        if field_cell == "(none)":
            continue
        key = (code(kind_cell), code(field_cell))
        assert key not in spec, f"{key} twice"
        assert typ in TYPE_NAMES and req in ("yes", "opt"), (key, typ, req)
        spec[key] = (TYPE_NAMES[typ], req == "yes")
    in_code = {}
    for kind, schema in SCHEMAS.items():
        for name, typ in schema.fields.items():
            in_code[(kind.value, name)] = (typ, True)
        for name, typ in schema.optional.items():
            in_code[(kind.value, name)] = (typ, False)
    assert set(spec) - set(in_code) == set(), "fields in PROTOCOL.md the code lacks"
    assert set(in_code) - set(spec) == set(), "fields of the code missing from PROTOCOL.md"
    assert {k: v for k, v in spec.items() if in_code[k] != v} == {}, "types or req differ"


def test_kinds_without_fields_say_so():
    none = {code(r[0]) for r in rows(section("7.2 Fields"), 5) if r[1] == "(none)"}
    assert none == {k.value for k, s in SCHEMAS.items() if not s.fields and not s.optional}


def test_the_array_table_is_the_schemas():
    spec = {}
    for kind_cell, name_cell, rule, req, _ in rows(section("7.3 Arrays"), 5):
        assert req in ("yes", "opt")
        spec[(code(kind_cell), code(name_cell))] = (rule, req == "yes")
    in_code = {}
    for kind, schema in SCHEMAS.items():
        for name, rule in schema.arrays.items():
            in_code[(kind.value, name)] = (rule, True)
        for name, rule in schema.optional_arrays.items():
            in_code[(kind.value, name)] = (rule, False)
    assert spec == in_code
    without = section("7.3 Arrays").split("carry no\narrays", 1)[0].rsplit("\n\n", 1)[1]
    assert set(re.findall(r"`([a-z_]+)`", without)) == {
        k.value for k, s in SCHEMAS.items() if not s.arrays and not s.optional_arrays}


def test_the_dtypes_are_the_codecs():
    """Section 7.3 names every dtype an array may carry, and which arrays are version 2's."""
    text = section("7.3 Arrays").split("Dtypes:", 1)[1]
    named = {m for m in re.findall(r'`"([<|][a-z][0-9])"`', text)}
    assert named == {d for dtypes in messages.ARRAY_DTYPES.values() for d in dtypes}
    for name, dtypes in messages.ARRAY_DTYPES.items():
        for dtype in set(dtypes) - {messages.FLOAT_DTYPE}:
            assert re.search(rf'`{name}`[^.]*`"{re.escape(dtype)}"`', text), (name, dtype)
    assert all(f"`{n}`" in text for n in messages.V2_ARRAYS)
    sizes = {code(r[1]): r[2] for r in rows(section("7.3 Arrays"), 5)}
    assert all(sizes[n] == rule for n, rule in messages.COMPRESSED_ARRAYS.items())


def test_the_size_rules_are_the_codes():
    text = section("7.3 Arrays")
    assert {messages.ARRAY_MODEL, messages.ARRAY_UPTO_MODEL, messages.ARRAY_SMALL} == {
        code(c) for c in re.findall(r"`(?:model|upto|small)`", text)}
    assert f"at most {messages.SMALL_ARRAY_MAX:,} values" in text


# -- envelope, layout, constants --------------------------------------------------------------

def test_the_envelope_table_is_the_codecs():
    keys = [code(r[0]) for r in rows(section("6. Envelope"), 3)]
    assert keys == [*codec.ENVELOPE, "fields", "arrays", "ts", "sig"]
    text = section("6. Envelope")
    assert f'`"{codec.WIRE_DTYPE}"`' in text and f'`"{codec.SIG_ALG}"`' in text


def test_the_stated_constants_are_the_codes():
    assert SPEC.startswith(f"# The fleetfl wire protocol, version {PROTOCOL_VERSION}\n")
    assert f"`{PROTOCOL_VERSION}` after the version-{PROTOCOL_VERSION} prefix, `1` in the " \
           "version-1 layout: the layout's version (else `bad_protocol`)" \
        in section("6. Envelope")
    layout_text = section("4. Message layout")
    assert f"h is at most {codec.HEADER_MAX:,} bytes" in layout_text
    assert f"at most {codec.DOWNLINK_HEADER_MAX:,} bytes (8 MiB)" in layout_text
    assert f"first {codec.HEADER_MAX:,} bytes" in section("4.2 Version 1 layout")
    assert f"{signing.SIGNATURE_BYTES} bytes, present if and only if" in layout_text
    assert "at most 1,024 entries" in section("5. Value types")
    source = (ROOT / "shared/wire/layout.py").read_text()  # where the header is unpacked
    assert "max_map_len=1 << 10" in source and "max_array_len=1 << 16" in source
    assert "max_str_len=1 << 16" in source and "max_bin_len=0" in source
    assert "at most 65,536 elements" in SPEC and "at most 65,536 bytes" in SPEC
    signed = section("8. Signing")
    assert signing.DOMAINS == {1: b"fleetfl-sig-v1\x00", 2: b"fleetfl-sig-v2\x00"}
    for proto, tag in signing.DOMAINS.items():
        assert f'version {proto}:  S = Ed25519-Sign(sender\'s private key,\n' \
               f'                             "{tag[:-1].decode()}\\0"' in signed
    assert f"max_message_age` (default {codec.DEFAULT_MAX_AGE_S:.0f} s)" in signed
    assert f"more than\n{codec.DEFAULT_MAX_SKEW_S:.0f} s ahead" in signed
    assert f"larger than {codec.MAX_STATUS_BYTES:,} bytes" in SPEC
    assert f"above {codec.MAX_STATUS_BYTES:,} bytes" in section("17. Refusal reasons")
    assert f"is the fixed string `{messages.COORDINATOR_ID}`" in SPEC
    assert f"`{messages.ID_PATTERN.pattern}`" in section("2. Identifiers")


def test_the_prefix_table_magic_and_alignment_are_the_layouts():
    text = section("4. Message layout")
    prefix = [[c.strip() for c in line.strip().strip("|").split("|")]
              for line in text.splitlines() if re.match(r"\s*\| \d+ \| \d+ \|", line)]
    assert [(int(o), int(n)) for o, n, _ in prefix] == [(0, 3), (3, 1), (4, 4)]
    assert sum(int(n) for _, n, _ in prefix) == layout.PREFIX_BYTES == 8
    assert f"magic `{layout.MAGIC.decode()}` (`" + " ".join(f"0x{b:02X}" for b in layout.MAGIC) \
        + "`)" in prefix[0][2]
    assert prefix[1][2] == f"layout version: `0x{PROTOCOL_VERSION:02x}`"
    assert "unsigned 32-bit **little-endian**" in prefix[2][2]
    assert layout.PREFIX.format == "<3sBI"  # little-endian: magic, version byte, u32 length
    assert f"a multiple of {layout.ALIGN}" in text and "0 to 15 zero bytes" in text
    assert layout.ALIGN == 16
    assert {0x80, 0x8F, 0xDE, 0xDF} <= layout.MAP_TYPES and len(layout.MAP_TYPES) == 18
    assert "`0x80`-`0x8f`\nfixmap, `0xde` map 16, `0xdf` map 32" in text
    detect = text[text.index("**Version detection.**"):]
    assert "first 4 bytes are `FLM` `0x02`" in detect and "e.g. `FLM` `0x03`" in detect


def worked_example() -> Message:
    """The message of PROTOCOL.md section 4.1, as its text describes it."""
    return Message(Kind.UPDATE, "demo", "pi01", 7, 3, {"window": 4, "samples": 100, "steps": 20},
                   {"delta": np.array([0.5, -1.0, 2.0], np.float32)})


def test_the_worked_example_is_what_the_codec_writes():
    text = section("4.1 Worked example")
    dump = bytes.fromhex("".join(m.group(1) for m in re.finditer(
        r"^[0-9a-f]{4}  ((?:[0-9a-f]{2} ){1,15}[0-9a-f]{2})", text, re.M)))
    payload = codec.encode(worked_example())
    assert dump == payload
    assert f"({len(payload)} bytes;" in text
    parts = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"[PHZA](_\d)?", cells[0]):
            parts[cells[0]] = (int(cells[1]), int(cells[2]))
    assert list(parts) == ["P", "H", "Z_0", "A_1", "Z_1"]
    h = int.from_bytes(payload[4:8], "little")
    back = codec.decode(payload, codec.DecodeContext("demo", 3))
    start = back["delta"].ctypes.data - np.frombuffer(payload, np.uint8).ctypes.data
    assert parts == {"P": (0, 8), "H": (8, h), "Z_0": (8 + h, start - 8 - h), "A_1": (start, 12),
                     "Z_1": (start + 12, len(payload) - start - 12)}
    assert start % layout.ALIGN == 0 and payload[8 + h:start] == bytes(start - 8 - h)
    assert f"h = `{payload[4:8].hex(' ')}` = {h}" in text
    v1 = codec.encode(worked_example(), proto=1)
    old = codec.decode(v1, codec.DecodeContext("demo", 3))["delta"]
    offset = old.ctypes.data - np.frombuffer(v1, np.uint8).ctypes.data
    assert f"the {offset}-byte header" in text and offset == h  # the same map, proto 1
    assert f"{len(v1)} bytes, the array at the odd offset {offset}" in text


def test_the_protocol_flag_is_the_configs():
    text = section("19. Versioning")
    default = next(f for f in dataclasses.fields(RunConfig) if f.name == "protocol")
    assert default.default == PROTOCOL_VERSION and default.metadata["choices"] == \
        messages.PROTOCOL_VERSIONS == (1, 2)
    assert f"{PROTOCOL_VERSION} by default; `--protocol 1`" in text
    assert "`capabilities.protocols: [1, 2]`" in text
    agent = (ROOT / "agent/runner.py").read_text()
    assert '"protocols": list(PROTOCOL_VERSIONS)' in agent


def test_the_chunk_header_is_the_codes():
    text = section("9. Chunking")
    offsets = [(int(r[0]), int(r[1])) for r in (
        [c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
        if re.match(r"\| \d+ \|", line))]
    assert sum(size for _, size in offsets) == chunking.HEADER_BYTES == 54
    assert f"{chunking.HEADER_BYTES}-byte header" in text
    assert f"magic `{chunking.MAGIC.decode()}`" in text
    assert f"chunk format version: {chunking.FORMAT_VERSION}" in text
    assert f"idle for {chunking.DEFAULT_TIMEOUT_S:.0f} s" in text
    assert chunking.HEADER.format == ">4sBB32sIIQ"


def test_the_job_table_is_the_job():
    spec = {code(r[0]): r[1] for r in rows(section("11. The job dictionary"), 3)}
    in_code = {}
    for f in dataclasses.fields(JobConfig):
        default = f.default
        in_code[f.name] = ("str" if isinstance(default, Enum | str) else
                           "bool" if isinstance(default, bool) else type(default).__name__)
    assert spec == in_code


def test_the_refusal_reply_limits_are_the_coordinators():
    text = section("18. Refusal replies")
    assert f"a bucket of {coordinator_runner.REPLY_BURST}, refilled one per " \
           f"{coordinator_runner.REPLY_INTERVAL:g} s" in text
    assert f"{coordinator_runner.REPLY_RATE_ALL:g} per second" in text
    assert f"at most {coordinator_runner.REPLY_DETAIL_MAX} printable" in text
    assert f"at most {coordinator_runner.MAX_REFUSALS_KEPT:,} agents" in text
    assert "`fl/<run>/status/<id>/refusal`" in text
    assert Topics("r").refusal("pi01") == "fl/r/status/pi01/refusal"
    acl = (ROOT / "ansible/roles/broker/templates/acl.j2").read_text()
    assert "pattern read fl/{{ fleet_run }}/status/%u/refusal\n" in acl


# -- refusal reasons ------------------------------------------------------------------------------

def reasons_in_code() -> dict[str, set[str]]:
    """reason -> where it is raised: "codec" (shared/wire/codec.py) or "coordinator"
    (anything else), plus the link's own."""
    found: dict[str, set[str]] = {}
    for path in [*(ROOT / "shared").rglob("*.py"), *(ROOT / "coordinator").rglob("*.py"),
                 *(ROOT / "agent").rglob("*.py")]:
        text = path.read_text()
        where = "codec" if path.parent.name == "wire" and path.name in ("codec.py", "layout.py") \
            else "coordinator"
        for reason in re.findall(r"\b(?:Rejected|CodecError)\(\s*\"([a-z_]+)\"", text):
            found.setdefault(reason, set()).add(where)
        for pair in re.findall(r"\breason = \"([a-z_]+)\" if .* else \"([a-z_]+)\"", text):
            for reason in pair:  # a reason chosen by a condition, then raised
                found.setdefault(reason, set()).add(where)
        for reason in re.findall(r"_refused\[\"([a-z_]+)\"\]", text):
            found.setdefault(reason, set()).add("MQTT link")
    found.setdefault(OUT_OF_BOUNDS, set()).add("coordinator")
    return found


def test_the_refusal_table_lists_exactly_the_reasons_in_the_code():
    table = {code(r[0]): {b.strip() for b in r[1].split(",")}
             for r in rows(section("17. Refusal reasons"), 3)}
    in_code = reasons_in_code()
    assert set(in_code) - set(table) == set(), "reasons of the code missing from PROTOCOL.md"
    assert set(table) - set(in_code) == set(), "reasons in PROTOCOL.md the code never gives"
    assert {r: (table[r], w) for r, w in in_code.items() if table[r] != w} == {}


def test_every_reason_in_the_text_is_a_reason_of_the_table():
    """Reasons named in prose (`bad_type` ...) are reasons of the table, or other names the
    spec defines (kinds, fields, keys)."""
    table = {code(r[0]) for r in rows(section("17. Refusal reasons"), 3)}
    named = set(re.findall(r"\(`([a-z_]+)`\)", SPEC)) | set(
        re.findall(r"refused as `([a-z_]+)`", SPEC))
    names = {n for s in SCHEMAS.values() for n in (*s.fields, *s.optional)}
    settings = {f.name for cls in (RunConfig, AgentConfig) for f in dataclasses.fields(cls)}
    known = table | {k.value for k in Kind} | names | settings | set(ALGORITHMS)
    assert named - known == set()


@pytest.mark.parametrize("kind", list(Kind))
def test_every_kind_round_trips_with_the_fields_the_spec_requires(kind):
    """A message with exactly the required fields and arrays of the spec's tables decodes."""
    fields = {}
    for kind_cell, field_cell, typ, req, _ in rows(section("7.2 Fields"), 5):
        if code(kind_cell) == kind.value and field_cell != "(none)" and req == "yes":
            fields[code(field_cell)] = {"int": 1, "float": 1.0, "str": "pi01", "map": {},
                                        "array": []}[typ]
    arrays = {code(r[1]): np.zeros(3, np.float32)
              for r in rows(section("7.3 Arrays"), 5)
              if code(r[0]) == kind.value and r[3] == "yes"}
    msg = Message(kind, "r1", "pi01", 5, 0, fields, arrays)
    back = codec.decode(codec.encode(msg), codec.DecodeContext("r1", model_size=3))
    assert back.fields == fields and set(back.arrays) == set(arrays)


# -- limits a device implements from the text (issue 18's independent client) ------------------

def test_the_depth_limit_is_the_codecs_and_real_headers_stay_far_below_it():
    text = section("5. Value types")
    assert f"maps and arrays nested at most {layout.MAX_DEPTH} levels: the header map is " \
           "level 1" in text
    assert f"nesting deeper than {layout.MAX_DEPTH} levels" in section("17. Refusal reasons")
    assert f"beyond level {layout.MAX_DEPTH} before descending" in section("20. Notes")
    # "the deepest header the reference writes has 5": the golden vectors, modelled on what
    # the agent and coordinator send (a hello's profile, LBGM scalars, the job)
    golden = ROOT / "tests" / "golden"
    depths = {}
    for vector in json.loads((golden / "vectors.json").read_text())["vectors"]:
        if "expect" in vector and "chunk_topics" not in vector:
            payload = (golden / vector["files"][0]).read_bytes()
            depths[vector["name"]] = layout.depth(layout.split(payload)[1])
    deepest = {n: d for n, d in depths.items() if n.rsplit("/", 1)[-1].startswith(
        "hello.deepest")}
    assert set(deepest.values()) == {layout.MAX_DEPTH} and len(deepest) == 4
    others = {n: d for n, d in depths.items() if n not in deepest}
    assert max(others.values()) == 5 and others["hello"] == 5, others
    assert "(the deepest header the reference writes has 5: `hello` " \
           "`fields.capabilities.profile.f`)" in text


def test_the_chunk_caps_are_the_reassemblers():
    text = section("9. Chunking")
    sets, cap = chunking.DEFAULT_SETS_PER_SENDER, chunking.Reassembler(codec.DEFAULT_MAX_BYTES)
    assert f"at most {sets} sets in flight per publisher: a ninth evicts" in text
    assert sets == 8 and cap.max_held_bytes == 2 * codec.DEFAULT_MAX_BYTES
    assert f"at most twice the message limit ({cap.max_held_bytes >> 20} MiB by default)" in text
    assert f"counted with {chunking.CHUNK_OVERHEAD} bytes of bookkeeping" in text
    # a publisher: an agent's up/ and status/ together, the coordinator's down/ together
    owner = chunking.topic_owner
    assert owner("fl/r/up/a") == owner("fl/r/status/a") != owner("fl/r/up/b")
    assert owner("fl/r/down/avg") == owner("fl/r/down/ctl") == owner("fl/r/down/model")
    # the ninth set of one publisher evicts its least recently active set, no one else's
    reassembler = chunking.Reassembler(1 << 16)
    first_chunks = []
    for i in range(sets + 1):
        topic = "fl/r/up/a" if i % 2 else "fl/r/status/a"
        first_chunks.append(chunking.split(topic, bytes([i]) * 600, False, 400)[0])
    other = chunking.split("fl/r/up/b", b"b" * 600, False, 400)
    reassembler.add(*other[0], now=0.0)
    for i, (topic, chunk) in enumerate(first_chunks):
        reassembler.add(topic, chunk, now=1.0 + i)
    assert reassembler.stats["evicted_per_sender"] == 1
    done = [reassembler.add(topic, chunk, now=20.0) for topic, chunk in other[1:]]
    assert done[-1].payload == b"b" * 600  # b's set was kept


@pytest.mark.parametrize("key", [f.name for f in dataclasses.fields(JobConfig)
                                 if isinstance(f.default, float)])
def test_every_float_of_the_job_must_be_finite(key):
    assert "Every float of the job MUST be finite" in section("11. The job dictionary")
    assert f"`{key}` | float |" in section("11. The job dictionary")
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ConfigError, match="finite"):
            job_from_dict({key: bad})


def test_the_rules_a_device_follows_are_musts_in_the_sections_it_reads():
    assert "A device MUST ignore a message whose kind does not belong to the topic it arrived " \
           "on" in section("3.2 Topics")
    assert "it MUST then resynchronise" in section("13.4 Resynchronising")
    will = section("3.4 Last will")
    assert "it MUST carry the first `seq` the process issues" in will
    assert f"newest protocol version the device writes (the reference: {PROTOCOL_VERSION})" \
        in will
    versioning = section("19. Versioning")
    assert "a `refused` status is in the version of the `model`\n  it refuses" in versioning
    assert "so a device writing version 2\n  MUST list it" in versioning
    # the agent: the will stamped first, in the newest version; refused in the model's
    agent = (ROOT / "agent/runner.py").read_text()
    init = agent[agent.index("def __init__"):agent.index("def _stamp")]
    assert init.count("self._stamp(") == 1 and "Kind.OFFLINE" in init
    assert "self.proto = PROTOCOL_VERSION" in init and PROTOCOL_VERSION == max(
        messages.PROTOCOL_VERSIONS)
    assert "self.proto = msg.proto" in agent[agent.index("def _wait_for_model"):
                                             agent.index("def _join_first")]
    assert "2^53 - 1" in section("10. Sequence numbers") and "until the year 2255" in SPEC
    assert 2**53 // 1_000_000 // (365.2425 * 86400) + 1970 == 2255  # microseconds since 1970
