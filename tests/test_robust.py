"""Robust aggregation (shared/core/robust.py): worked examples computed by hand."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from fleet_helpers import hello

from fleetfl.shared.config import ConfigError, RunConfig, load_config
from fleetfl.shared.core import robust
from fleetfl.shared.core.averaging import WindowAveraging
from fleetfl.shared.core.job import job_from_dict
from fleetfl.shared.core.layers import Layer, LayerGroup, LayerTable
from fleetfl.shared.core.messages import Kind, Message
from fleetfl.shared.core.pmt import Assigner, SuffixDecoder
from fleetfl.shared.core.registry import make_coordinator
from fleetfl.shared.core.robust import (
    clip,
    coordinate_median,
    make_aggregator,
    median_clip,
    parse_aggregate,
    trimmed_mean,
)


def vecs(*rows: list[float]) -> list[np.ndarray]:
    return [np.asarray(r, np.float32) for r in rows]


@pytest.mark.parametrize("spec, parsed", [
    ("mean", ("mean", 0.0)), ("median", ("median", 0.0)),
    ("trimmed_mean:0.2", ("trimmed_mean", 0.2)), ("trimmed_mean:0", ("trimmed_mean", 0.0)),
])
def test_parse_aggregate(spec, parsed):
    assert parse_aggregate(spec) == parsed


@pytest.mark.parametrize("spec", ["", "avg", "median:0.1", "trimmed_mean", "trimmed_mean:x",
                                  "trimmed_mean:0.5", "trimmed_mean:-0.1"])
def test_parse_aggregate_refuses(spec):
    with pytest.raises(ValueError):
        parse_aggregate(spec)


def test_fixed_clip_scales_only_long_vectors():
    out = clip(vecs([3, 4], [0.3, 0.4]), 1.0)
    np.testing.assert_allclose(out[0], [0.6, 0.8], rtol=1e-6)  # norm 5 -> 1
    np.testing.assert_allclose(out[1], [0.3, 0.4])  # norm 0.5: unchanged


def test_median_clip_uses_factor_times_median_norm():
    # norms 1, 2, 10: median 2, factor 1.5 -> bound 3; only the third is cut (10 -> 3)
    out = median_clip(vecs([0.6, 0.8], [1.2, 1.6], [6, 8]), 1.5)
    np.testing.assert_allclose(out[0], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(out[1], [1.2, 1.6], rtol=1e-6)
    np.testing.assert_allclose(out[2], [1.8, 2.4], rtol=1e-6)


def test_coordinate_median_odd_and_even():
    np.testing.assert_allclose(coordinate_median(vecs([1, 10], [2, 20], [100, -5])), [2, 10])
    np.testing.assert_allclose(coordinate_median(vecs([1], [2], [3], [10])), [2.5])


def test_trimmed_mean_drops_floor_fraction_each_side():
    five = vecs([1, -50], [2, 0], [3, 1], [4, 2], [100, 3])
    # k = floor(0.2 * 5) = 1 per side: coordinate 0 keeps 2, 3, 4; coordinate 1 keeps 0, 1, 2
    np.testing.assert_allclose(trimmed_mean(five, 0.2), [3.0, 1.0])
    # k = floor(0.2 * 4) = 0: the plain mean
    np.testing.assert_allclose(trimmed_mean(vecs([1], [2], [3], [10]), 0.2), [4.0])
    # k = floor(0.45 * 4) = 1: the middle two of 1, 2, 3, 10
    np.testing.assert_allclose(trimmed_mean(vecs([1], [2], [3], [10]), 0.45), [2.5])


def test_make_aggregator_plain_mean_is_the_default_path():
    assert make_aggregator("mean") is None


def test_clipped_weighted_mean():
    f = make_aggregator("mean", clip_norm=1.0)
    # [3, 4] -> [0.6, 0.8] (weight 1); [0, 1] unchanged (weight 3):
    # ((0.6, 0.8) * 1 + (0, 1) * 3) / 4 = (0.15, 0.95)
    np.testing.assert_allclose(f(vecs([3, 4], [0, 1]), [1.0, 3.0]), [0.15, 0.95], rtol=1e-6)


def test_median_and_trimmed_mean_ignore_claimed_weights():
    rows = vecs([1], [2], [3], [4], [1000])
    assert make_aggregator("median")(rows, [1, 1, 1, 1, 1e6])[0] == 3.0
    assert make_aggregator("trimmed_mean:0.2")(rows, [1, 1, 1, 1, 1e6])[0] == 3.0


def test_median_clip_then_median():
    f = make_aggregator("median", clip_median=1.0)
    # norms 1, 2, 10: bound 2 -> [6, 8] becomes [1.2, 1.6]; medians (0.6|1.2|1.2, ...)
    np.testing.assert_allclose(f(vecs([0.6, 0.8], [1.2, 1.6], [6, 8]), [1, 1, 1]),
                               [1.2, 1.6], rtol=1e-6)


@pytest.mark.parametrize("kw", [{"clip_norm": -1.0}, {"clip_norm": 1.0, "clip_median": 2.0}])
def test_make_aggregator_refuses_bad_clipping(kw):
    with pytest.raises(ValueError):
        make_aggregator("mean", **kw)


# -- configuration and wiring ---------------------------------------------------------------
@pytest.mark.parametrize("overrides, word", [
    ({"aggregate": "trimmed_mean:0.7"}, "aggregate"),
    ({"aggregate": "max"}, "aggregate"),
    ({"clip_norm": -1.0}, "clip_norm"),
    ({"clip_norm": 1.0, "clip_median": 2.0}, "not both"),
])
def test_config_refuses_bad_options(overrides, word):
    with pytest.raises(ConfigError, match=word):
        load_config(None, overrides)


def layers(size: int) -> LayerTable:
    return LayerTable((Layer("w", 0, (size,)),))


def core_for(algo: str, size: int = 2, **run: object):
    cfg = dataclasses.replace(load_config(None, {"algo": algo, "min_agents": 3}), **run)
    return make_coordinator(cfg, np.zeros(size, np.float32), layers(size))


def update(agent: str, delta: list[float]) -> Message:
    return Message(Kind.UPDATE, "demo", agent, 2, 0, {"window": 1, "samples": 10, "steps": 1},
                   {"delta": np.asarray(delta, np.float32)})


@pytest.mark.parametrize("aggregate, expected", [
    ("mean", [34.0, 0.0]),  # (1 + 1 + 100) / 3, (1 + 1 - 2) / 3
    ("median", [1.0, 1.0]),
])
def test_window_averaging_uses_the_configured_rule(aggregate, expected):
    core = core_for("fedavg", aggregate=aggregate)
    for name in ("a", "b", "evil"):
        core.on_message(hello("demo", name, 10), 0.0)
    core.on_message(update("a", [1, 1]), 0.0)
    core.on_message(update("b", [1, 1]), 0.0)
    avg, _model = core.on_message(update("evil", [100, -2]), 0.0)
    np.testing.assert_allclose(avg["delta"], expected, rtol=1e-6)
    np.testing.assert_allclose(core.params, expected, rtol=1e-6)


@pytest.mark.parametrize("algo", ["drpga", "lbgm"])
def test_robust_rules_accepted_for_every_payload(algo):
    # issue 14: partial payloads per coordinate over their senders; LBGM updates are decoded
    # to dense vectors (rho times the look-back) before any rule sees them
    assert core_for(algo, aggregate="median").aggregator is not None
    assert core_for(algo, clip_median=2.0).aggregator is not None
    assert core_for(algo).aggregator is None  # the plain mean


def test_robust_rule_with_dense_payload_on_any_timing():
    for algo in ("fedavg", "dga", "fda"):
        assert core_for(algo, aggregate="trimmed_mean:0.2").aggregator is not None
    cfg = dataclasses.replace(RunConfig(), aggregate="median",
                              job=job_from_dict({"algo": "drpga", "payload": "dense"}))
    assert make_coordinator(cfg, np.zeros(2, np.float32), layers(2)).aggregator is not None


def test_chunked_rules_match_whole_array_numpy():
    rng = np.random.default_rng(0)
    rows = [rng.normal(size=robust.CHUNK * 2 + 7).astype(np.float32) for _ in range(7)]
    stacked = np.stack(rows)
    np.testing.assert_allclose(coordinate_median(rows), np.median(stacked, axis=0))
    k = int(0.3 * 7)  # 2 per side
    expected = np.sort(stacked, axis=0)[k:7 - k].mean(axis=0)
    np.testing.assert_allclose(trimmed_mean(rows, 0.3), expected, rtol=1e-6, atol=1e-7)


# -- partial and suffix payloads: per coordinate over the senders that covered it ------------
def masks(*rows: list[int]) -> list[np.ndarray]:
    return [np.asarray(r, bool) for r in rows]


# the second sender did not send coordinate 1 (its 0 there is no value); nobody sent the third
COVERED = (vecs([1, 10, 0], [2, 0, 0], [3, 30, 0], [100, 40, 0]),
           masks([1, 1, 0], [1, 0, 0], [1, 1, 0], [1, 1, 0]))


def test_coordinate_median_over_the_senders_of_each_coordinate():
    rows, cov = COVERED
    # coordinate 0: median of 1, 2, 3, 100; coordinate 1: of 10, 30, 40; coordinate 2: none
    np.testing.assert_allclose(coordinate_median(rows, cov), [2.5, 30, 0])
    np.testing.assert_allclose(coordinate_median(rows, [None] * 4), [2.5, 20, 0])  # dense


def test_trimmed_mean_trims_per_coordinate_by_its_own_sender_count():
    rows, cov = COVERED
    # F = 0.25: coordinate 0 has 4 senders, k = 1: mean of 2, 3; coordinate 1 has 3, k = 0
    np.testing.assert_allclose(trimmed_mean(rows, 0.25, cov), [2.5, 80 / 3, 0], rtol=1e-6)


def test_clipping_measures_only_what_was_sent():
    rows = vecs([3, 4, 7, 7], [1, 1, 1, 1], [0, 0, 0, 2])  # the 7s were not sent
    cov = masks([1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 1])
    out = clip(rows, 2.5, cov)
    np.testing.assert_allclose(out[0][:2], [1.5, 2.0], rtol=1e-6)  # norm 5 -> 2.5
    np.testing.assert_allclose(out[1], [1, 1, 1, 1])  # norm 2: unchanged
    # median clip compares per-coordinate sizes (norm / sqrt(coordinates sent)): 3.54, 1, 2;
    # the median 2 allows sqrt(2) * 2 = 2.83 to the first, 4 to the second, 2 to the third
    out = median_clip(rows, 1.0, cov)
    np.testing.assert_allclose(np.linalg.norm(out[0][:2]), 2 * np.sqrt(2), rtol=1e-6)
    np.testing.assert_allclose(out[1], rows[1])
    np.testing.assert_allclose(out[2], rows[2])


def test_drpga_coordinator_takes_the_median_on_the_masked_coordinates():
    core = core_for("drpga", size=200, aggregate="median", min_agents=4)
    mask = core.decoder.masks(1)
    sent = int(mask.sum())
    for name, value in [("a", 0.1), ("b", 0.2), ("c", 0.3), ("evil", 1000.0)]:
        core.on_message(hello("demo", name, 10), 0.0)
        msg = Message(Kind.UPDATE, "demo", name, 2, 0,
                      {"window": 1, "samples": 10, "steps": 1},
                      {"delta": np.full(sent, value, np.float32)})
        out = core.on_message(msg, 0.0)
    np.testing.assert_allclose(out[0]["delta"], 0.25, rtol=1e-6)  # (0.2 + 0.3) / 2
    np.testing.assert_allclose(core.params[mask], 0.25, rtol=1e-6)
    assert not core.params[~mask].any()


def test_fedpmt_coordinator_takes_the_median_per_layer_over_its_trainers():
    """Suffix payloads (FedPMT): each layer group's median over the agents that trained it."""
    groups = [LayerGroup(f"l{i}", i, i + 1) for i in range(3)]
    assigner = Assigner(3, 1, "demo", deadline=0.0035)  # margin 0.1: a 3.15 ms budget
    core = WindowAveraging(params=np.zeros(3, np.float32), run="demo", job={},
                           decoder=SuffixDecoder(groups, assigner), assigner=assigner,
                           aggregator=make_aggregator("median"))
    fast, slow = [0.001] * 3, [0.003, 0.002, 0.001]  # all three groups; the last two
    senders = [("a", fast, [1, 1, 1]), ("b", fast, [2, 2, 2]), ("evil", fast, [1e3] * 3),
               ("c", slow, [3, 3]), ("d", slow, [4, 4])]
    for name, backward, _ in senders:
        msg = hello("demo", name, 10)
        msg.fields["capabilities"] = {"profile": {"f": [0.0] * 3, "b": backward}}
        core.on_message(msg, 0.0)
    for name, _, values in senders:
        out = core.on_message(Message(Kind.UPDATE, "demo", name, 2, 0,
                                      {"window": 1, "samples": 10, "steps": 1,
                                       "first_layer": 3 - len(values)},
                                      {"delta": np.asarray(values, np.float32)}), 0.0)
    # group 0: median of a, b, evil (1, 2, 1000); groups 1, 2: of all five (1, 2, 1000, 3, 4).
    # Read as dense, c's and d's missing group 0 would count as zeros: median 1, not 2.
    np.testing.assert_allclose(out[0]["delta"], [2, 3, 3])
    np.testing.assert_allclose(core.params, [2, 3, 3])
