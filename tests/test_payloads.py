"""DRPGA masks and residuals, LBGM look-backs, per-coordinate averaging (ALGORITHMS.md 4, 6, 8)."""

import numpy as np
import pytest
from fleet_helpers import InProcessFleet, hello
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetfl.shared.core.averaging import WindowAveraging
from fleetfl.shared.core.base import Rejected
from fleetfl.shared.core.choices import RATES
from fleetfl.shared.core.dga import DGADevice
from fleetfl.shared.core.fedavg import FedAvgDevice
from fleetfl.shared.core.layers import Layer, LayerTable
from fleetfl.shared.core.messages import Kind, Message
from fleetfl.shared.core.payloads import (
    LBGMDecoder,
    LBGMEncoder,
    PartialDecoder,
    PartialEncoder,
    PartialMasks,
    RateWalk,
    lookback_fit,
    random_mask,
)
from fleetfl.shared.core.weighted_sum import covered_mean

RUN = "t"


def test_mask_test_vector():
    assert random_mask(42, 1, 8, 0.5).astype(int).tolist() == [1, 1, 0, 0, 1, 0, 1, 0]


def test_masks_identical_on_both_sides_and_rate_close_to_target():
    device, coordinator = PartialMasks(7, 100_000, 0.1, False), PartialMasks(7, 100_000, 0.1,
                                                                             False)
    for period in (1, 2, 50):
        np.testing.assert_array_equal(device(period), coordinator(period))
        assert abs(device(period).mean() - 0.1) < 0.005
    assert not np.array_equal(device(1), device(2))
    assert not np.array_equal(device(1), PartialMasks(8, 100_000, 0.1, False)(1))


def test_rate_walk_is_deterministic_and_moves_one_rung_at_most():
    a, b = RateWalk(3, 0.1, True), RateWalk(3, 0.1, True)
    rates = [a.rate(p) for p in range(1, 200)]
    assert rates == [b.rate(p) for p in range(199, 0, -1)][::-1]  # order of queries is free
    idx = [RATES.index(r) for r in [0.1, *rates]]
    assert all(abs(x - y) <= 1 for x, y in zip(idx, idx[1:], strict=False))
    assert len(set(rates)) > 2
    assert {RateWalk(3, 0.1, False).rate(p) for p in range(1, 50)} == {0.1}


class FixedMasks(PartialMasks):
    def __init__(self, masks: dict[int, list[int]], size: int) -> None:
        self.size, self.masks = size, masks

    def __call__(self, period):
        m = np.zeros(self.size, dtype=bool)
        m[self.masks[period]] = True
        return m


def partial_fleet(masks, delay=0, period=1):
    c = WindowAveraging(params=np.zeros(3, np.float32), run=RUN, job={},
                        decoder=PartialDecoder(masks))
    devices = {a: DGADevice(RUN, a, 1, period, delay, PartialEncoder(masks)) for a in "AB"}
    return InProcessFleet(c, devices, {a: np.zeros(3, np.float32) for a in "AB"})


def test_dpga_worked_example_residual_carry():
    fleet = partial_fleet(FixedMasks({1: [0, 2], 2: [1]}, 3))
    first = {"A": [2, 1, 0], "B": [0, 3, 4]}
    for a in "AB":
        fleet.step(a, lambda n, p: p.__iadd__(np.asarray(first[n], np.float32)))
    np.testing.assert_allclose(fleet.params["A"], [1, 1, 2])
    np.testing.assert_allclose(fleet.params["B"], [1, 3, 2])
    np.testing.assert_allclose(fleet.params["A"] - fleet.devices["A"].anchor, [0, 1, 0])
    np.testing.assert_allclose(fleet.params["B"] - fleet.devices["B"].anchor, [0, 3, 0])
    for a in "AB":
        fleet.step(a, lambda n, p: None)  # no new steps: the residual goes out
    for a in "AB":
        np.testing.assert_allclose(fleet.params[a], [1, 2, 2])
    np.testing.assert_allclose(fleet.coordinator.params, [1, 2, 2])
    assert fleet.averages[2].tolist() == [2.0]  # downlink carries only the masked values


@pytest.mark.parametrize("delay", [0, 2])
def test_residuals_conserve_the_delta(delay):
    """sent + carried = accumulated own steps, at every window, for each agent."""
    rng = np.random.default_rng(delay)
    masks = PartialMasks(11, 50, 0.2, True)
    c = WindowAveraging(params=np.zeros(50, np.float32), run=RUN, job={},
                        decoder=PartialDecoder(masks), max_staleness=delay // 2 + 1,
                        max_ahead=delay // 2 + 2)
    devices = {a: DGADevice(RUN, a, 1, 2, delay, PartialEncoder(masks)) for a in "AB"}
    fleet = InProcessFleet(c, devices, {a: np.zeros(50, np.float32) for a in "AB"})
    own = {a: np.zeros(50) for a in "AB"}
    sent = {a: np.zeros(50) for a in "AB"}
    original = {a: devices[a].encoder.encode for a in "AB"}

    def spy(name):
        def encode(delta, window):
            enc = original[name](delta, window)
            sent[name] += enc.own
            return enc
        return encode

    for a in "AB":
        devices[a].encoder.encode = spy(a)

    def step_fn(name, p):
        change = rng.normal(size=50).astype(np.float32)
        own[name] += change
        p += change

    for _ in range(30):
        for a in "AB":
            fleet.step(a, step_fn)
            dev = devices[a]
            residual = fleet.params[a] - dev.anchor
            np.testing.assert_allclose(sent[a] + residual, own[a], atol=1e-4)


def test_partial_update_for_the_wrong_period_is_refused():
    masks = PartialMasks(5, 1000, 0.1, False)
    c = WindowAveraging(params=np.zeros(1000, np.float32), run=RUN, job={},
                        decoder=PartialDecoder(masks))
    c.on_message(hello(RUN, "A", 1), 0.0)
    values = np.ones(int(masks(2).sum()), np.float32)  # the mask of period 2 ...
    assert masks(2).sum() != masks(1).sum()
    msg = Message(Kind.UPDATE, RUN, "A", 5, 0, {"window": 1, "samples": 1, "steps": 1},
                  {"delta": values})  # ... sent as period 1
    with pytest.raises(Rejected) as exc:
        c.on_message(msg, 0.0)
    assert exc.value.reason == "bad_shape" and c.pending == {}
    assert c.agents["A"].last_seq == 1  # refused before anything was recorded


def test_covered_mean_averages_each_coordinate_over_its_senders():
    vecs = [np.array([1, 2, 3, 4], np.float32), np.array([3, 0, 5, 0], np.float32),
            np.array([9, 9, 9, 9], np.float32)]
    cov = [np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool), None]
    mean, union = covered_mean(vecs, [1, 3, 0.0001], cov[:2] + [np.zeros(4, bool)])
    np.testing.assert_allclose(mean, [2.5, 2, 5, 0])  # nobody covered the last: 0
    assert union.tolist() == [True, True, True, False]
    mean, union = covered_mean(vecs, [1, 1, 2], cov)
    np.testing.assert_allclose(mean, [(1 + 3 + 18) / 4, (2 + 18) / 3, (5 + 18) / 3, 9],
                               rtol=1e-6)


# -- LBGM -------------------------------------------------------------------------------------
ONE = LayerTable((Layer("w", 0, (3,)),))


def lbgm_update(sender, seq, window, encoded, samples=1):
    msg = Message(Kind.UPDATE, RUN, sender, seq, window - 1,
                  {"window": window, "samples": samples, "steps": 1},
                  {"delta": encoded.values})
    msg.fields.update(encoded.fields)
    return msg


def test_lbgm_worked_example():
    enc, dec = LBGMEncoder(ONE, 0.2), LBGMDecoder(ONE)
    first = enc.encode(np.array([1, 0, 0], np.float32), 1)  # no look-back yet: full
    assert first.fields["scalars"] == [None]
    dec.decode("A", lbgm_update("A", 1, 1, first))
    rho, sin2 = lookback_fit(np.array([2, 0.2, 0], np.float32), np.array([1, 0, 0], np.float32))
    assert rho == pytest.approx(2.0) and sin2 == pytest.approx(0.009901, abs=1e-6)
    scalar = enc.encode(np.array([2, 0.2, 0], np.float32), 2)
    assert scalar.fields["scalars"] == [[pytest.approx(2.0), 1]] and scalar.values.size == 0
    np.testing.assert_allclose(scalar.own, [2, 0, 0])
    np.testing.assert_allclose(dec.decode("A", lbgm_update("A", 2, 2, scalar)).dense, [2, 0, 0])
    full = enc.encode(np.array([0, 1, 1], np.float32), 3)  # orthogonal: sin2 = 1 > 0.2
    assert full.fields["scalars"] == [None]
    dec.decode("A", lbgm_update("A", 3, 3, full))
    np.testing.assert_allclose(enc.lookback[0].values, [0, 1, 1])
    np.testing.assert_allclose(dec.lookback["A"][0].values, [0, 1, 1])


def test_lbgm_two_agents_aggregate():
    c = WindowAveraging(params=np.zeros(3, np.float32), run=RUN, job={},
                        decoder=LBGMDecoder(ONE))
    c.on_message(hello(RUN, "A", 1), 0.0)
    c.on_message(hello(RUN, "B", 3), 0.0)
    enc_a = LBGMEncoder(ONE, 0.2)
    c.on_message(lbgm_update("A", 2, 1, enc_a.encode(np.array([1, 0, 0], np.float32), 1)), 0)
    enc_b = LBGMEncoder(ONE, 0.2)
    c.on_message(lbgm_update("B", 2, 1, enc_b.encode(np.array([1, 0, 0], np.float32), 1), 3), 0)
    c.on_message(lbgm_update("A", 3, 2, enc_a.encode(np.array([2, 0.2, 0], np.float32), 2)), 0)
    b_full = enc_b.encode(np.array([0, 1, 1], np.float32), 2)  # orthogonal: full
    assert b_full.fields["scalars"] == [None]
    out = c.on_message(lbgm_update("B", 3, 2, b_full, 3), 0)
    np.testing.assert_allclose(out[0]["delta"], [0.5, 0.75, 0.75])


TWO = LayerTable((Layer("a", 0, (2,)), Layer("b", 2, (2,))))


def test_lbgm_decides_per_layer_in_one_update():
    # look-backs a = [1, 0], b = [0, 1] (window 1). g = [3, 0.5 | 1, 1]:
    # a: rho = 3 / 1 = 3, sin^2 = 1 - 9 / (9.25 * 1) = 0.027027 <= 0.2 -> the scalar 3
    # b: rho = 1, sin^2 = 1 - 1 / (2 * 1) = 0.5 > 0.2 -> the layer in full, new look-back [1, 1]
    enc, dec = LBGMEncoder(TWO, 0.2), LBGMDecoder(TWO)
    dec.decode("A", lbgm_update("A", 1, 1, enc.encode(np.array([1, 0, 0, 1], np.float32), 1)))
    assert lookback_fit(np.array([3, 0.5]), np.array([1, 0]))[1] == pytest.approx(0.027027,
                                                                                   abs=1e-6)
    out = enc.encode(np.array([3, 0.5, 1, 1], np.float32), 2)
    assert out.fields["scalars"] == [[pytest.approx(3.0), 1], None]
    np.testing.assert_array_equal(out.values, [1, 1])  # 2 floats + 1 scalar instead of 4
    np.testing.assert_allclose(out.own, [3, 0, 1, 1])
    np.testing.assert_allclose(dec.decode("A", lbgm_update("A", 2, 2, out)).dense, [3, 0, 1, 1])
    assert enc.lookback[0].window == 1 and enc.lookback[1].window == 2
    np.testing.assert_allclose(dec.lookback["A"][1].values, [1, 1])


def test_lbgm_threshold_is_inclusive():
    # g = [1, 1] against the look-back [1, 0]: cos^2 = 1 / 2, sin^2 = 0.5 exactly
    for delta, scalars in ((0.5, [[1.0, 1]]), (0.49, [None])):
        enc = LBGMEncoder(LayerTable((Layer("w", 0, (2,)),)), delta)
        enc.encode(np.array([1, 0], np.float32), 1)
        assert enc.encode(np.array([1, 1], np.float32), 2).fields["scalars"] == scalars


def test_lbgm_compares_with_the_last_full_update_not_the_previous_update():
    # The look-back is the last update sent in full; a scalar round does not move it.
    # [1, 0] full; [1, 0.4]: sin^2 = 1 - 1 / 1.16 = 0.1379 <= 0.2 -> scalar rho = 1;
    # [1, 0.8]: against the look-back [1, 0] sin^2 = 1 - 1 / 1.64 = 0.3902 > 0.2 -> full
    # (against the previous update [1, 0.4] it would be 1 - 1.32^2 / (1.16 * 1.64) = 0.0841).
    table = LayerTable((Layer("w", 0, (2,)),))
    enc = LBGMEncoder(table, 0.2)
    enc.encode(np.array([1, 0], np.float32), 1)
    assert enc.encode(np.array([1, 0.4], np.float32), 2).fields["scalars"] == \
        [[pytest.approx(1.0), 1]]
    np.testing.assert_allclose(enc.lookback[0].values, [1, 0])
    assert lookback_fit(np.array([1, 0.8]), np.array([1, 0.4]))[1] == pytest.approx(0.0841,
                                                                                    abs=1e-4)
    assert enc.encode(np.array([1, 0.8], np.float32), 3).fields["scalars"] == [None]
    np.testing.assert_allclose(enc.lookback[0].values, [1, 0.8])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-10, 10), min_size=3, max_size=3),
       st.lists(st.floats(-10, 10), min_size=3, max_size=3), st.floats(0.0, 1.0))
def test_lbgm_sends_a_scalar_exactly_when_the_error_is_within_delta(g, lb, delta):
    g, lb = np.array(g, np.float32), np.array(lb, np.float32)
    enc = LBGMEncoder(ONE, delta)
    enc.encode(lb, 1)
    out = enc.encode(g, 2)
    if float(lb @ lb) == 0.0:
        assert out.fields["scalars"] == [None]
        return
    rho, sin2 = lookback_fit(g, lb)
    if sin2 <= delta:
        assert out.fields["scalars"] == [[rho, 1]]
        np.testing.assert_allclose(out.own, np.float32(rho) * lb, rtol=1e-5, atol=1e-5)
    else:
        assert out.fields["scalars"] == [None]
        np.testing.assert_array_equal(out.own, g)


def test_lbgm_scalar_without_lookback_is_refused():
    dec = LBGMDecoder(ONE)
    msg = Message(Kind.UPDATE, RUN, "A", 1, 0, {"window": 1, "samples": 1, "steps": 1,
                                               "scalars": [[2.0, 0]]},
                  {"delta": np.zeros(0, np.float32)})
    with pytest.raises(Rejected) as exc:
        dec.decode("A", msg)
    assert exc.value.reason == "no_lookback"
    msg.fields["scalars"] = [["x", 0]]
    with pytest.raises(Rejected):
        dec.decode("A", msg)


def test_lbgm_lookback_rolls_back_when_the_update_is_refused():
    """A refreshed look-back the coordinator never stored is dropped on both sides' terms:
    the agent falls back to a full send, and the two sides agree again."""
    c = WindowAveraging(params=np.zeros(3, np.float32), run=RUN, job={},
                        decoder=LBGMDecoder(ONE), window_timeout=1.0)
    for a in "AB":
        c.on_message(hello(RUN, a, 1), 0.0)
    devices = {a: FedAvgDevice(RUN, a, 1, 1, LBGMEncoder(ONE, 0.2)) for a in "AB"}
    params = {a: np.zeros(3, np.float32) for a in "AB"}
    for a in "AB":
        devices[a].start(0, 1, params[a])
    params["A"][:] = [1, 0, 0]
    a_update = devices["A"].after_step(params["A"])[0]
    a_update.seq = 5
    c.on_message(a_update, 0.0)
    params["B"][:] = [0, 1, 0]
    b_update = devices["B"].after_step(params["B"])[0]  # B's update is lost on the way
    avg, _ = c.on_tick(5.0)  # window 1 closes without B
    assert avg["contributors"] == ["A"]
    for a in "AB":
        devices[a].on_message(avg, params[a])
    assert devices["B"].encoder.lookback[0] is None  # rolled back: never stored remotely
    params["B"] += np.array([0, 1, 0], np.float32)
    again = devices["B"].after_step(params["B"])[0]
    assert b_update.fields["scalars"] == [None]
    assert again.fields["scalars"] == [None]  # full again, not a scalar on a phantom
    again.seq = 6
    c.on_message(again, 6.0)
    assert "B" in c.pending[2]  # the coordinator accepts it: the two sides agree
