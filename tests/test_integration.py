"""Coordinator and agents as separate processes against a real Mosquitto broker."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from fleetfl.coordinator.local_fleet import LocalFleet
from fleetfl.coordinator.rundir import PREVIOUS, RunDir
from fleetfl.shared.core.messages import Kind, Message
from fleetfl.shared.core.version import fleetfl_version
from fleetfl.shared.wire.codec import encode
from fleetfl.shared.wire.topics import Topics

pytestmark = pytest.mark.integration


def events_of(run_dir: Path, run: str) -> list[dict]:
    return RunDir(run_dir / run).events()


def wait_for_version(fleet: LocalFleet, run_dir: Path, version: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = events_of(run_dir, fleet.run)
        if events and events[-1]["version"] >= version:
            return events[-1]
        assert fleet.coordinator.poll() is None, fleet.log("coordinator")[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"version {version} not reached; coordinator log:\n"
                         + fleet.log("coordinator")[-3000:])


def finish(fleet: LocalFleet, timeout: float) -> list[dict]:
    try:
        code = fleet.wait_coordinator(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError("coordinator hung:\n" + fleet.log("coordinator")[-3000:]) from None
    assert code == 0, fleet.log("coordinator")[-3000:]
    agent_codes = fleet.wait_agents(timeout=30)
    assert all(c == 0 for c in agent_codes.values()), agent_codes
    return events_of(Path(fleet.log_dir).parent / "runs", fleet.run)


def make_fleet(broker, tmp_path: Path, run: str, coordinator_args: list[str],
               agent_args: list[str] | None = None, data_dir: str = "") -> LocalFleet:
    return LocalFleet(broker.url, run, tmp_path / "logs",
                      ["--run-dir", str(tmp_path / "runs"), *coordinator_args],
                      agent_args or [], data_dir=data_dir)


@pytest.mark.slow
@pytest.mark.parametrize("algo, extra", [
    ("fedavg", []), ("dga", []), ("drpga", ["--eval-every", "5"]), ("fda", []), ("lbgm", [])])
def test_mnist_dirichlet_four_agents_reach_97(broker, tmp_path, shared_data_dir, algo, extra):
    args = ["--algo", algo, "--dataset", "mnist", "--partition", "dirichlet", "--alpha", "0.5",
            "--min-agents", "4", "--target-accuracy", "0.97", "--max-versions", "300", *extra]
    with make_fleet(broker, tmp_path, f"mnist-{algo}", args,
                    data_dir=str(shared_data_dir)) as fleet:
        fleet.start_coordinator()
        fleet.start_agents(4)
        events = finish(fleet, timeout=600)
    accuracies = [e["accuracy"] for e in events if e["accuracy"] is not None]
    assert max(accuracies) >= 0.97
    assert accuracies[0] < 0.9 < accuracies[-1]  # it learned over the run, not at once
    assert all(len(e["contributors"]) >= 1 for e in events)
    last = events[-1]
    assert last["rejected"] == {} and last["up_model"] > 0 and last["down_model"] > 0
    per_version_up = last["up_model"] / last["version"]
    dense_update = 61706 * 4 * 4  # LeNet-5 deltas of 4 agents
    if algo == "drpga":  # about 10% of the coordinates travel each window
        assert per_version_up < 0.2 * dense_update
    if algo == "fda":  # local states are control traffic, and it is tiny next to the model
        assert 0 < last["up_control"] < 0.1 * last["up_model"]
    if algo in ("fedavg", "dga"):
        assert per_version_up > 0.99 * dense_update


def test_demo_on_digits_reaches_90(tmp_path):
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "fleetfl.coordinator.demo", "--run", "demo-test",
         "--run-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = RunDir(tmp_path / "demo-test").events()
    assert events[-1]["accuracy"] >= 0.90
    assert "final accuracy" in proc.stdout
    print(f"demo: {len(events)} versions, accuracy {events[-1]['accuracy']:.3f}, "
          f"{elapsed:.1f} s")


def test_late_joiner_starts_from_retained_model(broker, tmp_path):
    # rounds of 100 steps: the run lasts long enough for a joiner on a busy host
    args = ["--algo", "fedavg", "--dataset", "digits", "--min-agents", "2",
            "--max-versions", "80", "--local-steps", "100"]
    with make_fleet(broker, tmp_path, "late", args) as fleet:
        fleet.start_coordinator()
        fleet.start_agent(0, 3)
        fleet.start_agent(1, 3)
        joined_after = wait_for_version(fleet, tmp_path / "runs", 8, timeout=120)["version"]
        fleet.start_agent(2, 3)
        events = finish(fleet, timeout=300)
    log = fleet.log("agent2")
    joined = int(log.split("joined at version ")[1].split(",")[0])
    assert joined >= joined_after  # not from scratch: from the retained model
    later = [e for e in events if e["version"] > joined]
    assert any("agent2" in e["contributors"] for e in later)
    assert all("agent2" not in e["contributors"] for e in events if e["version"] <= joined)
    assert events[-1]["accuracy"] >= 0.85


def test_the_coordinator_logs_agents_going_online_and_offline(broker, tmp_path):
    """Issue 15: an operator reads in the log who came and who went (the last will)."""
    args = ["--algo", "fedavg", "--dataset", "digits", "--min-agents", "2"]
    with make_fleet(broker, tmp_path, "comego", args) as fleet:
        fleet.start_coordinator()
        deadline = time.monotonic() + 60
        while "waiting for agents" not in fleet.log("coordinator"):  # subscribed
            assert time.monotonic() < deadline, fleet.log("coordinator")[-2000:]
            time.sleep(0.2)
        m = Mallory(broker, "comego")
        try:
            hello = Message(Kind.HELLO, "comego", "pi07", 1, 0,
                            {"samples": 10, "first_window": 1,
                             "capabilities": {"fleetfl": "9.9.9"}})
            m.send(m.topics.status("pi07"), encode(hello))
            m.send(m.topics.status("pi07"), encode(Message(Kind.OFFLINE, "comego", "pi07", 2, 0)))
            deadline = time.monotonic() + 30
            while "agent pi07 offline" not in fleet.log("coordinator"):
                assert time.monotonic() < deadline, fleet.log("coordinator")[-2000:]
                time.sleep(0.2)
        finally:
            m.close()
    log = fleet.log("coordinator")
    assert "agent pi07 online (10 samples, from window 1, fleetfl 9.9.9)" in log
    assert log.index("agent pi07 online") < log.index("agent pi07 offline")


def test_broker_restart_mid_run_does_not_stop_the_run(broker, tmp_path):
    args = ["--algo", "dga", "--dataset", "digits", "--min-agents", "3", "--max-versions",
            "30", "--window-timeout", "5"]
    with make_fleet(broker, tmp_path, "restart", args, ["--block-timeout", "10"]) as fleet:
        fleet.start_coordinator()
        fleet.start_agents(3)
        before = wait_for_version(fleet, tmp_path / "runs", 5, timeout=120)["version"]
        broker.restart()
        events = finish(fleet, timeout=300)
    assert before < 30 and events[-1]["version"] == 30
    assert "disconnected" in fleet.log("coordinator")  # the restart really happened
    assert events[-1]["accuracy"] >= 0.85


class Mallory:
    """A hostile client on the real broker: publishes raw payloads on agent topics."""

    def __init__(self, broker, run: str) -> None:
        self.topics = Topics(run)
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id="mallory", protocol=mqtt.MQTTv5)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def send(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_bad_input_is_rejected_with_reasons_and_the_run_goes_on(broker, tmp_path):
    run = "hostile"
    config = tmp_path / "run.yaml"
    config.write_text("max_message_bytes: 200000\nwindow_timeout: 3\n"
                      "job:\n  algo: fedavg\n  dataset: digits\n")
    args = ["--config", str(config), "--min-agents", "2", "--max-versions", "25"]
    d = 64 * 64 + 64 + 64 * 10 + 10  # the digits MLP

    def update(sender="mallory", seq=10, base=0, window=1, delta=None, **env):
        msg = Message(Kind.UPDATE, env.get("run", run), sender, seq, base,
                      {"window": window, "samples": 5, "steps": 1},
                      {"delta": np.zeros(d, np.float32) if delta is None else delta})
        return encode(msg)

    with make_fleet(broker, tmp_path, run, args) as fleet:
        fleet.start_coordinator()
        fleet.start_agents(2)
        wait_for_version(fleet, tmp_path / "runs", 2, timeout=120)
        m = Mallory(broker, run)
        up = m.topics.up("mallory")
        good = update(seq=10)
        bad_proto = bytearray(good)
        bad_proto[bad_proto.index(b"proto") + 5] = 9  # positive fixint 9
        m.send(up, good[:-40])                                  # truncated array
        m.send(up, good[:25])                                   # truncated msgpack header
        m.send(up, bytes(bad_proto))                            # wrong protocol version
        m.send(up, good.replace(b"update", b"gradnt"))          # unknown kind
        m.send(up, update(run="otherrun"))                      # other run id
        m.send(up, update(delta=np.zeros(d + 1, np.float32)))   # shape vs layer table
        m.send(up, good.replace(b"<f4", b"<f8"))                # wrong dtype
        m.send(up, update(delta=np.full(d, np.nan, np.float32)))  # NaN
        m.send(up, b"\x00" * 300_000)                           # oversized
        m.send(up, update())                                    # unknown agent (no hello)
        m.send(m.topics.up("agent0"), update())                 # writing as someone else
        hello = Message(Kind.HELLO, run, "mallory", 11, 0, {"samples": 5, "first_window": 1})
        m.send(m.topics.status("mallory"), encode(hello), retain=True)
        time.sleep(1.0)
        m.send(up, update(seq=12, base=0))                      # stale (version is >= 2)
        m.send(up, update(seq=11, base=2))                      # replayed seq
        metrics = {"version": 1, "samples": 5, "values": {"loss": 0.1, "accuracy": 1.0}}
        m.send(up, encode(Message(Kind.HELLO, run, "mallory", 14, 0,
                                  {"samples": 5, "first_window": 1})))  # hello on up/
        m.send(m.topics.status("mallory"),
               encode(Message(Kind.METRICS, run, "mallory", 15, 0, metrics)))  # on status/
        m.send(up, encode(Message(Kind.METRICS, run, "mallory", 16, 0, metrics)))  # unasked
        m.send(m.topics.status("mallory"),
               encode(Message(Kind.OFFLINE, run, "mallory", 17, 0)), retain=True)
        m.close()
        events = finish(fleet, timeout=300)
    rejected = events[-1]["rejected"]
    for reason in ("truncated", "malformed", "bad_protocol", "unknown_kind", "other_run",
                   "bad_shape", "bad_dtype", "not_finite", "oversized", "unknown_agent",
                   "sender_mismatch", "stale", "replayed", "wrong_topic", "unasked_metrics"):
        assert rejected.get(reason, 0) >= 1, (reason, rejected)
    assert events[-1]["version"] == 25  # kept running to the end
    log = fleet.log("coordinator")
    assert "rejected message from mallory: stale" in log
    assert "Traceback" not in log


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("argv, message", [
    (["fleetfl.coordinator.cli", "--algo", "sgd"], "invalid choice"),
    (["fleetfl.coordinator.cli", "--lr", "-1"], "lr must be > 0"),
    (["fleetfl.coordinator.cli", "--config", "/nonexistent.yaml"], "cannot read config"),
    (["fleetfl.coordinator.cli", "--dataset", "mnist", "--data-dir", "/nonexistent"],
     "/nonexistent"),
    (["fleetfl.agent.cli", "--shard", "0/4"], "agent_id"),
    (["fleetfl.agent.cli", "--agent-id", "a", "--shard", "5/4"], "shard '5/4'"),
    (["fleetfl.agent.cli", "--agent-id", "a", "--partition", "3/16"], "--shard"),
])
def test_bad_config_is_a_clear_error(argv, message):
    proc = run_cli(*argv)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_bad_yaml_key_is_a_clear_error(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("job:\n  learning_rate: 0.1\n")
    proc = run_cli("fleetfl.coordinator.cli", "--config", str(cfg))
    assert proc.returncode == 2 and "unknown key 'job.learning_rate'" in proc.stderr


@pytest.mark.parametrize("module", ["fleetfl.coordinator.cli", "fleetfl.agent.cli"])
def test_unreachable_broker_is_a_clear_error(module, tmp_path):
    from fleetfl.shared.devtools.local_broker import free_port

    args = ["--broker", f"mqtt://127.0.0.1:{free_port()}", "--run-dir", str(tmp_path)] \
        if "coordinator" in module else \
        ["--broker", f"mqtt://127.0.0.1:{free_port()}", "--agent-id", "a1",
         "--connect-timeout", "3"]
    proc = run_cli(module, *args)
    assert proc.returncode == 2
    assert "cannot reach the MQTT broker" in proc.stderr and "Traceback" not in proc.stderr


def checkpointed_version(rundir: RunDir) -> int:
    """The version a resume would start from: the checkpoint, or between the two renames of
    a save (write_atomic) the previous one; -1 before the first."""
    ckpt = rundir.load_checkpoint() or rundir.load_checkpoint(PREVIOUS)
    return ckpt[1]["version"] if ckpt is not None else -1


@pytest.mark.integration
def test_an_agent_started_before_its_broker_waits_for_it_and_joins(tmp_path):
    """Issue 15: a Pi that boots before the server retries its first connection (backing
    off) instead of exiting into the unit's start limit."""
    from fleetfl.shared.devtools.local_broker import LocalMosquitto, free_port

    port = free_port()
    log_path = tmp_path / "agent.log"
    with open(log_path, "w") as log_file:
        agent = subprocess.Popen(
            [sys.executable, "-m", "fleetfl.agent.cli", "--broker", f"mqtt://127.0.0.1:{port}",
             "--agent-id", "early", "--run", "late"], stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90  # torch's import is slow on a loaded host
        while "retrying every 1 s" not in log_path.read_text():  # backed off once, still on
            assert agent.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        assert "connection refused" in log_path.read_text()
        with LocalMosquitto(port=port):
            deadline = time.monotonic() + 60
            while "waiting for the model" not in log_path.read_text():
                assert time.monotonic() < deadline, log_path.read_text()[-2000:]
                time.sleep(0.2)
    finally:
        agent.terminate()
        agent.wait(timeout=30)


def test_coordinator_killed_and_resumed_continues_from_checkpoint(broker, tmp_path):
    args = ["--algo", "fedavg", "--dataset", "digits", "--min-agents", "2",
            "--max-versions", "60", "--window-timeout", "5"]
    with make_fleet(broker, tmp_path, "resume", args, ["--block-timeout", "5"]) as fleet:
        fleet.start_coordinator()
        fleet.start_agents(2)
        killed_at = wait_for_version(fleet, tmp_path / "runs", 10, timeout=120)["version"]
        # a version's event line is written just before its checkpoint: kill after both
        rundir = RunDir(tmp_path / "runs" / "resume")
        deadline = time.monotonic() + 30
        while checkpointed_version(rundir) < killed_at and time.monotonic() < deadline:
            time.sleep(0.01)
        fleet.coordinator.kill()
        fleet.coordinator.wait()
        checkpointed = checkpointed_version(RunDir(tmp_path / "runs" / "resume"))
        fleet.start_coordinator(extra=["--resume"])
        events = finish(fleet, timeout=300)
    versions = [e["version"] for e in events]
    assert killed_at <= checkpointed < 60 and versions[-1] == 60
    # the resumed coordinator went on from the checkpoint: no version published twice
    assert versions == sorted(set(versions)) and versions[0] == 1
    assert f"resumed at version {checkpointed}" in fleet.log("coordinator")
    assert events[-1]["accuracy"] >= 0.85
    # issue 15: each agent's build, as its hello says, in the coordinator's log
    for agent in ("agent0", "agent1"):
        assert re.search(rf"agent {agent} online \(.*, fleetfl {re.escape(fleetfl_version())}\)",
                         fleet.log("coordinator")), fleet.log("coordinator")[-2000:]


@pytest.mark.slow
def test_fedpmt_with_stragglers_reaches_97(broker, tmp_path, shared_data_dir):
    """6 agents, 3 of them 4x slower: the slow ones train only trailing layers in time."""
    args = ["--algo", "pmt", "--dataset", "mnist", "--partition", "dirichlet", "--alpha", "0.5",
            "--min-agents", "6", "--target-accuracy", "0.97", "--max-versions", "300",
            "--deadline-rank", "3", "--deadline-factor", "1.5", "--eval-every", "2"]
    with make_fleet(broker, tmp_path, "pmt", args, data_dir=str(shared_data_dir)) as fleet:
        fleet.start_coordinator()
        for i in range(6):
            fleet.agent_args = ["--slowdown", "4"] if i >= 3 else []
            fleet.start_agent(i, 6)
        events = finish(fleet, timeout=900)
    assert max(e["accuracy"] or 0 for e in events) >= 0.97
    slow = {"agent3", "agent4", "agent5"}
    partial = [e for e in events if any(0 < e["assignments"].get(a, 0) for a in slow)]
    assert partial, "the slow agents were never given a partial model"
    # the slow agents' partial updates made it into averages
    assert any(slow & set(e["contributors"]) for e in partial)
