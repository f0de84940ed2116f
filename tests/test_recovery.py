"""Issue 15, items 4 and 5: a rack that recovers unattended.

- The start barrier names whom it waits for, and `start_timeout` lets the run go ahead with a
  quorum (state machine, coordinator shell, and a real coordinator on a real broker).
- STATUS= stays current (coordinator and agent), checked on a fake $NOTIFY_SOCKET.
- Sequence numbers keep growing when the clock steps back (a persisted counter).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from fleet_helpers import hello
from test_integration import finish, make_fleet, wait_for_version

from fleetfl.agent.sequence import BLOCK, SeqCounter, open_counter
from fleetfl.coordinator.runner import CoordinatorRunner
from fleetfl.shared.config import ConfigError, load_agent_config, load_config
from fleetfl.shared.core.averaging import WindowAveraging
from fleetfl.shared.core.base import Rejected
from fleetfl.shared.core.messages import Kind, Message
from fleetfl.shared.net.transport import Incoming
from fleetfl.shared.wire.codec import encode
from fleetfl.shared.wire.signing import Signer, keygen_main
from fleetfl.shared.wire.topics import Topics

D = 64 * 64 + 64 + 64 * 10 + 10  # the digits MLP
HOUR_NS = 3600 * 10**9


def update(agent: str, seq: int, window: int = 1, size: int = 3) -> Message:
    return Message(Kind.UPDATE, "r", agent, seq, 0, {"window": window, "samples": 1, "steps": 1},
                   {"delta": np.zeros(size, np.float32)})


class Notifications:
    """A fake $NOTIFY_SOCKET (abstract namespace: no path length limit), read on a thread:
    a full datagram queue (net.unix.max_dgram_qlen, 10 here) would block the sender."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        name = f"fleetfl-recovery-{os.getpid()}-{time.monotonic_ns()}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + name)
        self.sock.settimeout(0.2)
        self.got: list[str] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)

    def _read(self) -> None:
        while not self.done.is_set():
            try:
                self.got.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue

    def statuses(self) -> list[str]:
        """Every STATUS= sent so far: the reader stops, then what it had not read yet is
        drained (the last datagram may still sit in the socket's queue)."""
        self.done.set()
        self.thread.join(timeout=5)
        self.sock.setblocking(False)
        while True:
            try:
                self.got.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                break
        return [line[len("STATUS="):] for d in list(self.got) for line in d.splitlines()
                if line.startswith("STATUS=")]

    def close(self) -> None:
        self.done.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def notify(monkeypatch):
    n = Notifications(monkeypatch)
    yield n
    n.close()


# -- the start barrier in the state machine ---------------------------------------------------
def test_start_timeout_lifts_the_barrier_only_with_a_quorum():
    """min_agents 4, start_timeout 60 s from the first hello, quorum a majority (3): two
    updates in at 60 s are too few, the third lets version 1 go ahead at once."""
    c = WindowAveraging(params=np.zeros(3, np.float32), run="r", job={}, min_agents=4,
                        start_timeout=60.0, window_timeout=5.0)
    for t, agent in enumerate("ABC"):
        c.on_message(hello("r", agent, 1), 10.0 + t)
    assert (c.quorum, c.barrier_lifts_at()) == (3, 70.0)
    c.on_message(update("A", 2), 20.0)
    c.on_message(update("B", 2), 21.0)
    assert c.on_tick(69.9) == [] and c.on_tick(70.0) == [] and c.on_tick(1000.0) == []
    assert c.version == 0 and c.barrier_count() == 2
    assert len(c.on_message(update("C", 2), 1001.0)) == 2  # AVG and MODEL
    assert (c.version, c.results[-1].contributors) == (1, ["A", "B", "C"])
    assert c.barrier_count() is None


def test_a_lifted_barrier_still_gives_online_agents_the_window_timeout():
    """start_quorum 1: at 60 s the first window becomes an ordinary one, so an agent online
    without an update yet still has window_timeout from the window's first update."""
    c = WindowAveraging(params=np.zeros(3, np.float32), run="r", job={}, min_agents=3,
                        start_timeout=60.0, start_quorum=1, window_timeout=30.0)
    c.on_message(hello("r", "A", 1), 0.0)
    c.on_message(hello("r", "B", 1), 0.0)
    c.on_message(update("A", 2), 50.0)
    assert c.on_tick(60.0) == [] and c.on_tick(79.9) == []  # B is online: 30 s from 50 s
    assert len(c.on_tick(80.0)) == 2
    result = c.results[-1]
    assert (result.contributors, result.missing, result.timed_out) == (["A"], ["B"], True)


def test_without_start_timeout_the_barrier_waits_however_long():
    c = WindowAveraging(params=np.zeros(3, np.float32), run="r", job={}, min_agents=2)
    c.on_message(hello("r", "A", 1), 0.0)
    c.on_message(update("A", 2), 1.0)
    assert c.barrier_lifts_at() is None and c.on_tick(10**9) == [] and c.version == 0


def test_a_journal_replay_lifts_the_barrier_at_the_same_point():
    """The barrier's clock starts at a hello, an input the journal keeps, and a close on the
    clock is journaled as a tick: a resumed coordinator's replay makes the same version 1."""
    def core() -> WindowAveraging:
        return WindowAveraging(params=np.zeros(3, np.float32), run="r", job={}, min_agents=3,
                               start_timeout=60.0, window_timeout=5.0)

    live, journal = core(), []
    for msg, t in ((hello("r", "A", 1), 7.0), (hello("r", "B", 1), 8.0),
                   (update("A", 2), 9.0), (update("B", 2), 10.0)):
        live.on_message(msg, t)
        journal.append((msg, t))
    for t in (30.0, 66.9, 67.0):  # unjournaled ticks change nothing; 67 = first hello + 60
        if live.on_tick(t):
            journal.append((None, t))
    assert live.version == 1 and journal[-1] == (None, 67.0)
    replayed = core()
    for msg, t in journal:
        replayed.on_message(msg, t) if msg is not None else replayed.on_tick(t)
    assert (replayed.version, replayed.results[-1].contributors) == (1, ["A", "B"])
    np.testing.assert_array_equal(replayed.params, live.params)


@pytest.mark.parametrize("overrides, message", [
    ({"start_timeout": -1.0}, "start_timeout must be >= 0"),
    ({"min_agents": 3, "start_quorum": 4}, "start_quorum must be in 0..min_agents"),
    ({"start_quorum": -1}, "start_quorum must be in 0..min_agents")])
def test_config_refuses_bad_barrier_settings(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


# -- the coordinator shell: who is missing, said in the log and in STATUS= ---------------------
def test_the_barrier_names_missing_agents_then_start_timeout_starts_the_run(
        tmp_path, caplog, notify):
    """agent_keys lists pi01..pi03; pi03 never comes. Half a minute in, the log names pi02
    (online, no update yet) and pi03 (never said hello); start_timeout later the run starts
    with pi01 and pi02, said as a warning. The clock is the state machine's, moved forward."""
    keys, run = tmp_path / "keys", "barrier"
    listing = keys / "agents.yaml"
    for name in ("pi01", "pi02", "pi03"):
        assert keygen_main([name, "--dir", str(keys), "--key-list", str(listing)]) == 0
    cfg = load_config(None, {"run": run, "run_dir": str(tmp_path / "runs"), "task": "digits",
                             "algo": "fedavg", "min_agents": 3, "start_timeout": 600.0,
                             "window_timeout": 5.0, "agent_keys": str(listing),
                             "broker": "mqtt://127.0.0.1:1"})  # never connected
    runner = CoordinatorRunner(cfg)
    runner.journal.open(0)
    runner.link.publish = lambda topic, payload, retain=False: None
    topics = Topics(run)

    def send(msg: Message) -> None:  # as the broker delivers it
        topic, retain = topics.for_outgoing(msg)
        runner._handle(Incoming(topic, encode(msg, Signer.from_file(keys / f"{msg.sender}.key")),
                                retain))

    def barrier_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if "start barrier" in r.getMessage()]

    caplog.set_level(logging.INFO, logger="fleetfl.coordinator")
    try:
        for agent in ("pi01", "pi02"):
            send(Message(Kind.HELLO, run, agent, 1, 0, {"samples": 10, "first_window": 1}))
        send(Message(Kind.UPDATE, run, "pi01", 2, 0, {"window": 1, "samples": 10, "steps": 1},
                     {"delta": np.zeros(D, np.float32)}))
        runner._serve_once()  # the view's first look: the 30 s count from here
        runner.clock_offset += 29.0
        runner._serve_once()
        assert barrier_lines() == []
        runner.clock_offset += 2.0
        runner._serve_once()
        [line] = barrier_lines()
        assert "1 of min_agents 3 in, 2 online (pi01, pi02)" in line
        assert "pi02 (online, no update yet)" in line and "pi03 (never said hello)" in line
        assert re.search(r"goes ahead in 56\d s with at least 2 in", line), line
        send(Message(Kind.UPDATE, run, "pi02", 2, 0, {"window": 1, "samples": 10, "steps": 1},
                     {"delta": np.zeros(D, np.float32)}))
        runner.clock_offset += 1.5  # STATUS= and the roster are looked at once a second
        runner._serve_once()
        assert runner.core.version == 0  # 2 in, but start_timeout has not passed
        runner.clock_offset += 600.0
        runner._serve_once()
        assert runner.core.version == 1
        started = barrier_lines()[-1]
        assert "STARTS SHORT-HANDED with 2 of min_agents 3 (pi01, pi02); without pi03" in started
        assert [r.levelname for r in caplog.records if r.getMessage() == started] == ["WARNING"]
        event = runner.rundir.events()[-1]
        assert (event["version"], event["contributors"]) == (1, ["pi01", "pi02"])
        assert runner.evaluator.wait_idle(120)
        runner._collect_evaluations()
        runner.clock_offset += 2.0
        runner._serve_once()
    finally:
        runner.evaluator.close()
        runner.journal.close()
    statuses = notify.statuses()
    assert "waiting for agents: 1 of min_agents 3 in, 2 online" in statuses
    assert "waiting for agents: 2 of min_agents 3 in, 2 online" in statuses
    assert "version 1, 2 agents online" in statuses
    assert any(re.fullmatch(r"version 1, 2 agents online, accuracy 0\.\d{4}", s)
               for s in statuses), statuses


# -- a real coordinator, a real agent, a real broker --------------------------------------------
@pytest.mark.integration
def test_a_real_run_goes_ahead_short_handed_after_start_timeout(broker, tmp_path, notify):
    """min_agents 3, start_timeout 4 s: a real agent and a fake one (b) send updates, a third
    (c) says hello and nothing more. Version 1 goes ahead with the two, the coordinator says
    it loudly naming c, and both processes keep STATUS= current on the (fake) notify socket."""
    run = "barrier-e2e"
    args = ["--algo", "fedavg", "--task", "digits", "--local-steps", "5", "--min-agents", "3",
            "--start-timeout", "4", "--window-timeout", "2", "--max-versions", "2"]
    state = tmp_path / "state"
    with make_fleet(broker, tmp_path, run, args, ["--state-dir", str(state)]) as fleet:
        fleet.start_coordinator()
        deadline = time.monotonic() + 120
        while "waiting for agents" not in fleet.log("coordinator"):
            assert time.monotonic() < deadline and fleet.coordinator.poll() is None, \
                fleet.log("coordinator")[-3000:]
            time.sleep(0.2)
        fake = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                           client_id="fake-agents", protocol=mqtt.MQTTv5)
        fake.connect(broker.host, broker.port)
        fake.loop_start()
        topics, seq = Topics(run), time.time_ns() // 1000
        try:
            for msg in (Message(Kind.HELLO, run, "b", seq, 0, {"samples": 10, "first_window": 1}),
                        Message(Kind.HELLO, run, "c", seq, 0, {"samples": 10, "first_window": 1}),
                        Message(Kind.UPDATE, run, "b", seq + 1, 0,
                                {"window": 1, "samples": 10, "steps": 5},
                                {"delta": np.zeros(D, np.float32)})):
                topic, retain = topics.for_outgoing(msg)
                fake.publish(topic, encode(msg), qos=1, retain=retain).wait_for_publish(10)
            hello_at = time.monotonic()
            fleet.start_agent(0, 2)
            first = wait_for_version(fleet, tmp_path / "runs", 1, timeout=300)
            first_s = time.monotonic() - hello_at
            events = finish(fleet, timeout=120)
        finally:
            fake.disconnect()
            fake.loop_stop()
    log = fleet.log("coordinator")
    assert (first["contributors"], first["missing"]) == (["agent0", "b"], ["c"])
    assert "STARTS SHORT-HANDED with 2 of min_agents 3 (agent0, b); without c" in log
    assert [e["version"] for e in events] == [1, 2]
    statuses = notify.statuses()
    assert any(s.startswith("run barrier-e2e on mqtt://") for s in statuses), statuses
    assert any(s.startswith("waiting for agents: ") for s in statuses), statuses
    assert any(re.match(r"version [12], 3 agents online", s) for s in statuses), statuses
    assert "joined at version 0, first window 1" in statuses  # the agent's
    assert any(s.startswith("version 1, training window 2, ") for s in statuses), statuses
    # the agent's counter file: above every seq it used (its log names its updates' seqs)
    used = [int(s) for s in re.findall(r"update sent agent=agent0 seq=(\d+)",
                                       fleet.log("agent0"))]
    assert used and int((state / "agent0.seq").read_text()) > max(used)
    print(f"\nstart barrier: version 1 {first_s:.1f} s after the first hello (start_timeout "
          f"4 s; the real agent's start-up included)")


# -- sequence numbers and the clock -----------------------------------------------------------
def _agent_seqs(cfg, n: int) -> list[int]:
    """One agent lifetime: its will (stamped at start) and n messages, never connected."""
    from fleetfl.agent.runner import AgentRunner

    agent = AgentRunner(cfg)
    first = agent.seq
    return [first] + [agent._stamp(Message(Kind.METRICS, cfg.run, cfg.agent_id, 0, 0)).seq
                      for _ in range(n)]


def test_sequence_numbers_grow_when_the_clock_steps_back(tmp_path, monkeypatch):
    """Two lifetimes of pi01, the clock stepped back an hour in between (NTP correcting a Pi
    that booted with a clock ahead): the second's numbers are all above the first's, and the
    coordinator takes its hello and update. Wall-clock numbers would be refused as replays."""
    cfg = load_agent_config(None, {"run": "r", "agent_id": "pi01",
                                   "state_dir": str(tmp_path / "state")})
    before = _agent_seqs(cfg, 5)
    assert before == sorted(set(before))
    real_ns, real_s = time.time_ns, time.time
    monkeypatch.setattr(time, "time_ns", lambda: real_ns() - HOUR_NS)
    monkeypatch.setattr(time, "time", lambda: real_s() - 3600.0)
    after = _agent_seqs(cfg, 5)
    assert min(after) > max(before) and after == sorted(set(after))
    core = WindowAveraging(params=np.zeros(3, np.float32), run="r", job={}, min_agents=2)
    core.on_message(hello("r", "pi01", 1, seq=before[-1]), 0.0)
    core.on_message(hello("r", "pi01", 1, seq=after[1]), 1.0)
    core.on_message(update("pi01", after[2]), 2.0)
    assert "pi01" in core.pending[1]
    with pytest.raises(Rejected, match="replayed"):  # what the wall clock alone would send
        core.on_message(hello("r", "pi01", 1, seq=time.time_ns() // 1000), 3.0)


def test_the_counter_reserves_blocks_durably_and_survives_a_crash(tmp_path, monkeypatch):
    path = tmp_path / "pi01.seq"
    writes = []
    real_replace = os.replace

    def replace(src, dst) -> None:
        writes.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    counter = SeqCounter(path, block=3)
    seqs = []
    for _ in range(7):
        seqs.append(counter.next())
        assert int(path.read_text()) > seqs[-1]  # on disk before it is used
    assert len(writes) == 3  # at start, then at the 4th and the 7th number
    assert not list(tmp_path.glob(".*.tmp"))
    # killed here (no clean close), clock an hour back: the next lifetime goes on above
    monkeypatch.setattr(time, "time_ns", lambda: seqs[0] * 1000 - HOUR_NS)
    assert SeqCounter(path, block=3).next() > seqs[-1]
    assert SeqCounter(path).next() > seqs[-1] and BLOCK == 1000


def test_an_unusable_counter_file_or_folder(tmp_path, monkeypatch, caplog):
    """A damaged file is ignored (the clock decides, as before); a state_dir that was asked
    for and cannot be used stops the agent; the default folder only warns."""
    (tmp_path / "pi01.seq").write_text("garbage")
    now = time.time_ns() // 1000
    assert SeqCounter(tmp_path / "pi01.seq").next() >= now
    assert "not a number" in caplog.text
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = load_agent_config(None, {"agent_id": "pi01", "state_dir": str(blocker / "sub")})
    with pytest.raises(ConfigError, match="state_dir"):
        open_counter(cfg)
    monkeypatch.setenv("STATE_DIRECTORY", str(blocker / "sub"))
    counter = open_counter(load_agent_config(None, {"agent_id": "pi01"}))
    assert counter.path is None and counter.next() >= now
    assert "wall clock only" in caplog.text
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    assert open_counter(load_agent_config(None, {"agent_id": "pi01"})).path == \
        tmp_path / "a" / "pi01.seq"


def test_a_device_booted_in_the_past_joins_once_its_clock_is_synced(tmp_path, monkeypatch):
    """Issue 15 item 5: a Pi without a real-time clock boots two years in the past. Signed
    messages still carry a time, so until its clock is synced it refuses the coordinator's
    (stamped "in the future") and the coordinator refuses its own (too old: a replay would
    look the same). Once synced it is read and heard with no one's help, its sequence
    numbers from the persisted counter above all it used before; a captured message of its
    past stays refused."""
    from fleetfl.shared.wire.codec import CodecError, DecodeContext, decode, device_context
    from fleetfl.shared.wire.signing import KeyRing, write_key_pair

    pi07 = Signer.from_file(write_key_pair("pi07", tmp_path)[0])
    coordinator = Signer.from_file(write_key_pair("coordinator", tmp_path)[0])
    agents = KeyRing({"pi07": pi07.public_key})
    on_device = device_context("r", keys=KeyRing.coordinator(tmp_path / "coordinator.pub"))
    at_coordinator = DecodeContext("r", keys=agents)
    real = time.time
    stop = encode(Message(Kind.STOP, "r", "coordinator", 0, 0, {"reason": "test"}),
                  coordinator)
    counter = SeqCounter(tmp_path / "pi07.seq")
    booted = real() - 2 * 365 * 86400

    monkeypatch.setattr(time, "time", lambda: booted)  # the device's clock, before NTP
    monkeypatch.setattr(time, "time_ns", lambda: int(booted * 1e9))
    with pytest.raises(CodecError) as refused:
        decode(stop, on_device)
    assert refused.value.reason == "from_future"
    early = encode(hello("r", "pi07", 10, seq=counter.next()), pi07)  # stamped 2 years ago
    monkeypatch.setattr(time, "time", real)  # the coordinator's clock
    with pytest.raises(CodecError) as refused:
        decode(early, at_coordinator)
    assert refused.value.reason == "too_old"

    monkeypatch.undo()  # NTP has stepped the device's clock: nothing else changes
    assert decode(stop, on_device).kind is Kind.STOP
    synced = hello("r", "pi07", 10, seq=counter.next())
    assert synced.seq > decode(early, DecodeContext("r")).seq  # the counter never goes back
    core = WindowAveraging(params=np.zeros(3, np.float32), run="r", job={}, min_agents=1)
    core.on_message(decode(encode(synced, pi07), at_coordinator), 0.0)
    assert core.agents["pi07"].online
    with pytest.raises(CodecError, match="too_old"):  # its past, replayed, stays refused
        decode(early, at_coordinator)
