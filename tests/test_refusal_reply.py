"""Refusals sent back (issue 18, PROTOCOL.md section 18): a message the coordinator refuses is
answered on the sender's fl/<run>/status/<id>/refusal topic with its reason and seq, at a
bounded rate, and the Python agent logs the answer."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from fleetfl.agent.runner import AgentRunner
from fleetfl.coordinator.local_fleet import LocalFleet
from fleetfl.coordinator.runner import REPLY_BURST, RefusalReplies
from fleetfl.shared.config import load_agent_config
from fleetfl.shared.core.messages import Kind, Message


def test_the_rate_limit_holds_back_and_counts():
    replies = RefusalReplies(burst=2, interval=10.0, rate_all=100.0)
    assert [replies.allow("a", 0.0) for _ in range(4)] == [0, 0, None, None]
    assert replies.allow("b", 0.0) == 0  # per agent: another agent has its own bucket
    assert replies.allow("a", 10.0) == 2  # one token back after 10 s; two were held back
    assert replies.allow("a", 10.0) is None
    everyone = RefusalReplies(burst=5, interval=1.0, rate_all=3.0)
    assert [everyone.allow(f"x{i}", 0.0) for i in range(5)] == [0, 0, 0, None, None]
    small = RefusalReplies(max_agents=2)
    for agent in ("a", "b", "c"):
        small.allow(agent, 0.0)
    assert list(small.agents) == ["b", "c"]  # made-up ids cannot grow it


@pytest.mark.integration
def test_an_agent_is_told_why_its_update_was_refused_and_logs_it(broker, tmp_path: Path,
                                                                  caplog):
    """A real coordinator process and broker; the agent is the Python AgentRunner, driven by
    hand so it can send what an honest agent never would."""
    run = "refusal-reply"
    fleet = LocalFleet(broker.url, run, tmp_path / "logs",
                       ["--run-dir", str(tmp_path / "runs"), "--algo", "fedavg",
                        "--min-agents", "2", "--max-versions", "5"])
    with fleet:
        fleet.start_coordinator()
        cfg = load_agent_config(None, {"run": run, "broker": broker.url, "agent_id": "pi01",
                                       "shard": "0/2"})
        agent = AgentRunner(cfg)
        agent.link.subscribe(agent.topics.refusal("pi01"))
        agent.link.connect()
        try:
            caplog.set_level(logging.INFO, logger="fleetfl.agent")
            agent._join_first()  # the retained model, the job, a hello
            # an update for a window far ahead of the open one: window_ahead
            bad = Message(Kind.UPDATE, run, "pi01", 0, 0,
                          {"window": 99, "samples": 10, "steps": 1},
                          {"delta": agent.trainer.params.copy() * 0})
            agent._publish(bad)
            garbage_seq = agent.seq + 1  # then bytes that are no message at all
            agent.link.publish(agent.topics.up("pi01"), b"\x01not msgpack")
            wanted = [f"the coordinator refused our update seq={bad.seq}: window_ahead",
                      "the coordinator refused our message seq=-1: malformed"]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not all(
                    w in caplog.text for w in wanted):
                agent._next_message(timeout=0.5)
                assert fleet.coordinator.poll() is None, fleet.log("coordinator")[-3000:]
            assert all(w in caplog.text for w in wanted), (
                caplog.text[-3000:] + fleet.log("coordinator")[-3000:])
            assert "window 99, open is 1" in caplog.text
            assert agent.stats["refused_by_coordinator"] == 2
            assert garbage_seq > bad.seq

            # a flood is answered REPLY_BURST times at most at once, then counted
            for _ in range(3 * REPLY_BURST):
                agent._publish(Message(Kind.UPDATE, run, "pi01", 0, 0,
                                       {"window": 99, "samples": 10, "steps": 1},
                                       {"delta": agent.trainer.params.copy() * 0}))
            end = time.monotonic() + 5
            while time.monotonic() < end:
                agent._next_message(timeout=0.2)
            assert agent.stats["refused_by_coordinator"] <= 2 + REPLY_BURST + 3
            time.sleep(2.5)  # a token comes back: the next reply says how many were held
            agent._publish(bad)
            end = time.monotonic() + 20
            while time.monotonic() < end and "earlier refusal(s) not reported" not in \
                    caplog.text:
                agent._next_message(timeout=0.2)
            assert "earlier refusal(s) not reported" in caplog.text
        finally:
            agent.link.close()
    log = fleet.log("coordinator")
    assert "rejected message from pi01: window_ahead" in log
