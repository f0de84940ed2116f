"""fl-export: turn a run's global model into a file that runs without fleetfl.

`fl-export RUN_DIR [--version N] [--format state_dict|torchscript|onnx] [--out PATH]`

The run directory holds flat float32 vectors (checkpoint.msgpack, models/v000012.npy); this
command rebuilds the task's model, fills in the vector and writes it as a torch state_dict, a
TorchScript module or an ONNX graph, plus `<out>.json` metadata. It then loads the file back
with plain torch / onnxruntime (no fleetfl code) and compares its outputs on random inputs
with the model fleetfl built: what is written is what was trained, or the command fails.

Exit codes: 0 written and verified; 1 export or verification failed; 2 bad run directory,
task, fingerprint, version or parameters.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from fleetfl.coordinator.rundir import CheckpointError, RunDir
from fleetfl.shared.core.version import add_version_flag
from fleetfl.shared.learn.torch_binding import bind_flat
from fleetfl.shared.tasks.task import Task, TaskError, fingerprint, load_task

# File suffix per format. TorchScript gets its own so that exporting both .pt formats with
# the default names does not overwrite one with the other.
FORMATS = {"state_dict": ".pt", "torchscript": ".torchscript.pt", "onnx": ".onnx"}
TOLERANCE = 1e-5  # max abs difference between the file's outputs and fleetfl's
VERIFY_BATCH = 16
# Export from a batch of 2, verify on 16: a batch size baked into the file shows up as a
# failure (a batch of 1 would also let torch.export specialise the batch dimension to 1).
EXAMPLE_BATCH = 2
ONNX_INPUT, ONNX_OUTPUT = "input", "output"


class ExportError(Exception):
    """A clear, expected failure: printed without a traceback, exits with `code`."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Source:
    """What is exported: the task, its model holding the chosen parameters, and where from."""

    ref: str
    task: Task
    fingerprint: str
    seed: int
    model: nn.Module  # parameters bound to the flat vector, as the coordinator has them
    version: int


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fl-export",
        description="Write a run's global model as a file for inference without fleetfl.")
    add_version_flag(p, "-V", "--program-version")  # --version N is the model's
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--version", type=int, default=None, metavar="N",
                   help="model version from RUN_DIR/models/ (default: the checkpoint's)")
    p.add_argument("--format", choices=list(FORMATS), default="state_dict",
                   help="state_dict (default; needs the model's code to load), torchscript "
                   "(plain torch loads it), onnx (onnxruntime runs it)")
    p.add_argument("--out", type=Path, default=None, metavar="PATH",
                   help="output file (default: RUN_DIR/export/<task>-v<version><suffix>)")
    return p.parse_args(argv)


def read_job(run_dir: Path) -> dict:
    """The `job` section of the run's config.yaml."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ExportError(f"{run_dir} is not a run directory: no config.yaml")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ExportError(f"cannot read {path}: {exc}") from None
    job = config.get("job") if isinstance(config, dict) else None
    if not isinstance(job, dict) or not job.get("task"):
        raise ExportError(f"{path} names no task (job.task)")
    if not job.get("task_fingerprint"):
        raise ExportError(f"{path} has no job.task_fingerprint to check the task against")
    return job


def load_run_task(job: dict) -> tuple[Task, nn.Module, np.ndarray, str]:
    """The installed task, its model bound to a flat vector, and its fingerprint, which must
    be the run's: another layout would make the parameters meaningless."""
    ref, expected = str(job["task"]), str(job["task_fingerprint"])
    try:
        task = load_task(ref)
        model = task.build_model(int(job.get("seed", 0)))
    except Exception as exc:  # TaskError, or the user's module failing on import
        detail = str(exc) if isinstance(exc, TaskError) else f"{type(exc).__name__}: {exc}"
        raise ExportError(f"cannot load the run's task {ref!r} (the run used fingerprint "
                          f"{expected}): {detail}") from None
    flat, _ = bind_flat(model)
    found = fingerprint(task, model)
    if found != expected:
        raise ExportError(f"task {ref!r} installed here has fingerprint {found}, but the run "
                          f"used {expected}: install the task version the run trained")
    return task, model, flat, found


def available(run: RunDir, checkpoint_version: int | None) -> str:
    kept = ", ".join(map(str, run.saved_versions())) or "none"
    latest = "none" if checkpoint_version is None else str(checkpoint_version)
    return f"kept in {run.path / 'models'}: {kept}; checkpoint: {latest}"


def select_params(run: RunDir, version: int | None) -> tuple[int, np.ndarray]:
    """`version`'s parameters from models/ (or the checkpoint's own version); by default the
    checkpoint, i.e. the latest version."""
    try:
        checkpoint = run.load_checkpoint()
    except CheckpointError as exc:  # damaged: the kept models may still serve
        if version is None and not run.saved_versions():
            raise ExportError(f"{run.path}: the checkpoint cannot be read ({exc}) and no "
                              "models are kept") from None
        print(f"fl-export: the checkpoint cannot be read ({exc}); using models/",
              file=sys.stderr)
        checkpoint = None
    latest = None if checkpoint is None else int(checkpoint[1]["version"])
    if version is None:
        if checkpoint is not None:
            return latest, checkpoint[0]
        if not run.saved_versions():
            raise ExportError(f"{run.path} has no checkpoint and no kept models")
        version = run.saved_versions()[-1]
    if version in run.saved_versions():
        return version, run.load_model(version)
    if checkpoint is not None and version == latest:
        return version, checkpoint[0]
    raise ExportError(f"no model of version {version} ({available(run, latest)})")


def check_params(params: np.ndarray, size: int, version: int) -> None:
    if params.shape != (size,):
        raise ExportError(f"version {version} has {params.size} parameters, the model {size}")
    bad = np.flatnonzero(~np.isfinite(params))
    if bad.size:
        raise ExportError(f"version {version} has {bad.size} non-finite parameters (NaN or "
                          f"inf, first at index {bad[0]}): refusing to export a broken model")


def load_source(args: argparse.Namespace) -> Source:
    run_dir: Path = args.run_dir
    if not run_dir.is_dir():
        raise ExportError(f"no run directory {run_dir}")
    job = read_job(run_dir)
    task, model, flat, found = load_run_task(job)
    version, params = select_params(RunDir(run_dir), args.version)
    check_params(params, flat.size, version)
    flat[:] = params
    model.eval()
    return Source(str(job["task"]), task, found, int(job.get("seed", 0)), model, version)


def detached_copy(source: Source) -> nn.Module:
    """A fresh model with the chosen weights in tensors of their own: the bound model's
    parameters are views into one flat buffer, which the saved file would otherwise carry
    over (one shared storage) and which exporters are not written for."""
    model = source.task.build_model(source.seed)
    state = {k: v.detach().clone() for k, v in source.model.state_dict().items()}
    model.load_state_dict(state)
    return model.eval()


def example_inputs(task: Task, batch: int, seed: int = 0) -> torch.Tensor:
    """Inputs of the task's shape: float standard normal, int64 codes in [0, 2)."""
    if task.input_shape is None:
        raise ExportError(f"task {task.label} declares no input_shape, needed to trace and "
                          "verify the export")
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, *task.input_shape)
    if task.input_dtype == "int64":
        return torch.randint(0, 2, shape, generator=gen, dtype=torch.int64)
    if task.input_dtype == "float32":
        return torch.randn(shape, generator=gen, dtype=torch.float32)
    raise ExportError(f"task {task.label}: unsupported input_dtype {task.input_dtype!r}")


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """Silence exporter chatter (deprecation notices for torch.jit, the ONNX exporter's
    'torchvision is not installed'): the command's own lines say what happened."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def write_state_dict(model: nn.Module, task: Task, out: Path) -> str:
    torch.save(model.state_dict(), out)
    return "torch.save"


def write_torchscript(model: nn.Module, task: Task, out: Path) -> str:
    """Script (keeps control flow); trace from example inputs if scripting fails."""
    with quiet_torch():
        try:
            module = torch.jit.script(model)
            how = "torch.jit.script"
        except Exception as exc:  # scripting rejects much of Python; tracing does not
            print(f"torch.jit.script failed ({type(exc).__name__}: {str(exc).splitlines()[0]})"
                  "; falling back to torch.jit.trace")
            module = torch.jit.trace(model, example_inputs(task, EXAMPLE_BATCH))
            how = "torch.jit.trace"
    module.save(str(out))
    return how


def write_onnx(model: nn.Module, task: Task, out: Path) -> str:
    """torch.export-based exporter (torch's default, needs onnxscript), batch dimension
    dynamic; the legacy TorchScript-based exporter if that one fails on this model."""
    example = (example_inputs(task, EXAMPLE_BATCH),)
    names = {"input_names": [ONNX_INPUT], "output_names": [ONNX_OUTPUT]}
    with quiet_torch():
        try:
            import onnxscript  # noqa: F401  (the dynamo exporter's dependency)
        except ImportError:
            raise ExportError("ONNX export needs onnxscript and onnx: "
                              "pip install 'fleetfl[export]'") from None
        try:
            program = torch.onnx.export(model, example, None, dynamo=True, verbose=False,
                                        dynamic_shapes=({0: torch.export.Dim("batch")},),
                                        **names)
            program.save(str(out))  # one file: weights inline unless the model is > 2 GB
            return "torch.onnx.export(dynamo=True)"
        except Exception as exc:
            print(f"the torch.export-based ONNX exporter failed ({type(exc).__name__}: "
                  f"{str(exc).splitlines()[0] if str(exc) else ''}); trying the legacy one")
        torch.onnx.export(model, example, str(out), dynamo=False, **names,
                          dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}})
        return "torch.onnx.export(dynamo=False)"


WRITERS = {"state_dict": write_state_dict, "torchscript": write_torchscript,
           "onnx": write_onnx}


def reload_outputs(fmt: str, out: Path, source: Source, x: torch.Tensor) -> np.ndarray | None:
    """The written file's outputs on `x`, loaded with plain torch / onnxruntime only (no
    fleetfl code in the path); None when the check cannot run here."""
    if fmt == "state_dict":
        fresh = source.task.build_model(source.seed + 1)  # other init: loading must matter
        fresh.load_state_dict(torch.load(out, weights_only=True))
        with torch.no_grad():
            return fresh.eval()(x).numpy()
    if fmt == "torchscript":
        with quiet_torch(), torch.no_grad():
            return torch.jit.load(str(out)).eval()(x).numpy()
    try:
        import onnxruntime
    except ImportError:
        print("note: onnxruntime is not installed, the exported ONNX file was not checked "
              "(pip install 'fleetfl[export]')")
        return None
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def verify(fmt: str, out: Path, source: Source) -> float | None:
    """Max abs difference between the file's outputs and fleetfl's model on VERIFY_BATCH
    example inputs; ExportError(code 1) above TOLERANCE."""
    x = example_inputs(source.task, VERIFY_BATCH, seed=1)
    with torch.no_grad():
        expected = source.model(x).numpy()
    got = reload_outputs(fmt, out, source, x)
    if got is None:
        return None
    if got.shape != expected.shape:
        raise ExportError(f"{out}: outputs of shape {got.shape}, expected {expected.shape}", 1)
    diff = float(np.max(np.abs(got.astype(np.float64) - expected))) if got.size else 0.0
    print(f"checked {out.name}: max abs difference {diff:.3g} on {VERIFY_BATCH} inputs "
          f"(tolerance {TOLERANCE:g})")
    if not diff <= TOLERANCE:  # `not <=` also catches NaN
        raise ExportError(f"{out}: outputs differ from the trained model by {diff:.3g} "
                          f"(> {TOLERANCE:g})", 1)
    return diff


def checked(fmt: str, out: Path, source: Source) -> float | None:
    """verify(), removing the file if it fails: a wrong model must not be left to deploy."""
    if source.task.input_shape is None:
        print(f"note: task {source.task.label} declares no input_shape; outputs not checked")
        return None
    try:
        return verify(fmt, out, source)
    except Exception as exc:
        out.unlink(missing_ok=True)
        if isinstance(exc, ExportError):
            raise ExportError(f"{exc}; removed {out}", exc.code) from None
        raise ExportError(f"cannot load {out} back to check it ({type(exc).__name__}: "
                          f"{exc}); removed it", 1) from exc


def version_metrics(run_dir: Path, task: Task, version: int) -> dict:
    """The version's central (loss and the task's metrics) and federated (fed_*) metrics
    from events.jsonl, as logged; empty if the version has no event line."""
    central = {"loss", "accuracy", *task.metrics}
    for event in RunDir(run_dir).events():
        if event.get("version") == version:
            return {k: v for k, v in event.items() if k in central or k.startswith("fed_")}
    return {}


def load_hint(fmt: str, out: Path, ref: str) -> str:
    if fmt == "state_dict":
        return (f"m = fleetfl.shared.tasks.task.load_task({ref!r}).model(); "
                f"m.load_state_dict(torch.load({out.name!r}, weights_only=True)); m.eval()")
    if fmt == "torchscript":
        return f"m = torch.jit.load({out.name!r}).eval(); y = m(x)"
    return (f"y = onnxruntime.InferenceSession({out.name!r})"
            f".run(None, {{{ONNX_INPUT!r}: x}})[0]")


def metadata(args: argparse.Namespace, source: Source, out: Path, how: str,
             diff: float | None) -> dict:
    task = source.task
    return {
        "task": source.ref, "task_name": task.name, "task_version": task.version,
        "fingerprint": source.fingerprint, "model_version": source.version,
        "format": args.format, "file": out.name, "written_with": how,
        "input_shape": None if task.input_shape is None else list(task.input_shape),
        "input_dtype": task.input_dtype,
        "onnx_input": ONNX_INPUT if args.format == "onnx" else None,
        "metrics": version_metrics(args.run_dir, task, source.version),
        "parameters": sum(p.numel() for p in source.model.parameters()),
        "torch_version": torch.__version__,
        "verified_max_abs_diff": diff,
        "load": load_hint(args.format, out, source.ref),
    }


def json_safe(value: object) -> object:
    """NaN/inf metrics as null: strict JSON readers on a device reject bare NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    return value


def export(args: argparse.Namespace) -> None:
    source = load_source(args)
    out: Path = args.out or (args.run_dir / "export" /
                             f"{source.task.name}-v{source.version}{FORMATS[args.format]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        how = WRITERS[args.format](detached_copy(source), source.task, out)
    except ExportError:
        raise
    except Exception as exc:  # an exporter's own failure: say which model and format
        raise ExportError(f"{args.format} export of {source.task.label} failed: "
                          f"{type(exc).__name__}: {exc}", 1) from exc
    print(f"wrote {out} ({args.format} via {how}, {source.task.label} version "
          f"{source.version})")
    diff = checked(args.format, out, source)
    meta_path = out.with_name(out.name + ".json")
    meta_path.write_text(json.dumps(json_safe(metadata(args, source, out, how, diff)),
                                    indent=2) + "\n")
    print(f"wrote {meta_path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        export(args)
    except ExportError as exc:
        print(f"fl-export: error: {exc}", file=sys.stderr)
        return exc.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
