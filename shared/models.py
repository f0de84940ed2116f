"""Small torch models that train in seconds on a Raspberry Pi, plus a shared evaluator."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MODELS", "build_model", "default_model_for", "evaluate", "lenet5", "mlp"]


def mlp(*, in_features: int = 64, hidden: int = 64, num_classes: int = 10) -> nn.Module:
    """One hidden layer; the default sizes fit scikit-learn's 8x8 digits."""
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def lenet5(*, in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """LeNet-5 for 28x28 inputs (padding=2 stands in for the original 32x32 frame)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "lenet5": lenet5}

_DEFAULT_MODEL = {
    "digits": "mlp",
    "mnist": "lenet5",
    "fashion": "lenet5",
    "fashion-mnist": "lenet5",
}


def build_model(name: str, seed: int = 0, **kwargs: int) -> nn.Module:
    """Build a registered model with weights fixed by `seed`; the global torch RNG is untouched."""
    try:
        ctor = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None
    # Every agent must start from the same weights for a given seed, without disturbing
    # whatever else uses the global generator.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ctor(**kwargs)


def default_model_for(dataset_name: str) -> str:
    """The registry name of the model meant for a data set."""
    try:
        return _DEFAULT_MODEL[dataset_name.lower()]
    except KeyError:
        known = ", ".join(_DEFAULT_MODEL)
        raise ValueError(f"no default model for dataset {dataset_name!r}; known: {known}") from None


def evaluate(
    model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 2000
) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of `model` on (x, y)."""
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need equal, non-zero numbers of samples, got {len(x)} and {len(y)}")
    # from_numpy shares memory; the asarray calls only copy if dtype/layout is wrong.
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(xt), batch_size):
                xb = xt[start:start + batch_size].to(device)
                yb = yt[start:start + batch_size].to(device)
                logits = model(xb)
                loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
                correct += int((logits.argmax(dim=1) == yb).sum())
    finally:
        model.train(was_training)
    return loss_sum / len(xt), correct / len(xt)
