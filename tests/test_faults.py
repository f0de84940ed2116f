"""Fault survival (issue 8, item 1): real Mosquitto, real coordinator and agent processes.

Each fleet test prints the accounting of every update (coordinator/accounting.py) and asserts
that none was lost and none applied twice. The journal and checkpoint pieces also have fast
unit tests here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import local_broker_or_skip

from fleetfl.coordinator.accounting import TRANSIT_S, Accounting, check
from fleetfl.coordinator.journal import MESSAGE, TICK, Journal
from fleetfl.coordinator.local_fleet import LocalFleet
from fleetfl.coordinator.rundir import RunDir
from fleetfl.shared.core.averaging import WindowAveraging
from fleetfl.shared.core.messages import Kind, Message
from fleetfl.shared.devtools.link_proxy import ProxyHost
from fleetfl.shared.devtools.local_broker import LocalMosquitto

D = 64 * 64 + 64 + 64 * 10 + 10  # the digits MLP


# -- fast unit tests: journal and checkpointed state ------------------------------------------
def test_journal_replays_in_order_and_stops_at_a_torn_tail(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.open(3)
    j.append_message(1.5, "fl/r/up/a", b"x" * 100, False)
    j.append_tick(2.0)
    j.append_message(2.5, "fl/r/status/a", b"hello", True)
    j.close()
    path = next(tmp_path.glob("journal-*.wal"))
    with path.open("ab") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00")  # a record cut short by a kill
    entries = list(Journal(tmp_path).entries(3))
    assert [(e.kind, e.at) for e in entries] == [(MESSAGE, 1.5), (TICK, 2.0), (MESSAGE, 2.5)]
    assert entries[0].payload == b"x" * 100 and entries[2].retain
    assert list(Journal(tmp_path).entries(4)) == []  # a checkpoint covers generation 3
    j2 = Journal(tmp_path)
    j2.open(3)  # appending goes on after the last good record, not after the torn one
    j2.append_tick(3.0)
    j2.rotate(4)
    j2.append_tick(4.0)
    j2.close()
    assert [e.at for e in Journal(tmp_path).entries(4)] == [4.0]
    # generation 3 is kept for the checkpoint before (the fallback), deleted at the next one
    assert Journal(tmp_path).generations() == [3, 4]
    j2.rotate(5)
    j2.close()
    assert Journal(tmp_path).generations() == [4, 5]
    with path.with_name("journal-00000004.wal").open("r+b") as f:
        f.seek(9)
        f.write(b"\xff")  # a flipped bit fails the CRC
    assert list(Journal(tmp_path).entries(4)) == []


def _update(sender: str, seq: int, window: int, base: int, value: float) -> Message:
    return Message(Kind.UPDATE, "r", sender, seq, base,
                   {"window": window, "samples": 10, "steps": 1},
                   {"delta": np.full(D, value, np.float32)})


def _hello(sender: str, seq: int) -> Message:
    return Message(Kind.HELLO, "r", sender, seq, 0, {"samples": 10, "first_window": 1})


def test_checkpoint_keeps_pending_updates_and_window_clocks() -> None:
    """DGA lets an update for the next window arrive before this one closes: the checkpoint
    must keep it (its seq is recorded, so the resumed coordinator would refuse it again)."""
    def core() -> WindowAveraging:
        return WindowAveraging(np.zeros(D, np.float32), "r", {}, max_staleness=5, max_ahead=2,
                               window_timeout=10.0)

    a = core()
    for i, name in enumerate(("a0", "a1")):
        a.on_message(_hello(name, 10 + i), 0.0)
    a.on_message(_update("a0", 20, 1, 0, 1.0), 1.0)
    a.on_message(_update("a0", 21, 2, 0, 5.0), 1.5)  # next window, early
    a.on_message(_update("a1", 22, 1, 0, 3.0), 2.0)  # window 1 closes
    assert a.version == 1 and a.results[0].seqs == {"a0": 20, "a1": 22}
    b = core()
    import msgpack

    state = msgpack.unpackb(msgpack.packb(a.state(), use_bin_type=True), raw=False)
    b.load_state(state, a.params)
    for c in (a, b):  # the same inputs give the same version on both
        c.on_message(_update("a1", 23, 2, 1, 7.0), 3.0)
    assert b.version == a.version == 2
    np.testing.assert_array_equal(a.params, b.params)
    assert b.results[-1].seqs == {"a0": 21, "a1": 23}
    b.on_message(_update("a0", 30, 3, 2, 1.0), 4.0)  # window 3 opens at clock 4.0
    state = msgpack.unpackb(msgpack.packb(b.state(), use_bin_type=True), raw=False)
    c = core()
    c.load_state(state, b.params)
    assert c.on_tick(13.9) == [] and c.on_tick(14.0)  # times out on the same clock


def test_an_update_sent_just_before_the_stop_is_in_flight_an_older_one_lost(
        tmp_path: Path) -> None:
    # Both PUBACKed, neither seen by the coordinator: the one sent 4 ms before it stopped was
    # still on its way (the broker keeps it for the coordinator's session; CI saw this race),
    # the one sent 5 s before is a loss.
    stop = 1_800_000_000.0
    (tmp_path / "accounting.jsonl").write_text(json.dumps({"stop": stop}) + "\n")
    log = "\n".join(f"update sent agent=a1 seq={seq} window=1 t={at:.6f}\n"
                     f"update acked agent=a1 seq={seq}"
                     for seq, at in ((1, stop - 5.0), (2, stop - 0.004)))
    acc = check(tmp_path, [log])
    assert acc.lost == [("a1", 1)]
    assert acc.in_flight_at_stop == 1
    assert stop - 0.004 >= stop - TRANSIT_S > stop - 5.0


def test_journal_fsync_cost(tmp_path: Path) -> None:
    """The cost the journal adds per 20 KB update (a small model's), printed for the notes."""
    payload = os.urandom(20_000)
    costs = {}
    for name, every in (("flush only", 0), ("fsync per message", 1), ("fsync per 16", 16)):
        j = Journal(tmp_path, fsync=every > 0)
        j.open(1)
        n = 200
        t0 = time.perf_counter()
        for i in range(n):
            j.append_message(float(i), "fl/r/up/a", payload, False)
            if every and (i + 1) % every == 0:
                j.sync()
        j.sync()
        costs[name] = (time.perf_counter() - t0) / n * 1e3
        j.clear()
    print("journal cost per 20 KB update: "
          + ", ".join(f"{k} {v:.3f} ms" for k, v in costs.items()))
    assert costs["flush only"] < 5.0


@pytest.fixture
def persistent_broker() -> Iterator[LocalMosquitto]:
    """Like the fleet's broker (ansible/roles/broker): sessions, queued and retained messages
    survive a restart."""
    with local_broker_or_skip(persistence=True) as b:
        yield b


@pytest.mark.integration
@pytest.mark.parametrize("durable", [True, False])
def test_durable_session_survives_a_broker_restart(persistent_broker: LocalMosquitto,
                                                  durable: bool) -> None:
    """What the coordinator relies on, and why it opens its session with clean_start=0:
    Mosquitto 2.0.11 restores from its persistence file only sessions opened that way."""
    import queue

    import paho.mqtt.client as mqtt

    from fleetfl.shared.net.broker_url import parse_broker_url
    from fleetfl.shared.net.transport import CONNECTED, MqttLink

    inbox: queue.Queue = queue.Queue()
    link = MqttLink(parse_broker_url(persistent_broker.url), "probe", inbox,
                    manual_ack=True, durable_session=durable)
    link.subscribe("t/#")
    link.connect()
    persistent_broker.restart()  # the link reconnects on its own, a second or more later
    pub = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                      client_id="pub", protocol=mqtt.MQTTv5)
    pub.connect(persistent_broker.host, persistent_broker.port)
    pub.loop_start()
    pub.publish("t/x", b"while away", qos=1).wait_for_publish(5)
    pub.loop_stop()
    got = []
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline and not got:
        try:
            item = inbox.get(timeout=0.2)
        except queue.Empty:
            continue
        if item.topic != CONNECTED:
            got.append(item.payload)
            link.ack(item)
    link.close()
    assert got == ([b"while away"] if durable else [])


# -- fleet helpers ------------------------------------------------------------------------------
def make_fleet(broker_url: str, tmp_path: Path, run: str, coordinator_args: list[str],
               agent_args: list[str]) -> LocalFleet:
    return LocalFleet(broker_url, run, tmp_path / f"logs-{run}",
                      ["--run-dir", str(tmp_path / "runs"), *coordinator_args], agent_args)


def wait_for_version(fleet: LocalFleet, run_dir: Path, version: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = RunDir(run_dir / fleet.run).events()
        if events and events[-1]["version"] >= version:
            return events[-1]["version"]
        assert fleet.coordinator.poll() is None, fleet.log("coordinator")[-3000:]
        time.sleep(0.1)
    raise AssertionError(f"version {version} not reached:\n" + fleet.log("coordinator")[-3000:])


def finish(fleet: LocalFleet, timeout: float, coordinator_code: int = 0) -> list[dict]:
    try:
        code = fleet.wait_coordinator(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError("coordinator hung:\n" + fleet.log("coordinator")[-3000:]) from None
    assert code == coordinator_code, fleet.log("coordinator")[-3000:]
    codes = fleet.wait_agents(timeout=60)
    assert all(c == 0 for c in codes.values()), codes
    return RunDir(fleet.log_dir.parent / "runs" / fleet.run).events()


def accounting(fleet: LocalFleet, title: str, elapsed: float) -> Accounting:
    logs = [p.read_text(errors="replace") for p in fleet.log_dir.glob("*.log")
            if p.stem != "coordinator"]
    acc = check(fleet.log_dir.parent / "runs" / fleet.run, logs)
    print(f"\n== {title} ({elapsed:.0f} s) ==\n{acc.table()}")
    return acc


def assert_nothing_lost(acc: Accounting, fleet: LocalFleet) -> None:
    assert acc.sent > 0 and acc.applied > 0
    assert not acc.lost, f"lost {acc.lost}\n" + fleet.log("coordinator")[-3000:]
    assert not acc.twice and not acc.window_twice, (acc.twice, acc.window_twice)
    assert not acc.unknown_applied, acc.unknown_applied
    assert "Traceback" not in fleet.log("coordinator")


def run_fleet(broker_url: str, tmp_path: Path, run: str, coordinator_args: list[str],
              agent_args: list[str], agents: int,
              disturb: Callable[[LocalFleet], None] | None = None, timeout: float = 300,
              agent_extra: dict[str, list[str]] | None = None, coordinator_code: int = 0,
              coordinator_url: str = "") -> tuple[LocalFleet, list[dict], Accounting]:
    start = time.monotonic()
    with make_fleet(broker_url, tmp_path, run, coordinator_args, agent_args) as fleet:
        fleet.start_coordinator(["--broker", coordinator_url] if coordinator_url else None)
        for i in range(agents):
            fleet.start_agent(i, agents, extra=(agent_extra or {}).get(f"agent{i}"))
        if disturb is not None:
            disturb(fleet)
        events = finish(fleet, timeout, coordinator_code)
    elapsed = time.monotonic() - start
    return fleet, events, accounting(fleet, run, elapsed)


# FedAvg with every agent in every round and no timeouts: the schedule does not depend on
# timing, so a disturbed run can be compared with an undisturbed one bit for bit.
LOCKSTEP = ["--algo", "fedavg", "--dataset", "digits", "--local-steps", "10",
            "--window-timeout", "600", "--seed", "3"]


def final_params(tmp_path: Path, run: str) -> np.ndarray:
    ckpt = RunDir(tmp_path / "runs" / run).load_checkpoint()
    assert ckpt is not None
    return ckpt[0]


# -- a: the coordinator killed and resumed --------------------------------------------------
def wait_mid_window(fleet: LocalFleet, run_dir: Path, after_version: int, agents: int,
                    timeout: float) -> tuple[int, int]:
    """Wait until, past `after_version`, some but not all of a window's updates are accepted
    (so they are in the journal, not in a checkpoint): (window, accepted)."""
    path = run_dir / fleet.run / "accounting.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = RunDir(run_dir / fleet.run).events()
        closed = events[-1]["window"] if events else 0
        if events and events[-1]["version"] >= after_version and path.exists():
            accepted: dict[int, int] = {}
            for line in path.read_text().splitlines():
                if '"accepted"' in line:
                    w = json.loads(line)["u"][2]
                    accepted[w] = accepted.get(w, 0) + 1
            if 0 < accepted.get(closed + 1, 0) < agents:
                return closed + 1, accepted[closed + 1]
        assert fleet.coordinator.poll() is None, fleet.log("coordinator")[-3000:]
        time.sleep(0.01)
    raise AssertionError("never caught a window half full")


@pytest.mark.integration
@pytest.mark.slow
def test_coordinator_sigkill_resume_loses_nothing_and_matches_undisturbed_run(
        broker, tmp_path: Path) -> None:
    n, versions = 3, 30
    args = [*LOCKSTEP, "--min-agents", str(n), "--max-versions", str(versions)]
    # one slow agent: a kill lands between the others' updates and its own
    slow = {f"agent{n - 1}": ["--slowdown", "8"]}
    _, clean_events, clean = run_fleet(broker.url, tmp_path, "clean", args,
                                       ["--block-timeout", "120"], n, agent_extra=slow)
    killed: dict[str, tuple[int, int]] = {}

    def kill_and_resume(down_s: float):
        def disturb(fleet: LocalFleet) -> None:
            killed[fleet.run] = wait_mid_window(fleet, tmp_path / "runs", 8, n, timeout=120)
            fleet.coordinator.send_signal(signal.SIGKILL)
            fleet.coordinator.wait()
            time.sleep(down_s)  # agents go on: the broker queues for the dead coordinator
            fleet.start_coordinator(extra=["--resume"])
        return disturb

    # a: down for less than the agents' block timeout: they wait, nothing resynchronises
    fleet, events, acc = run_fleet(broker.url, tmp_path, "killed", args,
                                   ["--block-timeout", "120"], n, kill_and_resume(1.0),
                                   agent_extra=slow)
    log = fleet.log("coordinator")
    replayed = int(log.split("replayed ")[1].split()[0])
    assert replayed >= 1  # the updates accepted since the checkpoint came from the journal
    assert [e["version"] for e in events] == list(range(1, versions + 1))
    assert_nothing_lost(acc, fleet)
    assert_nothing_lost(clean, fleet)
    assert acc.applied == clean.applied == n * versions
    # the same seed and a timing-free schedule: the very same model, bit for bit
    np.testing.assert_array_equal(final_params(tmp_path, "clean"),
                                  final_params(tmp_path, "killed"))
    # a': down for longer than the block timeout: agents resynchronise from the retained
    # model, train their window again and send it again (refused: it is in the journal)
    fleet2, events2, acc2 = run_fleet(broker.url, tmp_path, "resync", args,
                                      ["--block-timeout", "2"], n, kill_and_resume(3.0),
                                      agent_extra=slow)
    assert [e["version"] for e in events2] == list(range(1, versions + 1))
    assert_nothing_lost(acc2, fleet2)
    resynced = sum("resynchronising from the model" in fleet2.log(f"agent{i}")
                   for i in range(n))
    assert resynced >= 1
    a, b, c = (e[-1]["accuracy"] for e in (clean_events, events, events2))
    print(f"final accuracy: undisturbed {a:.4f}; killed in window {killed['killed']} "
          f"(window, accepted), resumed, {replayed} journal records replayed: {b:.4f}; "
          f"down 3 s + restart, {resynced} agents resynchronised: {c:.4f}")
    assert a == b
    # Resynchronised agents train their window again with fresh minibatches, which shifts
    # their minibatch streams from then on: another model of the same quality, not the same
    # model. Seen: -1.4 to +1.1 pt; on digits' 360 test images one image is 0.28 pt, so
    # 0.5 pt is not a bound this variant can promise (the resume above is exact).
    assert abs(a - c) <= 0.03


# -- c: 3 of 16 agents killed and restarted ----------------------------------------------------
def wait_for_contributions(fleet: LocalFleet, run_dir: Path, names: list[str], since: int,
                           count: int, timeout: float) -> int:
    """Wait until each of `names` is a contributor of `count` versions after `since`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = RunDir(run_dir / fleet.run).events()
        if all(sum(name in e["contributors"] for e in events if e["version"] > since) >= count
               for name in names):
            return events[-1]["version"]
        assert fleet.coordinator.poll() is None, fleet.log("coordinator")[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"{names} did not contribute again:\n"
                         + fleet.log(names[0])[-3000:])


@pytest.mark.integration
@pytest.mark.slow
def test_three_of_sixteen_agents_killed_and_restarted(broker, tmp_path: Path) -> None:
    n, victims = 16, [f"agent{i}" for i in (13, 14, 15)]
    # The run is stopped (SIGTERM) once the restarted agents contributed again: how long a
    # restart takes (~20 s to load torch and the data on a loaded 2-core host) sets its length.
    args = ["--algo", "fedavg", "--dataset", "digits", "--local-steps", "10",
            "--min-agents", str(n), "--window-timeout", "10", "--max-versions", "100000",
            "--eval-every", "10"]
    marks: dict[str, int] = {}

    def kill_and_restart(fleet: LocalFleet) -> None:
        marks["killed"] = wait_for_version(fleet, tmp_path / "runs", 5, timeout=180)
        for name in victims:
            fleet.agents[name].send_signal(signal.SIGKILL)
        for name in victims:
            fleet.agents[name].wait()
        for name in victims:  # same id and shard; its log goes on in the same file
            fleet.start_agent(int(name.removeprefix("agent")), n)
        marks["again"] = wait_for_contributions(fleet, tmp_path / "runs", victims,
                                                marks["killed"], 3, timeout=240)
        fleet.coordinator.send_signal(signal.SIGTERM)

    fleet, events, acc = run_fleet(broker.url, tmp_path, "agents", args, [], n,
                                   kill_and_restart, coordinator_code=130)
    assert_nothing_lost(acc, fleet)
    assert "stopped: interrupted" in fleet.log("coordinator")
    for name in victims:
        log = fleet.log(name)
        # one build per process life; a resync under load may log another join in either life
        lives = log.split(", training on ")
        assert len(lives) == 3, log[-2000:]
        rejoined = int(lives[2].split("joined at version ")[1].split(",")[0])
        assert rejoined >= marks["killed"]  # from the retained model, not from scratch
    accuracy = [e["accuracy"] for e in events if e["accuracy"] is not None][-1]
    print(f"agents killed at version {marks['killed']}, all three contributing again by "
          f"version {marks['again']}; stopped at {events[-1]['version']}, accuracy "
          f"{accuracy:.4f}")
    assert accuracy >= 0.85


# -- b: the broker restarted -----------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.slow
def test_broker_restart_loses_no_update(persistent_broker: LocalMosquitto,
                                        tmp_path: Path) -> None:
    """Mosquitto with persistence (as deployed). The coordinator's link goes through a proxy
    that keeps it out for 4 s while the broker restarts, so agents are back first and their
    updates can only reach it through the session the broker restored from disk."""
    args = ["--algo", "dga", "--dataset", "digits", "--min-agents", "4", "--max-versions",
            "50", "--window-timeout", "5"]
    marks: dict[str, int] = {}
    with ProxyHost() as host:
        proxy = host.add(("127.0.0.1", persistent_broker.port))

        def restart(fleet: LocalFleet) -> None:
            marks["at"] = wait_for_version(fleet, tmp_path / "runs", 10, timeout=120)
            host.drop(proxy, refuse_for=4.0)
            persistent_broker.restart()

        fleet, events, acc = run_fleet(
            persistent_broker.url, tmp_path, "broker", args, ["--block-timeout", "10"], 4,
            restart, coordinator_url=f"mqtt://127.0.0.1:{proxy.port}")
    assert_nothing_lost(acc, fleet)
    assert events[-1]["version"] == 50 and marks["at"] < 50
    assert "disconnected" in fleet.log("coordinator")  # the restart really happened
    print(f"broker restarted at version {marks['at']}; final accuracy "
          f"{events[-1]['accuracy']:.4f}")
    assert events[-1]["accuracy"] >= 0.85


# -- d: connections cut by the link proxy --------------------------------------------------------
@pytest.mark.integration
@pytest.mark.slow
def test_network_drop_through_link_proxy(broker, tmp_path: Path) -> None:
    """Two of four agents and the coordinator lose their connections at once and cannot
    reconnect for 3 s (a Wi-Fi flap); the others go on, everybody comes back."""
    n, cut = 4, ["agent1", "agent2"]
    target = ("127.0.0.1", broker.port)
    args = ["--algo", "fedavg", "--dataset", "digits", "--local-steps", "10",
            "--min-agents", str(n), "--window-timeout", "10", "--max-versions", "100000",
            "--eval-every", "10"]
    marks: dict[str, int] = {}
    with ProxyHost() as host:
        proxies = {name: host.add(target) for name in ["coordinator", *cut]}

        def via(name: str) -> str:
            return f"mqtt://127.0.0.1:{proxies[name].port}" if name in proxies else broker.url

        start = time.monotonic()
        with make_fleet(via("coordinator"), tmp_path, "drop", args,
                        ["--block-timeout", "20"]) as fleet:
            fleet.start_coordinator()
            for i in range(n):
                fleet.start_agent(i, n, extra=["--broker", via(f"agent{i}")])
            marks["cut"] = wait_for_version(fleet, tmp_path / "runs", 8, timeout=120)
            for name in ["coordinator", *cut]:
                assert host.drop(proxies[name], refuse_for=3.0) >= 1
            marks["again"] = wait_for_contributions(fleet, tmp_path / "runs", cut,
                                                    marks["cut"], 3, timeout=120)
            fleet.coordinator.send_signal(signal.SIGTERM)
            events = finish(fleet, 120, coordinator_code=130)
        acc = accounting(fleet, "drop", time.monotonic() - start)
    assert_nothing_lost(acc, fleet)
    for name in ["coordinator", *cut]:
        assert "disconnected" in fleet.log(name)  # the cut really happened
    print(f"cut at version {marks['cut']}, both agents contributing again by version "
          f"{marks['again']}; stopped at {events[-1]['version']}")
