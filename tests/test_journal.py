"""The journal's framing under damage (issue 14, finding 5): a torn tail of the newest
generation is the trace of a kill and is dropped; anything else is damage, reported record by
record, never silently truncated, never an exception from a malformed record."""

from __future__ import annotations

import zlib
from pathlib import Path

import msgpack
import pytest

from fleetfl.coordinator.journal import HEADER, MESSAGE, TICK, Journal, JournalDamaged


def _journal(tmp_path: Path, gen: int = 0, ticks: int = 4) -> Path:
    j = Journal(tmp_path)
    j.open(gen)
    j.append_message(0.5, "fl/r/up/a", b"payload" * 20, False)
    for i in range(1, ticks):
        j.append_tick(float(i))
    j.close()
    return tmp_path / f"journal-{gen:08d}.wal"


def _frame(body: bytes) -> bytes:
    return HEADER.pack(len(body), zlib.crc32(body)) + body


def _splice(path: Path, after_records: int, insert: bytes) -> None:
    """Insert bytes after the first `after_records` records."""
    data = path.read_bytes()
    off = 0
    for _ in range(after_records):
        off += HEADER.size + HEADER.unpack_from(data, off)[0]
    path.write_bytes(data[:off] + insert + data[off:])


MALFORMED = {
    "empty body (a NUL header)": b"",
    "not msgpack": b"\xc1",
    "not a list": msgpack.packb(5),
    "no fields": msgpack.packb(["msg"]),
    "unknown kind": msgpack.packb(["what", 1.0]),
    "topic not a string": msgpack.packb(["msg", 1.0, 5, b"", False]),
    "clock not a number": msgpack.packb(["tick", "soon"]),
    "extra bytes": msgpack.packb(["tick", 1.0]) + b"\x00",
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_crc_valid_malformed_record_is_damage_not_a_crash(tmp_path: Path, body) -> None:
    path = _journal(tmp_path)
    _splice(path, 2, _frame(body))
    j = Journal(tmp_path)
    assert [(e.kind, e.at) for e in j.entries(0)] == [(MESSAGE, 0.5), (TICK, 1.0), (TICK, 2.0),
                                                     (TICK, 3.0)]
    report = j.inspect(0)
    assert report.lost == 1 and report.damage[0].offset > 0


def test_a_bad_crc_mid_file_is_skipped_by_its_length_and_counted(tmp_path: Path) -> None:
    path = _journal(tmp_path)
    data = bytearray(path.read_bytes())
    data[HEADER.size + 30] ^= 0xFF  # the first record's payload
    path.write_bytes(bytes(data))
    j = Journal(tmp_path)
    assert [e.at for e in j.entries(0)] == [1.0, 2.0, 3.0]  # the rest is still there
    report = j.inspect(0)
    assert (report.lost, report.damage[0].offset, report.torn) == (1, 0, [])
    with pytest.raises(JournalDamaged):  # appending must not truncate past it
        j.open(0)
    assert path.read_bytes() == bytes(data)


def test_a_corrupted_length_field_is_damage_not_a_torn_tail(tmp_path: Path) -> None:
    path = _journal(tmp_path, ticks=6)
    data = bytearray(path.read_bytes())
    data[3] = 0x7F  # the first record now claims 2 GB: it would look like a torn tail
    path.write_bytes(bytes(data))
    report = Journal(tmp_path).inspect(0)
    assert report.damage and report.torn == []
    assert [e.at for e in Journal(tmp_path).entries(0)] == [1.0, 2.0, 3.0, 4.0, 5.0]


@pytest.mark.parametrize("tail", [b"\x10\x00\x00", b"\x40\x00\x00\x00\x00\x00\x00\x00\x95",
                                  bytes(4096)], ids=["header", "body", "nul"])
def test_a_torn_tail_of_the_newest_generation_is_dropped(tmp_path: Path, tail: bytes) -> None:
    _journal(tmp_path, gen=1)
    path = _journal(tmp_path, gen=2)
    good = path.read_bytes()
    path.write_bytes(good + tail)
    j = Journal(tmp_path)
    report = j.inspect(1)
    assert report.damage == [] and report.lost == 0
    assert [t.length for t in report.torn] == [len(tail)]
    assert len(list(j.entries(1))) == 8
    j.open(2)  # appending resumes after the last good record
    j.append_tick(9.0)
    j.close()
    assert path.read_bytes()[: len(good)] == good and Journal(tmp_path).inspect(1).torn == []


def test_a_torn_tail_of_an_older_generation_is_damage(tmp_path: Path) -> None:
    """A closed generation was fsynced before the next one began: its records were
    acknowledged, so a cut in it is a loss."""
    old = _journal(tmp_path, gen=1)
    _journal(tmp_path, gen=2)
    old.write_bytes(old.read_bytes()[:-5])
    report = Journal(tmp_path).inspect(1)
    assert report.lost == 1 and report.damage[0].path == old


def test_salvage_keeps_the_damaged_file_and_rewrites_the_valid_records(tmp_path: Path) -> None:
    path = _journal(tmp_path)
    _splice(path, 1, _frame(b"\xc1"))
    damaged = path.read_bytes()
    j = Journal(tmp_path)
    aside = j.salvage(0)
    assert aside.read_bytes() == damaged and aside.name.startswith(path.name + ".damaged")
    assert j.inspect(0).damage == [] and len(list(j.entries(0))) == 4
    assert j.generations() == [0]  # the kept file is not a generation


def test_rotate_keeps_the_generations_the_previous_checkpoint_needs(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.open(0)
    for gen in (1, 2, 3):
        j.append_tick(float(gen))
        j.rotate(gen)  # a checkpoint naming `gen`; the one before it names gen - 1
        assert j.generations() == list(range(max(gen - 1, 0), gen + 1))
    j.close()
