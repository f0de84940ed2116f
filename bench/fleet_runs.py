"""Run one real fleet (coordinator + agents as processes on a shared broker) to completion and
return its events.jsonl: the common step of the benchmarks that compare algorithms."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fleetfl.coordinator.local_fleet import LocalFleet
from fleetfl.coordinator.rundir import RunDir


def run_fleet(broker_url: str, run: str, workdir: Path, coordinator_flags: list[str],
              agents: int, data_dir: str = "", timeout: float = 1800.0,
              agent_flags: Callable[[int], list[str]] = lambda i: []) -> list[dict]:
    flags = [*coordinator_flags, "--min-agents", str(agents), "--run-dir",
             str(workdir / "runs")]
    with LocalFleet(broker_url, run, workdir / "logs" / run, flags,
                    data_dir=data_dir) as fleet:
        fleet.start_coordinator()
        for i in range(agents):
            fleet.agent_args = agent_flags(i)
            fleet.start_agent(i, agents)
        fleet.wait_coordinator(timeout=timeout)
        fleet.wait_agents(timeout=30)
    return RunDir(workdir / "runs" / run).events()


def time_to(events: list[dict], target: float) -> float | None:
    """Seconds from the start until the test accuracy first reached `target`."""
    for e in events:
        if e["accuracy"] is not None and e["accuracy"] >= target:
            return e["time"]
    return None
