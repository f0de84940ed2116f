"""Prometheus metrics of the coordinator: unit checks, and a scrape of a live coordinator on a
real broker compared with its events.jsonl."""

from __future__ import annotations

import os
import signal
import socket
import time
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_integration import Mallory, events_of, make_fleet, wait_for_version

from fleetfl.coordinator.metrics import CoordinatorMetrics
from fleetfl.shared.config import ConfigError
from fleetfl.shared.core.messages import Kind, Message
from fleetfl.shared.devtools.local_broker import free_port
from fleetfl.shared.wire.codec import encode

DIGITS_MLP = 64 * 64 + 64 + 64 * 10 + 10


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return samples(resp.read().decode())


def total(metrics: dict, name: str, **labels: str) -> float:
    """Sum of a series over the labels not given."""
    return sum(v for (n, lab), v in metrics.items()
               if n == name and all((k, x) in lab for k, x in labels.items()))


def event(version: int, time_s: float, staleness: dict, accuracy: float | None) -> dict:
    return {"version": version, "time": time_s, "contributors": sorted(staleness),
            "staleness": staleness, "accuracy": accuracy, "loss": 0.5 if accuracy else None}


def test_record_and_messages_without_http():
    m = CoordinatorMetrics(lambda: 3, {"run": "r", "algo": "dga", "aggregate": "median"})
    m.record(event(1, 1.0, {"a": 0, "b": 1}, 0.5))
    m.record(event(2, 1.5, {"a": 2}, None))  # not evaluated: accuracy keeps its last value
    m.received(Kind.UPDATE, 100)
    m.received(Kind.HELLO, 10)
    m.refused("stale", 7)
    m.published(Kind.AVG, 40)
    from prometheus_client import generate_latest

    got = samples(generate_latest(m.registry).decode())
    assert total(got, "fleetfl_version") == 2
    assert total(got, "fleetfl_updates_averaged_total") == 3
    assert total(got, "fleetfl_updates_accepted_total") == 1
    assert total(got, "fleetfl_update_staleness_count") == 3
    assert total(got, "fleetfl_update_staleness_sum") == 3  # 0 + 1 + 2
    assert total(got, "fleetfl_update_staleness_bucket", le="0.0") == 1
    assert total(got, "fleetfl_round_seconds_count") == 1  # one gap: 1.0 -> 1.5
    assert total(got, "fleetfl_round_seconds_sum") == 0.5
    assert total(got, "fleetfl_eval_accuracy") == 0.5
    assert total(got, "fleetfl_agents_online") == 3
    assert total(got, "fleetfl_messages_rejected_total", reason="stale") == 1
    assert total(got, "fleetfl_bytes_total", direction="up") == 110  # accepted: by kind
    assert total(got, "fleetfl_bytes_rejected_total", reason="stale") == 7  # refused: by reason
    assert total(got, "fleetfl_bytes_total", direction="down", kind="avg") == 40
    assert total(got, "fleetfl_run_info", run="r", algo="dga", aggregate="median") == 1


def test_no_created_series_no_zero_before_evaluation_and_kinds_are_kinds():
    """Issue 20, item 6: counters exported a duplicate `_created` series; the evaluation
    gauges read 0.0 before the first evaluation (absent now); the bytes' `kind` label mixed
    message kinds with "rejected" (refused bytes are their own counter, by reason)."""
    from prometheus_client import generate_latest

    m = CoordinatorMetrics(lambda: 0, {"run": "r"})
    m.received(Kind.UPDATE, 100)
    m.refused("malformed", 5)
    m.refused("left_out", 0)  # accepted, then left out of an average: its bytes are in `up`
    m.record(event(1, 1.0, {"a": 0}, None))  # a version, not evaluated yet
    text = generate_latest(m.registry).decode()
    got = samples(text)
    assert "_created" not in text
    names = {name for name, _ in got}
    for name in ("fleetfl_eval_accuracy", "fleetfl_eval_loss", "fleetfl_federated_accuracy",
                 "fleetfl_federated_loss", "fleetfl_federated_samples"):
        assert name not in names and name not in text  # no HELP/TYPE either
    kinds = {dict(labels)["kind"] for name, labels in got if name == "fleetfl_bytes_total"}
    assert kinds == {str(Kind.UPDATE)}
    assert total(got, "fleetfl_bytes_rejected_total", reason="malformed") == 5
    assert total(got, "fleetfl_messages_rejected_total") == 2
    m.evaluated(0.25, 0.75)
    m.evaluated_federated(0.5, None, 30)  # a task without accuracy: only loss and samples
    got = samples(generate_latest(m.registry).decode())
    assert total(got, "fleetfl_eval_accuracy") == 0.75 and total(got, "fleetfl_eval_loss") == 0.25
    assert total(got, "fleetfl_federated_loss") == 0.5
    assert total(got, "fleetfl_federated_samples") == 30
    assert "fleetfl_federated_accuracy" not in {name for name, _ in got}


def test_per_agent_series_and_process_series(monkeypatch):
    """Issue 15, operators' view: a series per agent (online, last seen, base version,
    staleness, bytes, step time), bounded in number; the process's own series."""
    from prometheus_client import generate_latest

    import fleetfl.coordinator.metrics as metrics

    monkeypatch.setattr(metrics, "AGENT_SERIES_MAX", 2)
    roster = [("pi01", True), ("pi02", False)]
    m = CoordinatorMetrics(lambda: 1, {"run": "r"}, lambda: roster)
    m.received(Kind.HELLO, 50, "pi01")
    m.received(Kind.UPDATE, 100, "pi01", base_version=3, step_seconds=0.02)
    m.received(Kind.HELLO, 40, "pi02")
    for bogus in (float("nan"), float("inf"), 1e300, -1.0):  # a device's claim, not shown
        m.received(Kind.UPDATE, 0, "pi01", base_version=3, step_seconds=bogus)
    m.received(Kind.HELLO, 40, "pi03")  # past the bound: no series of its own
    m.record(event(4, 1.0, {"pi01": 1}, None))
    got = samples(generate_latest(m.registry).decode())
    agents = {dict(labels)["agent"] for name, labels in got if name.startswith("fleetfl_agent_")}
    assert agents == {"pi01", "pi02"}
    assert total(got, "fleetfl_agent_online", agent="pi01") == 1
    assert total(got, "fleetfl_agent_online", agent="pi02") == 0
    assert total(got, "fleetfl_agent_bytes_up_total", agent="pi01") == 150
    assert total(got, "fleetfl_agent_base_version", agent="pi01") == 3
    assert total(got, "fleetfl_agent_staleness", agent="pi01") == 1
    assert total(got, "fleetfl_agent_step_seconds", agent="pi01") == 0.02
    assert 0 <= total(got, "fleetfl_agent_last_seen_seconds", agent="pi02") < 60
    # nothing known yet is absent, not 0: pi02 sent no update
    assert ("fleetfl_agent_base_version", (("agent", "pi02"),)) not in got
    assert total(got, "process_resident_memory_bytes") > 10 * 2**20


def test_busy_port_is_a_config_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        m = CoordinatorMetrics(lambda: 0, {"run": "r"})
        with pytest.raises(ConfigError, match="metrics_port"):
            m.serve(busy.getsockname()[1], "127.0.0.1")
    m.close()  # nothing to close: no error


def wait_scrape(fleet, port: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert fleet.coordinator.poll() is None, fleet.log("coordinator")[-3000:]
        try:
            return scrape(port)
        except OSError:
            time.sleep(0.2)
    raise AssertionError("metrics endpoint never answered")


@pytest.mark.integration
def test_scraped_metrics_match_events(broker, tmp_path):
    run, port = "metrics", free_port()
    args = ["--algo", "fedavg", "--dataset", "digits", "--min-agents", "2",
            "--max-versions", "1000", "--local-steps", "10", "--metrics-port", str(port),
            "--aggregate", "median"]  # the flag end to end (median of 2 is their mean)

    def update(sender: str, run_id: str = run) -> bytes:
        return encode(Message(Kind.UPDATE, run_id, sender, 5, 0,
                              {"window": 1, "samples": 5, "steps": 1},
                              {"delta": np.zeros(DIGITS_MLP, np.float32)}))

    with make_fleet(broker, tmp_path, run, args) as fleet:
        fleet.start_coordinator()
        wait_scrape(fleet, port)  # serving: the coordinator is connected and subscribed
        m = Mallory(broker, run)
        m.send(m.topics.up("mallory"), b"\x93not msgpack at all")   # malformed
        m.send(m.topics.up("mallory"), b"")                        # empty: malformed too
        m.send(m.topics.up("mallory"), update("mallory", "otherrun"))  # other_run
        m.send(m.topics.up("mallory"), update("mallory"))          # unknown_agent
        m.close()
        deadline = time.monotonic() + 30
        while total(scrape(port), "fleetfl_messages_rejected_total") < 4:
            assert time.monotonic() < deadline, "rejections never counted"
            time.sleep(0.2)
        fleet.start_agents(2)
        wait_for_version(fleet, tmp_path / "runs", 3, timeout=120)
        for proc in fleet.agents.values():  # freeze the fleet: the numbers stop moving
            os.kill(proc.pid, signal.SIGSTOP)
        try:
            previous, deadline = None, time.monotonic() + 30
            while True:
                got, events = scrape(port), events_of(tmp_path / "runs", run)
                # what moves with the clock alone: the process's own series, ages
                got = {k: v for k, v in got.items() if not k[0].startswith(
                    ("process_", "fleetfl_agent_last_seen"))}
                if got == previous and total(got, "fleetfl_version") == events[-1]["version"]:
                    break
                assert time.monotonic() < deadline, "metrics never settled"
                previous = got
                time.sleep(0.5)
        finally:
            for proc in fleet.agents.values():
                os.kill(proc.pid, signal.SIGCONT)

    last = events[-1]
    averaged = sum(len(e["contributors"]) for e in events)
    assert total(got, "fleetfl_version") == last["version"] >= 3
    assert total(got, "fleetfl_run_info", run=run, algo="fedavg", aggregate="median") == 1
    assert total(got, "fleetfl_updates_averaged_total") == averaged
    # accepted also counts updates waiting in the open window (at most one per agent)
    assert averaged <= total(got, "fleetfl_updates_accepted_total") <= averaged + 2
    assert total(got, "fleetfl_update_staleness_count") == averaged
    assert total(got, "fleetfl_round_seconds_count") == len(events) - 1
    assert total(got, "fleetfl_eval_accuracy") == last["accuracy"]
    assert total(got, "fleetfl_agents_online") == last["agents_online"] == 2
    assert last["rejected"] == {"malformed": 2, "other_run": 1, "unknown_agent": 1}
    for reason, count in last["rejected"].items():
        assert total(got, "fleetfl_messages_rejected_total", reason=reason) == count
    assert total(got, "fleetfl_messages_rejected_total") == 4
    # senders that never said hello share one row: made-up ids cannot grow the ledger
    assert set(last["bytes_by_agent"]) == {"agent0", "agent1", "(unknown)"}
    # up (accepted, by kind) + rejected (by reason) is every received byte (later messages
    # only add); down: published once per message
    assert total(got, "fleetfl_bytes_total", direction="up") \
        + total(got, "fleetfl_bytes_rejected_total") >= last["bytes_up_total"]
    assert total(got, "fleetfl_bytes_rejected_total") == last["up_rejected"]
    assert "rejected" not in {dict(lab).get("kind") for n, lab in got if n == "fleetfl_bytes_total"}
    assert not any(n.endswith("_created") for n, _ in got)
    assert total(got, "fleetfl_bytes_total", direction="down", kind="avg") \
        == last["down_model"] / 2  # events count the average once per recipient (2 agents)
