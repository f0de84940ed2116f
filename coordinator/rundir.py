"""The run directory: resolved config, the event log (events.py: one record per published
version and per evaluation), checkpoints, the write-ahead journal (journal.py) and the update
accounting (accounting.py).

What a crash can leave, and what reading it does (issue 14, finding 4):
- events.jsonl is appended one write per line (O_APPEND), so a crash tears at most the line
  being written, and the next line starts on a line of its own. Reading skips a line that is
  not a whole event, loudly; a resume rewrites the file without it (atomically).
- A checkpoint is written to a temporary file, fsynced, and renamed over the old one, which
  is first renamed to checkpoint.msgpack.prev: killed at any point, one of the two is whole.
  It carries a CRC-32, so a torn, NUL-filled or altered file is refused rather than loaded as
  a wrong model; the coordinator then falls back to the previous one plus the journal
  (runner.py, `_resume`).
"""

from __future__ import annotations

import logging
import os
import zlib
from pathlib import Path

import msgpack
import numpy as np
import yaml

from fleetfl.coordinator import events
from fleetfl.coordinator.durable import fsync_path, write_atomic

log = logging.getLogger("fleetfl.coordinator")
CHECKPOINT = "checkpoint.msgpack"
PREVIOUS = CHECKPOINT + ".prev"  # the checkpoint before, kept as the fallback
CHECKPOINT_FORMAT = 2  # 1 (no "format" key): params and state, no CRC
MODELS = "models"  # models/v000012.npy: the global model of each evaluated version (fl-export)
Checkpoint = tuple[np.ndarray, dict]  # params, state


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read back: empty, torn, NUL-filled or altered."""


class ResumeError(Exception):
    """The run directory cannot be resumed without the operator: nothing usable is left, or
    going on would lose acknowledged updates (`fl-coordinator` exits with its own code)."""


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        # the folders made here, deepest first: a run that never starts removes them again
        # (remove_unstarted), so no folder is left for `--resume auto` to take for a run
        self.made: list[Path] = []
        missing = self.path.absolute()
        while not missing.exists() and missing != missing.parent:
            self.made.append(missing)
            missing = missing.parent
        self.path.mkdir(parents=True, exist_ok=True)
        self.events_path = self.path / events.FILE

    def remove_unstarted(self) -> bool:
        """For a run that never started (the broker could not be reached): remove the folders
        this RunDir made, if nothing was written into them; a folder that existed before (an
        earlier run's) is never touched. True if the run dir is gone."""
        for folder in self.made:
            try:
                folder.rmdir()  # only an empty folder
            except FileNotFoundError:
                continue
            except OSError:
                break  # something was written there meanwhile: keep it, and its parents
        return not self.path.exists()

    def write_config(self, config: dict) -> None:
        (self.path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    def append_event(self, event: dict) -> None:
        """Append a version record (tagged `"type": "version"` in the current schema unless
        it is already a record: events.py)."""
        if "type" not in event:
            event = events.record(events.VERSION, event)
        events.append(self.events_path, event)

    def append_record(self, record: dict) -> None:
        """Append a record built by events.record (coordinator/recorder.py)."""
        events.append(self.events_path, record)

    def append_evaluation(self, version: int, values: dict) -> None:
        """The evaluation of a version, logged when it ends: a federated record if every value
        is a `fed_*` one, else a central one; `events()` folds it into that version."""
        federated = all(k.startswith("fed_") for k in values)
        kind = events.FEDERATED if federated else events.EVALUATED
        events.append(self.events_path, events.record(kind, {"version": version, **values}))

    def truncate_events(self, version: int) -> None:
        """Drop records past `version`: on resume, what the checkpoint does not hold is
        published again, and must not be logged twice. Damaged lines go too, said loudly.
        Rewritten atomically: a crash leaves the old file or the new one."""
        records, damaged = events.read(self.events_path)
        if damaged:
            log.warning("%s: dropped %d damaged line(s) (line %s: not a whole event; a line "
                        "torn by a crash)", self.events_path, len(damaged),
                        ", ".join(map(str, damaged[:10])))
        events.rewrite(self.events_path, [r for r in records if r["version"] <= version])

    def events(self) -> list[dict]:
        """One dict per version, in the order logged, evaluation results folded in
        (events.fold). Lines that are not a whole record (torn by a crash) are skipped with
        a warning."""
        return events.fold(self.records())

    def records(self) -> list[dict]:
        """Every record of events.jsonl as written (events.read), damaged lines skipped with
        a warning."""
        records, damaged = events.read(self.events_path)
        if damaged:
            log.warning("%s: skipped %d damaged line(s) (line %s)", self.events_path,
                        len(damaged), ", ".join(map(str, damaged[:10])))
        return records

    def save_checkpoint(self, params: np.ndarray, state: dict) -> None:
        raw = np.ascontiguousarray(params, "<f4").tobytes()
        packed = msgpack.packb(state, use_bin_type=True)
        blob = msgpack.packb({"format": CHECKPOINT_FORMAT, "params": raw, "state": packed,
                              "crc": zlib.crc32(packed, zlib.crc32(raw))}, use_bin_type=True)
        if self.events_path.exists():  # the lines it covers must survive a power cut too
            fsync_path(self.events_path)
        # durable once this returns (the journal generations it covers are deleted next);
        # the checkpoint it replaces becomes the previous one
        write_atomic(self.path / CHECKPOINT, blob, previous=self.path / PREVIOUS)

    def load_checkpoint(self, name: str = CHECKPOINT) -> Checkpoint | None:
        """(params, state) of checkpoint file `name` (CHECKPOINT or PREVIOUS), None if there
        is none; CheckpointError if it cannot be read back."""
        path = self.path / name
        if not path.exists():
            return None
        data = path.read_bytes()
        if not data.strip(b"\0"):
            raise CheckpointError("empty" if not data else f"{len(data)} NUL bytes")
        try:
            top = msgpack.unpackb(data, raw=False)
            if top.get("format") == CHECKPOINT_FORMAT:
                raw, packed = top["params"], top["state"]
                if zlib.crc32(packed, zlib.crc32(raw)) != top["crc"]:
                    raise CheckpointError("CRC mismatch: torn or altered")
                state = msgpack.unpackb(packed, raw=False)
            else:  # format 1
                raw, state = top["params"], top["state"]
            params = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        except CheckpointError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, msgpack.UnpackException) as exc:
            raise CheckpointError(f"not a whole checkpoint ({type(exc).__name__}: "
                                  f"{str(exc)[:100]})") from None
        if not isinstance(state, dict) or not isinstance(state.get("version"), int):
            raise CheckpointError("not a whole checkpoint (no state or version)")
        return params, state

    def has_checkpoint(self) -> bool:
        """A checkpoint file is there, readable or not."""
        return any((self.path / name).exists() for name in (CHECKPOINT, PREVIOUS))

    def discard_checkpoints(self) -> None:
        """A fresh run: no checkpoint of an earlier one may be resumed from."""
        for name in (CHECKPOINT, PREVIOUS):
            (self.path / name).unlink(missing_ok=True)

    def save_model(self, version: int, params: np.ndarray) -> None:
        """Keep the global model of `version` for `fl-export --version` (written to a temporary
        file and renamed: a reader never sees half a file)."""
        folder = self.path / MODELS
        folder.mkdir(exist_ok=True)
        tmp = folder / f".v{version:06d}.npy.tmp"
        with tmp.open("wb") as f:
            np.save(f, np.ascontiguousarray(params, "<f4"))
        os.replace(tmp, self.model_path(version))

    def model_path(self, version: int) -> Path:
        return self.path / MODELS / f"v{version:06d}.npy"

    def saved_versions(self) -> list[int]:
        """Versions with a kept model, oldest first."""
        folder = self.path / MODELS
        if not folder.is_dir():
            return []
        return sorted(int(p.stem[1:]) for p in folder.glob("v*.npy") if p.stem[1:].isdigit())

    def load_model(self, version: int) -> np.ndarray:
        return np.load(self.model_path(version)).astype(np.float32)

