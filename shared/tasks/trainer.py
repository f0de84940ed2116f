"""Local training on one agent's samples (its own data or a simulated shard). The model's
parameters live in one flat float32 buffer (`params`), which the device-side state machine
reads and corrects in place.

FedPMT support: `train_suffix(first)` freezes the layer groups before `first` (no gradient is
computed for them: autograd stops at the first trainable layer), `profile()` measures the
per-group forward and backward time of one batch, and `slowdown` makes this machine behave
like a slower device by sleeping in proportion to the compute it just did.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from fleetfl.shared.core.job import JobConfig
from fleetfl.shared.core.layers import layer_groups
from fleetfl.shared.learn.torch_binding import bind_flat
from fleetfl.shared.tasks.evaluation import as_tensor, target_tensor
from fleetfl.shared.tasks.samples import ArraySamples, Samples
from fleetfl.shared.tasks.task import Task, load_task


class LocalTrainer:
    def __init__(self, task: Task, job: JobConfig, samples: Samples, seed: int,
                 slowdown: float = 1.0) -> None:
        if len(samples) == 0:
            raise ValueError(f"{samples.source}: no training samples")
        if slowdown < 1.0:
            raise ValueError("slowdown must be >= 1")
        self.task = task
        self.model = task.build_model(job.seed)
        self.params, self.layers = bind_flat(self.model)
        self.groups = layer_groups(self.layers)
        self.slowdown = slowdown
        self.first_trainable = 0
        self.data = samples
        self.batch_size = min(job.batch_size, len(samples))
        if job.optimizer == "adam":
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=job.lr)
        else:
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=job.lr,
                                             momentum=job.momentum)
        self.loss_fn = task.loss
        self.rng = np.random.default_rng(seed)
        self.order = np.empty(0, dtype=np.int64)
        self.steps = 0
        self.last_loss = float("nan")

    @classmethod
    def on_arrays(cls, job: JobConfig, x: np.ndarray, y: np.ndarray, seed: int,
                  slowdown: float = 1.0) -> LocalTrainer:
        """A trainer for the job's task on in-memory arrays (a simulated shard)."""
        return cls(load_task(job.task), job, ArraySamples(x, y), seed, slowdown)

    @property
    def samples(self) -> int:
        return len(self.data)

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Shuffled epochs: every sample is seen once per epoch.
        if len(self.order) < self.batch_size:
            self.order = np.concatenate([self.order, self.rng.permutation(len(self.data))])
        idx, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
        x, y = self.data.batch(idx)
        return as_tensor(x), target_tensor(y)

    def step(self) -> float:
        """One optimizer step on one mini-batch; returns its loss."""
        started = time.perf_counter()
        x, y = self._next_batch()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        self.last_loss = float(loss.detach())
        self._slow_down(time.perf_counter() - started)
        return self.last_loss

    def _slow_down(self, elapsed: float) -> None:
        if self.slowdown > 1.0:
            time.sleep((self.slowdown - 1.0) * elapsed)

    def train_suffix(self, first_group: int) -> None:
        """Train only the groups from `first_group` on; the others keep their values
        bit for bit and cost no backward compute."""
        if not 0 <= first_group < len(self.groups):
            raise ValueError(f"first trainable group {first_group} of {len(self.groups)}")
        self.first_trainable = first_group
        frozen = {g.name for g in self.groups[:first_group]}
        for name, p in self.model.named_parameters():
            p.requires_grad_(name.rsplit(".", 1)[0] not in frozen)
            if not p.requires_grad:
                p.grad = None  # SGD skips parameters without a gradient

    def profile(self, repeats: int = 10) -> dict:
        """Per group: forward time f and backward time b of one batch in seconds, slowdown
        included, such that a step training the last L groups costs
        sum(f) + sum(b[-L:]) (ALGORITHMS.md 7). Trains nothing."""
        n = len(self.groups)
        # minimum over repeats: the machine's own cost, not other processes' interference
        forward = np.zeros((repeats, n))
        marks: dict[int, float] = {}
        rep = [0]

        def before(i: int):
            return lambda module, args: marks.__setitem__(i, time.perf_counter())

        def after(i: int):
            def hook(module, args, output) -> None:
                forward[rep[0], i] = time.perf_counter() - marks[i]
            return hook

        modules = [self.model.get_submodule(g.name) for g in self.groups]
        hooks = [h for i, m in enumerate(modules) for h in
                 (m.register_forward_pre_hook(before(i)), m.register_forward_hook(after(i)))]
        try:
            with torch.no_grad():
                for rep[0] in range(repeats):
                    self.model(self._next_batch()[0])
        finally:
            for h in hooks:
                h.remove()
        f = forward.min(axis=0)
        first = self.first_trainable
        step = np.zeros(n + 1)
        step[0] = f.sum()
        try:
            for trained in range(1, n + 1):  # forward + backward through the last groups
                self.train_suffix(n - trained)
                times = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    self._forward_backward()
                    times.append(time.perf_counter() - started)
                step[trained] = min(times)
        finally:
            self.train_suffix(first)
            self.optimizer.zero_grad(set_to_none=True)
        b = np.maximum(np.diff(step), 0.0)[::-1]  # b[0]: the input-side group
        return {"groups": [g.name for g in self.groups], "batch": self.batch_size,
                "f": [float(v * self.slowdown) for v in f],
                "b": [float(v * self.slowdown) for v in b]}

    def _forward_backward(self) -> None:
        x, y = self._next_batch()
        self.optimizer.zero_grad(set_to_none=True)
        self.loss_fn(self.model(x), y).backward()
