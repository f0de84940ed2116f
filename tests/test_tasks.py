"""The task API: tasks found by import path or entry point, fingerprints, the refusals an
agent gives when the job's task is missing or differs or its data is broken, and a user's task
from a package outside fleetfl trained end to end by agents that read only their own folders,
with federated evaluation and a device joining mid-run."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from fleetfl.coordinator.local_fleet import LocalFleet
from fleetfl.coordinator.rundir import RunDir
from fleetfl.shared.config import ConfigError, load_config
from fleetfl.shared.learn.data import partition
from fleetfl.shared.tasks.task import Task, TaskError, fingerprint, load_task

TASK_MODULE = """
from torch import nn

from fleetfl.shared.tasks import Task
from fleetfl.shared.tasks.formats import npz_arrays


def model():
    return nn.Sequential(nn.Linear(64, {hidden}), nn.ReLU(), nn.Linear({hidden}, 10))


task = Task(name="digits-npz", version={version}, model=model,
            train=lambda folder: npz_arrays(folder / "train.npz"),
            validation=lambda folder: npz_arrays(folder / "val.npz"),
            input_shape=(64,))
not_a_task = 42
"""


def write_task_package(root: Path, version: int = 1, hidden: int = 32) -> Path:
    """A user's task module in a folder of its own (put it on sys.path / PYTHONPATH)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "usertasks.py").write_text(TASK_MODULE.format(version=version, hidden=hidden))
    return root


def write_devices(root: Path, devices: int) -> list[Path]:
    """scikit-learn's digits dealt to `devices` folders, each with train.npz and val.npz."""
    digits = load_digits()
    x, y = (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)
    folders = []
    for i, idx in enumerate(partition(y, devices, "iid", seed=1)):
        folder = root / f"pi{i + 1:02d}"
        folder.mkdir(parents=True)
        cut = len(idx) * 4 // 5
        np.savez(folder / "train.npz", x=x[idx[:cut]], y=y[idx[:cut]])
        np.savez(folder / "val.npz", x=x[idx[cut:]], y=y[idx[cut:]])
        folders.append(folder)
    return folders


# -- finding tasks ----------------------------------------------------------------------
def test_a_task_is_found_by_import_path_and_by_entry_point(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(write_task_package(tmp_path / "pkg")))
    task = load_task("usertasks:task")
    assert isinstance(task, Task) and task.label == "digits-npz@1"
    # a distribution registering it in the fleetfl.tasks group, as a user's package would
    dist = tmp_path / "pkg" / "usertasks-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: usertasks\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[fleetfl.tasks]\nsensor = usertasks:task\n")
    assert load_task("sensor") is task
    assert load_task("digits").name == "digits"  # the built-ins come the same way


@pytest.mark.parametrize("ref, message", [
    ("nosuchmodule:task", "cannot import 'nosuchmodule'"),
    ("usertasks:missing", "has no task 'missing'"),
    ("usertasks:not_a_task", "is a int, not a fleetfl Task"),
    ("nosuchtask", "no task named 'nosuchtask'.*installed: .*digits"),
])
def test_bad_task_references_say_what_is_wrong(tmp_path, monkeypatch, ref, message):
    monkeypatch.syspath_prepend(str(write_task_package(tmp_path / "pkg")))
    with pytest.raises(TaskError, match=message):
        load_task(ref)


def test_the_fingerprint_covers_name_version_and_layer_table(tmp_path, monkeypatch):
    def fp(version: int, hidden: int) -> str:
        module = tmp_path / f"v{version}h{hidden}"
        write_task_package(module, version, hidden)
        monkeypatch.syspath_prepend(str(module))
        import importlib
        import sys
        sys.modules.pop("usertasks", None)
        importlib.invalidate_caches()
        task = load_task("usertasks:task")
        return fingerprint(task, task.build_model(seed=3))

    base = fp(1, 32)
    assert base.startswith("digits-npz@1:")
    assert fp(1, 32) == base  # weights do not matter, the layout does
    assert fp(1, 16) != base and fp(2, 32).startswith("digits-npz@2:")


def test_dataset_is_the_old_name_of_task_and_model_is_refused(tmp_path):
    assert load_config(None, {"dataset": "mnist"}).job.task == "mnist"
    config = tmp_path / "run.yaml"
    config.write_text("job:\n  dataset: fashion\n")
    assert load_config(config).job.task == "fashion"
    config.write_text("job:\n  model: lenet5\n")
    with pytest.raises(ConfigError, match="job.model is no longer a key: the task defines"):
        load_config(config)


def test_the_builtin_fashion_task_trains_through_the_task_interface(tmp_path):
    """Fashion-MNIST, the one built-in no other test trains (digits: the demo, MNIST and
    Shakespeare: their integration tests): its global data set dealt to 2 simulated agents,
    its LeNet-5 trained and evaluated on its central test split, all from the task."""
    import torch

    from fleetfl.coordinator.sim_engine import SimConfig, Simulator
    from fleetfl.shared.devtools.link_proxy import LinkSpec

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(None, {"run": "fashion", "task": "fashion", "min_agents": 2,
                                 "max_versions": 2, "local_steps": 20})
        Simulator(cfg, SimConfig(agents=2, up=LinkSpec(0.01), down=LinkSpec(0.01)),
                  run_dir=tmp_path / "fashion").run()
    finally:
        torch.set_num_threads(before)
    run = RunDir(tmp_path / "fashion")
    assert "task: fashion" in (run.path / "config.yaml").read_text()
    events = run.events()
    assert [e["version"] for e in events] == [1, 2]
    assert all(len(e["contributors"]) == 2 for e in events)
    assert events[-1]["accuracy"] > 0.3  # 10 classes: chance is 0.1 (measured: 0.41)


# -- over a real broker ---------------------------------------------------------------
def _fleet(broker, tmp_path: Path, run: str, args: list[str], pythonpath: Path) -> LocalFleet:
    fleet = LocalFleet(broker.url, run, tmp_path / "logs",
                       ["--run-dir", str(tmp_path / "runs"), "--task", "usertasks:task",
                        *args])
    fleet.env["PYTHONPATH"] = str(pythonpath)
    return fleet


def _wait_for(predicate, what: str, fleet: LocalFleet, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        assert fleet.coordinator.poll() is None, fleet.log("coordinator")[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen; coordinator log:\n"
                         + fleet.log("coordinator")[-3000:])


@pytest.mark.integration
@pytest.mark.slow
def test_users_task_trains_on_device_folders_and_a_fifth_device_joins(broker, tmp_path):
    """A task from a package outside fleetfl, 4 devices on their own folders, no central
    test set (federated evaluation), then a 5th device joins mid-run."""
    package = write_task_package(tmp_path / "pkg")
    devices = write_devices(tmp_path / "devices", 5)
    rundir = RunDir(tmp_path / "runs" / "own")
    with _fleet(broker, tmp_path, "own", ["--min-agents", "4", "--max-versions", "40",
                                          "--local-steps", "40"], package) as fleet:
        fleet.agent_args = ["--slowdown", "10"]  # digits steps take 0.3 ms: let pi05 start
        fleet.start_coordinator()
        for folder in devices[:4]:
            fleet.start_device(folder.name, folder)
        _wait_for(lambda: len(rundir.events()) >= 3, "version 3", fleet)
        fleet.start_device(devices[4].name, devices[4])
        assert fleet.wait_coordinator(timeout=120) == 0, fleet.log("coordinator")[-3000:]
        codes = fleet.wait_agents(timeout=30)
        logs = {name: fleet.log(name) for name in fleet.agents}
    assert all(code == 0 for code in codes.values()), (codes, logs)
    events = rundir.events()
    assert len(events) == 40
    joined = next(i for i, e in enumerate(events) if "pi05" in e["contributors"])
    assert 3 <= joined < 35, "the 5th device never counted, or only at the very end"
    assert all(len(e["contributors"]) == 4 for e in events[:3])
    for name, log in logs.items():  # each read its own folder, once
        assert log.count("training on ") == 1, name
        assert f"devices/{name}/train.npz" in log and "validating on" in log
    assert all(e["accuracy"] is None for e in events)  # the coordinator has no test set
    last = events[-1]
    assert last["fed_agents"] == 5 and last["fed_missing"] == 0
    total_val = sum(len(np.load(d / "val.npz")["y"]) for d in devices)
    assert last["fed_samples"] == total_val
    assert last["fed_accuracy"] >= 0.85, [e.get("fed_accuracy") for e in events]
    assert events[0].get("fed_accuracy", 1.0) < last["fed_accuracy"]


@pytest.mark.integration
def test_agents_refuse_a_missing_or_different_task_and_broken_data(broker, tmp_path):
    coordinator_pkg = write_task_package(tmp_path / "v2", version=2, hidden=32)
    other_layout = write_task_package(tmp_path / "v2-other", version=2, hidden=16)
    devices = write_devices(tmp_path / "devices", 3)
    (devices[2] / "val.npz").write_text("not a zip")
    with _fleet(broker, tmp_path, "refuse", ["--min-agents", "3", "--max-versions", "1"],
                coordinator_pkg) as fleet:
        fleet.start_coordinator()
        fleet.start_device("pi07", devices[0], env={"PYTHONPATH": str(tmp_path / "empty")})
        fleet.start_device("pi08", devices[1], env={"PYTHONPATH": str(other_layout)})
        broken = fleet.start_device("pi09", devices[2])
        coordinator_says = [
            "pi07: task digits-npz@2 not installed here",
            "pi08: task digits-npz@2 differs here: the coordinator runs digits-npz@2:",
            f"pi09: data: {devices[2] / 'val.npz'}",
        ]
        _wait_for(lambda: all(line in fleet.log("coordinator") for line in coordinator_says),
                  "the coordinator logging three refusals", fleet)
        assert broken.wait(timeout=30) == 2  # broken data: the agent exits, it never joins
        assert "val.npz" in fleet.log("pi09") and "not joining" in fleet.log("pi09")
        assert "cannot import 'usertasks'" in fleet.log("pi07")
        for name in ("pi07", "pi08"):  # they wait for another job, they do not crash-loop
            assert fleet.agents[name].poll() is None, fleet.log(name)
        assert not RunDir(tmp_path / "runs" / "refuse").events()  # nobody joined
