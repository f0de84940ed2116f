"""fl-sim's engine: many agents in one process on a virtual clock, with the very same state
machines (the command line is simulator.py, the measured step and hop times
sim_calibration.py).

What is real: the device and coordinator sides (`registry.make_device/make_coordinator`), the
torch training steps (every agent trains on its own shard with its own optimizer state), the
encoded message sizes (`codec.encode`, then `decode` so messages pass the same checks), the
evaluation, and the events.jsonl a run writes (the coordinator's recorder.py: same records,
same stop rule). What is modelled: time. A local step lasts its device profile's `step_s`; a
message crosses the agent's link with `LinkModel` (the proxy's formula: serialisation at the
bandwidth, then latency + jitter, FIFO); the coordinator spends `coord_msg_s` per message and
`coord_version_s` per published version. Nothing sleeps: a heap of timed events advances the
clock.

One torch model serves every agent: its flat parameter buffer (shared memory with the torch
tensors, `params.bind_flat`) and the optimizer's state are swapped in before an agent's step
and out after it, so 1,000 agents cost 1,000 flat vectors, not 1,000 models.

Routing is generic: agent outputs go to the coordinator; coordinator outputs on a down/ topic
(`Topics.for_outgoing`) go to every connected agent, except retained ones (the model), which
only (re)joining agents fetch.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from fleetfl.coordinator.ledger import ByteLedger
from fleetfl.coordinator.recorder import Recorder, StopRule
from fleetfl.coordinator.rundir import RunDir
from fleetfl.shared.config import ConfigError, RunConfig, to_dict
from fleetfl.shared.core.averaging import WindowResult
from fleetfl.shared.core.base import DeviceSide, Rejected
from fleetfl.shared.core.messages import COORDINATOR_ID, Kind, Message
from fleetfl.shared.core.registry import make_coordinator, make_device
from fleetfl.shared.devtools.link_proxy import LinkModel, LinkSpec
from fleetfl.shared.learn.data import shard_indices
from fleetfl.shared.learn.torch_binding import bind_flat
from fleetfl.shared.tasks.evaluation import evaluate
from fleetfl.shared.tasks.samples import ArraySamples
from fleetfl.shared.tasks.task import Task, fingerprint, load_task
from fleetfl.shared.tasks.trainer import LocalTrainer
from fleetfl.shared.wire.codec import CodecError, DecodeContext, decode, encode
from fleetfl.shared.wire.topics import Topics

log = logging.getLogger("fleetfl.sim")
TICK_S = 0.2  # as the coordinator shell: deadlines are checked this often
# FedPMT's agents profile their layers, say so in the hello, and step faster when the
# coordinator freezes layers: none of that is in the simulated device yet.
UNMODELLED = {"pmt": "per-layer compute profiles and frozen layers"}


@dataclass(frozen=True)
class DeviceProfile:
    """A kind of device: seconds per local step (x U(1-jitter, 1+jitter)), share of the fleet."""

    name: str = "default"
    step_s: float = 0.01
    share: float = 1.0
    jitter: float = 0.0

    @staticmethod
    def parse(text: str) -> DeviceProfile:
        """`name:step_s[:share[:jitter]]`, e.g. `pi4:0.05:0.75`."""
        parts = text.split(":")
        if not 2 <= len(parts) <= 4:
            raise ValueError(f"profile {text!r}: expected name:step_s[:share[:jitter]]")
        nums = [float(p) for p in parts[1:]]
        return DeviceProfile(parts[0], *nums)


@dataclass
class SimConfig:
    agents: int = 8
    profiles: list[DeviceProfile] = field(default_factory=lambda: [DeviceProfile()])
    up: LinkSpec = field(default_factory=LinkSpec)  # agent -> broker, per agent
    down: LinkSpec = field(default_factory=LinkSpec)  # broker -> agent, per agent
    # >0: all agents share this many cores (processor sharing), to model a fleet emulated on
    # one host; 0: every agent is its own device.
    host_cores: int = 0
    # Transport overhead per message and direction (broker, client threads, wake-ups), on
    # top of the link; measure_hop_s() measures it against a real broker.
    hop_s: float = 0.0
    coord_msg_s: float = 0.0  # coordinator time per received message (decode, bookkeeping)
    coord_version_s: float = 0.0  # coordinator time per version (evaluation, checkpoint)
    join_s: float = 0.0  # agents connect at a uniform time in [0, join_s]
    block_timeout: float = 120.0  # as the agent's: blocked this long -> resynchronise
    max_time: float = 1e7  # virtual seconds before the run is cut
    stall_s: float = 0.0  # no new version for this long -> cut (0: 3 x the longest timeout)
    seed: int = 0  # jitter and join times

    def profile_of(self, index: int) -> DeviceProfile:
        """Profiles by share, in order: the first share * agents agents get the first one."""
        total = sum(p.share for p in self.profiles)
        edge = 0.0
        for p in self.profiles:
            edge += p.share / total * self.agents
            if index < round(edge):
                return p
        return self.profiles[-1]


@dataclass(eq=False)
class SimAgent:
    name: str
    index: int
    profile: DeviceProfile
    data: ArraySamples
    rng: np.random.Generator
    device: DeviceSide
    up: LinkModel
    down: LinkModel
    params: np.ndarray | None = None
    opt_state: np.ndarray | None = None
    order: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    steps: int = 0
    state: str = "offline"  # offline, joining, computing, blocked, stopped
    inbox: list[Message] = field(default_factory=list)
    blocked_since: float | None = None
    seq: int = 0


class _SharedCores:
    """Processor sharing: n computing agents on c cores each progress at min(1, c/n) of a
    core. Every job advances at the same rate, so one cumulative 'service' counter and a heap
    of finish marks suffice."""

    def __init__(self, cores: int) -> None:
        self.cores, self.service, self.t = cores, 0.0, 0.0
        self.jobs: list[tuple[float, int, SimAgent]] = []
        self.count = itertools.count()

    def rate(self) -> float:
        return min(1.0, self.cores / len(self.jobs)) if self.jobs else 1.0

    def advance(self, now: float) -> None:
        self.service += (now - self.t) * self.rate()
        self.t = now

    def add(self, now: float, agent: SimAgent, work: float) -> None:
        self.advance(now)
        heapq.heappush(self.jobs, (self.service + work, next(self.count), agent))

    def next_finish(self) -> float | None:
        if not self.jobs:
            return None
        return self.t + max(0.0, self.jobs[0][0] - self.service) / self.rate()

    def pop_done(self, now: float) -> list[SimAgent]:
        self.advance(now)
        done = []
        while self.jobs and self.jobs[0][0] <= self.service + 1e-12:
            done.append(heapq.heappop(self.jobs)[2])
        return done


def _optimizer_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for group in opt.param_groups for p in group["params"]
            for _, v in sorted(opt.state.get(p, {}).items()) if torch.is_tensor(v)]


class Simulator:
    def __init__(self, cfg: RunConfig, sim: SimConfig, run_dir: Path | None = None) -> None:
        if sim.agents < 1:
            raise ConfigError("agents must be >= 1")
        if cfg.job.algo in UNMODELLED:
            raise ConfigError(f"fl-sim does not model {cfg.job.algo} yet: "
                              f"{UNMODELLED[cfg.job.algo]}")
        self.cfg, self.sim = cfg, sim
        self.task, ds = simulated_task(cfg)
        self.test_set = self.task.test(data_dir(cfg)) if self.task.test is not None else None
        if self.test_set is None:
            raise ConfigError(f"fl-sim needs a test set: task {self.task.label} has none")
        self._coordinator_side(cfg)
        self.rng = random.Random(sim.seed)
        self.agents = self._agents(cfg, sim, ds)
        self.topics = Topics(cfg.run)
        self.ctx = DecodeContext(cfg.run, self.layers.size, cfg.max_message_bytes)
        self.rundir = self._open_rundir(run_dir)
        self.now = 0.0
        self.queue: list[tuple[float, int, Callable[..., None], tuple]] = []
        self.count = itertools.count()
        self.cores = _SharedCores(sim.host_cores) if sim.host_cores > 0 else None
        self.cpu_generation = 0
        self.coord_busy_until = 0.0
        self.retained: dict[str, tuple[Message, int]] = {}
        self.rejected: Counter[str] = Counter()
        self.ledger = ByteLedger()
        self.seq = 0
        self.done: str | None = None
        # events.jsonl's records and the stop rule: the coordinator's (recorder.py)
        self.recorder = Recorder(self.rundir, StopRule.of(cfg), lambda: self.now,
                                 simulated=True, keep=True)
        self.total_steps = 0
        # Agents that lose track resynchronise forever; a run without progress must end.
        self.stall_s = sim.stall_s or 3 * max(cfg.window_timeout, sim.block_timeout)

    @property
    def events(self) -> list[dict]:
        """The versions logged so far, as `RunDir.events()` reads them back."""
        return self.recorder.history

    @property
    def best_accuracy(self) -> float:
        return self.recorder.stop.best_accuracy

    def _coordinator_side(self, cfg: RunConfig) -> None:
        """The coordinator's model (the initial global parameters and the evaluator) and its
        state machine."""
        job = cfg.job
        self.eval_model = self.task.build_model(job.seed)
        self.eval_params, self.layers = bind_flat(self.eval_model)
        cfg.job = job = dataclasses.replace(
            job, task_fingerprint=fingerprint(self.task, self.eval_model),
            fda_theta=job.fda_theta or self.task.fda_theta)
        self.job = job
        self.core = make_coordinator(cfg, self.eval_params, self.layers)

    def _agents(self, cfg: RunConfig, sim: SimConfig, ds: Any) -> list[SimAgent]:
        """Each agent's shard, device side and links; the one shared model and optimizer
        every agent's step runs on (self.trainer)."""
        job = cfg.job
        parts = shard_indices(ds, sim.agents, job.partition, job.seed, job.alpha)
        first = parts[0]
        self.trainer = LocalTrainer(self.task, job,
                                    ArraySamples(ds.x_train[first], ds.y_train[first]), seed=0)
        agents = []
        for i, idx in enumerate(parts):
            name = f"agent{i}"  # as LocalFleet names them
            agents.append(SimAgent(
                name=name, index=i, profile=sim.profile_of(i),
                data=ArraySamples(ds.x_train[idx], ds.y_train[idx]),
                # the real agent's seed (agent/runner.py): same mini-batches in the same order
                rng=np.random.default_rng(job.seed * 1000 + i),
                device=make_device(self.job, cfg.run, name, len(idx), self.layers),
                up=LinkModel(sim.up, self.rng), down=LinkModel(sim.down, self.rng)))
        return agents

    def _open_rundir(self, run_dir: Path | None) -> RunDir:
        rundir = RunDir(run_dir or Path(self.cfg.run_dir) / self.cfg.run)
        rundir.events_path.unlink(missing_ok=True)
        rundir.write_config(to_dict(self.cfg))
        (rundir.path / "sim.yaml").write_text(yaml.safe_dump(
            {"simulated": True, **dataclasses.asdict(self.sim)}, sort_keys=False))
        return rundir

    # -- the clock ------------------------------------------------------------------------
    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self.queue, (t, next(self.count), fn, args))

    def run(self) -> str:
        started = time.perf_counter()
        self._coordinator_publish(self.core.model_message())  # as on the shell's CONNECTED
        for agent in self.agents:
            self.at(self.rng.uniform(0.0, self.sim.join_s), self._fetch_model, agent)
        self.at(TICK_S, self._tick)
        while self.queue and self.done is None:
            t, _, fn, args = heapq.heappop(self.queue)
            if t > self.sim.max_time:
                self.done = f"virtual time limit {self.sim.max_time:g} s"
                break
            self.now = t
            fn(*args)
        self.done = self.done or "stalled: nothing left to happen"
        self.wall_s = time.perf_counter() - started
        log.info("simulation ended: %s; version %d at %.2f virtual s, %.1f s wall, %d steps",
                 self.done, self.core.version, self.now, self.wall_s, self.total_steps)
        return self.done

    # -- agents ---------------------------------------------------------------------------
    def _fetch_model(self, agent: SimAgent) -> None:
        """Subscribe to the retained model: it crosses the agent's down link."""
        agent.state = "joining"
        msg, size = self.retained[self.topics.model]
        self.at(agent.down.transmit(self.now, size) + self.sim.hop_s, self._joined, agent, msg)

    def _joined(self, agent: SimAgent, model: Message) -> None:
        if agent.state != "joining":
            return
        agent.params = np.array(model["params"], dtype=np.float32)
        agent.device.start(model["version"], model["next_window"], agent.params,
                           model.arrays.get("last_avg"))
        agent.blocked_since = None
        self._agent_publish(agent, Message(
            Kind.HELLO, self.cfg.run, agent.name, 0, model["version"],
            {"samples": len(agent.data), "first_window": model["next_window"],
             "capabilities": {"simulated": True, "profile": agent.profile.name}}))
        agent.state = "blocked"  # not computing: _loop decides
        self._loop(agent)

    def _loop(self, agent: SimAgent) -> None:
        """AgentRunner._train, one pass: handle what arrived, then resync, wait or step."""
        while agent.inbox and agent.state != "stopped":
            self._handle(agent, agent.inbox.pop(0))
        if agent.state in ("stopped", "joining"):
            return
        dev = agent.device
        too_long = (agent.blocked_since is not None
                    and self.now - agent.blocked_since > self.sim.block_timeout)
        if dev.needs_resync or too_long:
            agent.inbox.clear()
            self._fetch_model(agent)
            return
        if dev.blocked:
            if not dev.encoder.ready(dev.window):
                agent.blocked_since = None  # sitting a window out (selection, FedPMT): no
            elif agent.blocked_since is None:  # reason to resynchronise (AgentRunner)
                agent.blocked_since = self.now
                self.at(self.now + self.sim.block_timeout + 1e-9, self._wake, agent)
            agent.state = "blocked"
            return
        agent.blocked_since = None
        agent.state = "computing"
        p = agent.profile
        work = p.step_s * (self.rng.uniform(1 - p.jitter, 1 + p.jitter) if p.jitter else 1.0)
        if self.cores is None:
            self.at(self.now + work, self._step_done, agent)
        else:
            self.cores.add(self.now, agent, work)
            self._schedule_cpu()

    def _wake(self, agent: SimAgent) -> None:
        if agent.state == "blocked":
            self._loop(agent)

    def _handle(self, agent: SimAgent, msg: Message) -> None:
        if msg.kind is Kind.STOP:
            agent.state = "stopped"
            return
        try:
            replies = agent.device.on_message(msg, agent.params) or []
        except Rejected:
            return
        for out in replies:
            self._agent_publish(agent, out)

    def _schedule_cpu(self) -> None:
        self.cpu_generation += 1
        t = self.cores.next_finish()
        if t is not None:
            self.at(t, self._cpu_event, self.cpu_generation)

    def _cpu_event(self, generation: int) -> None:
        if generation != self.cpu_generation:
            return  # the set of computing agents changed since: rescheduled
        for agent in self.cores.pop_done(self.now):
            self._step_done(agent)
        self._schedule_cpu()

    def _step_done(self, agent: SimAgent) -> None:
        if agent.state != "computing":
            return
        self._train_step(agent)
        self.total_steps += 1
        for out in agent.device.after_step(agent.params):
            self._agent_publish(agent, out)
        agent.state = "blocked"
        self._loop(agent)

    def _train_step(self, agent: SimAgent) -> None:
        """Swap the agent into the shared trainer, take one real step, swap it out."""
        tr = self.trainer
        tr.params[:] = agent.params
        opt = tr.optimizer
        if agent.opt_state is None:
            opt.state.clear()  # torch initialises a fresh agent's state on its first step
        else:
            offset = 0
            for t in _optimizer_tensors(opt):
                n = t.numel()
                t.view(-1).copy_(torch.from_numpy(agent.opt_state[offset:offset + n]))
                offset += n
        tr.data, tr.rng, tr.order, tr.steps = agent.data, agent.rng, agent.order, agent.steps
        tr.batch_size = min(self.cfg.job.batch_size, len(agent.data))
        tr.step()
        agent.order, agent.steps = tr.order, tr.steps
        agent.params[:] = tr.params
        tensors = _optimizer_tensors(opt)
        if agent.opt_state is None:
            agent.opt_state = np.empty(sum(t.numel() for t in tensors), dtype=np.float32)
        offset = 0
        for t in tensors:
            n = t.numel()
            agent.opt_state[offset:offset + n] = t.detach().reshape(-1).numpy()
            offset += n

    def _agent_publish(self, agent: SimAgent, msg: Message) -> None:
        agent.seq += 1
        msg.seq = agent.seq
        self.topics.for_outgoing(msg)  # refuses kinds without a topic, like the shell
        payload = encode(msg, proto=self.cfg.protocol)  # agents follow the run's version
        arrival = agent.up.transmit(self.now, len(payload)) + self.sim.hop_s
        self.at(arrival, self._coordinator_receive, agent.name, payload)

    def _agent_receive(self, agent: SimAgent, msg: Message) -> None:
        if agent.state == "joining":
            if msg.kind is Kind.STOP:
                agent.state = "stopped"
            return  # AgentRunner._wait_for_model drops everything but the model
        if agent.state in ("offline", "stopped"):
            return
        agent.inbox.append(msg)
        if agent.state == "blocked":
            self._loop(agent)

    # -- coordinator ----------------------------------------------------------------------
    def _coordinator_receive(self, sender: str, payload: bytes) -> None:
        if self.now < self.coord_busy_until:  # one thread: wait for the previous work
            self.at(self.coord_busy_until, self._coordinator_receive, sender, payload)
            return
        self.coord_busy_until = self.now + self.sim.coord_msg_s
        try:
            msg = decode(payload, self.ctx)
            outputs = self.core.on_message(msg, self.now)
        except (CodecError, Rejected) as exc:  # counted, as the shell does
            self.rejected[exc.reason] += 1
            self.ledger.up(sender, None, len(payload))
            return
        self.ledger.up(sender, msg.kind, len(payload))
        for out in outputs:
            self._coordinator_publish(out)
        self._record_results()

    def _tick(self) -> None:
        if self.now >= self.coord_busy_until:
            for out in self.core.on_tick(self.now):
                self._coordinator_publish(out)
            self._record_results()
        if self.done is None:
            self.at(self.now + TICK_S, self._tick)
        if self._stalled():
            self.done = "stalled: every agent waits and nothing is in flight"
        last = self.events[-1]["time"] if self.events else 0.0
        if self.now - last > self.stall_s:
            self.done = f"stalled: no new version for {self.stall_s:g} virtual s"

    def _stalled(self) -> bool:
        """Nobody computes, no window can time out, and only ticks are left to happen."""
        if self.core.pending or any(a.state == "computing" for a in self.agents):
            return False
        return all(fn == self._tick for _, _, fn, _ in self.queue)

    def _coordinator_publish(self, msg: Message) -> None:
        self.seq += 1
        msg.seq = self.seq
        topic, retain = self.topics.for_outgoing(msg)
        payload = encode(msg, proto=self.cfg.protocol)
        online = [a for a, r in self.core.agents.items() if r.online]
        self.ledger.down(msg.kind, len(payload), online)
        delivered = decode(payload, self.ctx)  # what a subscriber gets: read-only arrays
        if retain:
            self.retained[topic] = (delivered, len(payload))
            return
        if msg.kind is Kind.STOP:
            self.done = self.done or str(msg["reason"])
            return
        if not topic.startswith(f"{self.topics.prefix}/down/"):
            return
        for agent in self.agents:
            if agent.state not in ("offline", "stopped"):
                arrival = agent.down.transmit(self.now, len(payload)) + self.sim.hop_s
                self.at(arrival, self._agent_receive, agent, delivered)

    def _record_results(self) -> None:
        """CoordinatorRunner._record_results: log each version the state machine published,
        evaluate the last of a burst if due (evaluation here is synchronous), stop by the
        same rule."""
        event = None
        while self.core.results:
            result = self.core.results.pop(0)
            last = not self.core.results
            event = self._record(result, last and self.recorder.stop.due(result.version))
        if event is None:
            return
        self.coord_busy_until = max(self.coord_busy_until, self.now) + self.sim.coord_version_s
        reason = self.recorder.stop_reason(self.core.version)
        if reason is not None:
            self._stop(reason)

    def _stop(self, reason: str) -> None:
        self._coordinator_publish(Message(Kind.STOP, self.cfg.run, COORDINATOR_ID, 0,
                                          self.core.version, {"reason": reason}))

    def _record(self, result: WindowResult, evaluate_now: bool) -> dict:
        """The coordinator's records (recorder.py), so one report reads both kinds of run."""
        for reason in result.refused.values():  # accepted, then left out of the average
            self.rejected[reason] += 1
        online = sum(r.online for r in self.core.agents.values())
        # 1,000 agents: no per-agent byte rows, to keep the log readable
        event = self.recorder.version(result, online, dict(self.rejected), self.ledger,
                                      per_agent=len(self.agents) <= 64)
        if evaluate_now:
            started = time.perf_counter()
            self.eval_params[:] = self.core.params
            values = evaluate(self.task, self.eval_model, self.test_set)
            self.recorder.evaluated(result.version, values, time.perf_counter() - started)
        return event


def data_dir(cfg: RunConfig) -> Path | None:
    return Path(cfg.data_dir) if cfg.data_dir else None


def simulated_task(cfg: RunConfig) -> tuple[Task, Any]:
    """The job's task and the global data set the simulation deals out."""
    task = load_task(cfg.job.task)
    if task.simulation is None:
        raise ConfigError(f"fl-sim needs a task with a global data set: {task.label} reads "
                          "each device's own data")
    return task, task.simulation(data_dir(cfg))
