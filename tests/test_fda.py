"""FDA estimators, triggers and the device flow (ALGORITHMS.md section 5)."""

import numpy as np
import pytest
from fleet_helpers import InProcessFleet, hello
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetfl.shared.core.averaging import WindowAveraging
from fleetfl.shared.core.base import Rejected
from fleetfl.shared.core.fda import (
    AMSSketch,
    FDADevice,
    FDAMonitor,
    LocalState,
    estimate_variance,
    growth_exponent,
    theta_for_period,
)
from fleetfl.shared.core.messages import Kind, Message

RUN = "t"
D_A, D_B = np.array([1, 0, 0.0]), np.array([0, 1, 0.0])


def exact_variance(drifts):
    d = np.stack(drifts)
    return float((d ** 2).sum(1).mean() - (d.mean(0) ** 2).sum())


def linear_states(xi):
    return [LocalState(float(d @ d), float(xi @ d)) for d in (D_A, D_B)]


def test_worked_example_estimates():
    assert exact_variance([D_A, D_B]) == pytest.approx(0.5)
    assert estimate_variance([LocalState(1.0), LocalState(1.0)], "naive") == 1.0
    assert estimate_variance(linear_states(np.array([1, 0, 0.0])), "linear") == 0.75
    xi2 = np.array([1, 1, 0.0]) / np.sqrt(2)
    assert estimate_variance(linear_states(xi2), "linear") == pytest.approx(0.5)
    # depth 1, width 2, h = (0, 1, 1), sign = (+1, +1, -1)
    sketch_a, sketch_b = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    states = [LocalState(1.0, sketch=sketch_a), LocalState(1.0, sketch=sketch_b)]
    assert estimate_variance(states, "sketch", epsilon=1 / np.sqrt(2)) == pytest.approx(0.7071,
                                                                                     abs=1e-4)


def state_msg(sender, seq, base, drift_sq, projection=None, sketch=None):
    fields = {"step": seq, "drift_sq": drift_sq}
    if projection is not None:
        fields["projection"] = projection
    arrays = {} if sketch is None else {"sketch": sketch}
    return Message(Kind.FDA_STATE, RUN, sender, seq, base, fields, arrays)


@pytest.mark.parametrize("variant, xi, syncs", [
    ("naive", None, True), ("linear", [1, 0, 0], True),
    ("linear", [1 / np.sqrt(2), 1 / np.sqrt(2), 0], False)])
def test_trigger_decisions_at_theta_0_6(variant, xi, syncs):
    monitor = FDAMonitor(variant, theta=0.6)
    out = []
    for i, (name, d) in enumerate([("A", D_A), ("B", D_B)]):
        z = None if xi is None else float(np.array(xi) @ d)
        out = monitor.on_state(state_msg(name, i + 1, 0, float(d @ d), z), 0, 1, RUN, {"A", "B"})
        if name == "A":
            assert out == []  # waits until every active agent reported
    assert bool(out) is syncs
    if syncs:
        assert out[0].kind is Kind.SYNC and out[0]["window"] == 1


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 6), st.integers(1, 8), st.integers(0, 2**32 - 1))
def test_naive_and_linear_never_underestimate(n, dim, seed):
    rng = np.random.default_rng(seed)
    drifts = list(rng.normal(size=(n, dim)) * rng.uniform(0.01, 10))
    xi = rng.normal(size=dim)
    xi /= np.linalg.norm(xi)
    true = exact_variance(drifts)
    naive = estimate_variance([LocalState(float(d @ d)) for d in drifts], "naive")
    linear = estimate_variance([LocalState(float(d @ d), float(xi @ d)) for d in drifts],
                               "linear")
    assert naive >= true - 1e-9 and linear >= true - 1e-9 and naive >= linear - 1e-9


def test_sketch_within_its_stated_error_on_10k_dims_over_many_seeds():
    """||x||^2 from a depth-5 width-250 AMS sketch: within 3 epsilon (epsilon = 1/sqrt(250))
    for at least 95% of seeds; the FDA estimate then stays above the true variance."""
    rng = np.random.default_rng(0)
    within, above, trials = 0, 0, 40
    for seed in range(trials):
        ams = AMSSketch(10_000, seed)
        drifts = rng.normal(size=(3, 10_000)).astype(np.float32) + 0.3
        mean = drifts.mean(0)
        est = AMSSketch.norm_sq(np.mean([ams.sketch(d) for d in drifts], axis=0))
        true_sq = float(mean.astype(np.float64) @ mean)
        within += abs(est - true_sq) <= 3 * ams.epsilon * true_sq
        states = [LocalState(float(d.astype(np.float64) @ d), sketch=ams.sketch(d))
                  for d in drifts]
        above += estimate_variance(states, "sketch", ams.epsilon) >= exact_variance(drifts)
    assert within >= 0.95 * trials and above >= 0.9 * trials


def test_sketch_is_linear_and_shared_through_the_seed():
    a, b = AMSSketch(500, 3), AMSSketch(500, 3)
    x, y = np.random.default_rng(1).normal(size=(2, 500)).astype(np.float32)
    np.testing.assert_allclose(a.sketch(x) + a.sketch(y), b.sketch(x + y), atol=1e-4)
    assert not np.allclose(AMSSketch(500, 4).sketch(x), a.sketch(x))


def test_bad_fda_states_are_refused():
    monitor = FDAMonitor("sketch", theta=1.0)
    with pytest.raises(Rejected) as exc:
        monitor.on_state(state_msg("A", 1, 0, 1.0, sketch=np.zeros((4, 250), np.float32)),
                         0, 1, RUN, {"A"})
    assert exc.value.reason == "bad_shape"
    with pytest.raises(Rejected):
        FDAMonitor("linear", 1.0).on_state(state_msg("A", 1, 0, 1.0), 0, 1, RUN, {"A"})
    with pytest.raises(Rejected):
        FDAMonitor("naive", 1.0).on_state(state_msg("A", 1, 0, -1.0), 0, 1, RUN, {"A"})
    # a state from before the last sync is ignored, not an error
    assert FDAMonitor("naive", 0.0).on_state(state_msg("A", 1, 3, 5.0), 4, 5, RUN, {"A"}) == []


@pytest.mark.parametrize("variant", ["naive", "linear", "sketch"])
def test_fda_fleet_syncs_only_when_drift_crosses_theta(variant):
    size = 20
    c = WindowAveraging(params=np.zeros(size, np.float32), run=RUN, job={},
                        monitor=FDAMonitor(variant, theta=0.5))
    devices = {a: FDADevice(RUN, a, 1, variant, rtc_steps=1, seed=3, size=size) for a in "AB"}
    fleet = InProcessFleet(c, devices, {a: np.zeros(size, np.float32) for a in "AB"})
    rng = np.random.default_rng(5)
    direction = {a: rng.normal(size=size).astype(np.float32) * 0.05 for a in "AB"}
    steps_at_sync = []
    for step in range(1, 200):
        for a in "AB":
            fleet.step(a, lambda n, p: p.__iadd__(direction[n]))
            if len(steps_at_sync) < c.version:
                steps_at_sync.append(step)
                # right after a sync everyone holds the global model
                for b in "AB":
                    np.testing.assert_allclose(fleet.params[b], c.params, atol=1e-5)
    assert c.version >= 3
    # the agents drift apart at a constant rate: the syncs are evenly spaced, not per step
    gaps = np.diff([0, *steps_at_sync])
    assert gaps.min() > 1 and gaps.max() - gaps.min() <= 2
    # the estimate upper-bounds the true variance, so no sync comes late: two steps before
    # each sync (states lag a step) the true variance was still below theta
    true_variance_per_step = float(((direction["A"] - direction["B"]) ** 2).sum()) / 4
    assert true_variance_per_step * (gaps.max() - 2) ** 2 <= 0.5


def test_fda_start_barrier_waits_for_min_agents():
    c = WindowAveraging(params=np.zeros(3, np.float32), run=RUN, job={}, min_agents=2,
                        monitor=FDAMonitor("naive", theta=0.1))
    c.on_message(hello(RUN, "A", 1), 0.0)
    assert c.on_message(state_msg("A", 2, 0, 5.0), 0.0) == []  # alone: no trigger yet
    c.on_message(hello(RUN, "B", 1), 0.0)
    c.on_message(state_msg("A", 3, 0, 5.0), 0.0)
    out = c.on_message(state_msg("B", 2, 0, 5.0), 0.0)
    assert [m.kind for m in out] == [Kind.SYNC]


# -- Theta from a target sync period (fda.theta_for_period, bench/calibrate_fda.py) -----------
def test_growth_exponent_of_a_hand_made_power_law():
    # V = 3 h^2: 3, 12, 48 at h = 1, 2, 4 -> slope of log V over log h is exactly 2
    assert growth_exponent([1, 2, 4], [3.0, 12.0, 48.0]) == pytest.approx(2.0)
    # V = 0.5 h: 0.5, 5, 50 at h = 1, 10, 100 -> 1; zero variances (no drift yet) are skipped
    assert growth_exponent([1, 10, 100, 5], [0.5, 5.0, 50.0, 0.0]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        growth_exponent([1, 2], [0.0, 1.0])


def test_theta_for_period_worked_examples():
    # V(20) = 2.0 and V ~ h^1.5: a sync every 80 steps needs Theta = 2 * (80/20)^1.5 = 2 * 8
    assert theta_for_period(2.0, 20, 80, 1.5) == pytest.approx(16.0)
    # linear growth (p = 1) from V(50) = 3: T = 200 -> 3 * 4 = 12; T = 25 -> 1.5
    assert theta_for_period(3.0, 50, 200, 1.0) == pytest.approx(12.0)
    assert theta_for_period(3.0, 50, 25, 1.0) == pytest.approx(1.5)
    # T = the measured h: Theta is the measured variance (the old rule is T = H = 20)
    assert theta_for_period(2.66, 20, 20, 1.7) == pytest.approx(2.66)
    with pytest.raises(ValueError):
        theta_for_period(1.0, 0, 10, 1.0)


def test_theta_for_period_makes_the_monitor_sync_at_that_step():
    # Naive estimate of two agents whose drift grows as V(h) = h^2 / 4 (each agent's
    # ||d||^2 = h^2 / 4): Theta for T = 30 from V(10) = 25 is 25 * 3^2 = 225; the monitor stays
    # quiet through h = 30 (estimate 225, not > 225) and syncs at h = 31 (240.25).
    theta = theta_for_period(25.0, 10, 30, 2.0)
    assert theta == 225.0
    monitor = FDAMonitor("naive", theta)
    fired = None
    for h in range(1, 40):
        for agent in "AB":
            msg = Message(Kind.FDA_STATE, RUN, agent, 0, 0, {"step": h, "drift_sq": h * h / 4})
            if monitor.on_state(msg, 0, 0, RUN, {"A", "B"}):
                fired = h
        if fired:
            break
    assert fired == 31
