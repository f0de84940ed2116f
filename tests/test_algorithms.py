"""Worked examples of ALGORITHMS.md sections 1-3, numbers computed by hand."""

import numpy as np
import pytest
from fleet_helpers import InProcessFleet, hello

from fleetfl.shared.core.averaging import WindowAveraging
from fleetfl.shared.core.base import Rejected
from fleetfl.shared.core.dga import DGADevice
from fleetfl.shared.core.fedavg import FedAvgDevice
from fleetfl.shared.core.messages import Kind, Message
from fleetfl.shared.core.weighted_sum import weighted_mean

RUN = "t"


def update(agent, seq, window, base, samples, delta):
    return Message(Kind.UPDATE, RUN, agent, seq, base,
                   {"window": window, "samples": samples, "steps": 1},
                   {"delta": np.asarray(delta, np.float32)})


def coordinator(**kw):
    c = WindowAveraging(params=np.zeros(3, np.float32), run=RUN, job={}, **kw)
    c.on_message(hello(RUN, "A", 1), 0.0)
    c.on_message(hello(RUN, "B", 3), 0.0)
    return c


def test_fedavg_weighted_average_worked_example():
    c = coordinator()
    assert c.on_message(update("A", 2, 1, 0, 1, [1, 2, 0]), 0.0) == []  # waits for B
    out = c.on_message(update("B", 2, 1, 0, 3, [-1, 2, 4]), 0.0)
    avg, model = out
    assert avg.kind is Kind.AVG and model.kind is Kind.MODEL
    np.testing.assert_allclose(avg["delta"], [-0.5, 2.0, 3.0])
    np.testing.assert_allclose(c.params, [-0.5, 2.0, 3.0])
    assert (c.version, avg["version"], avg["contributors"]) == (1, 1, ["A", "B"])
    assert model["next_window"] == 2


def test_stale_update_refused_and_counted_by_reason():
    c = coordinator(max_staleness=1)
    c.version, c.closed_window = 5, 5
    with pytest.raises(Rejected) as exc:
        c.on_message(update("A", 2, 6, 3, 1, [0, 0, 0]), 0.0)
    assert exc.value.reason == "stale"
    # within the bound it is accepted
    c.on_message(update("A", 3, 6, 4, 1, [0, 0, 0]), 0.0)
    assert "A" in c.pending[6]


@pytest.mark.parametrize("bad, reason", [
    (update("Z", 2, 1, 0, 1, [0, 0, 0]), "unknown_agent"),
    (update("A", 1, 1, 0, 1, [0, 0, 0]), "replayed"),
    (update("A", 2, 1, 7, 1, [0, 0, 0]), "bad_version"),
    (update("A", 2, 3, 0, 1, [0, 0, 0]), "window_ahead"),
    (update("A", 2, 1, 0, 0, [0, 0, 0]), "bad_value"),
])
def test_coordinator_rejects_with_reason(bad, reason):
    c = coordinator()
    with pytest.raises(Rejected) as exc:
        c.on_message(bad, 0.0)
    assert exc.value.reason == reason
    assert c.pending == {}


def test_window_closed_and_replay_rejected_after_average():
    c = coordinator()
    c.on_message(update("A", 2, 1, 0, 1, [1, 0, 0]), 0.0)
    c.on_message(update("B", 2, 1, 0, 3, [1, 0, 0]), 0.0)
    with pytest.raises(Rejected) as exc:
        c.on_message(update("A", 3, 1, 1, 1, [1, 0, 0]), 0.0)
    assert exc.value.reason == "window_closed"
    with pytest.raises(Rejected) as exc:
        c.on_message(update("A", 2, 2, 1, 1, [1, 0, 0]), 0.0)
    assert exc.value.reason == "replayed"


def test_deadline_closes_window_without_the_missing_agent():
    c = coordinator(window_timeout=5.0)
    assert c.on_message(update("A", 2, 1, 0, 1, [4, 0, 0]), 10.0) == []
    assert c.on_tick(14.9) == []
    out = c.on_tick(15.0)
    np.testing.assert_allclose(out[0]["delta"], [4, 0, 0])
    assert c.results[-1].missing == ["B"] and c.results[-1].timed_out


def test_start_barrier_waits_for_min_agents_even_after_timeout():
    c = coordinator(window_timeout=1.0, min_agents=2)
    c.on_message(update("A", 2, 1, 0, 1, [4, 0, 0]), 0.0)
    assert c.on_tick(100.0) == []
    assert len(c.on_message(update("B", 2, 1, 0, 3, [0, 0, 0]), 100.0)) == 2


def test_offline_agent_is_not_waited_for():
    c = coordinator()
    c.on_message(Message(Kind.OFFLINE, RUN, "B", 0, 0), 0.0)
    assert len(c.on_message(update("A", 2, 1, 0, 1, [4, 0, 0]), 0.0)) == 2


def test_weighted_mean_matches_numpy():
    rng = np.random.default_rng(0)
    vecs = [rng.normal(size=1000).astype(np.float32) for _ in range(5)]
    w = rng.uniform(1, 10, size=5)
    expected = (np.stack(vecs) * w[:, None]).sum(0) / w.sum()
    np.testing.assert_allclose(weighted_mean(vecs, list(w)), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        weighted_mean([], [])


# --- DGA ------------------------------------------------------------------------------

def dga_fleet(period, delay, n=2):
    c = WindowAveraging(params=np.zeros(3, np.float32), run=RUN, job={},
                        max_staleness=delay // period, max_ahead=delay // period + 1)
    names = "AB"[:n]
    devices = {a: DGADevice(RUN, a, 1, period, delay) for a in names}
    params = {a: np.zeros(3, np.float32) for a in names}
    return InProcessFleet(c, devices, params)


def test_dga_worked_example_k2_d1():
    fleet = dga_fleet(period=2, delay=1)
    changes = {"A": [[1, 0, 0]] * 2 + [[0, 1, 0]] * 2 + [[1, 0, 0]],
               "B": [[0, 0, 2]] * 2 + [[0, 0, 1]] * 3}
    snapshots = []

    def step_fn(name, p):
        p += np.asarray(changes[name][len(snapshots)], np.float32)

    for _ in range(5):
        for a in "AB":
            fleet.step(a, step_fn)
        snapshots.append({a: fleet.params[a].copy() for a in "AB"})
    np.testing.assert_allclose(snapshots[1]["A"], [2, 0, 0])  # sent, not corrected yet
    np.testing.assert_allclose(snapshots[2]["A"], [1, 1, 2])
    np.testing.assert_allclose(snapshots[2]["B"], [1, 0, 3])
    np.testing.assert_allclose(snapshots[4]["A"], [2, 1, 3])
    np.testing.assert_allclose(snapshots[4]["B"], [1, 1, 4])
    np.testing.assert_allclose(fleet.coordinator.params, [1, 1, 3])


def test_dga_blocks_until_late_average_arrives():
    fleet = dga_fleet(period=2, delay=1)

    def one(name, p):
        p += 1

    for _ in range(2):
        for a in "AB":
            fleet.step(a, one, deliver=False)
    for a in "AB":
        fleet.step(a, one, deliver=False)  # step 3 = 2 + D: due, average still in flight
    assert fleet.devices["A"].blocked and fleet.devices["B"].blocked
    fleet.deliver()
    assert not fleet.devices["A"].blocked
    np.testing.assert_allclose(fleet.params["A"], [3, 3, 3])  # 2 avg + 1 own step


def test_dga_ignores_duplicate_average():
    fleet = dga_fleet(period=1, delay=0)
    fleet.step("A", lambda n, p: p.__iadd__(1))
    fleet.step("B", lambda n, p: p.__iadd__(3))
    avg = fleet.coordinator.results[-1]
    assert avg.version == 1
    before = fleet.params["A"].copy()
    dup = Message(Kind.AVG, RUN, "coordinator", 9, 0,
                  {"window": 1, "version": 1, "contributors": ["A", "B"]},
                  {"delta": np.full(3, 2.0, np.float32)})
    fleet.devices["A"].on_message(dup, fleet.params["A"])
    np.testing.assert_array_equal(fleet.params["A"], before)


@pytest.mark.parametrize("period, delay", [(1, 3), (2, 5), (3, 3)])
def test_dga_replicas_equal_global_plus_own_recent_steps(period, delay):
    """D >= K: several windows in flight; after each correction every replica equals the
    global model plus its own steps since the corrected window (ALGORITHMS.md 3)."""
    fleet = dga_fleet(period, delay)
    rng = np.random.default_rng(period * 10 + delay)
    own: dict[str, list[np.ndarray]] = {"A": [], "B": []}

    def step_fn(name, p):
        change = rng.normal(size=3).astype(np.float32)
        own[name].append(change)
        p += change

    for _ in range(40):
        for a in "AB":
            fleet.step(a, step_fn)
    for name in "AB":
        dev = fleet.devices[name]
        assert dev.last_applied >= 40 // period - delay // period - 1
        w_global = sum(fleet.averages[w] for w in range(1, dev.last_applied + 1))
        recent = np.sum(own[name][dev.last_applied * period:], axis=0)
        np.testing.assert_allclose(fleet.params[name], w_global + recent, atol=1e-4)


def test_fedavg_device_round_trip():
    c = WindowAveraging(params=np.zeros(3, np.float32), run=RUN, job={})
    devices = {a: FedAvgDevice(RUN, a, 1, 2) for a in "AB"}
    params = {a: np.zeros(3, np.float32) for a in "AB"}
    fleet = InProcessFleet(c, devices, params)
    for _ in range(2):
        fleet.step("A", lambda n, p: p.__iadd__(1))
    assert devices["A"].blocked
    for _ in range(2):
        fleet.step("B", lambda n, p: p.__iadd__(3))
    for a in "AB":
        np.testing.assert_allclose(params[a], [4, 4, 4])
        assert not devices[a].blocked and devices[a].base_version == 1
