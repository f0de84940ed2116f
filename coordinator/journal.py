"""Write-ahead journal of the coordinator's inputs since its last checkpoint.

Every upstream message the state machine accepted (its raw payload, topic and arrival time on
the coordinator's clock) is appended here before the broker gets its PUBACK, and so is every
clock tick that closed a window. A checkpoint covers everything journaled before it: it names
the journal generation that follows it, and the older files are deleted. `--resume` loads the
checkpoint and feeds the newer generations through the same state machine, in order, with the
same clock values, so it reaches the state the killed coordinator had: the same versions,
bit for bit. Anything replayed twice is refused by sequence number.

Records: a header (body length, CRC-32 of the body) and a msgpack body. A torn tail (a crash
mid-write) fails the length or CRC check; reading stops there and appending resumes after the
last good record.

Durability: each record is written and flushed to the kernel at once, which survives the
coordinator being killed. fsync (which survives the machine losing power) is batched: `sync()`
runs before acknowledging a batch and before publishing anything that depends on it. Costs
measured for a 20 KB update in tests/test_faults.py::test_journal_fsync_cost (see the README).
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack

HEADER = struct.Struct("<II")  # body length, crc32(body)
MAX_RECORD = 1 << 31
PREFIX, SUFFIX = "journal-", ".wal"
MESSAGE, TICK = "msg", "tick"


@dataclass(frozen=True)
class Entry:
    kind: str  # MESSAGE or TICK
    at: float  # the coordinator's clock (seconds; it stops while the coordinator is down)
    topic: str = ""
    payload: bytes = b""
    retain: bool = False


class Journal:
    def __init__(self, directory: str | Path, fsync: bool = True) -> None:
        self.dir = Path(directory)
        self.fsync = fsync
        self.gen = 0
        self._file = None
        self._dirty = False
        self.records = 0  # appended since the last rotation

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
        """Append to generation `gen` (after its last good record); drop older ones."""
        self.close()
        path = self._path(gen)
        good = _good_length(path) if path.exists() else 0
        self._file = open(path, "r+b" if path.exists() else "wb")  # noqa: SIM115 - kept open
        self._file.truncate(good)  # a torn tail would hide every record appended after it
        self._file.seek(good)
        self.gen, self.records = gen, 0
        self._fsync_dir()
        for old in self.generations():
            if old < gen:
                self._path(old).unlink(missing_ok=True)

    def rotate(self, gen: int) -> None:
        """A checkpoint now covers every record so far: start generation `gen`."""
        self.open(gen)

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
        # a new file's name is durable only once its directory is
        if self.fsync:
            fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

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
        """Every good record of generations >= `from_gen`, oldest first."""
        for gen in self.generations():
            if gen >= from_gen:
                yield from _read(self._path(gen))


def _records(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(end offset, body) of each good record, stopping at the first torn or corrupt one."""
    off = 0
    while off + HEADER.size <= len(data):
        size, crc = HEADER.unpack_from(data, off)
        start, end = off + HEADER.size, off + HEADER.size + size
        if size > MAX_RECORD or end > len(data) or zlib.crc32(data[start:end]) != crc:
            return
        yield end, data[start:end]
        off = end


def _good_length(path: Path) -> int:
    return max((end for end, _ in _records(path.read_bytes())), default=0)


def _read(path: Path) -> Iterator[Entry]:
    for _, body in _records(path.read_bytes()):
        rec = msgpack.unpackb(body, raw=False)
        if rec[0] == MESSAGE:
            yield Entry(MESSAGE, float(rec[1]), rec[2], rec[3], bool(rec[4]))
        elif rec[0] == TICK:
            yield Entry(TICK, float(rec[1]))
