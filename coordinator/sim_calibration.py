"""fl-sim's calibration: what one local step, one version and one MQTT hop cost on this
machine, measured, so a simulation can be set to it (simulator.py uses the first two by
default; tests/test_simulator.py all three against a real run)."""

from __future__ import annotations

import queue
import tempfile
import time

import numpy as np

from fleetfl.coordinator.rundir import RunDir
from fleetfl.coordinator.sim_engine import data_dir, simulated_task
from fleetfl.shared.config import RunConfig
from fleetfl.shared.learn.data import partition
from fleetfl.shared.learn.torch_binding import bind_flat
from fleetfl.shared.tasks.evaluation import evaluate
from fleetfl.shared.tasks.samples import ArraySamples
from fleetfl.shared.tasks.trainer import LocalTrainer


def measure_step_s(cfg: RunConfig, repeats: int = 200, warmup: int = 20) -> float:
    """Median seconds of one local step of this job on this machine (one thread)."""
    job = cfg.job
    task, ds = simulated_task(cfg)
    idx = partition(ds.y_train, 4, "iid", job.seed)[0]
    trainer = LocalTrainer(task, job, ArraySamples(ds.x_train[idx], ds.y_train[idx]), seed=0)
    times = []
    for i in range(repeats + warmup):
        t0 = time.perf_counter()
        trainer.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure_version_s(cfg: RunConfig, repeats: int = 5) -> float:
    """Median seconds the coordinator shell spends per version: evaluation + checkpoint."""
    task, _ = simulated_task(cfg)
    test_set = task.test(data_dir(cfg))
    model = task.build_model(cfg.job.seed)
    params, _ = bind_flat(model)
    times = []
    with tempfile.TemporaryDirectory(prefix="fleetfl-calibrate-") as tmp:
        rundir = RunDir(tmp)
        for _ in range(repeats):
            t0 = time.perf_counter()
            evaluate(task, model, test_set)
            rundir.save_checkpoint(params, {"version": 0})
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure_hop_s(broker_url: str, repeats: int = 50, size: int = 1000) -> float:
    """Median one-way time of a QoS 1 message between two MQTT clients through the broker
    (half a ping-pong): the transport overhead a simulated hop adds to its link."""
    from fleetfl.shared.net.broker_url import parse_broker_url
    from fleetfl.shared.net.transport import MqttLink

    broker = parse_broker_url(broker_url)
    tag = f"fleetfl-hop-{time.time_ns()}"
    inbox_a: queue.Queue = queue.Queue()
    inbox_b: queue.Queue = queue.Queue()
    a, b = MqttLink(broker, tag + "-a", inbox_a), MqttLink(broker, tag + "-b", inbox_b)
    a.subscribe(f"{tag}/pong")
    b.subscribe(f"{tag}/ping")
    a.connect()
    b.connect()
    payload, times = b"x" * size, []

    def hop(link: MqttLink, inbox: queue.Queue, topic: str, timeout: float) -> None:
        link.publish(topic, payload)
        deadline = time.monotonic() + timeout
        while True:
            item = inbox.get(timeout=max(0.01, deadline - time.monotonic()))
            if item.topic == topic:
                return

    try:
        for _ in range(50):  # until both subscriptions are in place at the broker
            try:
                hop(a, inbox_b, f"{tag}/ping", 0.2)
                break
            except queue.Empty:
                continue
        for _ in range(repeats):
            t0 = time.perf_counter()
            hop(a, inbox_b, f"{tag}/ping", 10)
            hop(b, inbox_a, f"{tag}/pong", 10)
            times.append((time.perf_counter() - t0) / 2)
    finally:
        a.close()
        b.close()
    return float(np.median(times))
