"""Start a coordinator and N agents as separate processes on this machine (demo, tests,
benchmarks). Each process is the real `fl-coordinator` / `fl-agent` entry point: a new
interpreter, or with `fork_agents` (fl-demo) an agent forked from this process once it has
imported the agent's code (forked.py: 16 interpreters importing torch on 2 cores took ~14 s)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fleetfl.coordinator import forked

AGENT_CODE = "fleetfl.agent.runner"  # what an agent imports: torch and the rest (fork_agents)


def _command(module: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", module, *args]


@dataclass
class LocalFleet:
    broker_url: str
    run: str
    log_dir: Path
    coordinator_args: list[str] = field(default_factory=list)
    agent_args: list[str] = field(default_factory=list)
    data_dir: str = ""
    # fork the agents from this process after importing their code here once (only while it
    # has no other thread: forked.can_fork; else new interpreters, as without it)
    fork_agents: bool = False
    coordinator: subprocess.Popen | None = None
    agents: dict[str, subprocess.Popen | forked.Forked] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.log_dir = Path(self.log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")

    def _spawn(self, name: str, module: str, args: list[str], stream: bool,
               env: dict[str, str] | None = None) -> subprocess.Popen | forked.Forked:
        if self.fork_agents and name != "coordinator" and not stream and forked.can_fork():
            forked.preload(AGENT_CODE)  # once: later calls find it imported
            return forked.fork_main(module, args, self.log_dir / f"{name}.log",
                                    {**self.env, **(env or {})})
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        out = None if stream else log  # stream: show the child's output on our terminal
        return subprocess.Popen(_command(module, args), stdout=out, stderr=out,
                                env={**self.env, **(env or {})}, start_new_session=True)

    def start_coordinator(self, extra: list[str] | None = None, stream: bool = False
                          ) -> subprocess.Popen:
        args = ["--broker", self.broker_url, "--run", self.run, *self.coordinator_args]
        if self.data_dir:
            args += ["--data-dir", self.data_dir]
        self.coordinator = self._spawn("coordinator", "fleetfl.coordinator.cli",
                                       args + (extra or []), stream)
        return self.coordinator

    def start_agent(self, index: int, parts: int, agent_id: str | None = None,
                    extra: list[str] | None = None, module: str = "fleetfl.agent.cli"
                    ) -> subprocess.Popen | forked.Forked:
        """`module`: another entry point with fl-agent's flags (benches: hostile agents)."""
        agent_id = agent_id or f"agent{index}"
        args = ["--broker", self.broker_url, "--run", self.run, "--agent-id", agent_id,
                "--shard", f"{index}/{parts}", *self.agent_args, *(extra or [])]
        if self.data_dir:
            args += ["--data-dir", self.data_dir]
        self.agents[agent_id] = self._spawn(agent_id, module, args, False)
        return self.agents[agent_id]

    def start_device(self, agent_id: str, data: str | Path, extra: list[str] | None = None,
                     env: dict[str, str] | None = None) -> subprocess.Popen | forked.Forked:
        """An agent that reads its own data folder (`--data`), as a real fleet's device does,
        instead of a simulated shard; `env`: more variables for this agent only."""
        args = ["--broker", self.broker_url, "--run", self.run, "--agent-id", agent_id,
                "--data", str(data), *self.agent_args, *(extra or [])]
        self.agents[agent_id] = self._spawn(agent_id, "fleetfl.agent.cli", args, False, env)
        return self.agents[agent_id]

    def start_agents(self, n: int) -> None:
        for i in range(n):
            self.start_agent(i, n)

    def wait_coordinator(self, timeout: float) -> int:
        assert self.coordinator is not None
        return self.coordinator.wait(timeout=timeout)

    def wait_agents(self, timeout: float) -> dict[str, int | None]:
        deadline = time.monotonic() + timeout
        codes = {}
        for name, proc in self.agents.items():
            try:
                codes[name] = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                codes[name] = None
        return codes

    def stop(self) -> None:
        for proc in [*self.agents.values(), self.coordinator]:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in [*self.agents.values(), self.coordinator]:
            if proc is None:
                continue
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> LocalFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
