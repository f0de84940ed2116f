"""FedBuff, the buffered asynchronous timing (shared/core/fedbuff.py): the README's worked
example, the staleness bound, the reduction to FedAvg, the device's state machine, resume,
and 4 agents on MNIST over the real broker."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
from fleet_helpers import InProcessFleet, hello
from test_integration import finish, make_fleet

from fleetfl.shared.config import ConfigError, RunConfig, validate
from fleetfl.shared.core.averaging import WindowAveraging
from fleetfl.shared.core.base import Rejected
from fleetfl.shared.core.catalog import ALGORITHMS
from fleetfl.shared.core.fedbuff import (
    MAX_STALENESS,
    BufferedAveraging,
    FedBuffDevice,
    staleness_weight,
)
from fleetfl.shared.core.job import job_with
from fleetfl.shared.core.layers import Layer, LayerTable
from fleetfl.shared.core.messages import Kind, Message
from fleetfl.shared.core.payloads import PartialDecoder, PartialEncoder, PartialMasks
from fleetfl.shared.core.registry import make_coordinator

RUN = "t"
README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def update(agent: str, seq: int, window: int, base: int, samples: int, delta) -> Message:
    return Message(Kind.UPDATE, RUN, agent, seq, base,
                   {"window": window, "samples": samples, "steps": 1},
                   {"delta": np.asarray(delta, np.float32)})


def buffered(params, agents: dict[str, int], **kw) -> BufferedAveraging:
    c = BufferedAveraging(params=np.asarray(params, np.float32), run=RUN, job={}, **kw)
    for name, samples in agents.items():
        c.on_message(hello(RUN, name, samples), 0.0)
    return c


# -- the README's worked example ------------------------------------------------------------

def readme_example() -> dict:
    """The numbers of the README's FedBuff worked example."""
    start = README.index("## FedBuff")
    text = README[start:README.find("\n## ", start + 3)]
    setting = re.search(r"version (\d+), B = (\d+), eta_g = ([\d.]+), model \[([^\]]*)\]", text)
    rows = re.findall(r"^\| `(\w)` \| (\d+) \| \[([^\]]*)\] \| (\d+) \| ([\d.]+) \|$", text,
                      re.M)
    result = re.search(r"new model \(version (\d+)\) = \[([^\]]*)\]", text)
    assert setting and len(rows) == 3 and result, "the README's FedBuff example is missing"

    def vec(s: str) -> list[float]:
        return [float(x) for x in s.split(",")]

    return {"version": int(setting[1]), "buffer": int(setting[2]),
            "server_lr": float(setting[3]), "model": vec(setting[4]),
            "updates": [(a, int(base), vec(d), int(tau), float(s))
                        for a, base, d, tau, s in rows],
            "new_version": int(result[1]), "new_model": vec(result[2])}


def test_worked_example_staleness_0_1_3_server_lr_half():
    """Hand-computed: (0.5 / 3) x ([6,0,0] + [0,6,0] / sqrt 2 + [0,0,6] / 2) = [1, 0.7071, 0.5]
    on top of [1, 1, 1]."""
    ex = readme_example()
    assert ex["updates"][0][1:] == (3, [6.0, 0.0, 0.0], 0, 1.0)
    assert (ex["buffer"], ex["server_lr"]) == (3, 0.5)
    c = buffered(ex["model"], {a: 1 for a, *_ in ex["updates"]}, buffer=ex["buffer"],
                 server_lr=ex["server_lr"], max_staleness=MAX_STALENESS,
                 version=ex["version"], closed_window=ex["version"])
    out = []
    for agent, base, delta, tau, weight in ex["updates"]:
        assert staleness_weight(tau) == pytest.approx(weight, abs=5e-5)  # README rounds
        assert out == []  # the buffer waits for B arrivals
        out = c.on_message(update(agent, 2, ex["version"] + 1, base, 1, delta), 0.0)
    avg, model = out[:2]
    np.testing.assert_allclose(avg["delta"], [1.0, 1 / math.sqrt(2), 0.5], atol=1e-6)
    np.testing.assert_allclose(c.params, [2.0, 1 + 1 / math.sqrt(2), 1.5], atol=1e-6)
    np.testing.assert_allclose(c.params, ex["new_model"], atol=5e-5)
    assert (c.version, avg["version"], model["version"]) == (ex["new_version"],) * 3
    assert avg["contributors"] == ["A", "B", "C"]
    assert c.results[-1].staleness == {"A": 0, "B": 1, "C": 3}


def test_samples_weight_the_staleness_scaled_deltas():
    """n = 1 and 3, tau = 0 and 3: (1 x [4] + 3 x 0.5 x [4]) / 4 = [2.5], times eta_g = 2."""
    c = buffered([0.0], {"A": 1, "B": 3}, buffer=2, server_lr=2.0, max_staleness=5,
                 version=3, closed_window=3)
    c.on_message(update("A", 2, 4, 3, 1, [4.0]), 0.0)
    c.on_message(update("B", 2, 4, 0, 3, [4.0]), 0.0)
    np.testing.assert_allclose(c.params, [5.0], atol=1e-6)


def test_too_stale_is_refused_and_counted_nowhere():
    c = buffered([0.0, 0.0], {"A": 1, "B": 1}, buffer=2, max_staleness=2,
                 version=3, closed_window=3)
    with pytest.raises(Rejected) as refused:
        c.on_message(update("A", 2, 4, 0, 1, [1, 1]), 0.0)  # tau = 3 > 2
    assert refused.value.reason == "stale"
    assert c.pending == {} and c.agents["A"].last_seq == 1  # not accepted
    c.on_message(update("A", 3, 4, 1, 1, [1, 1]), 0.0)  # tau = 2: in
    assert set(c.pending[4]) == {"A"}


def test_a_window_past_the_open_buffer_is_refused():
    c = buffered([0.0], {"A": 1}, buffer=2)
    for window in (0, 2, 2**70):
        with pytest.raises(Rejected) as refused:
            c.on_message(update("A", 2, window, 0, 1, [1.0]), 0.0)
        assert refused.value.reason == "window_ahead"


def test_a_second_update_of_one_agent_goes_to_the_next_buffer_one_version_staler():
    c = buffered([0.0], {"A": 1, "B": 1}, buffer=2)
    c.on_message(update("A", 2, 1, 0, 1, [2.0]), 0.0)
    c.on_message(update("A", 3, 1, 0, 1, [4.0]), 0.0)  # A is fast: B has not sent yet
    assert {w: sorted(got) for w, got in c.pending.items()} == {1: ["A"], 2: ["A"]}
    assert c.pending[2]["A"].staleness == 1  # applied after buffer 1: one version behind
    c.on_message(update("B", 2, 1, 0, 1, [0.0]), 0.0)  # buffer 1: (2 + 0) / 2
    np.testing.assert_allclose(c.params, [1.0])
    c.on_message(update("B", 3, 2, 1, 1, [0.0]), 0.0)  # buffer 2: (4 / sqrt 2 + 0) / 2
    np.testing.assert_allclose(c.params, [1.0 + 2 / math.sqrt(2)], atol=1e-6)
    assert c.results[-1].staleness == {"A": 1, "B": 0}


def test_a_short_buffer_closes_on_the_window_timeout():
    c = buffered([0.0], {"A": 1, "B": 1}, buffer=2, window_timeout=5.0)
    c.on_message(update("A", 2, 1, 0, 1, [2.0]), 0.0)
    assert c.on_tick(4.9) == []
    assert [m.kind for m in c.on_tick(5.0)][:2] == [Kind.AVG, Kind.MODEL]
    assert c.results[-1].timed_out and c.results[-1].missing == []


@pytest.mark.parametrize("payload", ["dense", "partial"])
def test_b_equals_n_fresh_updates_and_eta_1_is_fedavg(payload):
    """Same updates, same samples: FedBuff's buffer of all N at staleness 0 with eta_g = 1 is
    exactly FedAvg's sample-weighted mean (bit for bit), whatever the payload decodes to."""
    rng = np.random.default_rng(7)
    size, samples = 40, {"A": 5, "B": 1, "C": 12}
    masks = PartialMasks(3, size, 0.4, False)
    deltas = {a: rng.normal(size=size).astype(np.float32) for a in samples}
    models = []
    for kind, extra in ((WindowAveraging, {}), (BufferedAveraging, {"buffer": 3})):
        decoder = PartialDecoder(masks) if payload == "partial" else None
        c = kind(params=np.ones(size, np.float32), run=RUN, job={}, decoder=decoder, **extra)
        for a, n in samples.items():
            c.on_message(hello(RUN, a, n), 0.0)
        for a, n in samples.items():
            values = deltas[a][masks(1)] if payload == "partial" else deltas[a]
            c.on_message(update(a, 2, 1, 0, n, values), 0.0)
        assert c.version == 1
        models.append(c.params)
    np.testing.assert_array_equal(models[0], models[1])


def cfg(**job) -> RunConfig:
    c = RunConfig()
    c.job = job_with(c.job, {"algo": "fedbuff", **job})
    return c


def test_hostile_updates_are_refused_or_applied_and_the_model_stays_finite():
    """Every number from the network is hostile: windows, base versions, samples, values."""
    rng = np.random.default_rng(3)
    c = buffered(np.zeros(4), {"A": 5, "B": 5, "C": 5}, buffer=2, server_lr=3.0,
                 max_param=100.0)
    reasons = set()
    for seq in range(2, 400):
        values = np.clip(rng.choice([0.0, 1.0, -7.0, 1e30, 3e38], size=4)
                         * rng.normal(size=4), -3e38, 3e38)  # finite float32, as decoded
        msg = update(str(rng.choice(list("ABC"))), seq,
                     int(rng.choice([-(2**62), 0, 1, c.closed_window + 1, 2**62])),
                     int(rng.integers(0, c.version + 3)), int(rng.integers(-1, 8)), values)
        try:
            c.on_message(msg, float(seq))
        except Rejected as refused:
            reasons.add(refused.reason)
        assert np.isfinite(c.params).all() and (np.abs(c.params) <= 100.0).all()
    assert c.version > 5
    assert {"window_ahead", "bad_version", "samples_claim", "bad_value"} <= reasons


def test_registry_builds_it_with_b_defaulting_to_min_agents():
    layers = LayerTable((Layer("w", 0, (4,)),))
    c = cfg()
    c.min_agents, c.server_lr = 3, 0.7
    core = make_coordinator(c, np.zeros(4, np.float32), layers)
    assert isinstance(core, BufferedAveraging)
    assert (core.buffer, core.server_lr, core.max_staleness) == (3, 0.7, MAX_STALENESS)
    c.buffer, c.max_staleness = 5, 2
    core = make_coordinator(c, np.zeros(4, np.float32), layers)
    assert (core.buffer, core.max_staleness) == (5, 2)


@pytest.mark.parametrize("job, settings, bad", [
    ({"payload": "lbgm"}, {}, "fedbuff takes the dense or partial payload"),
    ({"payload": "suffix"}, {}, "fedbuff takes the dense or partial payload"),
    ({}, {"buffer": -1}, "buffer must be >= 0"),
    ({}, {"server_lr": 0.0}, "server_lr > 0"),
])
def test_config_refuses_what_fedbuff_cannot_do(job, settings, bad):
    c = cfg(**job)
    for key, value in settings.items():
        setattr(c, key, value)
    with pytest.raises(ConfigError, match=bad):
        validate(c)
    validate(cfg(payload="partial"))


def test_every_algorithm_has_its_timing_in_protocol_section_14_and_the_readme_table():
    spec = (Path(__file__).resolve().parents[1] / "PROTOCOL.md").read_text()
    headings = re.findall(r"^### 14\.\d+ .*$", spec, re.M)
    for name in ALGORITHMS:
        assert any(f"`{name}`" in h for h in headings), f"{name}: no section 14 state machine"
        assert f"| `{name}` |" in README, f"{name}: not in the README's algorithm table"
    # the default staleness bound the docs state is the code's
    assert f"{MAX_STALENESS} for `fedbuff`" in spec
    assert f"FedBuff {MAX_STALENESS})" in README


# -- the device -----------------------------------------------------------------------------

def avg_message(window: int, version: int, delta, contributors=("A",)) -> Message:
    return Message(Kind.AVG, RUN, "coordinator", 0, version - 1,
                   {"window": window, "version": version, "contributors": list(contributors)},
                   {"delta": np.asarray(delta, np.float32)})


def test_device_sends_every_k_steps_and_restarts_from_the_newest_model():
    dev = FedBuffDevice(RUN, "A", 10, period=2)
    p = np.zeros(2, np.float32)
    dev.start(version=4, next_window=5, params=p)
    p += 1
    assert dev.after_step(p) == [] and not dev.blocked
    # an average arrives mid-period: kept for later, the training copy is not touched
    assert dev.on_message(avg_message(5, 5, [10, 20]), p) == []
    np.testing.assert_array_equal(p, [1, 1])
    p += 1
    sent = dev.after_step(p)
    assert len(sent) == 1 and sent[0].kind is Kind.UPDATE
    msg = sent[0]
    assert (msg.base_version, msg["window"], msg["steps"], msg["samples"]) == (4, 6, 2, 10)
    np.testing.assert_array_equal(msg["delta"], [2, 2])  # from the model it started with
    np.testing.assert_array_equal(p, [10, 20])  # goes on from the newest model, version 5
    assert dev.base_version == 5
    dev.on_message(avg_message(6, 6, [1, 1]), p)
    p += 3
    dev.after_step(p)
    msg = dev.after_step(p)[0]
    np.testing.assert_array_equal(msg["delta"], [3, 3])
    assert (msg.base_version, msg["window"]) == (5, 7)
    np.testing.assert_array_equal(p, [11, 21])


def test_device_ignores_duplicates_and_resyncs_on_a_gap():
    dev = FedBuffDevice(RUN, "A", 10, period=3)
    p = np.zeros(2, np.float32)
    dev.start(version=0, next_window=1, params=p)
    dev.on_message(avg_message(1, 1, [1, 1]), p)
    dev.on_message(avg_message(1, 1, [5, 5]), p)  # QoS 1 duplicate
    np.testing.assert_array_equal(dev.latest, [1, 1])
    assert not dev.needs_resync
    dev.on_message(avg_message(3, 3, [1, 1]), p)  # window 2 never came
    assert dev.needs_resync


def test_partial_payload_keeps_the_unsent_part_as_residual():
    masks = PartialMasks(0, 50, 0.2, False)
    dev = FedBuffDevice(RUN, "A", 1, period=1, encoder=PartialEncoder(masks))
    p = np.zeros(50, np.float32)
    dev.start(0, 1, p)
    p += 1
    msg = dev.after_step(p)[0]
    assert msg["delta"].size == int(masks(1).sum())
    np.testing.assert_array_equal(p, np.where(masks(1), 0.0, 1.0))  # latest + residual


def fedbuff_fleet(n: int, buffer: int, period: int) -> InProcessFleet:
    c = BufferedAveraging(params=np.zeros(5, np.float32), run=RUN, job={}, buffer=buffer,
                          max_staleness=MAX_STALENESS, server_lr=0.8)
    names = "ABCD"[:n]
    devices = {a: FedBuffDevice(RUN, a, i + 1, period) for i, a in enumerate(names)}
    return InProcessFleet(c, devices, {a: np.zeros(5, np.float32) for a in names})


def test_every_device_copy_of_the_global_model_is_the_coordinators_bit_for_bit():
    fleet = fedbuff_fleet(n=3, buffer=2, period=3)
    rng = np.random.default_rng(1)

    def step_fn(name, p):
        p += rng.normal(size=5).astype(np.float32)

    for i in range(60):  # A steps every time, C every third time: stalenesses differ
        for a, every in (("A", 1), ("B", 2), ("C", 3)):
            if i % every == 0:
                fleet.step(a, step_fn)
    c = fleet.coordinator
    assert c.version >= 15
    assert max(max(r.staleness.values(), default=0) for r in c.results) >= 1
    for dev in fleet.devices.values():
        assert dev.latest_version == c.version
        np.testing.assert_array_equal(dev.latest, c.params)


def test_resume_from_a_checkpoint_with_spilled_buffers_gives_the_same_model():
    """The journal replays inputs into a restored state machine (coordinator/journal.py):
    the restored one must end where the undisturbed one does, nothing lost or applied
    twice."""
    fleet = fedbuff_fleet(n=2, buffer=2, period=1)
    c = fleet.coordinator
    for _ in range(3):
        fleet.step("A", lambda n, p: p.__iadd__(1.0))  # A laps B: buffers 1..3 hold A
    assert sorted(c.pending) == [1, 2, 3]
    state, params = c.state(), c.params.copy()
    twin = BufferedAveraging(params=np.zeros(5, np.float32), run=RUN, job={}, buffer=2,
                             max_staleness=MAX_STALENESS, server_lr=0.8)
    twin.load_state(state, params)
    late = [update("B", 10 + i, 1, 0, 2, np.full(5, i, np.float32)) for i in range(3)]
    for msg in late:
        c.on_message(msg, 1.0)
        twin.on_message(msg, 1.0)
    assert c.version == twin.version == 3
    np.testing.assert_array_equal(c.params, twin.params)
    assert [r.seqs for r in c.results] == [r.seqs for r in twin.results]


# -- integration ----------------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.slow
def test_mnist_dirichlet_four_agents_reach_97(broker, tmp_path, shared_data_dir):
    args = ["--algo", "fedbuff", "--dataset", "mnist", "--partition", "dirichlet",
            "--alpha", "0.5", "--min-agents", "4", "--period", "20",
            "--target-accuracy", "0.97", "--max-versions", "300"]
    start = time.monotonic()
    with make_fleet(broker, tmp_path, "mnist-fedbuff", args,
                    data_dir=str(shared_data_dir)) as fleet:
        fleet.start_coordinator()
        fleet.start_agents(4)
        events = finish(fleet, timeout=600)
    accuracies = [e["accuracy"] for e in events if e["accuracy"] is not None]
    print(f"fedbuff mnist: {len(events)} versions, best {max(accuracies):.4f}, "
          f"{time.monotonic() - start:.1f} s")
    assert max(accuracies) >= 0.97
    assert accuracies[0] < 0.9 < accuracies[-1]
    assert all(len(e["contributors"]) >= 1 for e in events)
    assert events[-1]["rejected"] == {}
