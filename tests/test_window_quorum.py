"""`window_quorum` (README, run configuration): a window past its timeout or round deadline
closes only with Q updates in, or with every agent it expects online if fewer are left; the
simulator's drop runs keep every window at the quorum."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fleet_helpers import hello

from fleetfl.coordinator import simulator
from fleetfl.shared.config import ConfigError, RunConfig, validate
from fleetfl.shared.core.averaging import WindowAveraging
from fleetfl.shared.core.messages import Kind, Message

RUN = "q"


def update(agent: str, seq: int, value: float) -> Message:
    return Message(Kind.UPDATE, RUN, agent, seq, 0, {"window": 1, "samples": 1, "steps": 1},
                   {"delta": np.full(2, value, np.float32)})


def fleet(quorum: int, agents: str = "ABCD") -> WindowAveraging:
    c = WindowAveraging(params=np.zeros(2, np.float32), run=RUN, job={}, window_timeout=5.0,
                        window_quorum=quorum)
    for a in agents:
        c.on_message(hello(RUN, a, 1), 0.0)
    return c


def test_a_timed_out_window_waits_for_its_quorum_then_closes_at_once():
    c = fleet(3)
    c.on_message(update("A", 2, 1.0), 10.0)
    c.on_message(update("B", 2, 2.0), 11.0)
    assert c.on_tick(15.0) == [] and c.on_tick(100.0) == []  # past the timeout: 2 of 3
    out = c.on_message(update("C", 2, 6.0), 101.0)  # the third: it closes without D
    np.testing.assert_allclose(out[0]["delta"], [3.0, 3.0])
    assert c.results[-1].missing == ["D"] and c.results[-1].timed_out


def test_without_a_quorum_the_timeout_closes_on_one_update():
    c = fleet(0)
    c.on_message(update("A", 2, 1.0), 10.0)
    out = c.on_tick(15.0)
    np.testing.assert_allclose(out[0]["delta"], [1.0, 1.0])
    assert c.results[-1].missing == ["B", "C", "D"]


def test_the_quorum_shrinks_to_the_agents_online():
    c = fleet(3)
    for a in "CD":
        c.on_message(Message(Kind.OFFLINE, RUN, a, 0, 0), 0.0)
    c.on_message(update("A", 2, 1.0), 10.0)
    assert c.on_tick(15.0) == []  # 1 of the 2 online
    out = c.on_message(update("B", 2, 3.0), 16.0)  # every agent online is in
    np.testing.assert_allclose(out[0]["delta"], [2.0, 2.0])


def test_before_the_timeout_it_still_waits_for_everyone():
    c = fleet(2)
    c.on_message(update("A", 2, 1.0), 10.0)
    assert c.on_message(update("B", 2, 1.0), 11.0) == []  # quorum, but not timed out
    assert len(c.on_tick(15.0)) == 2  # the average and the model


@pytest.mark.parametrize("quorum", [-1])
def test_config_refuses_a_negative_quorum(quorum):
    c = RunConfig()
    c.window_quorum = quorum
    with pytest.raises(ConfigError, match="window_quorum must be >= 0"):
        validate(c)


def test_simulated_drop_windows_average_at_least_the_quorum(tmp_path):
    """8 agents on digits, half 4x slower, DGA windows closing 0.5 s after their first
    update, links of 0.5 s +- 0.4 s (without a quorum some windows close on 3 updates): with
    window_quorum 4 every version averages at least 4."""
    simulator.main(["--algo", "dga", "--dataset", "digits", "--agents", "8",
                    "--period", "10", "--delay", "20", "--window-timeout", "0.5",
                    "--window-quorum", "4", "--profile", "fast:0.05:0.5",
                    "--profile", "slow:0.2:0.5", "--jitter", "0.4",
                    "--latency", "0.5", "--max-versions", "12", "--run", "quorum",
                    "--run-dir", str(tmp_path), "--seed", "1"])
    events = [json.loads(line) for line in (tmp_path / "quorum" / "events.jsonl").open()]
    versions = [e for e in events if "contributors" in e]
    assert len(versions) >= 12
    assert min(len(e["contributors"]) for e in versions) >= 4
