"""Models: shapes, seeded init, evaluation, and a real (short) training run on digits.
The character model's learning on real text is in test_shakespeare.py."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fleetfl.shared.config import JobConfig
from fleetfl.shared.core.layers import layer_groups
from fleetfl.shared.learn.data import load_dataset
from fleetfl.shared.learn.models import MODELS, build_model, evaluate
from fleetfl.shared.learn.torch_binding import bind_flat
from fleetfl.shared.tasks.task import TaskError, load_task
from fleetfl.shared.tasks.trainer import LocalTrainer


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # The machine is small and shared; one thread keeps these fast and predictable.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "name, shape, n_params",
    [("mlp", (5, 64), 64 * 64 + 64 + 64 * 10 + 10), ("lenet5", (3, 1, 28, 28), 61706)],
)
def test_output_shapes(name: str, shape: tuple[int, ...], n_params: int) -> None:
    model = build_model(name)
    assert model(torch.zeros(shape)).shape == (shape[0], 10)
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_mlp_keyword_sizes() -> None:
    model = build_model("mlp", in_features=784, hidden=32, num_classes=3)
    assert model(torch.zeros(2, 784)).shape == (2, 3)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_seeded_init(name: str) -> None:
    rng_before = torch.get_rng_state()
    a, b, c = (params(build_model(name, seed=s)) for s in (7, 7, 8))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, z) for x, z in zip(a, c, strict=True))
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG untouched


def test_unknown_model_and_the_builtin_tasks_models() -> None:
    with pytest.raises(ValueError, match="known models: mlp, lenet5"):
        build_model("resnet152")

    def shapes(model: torch.nn.Module) -> list[tuple[int, ...]]:
        return [tuple(p.shape) for p in model.parameters()]

    for task, model in (("digits", "mlp"), ("mnist", "lenet5"), ("fashion", "lenet5"),
                        ("shakespeare", "charlstm")):
        assert shapes(load_task(task).build_model()) == shapes(build_model(model)), task
    with pytest.raises(TaskError, match="no task named 'cifar10'"):
        load_task("cifar10")


def test_evaluate_untrained_is_chance_and_restores_mode() -> None:
    ds = load_dataset("digits")
    model = build_model("mlp", seed=0)
    model.train()
    loss, acc = evaluate(model, ds.x_test, ds.y_test)
    assert model.training
    assert 0.0 <= acc <= 1.0 and abs(acc - 0.1) < 0.1
    assert abs(loss - math.log(10)) < 0.3
    model.eval()
    # Small batches give the same numbers as one big batch.
    loss2, acc2 = evaluate(model, ds.x_test, ds.y_test, batch_size=7)
    assert not model.training
    assert acc2 == acc and loss2 == pytest.approx(loss, rel=1e-5)


def test_mlp_learns_digits() -> None:
    ds = load_dataset("digits")
    model = build_model("mlp", seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    rng = np.random.default_rng(0)
    for _ in range(300):
        batch = torch.from_numpy(rng.integers(0, len(y), 32))
        opt.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()
    loss, acc = evaluate(model, ds.x_test, ds.y_test)
    assert acc >= 0.9, (loss, acc)


# --- the character model ----------------------------------------------------------------------

def test_charlstm_shapes_groups_and_integer_inputs() -> None:
    model = build_model("charlstm", seed=0)
    codes = torch.randint(0, 65, (3, 80), dtype=torch.uint8)
    assert model(codes).shape == (3, 65)
    assert torch.equal(model(codes), model(codes.long()))  # uint8 codes = int64 codes
    flat, table = bind_flat(model)
    assert flat.size == 79561  # 65*8 + 4*128*(8+128+2) + 128*65+65
    groups = layer_groups(table)
    assert [(g.name, g.end - g.start) for g in groups] == [
        ("embed", 520), ("lstm", 70656), ("head", 8385)]
    # The flat vector is the model (the LSTM reads its weights from the shared buffer).
    before = model(codes).detach().clone()
    flat[groups[1].start:groups[1].end] = 0.0
    assert not torch.allclose(model(codes), before)


def test_evaluate_integer_inputs_matches_cross_entropy() -> None:
    model = build_model("charlstm", seed=1)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 65, (50, 80)).astype(np.uint8)
    y = rng.integers(0, 65, 50)
    loss, acc = evaluate(model, x, y, batch_size=16)
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
    assert loss == pytest.approx(F.cross_entropy(logits, torch.from_numpy(y)).item(), rel=1e-5)
    assert acc == float((logits.argmax(1).numpy() == y).mean())


def test_trainer_trains_charlstm_suffix_and_profiles() -> None:
    """The agent's paths on the character model: integer batches, FedPMT's frozen prefix
    (bit for bit, no gradient), the per-group profile."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 65, (64, 80)).astype(np.uint8)
    y = rng.integers(0, 65, 64)
    job = JobConfig(task="shakespeare", optimizer="adam", lr=0.01, batch_size=16)
    trainer = LocalTrainer.on_arrays(job, x, y, seed=0)
    assert trainer._next_batch()[0].dtype == torch.uint8  # kept as codes, not converted to float
    assert [g.name for g in trainer.groups] == ["embed", "lstm", "head"]
    profile = trainer.profile(repeats=2)
    assert profile["groups"] == ["embed", "lstm", "head"] and len(profile["b"]) == 3
    trainer.train_suffix(2)  # head only
    start = trainer.params.copy()
    for _ in range(3):
        assert np.isfinite(trainer.step())
    head = trainer.groups[2]
    assert np.array_equal(trainer.params[:head.start], start[:head.start])
    assert not np.array_equal(trainer.params[head.start:], start[head.start:])
    trainer.train_suffix(0)
    trainer.step()
    assert not np.array_equal(trainer.params[:head.start], start[:head.start])
