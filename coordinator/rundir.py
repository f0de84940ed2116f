"""The run directory: resolved config, one JSON line per published version, checkpoints,
the write-ahead journal (journal.py) and the update accounting (accounting.py).

Checkpoints are written to a temporary file and renamed over the old one, so a coordinator
killed mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgpack
import numpy as np
import yaml

CHECKPOINT = "checkpoint.msgpack"
MODELS = "models"  # models/v000012.npy: the global model of each evaluated version (fl-export)
EVALUATED = "evaluated"  # key of an evaluation line: the version it belongs to


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.events_path = self.path / "events.jsonl"

    def write_config(self, config: dict) -> None:
        (self.path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    def append_event(self, event: dict) -> None:
        with self.events_path.open("a") as f:
            f.write(json.dumps(event, separators=(",", ":")) + "\n")
            f.flush()

    def append_evaluation(self, version: int, values: dict) -> None:
        """The test-set result of a version, logged when the background evaluation ends
        (coordinator/evaluator.py); `events()` folds it into that version's line."""
        self.append_event({EVALUATED: version, **values})

    def truncate_events(self, version: int) -> None:
        """Drop event lines past `version`: on resume, what the checkpoint does not hold is
        published again, and must not be logged twice."""
        kept = [e for e in self.events() if e["version"] <= version]
        self.events_path.write_text("".join(json.dumps(e, separators=(",", ":")) + "\n"
                                            for e in kept))

    def events(self) -> list[dict]:
        """One dict per version, in the order logged, evaluation results folded in."""
        if not self.events_path.exists():
            return []
        events: list[dict] = []
        by_version: dict[int, dict] = {}
        for line in self.events_path.read_text().splitlines():
            if not line:
                continue
            entry = json.loads(line)
            if EVALUATED in entry:
                version = entry.pop(EVALUATED)
                if version in by_version:  # else its version line was cut on resume
                    by_version[version].update(entry)
                continue
            by_version[entry["version"]] = entry
            events.append(entry)
        return events

    def save_checkpoint(self, params: np.ndarray, state: dict) -> None:
        blob = msgpack.packb({"params": np.ascontiguousarray(params, "<f4").tobytes(),
                              "state": state}, use_bin_type=True)
        tmp = self.path / (CHECKPOINT + ".tmp")
        with tmp.open("wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / CHECKPOINT)
        # the rename is durable only once the directory is: the journal generations it
        # covers are deleted right after this returns
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def load_checkpoint(self) -> tuple[np.ndarray, dict] | None:
        path = self.path / CHECKPOINT
        if not path.exists():
            return None
        data = msgpack.unpackb(path.read_bytes(), raw=False)
        return np.frombuffer(data["params"], dtype="<f4").astype(np.float32), data["state"]

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
