"""Federated evaluation on the coordinator: sample-weighted means of what the agents report,
and every number an agent sends treated as hostile."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fleetfl.coordinator.federated import FederatedEvaluation
from fleetfl.shared.core.averaging import WindowAveraging
from fleetfl.shared.core.base import Rejected
from fleetfl.shared.core.messages import Kind, Message


def metrics(sender: str, version: int, samples: int, **values) -> Message:
    return Message(Kind.METRICS, "r", sender, 1, version,
                   {"version": version, "samples": samples, "values": values})


def test_weighted_means_over_the_agents_that_had_samples():
    fed = FederatedEvaluation(["loss", "accuracy"], timeout=60)
    fed.request(3, {"a", "b", "c"}, now=0.0)
    fed.report(metrics("a", 3, 100, loss=1.0, accuracy=0.5), declared=100)
    fed.report(metrics("b", 3, 300, loss=0.2, accuracy=0.9), declared=400)
    assert fed.closed(now=1.0) == []  # c has not answered yet
    fed.report(metrics("c", 3, 0), declared=0)  # no validation data: answers, adds nothing
    [result] = fed.closed(now=1.0)
    assert result.version == 3 and result.samples == 400 and result.reporters == 2
    assert result.values["accuracy"] == pytest.approx((0.5 * 100 + 0.9 * 300) / 400)
    assert result.values["loss"] == pytest.approx((1.0 * 100 + 0.2 * 300) / 400)
    assert result.missing == 0 and not fed.waiting()


def test_a_version_closes_on_timeout_with_the_silent_agents_counted():
    fed = FederatedEvaluation(["loss"], timeout=5)
    fed.request(1, {"a", "b"}, now=0.0)
    fed.report(metrics("a", 1, 10, loss=0.3), declared=10)
    assert fed.closed(now=4.9) == []
    [result] = fed.closed(now=5.0)
    assert result.missing == 1 and result.values == {"loss": pytest.approx(0.3)}


def test_an_answer_for_a_newer_version_means_the_older_one_was_skipped():
    fed = FederatedEvaluation(["loss"], timeout=60)
    fed.request(1, {"a"}, now=0.0)
    fed.request(2, {"a"}, now=0.1)
    fed.report(metrics("a", 2, 10, loss=0.1), declared=10)
    first, second = fed.closed(now=0.2)
    assert (first.version, first.samples, first.missing) == (1, 0, 0) and first.values == {}
    assert second.version == 2 and second.samples == 10


@pytest.mark.parametrize("msg, declared, reason", [
    (metrics("a", 9, 10, loss=0.1), 10, "unasked_metrics"),  # no such request
    (metrics("z", 1, 10, loss=0.1), 10, "unasked_metrics"),  # not asked of this agent
    (metrics("a", 1, 11, loss=0.1), 10, "bad_metrics"),  # more samples than declared
    (metrics("a", 1, 2**62, loss=0.1), 10, "bad_metrics"),
    (metrics("a", 1, -5, loss=0.1), 10, "bad_metrics"),
    (metrics("a", 1, 10), 10, "bad_metrics"),  # samples but no values
    (metrics("a", 1, 10, loss=0.1, extra=1.0), 10, "bad_metrics"),
    (metrics("a", 1, 10, loss=math.inf), 10, "bad_metrics"),
    (metrics("a", 1, 10, loss=math.nan), 10, "bad_metrics"),
    (metrics("a", 1, 10, loss=3e38), 10, "bad_metrics"),
    (metrics("a", 1, 10, loss=True), 10, "bad_metrics"),
    (metrics("a", 1, 10, loss="0.1"), 10, "bad_metrics"),
])
def test_unbelievable_reports_are_refused_and_change_nothing(msg, declared, reason):
    fed = FederatedEvaluation(["loss"], timeout=60)
    fed.request(1, {"a", "b"}, now=0.0)
    with pytest.raises(Rejected) as refused:
        fed.report(msg, declared)
    assert refused.value.reason == reason
    fed.report(metrics("a", 1, 10, loss=0.5), declared=10)
    fed.report(metrics("b", 1, 30, loss=0.1), declared=30)
    [result] = fed.closed(now=0.1)
    assert result.values["loss"] == pytest.approx((0.5 * 10 + 0.1 * 30) / 40)


def test_a_second_report_for_the_same_version_is_refused():
    fed = FederatedEvaluation(["loss"], timeout=60)
    fed.request(1, {"a", "b"}, now=0.0)
    fed.report(metrics("a", 1, 10, loss=0.5), declared=10)
    with pytest.raises(Rejected, match="second metrics"):
        fed.report(metrics("a", 1, 10, loss=0.0), declared=10)


def test_a_hello_cannot_declare_unbounded_validation_samples():
    """What a hello declares bounds the agent's metrics reports: it is bounded itself."""
    core = WindowAveraging(params=np.zeros(4, np.float32), run="r", job={},
                           window_timeout=60, min_agents=1, max_samples=1000)
    for claimed in (2**62, -1):
        hello = Message(Kind.HELLO, "r", "a", 1, 0, {"samples": 10, "first_window": 1,
                                                      "validation_samples": claimed})
        with pytest.raises(Rejected) as refused:
            core.on_message(hello, 0.0)
        assert refused.value.reason == "samples_claim"
    hello.fields["validation_samples"] = 200
    core.on_message(hello, 0.0)
    assert core.agents["a"].validation_samples == 200
