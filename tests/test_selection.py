"""Participant selection (shared/core/selection.py, README "Participant selection"): the count,
the seeded rotation and its starvation bound, a dropped agent first at the next decision,
select >= N being no selection at all, hostile hellos, checkpoints, and every timing under it
(state machines driven in one process, and the simulator)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fleetfl.coordinator.cli import build_parser
from fleetfl.coordinator.simulator import SimConfig, Simulator
from fleetfl.shared.config import load_config
from fleetfl.shared.core.base import Rejected
from fleetfl.shared.core.job import ConfigError, job_to_dict
from fleetfl.shared.core.layers import Layer, LayerTable
from fleetfl.shared.core.messages import Kind, Message
from fleetfl.shared.core.pmt import SITS_OUT
from fleetfl.shared.core.registry import make_coordinator, make_device
from fleetfl.shared.core.selection import (
    HISTORY_WINDOWS,
    SelectionGate,
    selection_count,
    tie_key,
)
from fleetfl.shared.devtools.link_proxy import LinkSpec

RUN = "sel"
# two layer groups, so FedPMT has something to assign
LAYERS = LayerTable((Layer("a.weight", 0, (2,)), Layer("b.weight", 2, (2,))))
PROFILE = {"f": [0.001, 0.001], "b": [0.001, 0.001]}


class Fleet:
    """A coordinator and `n` devices built by the registry, messages delivered at once in
    the order published; one step per device per tick (a second of the coordinator's
    clock). `silent` agents never step; `offline` ones are gone."""

    def __init__(self, n: int, silent: tuple[str, ...] = (), **settings) -> None:
        self.cfg = load_config(None, {"run": RUN, "min_agents": n, "window_timeout": 5.0,
                                      **settings})
        self.core = make_coordinator(self.cfg, np.zeros(LAYERS.size, np.float32), LAYERS)
        self.names = [f"a{i}" for i in range(n)]
        self.devices = {a: make_device(self.cfg.job, RUN, a, 10, LAYERS) for a in self.names}
        self.params = {a: np.zeros(LAYERS.size, np.float32) for a in self.names}
        self.seq = dict.fromkeys(self.names, 0)
        self.silent, self.offline = set(silent), set()
        self.now, self.results, self.refused = 0.0, [], []
        for a in self.names:
            self.devices[a].start(0, 1, self.params[a])
            self.hello(a)

    def hello(self, agent: str) -> None:
        msg = Message(Kind.HELLO, RUN, agent, 0, 0, {
            "samples": 10, "first_window": self.core.closed_window + 1,
            "capabilities": {"profile": PROFILE}})
        self.send(agent, msg)

    def send(self, agent: str, msg: Message) -> None:
        self.seq[agent] += 1
        msg.seq = self.seq[agent]
        try:
            self.publish(self.core.on_message(msg, self.now))
        except Rejected as exc:
            self.refused.append((agent, exc.reason))

    def publish(self, outputs: list[Message]) -> None:
        self.results += self.core.results
        self.core.results = []
        for out in outputs:
            if out.kind is Kind.MODEL:
                continue
            for a in self.names:
                if a not in self.offline:
                    for reply in self.devices[a].on_message(out, self.params[a]):
                        self.send(a, reply)

    def tick(self) -> None:
        self.now += 1.0
        for i, a in enumerate(self.names):
            dev = self.devices[a]
            if a in self.silent or a in self.offline or dev.blocked:
                continue
            self.params[a] += np.float32(0.001 * (i + 1))
            for msg in dev.after_step(self.params[a]):
                self.send(a, msg)
        self.publish(self.core.on_tick(self.now))

    def run(self, versions: int, ticks: int = 2000) -> list:
        for _ in range(ticks):
            if self.core.version >= versions:
                break
            self.tick()
        assert self.core.version >= versions, (self.core.version, self.refused)
        return self.results

    def chosen(self) -> dict[int, list[str]]:
        return {w: agents for r in self.results for w, agents in r.selected}


def served_every(results: list, names: list[str], span: int, first: int) -> None:
    """Every agent is among the contributors of every `span` consecutive windows from
    window `first` on."""
    windows = {r.window: set(r.contributors) for r in results if r.window >= first}
    last = max(windows)
    for start in range(first, last - span + 2):
        seen = set().union(*(windows[w] for w in range(start, start + span)))
        assert seen == set(names), (start, span, sorted(set(names) - seen))


# -- the count and the configuration ---------------------------------------------------------

@pytest.mark.parametrize("select, online, count", [
    (3, 6, 3), (10, 6, 6), (1, 1, 1), (0.5, 6, 3), (0.5, 5, 3), (0.3, 10, 3), (0.1, 5, 1),
    (0.99, 4, 4), (0, 6, 6), (3, 0, 0)])
def test_the_count_is_the_number_or_the_fraction_of_those_online_rounded_up(select, online,
                                                                               count):
    assert selection_count(select, online) == count


def test_select_is_a_job_key_and_flag_travelling_only_when_set():
    assert "select" not in job_to_dict(load_config(None, {}).job)  # older agents read it
    cfg = load_config(None, {"select": 0.25})
    assert job_to_dict(cfg.job)["select"] == 0.25
    args = build_parser().parse_args(["--select", "3"])
    assert args.select == 3
    for bad in (2.5, -1, 1.5):
        with pytest.raises(ConfigError, match="select"):
            load_config(None, {"select": bad})


# -- the rule ----------------------------------------------------------------------------------

def test_hand_checked_rotation_four_agents_two_per_window():
    # Windows 1 and 2 take everyone (no average precedes them). Window 3 is decided when 1 is
    # averaged: all waited as long, so the two first in SHA-256(seed, 3, agent) order; window
    # 4 when 2 is averaged: those two count as served in 3, so the other two; window 5 when 3
    # is averaged: served in 3 < in 4, so window 3's pair again; and so on.
    fleet = Fleet(4, select=2, local_steps=2, seed=7)
    results = fleet.run(8)
    chosen = fleet.chosen()
    first = sorted(sorted(fleet.names, key=lambda a: tie_key(7, 3, a))[:2])
    second = sorted(set(fleet.names) - set(first))
    assert [chosen[w] for w in range(3, 9)] == [first, second] * 3
    assert [len(r.contributors) for r in results] == [4, 4, 2, 2, 2, 2, 2, 2]
    for r in results[2:]:
        assert r.contributors == chosen[r.window] and r.missing == []
    assert fleet.refused == []


@pytest.mark.parametrize("n, select", [(6, 3), (7, 3), (5, 2), (10, 0.3), (9, 4)])
def test_every_agent_is_served_once_in_every_ceil_n_over_count_windows(n, select):
    fleet = Fleet(n, select=select, local_steps=2)
    count = selection_count(select, n)
    results = fleet.run(3 + 3 * math.ceil(n / count))
    assert all(len(agents) == count for agents in fleet.chosen().values())
    assert all(len(r.contributors) == count for r in results if r.window > 2)
    served_every(results, fleet.names, math.ceil(n / count), first=3)
    assert fleet.refused == []


def test_the_seed_fixes_the_rotation():
    runs = [Fleet(7, select=3, local_steps=2, seed=seed) for seed in (1, 1, 2)]
    for fleet in runs:
        fleet.run(10)
    assert runs[0].chosen() == runs[1].chosen()
    assert runs[0].chosen() != runs[2].chosen()


def test_a_slow_agent_dropped_at_the_deadline_is_selected_at_the_next_decision():
    # a1 stops stepping in a window it is selected for: the window closes on the timeout
    # without it, and the decision made at that close takes it first
    fleet = Fleet(6, select=2, local_steps=2, seed=3)
    fleet.run(3)
    while not (upcoming := [w for w, agents in fleet.chosen().items()
                            if w > fleet.core.closed_window + 1 and "a1" in agents]):
        fleet.tick()
    window = min(upcoming)
    while fleet.core.closed_window < window - 1:
        fleet.tick()
    fleet.silent.add("a1")
    while fleet.core.closed_window < window:
        fleet.tick()
    fleet.silent.clear()
    dropped = fleet.results[-1]
    assert dropped.window == window and dropped.timed_out and dropped.missing == ["a1"]
    assert "a1" not in dropped.contributors
    decided = dict(dropped.selected)
    assert "a1" in decided[window + 2]
    fleet.run(fleet.core.version + 3)
    assert "a1" in fleet.results[window + 1].contributors  # window + 2: served


def test_select_at_least_n_is_exactly_no_selection():
    plain, everyone = Fleet(4, local_steps=3), Fleet(4, select=4, local_steps=3)
    a, b = plain.run(6), everyone.run(6)
    assert [r.contributors for r in a] == [r.contributors for r in b]
    assert np.array_equal(plain.core.params, everyone.core.params)
    assert all(r.selected == [] for r in a)


def test_a_repeated_or_replayed_hello_does_not_move_an_agent_up():
    base, hostile = Fleet(6, select=2, local_steps=2), Fleet(6, select=2, local_steps=2)
    base.run(3)
    hostile.run(3)
    for _ in range(3):  # fresh hellos (new seqs), within the rate limit
        hostile.now += 11.0
        hostile.hello("a5")
    replay = Message(Kind.HELLO, RUN, "a5", 1, 0, {"samples": 10, "first_window": 1})
    with pytest.raises(Rejected):
        hostile.core.on_message(replay, hostile.now)
    base.run(12)
    hostile.run(12)
    assert base.chosen() == hostile.chosen()


def test_an_update_for_a_window_sat_out_is_refused():
    fleet = Fleet(4, select=1, local_steps=2)
    fleet.run(3)
    window = fleet.core.closed_window + 1
    out = next(a for a in fleet.names if a not in fleet.chosen()[window])
    update = Message(Kind.UPDATE, RUN, out, 99, fleet.core.version,
                     {"window": window, "samples": 10, "steps": 2},
                     {"delta": np.ones(LAYERS.size, np.float32)})
    with pytest.raises(Rejected) as exc:
        fleet.core.on_message(update, fleet.now)
    assert exc.value.reason == "not_assigned"


def test_a_window_whose_selected_agents_all_left_closes_empty_and_others_go_on():
    fleet = Fleet(6, select=2, local_steps=2, seed=1)
    fleet.run(3)
    window = fleet.core.closed_window + 1
    gone = fleet.chosen()[window]
    for a in gone:
        fleet.offline.add(a)
        fleet.send(a, Message(Kind.OFFLINE, RUN, a, 0, 0, {}))
    fleet.run(fleet.core.version + 4)
    empty = next(r for r in fleet.results if r.window == window)
    assert empty.contributors == [] and empty.timed_out
    later = [r for r in fleet.results if r.window > window + 1]
    assert later and all(r.contributors and not set(r.contributors) & set(gone)
                         for r in later)


def test_a_silent_agent_is_not_selected_every_window():
    # never sending, it keeps its wait after one miss, then a second counts as served
    fleet = Fleet(6, select=2, local_steps=2, silent=("a0",), min_agents=5)
    fleet.run(20, ticks=5000)
    picked = [w for w, agents in fleet.chosen().items() if "a0" in agents]
    assert len(picked) <= len(fleet.chosen()) // 2
    assert fleet.core.version >= 20  # its windows close on the timeout, the run goes on


def test_what_is_kept_of_the_assignments_stays_bounded():
    fleet = Fleet(4, select=2, local_steps=1, max_versions=500)
    fleet.run(HISTORY_WINDOWS + 40, ticks=10000)
    longest = max(len(h) for h in fleet.core.selector.assigned.values())
    assert longest <= HISTORY_WINDOWS + fleet.core.selector.ahead + 1
    assert max(len(d.encoder.assigned) for d in fleet.devices.values()) <= longest + 1


def test_a_resumed_coordinator_continues_the_same_rotation():
    straight, resumed = Fleet(7, select=3, local_steps=2), Fleet(7, select=3, local_steps=2)
    straight.run(10)
    resumed.run(5)
    state, params = resumed.core.state(), resumed.core.params.copy()
    fresh = make_coordinator(resumed.cfg, np.zeros(LAYERS.size, np.float32), LAYERS)
    fresh.load_state(state, params)
    resumed.core = fresh
    resumed.run(10)
    assert straight.chosen() == resumed.chosen()
    assert np.array_equal(straight.core.params, resumed.core.params)


# -- every timing --------------------------------------------------------------------------

@pytest.mark.parametrize("settings", [
    {"algo": "fedavg", "local_steps": 2},
    {"algo": "dga", "period": 2, "delay": 1},
    {"algo": "dga", "period": 2, "delay": 5},  # D // K = 2: decided 4 windows ahead
    {"algo": "drpga", "period": 2, "delay": 1, "rate": 0.4},
    {"algo": "lbgm", "local_steps": 2},
    {"algo": "fedavg", "local_steps": 2, "compress": "q8"},
    {"algo": "fda", "rtc_steps": 1, "fda_theta": 1e-9},
    {"algo": "pmt", "local_steps": 2, "round_deadline": 50.0},
    {"algo": "fedavg", "local_steps": 2, "round_deadline": 50.0},  # FedAvg with drops
], ids=["fedavg", "dga", "dga-lag2", "drpga", "lbgm", "q8", "fda", "pmt", "fedavg-deadline"])
def test_each_timing_trains_only_the_selected_and_serves_everyone(settings):
    fleet = Fleet(6, select=3, **settings)
    results = fleet.run(14, ticks=4000)
    chosen = fleet.chosen()
    ahead = fleet.core.selector.ahead
    assert fleet.refused == []
    for r in results:
        if r.window > ahead:
            assert set(r.contributors) <= set(chosen[r.window]), r
            assert len(chosen[r.window]) == 3
    served_every(results, fleet.names, 2, first=ahead + 1)
    assert np.isfinite(fleet.core.params).all()


def test_pmt_selected_agents_train_their_assigned_groups_the_others_sit_out():
    fleet = Fleet(4, select=2, algo="pmt", local_steps=2, round_deadline=50.0)
    fleet.run(6)
    window = fleet.core.closed_window + 1
    for a in fleet.names:
        first = fleet.devices[a].encoder.trainable_from(window)
        assert (first == SITS_OUT) == (a not in fleet.chosen()[window])
        assert first == fleet.core.selector.first_layer(a, window)


def test_fedbuff_only_the_selected_train_at_once():
    fleet = Fleet(6, select=2, algo="fedbuff", period=2, buffer=2)
    training = []
    for _ in range(400):
        if fleet.core.version >= 16:
            break
        training.append(sum(not d.blocked for d in fleet.devices.values()))
        fleet.tick()
    assert fleet.core.version >= 16 and fleet.refused == []
    assert max(training[20:]) <= 2  # after the warm-up buffers
    served_every(fleet.results, fleet.names, 6, first=3)


def test_a_device_waits_for_its_selection_and_does_not_time_out_while_sitting_out():
    gate = SelectionGate(make_device(load_config(None, {}).job, RUN, "x", 1,
                                     LAYERS).encoder, "x")
    assert not gate.ready(1) and gate.trainable_from(1) is None  # not told yet
    gate.assign(Message(Kind.ASSIGN, RUN, "coordinator", 0, 0,
                        {"window": 1, "first_layer": {"x": 0, "y": -1}, "deadline": 0.0}))
    gate.assign(Message(Kind.ASSIGN, RUN, "coordinator", 0, 0,
                        {"window": 3, "first_layer": {"x": -1}, "deadline": 0.0}))
    assert [gate.ready(w) for w in (1, 2, 3, 4)] == [True, True, False, False]
    assert gate.sits_out(3) and not gate.sits_out(2)


# -- the simulator ----------------------------------------------------------------------------

@pytest.mark.parametrize("algo", ["fedavg", "dga", "fda", "fedbuff"])
def test_simulated_digits_six_agents_three_per_window(tmp_path: Path, algo: str):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(None, {"run": f"sel-{algo}", "min_agents": 6, "max_versions": 10,
                                 "algo": algo, "local_steps": 5, "period": 5, "select": 3,
                                 "buffer": 3})
        sim = Simulator(cfg, SimConfig(agents=6, up=LinkSpec(0.01), down=LinkSpec(0.01)),
                        run_dir=tmp_path / algo)
        assert sim.run().startswith("reached")
    finally:
        torch.set_num_threads(before)
    events = sim.events
    decided = {w: agents for e in events for w, agents in e["selected"]}
    assert all(len(agents) == 3 for agents in decided.values())
    everyone = {f"agent{i}" for i in range(6)}
    for e in events[2:]:  # FedBuff: a buffer also takes updates named for the one before
        before = decided.get(e["window"] - 1, everyone) if algo == "fedbuff" else []
        assert set(e["contributors"]) <= {*decided[e["window"]], *before}
    assert set().union(*(e["contributors"] for e in events[2:])) == everyone
    assert events[-1]["rejected"] == {}
    assert events[-1]["accuracy"] > events[0]["accuracy"]


# -- the documents ----------------------------------------------------------------------------

def test_the_protocol_and_readme_state_the_rule_the_code_follows():
    root = Path(__file__).resolve().parents[1]
    spec, readme = (root / "PROTOCOL.md").read_text(), (root / "README.md").read_text()
    section = spec[spec.index("### 14.5 Participant selection"):spec.index("## 15. Payloads")]
    assert "a device of any timing and payload MUST honour `assign`" in section
    assert 'SHA-256 of `"<seed>:<window>:<agent id>"`' in section
    assert tie_key(7, 3, "pi01") == __import__("hashlib").sha256(b"7:3:pi01").digest()
    assert "decides window w + 2\n(delayed timing: w + D // K + 2)" in section
    fleet = Fleet(2, algo="dga", select=1, period=2, delay=5)
    assert fleet.core.selector.ahead == 5 // 2 + 2
    guide = readme[readme.index("## Participant selection"):]
    assert "`--select N`" in guide and "ceil(N / count)" in guide
