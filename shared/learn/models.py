"""Small torch models that train in seconds on a Raspberry Pi, plus a shared evaluator."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MODELS", "CharLSTM", "build_model", "charlstm", "evaluate",
           "lenet5", "mlp"]

# tiny-shakespeare vocabulary: the sorted set of the characters in input.txt (learn/data.py)
SHAKESPEARE_VOCAB = 65


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


class CharLSTM(nn.Module):
    """Next-character model: embedding -> LSTM -> linear over the vocabulary, predicting from
    the last position. Input: integer character codes (any integer dtype), shape (N, T).

    LEAF's Shakespeare model is an 8-d embedding and two 256-unit LSTM layers (~820k
    parameters; one such layer alone takes ~65 ms per batch-32 step of 80 characters on one
    core here): too heavy for 16 agents on 2 CPU cores or a Pi. One 128-unit layer (79,561
    parameters, ~18 ms per step) is what we use; over the first thousand steps 2 x 64 and
    2 x 96 layers learned no faster and cost more (measured).
    Layer groups (FedPMT freezes from the input side, LBGM scales per layer): embed, lstm, head.
    """

    def __init__(self, vocab_size: int = SHAKESPEARE_VOCAB, embed_dim: int = 8,
                 hidden: int = 128, layers: int = 1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Data sets store codes as uint8 (8x less memory); embedding wants int64.
        out, _ = self.lstm(self.embed(x.long()))
        return self.head(out[:, -1])


def charlstm(*, vocab_size: int = SHAKESPEARE_VOCAB, embed_dim: int = 8, hidden: int = 128,
             layers: int = 1) -> nn.Module:
    """The Shakespeare model. Train it with Adam, lr 0.01, batch 32 (job.optimizer: adam):
    measured on one shard, 300 steps reach ~0.31 test accuracy (1000 steps ~0.39), where SGD
    with momentum 0.9 reaches 0.20-0.23 at lr 0.05 (the job default) and 0.26-0.27 at lr
    0.2-0.5; Adam at lr 0.005 or 0.02 is about as good as 0.01."""
    return CharLSTM(vocab_size, embed_dim, hidden, layers)


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "lenet5": lenet5,
                                               "charlstm": charlstm}

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


def evaluate(
    model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 2000
) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of `model` on (x, y)."""
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need equal, non-zero numbers of samples, got {len(x)} and {len(y)}")
    # from_numpy shares memory; the asarray calls only copy if dtype/layout is wrong.
    # Integer inputs (character codes) stay integers: the model embeds them.
    x_dtype = None if np.issubdtype(np.asarray(x).dtype, np.integer) else np.float32
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=x_dtype))
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
