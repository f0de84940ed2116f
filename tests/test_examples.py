"""The examples in examples/, run as their READMEs say: device folders built by the example's
own script, a coordinator with no test set, four agents over a real broker each reading its
own folder, federated evaluation up to a target, then `fl-export` checked outside fleetfl.

Each agent runs with a sitecustomize.py that logs every file or folder it opens or lists under
the devices' root (Python audit events), so the test sees that no agent read another device's
data, and that the coordinator read none at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from test_integration import finish, make_fleet

from fleetfl.coordinator.rundir import RunDir
from fleetfl.shared.learn.torch_binding import bind_flat
from fleetfl.shared.tasks.task import Task, load_task

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              # torch 2.13 marks torch.jit deprecated; fl-export's file still loads
              pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")]

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BIN = Path(sys.executable).parent  # the venv's console scripts (fl-export)

# Put first on an agent's PYTHONPATH: Python imports it at start-up (site), before any fleetfl
# code runs. Audit events name the path as given; relative ones are made absolute here.
SITECUSTOMIZE = textwrap.dedent('''
    import os
    import sys


    def _install():
        root = os.environ.get("FLEETFL_AUDIT_ROOT")
        if not root:
            return
        argv = sys.argv
        name = (argv[argv.index("--agent-id") + 1] if "--agent-id" in argv[:-1]
                else f"pid{os.getpid()}")
        # opened before the hook exists, and writing raises no audit event: no recursion
        log = open(os.path.join(os.environ["FLEETFL_AUDIT_LOG"], name + ".txt"), "a",
                   buffering=1)
        inside = os.path.join(root, "")

        def hook(event, args):
            if event not in ("open", "os.listdir", "os.scandir") or not args:
                return
            try:
                path = args[0]
                if path is None or isinstance(path, int):  # a file descriptor
                    return
                path = os.path.abspath(os.fsdecode(os.fspath(path)))
            except Exception:
                return
            if path == root or path.startswith(inside):
                log.write(f"{event} {path}\\n")

        sys.addaudithook(hook)


    _install()
''')

# Runs in `python -I`: plain torch loads the TorchScript file; fleetfl is never imported.
LOADER = textwrap.dedent('''
    import sys
    import numpy as np
    import torch
    path, x_path, y_path = sys.argv[1:]
    model = torch.jit.load(path).eval()
    with torch.no_grad():
        y = model(torch.from_numpy(np.load(x_path))).numpy()
    np.save(y_path, y)
    loaded = [m for m in sys.modules if m == "fleetfl" or m.startswith("fleetfl.")]
    assert not loaded, loaded
''')


@dataclass
class Example:
    folder: Path
    task_ref: str
    make_args: list[str]  # make_devices.py flags
    target: float  # federated accuracy the run must reach (measured: see the tests)
    max_versions: int


def make_devices(example: Example, root: Path) -> tuple[list[Path], float]:
    """The example's own script builds the device folders; returns them and the wall clock
    time it started."""
    started = time.time()
    done = subprocess.run([sys.executable, str(example.folder / "make_devices.py"), str(root),
                           *example.make_args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    devices = sorted(p for p in root.iterdir() if p.is_dir())
    assert [d.name for d in devices] == ["pi01", "pi02", "pi03", "pi04"], done.stdout
    return devices, started


def run_fleet(broker, tmp_path: Path, example: Example, devices: list[Path]
              ) -> tuple[RunDir, list[dict], Path, str]:
    """Coordinator (no test set) and one agent per device folder, every process with the
    audit sitecustomize; returns the run, its events, the audit logs and the coordinator's
    log."""
    audit, opened = tmp_path / "audit", tmp_path / "opened"
    audit.mkdir()
    opened.mkdir()
    (audit / "sitecustomize.py").write_text(SITECUSTOMIZE)
    run = example.folder.name
    args = ["--task", example.task_ref, "--min-agents", str(len(devices)),
            "--max-versions", str(example.max_versions),
            "--target-accuracy", str(example.target)]
    with make_fleet(broker, tmp_path, run, args) as fleet:
        path = [str(audit), str(example.folder), os.environ.get("PYTHONPATH", "")]
        fleet.env.update(PYTHONPATH=os.pathsep.join(p for p in path if p),
                         FLEETFL_AUDIT_ROOT=str(devices[0].parent), FLEETFL_AUDIT_LOG=str(opened))
        fleet.start_coordinator()
        for i, device in enumerate(devices):
            # LocalFleet also passes --shard i/n; with --data the agent ignores it
            fleet.start_agent(i, len(devices), agent_id=device.name,
                              extra=["--data", str(device)])
        events = finish(fleet, timeout=150)
        coordinator_log = fleet.log("coordinator")
    return RunDir(tmp_path / "runs" / run), events, opened, coordinator_log


def assert_each_agent_read_only_its_folder(opened: Path, devices: list[Path]) -> None:
    for device in devices:
        log = opened / f"{device.name}.txt"
        assert log.is_file(), f"no audit log for {device.name}: the hook did not run"
        paths = [Path(line.split(" ", 1)[1]) for line in log.read_text().splitlines()]
        assert paths, f"{device.name} opened nothing under the devices' root"
        foreign = sorted({str(p) for p in paths if not p.is_relative_to(device)})
        assert not foreign, f"{device.name} opened other devices' files: {foreign[:5]}"
        # the log sees the real reads: the training and the validation data
        assert any(p != device and "val" in p.relative_to(device).parts[0] for p in paths)
        assert any(p != device and "train" in p.relative_to(device).parts[0] for p in paths)
    names = {f"{d.name}.txt" for d in devices}
    others = {p.name: p.read_text() for p in opened.iterdir() if p.name not in names}
    assert others, "the coordinator ran without the audit hook"
    assert not any(others.values()), f"a non-agent process read device data: {others}"


def assert_rose_to_target(events: list[dict], example: Example, log: str,
                          val_samples: int) -> int:
    """The run stopped on --target-accuracy applied to fed_accuracy; returns the version
    that reached it."""
    assert all(e["accuracy"] is None for e in events)  # no central test set
    fed = {e["version"]: e["fed_accuracy"] for e in events if "fed_accuracy" in e}
    assert all(e["fed_agents"] == 4 and e["fed_samples"] == val_samples
               for e in events if "fed_accuracy" in e)
    hit = min((v for v, acc in fed.items() if acc >= example.target), default=None)
    curve = " ".join(f"{v}:{acc:.3f}" for v, acc in sorted(fed.items()))
    assert hit is not None, f"fed_accuracy never reached {example.target}: {curve}"
    assert fed[min(fed)] < example.target, f"no rise: {curve}"  # it learned, not at once
    assert f"reached target accuracy {example.target} at version {hit}" in log, log[-2000:]
    assert len(events) < example.max_versions
    print(f"{example.folder.name}: fed_accuracy {curve}")
    return hit


def coordinator_outputs(task: Task, run: RunDir, x: np.ndarray) -> tuple[int, np.ndarray]:
    """What the coordinator's last model computes on `x`: the checkpoint's flat vector
    bound into the task's model."""
    params, state = run.load_checkpoint()
    model = task.build_model(0)  # the job's seed (the default)
    flat, _ = bind_flat(model)
    flat[:] = params
    with torch.no_grad():
        return int(state["version"]), model.eval()(torch.from_numpy(x)).numpy()


def assert_export_matches(run: RunDir, example: Example, x: np.ndarray, tmp: Path,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    env = dict(os.environ, PYTHONPATH=str(example.folder))  # fl-export imports the task
    done = subprocess.run([str(BIN / "fl-export"), str(run.path), "--format", "torchscript"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    metas = sorted((run.path / "export").glob("*.json"))
    assert len(metas) == 1, metas
    meta = json.loads(metas[0].read_text())
    exported = run.path / "export" / meta["file"]
    x_path, y_path = tmp / "x.npy", tmp / "y.npy"
    np.save(x_path, x)
    done = subprocess.run([sys.executable, "-I", "-c", LOADER, str(exported), str(x_path),
                           str(y_path)], cwd=tmp, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    monkeypatch.syspath_prepend(str(example.folder))
    version, expected = coordinator_outputs(load_task(example.task_ref), run, x)
    assert meta["model_version"] == version
    got = np.load(y_path)
    assert got.shape == expected.shape
    assert float(np.max(np.abs(got - expected))) <= 1e-5


def validation_batch(example: Example, devices: list[Path], monkeypatch, per_device: int
                     ) -> tuple[np.ndarray, int]:
    """Real validation inputs, `per_device` from each device as the task reads them, and
    the fleet's total number of validation samples."""
    monkeypatch.syspath_prepend(str(example.folder))
    task = load_task(example.task_ref)
    parts, total = [], 0
    for device in devices:
        samples = task.validation(device)
        total += len(samples)
        parts.append(samples.batch(np.arange(min(per_device, len(samples))))[0])
    return np.concatenate(parts), total


def run_example(broker, tmp_path: Path, monkeypatch, example: Example) -> None:
    devices, started = make_devices(example, tmp_path / "devices")
    run, events, opened, log = run_fleet(broker, tmp_path, example, devices)
    print(f"{example.folder.name}: first version {events[0]['wall'] - started:.1f} s after "
          f"make_devices.py started, {len(events)} versions")
    assert_each_agent_read_only_its_folder(opened, devices)
    x, val_samples = validation_batch(example, devices, monkeypatch, per_device=32)
    assert_rose_to_target(events, example, log, val_samples)
    assert_export_matches(run, example, x, tmp_path, monkeypatch)


def test_the_audit_hook_sees_a_read_of_another_device(tmp_path):
    """The instrument itself: a process posing as agent pi01 that lists and opens pi02's
    data is logged, reads outside the root are not."""
    (tmp_path / "audit").mkdir()
    (tmp_path / "audit" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    root, opened = tmp_path / "devices", tmp_path / "opened"
    (root / "pi02").mkdir(parents=True)
    opened.mkdir()
    (root / "pi02" / "train.csv").write_text("a,b\n")
    (tmp_path / "elsewhere.txt").write_text("")
    code = ("import os, pathlib; os.listdir('devices/pi02'); open('elsewhere.txt').close(); "
            "pathlib.Path('devices/pi02/train.csv').read_text()")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "audit"), FLEETFL_AUDIT_ROOT=str(root),
               FLEETFL_AUDIT_LOG=str(opened))
    subprocess.run([sys.executable, "-c", code, "--agent-id", "pi01"], cwd=tmp_path, env=env,
                   check=True, timeout=60)
    assert (opened / "pi01.txt").read_text().splitlines() == [
        f"os.listdir {root / 'pi02'}", f"open {root / 'pi02' / 'train.csv'}"]


def test_image_folders_example(broker, tmp_path, monkeypatch):
    # Measured with these sizes (1,500 PNGs per device, Dirichlet 0.5 label skew), make seeds
    # 0-4 with the same coordinator --seed, 30 versions: fed_accuracy first >= 0.83 at
    # versions 7, 6, 9, 3, 8; best 0.882, 0.868, 0.882, 0.916, 0.863. Seed 0 (this test):
    # 0.552 at version 1, 0.843 at 7. 0.80 (the figure) came at versions 2-7.
    example = Example(EXAMPLES / "image_folders", "fashion_task:task",
                      ["--train", "1500", "--alpha", "0.5", "--seed", "0"], target=0.83,
                      max_versions=40)
    run_example(broker, tmp_path, monkeypatch, example)


def test_sensor_csv_example(broker, tmp_path, monkeypatch):
    # Measured (all 569 rows over 4 devices, Dirichlet 1.0 class skew), seeds 0-4, 30
    # versions: fed_accuracy first >= 0.95 at versions 3, 2, 1, 2, 2 (0.912 - 0.956 at
    # version 1); best 0.982, 0.965, 1.000, 0.982, 0.973. Seed 0 (this test): 0.912 at
    # version 1, 0.974 at 3. The fleet's majority class is 63% of the samples.
    example = Example(EXAMPLES / "sensor_csv", "cancer_task:task",
                      ["--alpha", "1.0", "--seed", "0"], target=0.95, max_versions=40)
    run_example(broker, tmp_path, monkeypatch, example)
