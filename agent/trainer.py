"""Local training on one agent's shard. The model's parameters live in one flat float32
buffer (`params`), which the device-side state machine reads and corrects in place."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fleetfl.shared.config import JobConfig
from fleetfl.shared.models import build_model, default_model_for
from fleetfl.shared.params import bind_flat


def model_for_job(job: JobConfig) -> nn.Module:
    return build_model(job.model or default_model_for(job.dataset), seed=job.seed)


class LocalTrainer:
    def __init__(self, job: JobConfig, x: np.ndarray, y: np.ndarray, seed: int) -> None:
        if len(x) == 0:
            raise ValueError("this agent's shard is empty")
        self.model = model_for_job(job)
        self.params, self.layers = bind_flat(self.model)
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)
        self.batch_size = min(job.batch_size, len(x))
        if job.optimizer == "adam":
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=job.lr)
        else:
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=job.lr,
                                             momentum=job.momentum)
        self.loss_fn = nn.CrossEntropyLoss()
        self.rng = np.random.default_rng(seed)
        self.order = np.empty(0, dtype=np.int64)
        self.steps = 0
        self.last_loss = float("nan")

    @property
    def samples(self) -> int:
        return len(self.x)

    def _next_batch(self) -> torch.Tensor:
        # Shuffled epochs: every sample is seen once per epoch.
        if len(self.order) < self.batch_size:
            self.order = np.concatenate([self.order, self.rng.permutation(len(self.x))])
        idx, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
        return torch.from_numpy(idx)

    def step(self) -> float:
        """One optimizer step on one mini-batch; returns its loss."""
        idx = self._next_batch()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(self.x[idx]), self.y[idx])
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        self.last_loss = float(loss.detach())
        return self.last_loss
