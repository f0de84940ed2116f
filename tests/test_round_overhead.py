"""What keeps a round short and a demo's start quick (issue 20, item 9; bench/round_overhead.py):
no Nagle delay on the MQTT links, the coordinator's torch on one thread, and fl-demo's agents
forked from one import of their code."""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from fleetfl.coordinator import runner as coordinator_runner
from fleetfl.coordinator.runner import CoordinatorRunner
from fleetfl.coordinator.sim_calibration import measure_hop_s
from fleetfl.shared.config import load_config
from fleetfl.shared.devtools.local_broker import mosquitto_config
from fleetfl.shared.net.broker_url import parse_broker_url
from fleetfl.shared.net.transport import MqttLink

ROOT = Path(__file__).resolve().parents[1]
DELAYED_ACK_S = 0.04  # Linux's delayed ACK: what Nagle's algorithm waits for per hop


def test_links_and_broker_send_small_messages_at_once(broker):
    assert "set_tcp_nodelay true" in mosquitto_config("1883").splitlines()
    link = MqttLink(parse_broker_url(broker.url), "nodelay-probe", queue.Queue())
    link.connect()
    try:
        sock = link.client.socket()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        link.close()
    # a QoS 1 ping-pong through the broker: with Nagle on either side each hop waits for a
    # delayed ACK (46 ms measured before); without, about a millisecond on a quiet host
    assert measure_hop_s(broker.url, repeats=20) < DELAYED_ACK_S / 2


def test_the_coordinator_evaluates_on_one_torch_thread(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = load_config(None, {"run": "threads", "run_dir": str(tmp_path),
                                 "broker": "mqtt://127.0.0.1:9"})
        CoordinatorRunner(cfg).journal.close()  # built, never connected
        assert torch.get_num_threads() == coordinator_runner.EVAL_THREADS == 1
    finally:
        torch.set_num_threads(before)


FORK_SCRIPT = """
import os, subprocess, sys, time
from pathlib import Path
from fleetfl.coordinator import forked
from fleetfl.coordinator.local_fleet import AGENT_CODE, LocalFleet

tmp = Path(sys.argv[1])
assert forked.can_fork()
fleet = LocalFleet("mqtt://127.0.0.1:9", "forked", tmp / "logs", fork_agents=True)
# fl-agent's own entry point: --version exits 0, a bad flag 2 (argparse)
ok = fleet.start_agent(0, 2, extra=["--version"])
bad = fleet.start_agent(1, 2, extra=["--no-such-flag"])
assert isinstance(ok, forked.Forked) and ok.pid != os.getpid()
assert AGENT_CODE in sys.modules  # imported here once, for every child
codes = fleet.wait_agents(timeout=30)
# a child that does not end by itself: wait() times out, terminate() ends it
sleeper = forked.fork_main("sleeper", [], tmp / "sleeper.log", dict(os.environ))
try:
    sleeper.wait(timeout=0.2)
    raise AssertionError("the sleeper ended by itself")
except subprocess.TimeoutExpired:
    pass
sleeper.terminate()
print(codes["agent0"], codes["agent1"], sleeper.wait(timeout=10))
"""

SLEEPER = """
import time

def main(args):
    print("sleeping", flush=True)
    time.sleep(60)
    return 0
"""


def test_fl_demo_forks_agents_running_fl_agents_main(tmp_path):
    """In a process of its own: fork is safe only without other threads (pytest has some)."""
    (tmp_path / "sleeper.py").write_text(textwrap.dedent(SLEEPER))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(FORK_SCRIPT), str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "2", "-15"]  # SIGTERM: -15, as subprocess says
    logs = tmp_path / "logs"
    assert (logs / "agent0.log").read_text().startswith("fl-agent ")  # its --version line
    assert "unrecognized arguments: --no-such-flag" in (logs / "agent1.log").read_text()
    assert (tmp_path / "sleeper.log").read_text() == "sleeping\n"


def test_fl_demo_forks_by_default_and_spawns_when_asked():
    from fleetfl.coordinator import demo

    assert demo.parse_args([]).launch == "fork"
    assert demo.parse_args(["--launch", "spawn"]).launch == "spawn"


def test_the_agent_checks_the_watchdog_at_most_every_quarter_second(tmp_path, monkeypatch):
    """Its loop passes every local step; the check reads the environment (issue 20 item 9)."""
    from fleetfl.agent import runner as agent_runner
    from fleetfl.shared.config import load_agent_config

    checks: list[float] = []
    monkeypatch.setattr(agent_runner.sd_notify, "watchdog", lambda now=None: checks.append(now))
    cfg = load_agent_config(None, {"broker": "mqtt://127.0.0.1:9", "agent_id": "wd",
                                   "state_dir": str(tmp_path)})
    agent = agent_runner.AgentRunner(cfg)
    started = time.monotonic()
    while time.monotonic() - started < 0.6:  # a busy loop, as training steps are
        agent._next_message(timeout=None)
    elapsed = time.monotonic() - started
    assert checks[0] <= started + 0.05  # the first pass checks
    assert len(checks) <= elapsed / agent_runner.WATCHDOG_CHECK_S + 1
    assert len(checks) >= 2  # and later ones again
    gaps = [b - a for a, b in zip(checks, checks[1:], strict=False)]
    assert min(gaps) >= agent_runner.WATCHDOG_CHECK_S
