"""Issue 14, finding 1: nothing one agent sends can make the global model infinite.

Claimed sample counts are bounded (hello: `max_samples`; update: what its hello declared),
sums are float64, and every average is checked before it is published: a contribution that
would move a parameter beyond `max_param` is refused (`out_of_bounds`), the window still
closes with the others."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from fleet_helpers import hello

from fleetfl.coordinator.rundir import RunDir
from fleetfl.coordinator.runner import CoordinatorRunner
from fleetfl.shared.config import ConfigError, load_config
from fleetfl.shared.core.base import Rejected
from fleetfl.shared.core.layers import Layer, LayerTable
from fleetfl.shared.core.messages import Kind, Message
from fleetfl.shared.core.registry import make_coordinator
from fleetfl.shared.core.weighted_sum import covered_mean, weighted_mean
from fleetfl.shared.net.transport import Incoming
from fleetfl.shared.wire.codec import encode
from fleetfl.shared.wire.topics import Topics

RUN = "demo"
SIZE = 400


def core_for(algo: str, size: int = SIZE, **run: object):
    cfg = dataclasses.replace(load_config(None, {"algo": algo, "min_agents": 2,
                                                 "window_timeout": 5.0}), **run)
    return make_coordinator(cfg, np.zeros(size, np.float32),
                            LayerTable((Layer("w", 0, (size,)),)))


def update(core, agent: str, seq: int, samples: int, values: np.ndarray) -> Message:
    window = core.closed_window + 1
    return Message(Kind.UPDATE, RUN, agent, seq, core.version,
                   {"window": window, "samples": samples, "steps": 1},
                   {"delta": np.asarray(values, np.float32)})


def send(core, msg: Message, now: float = 0.0) -> tuple[list[Message], str | None]:
    """What the shell does: outputs, or the refusal's reason."""
    try:
        return core.on_message(msg, now), None
    except Rejected as exc:
        return [], exc.reason


def sent_values(core, fill: float) -> np.ndarray:
    """A partial (DRPGA) payload for the open window: one value per masked coordinate."""
    return np.full(int(core.decoder.masks(core.closed_window + 1).sum()), fill, np.float32)


def close(core, now: float) -> list[Message]:
    return core.on_tick(now + 5.0)  # window_timeout: the window closes with what it has


def test_drpga_update_claiming_2_62_samples_with_delta_1e20_leaves_the_model_finite():
    core = core_for("drpga", min_agents=1)  # the refused one does not count for the barrier
    for agent in ("honest", "evil"):
        core.on_message(hello(RUN, agent, 100), 0.0)
    reasons = []
    for w in range(1, 4):  # the attack every window; the run goes on
        t = 10.0 * w
        send(core, update(core, "honest", 1 + w, 100, sent_values(core, 0.01)), t)
        out, reason = send(core, update(core, "evil", 1 + w, 2**62, sent_values(core, 1e20)), t)
        reasons.append(reason)
        out = out or close(core, t)
        avg = next(m for m in out if m.kind is Kind.AVG)
        assert np.isfinite(avg["delta"]).all() and avg["contributors"] == ["honest"]
        assert np.isfinite(core.params).all() and np.abs(core.params).max() < 1.0
    assert core.version == 3
    assert reasons == ["samples_claim"] * 3  # more than its hello declared


def test_drpga_update_of_1e20_within_its_claim_is_refused_and_the_window_closes():
    core = core_for("drpga")
    core.on_message(hello(RUN, "honest", 100), 0.0)
    core.on_message(hello(RUN, "evil", 10**7), 0.0)  # the ceiling, not above
    send(core, update(core, "honest", 2, 100, sent_values(core, 0.01)), 0.0)
    out, reason = send(core, update(core, "evil", 2, 10**7, sent_values(core, 1e20)), 0.0)
    assert reason is None  # accepted: the window closes at once with both in ...
    avg = next(m for m in out if m.kind is Kind.AVG)
    np.testing.assert_allclose(avg["delta"], 0.01, rtol=1e-6)  # ... averaged without it
    assert avg["contributors"] == ["honest"]
    assert core.results[-1].refused == {"evil": "out_of_bounds"}
    assert np.abs(core.params).max() == pytest.approx(0.01)


def test_dense_fedavg_three_updates_of_3e38_leave_the_model_finite():
    core = core_for("fedavg")
    core.on_message(hello(RUN, "a", 10), 0.0)
    core.on_message(hello(RUN, "evil", 10), 0.0)
    for w in range(1, 4):
        send(core, update(core, "a", 1 + w, 10, np.full(SIZE, 0.1)), float(w))
        out, _ = send(core, update(core, "evil", 1 + w, 10, np.full(SIZE, 3e38)), float(w))
        assert out and np.isfinite(out[0]["delta"]).all()
    assert np.isfinite(core.params).all()
    np.testing.assert_allclose(core.params, 0.3, rtol=1e-5)  # the honest agent's three steps
    assert [r.refused for r in core.results] == [{"evil": "out_of_bounds"}] * 3


def test_when_every_contribution_is_refused_the_window_publishes_a_zero_delta():
    core = core_for("fedavg")
    core.params[:] = 1.0
    for agent in ("a", "b"):
        core.on_message(hello(RUN, agent, 10), 0.0)
    send(core, update(core, "a", 2, 10, np.full(SIZE, 3e38)), 0.0)
    avg, model = send(core, update(core, "b", 2, 10, np.full(SIZE, -2e6)), 0.0)[0][:2]
    assert avg["contributors"] == [] and not avg["delta"].any()  # agents are not left blocked
    assert model["version"] == core.version == 1
    np.testing.assert_array_equal(core.params, 1.0)  # the previous model, kept
    assert core.results[-1].refused == {"a": "out_of_bounds", "b": "out_of_bounds"}


def test_a_parameter_already_beyond_the_bound_may_come_back_not_go_further():
    core = core_for("fedavg", size=2, max_param=10.0)
    core.params[:] = [50.0, 0.0]  # e.g. an initial model with a large parameter
    for agent in ("a", "b"):
        core.on_message(hello(RUN, agent, 10), 0.0)
    send(core, update(core, "a", 2, 10, [-1.0, 1.0]), 0.0)
    send(core, update(core, "b", 2, 10, [1.0, 1.0]), 0.0)  # 50 -> 51: further out
    np.testing.assert_allclose(core.params, [49.0, 1.0])
    assert core.results[-1].refused == {"b": "out_of_bounds"}


def test_the_final_check_refuses_an_average_the_rule_made_too_large():
    """Defence in depth: should a rule ever produce a non-finite average from sane inputs,
    the window's contributions are refused and the model is kept."""
    core = core_for("fedavg")
    core.aggregator = lambda vectors, weights, coverages=None: np.full(SIZE, np.inf, np.float32)
    for agent in ("a", "b"):
        core.on_message(hello(RUN, agent, 10), 0.0)
    send(core, update(core, "a", 2, 10, np.full(SIZE, 0.1)), 0.0)
    avg = send(core, update(core, "b", 2, 10, np.full(SIZE, 0.1)), 0.0)[0][0]
    assert not avg["delta"].any() and avg["contributors"] == []
    assert not core.params.any()
    assert set(core.results[-1].refused.values()) == {"out_of_bounds"}


# -- sample claims ----------------------------------------------------------------------------
def test_hello_above_the_sample_ceiling_is_refused():
    core = core_for("fedavg", max_samples=1000)
    out, reason = send(core, hello(RUN, "evil", 1001))
    assert reason == "samples_claim" and "evil" not in core.agents
    assert send(core, hello(RUN, "ok", 1000))[1] is None


def test_update_claiming_more_than_its_hello_declared_is_refused():
    core = core_for("fedavg")
    core.on_message(hello(RUN, "a", 10), 0.0)
    _, reason = send(core, update(core, "a", 2, 11, np.zeros(SIZE)))
    assert reason == "samples_claim" and core.pending == {}
    assert send(core, update(core, "a", 3, 10, np.zeros(SIZE)))[1] is None


@pytest.mark.parametrize("overrides", [{"max_samples": 0}, {"max_param": 0.0},
                                       {"max_param": float("inf")}])
def test_config_refuses_bad_bounds(overrides):
    with pytest.raises(ConfigError, match=next(iter(overrides))):
        load_config(None, overrides)


# -- float64 sums -----------------------------------------------------------------------------
def test_weighted_mean_sums_in_float64():
    # a float32 running sum at ~1e5 (ulp 0.0078) drops each 1/1001 term: off by 1.0 in all
    vectors = [np.array([1e8], np.float32)] + [np.array([1.0], np.float32)] * 1000
    got = weighted_mean(vectors, [1.0] * 1001)
    np.testing.assert_allclose(got, [(1e8 + 1000) / 1001], rtol=1e-7)
    assert got.dtype == np.float32


def test_covered_mean_weights_in_float64():
    # weight 2**62 times 1e20 overflows float32 (inf / inf = nan), not float64
    cov = np.array([True, False])
    mean, _ = covered_mean([np.array([1e20, 0], np.float32), np.array([1.0, 0], np.float32)],
                           [2.0**62, 1.0], [cov, cov])
    assert np.isfinite(mean).all()
    np.testing.assert_allclose(mean, [1e20, 0], rtol=1e-6)


# -- the coordinator shell: counted refusals, and nothing non-finite leaves it ---------------
def runner_for(tmp_path) -> CoordinatorRunner:
    cfg = load_config(None, {"run": RUN, "run_dir": str(tmp_path), "dataset": "digits",
                             "min_agents": 2, "broker": "mqtt://127.0.0.1:1"})  # not used
    runner = CoordinatorRunner(cfg)
    runner.journal.open(0)
    runner.published = []
    runner.link.publish = lambda topic, payload, retain=False: runner.published.append(topic)
    return runner


def test_the_coordinator_counts_refused_contributions_and_keeps_a_finite_model(tmp_path):
    runner = runner_for(tmp_path)
    topics, size = Topics(RUN), runner.layers.size
    before = runner.core.params.copy()

    def deliver(msg: Message, topic: str) -> None:
        runner._handle(Incoming(topic, encode(msg), False))

    for i, agent in enumerate(("a", "evil")):
        deliver(Message(Kind.HELLO, RUN, agent, 1, 0, {"samples": 10, "first_window": 1}),
                topics.status(agent))
        deliver(Message(Kind.UPDATE, RUN, agent, 2, 0, {"window": 1, "samples": 10, "steps": 1},
                        {"delta": np.full(size, 3e38 if i else 0.01, np.float32)}),
                topics.up(agent))
    event = runner._record(runner.core.results.pop(0), evaluate_now=False)
    runner._checkpoint()
    assert event["contributors"] == ["a"] and event["rejected"] == {"out_of_bounds": 1}
    np.testing.assert_allclose(runner.core.params, before + 0.01, rtol=1e-5)
    params, _ = RunDir(tmp_path / RUN).load_checkpoint()
    assert np.isfinite(params).all()
    assert '"o":"refused","r":"out_of_bounds"' in (tmp_path / RUN / "accounting.jsonl"
                                                   ).read_text()


def test_non_finite_params_are_neither_published_nor_checkpointed(tmp_path):
    runner = runner_for(tmp_path)
    runner._checkpoint()  # a sane one first: it must stay
    runner.core.version, runner.core.params[3] = 1, np.inf
    runner._publish(runner.core.model_message())
    runner._checkpoint()
    assert runner.published == [] and runner.rejected["not_finite_out"] == 2
    params, state = RunDir(tmp_path / RUN).load_checkpoint()
    assert np.isfinite(params).all() and state["version"] == 0


def test_windows_ready_together_are_not_averaged_past_max_versions():
    """A burst of ready windows (DGA after a reconnect) stops at the run's last version."""
    from fleetfl.shared.core.averaging import WindowAveraging

    core = WindowAveraging(params=np.zeros(4, np.float32), run="r", job={}, max_ahead=5,
                           window_timeout=60, min_agents=1, max_versions=2)
    core.on_message(Message(Kind.HELLO, "r", "a", 1, 0, {"samples": 5, "first_window": 1}), 0)
    seq = 1
    for w in (2, 3, 1):
        seq += 1
        core.on_message(Message(Kind.UPDATE, "r", "a", seq, 0, {"window": w, "samples": 5,
                                                              "steps": 1},
                                {"delta": np.ones(4, np.float32)}), 0)
    assert core.version == 2
