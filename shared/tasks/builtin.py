"""The data sets fleetfl ships, as tasks written against the same interface as a user's.

Each reads one global data set (shared/learn/data.py) that `fl-agent --shard i/n` deals out as
a simulated fleet, and gives the coordinator that data set's test split; none reads
device-local data. Registered in the `fleetfl.tasks` entry point group (pyproject.toml).
"""

from __future__ import annotations

from pathlib import Path

from fleetfl.shared.learn.data import Dataset, load_dataset
from fleetfl.shared.learn.models import SHAKESPEARE_VOCAB, charlstm, lenet5, mlp
from fleetfl.shared.tasks.samples import ArraySamples
from fleetfl.shared.tasks.task import Task


def _test_split(name: str):
    def test(data_dir: Path | None) -> ArraySamples:
        ds = load_dataset(name, data_dir)
        return ArraySamples(ds.x_test, ds.y_test, f"{name} test split")
    return test


def _global(name: str):
    def simulation(data_dir: Path | None) -> Dataset:
        return load_dataset(name, data_dir)
    return simulation


def _builtin(name: str, model, input_shape: tuple[int, ...], input_dtype: str = "float32",
             fda_theta: float = 0.0) -> Task:
    return Task(name=name, version=1, model=model, test=_test_split(name),
                simulation=_global(name), input_shape=input_shape, input_dtype=input_dtype,
                fda_theta=fda_theta)


# fda_theta: Theta for a target sync period of T = 400 local steps (fda.theta_for_period),
# from bench/calibrate_fda.py (8 agents, Dirichlet 0.5, lr 0.05, batch 32: the median over
# forks at FedAvg rounds 0, 4, 8 of the variance 400 steps after a sync; ALGORITHMS.md 5,
# bench/README.md "FDA Theta"). MNIST: 3-4 syncs to 97% in fl-sim, 3.6x fewer uplink bytes
# than FedAvg H = 20. Fashion: the same rule, not yet checked by runs. Digits keeps the T = 20
# value (median variance at a FedAvg H = 20 sync, 4 agents): its shards of ~180 samples
# saturate the variance, and Theta(T = 400) = 13.2 never reached 95% (3 syncs in 3000 steps).
digits = _builtin("digits", mlp, (64,), fda_theta=0.36)
mnist = _builtin("mnist", lenet5, (1, 28, 28), fda_theta=107.0)
fashion = _builtin("fashion", lenet5, (1, 28, 28), fda_theta=57.7)
shakespeare = _builtin("shakespeare", lambda: charlstm(vocab_size=SHAKESPEARE_VOCAB), (80,),
                       input_dtype="int64")
