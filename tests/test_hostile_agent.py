"""Issue 14, finding 1 over a real broker: a hostile agent (bench/malicious_agent.py, the real
agent with its updates corrupted before they are published, so they go through the real
codec and MQTT) sends finite values that overflowed the float32 average before: 2**62 claimed
samples with a delta of 1e20, and deltas of 3e38. The run must finish with a finite model and
both refusals counted."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fleetfl.coordinator.local_fleet import LocalFleet
from fleetfl.coordinator.rundir import RunDir

pytestmark = pytest.mark.integration
BENCH = Path(__file__).resolve().parents[1] / "bench"
VERSIONS = 12


def test_hostile_overflow_agent_cannot_break_a_drpga_run(broker, tmp_path):
    run, runs = "hostile", tmp_path / "runs"
    # min_agents 3: the first window waits for the hostile agent's first update (3e38)
    coordinator = ["--algo", "drpga", "--dataset", "digits", "--min-agents", "3",
                   "--max-versions", str(VERSIONS), "--window-timeout", "3",
                   "--run-dir", str(runs)]
    with LocalFleet(broker.url, run, tmp_path / "logs", coordinator,
                    ["--block-timeout", "20"]) as fleet:
        fleet.env["PYTHONPATH"] = os.pathsep.join(
            [str(BENCH), *filter(None, [os.environ.get("PYTHONPATH")])])
        fleet.start_coordinator()
        fleet.start_agent(0, 3)
        fleet.start_agent(1, 3)
        fleet.start_agent(2, 3, agent_id="evil", extra=["--attack", "overflow"],
                          module="malicious_agent")
        code = fleet.wait_coordinator(timeout=300)
        log = fleet.log("coordinator")
        assert code == 0, log[-3000:]
        assert fleet.wait_agents(timeout=30) == {"agent0": 0, "agent1": 0, "evil": 0}
        assert "HOSTILE" in fleet.log("evil")
    rundir = RunDir(runs / run)
    events = rundir.events()
    assert events[-1]["version"] == VERSIONS
    rejected = events[-1]["rejected"]
    assert rejected.get("samples_claim", 0) >= 1, rejected  # 2**62 samples, refused on arrival
    assert rejected.get("out_of_bounds", 0) >= 1, rejected  # 3e38: left out of its average
    assert all("evil" not in e["contributors"] for e in events)
    params, state = rundir.load_checkpoint()
    assert state["version"] == VERSIONS
    assert np.isfinite(params).all() and np.abs(params).max() < 100
    accuracies = [e["accuracy"] for e in events if e["accuracy"] is not None]
    assert accuracies and accuracies[-1] > 0.5, accuracies  # the honest two kept learning
    assert "NOT publishing" not in log and "NOT checkpointing" not in log
    print(f"hostile overflow agent: {VERSIONS} versions, final accuracy {accuracies[-1]:.3f}, "
          f"refused {rejected}")
