"""What a run logs per version and when it stops: one recorder for the real coordinator
(runner.py) and the simulator (sim_engine.py), so both write the same records (events.py) and
stop by the same rule.

The shell around it says what only it knows: the clock (seconds since the coordinator
started, or the simulator's virtual seconds), the agents online, the refusals and the bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fleetfl.coordinator import events
from fleetfl.coordinator.federated import FederatedResult
from fleetfl.coordinator.ledger import ByteLedger
from fleetfl.coordinator.rundir import RunDir
from fleetfl.shared.core.averaging import WindowResult


class StopRule:
    """Which versions are evaluated, and when the run ends: `max_versions` published, or the
    run's measure (central accuracy, else the federated one) at `target_accuracy` (0: none)."""

    def __init__(self, max_versions: int, target_accuracy: float = 0.0,
                 eval_every: int = 1) -> None:
        self.max_versions, self.target, self.eval_every = max_versions, target_accuracy, eval_every
        self.best_accuracy = 0.0
        self.last_accuracy: float | None = None  # the measure's latest value (STATUS=)
        self.target_hit: int | None = None  # the first version evaluated at the target

    @classmethod
    def of(cls, cfg: Any) -> StopRule:
        """From a RunConfig."""
        return cls(cfg.max_versions, cfg.target_accuracy or 0.0, cfg.eval_every)

    def due(self, version: int) -> bool:
        """Is `version` one to evaluate (every eval_every-th, and the last)?"""
        return version % self.eval_every == 0 or version >= self.max_versions

    def observe(self, version: int, accuracy: float | None) -> None:
        if accuracy is None:
            return
        self.last_accuracy = accuracy
        self.best_accuracy = max(self.best_accuracy, accuracy)
        if self.target and accuracy >= self.target and self.target_hit is None:
            self.target_hit = version

    def reason(self, version: int) -> str | None:
        """Why the run stops now that `version` is published, or None to go on."""
        if version >= self.max_versions:
            return f"reached {self.max_versions} versions"
        if self.target_hit is not None:
            return f"reached target accuracy {self.target} at version {self.target_hit}"
        return None


class Recorder:
    """Builds and appends the records of events.jsonl and feeds the stop rule.

    `clock()`: the run's time in seconds (the `time` field). `history`: with `keep`, the
    versions folded as `RunDir.events()` reads them back (the simulator's `events`)."""

    def __init__(self, rundir: RunDir, stop: StopRule, clock: Callable[[], float],
                 simulated: bool = False, keep: bool = False) -> None:
        self.rundir, self.stop, self.clock, self.simulated = rundir, stop, clock, simulated
        self.folded = events.Folded() if keep else None

    @property
    def history(self) -> list[dict]:
        return self.folded.versions if self.folded is not None else []

    def version(self, result: WindowResult, agents_online: int, rejected: dict[str, int],
                ledger: ByteLedger, per_agent: bool = True) -> dict:
        """Log a published version. `per_agent` False leaves `bytes_by_agent` empty (a
        simulated fleet of thousands: the line stays readable)."""
        snapshot = ledger.snapshot()
        if not per_agent:
            snapshot["bytes_by_agent"] = {}
        return self._append(events.record(events.VERSION, {
            "time": round(self.clock(), 3), "wall": time.time(),
            "version": result.version, "window": result.window,
            "contributors": result.contributors, "missing": result.missing,
            "staleness": result.staleness, "timed_out": result.timed_out,
            "local_steps": result.local_steps, "assignments": result.assignments,
            # participant selection: [window, agents] decided since the previous version
            "selected": result.selected,
            "agents_online": agents_online, "rejected": rejected, **snapshot,
            # accounting: which update (sender, seq, window) went into this version
            "updates": [[a, result.seqs.get(a, -1), result.window]
                        for a in result.contributors],
            "simulated": self.simulated,
        }))

    def evaluated(self, version: int, values: dict[str, float], seconds: float) -> dict:
        """Log the central (test set) evaluation of `version`; it is the run's measure."""
        self.stop.observe(version, values.get("accuracy"))
        return self._append(events.record(events.EVALUATED, {
            "version": version, **values, "eval_seconds": round(seconds, 3),
            "eval_done": round(self.clock(), 3)}))

    def federated(self, fed: FederatedResult, measure: bool) -> dict:
        """Log the federated evaluation of a version; `measure`: it is the run's measure
        (no central test set)."""
        if measure:
            self.stop.observe(fed.version, fed.values.get("accuracy"))
        return self._append(events.record(events.FEDERATED, {
            "version": fed.version, **{f"fed_{k}": v for k, v in fed.values.items()},
            "fed_samples": fed.samples, "fed_agents": fed.reporters,
            "fed_missing": fed.missing, "fed_done": round(self.clock(), 3)}))

    def stop_reason(self, version: int) -> str | None:
        return self.stop.reason(version)

    def _append(self, rec: dict) -> dict:
        self.rundir.append_record(rec)
        if self.folded is not None:
            self.folded.add(rec)
        return rec
