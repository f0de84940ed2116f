"""Flat parameters are shared memory with torch; D = 0 DGA equals FedAvg under real training."""

import numpy as np
import torch
from fleet_helpers import InProcessFleet

from fleetfl.shared.config import JobConfig
from fleetfl.shared.core.averaging import WindowAveraging
from fleetfl.shared.core.dga import DGADevice
from fleetfl.shared.core.fedavg import FedAvgDevice
from fleetfl.shared.learn.data import agent_shard, load_dataset
from fleetfl.shared.learn.models import build_model
from fleetfl.shared.learn.torch_binding import bind_flat
from fleetfl.shared.tasks.trainer import LocalTrainer


def test_flat_buffer_is_the_model_memory():
    model = build_model("lenet5", seed=1)
    before = [p.detach().clone() for p in model.parameters()]
    flat, table = bind_flat(model)
    assert flat.dtype == np.float32 and flat.size == table.size == 61706
    for layer, p, b in zip(table.layers, model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), b)  # values kept
        assert p.data_ptr() == torch.from_numpy(flat[layer.slice]).data_ptr()  # no copy
    flat[:] = 0.5
    assert all(float(p.detach().mean()) == 0.5 for p in model.parameters())
    torch.optim.SGD(model.parameters(), lr=1.0).zero_grad()
    out = model(torch.zeros(2, 1, 28, 28)).sum()
    out.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= p.grad
    assert not np.allclose(flat, 0.5)  # an in-place step is visible in the flat vector


def run_fleet(algo: str, steps: int = 30):
    torch.manual_seed(0)
    job = JobConfig(algo=algo, task="digits", local_steps=5, period=5, delay=0, lr=0.05)
    ds = load_dataset("digits")
    trainers = {}
    for i, name in enumerate(["a0", "a1"]):
        x, y = agent_shard(ds, i, 2, "dirichlet", seed=3, alpha=0.5)
        trainers[name] = LocalTrainer.on_arrays(job, x, y, seed=100 + i)
    w0 = trainers["a0"].params.copy()
    for t in trainers.values():
        t.params[:] = w0
    coord = WindowAveraging(params=w0, run="t", job={})
    if algo == "fedavg":
        devices = {n: FedAvgDevice("t", n, t.samples, 5) for n, t in trainers.items()}
    else:
        devices = {n: DGADevice("t", n, t.samples, 5, 0) for n, t in trainers.items()}
    fleet = InProcessFleet(coord, devices, {n: t.params for n, t in trainers.items()})
    for _ in range(steps):
        for name in trainers:
            fleet.step(name, lambda n, p: trainers[n].step())
    return coord.params, {n: t.params.copy() for n, t in trainers.items()}


def test_dga_with_zero_delay_equals_fedavg():
    g_fedavg, local_fedavg = run_fleet("fedavg")
    g_dga, local_dga = run_fleet("dga")
    assert not np.allclose(g_fedavg, 0)
    assert np.abs(g_fedavg - g_dga).max() <= 1e-6
    for name in local_fedavg:
        assert np.abs(local_fedavg[name] - local_dga[name]).max() <= 1e-6
        # after 30 steps = 6 rounds, each replica equals the global model
        np.testing.assert_allclose(local_fedavg[name], g_fedavg, atol=1e-6)
