"""Issue 14, "what it must show": one agent credential against a 16-agent run over the broker
as ansible/roles/broker provisions it (TLS, client certificates bound to the MQTT user, ACL).

The role is applied to this machine for pi01..pi16 with tests/test_broker_role.py's helpers
(supervisor mode; needs root). Two FedPMT runs on digits, same seed, same honest agents
pi01..pi15: a clean one, then one where pi16 runs every attack of the issue in turn
(bench/hostile_agent.py, via bench/malicious_agent.py --attack all). The round deadline is
fixed and generous, so every agent trains the whole model (the runs are deterministic, as
FedAvg) while hellos still go through FedPMT's profile check. Shown: both runs finish, the
final accuracies are within 1 pt, the broker process is the same before and after, and each
attack is counted under its own refusal reason: events.jsonl `rejected` for what reaches the
coordinator, the broker's PUBACK codes (0x87) for what the ACL stops, and the coordinator's
log for chunk sets it drops (its chunk counters are not in events.jsonl).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_broker_role import RUN, _client, _close, _identity, _retained, provisioned_broker
from test_fleet import _status

from fleetfl.coordinator.local_fleet import LocalFleet
from fleetfl.coordinator.rundir import RunDir

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BENCH = Path(__file__).resolve().parents[1] / "bench"
HONEST = tuple(f"pi{i:02d}" for i in range(1, 16))
HOSTILE = "pi16"
VERSIONS = 12
SEED = 7
ACL_REFUSED = 0x87  # MQTT v5 PUBACK "Not authorized"
ATTACK = re.compile(r"ATTACK (\w+) topic=(\S+) puback=0x([0-9a-f]{2})")
REJECTED = re.compile(r"rejected message from (\S+): (\w+): (.*)")
LEFT_OUT = re.compile(r"left (\S+)'s update out of version \d+: (\w+)")
CHUNK_DROP = re.compile(r"(?:dropped a chunked message|refused chunk) on (\S+) \((\w+)\)")


@pytest.fixture(scope="module")
def fleet_broker() -> Iterator[dict]:
    with provisioned_broker((*HONEST, HOSTILE)) as broker:
        yield broker


def _auth(broker: dict, host: str, user: str) -> list[str]:
    ident = _identity(broker, host)
    return ["--tls-ca", str(ident["ca"]), "--tls-cert", str(ident["cert"]),
            "--tls-key", str(ident["key"]), "--username", user,
            "--password-file", str(ident["password"])]


def _broker_process(broker: dict) -> tuple[int, int, int]:
    """(pid, start time in clock ticks since boot, restarts) of the provisioned Mosquitto."""
    state = _status(broker["root"], "server")[f"{broker['tag']}-mosquitto.service"]
    assert state["state"] == "running", state
    pid = state["main_pid"]
    # field 22 of /proc/PID/stat, counted after the command name (which may hold spaces)
    started = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])
    return pid, started, state.get("restarts", 0)


def _clear_retained(broker: dict) -> None:
    """Both runs use the run id the ACL is written for: the earlier run's retained model and
    statuses must not reach the next one (a stale hello would enrol an absent agent)."""
    got: set[str] = set()
    client = _client(broker, "server", "coordinator", "server")
    client.on_message = lambda c, u, m: got.add(m.topic) if m.retain and m.payload else None
    try:
        client.subscribe(f"fl/{RUN}/#", 1)
        time.sleep(1.5)
        for topic in sorted(got):
            client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
    finally:
        _close(client)


def _run(broker: dict, tmp: Path, hostile: bool) -> tuple[RunDir, dict[str, str]]:
    _clear_retained(broker)
    agents = len(HONEST) + hostile
    coordinator = ["--algo", "pmt", "--round-deadline", "60", "--dataset", "digits",
                   "--seed", str(SEED), "--max-versions", str(VERSIONS),
                   # the start barrier waits for everyone started, so window 1 has the same
                   # honest senders in both runs; a window waits for a slow attack step
                   "--min-agents", str(agents), "--window-timeout", "30",
                   "--run-dir", str(tmp / "runs"), *_auth(broker, "server", "coordinator")]
    with LocalFleet(f"mqtt://127.0.0.1:{broker['port']}", RUN, tmp / "logs",
                    coordinator) as fleet:
        fleet.env["PYTHONPATH"] = os.pathsep.join(
            [str(BENCH), *filter(None, [os.environ.get("PYTHONPATH")])])
        proc = fleet.start_coordinator()
        deadline = time.monotonic() + 120
        # agents start once this run's model is retained, not the one cleared above
        while "waiting for agents" not in fleet.log("coordinator"):
            assert proc.poll() is None and time.monotonic() < deadline, \
                fleet.log("coordinator")[-3000:]
            time.sleep(0.2)
        for index, agent in enumerate(HONEST):
            fleet.start_agent(index, len(HONEST), agent_id=agent,
                              extra=_auth(broker, agent, agent))
        if hostile:  # trains on pi01's shard; nothing it sends is averaged anyway
            fleet.start_agent(0, len(HONEST), agent_id=HOSTILE, module="malicious_agent",
                              extra=[*_auth(broker, HOSTILE, HOSTILE), "--attack", "all",
                                     "--victim", HONEST[0]])
        code = fleet.wait_coordinator(timeout=240)
        codes = fleet.wait_agents(timeout=60)
        logs = {name: fleet.log(name) for name in ["coordinator", *fleet.agents]}
    assert code == 0, logs["coordinator"][-4000:]
    assert set(codes.values()) == {0}, codes
    return RunDir(tmp / "runs" / RUN), logs


def _final(rundir: RunDir) -> tuple[dict, float]:
    events = rundir.events()
    assert events[-1]["version"] == VERSIONS
    # every version averaged all fifteen honest updates and nothing of pi16's
    assert all(sorted(e["contributors"]) == list(HONEST) for e in events), \
        [e["contributors"] for e in events]
    params, state = rundir.load_checkpoint()
    assert state["version"] == VERSIONS
    assert np.isfinite(params).all() and np.abs(params).max() < 100
    return events[-1], events[-1]["accuracy"]


def test_one_credential_cannot_break_a_16_agent_run_over_the_provisioned_broker(
        fleet_broker, tmp_path):
    started = time.monotonic()
    broker_before = _broker_process(fleet_broker)
    clean_dir, _ = _run(fleet_broker, tmp_path / "clean", hostile=False)
    attacked_dir, logs = _run(fleet_broker, tmp_path / "attacked", hostile=True)
    assert _broker_process(fleet_broker) == broker_before  # same process: never restarted

    clean_event, clean_accuracy = _final(clean_dir)
    last, accuracy = _final(attacked_dir)
    assert clean_event["rejected"] == {}
    assert abs(accuracy - clean_accuracy) <= 0.01, (clean_accuracy, accuracy)

    hostile, coordinator = logs[HOSTILE], logs["coordinator"]
    steps = re.findall(r"ATTACK (\w+) before window (\d+)", hostile)
    assert [s for s, _ in steps] == ["hello_samples", "bad_profile", "hello_flood",
                                     "impersonate", "acl_park", "retained_up", "chunk_split"]
    # what the ACL stops never reaches the coordinator: the broker's PUBACK is the count
    acked = [(step, topic, int(code, 16)) for step, topic, code in ATTACK.findall(hostile)]
    acl = Counter(step for step, _, code in acked if code == ACL_REFUSED)
    assert acl == {"impersonate": 2, "acl_park": 3}, acked
    assert all(code < 0x80 for step, _, code in acked if step not in acl), acked
    assert {t for s, t, c in acked if c == ACL_REFUSED and s == "impersonate"} == {
        f"fl/{RUN}/up/{HONEST[0]}", f"fl/{RUN}/status/{HONEST[0]}"}

    # what reaches it is refused by reason, all of it pi16's
    refused = [(sender, reason, detail) for sender, reason, detail
               in REJECTED.findall(coordinator)]
    assert {sender for sender, _, _ in refused} == {HOSTILE}, refused
    # one reason for both claims: a hello's above max_samples, an update's above its hello's
    hello_claims = [d for _, r, d in refused if r == "samples_claim" and d.startswith("hello")]
    update_claims = [d for _, r, d in refused if r == "samples_claim" and "declared" in d]
    rejected = last["rejected"]
    assert len(hello_claims) == 1 and update_claims, refused
    assert rejected["samples_claim"] >= 2, rejected  # the hello's and at least one update's
    assert rejected["bad_profile"] == 1, rejected
    assert rejected["hello_rate"] >= 30, rejected  # 40 hellos, a burst of 5 allowed
    assert rejected["sender_mismatch"] == 1, rejected
    assert rejected["parked_retained"] == 3, rejected
    assert rejected["out_of_bounds"] >= VERSIONS - 1, rejected  # 3e38, left out each window
    assert set(rejected) == {"samples_claim", "bad_profile", "hello_rate", "sender_mismatch",
                             "parked_retained", "out_of_bounds"}, rejected
    assert {s for s, _ in LEFT_OUT.findall(coordinator)} == {HOSTILE}
    assert "NOT publishing" not in coordinator and "NOT checkpointing" not in coordinator
    accounting = [json.loads(line) for line in
                  (attacked_dir.path / "accounting.jsonl").read_text().splitlines()]
    # accounting.jsonl keys an update by the sender it names: the forged one is pi01's there
    assert {(a["u"][0], a["r"]) for a in accounting if a.get("o") == "refused"} == {
        (HOSTILE, "samples_claim"), (HOSTILE, "out_of_bounds"), (HONEST[0], "sender_mismatch")}

    # incomplete chunk sets split over its two topics: dropped per sender, its own only
    drops = CHUNK_DROP.findall(coordinator)
    assert {topic.split("/")[3] for topic, _ in drops} == {HOSTILE}, drops
    assert {topic.split("/")[2] for topic, _ in drops} == {"up", "status"}, drops
    dropped = Counter(reason for _, reason in drops)
    assert dropped["evicted_memory"] >= 1 and dropped["evicted_per_sender"] >= 1, dropped
    # and nothing it parked is left in the broker
    assert not [t for t in _retained(fleet_broker) if f"/up/{HOSTILE}" in t]

    took = time.monotonic() - started
    print(f"\nhostile fleet: clean accuracy {clean_accuracy:.4f}, attacked {accuracy:.4f}; "
          f"rejected {rejected}; hello samples_claim {len(hello_claims)}, update "
          f"samples_claim {len(update_claims)} (whole run); ACL PUBACK 0x87 {dict(acl)}; "
          f"chunk sets dropped {dict(dropped)}; broker pid {broker_before[0]} unchanged; "
          f"{took:.0f} s for both runs")
