"""Write-ahead journal of the coordinator's inputs since its last checkpoint.

Every upstream message the state machine accepted (its raw payload, topic and arrival time on
the coordinator's clock) is appended here before the broker gets its PUBACK, and so is every
clock tick that closed a window. A checkpoint covers everything journaled before it: it names
the journal generation that follows it, and the older files are deleted. `--resume` loads the
checkpoint and feeds the newer generations through the same state machine, in order, with the
same clock values, so it reaches the state the killed coordinator had: the same versions,
bit for bit. Anything replayed twice is refused by sequence number.

Records: a header (body length, CRC-32 of the body) and a msgpack body. A torn tail of the
newest generation (a kill mid-write: that record was never acknowledged) is dropped, and
appending resumes after the last good record. Anything else that fails the length, CRC or
record check is damage to records already acknowledged: `inspect` reports it span by span
(the framing usually holds, so a bad record is skipped by its length and the records after it
are still read), `open` refuses to truncate it, and `salvage` keeps the file aside and
rewrites the records that are good (what `fl-coordinator --resume --accept-journal-loss`
does; without the flag the coordinator refuses to resume).

Generations: a checkpoint names the generation that follows it (`rotate`); the checkpoint it
replaced is kept as a fallback (rundir.py), so the generations it needs are kept too and only
older ones are deleted.

Durability: each record is written and flushed to the kernel at once, which survives the
coordinator being killed. fsync (which survives the machine losing power) is batched: `sync()`
runs before acknowledging a batch and before publishing anything that depends on it. Costs
measured for a 20 KB update in tests/test_faults.py::test_journal_fsync_cost (see the README).
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgpack

from fleetfl.coordinator.durable import fsync_path, set_aside, write_atomic

HEADER = struct.Struct("<II")  # body length, crc32(body)
MAX_RECORD = 1 << 31
PREFIX, SUFFIX = "journal-", ".wal"
MESSAGE, TICK = "msg", "tick"
# How every record body begins: a msgpack array of 5 (message) or 2 (tick) items, the kind
# first. Where the framing is lost (a damaged length), the next record is looked for there.
SIGNATURES = (b"\x95" + msgpack.packb(MESSAGE), b"\x92" + msgpack.packb(TICK))


class JournalDamaged(Exception):
    """Records that cannot be read, elsewhere than in the newest generation's torn tail."""


@dataclass(frozen=True)
class Entry:
    kind: str  # MESSAGE or TICK
    at: float  # the coordinator's clock (seconds; it stops while the coordinator is down)
    topic: str = ""
    payload: bytes = b""
    retain: bool = False


@dataclass(frozen=True)
class Damage:
    """An unreadable span of a generation file."""

    path: Path
    offset: int
    length: int
    why: str
    records: int  # records lost in it: 1 where the framing held, 0 where it is not known

    @property
    def gen(self) -> int:
        return int(self.path.name[len(PREFIX):-len(SUFFIX)])

    def __str__(self) -> str:
        lost = "1 record" if self.records else "an unknown number of records"
        return f"{self.path.name}: {self.why}, {self.length} bytes at offset {self.offset} ({lost})"


@dataclass
class Report:
    """What the generations a resume replays hold (`Journal.inspect`)."""

    records: int = 0  # good ones
    damage: list[Damage] = field(default_factory=list)  # lost records, acknowledged ones
    torn: list[Damage] = field(default_factory=list)  # the newest generation's torn tail
    missing: list[int] = field(default_factory=list)  # generations deleted or never kept

    @property
    def lost(self) -> int:
        """Records lost to damage, at least (a span whose framing was lost counts as one)."""
        return sum(max(d.records, 1) for d in self.damage)

    def lost_text(self) -> str:
        """`lost` for a message: "3 records", "at least 3 records"."""
        unknown = any(d.records == 0 for d in self.damage)
        return f"{'at least ' if unknown else ''}{self.lost} record{'s' * (self.lost != 1)}"


class Journal:
    def __init__(self, directory: str | Path, fsync: bool = True) -> None:
        self.dir = Path(directory)
        self.fsync = fsync
        self.gen = 0
        self._file = None
        self._dirty = False
        self.records = 0  # appended since the last rotation
        # the generation the newest checkpoint names (0: none yet, the journal from the start);
        # the next rotate keeps it and those after it for the checkpoint that becomes the
        # previous one
        self.checkpoint_gen = 0

    # -- files ----------------------------------------------------------------------------
    def _path(self, gen: int) -> Path:
        return self.dir / f"{PREFIX}{gen:08d}{SUFFIX}"

    def generations(self) -> list[int]:
        gens = []
        for p in self.dir.glob(f"{PREFIX}*{SUFFIX}"):
            try:
                gens.append(int(p.name[len(PREFIX):-len(SUFFIX)]))
            except ValueError:
                continue
        return sorted(gens)

    def open(self, gen: int) -> None:
        """Append to generation `gen`, after its last good record: a torn tail is cut off (it
        would hide every record appended after it). Damage before it is never cut:
        JournalDamaged (see `salvage`)."""
        self.close()
        path = self._path(gen)
        good = _append_offset(path) if path.exists() else 0
        self._file = open(path, "r+b" if path.exists() else "wb")  # noqa: SIM115 - kept open
        self._file.truncate(good)
        self._file.seek(good)
        self.gen, self.records = gen, 0
        self._fsync_dir()

    def rotate(self, gen: int) -> None:
        """A checkpoint naming `gen` now covers every record so far: start generation `gen`.
        The checkpoint it replaced stays as the fallback: keep the generations it needs."""
        self.open(gen)
        for old in self.generations():
            if old < self.checkpoint_gen:
                self._path(old).unlink(missing_ok=True)
        self.checkpoint_gen = gen

    def clear(self) -> None:
        """A fresh run: no journal from an earlier one may be replayed into it."""
        self.close()
        for gen in self.generations():
            self._path(gen).unlink(missing_ok=True)

    def close(self) -> None:
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None

    def _fsync_dir(self) -> None:
        if self.fsync:
            fsync_path(self.dir)

    # -- writing --------------------------------------------------------------------------
    def append_message(self, at: float, topic: str, payload: bytes, retain: bool) -> None:
        self._append([MESSAGE, at, topic, payload, retain])

    def append_tick(self, at: float) -> None:
        self._append([TICK, at])

    def _append(self, body: list) -> None:
        assert self._file is not None, "journal not open"
        blob = msgpack.packb(body, use_bin_type=True)
        # one write per record: a kill leaves either all of it in the kernel or a torn tail
        self._file.write(HEADER.pack(len(blob), zlib.crc32(blob)) + blob)
        self._file.flush()
        self._dirty = True
        self.records += 1

    def sync(self) -> None:
        """fsync what was appended since the last call (no-op if nothing was)."""
        if self._dirty and self._file is not None:
            if self.fsync:
                os.fsync(self._file.fileno())
            self._dirty = False

    # -- reading --------------------------------------------------------------------------
    def entries(self, from_gen: int) -> Iterator[Entry]:
        """Every good record of generations >= `from_gen`, oldest first (damaged spans are
        skipped: `inspect` first to know what they cost)."""
        for gen in self.generations():
            if gen >= from_gen:
                path = self._path(gen)
                for _, _, item in _walk(path, path.read_bytes()):
                    if isinstance(item, Entry):
                        yield item

    def missing(self, from_gen: int) -> list[int]:
        """Generations a replay from `from_gen` needs that are not there."""
        gens = [g for g in self.generations() if g >= from_gen]
        return sorted(set(range(from_gen, gens[-1] + 1)) - set(gens)) if gens else []

    def inspect(self, from_gen: int) -> Report:
        """What replaying generations >= `from_gen` would read and lose."""
        gens = [g for g in self.generations() if g >= from_gen]
        report = Report(missing=self.missing(from_gen))
        for gen in gens:
            path = self._path(gen)
            data = path.read_bytes()
            for _, _, item in _walk(path, data):
                if isinstance(item, Entry):
                    report.records += 1
                elif gen == gens[-1] and item.offset + item.length == len(data):
                    report.torn.append(item)  # cut by a kill: never acknowledged
                else:  # a closed generation was fsynced whole before the next one began
                    report.damage.append(item)
        return report

    def salvage(self, gen: int) -> Path:
        """Keep generation `gen` aside as it is, and rewrite it with its good records only.
        Returns the kept file."""
        self.close()
        path = self._path(gen)
        data = path.read_bytes()
        good = b"".join(data[start:end] for start, end, item in _walk(path, data)
                        if isinstance(item, Entry))
        kept = set_aside(path, copy=True)
        write_atomic(path, good)
        return kept


def _parse(body: bytes) -> Entry | None:
    """The record a CRC-valid body holds, or None if it holds none (never an exception: a
    malformed record is damage like a bad CRC)."""
    try:
        rec = msgpack.unpackb(body, raw=False)
    except (ValueError, msgpack.UnpackException):  # ExtraData, FormatError, OutOfData...
        return None
    match rec:
        case [str(kind), int() | float() as at, str(topic), bytes(payload), bool(retain)] \
                if kind == MESSAGE and math.isfinite(at):
            return Entry(MESSAGE, float(at), topic, payload, retain)
        case [str(kind), int() | float() as at] if kind == TICK and math.isfinite(at):
            return Entry(TICK, float(at))
    return None


def _frame(data: bytes, off: int) -> tuple[int | None, Entry | None, str]:
    """(end, record, "") of the record at `off`; if it is unreadable, (its end where its
    length is plausible else None, None, why)."""
    if off + HEADER.size > len(data):
        return None, None, "cut-off header"
    size, crc = HEADER.unpack_from(data, off)
    end = off + HEADER.size + size
    if size == 0:  # a NUL-filled header (crc32 of nothing is 0): no record is empty
        return end, None, "empty record"
    if size > MAX_RECORD or end > len(data):
        return None, None, f"record length {size} runs past the end"
    body = data[end - size:end]
    if zlib.crc32(body) != crc:
        return end, None, "bad CRC"
    entry = _parse(body)
    return (end, entry, "") if entry is not None else (end, None, "malformed record")


def _next_record(data: bytes, start: int) -> int | None:
    """Offset of the first good record at or after `start` (framing lost: search for the
    bytes every record body begins with)."""
    while True:
        found = [i for i in (data.find(sig, start + HEADER.size) for sig in SIGNATURES)
                 if i >= 0]
        if not found:
            return None
        off = min(found) - HEADER.size
        if _frame(data, off)[1] is not None:
            return off
        start = off + 1


def _walk(path: Path, data: bytes) -> Iterator[tuple[int, int, Entry | Damage]]:
    """(start, end, record or damaged span) over a generation file, in order."""
    off = 0
    while off < len(data):
        end, entry, why = _frame(data, off)
        if entry is not None:
            yield off, end, entry
            off = end
            continue
        if end is not None and end < len(data) and _frame(data, end)[1] is not None:
            yield off, end, Damage(path, off, end - off, why, 1)  # its length held
            off = end
            continue
        nxt = _next_record(data, off + 1)
        stop = len(data) if nxt is None else nxt
        # one record if its length ran to the end, else as many as the span hid
        yield off, stop, Damage(path, off, stop - off, why, int(end == len(data)))
        off = stop


def _append_offset(path: Path) -> int:
    """Where appending goes on: after the last good record, if only a torn tail follows."""
    data = path.read_bytes()
    good = 0
    for _, end, item in _walk(path, data):
        if isinstance(item, Entry):
            good = end
        elif end < len(data):
            raise JournalDamaged(f"{item}; not a torn tail: appending would lose what "
                                 "follows it")
    return good
