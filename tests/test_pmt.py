"""FedPMT: layer choice from profiles, per-layer averaging, frozen layers (ALGORITHMS.md 7)."""

import numpy as np
import pytest
import torch
from fleet_helpers import hello

from fleetfl.shared.config import JobConfig
from fleetfl.shared.core.averaging import WindowAveraging
from fleetfl.shared.core.base import Rejected
from fleetfl.shared.core.layers import LayerGroup
from fleetfl.shared.core.messages import Kind, Message
from fleetfl.shared.core.pmt import (
    SITS_OUT,
    Assigner,
    Profile,
    SuffixDecoder,
    SuffixEncoder,
    parse_profile,
    trailing_groups,
)
from fleetfl.shared.learn.data import agent_shard, load_dataset
from fleetfl.shared.tasks.trainer import LocalTrainer

RUN = "t"
GROUPS = [LayerGroup("l1", 0, 1), LayerGroup("l2", 1, 2), LayerGroup("l3", 2, 3)]


def test_layer_choice_worked_examples():
    spec = Profile((0.004, 0.002, 0.001), (0.008, 0.004, 0.002))
    assert spec.round_cost(10, 3) == pytest.approx(0.210)
    assert spec.round_cost(10, 2) == pytest.approx(0.130)
    assert spec.round_cost(10, 1) == pytest.approx(0.090)
    assert trailing_groups(spec, 10, 0.110) == 1
    # issue 5: three layers, 3/2/1 ms, deadline 3.5 ms -> the last two layers
    issue = Profile((0.0, 0.0, 0.0), (0.003, 0.002, 0.001))
    assert trailing_groups(issue, 1, 0.0035, margin=0.0) == 2
    assert trailing_groups(issue, 1, 0.0005, margin=0.0) == 0  # sits out


@pytest.mark.parametrize("bad", [
    {"f": [0.1, 0.1], "b": [0.1, 0.1, 0.1]}, {"f": [0.1, -0.1, 0.1], "b": [0.1] * 3},
    {"b": [0.1] * 3}, {"f": [0.1, "x", 0.1], "b": [0.1] * 3}, None,
    {"f": [0.1, float("nan"), 0.1], "b": [0.1] * 3}])
def test_bad_profiles_are_refused(bad):
    with pytest.raises(Rejected) as exc:
        parse_profile(bad, 3)
    assert exc.value.reason == "bad_profile"


def make_coordinator(deadline=0.0, rank=1, factor=1.0, margin=0.0):
    assigner = Assigner(3, 1, RUN, deadline=deadline, rank=rank, factor=factor, margin=margin)
    return WindowAveraging(params=np.zeros(3, np.float32), run=RUN, job={},
                           decoder=SuffixDecoder(GROUPS, assigner), assigner=assigner)


def hello_with(agent, samples, b, seq=1):
    msg = hello(RUN, agent, samples, seq)
    msg.fields["capabilities"] = {"profile": {"f": [0.0] * 3, "b": b}}
    return msg


def suffix_update(agent, first, values, seq=2, window=1):
    return Message(Kind.UPDATE, RUN, agent, seq, 0,
                   {"window": window, "samples": 1 if agent == "A" else 3, "steps": 1,
                    "first_layer": first}, {"delta": np.asarray(values, np.float32)})


def test_per_layer_average_worked_example():
    c = make_coordinator(deadline=0.0035)
    out_a = c.on_message(hello_with("A", 1, [0.001, 0.001, 0.001]), 0.0)
    out_b = c.on_message(hello_with("B", 3, [0.003, 0.002, 0.001]), 0.0)
    assert out_a[0]["first_layer"] == {"A": 0} and out_b[0]["first_layer"] == {"B": 1}
    c.assigner.assigned["B"] = [(1, 2)]  # the worked example: B trains layer 3 only
    c.on_message(suffix_update("A", 0, [1, 2, 3]), 0.0)
    avg, _model = c.on_message(suffix_update("B", 2, [-1]), 0.0)[:2]
    np.testing.assert_allclose(avg["delta"], [1, 2, 0])  # layer 3: (1*3 + 3*(-1)) / 4


def test_layers_trained_by_nobody_keep_their_value():
    c = make_coordinator(deadline=0.0035)
    c.on_message(hello_with("A", 1, [0.003, 0.002, 0.001]), 0.0)  # trains layers 2, 3
    c.params[:] = [5, 5, 5]
    out = c.on_message(suffix_update("A", 1, [1, 1]), 0.0)
    np.testing.assert_allclose(out[0]["delta"], [0, 1, 1])
    np.testing.assert_allclose(c.params, [5, 6, 6])


def test_updates_outside_the_assignment_are_refused():
    c = make_coordinator(deadline=0.0035)
    c.on_message(hello_with("B", 3, [0.003, 0.002, 0.001]), 0.0)  # assigned from group 1
    for first, values in ((0, [1, 2, 3]), (2, [1])):
        with pytest.raises(Rejected) as exc:
            c.on_message(suffix_update("B", first, values), 0.0)
        assert exc.value.reason == "not_assigned"
    with pytest.raises(Rejected) as exc:
        c.on_message(suffix_update("B", 1, [1, 2, 3]), 0.0)
    assert exc.value.reason == "bad_shape"
    with pytest.raises(Rejected) as exc:
        c.on_message(suffix_update("Z", 1, [1, 2]), 0.0)  # an agent nobody assigned
    assert exc.value.reason == "unknown_agent"
    assert c.pending == {}


def test_too_slow_agent_sits_out_and_is_not_waited_for():
    c = make_coordinator(deadline=0.0035)
    c.on_message(hello_with("A", 1, [0.001, 0.001, 0.001]), 0.0)
    out = c.on_message(hello_with("S", 1, [0.01, 0.01, 0.01]), 0.0)
    assert out[0]["first_layer"] == {"S": SITS_OUT}
    assert c.expected(1) == {"A"}
    assert len(c.on_message(suffix_update("A", 0, [1, 1, 1]), 0.0)) >= 2  # closes at once


def test_deadline_from_the_kth_fastest_and_measured_speed():
    c = make_coordinator(rank=2, factor=1.0)
    assert c.on_message(hello_with("A", 1, [0.001] * 3), 0.0) == []  # deadline unknown yet
    out = c.on_message(hello_with("B", 1, [0.002] * 3), 0.0)
    assert c.assigner.deadline == pytest.approx(0.006)  # B, the 2nd fastest, trains all
    assert out[0]["first_layer"] == {"A": 0, "B": 0}
    c.on_message(hello_with("C", 1, [0.002] * 3), 0.0)
    # B turns out 3x slower than its profile: from window 3 it trains the last group only;
    # C is now the 2nd fastest and sets the same deadline
    c.assigner.observe("B", 0, 0.018)
    c.assigner.observe("B", 0, 0.018)
    msgs = c.assigner.reassign(3)
    assert msgs and msgs[0]["window"] == 3 and msgs[0]["first_layer"] == {"B": 2}
    assert c.assigner.deadline == pytest.approx(0.006)
    assert c.assigner.first_layer("B", 2) == 0 and c.assigner.first_layer("B", 3) == 2


def test_suffix_encoder_follows_assignments_per_window():
    enc = SuffixEncoder(GROUPS, "A")
    assert not enc.ready(1)  # no assignment: does not train
    enc.assign(Message(Kind.ASSIGN, RUN, "coordinator", 1, 0,
                       {"window": 1, "first_layer": {"A": 1, "B": 0}, "deadline": 1.0}))
    enc.assign(Message(Kind.ASSIGN, RUN, "coordinator", 2, 0,
                       {"window": 4, "first_layer": {"A": SITS_OUT}, "deadline": 1.0}))
    assert enc.ready(1) and enc.trainable_from(3) == 1 and not enc.ready(4)
    out = enc.encode(np.array([1, 2, 3], np.float32), 2)
    assert out.fields == {"first_layer": 1} and out.values.tolist() == [2, 3]
    assert out.own.tolist() == [0, 2, 3]


def test_frozen_groups_bit_identical_and_cost_no_gradient():
    torch.set_num_threads(1)
    ds = load_dataset("digits")
    x, y = agent_shard(ds, 0, 2, "iid", 0, 0.5)
    trainer = LocalTrainer.on_arrays(JobConfig(task="digits"), x, y, seed=0)
    assert [g.name for g in trainer.groups] == ["0", "2"]
    trainer.train_suffix(1)
    frozen = trainer.groups[0]
    before = trainer.params.copy()
    for _ in range(20):
        trainer.step()
    after = trainer.params
    assert np.array_equal(after[frozen.start:frozen.end], before[frozen.start:frozen.end])
    assert not np.array_equal(after[frozen.end:], before[frozen.end:])
    first_layer = trainer.model.get_submodule("0")
    assert all(p.grad is None for p in first_layer.parameters())  # really skipped
    trainer.train_suffix(0)
    trainer.step()
    assert all(p.grad is not None for p in first_layer.parameters())


def test_profile_reflects_the_slowdown():
    torch.set_num_threads(1)
    ds = load_dataset("digits")
    x, y = agent_shard(ds, 0, 2, "iid", 0, 0.5)
    fast = LocalTrainer.on_arrays(JobConfig(task="digits"), x, y, seed=0).profile()
    slow = LocalTrainer.on_arrays(JobConfig(task="digits"), x, y, seed=0, slowdown=4.0).profile()
    assert len(fast["f"]) == len(fast["b"]) == 2
    assert all(v >= 0 for v in fast["f"] + fast["b"])
    assert sum(slow["f"]) + sum(slow["b"]) > 2.0 * (sum(fast["f"]) + sum(fast["b"]))


# -- issue 14, finding 2: one FedPMT hello must not silence the fleet --------------------------
@pytest.mark.parametrize("bad", [
    {"f": [0.0] * 3, "b": [0.0] * 3},  # all zero: a deadline of 0, everyone else sits out
    {"f": [0.0] * 3, "b": [1e-9] * 3},  # a batch in a nanosecond: no device is that fast
    {"f": [1e300] * 3, "b": [0.1] * 3},  # finite, but its round cost overflows
])
def test_implausible_profiles_are_refused(bad):
    with pytest.raises(Rejected) as exc:
        parse_profile(bad, 3)
    assert exc.value.reason == "bad_profile"


@pytest.mark.parametrize("margin", [0.0, 0.1])
def test_one_fast_claim_cannot_set_the_deadline_below_what_the_others_need(margin):
    c = make_coordinator(margin=margin)  # derived: the fastest agent's full round (rank 1)
    for agent in ("B", "C", "D"):
        c.on_message(hello_with(agent, 1, [0.001] * 3), 0.0)
    c.on_message(hello_with("liar", 1, [1e-6] * 3), 0.0)  # the fastest by far, so it claims
    # the deadline never drops below what the median agent needs for its output group
    assert c.assigner.deadline >= 0.001
    assert all(c.assigner.first_layer(a, 1) not in (None, SITS_OUT) for a in "BCD")
    assert c.expected(1) >= {"B", "C", "D"}


def test_measured_step_times_correct_a_profile_and_implausible_ones_are_ignored():
    c = make_coordinator(deadline=0.0035)
    c.on_message(hello_with("A", 1, [0.001] * 3), 0.0)  # claims it trains everything in time
    assert c.assigner.first_layer("A", 1) == 0
    for bogus in (0.0, -1.0, float("nan"), 1e300):
        c.assigner.observe("A", 0, bogus)
    assert "A" not in c.assigner.scale
    c.assigner.observe("A", 0, 0.006)  # really twice as slow: the last two groups fit no more
    assert c.assigner.reassign(2)[0]["first_layer"] == {"A": 2}


def assignment_entries(msgs: list[Message]) -> int:
    return sum(len(m["first_layer"]) for m in msgs if m.kind is Kind.ASSIGN)


@pytest.mark.parametrize("alternate", [False, True])
def test_a_hello_flood_is_rate_limited_and_not_amplified(alternate):
    c = make_coordinator()
    fleet = [f"a{i:03d}" for i in range(100)]
    for agent in fleet:
        c.on_message(hello_with(agent, 1, [0.001] * 3), 0.0)
    profiles = ([0.001] * 3, [1e-5] * 3)  # alternating: every accepted one moves the plan
    entries = refused = 0
    for i in range(1000):  # ten a second for 100 s from one agent
        profile = profiles[i % 2] if alternate else profiles[0]
        try:
            entries += assignment_entries(
                c.on_message(hello_with("a000", 1, profile, seq=2 + i), i / 10))
        except Rejected as exc:
            assert exc.reason == "hello_rate"
            refused += 1
    # before: every hello re-planned and named all 100 agents: 100,000 entries
    assert refused >= 980
    assert entries <= (1000 - refused) * (100 if alternate else 1)
