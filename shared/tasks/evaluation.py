"""A task's loss and metrics over a whole set of samples, sample-weighted over batches."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fleetfl.shared.tasks.samples import Samples, batches
from fleetfl.shared.tasks.task import Task


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A batch for the model: floats as float32, integers (class ids, character codes) as
    they are (int64 for targets is the loss's business)."""
    if np.issubdtype(array.dtype, np.floating):
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return torch.from_numpy(np.ascontiguousarray(array))


def target_tensor(array: np.ndarray) -> torch.Tensor:
    """Targets: class ids as int64 (what cross-entropy wants), regression targets as float32."""
    if np.issubdtype(array.dtype, np.integer):
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def evaluate(task: Task, model: nn.Module, samples: Samples, batch_size: int = 1000
             ) -> dict[str, float]:
    """`{"loss": ..., metric: ...}` of `model` on `samples`: each batch's mean weighted by its
    size, so the result is the mean over samples."""
    if len(samples) == 0:
        raise ValueError(f"{samples.source}: no samples to evaluate on")
    sums = dict.fromkeys(["loss", *task.metrics], 0.0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, y in batches(samples, batch_size):
                logits, target = model(as_tensor(x)), target_tensor(y)
                sums["loss"] += float(task.loss(logits, target)) * len(y)
                for name, metric in task.metrics.items():
                    sums[name] += float(metric(logits, target)) * len(y)
    finally:
        model.train(was_training)
    return {name: total / len(samples) for name, total in sums.items()}
