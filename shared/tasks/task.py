"""The task: what a user writes to federate their own problem.

A task names the model, how a device reads its own training (and validation) data from a
folder, the loss and the metrics, and optionally a central test set for the coordinator and
one global data set that demos and benches deal out as `i/n` shards (a simulation of a fleet).
Tasks are found by import path (`mypkg.tasks:sensor`) or by name in the `fleetfl.tasks` entry
point group; code never travels over MQTT, only the task's reference and fingerprint.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fleetfl.shared.core.job import ConfigError
from fleetfl.shared.tasks.samples import Samples

ENTRY_POINT_GROUP = "fleetfl.tasks"


class TaskError(ConfigError):
    """A task cannot be found, loaded or used (a bad job.task); the message says which and
    why."""


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Share of samples whose largest logit is the target class."""
    return (logits.argmax(dim=1) == target).float().mean()


@dataclass(frozen=True)
class Task:
    """One federated problem. Only `name`, `version` and `model` are required.

    - `model()`: a fresh `torch.nn.Module` (the coordinator fixes its initial weights).
    - `train(folder)` / `validation(folder)`: this device's own training / validation samples
      (`fl-agent --data FOLDER`); `validation` may be omitted or return None.
    - `test(data_dir)`: the coordinator's central test set, if it has one (else None).
    - `simulation(data_dir)`: one global `fleetfl.shared.learn.data.Dataset` that `fl-agent
      --shard i/n` deals out (demos, tests, benches): a simulated fleet.
    - `loss(logits, target)` and `metrics` (name -> batch mean) as torch functions.
    - `input_shape` / `input_dtype`: one sample's shape and dtype, for `fl-export`.
    - `fda_theta`: FDA's variance threshold for this model (bench/calibrate_fda.py).
    """

    name: str
    version: int
    model: Callable[[], nn.Module]
    train: Callable[[Path], Samples] | None = None
    validation: Callable[[Path], Samples | None] | None = None
    test: Callable[[Path | None], Samples | None] | None = None
    simulation: Callable[[Path | None], object] | None = None
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    metrics: Mapping[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = field(
        default_factory=lambda: {"accuracy": accuracy})
    input_shape: tuple[int, ...] | None = None
    input_dtype: str = "float32"
    fda_theta: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    def build_model(self, seed: int = 0) -> nn.Module:
        """The task's model with weights fixed by `seed`; the global torch RNG is untouched."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.model()
        if not isinstance(model, nn.Module):
            raise TaskError(f"task {self.label}: model() returned {type(model).__name__}, "
                            "not a torch.nn.Module")
        if not any(True for _ in model.parameters()):
            raise TaskError(f"task {self.label}: the model has no parameters to train")
        return model


def fingerprint(task: Task, model: nn.Module) -> str:
    """`name@version:hash` where the hash covers the model's layer table (names, shapes):
    two devices with the same fingerprint exchange vectors of the same layout."""
    table = [[name, list(p.shape)] for name, p in model.named_parameters()]
    digest = hashlib.sha256(json.dumps([task.name, task.version, table]).encode()).hexdigest()
    return f"{task.label}:{digest[:16]}"


def label_of(fingerprint_text: str) -> str:
    """The `name@version` part of a fingerprint (what a log line names)."""
    return fingerprint_text.split(":", 1)[0]


def load_task(ref: str) -> Task:
    """The task `ref` names: `module.path:attribute`, or a name in the `fleetfl.tasks` entry
    point group (the built-ins digits, mnist, fashion and shakespeare are registered there)."""
    if not ref:
        raise TaskError("no task given (job.task)")
    if ":" in ref:
        module_name, _, attr = ref.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise TaskError(f"cannot import {module_name!r} for task {ref!r}: {exc}") from None
        try:
            found = getattr(module, attr)
        except AttributeError:
            raise TaskError(f"module {module_name!r} has no task {attr!r}") from None
    else:
        matches = entry_points(group=ENTRY_POINT_GROUP, name=ref)
        if not matches:
            known = sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})
            raise TaskError(f"no task named {ref!r} in the {ENTRY_POINT_GROUP!r} entry points "
                            f"(installed: {', '.join(known) or 'none'}); give "
                            "'module.path:attribute' for a task in your own package")
        try:
            found = next(iter(matches)).load()
        except Exception as exc:  # a broken user package: say which, do not crash
            raise TaskError(f"task {ref!r} failed to load: {exc}") from None
    if not isinstance(found, Task):
        raise TaskError(f"{ref!r} is a {type(found).__name__}, not a fleetfl Task")
    return found
