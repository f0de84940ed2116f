"""Participant selection over the real broker: six agent processes, three per window, digits."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_integration import finish, make_fleet

pytestmark = pytest.mark.integration


def test_six_agents_three_per_window_everybody_served(broker, tmp_path: Path) -> None:
    args = ["--algo", "fedavg", "--dataset", "digits", "--min-agents", "6", "--select", "3",
            "--local-steps", "10", "--max-versions", "10", "--window-timeout", "30"]
    with make_fleet(broker, tmp_path, "select", args) as fleet:
        fleet.start_coordinator()
        fleet.start_agents(6)
        events = finish(fleet, timeout=240)
    assert [e["version"] for e in events] == list(range(1, 11))
    decided = {w: agents for e in events for w, agents in e["selected"]}
    names = set(events[0]["contributors"])
    assert len(names) == 6  # window 1 (the warm-up) takes everyone
    for e in events[2:]:  # from window 3 on, exactly the three selected for it
        assert len(decided[e["window"]]) == 3
        assert e["contributors"] == decided[e["window"]], e
        assert not e["timed_out"] and e["missing"] == []
    served = [set(e["contributors"]) for e in events[2:]]  # nobody waits two windows:
    assert all(a | b == names for a, b in zip(served, served[1:], strict=False))
    assert events[-1]["rejected"] == {}
    log = fleet.log("coordinator")
    assert "not_assigned" not in log
    assert events[-1]["accuracy"] > events[0]["accuracy"]
