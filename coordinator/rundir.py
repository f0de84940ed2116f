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

    def truncate_events(self, version: int) -> None:
        """Drop event lines past `version`: on resume, what the checkpoint does not hold is
        published again, and must not be logged twice."""
        kept = [e for e in self.events() if e["version"] <= version]
        self.events_path.write_text("".join(json.dumps(e, separators=(",", ":")) + "\n"
                                            for e in kept))

    def events(self) -> list[dict]:
        if not self.events_path.exists():
            return []
        return [json.loads(line) for line in self.events_path.read_text().splitlines() if line]

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
