"""The virtual-clock simulator: exact clock on known cases, real training, scale, and agreement
with a real run through slow links."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fleetfl.coordinator.local_fleet import LocalFleet
from fleetfl.coordinator.rundir import RunDir
from fleetfl.coordinator.simulator import (
    UNMODELLED,
    DeviceProfile,
    SimConfig,
    Simulator,
    main,
    measure_hop_s,
    measure_step_s,
    measure_version_s,
)
from fleetfl.shared.config import ALGOS, load_config
from fleetfl.shared.devtools.link_proxy import LinkSpec, ProxyHost
from fleetfl.shared.learn.data import load_dataset, partition
from fleetfl.shared.learn.torch_binding import bind_flat
from fleetfl.shared.tasks.task import load_task
from fleetfl.shared.tasks.trainer import LocalTrainer


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the agents: deterministic, and fair on 2 cores
    yield
    torch.set_num_threads(before)


def simulate(tmp_path: Path, agents: int, name: str = "sim", **kw) -> Simulator:
    job = {k: kw.pop(k) for k in list(kw) if k in ("algo", "local_steps", "period", "delay",
                                                   "partition", "lr")}
    cfg = load_config(None, {"run": name, "min_agents": agents,
                             "max_versions": kw.pop("versions", 5), **job})
    sim = Simulator(cfg, SimConfig(agents=agents, **kw), run_dir=tmp_path / name)
    sim.run()
    return sim


def times(sim: Simulator) -> list[float]:
    return [e["time"] for e in sim.events]


def test_fedavg_clock_is_exact(tmp_path: Path) -> None:
    # Model fetch L, H steps, update L, then per round: average L + H steps + update L.
    L, s, H = 0.1, 0.01, 5
    sim = simulate(tmp_path, 3, algo="fedavg", local_steps=H, versions=4,
                   profiles=[DeviceProfile("d", s)], up=LinkSpec(L), down=LinkSpec(L))
    assert times(sim) == pytest.approx([v * (2 * L + H * s) for v in range(1, 5)], abs=1e-3)
    assert sim.done == "reached 4 versions"
    assert all(len(e["contributors"]) == 3 for e in sim.events)


def test_bandwidth_adds_transfer_time(tmp_path: Path) -> None:
    L, s, H, bw = 0.05, 0.01, 5, 200_000.0
    link = LinkSpec(L, bandwidth=bw)
    sim = simulate(tmp_path, 2, algo="fedavg", local_steps=H, versions=3,
                   profiles=[DeviceProfile("d", s)], up=link, down=link)
    e = sim.events[-1]
    update = e["up_model_since"] / 2  # one update per agent
    average = e["down_model_since"] / 2  # one average to each agent
    spacing = np.diff(times(sim))
    assert spacing == pytest.approx(2 * L + H * s + (update + average) / bw, abs=1e-3)


def test_dga_overlaps_latency_with_compute(tmp_path: Path) -> None:
    L, s, K = 0.2, 0.01, 5
    common = dict(profiles=[DeviceProfile("d", s)], up=LinkSpec(L), down=LinkSpec(L),
                  versions=20)
    fedavg = simulate(tmp_path, 3, "fedavg", algo="fedavg", local_steps=K, **common)
    # D * s = 0.5 s covers the 0.4 s round trip: nobody ever waits for an average.
    dga = simulate(tmp_path, 3, "dga", algo="dga", period=K, delay=50, **common)
    assert np.diff(times(fedavg)) == pytest.approx(2 * L + K * s, abs=1e-3)
    assert np.diff(times(dga))[5:] == pytest.approx(K * s, abs=1e-3)
    # A D too small for the latency blocks: one window per round trip at best.
    blocked = simulate(tmp_path, 3, "dga-d2", algo="dga", period=K, delay=2, **common)
    assert np.median(np.diff(times(blocked))) > 2 * L


def test_shared_cores_slow_steps_down(tmp_path: Path) -> None:
    L, s, H = 0.05, 0.01, 4
    sim = simulate(tmp_path, 4, algo="fedavg", local_steps=H, versions=3, host_cores=2,
                   profiles=[DeviceProfile("d", s)], up=LinkSpec(L), down=LinkSpec(L))
    assert np.diff(times(sim)) == pytest.approx(2 * L + H * s * 4 / 2, abs=1e-3)


def test_profiles_and_stragglers(tmp_path: Path) -> None:
    # A quarter of the fleet is 3x slower: synchronous FedAvg waits for it every round.
    sim = simulate(tmp_path, 4, algo="fedavg", local_steps=5, versions=3,
                   profiles=[DeviceProfile("fast", 0.01, 3), DeviceProfile("slow", 0.03, 1)])
    assert [a.profile.name for a in sim.agents] == ["fast", "fast", "fast", "slow"]
    assert np.diff(times(sim)) == pytest.approx(5 * 0.03, abs=1e-3)


def test_swapped_agents_train_like_separate_trainers(tmp_path: Path) -> None:
    """Two agents on one shared model and optimizer == two real trainers, FedAvg by hand."""
    H, rounds = 4, 3
    sim = simulate(tmp_path, 2, algo="fedavg", local_steps=H, versions=rounds)
    cfg = load_config(None, {"local_steps": H})
    ds = load_dataset("digits")
    parts = partition(ds.y_train, 2, "iid", 0)
    w, _ = bind_flat(load_task(cfg.job.task).build_model(cfg.job.seed))
    trainers = [LocalTrainer.on_arrays(cfg.job, ds.x_train[p], ds.y_train[p], seed=i)
                for i, p in enumerate(parts)]
    for _ in range(rounds):
        deltas = []
        for t in trainers:
            t.params[:] = w
            for _ in range(H):
                t.step()
            deltas.append((t.params - w) * t.samples)
        w = w + sum(deltas) / sum(t.samples for t in trainers)
    np.testing.assert_allclose(sim.core.params, w, atol=1e-6)


def test_events_log_matches_the_coordinators(tmp_path: Path) -> None:
    simulate(tmp_path, 3, algo="dga", period=4, delay=4, versions=4,
             up=LinkSpec(0.05), down=LinkSpec(0.05))
    events = RunDir(tmp_path / "sim").events()
    assert [e["version"] for e in events] == [1, 2, 3, 4]
    for key in ("time", "window", "contributors", "missing", "staleness", "bytes_up_total",
                "bytes_down_total", "accuracy", "loss", "agents_online", "rejected", "updates",
                "assignments"):
        assert key in events[0]
    # the coordinator's records (recorder.py; tests/test_event_schema.py: the same fields)
    records = RunDir(tmp_path / "sim").records()
    assert {r["type"] for r in records} == {"version", "evaluated"}
    assert all(r["schema"] == 2 for r in records) and events[0]["simulated"] is True
    assert sorted(u[0] for u in events[-1]["updates"]) == sorted(events[-1]["contributors"])
    assert events[-1]["accuracy"] > 0.3 and events[-1]["rejected"] == {}
    assert (tmp_path / "sim" / "config.yaml").exists()
    assert (tmp_path / "sim" / "sim.yaml").exists()


def test_every_registered_algorithm_runs(tmp_path: Path) -> None:
    """Routing is generic: whatever the algorithms send goes where its topic says."""
    for algo in [a for a in ALGOS if a not in UNMODELLED]:
        sim = simulate(tmp_path, 4, algo, algo=algo, versions=3, up=LinkSpec(0.02),
                       down=LinkSpec(0.02))
        assert sim.core.version == 3, (algo, sim.done)


def test_two_hundred_agents_smoke(tmp_path: Path) -> None:
    started = time.perf_counter()
    sim = simulate(tmp_path, 200, algo="dga", period=2, delay=2, versions=3,
                   profiles=[DeviceProfile("pi", 0.05, 1, 0.2)], up=LinkSpec(0.1),
                   down=LinkSpec(0.1))
    assert sim.core.version == 3
    assert len(sim.events[-1]["contributors"]) == 200
    assert time.perf_counter() - started < 60


def test_cli(tmp_path: Path, capsys) -> None:
    code = main(["--agents", "3", "--algo", "fedavg", "--local-steps", "3", "--max-versions",
                 "2", "--latency", "0.1", "--step-time", "0.01", "--run-dir", str(tmp_path),
                 "--run", "cli", "--coord-version-s", "0"])
    assert code == 0
    assert "reached 2 versions" in capsys.readouterr().out
    assert len(RunDir(tmp_path / "cli").events()) == 2


# -- simulator vs a real run ------------------------------------------------------------------
LATENCY = 0.2  # one-way, each direction of every agent's link
AGENTS = 4
VERSIONS = 14


def real_run(broker, host: ProxyHost, tmp_path: Path, run: str, job: list[str]) -> list[dict]:
    proxies = [host.add((broker.host, broker.port), LinkSpec(LATENCY), LinkSpec(LATENCY))
               for _ in range(AGENTS)]
    fleet = LocalFleet(broker.url, run, tmp_path / "logs",
                       ["--run-dir", str(tmp_path / "runs"), "--min-agents", str(AGENTS),
                        "--max-versions", str(VERSIONS), *job])
    with fleet:
        fleet.start_coordinator()
        for i, proxy in enumerate(proxies):
            fleet.broker_url = f"mqtt://127.0.0.1:{proxy.port}"
            fleet.start_agent(i, AGENTS)
        try:
            assert fleet.wait_coordinator(timeout=180) == 0, fleet.log("coordinator")[-3000:]
        except subprocess.TimeoutExpired:
            pytest.fail("coordinator hung:\n" + fleet.log("coordinator")[-3000:])
    return RunDir(tmp_path / "runs" / run).events()


@pytest.mark.integration
@pytest.mark.slow
def test_simulator_agrees_with_real_run(broker, tmp_path: Path) -> None:
    """Same job, 4 agents on digits, 200 ms each way: real processes through the proxy vs the
    simulator calibrated with this machine's measured step, evaluation and MQTT hop times."""
    jobs = {"fedavg": ["--algo", "fedavg", "--local-steps", "10"],
            "dga": ["--algo", "dga", "--period", "10", "--delay", "20"]}
    cfg = load_config(None, {})
    calibration = dict(profiles=[DeviceProfile("host", measure_step_s(cfg))],
                       coord_version_s=measure_version_s(cfg), hop_s=measure_hop_s(broker.url),
                       host_cores=2)  # the agents share this machine's 2 cores
    report = []
    with ProxyHost() as host:
        for algo, job in jobs.items():
            real = real_run(broker, host, tmp_path, f"real-{algo}", job)
            sim = simulate(tmp_path, AGENTS, f"sim-{algo}", versions=VERSIONS,
                           up=LinkSpec(LATENCY), down=LinkSpec(LATENCY), algo=algo,
                           local_steps=10, period=10, delay=20, **calibration).events
            # Time from version 1 (process start-up is not modelled) to each later version.
            # A burst of windows closing together may overshoot max_versions by a few.
            assert len(real) >= VERSIONS and len(sim) >= VERSIONS
            real, sim = real[:VERSIONS], sim[:VERSIONS]
            real_t = np.array([e["time"] for e in real]) - real[0]["time"]
            sim_t = np.array([e["time"] for e in sim]) - sim[0]["time"]
            ratio = sim_t[-1] / real_t[-1]
            # A burst of versions is evaluated once (the last): compare where both evaluated.
            pairs = zip(real, sim, strict=True)
            acc_gap = np.array([abs(r["accuracy"] - s["accuracy"]) for r, s in pairs
                                if r["accuracy"] is not None and s["accuracy"] is not None])
            report.append(f"{algo}: real {real_t[-1]:.2f} s, sim {sim_t[-1]:.2f} s "
                          f"(ratio {ratio:.3f}), mean |accuracy gap| {acc_gap.mean():.3f}")
            print(report[-1])
            assert 0.85 <= ratio <= 1.15, report
            mid = VERSIONS // 2  # halfway, so a wrong slope cannot hide behind the end point
            assert 0.8 <= sim_t[mid] / real_t[mid] <= 1.2, report
            # Same shards, seeds and algorithm; only mini-batch order and timing may differ.
            assert len(acc_gap) >= VERSIONS // 2 and acc_gap.mean() <= 0.06, report
