"""fl-export: a real run directory (no MQTT), each format loaded back in a separate Python
that never imports fleetfl, outputs compared with fleetfl's model on the digits test images.

The tasks live in temporary modules on sys.path, as a user's own task package would.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.datasets import load_digits

from fleetfl.coordinator import export
from fleetfl.coordinator.rundir import RunDir
from fleetfl.shared.learn.torch_binding import bind_flat
from fleetfl.shared.tasks.task import Task, fingerprint, load_task

# torch 2.13 marks torch.jit deprecated; the file format still loads with plain torch
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")

SEED = 5
HIDDEN = 32

DIGITS_TASK = '''
from torch import nn
from fleetfl.shared.tasks.task import Task

def model():
    return nn.Sequential(nn.Linear(64, {hidden}), nn.ReLU(), nn.Linear({hidden}, 10))

task = Task(name="tinydigits", version=1, model=model, input_shape=(64,))
'''

# forward(**options) is beyond torch.jit.script: fl-export must fall back to tracing
UNSCRIPTABLE_TASK = '''
from torch import nn
from fleetfl.shared.tasks.task import Task

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(64, 10)

    def forward(self, x, **options):
        return self.layer(x).relu()

task = Task(name="untidy", version=1, model=Net, input_shape=(64,))
'''

CHARS_TASK = '''
from torch import nn
from fleetfl.shared.tasks.task import Task

class CharNet(nn.Module):
    """shared/learn/models.py's CharLSTM, smaller: int64 codes in, next-character logits out."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(12, 4)
        self.lstm = nn.LSTM(4, 16, batch_first=True)
        self.head = nn.Linear(16, 12)

    def forward(self, x):
        out, _ = self.lstm(self.embed(x.long()))
        return self.head(out[:, -1])

task = Task(name="tinychars", version=2, model=CharNet, input_shape=(10,),
            input_dtype="int64")
'''

# Runs in `python -I`: loads an exported file with plain torch / onnxruntime, saves outputs.
LOADER = textwrap.dedent('''
    import sys
    import numpy as np
    fmt, path, x_path, y_path = sys.argv[1:]
    x = np.load(x_path)
    if fmt == "onnx":  # a device needs onnxruntime and numpy only
        import onnxruntime
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        y = session.run(None, {"input": x})[0]
        assert "torch" not in sys.modules
    else:
        import torch
        from torch import nn
        if fmt == "state_dict":  # the architecture, written out by hand
            model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
            model.load_state_dict(torch.load(path, weights_only=True))
        else:
            model = torch.jit.load(path)
        with torch.no_grad():
            y = model.eval()(torch.from_numpy(x)).numpy()
    np.save(y_path, y)
    assert "fleetfl" not in sys.modules, [m for m in sys.modules if "fleetfl" in m]
''')


def write_module(folder: Path, name: str, source: str) -> None:
    (folder / f"{name}.py").write_text(source)


def digits_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    return x[:1400], y[:1400], x[1400:], y[1400:]


def train(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, steps: int) -> None:
    """Plain full-batch Adam: weights far from the init in well under a second."""
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def write_run(path: Path, ref: str, task: Task, params: dict[int, np.ndarray],
              fp: str | None = None) -> RunDir:
    """A run directory as the coordinator leaves it: config, checkpoint (the last version
    in `params`), kept models (the others) and one event line per version."""
    run = RunDir(path)
    if fp is None:
        fp = fingerprint(task, task.build_model(SEED))
    run.write_config({"job": {"task": ref, "task_fingerprint": fp, "seed": SEED}})
    *older, latest = sorted(params)
    run.save_checkpoint(params[latest], {"version": latest})
    for version in older:
        run.save_model(version, params[version])
    return run


def fleetfl_outputs(task: Task, params: np.ndarray, x: np.ndarray) -> np.ndarray:
    """What the coordinator's model computes: flat vector bound, parameters written in."""
    model = task.build_model(SEED)
    flat, _ = bind_flat(model)
    flat[:] = params
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x)).numpy()


def outside_fleetfl(fmt: str, path: Path, x: np.ndarray, tmp: Path) -> np.ndarray:
    """`path`'s outputs on `x` from an isolated interpreter that never imports fleetfl."""
    x_path, y_path = tmp / f"x-{path.name}.npy", tmp / f"y-{path.name}.npy"
    np.save(x_path, x)
    done = subprocess.run([sys.executable, "-I", "-c", LOADER, fmt, str(path), str(x_path),
                           str(y_path)], cwd=tmp, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return np.load(y_path)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A trained digits run (checkpoint v7, kept model v3) and its three exports."""
    root = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as mp:
        write_module(root, "export_digits_task", DIGITS_TASK.format(hidden=HIDDEN))
        write_module(root, "export_digits_wide", DIGITS_TASK.format(hidden=HIDDEN + 16))
        mp.syspath_prepend(str(root))
        task = load_task("export_digits_task:task")
        x_train, y_train, x_test, y_test = digits_data()
        model = task.build_model(SEED)
        flat, _ = bind_flat(model)
        train(model, x_train, y_train, steps=15)
        v3, acc3 = flat.copy(), accuracy(model, x_test, y_test)
        train(model, x_train, y_train, steps=150)
        v7, acc7 = flat.copy(), accuracy(model, x_test, y_test)
        run = write_run(root / "run", "export_digits_task:task", task, {3: v3, 7: v7})
        for version in range(1, 8):
            event = {"version": version, "loss": None, "accuracy": None, "fed_loss": 0.5}
            if version == 7:
                event.update(fed_accuracy=0.9, fed_samples=1400)
            run.append_event(event)
        run.append_evaluation(3, {"loss": 1.0, "accuracy": acc3})
        run.append_evaluation(7, {"loss": 0.1, "accuracy": acc7})
        codes = {fmt: export.main([str(run.path), "--format", fmt]) for fmt in export.FORMATS}
        yield {"root": root, "run": run, "task": task, "v3": v3, "v7": v7, "acc7": acc7,
               "x_test": x_test, "codes": codes, "mp": mp}


def exported(run: RunDir, fmt: str, version: int = 7) -> Path:
    return run.path / "export" / f"tinydigits-v{version}{export.FORMATS[fmt]}"


@pytest.mark.parametrize("fmt", list(export.FORMATS))
def test_export_loads_without_fleetfl(digits, fmt):
    assert digits["codes"][fmt] == 0
    path = exported(digits["run"], fmt)
    assert path.is_file()
    x = digits["x_test"]
    want = fleetfl_outputs(digits["task"], digits["v7"], x)
    got = outside_fleetfl(fmt, path, x, digits["root"])
    assert got.shape == (len(x), 10)
    assert np.abs(got - want).max() <= 1e-5
    # the trained model, not the init: it reads the digits
    assert (got.argmax(1) == load_digits().target[1400:]).mean() > 0.8


@pytest.mark.parametrize("fmt", list(export.FORMATS))
def test_metadata(digits, fmt):
    path = exported(digits["run"], fmt)
    meta = json.loads(path.with_name(path.name + ".json").read_text())
    task = digits["task"]
    assert meta["task"] == "export_digits_task:task"
    assert (meta["task_name"], meta["task_version"]) == ("tinydigits", 1)
    assert meta["fingerprint"] == fingerprint(task, task.build_model(SEED))
    assert meta["model_version"] == 7 and meta["format"] == fmt
    assert meta["input_shape"] == [64] and meta["input_dtype"] == "float32"
    assert meta["metrics"] == {"loss": 0.1, "accuracy": digits["acc7"], "fed_loss": 0.5,
                               "fed_accuracy": 0.9, "fed_samples": 1400}
    assert meta["parameters"] == 64 * HIDDEN + HIDDEN + HIDDEN * 10 + 10
    assert meta["torch_version"] == torch.__version__
    assert path.name in meta["load"]
    assert 0 <= meta["verified_max_abs_diff"] <= 1e-5


def test_older_version(digits, tmp_path, capsys):
    run, x = digits["run"], digits["x_test"]
    out = tmp_path / "old.pt"
    assert export.main([str(run.path), "--version", "3", "--format", "torchscript",
                        "--out", str(out)]) == 0
    assert "max abs difference" in capsys.readouterr().out
    with torch.no_grad():
        got = torch.jit.load(str(out))(torch.from_numpy(x)).numpy()
    assert np.abs(got - fleetfl_outputs(digits["task"], digits["v3"], x)).max() <= 1e-5
    assert np.abs(got - fleetfl_outputs(digits["task"], digits["v7"], x)).max() > 0.1
    meta = json.loads((tmp_path / "old.pt.json").read_text())
    assert meta["model_version"] == 3 and meta["metrics"]["loss"] == 1.0


def test_unknown_version(digits, capsys):
    assert export.main([str(digits["run"].path), "--version", "5"]) == 2
    err = capsys.readouterr().err
    assert "version 5" in err and ": 3;" in err and "checkpoint: 7" in err
    assert "Traceback" not in err


def copy_run(digits, name: str, ref: str, params: np.ndarray | None = None) -> RunDir:
    """The digits run's config and checkpoint under another task reference / parameters."""
    src = digits["run"]
    job = yaml.safe_load((src.path / "config.yaml").read_text())["job"]
    return write_run(digits["root"] / name, ref, digits["task"],
                     {7: digits["v7"] if params is None else params},
                     fp=job["task_fingerprint"])


def test_fingerprint_mismatch(digits, capsys):
    run = copy_run(digits, "wide", "export_digits_wide:task")
    assert export.main([str(run.path)]) == 2
    err = capsys.readouterr().err
    wide = load_task("export_digits_wide:task")
    ours = fingerprint(wide, wide.build_model(SEED))
    theirs = fingerprint(digits["task"], digits["task"].build_model(SEED))
    assert ours != theirs and ours in err and theirs in err
    assert not (run.path / "export").exists()


def test_missing_task(digits, capsys):
    run = copy_run(digits, "missing", "export_no_such_module:task")
    assert export.main([str(run.path)]) == 2
    err = capsys.readouterr().err
    assert "export_no_such_module" in err and "tinydigits@1:" in err
    assert "Traceback" not in err


def test_non_finite_params(digits, capsys):
    bad = digits["v7"].copy()
    bad[[4, 9]] = [np.nan, np.inf]
    run = copy_run(digits, "nan", "export_digits_task:task", params=bad)
    assert export.main([str(run.path), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "2 non-finite" in err and "index 4" in err
    assert not (run.path / "export").exists()


def test_failed_verification_removes_file(digits, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # any difference, even 0, is too much
    out = tmp_path / "m.pt"
    assert export.main([str(digits["run"].path), "--out", str(out)]) == 1
    assert "removed" in capsys.readouterr().err and not out.exists()


def test_int64_input_model(tmp_path, monkeypatch):
    """Character codes in, as the Shakespeare task: TorchScript and ONNX, any batch size."""
    write_module(tmp_path, "export_chars_task", CHARS_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    task = load_task("export_chars_task:task")
    size = sum(p.numel() for p in task.build_model(SEED).parameters())
    params = np.random.default_rng(0).normal(0, 0.5, size).astype(np.float32)
    run = write_run(tmp_path / "run", "export_chars_task:task", task, {2: params})
    codes = np.random.default_rng(1).integers(0, 12, (9, 10)).astype(np.int64)
    want = fleetfl_outputs(task, params, codes)
    for fmt in ("torchscript", "onnx"):
        assert export.main([str(run.path), "--format", fmt]) == 0
        path = run.path / "export" / f"tinychars-v2{export.FORMATS[fmt]}"
        got = outside_fleetfl(fmt, path, codes, tmp_path)
        assert np.abs(got - want).max() <= 1e-5, fmt
        meta = json.loads(path.with_name(path.name + ".json").read_text())
        assert meta["input_dtype"] == "int64" and meta["input_shape"] == [10]


def test_torchscript_falls_back_to_trace(tmp_path, monkeypatch, capsys):
    write_module(tmp_path, "export_untidy_task", UNSCRIPTABLE_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    task = load_task("export_untidy_task:task")
    size = sum(p.numel() for p in task.build_model(SEED).parameters())
    params = np.random.default_rng(2).normal(0, 1, size).astype(np.float32)
    run = write_run(tmp_path / "run", "export_untidy_task:task", task, {1: params})
    out = tmp_path / "untidy.pt"
    assert export.main([str(run.path), "--format", "torchscript", "--out", str(out)]) == 0
    assert "falling back to torch.jit.trace" in capsys.readouterr().out
    meta = json.loads((tmp_path / "untidy.pt.json").read_text())
    assert meta["written_with"] == "torch.jit.trace"
    x = digits_data()[2][:7]  # traced from a batch of 2, run on 7
    with torch.no_grad():
        got = torch.jit.load(str(out))(torch.from_numpy(x)).numpy()
    assert np.abs(got - fleetfl_outputs(task, params, x)).max() <= 1e-5


def test_onnx_without_onnxruntime(digits, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    out = tmp_path / "m.onnx"
    assert export.main([str(digits["run"].path), "--format", "onnx", "--out", str(out)]) == 0
    assert "onnxruntime is not installed" in capsys.readouterr().out and out.is_file()
    assert json.loads((tmp_path / "m.onnx.json").read_text())["verified_max_abs_diff"] is None


def test_a_damaged_checkpoint_is_a_clear_error_or_falls_back_to_kept_models(
        digits, tmp_path, capsys) -> None:
    run = write_run(tmp_path / "run", "export_digits_task:task", digits["task"],
                    {3: digits["v3"], 7: digits["v7"]})
    (run.path / "checkpoint.msgpack").write_bytes(b"\0" * 64)
    assert export.main([str(run.path), "--format", "state_dict", "--version", "3"]) == 0
    assert "the checkpoint cannot be read" in capsys.readouterr().err
    run.model_path(3).unlink()
    assert export.main([str(run.path), "--format", "state_dict"]) == 2
    assert "checkpoint cannot be read" in capsys.readouterr().err
