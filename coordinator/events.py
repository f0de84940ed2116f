"""events.jsonl, the run's log: its format, its one writer and its one reader.

One JSON object per line, each tagged with its record type and the schema it was written in
(README "Event log (events.jsonl)" lists every field; tests/test_event_schema.py holds that
list to what the code writes):

- `{"type": "version", "schema": 2, ...}`: a published version (coordinator/recorder.py);
- `{"type": "evaluated", "schema": 2, "version": N, ...}`: its central test-set evaluation,
  logged when the background evaluation ends;
- `{"type": "federated", "schema": 2, "version": N, ...}`: its federated evaluation (the
  agents' validation splits), logged when the agents have answered.

The schema version is a field of every line rather than a header line: a resume truncates and
rewrites the file, a crash can tear any line (the first included), and a run started by an
older fleetfl and resumed by this one holds lines of both schemas; a per-line field survives
all three, and any single line (`tail -f`, `grep`) still says what it is.

Schema 1 (fleetfl before the record types): untagged version lines, with `"loss": null,
"accuracy": null` until evaluated, and `{"evaluated": N, ...}` lines holding central or
federated (`fed_*`) results. They are read as records of schema 1 with the type they imply.
A line of a newer schema than SCHEMA is refused with a message saying so.

Every reader goes through `read` (the records, in order) or `fold` (one dict per version,
evaluations merged in; `RunDir.events()`): fl-report, fl-export, the accounting check, the
benches and the tests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fleetfl.coordinator.durable import write_all, write_atomic

FILE = "events.jsonl"
SCHEMA = 2  # 1: untagged lines (see above)
VERSION, EVALUATED, FEDERATED = "version", "evaluated", "federated"
TYPES = (VERSION, EVALUATED, FEDERATED)
# What a folded version holds before (or without) an evaluation: the central result keys a
# reader may index (`e["accuracy"] is None`: not evaluated).
NOT_EVALUATED = {"loss": None, "accuracy": None}
_TAGS = ("type", "schema")


class EventLogError(ValueError):
    """events.jsonl holds a line this fleetfl cannot read: written by a newer one."""


def record(kind: str, fields: dict) -> dict:
    """A record of type `kind` in the current schema."""
    assert kind in TYPES, kind
    return {"type": kind, "schema": SCHEMA, **fields}


def encode(rec: dict) -> bytes:
    return (json.dumps(rec, separators=(",", ":")) + "\n").encode()


def append(path: Path, rec: dict) -> None:
    """Append one record. One write per line on an O_APPEND descriptor: a crash tears at
    most this line (a buffered file writes a line longer than its buffer in pieces), and the
    line starts on a line of its own after an earlier crash's torn one."""
    line = encode(rec)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        write_all(fd, line)
    finally:
        os.close(fd)


def rewrite(path: Path, records: list[dict]) -> None:
    """Replace the file by `records`, atomically: a crash leaves the old file or the new."""
    write_atomic(path, b"".join(encode(r) for r in records))


def parse(line: bytes, number: int = 0) -> dict | None:
    """The record a line holds, schema 1 lines tagged with their implied type; None if the
    line is not a whole record (torn by a crash); EventLogError if it is of a newer schema."""
    try:
        entry = json.loads(line)
    except ValueError:  # torn JSON, NUL bytes, not UTF-8
        return None
    if not isinstance(entry, dict):
        return None
    if "type" not in entry:
        entry = _schema1(entry)
    elif not isinstance(entry.get("schema"), int):
        return None
    elif entry["schema"] > SCHEMA:
        raise EventLogError(f"{FILE} line {number}: schema {entry['schema']}, written by a "
                            f"newer fleetfl (this one reads schemas 1 to {SCHEMA}): upgrade "
                            "fleetfl to read this run")
    if entry is None or entry["type"] not in TYPES or not isinstance(entry.get("version"), int):
        return None
    return entry


def _schema1(entry: dict) -> dict | None:
    if "evaluated" in entry:
        version = entry.pop("evaluated")
        federated = any(k.startswith("fed_") for k in entry)
        return {"type": FEDERATED if federated else EVALUATED, "schema": 1,
                "version": version, **entry}
    return {"type": VERSION, "schema": 1, **entry} if "version" in entry else None


def read(path: Path) -> tuple[list[dict], list[int]]:
    """(the records in the order written, numbers of the lines that are not whole records)."""
    if not path.exists():
        return [], []
    records: list[dict] = []
    damaged: list[int] = []
    for number, line in enumerate(path.read_bytes().split(b"\n"), 1):
        if not line:
            continue
        rec = parse(line, number)
        if rec is None:
            damaged.append(number)
        else:
            records.append(rec)
    return records, damaged


class Folded:
    """One dict per version in the order logged: the version record (with `loss` and
    `accuracy` None until evaluated) and its evaluations' fields merged in. An evaluation
    of a version that has no line (cut on resume) is dropped."""

    def __init__(self) -> None:
        self.versions: list[dict] = []
        self.by_version: dict[int, dict] = {}

    def add(self, rec: dict) -> None:
        if rec["type"] == VERSION:
            entry = {**NOT_EVALUATED, **rec}
            self.by_version[rec["version"]] = entry
            self.versions.append(entry)
        elif rec["version"] in self.by_version:
            self.by_version[rec["version"]].update(
                {k: v for k, v in rec.items() if k not in (*_TAGS, "version")})


def fold(records: list[dict]) -> list[dict]:
    folded = Folded()
    for rec in records:
        folded.add(rec)
    return folded.versions
