"""Shakespeare on the real tiny-shakespeare file: speaking roles, windows, the held-out split,
the `roles` partition, the character model learning, and a short federated run over MQTT."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from test_integration import finish, make_fleet

from fleetfl.shared.config import JobConfig
from fleetfl.shared.learn.data import (
    SEQ_LEN,
    Dataset,
    agent_shard,
    load_dataset,
    shard_indices,
    speeches_by_role,
    window_targets,
)
from fleetfl.shared.learn.models import evaluate
from fleetfl.shared.tasks.trainer import LocalTrainer

# The file's own numbers (PROVENANCE.md, SHA256SUMS): 40,000 lines, 65 distinct characters.
SPEECHES = 7222  # "Name:" headers
HEADER_NAMES = 309
ROLES_WITH_TEXT = 299  # ten ghosts in Richard III have a header and no lines
ROLES_WITH_WINDOWS = 254  # roles with at least SEQ_LEN + 1 characters of training text
TRAIN, TEST = 225_867, 3_326


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("FL_DATA_DIR", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is small and shared
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def text_path(shared_data_dir: Path) -> Path:
    path = shared_data_dir / "shakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip(f"tiny-shakespeare not present at {path}")
    return path


@pytest.fixture(scope="module")
def text(text_path: Path) -> str:
    return text_path.read_text()


@pytest.fixture(scope="module")
def ds(text_path: Path) -> Dataset:
    return load_dataset("shakespeare", text_path.parents[1])


def role_codes(ds: Dataset, role_text: str) -> np.ndarray:
    return np.array([ds.vocab.index(c) for c in role_text], np.uint8)


# --- parsing ------------------------------------------------------------------------------------

def test_roles_parsed_from_the_real_file(text: str) -> None:
    # Independent count: a header is a "Name:" line opening a paragraph.
    headers = re.findall(r"(?:\A|(?<=\n\n))([^\n]+):\n", text)
    assert len(headers) == SPEECHES and len(set(headers)) == HEADER_NAMES
    roles = speeches_by_role(text)
    assert len(roles) == ROLES_WITH_TEXT
    assert all(name.startswith("Ghost") for name in set(headers) - set(roles))
    assert roles["First Citizen"].startswith(
        "Before we proceed any further, hear me speak.\n"
        "You are all resolved rather to die than to famish?\n")
    # Every character outside header lines and blank lines belongs to exactly one role.
    rest = re.sub(r"(?:\A|(?<=\n\n))[^\n]+:\n", "", text)
    body = sum(len(line) + 1 for line in rest.split("\n")[:-1] if line)
    assert sum(map(len, roles.values())) == body == 1_027_852
    # The three biggest parts of the file: Gloucester (Richard III), the Duke (Measure for
    # Measure), Richard II.
    biggest = sorted(roles, key=lambda r: -len(roles[r]))[:3]
    assert biggest == ["GLOUCESTER", "DUKE VINCENTIO", "KING RICHARD II"]
    assert not any(re.search(r"^(GLOUCESTER|ROMEO|JULIET):$", t, re.M) for t in roles.values())


def test_dataset_sizes_vocab_and_windows(ds: Dataset, text: str) -> None:
    assert ds.name == "shakespeare"
    assert ds.vocab == "".join(sorted(set(text))) and len(ds.vocab) == ds.num_classes == 65
    assert ds.x_train.shape == (TRAIN, SEQ_LEN) and ds.x_test.shape == (TEST, SEQ_LEN)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64
    assert int(ds.x_train.max()) < 65 and int(ds.y_train.max()) < 65
    assert len(ds.role_names) == ROLES_WITH_WINDOWS
    assert ds.roles_train.shape == (TRAIN,) and ds.roles_test.shape == (TEST,)
    # every kept role has training windows; nearly all have test windows too
    assert np.array_equal(np.unique(ds.roles_train), np.arange(ROLES_WITH_WINDOWS))
    assert len(np.unique(ds.roles_test)) >= 0.9 * ROLES_WITH_WINDOWS
    # A window decodes to 80 consecutive characters of its role's text, then its label.
    roles = speeches_by_role(text)
    for i in (0, 12_345, TRAIN - 1):
        window = "".join(ds.vocab[c] for c in ds.x_train[i]) + ds.vocab[ds.y_train[i]]
        assert window in roles[ds.role_names[ds.roles_train[i]]]


def test_vocabulary_and_arrays_are_deterministic(ds: Dataset, text_path: Path,
                                                 tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # A fresh parse of a copy (flat layout, found through FL_DATA_DIR) gives the same data.
    (tmp_path / "input.txt").write_bytes(text_path.read_bytes())
    monkeypatch.setenv("FL_DATA_DIR", str(tmp_path))
    again = load_dataset("shakespeare")
    assert again is not ds
    assert again.vocab == ds.vocab and again.role_names == ds.role_names
    for field in ("x_train", "y_train", "x_test", "y_test", "roles_train", "roles_test"):
        assert np.array_equal(getattr(again, field), getattr(ds, field)), field
    assert load_dataset("shakespeare", text_path.parent) is ds  # one cached copy per file


def test_test_split_is_held_out_per_role(ds: Dataset, text: str) -> None:
    roles = speeches_by_role(text)
    for r, name in enumerate(ds.role_names):
        codes = role_codes(ds, roles[name])
        train, test = window_targets(len(codes))
        # No test character is inside any training window (inputs and targets).
        if len(test):
            assert train.max() < test.min()
            assert test.min() >= len(codes) - int(0.1 * len(codes))
        # and the arrays hold exactly those windows
        windows = np.lib.stride_tricks.sliding_window_view(codes, SEQ_LEN)
        mine = ds.roles_train == r
        assert np.array_equal(ds.x_train[mine], windows[train - SEQ_LEN])
        assert np.array_equal(ds.y_train[mine], codes[train])
        mine = ds.roles_test == r
        assert np.array_equal(ds.x_test[mine], windows[test - SEQ_LEN])
        assert np.array_equal(ds.y_test[mine], codes[test])


# --- partitions ---------------------------------------------------------------------------------

@pytest.mark.parametrize("agents", [4, 16])
def test_roles_partition_gives_whole_roles_to_one_agent(ds: Dataset, agents: int) -> None:
    parts = shard_indices(ds, agents, "roles", seed=3, alpha=0.5)
    assert len(parts) == agents
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(TRAIN))  # covering
    owned = [set(np.unique(ds.roles_train[p]).tolist()) for p in parts]
    assert sum(map(len, owned)) == ROLES_WITH_WINDOWS  # each role in exactly one part
    assert set().union(*owned) == set(range(ROLES_WITH_WINDOWS))
    for p, roles in zip(parts, owned, strict=True):
        # whole roles: a part holds every training sample of each of its roles
        assert len(p) == np.isin(ds.roles_train, list(roles)).sum()
    sizes = [len(p) for p in parts]
    assert max(sizes) < 1.05 * min(sizes), sizes  # balanced by sample count
    again = shard_indices(ds, agents, "roles", seed=3, alpha=0.5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = shard_indices(ds, agents, "roles", seed=4, alpha=0.5)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
    x, y = agent_shard(ds, 1, agents, "roles", seed=3, alpha=0.5)
    assert np.array_equal(x, ds.x_train[parts[1]]) and np.array_equal(y, ds.y_train[parts[1]])


def test_dirichlet_over_next_characters(ds: Dataset) -> None:
    parts = shard_indices(ds, 8, "dirichlet", seed=0, alpha=0.5)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(TRAIN))
    shares = np.stack([np.bincount(ds.y_train[p], minlength=65) / len(p) for p in parts])
    # skewed over labels: the space character's share differs a lot between agents
    space = ds.vocab.index(" ")
    assert shares[:, space].max() > 1.5 * shares[:, space].min()


# --- the model learns ---------------------------------------------------------------------------

def baselines(ds: Dataset) -> tuple[float, float]:
    """Test accuracy of always predicting the most frequent training character, and the test
    cross-entropy of the training character frequencies (a model that ignores the context)."""
    freq = np.bincount(ds.y_train, minlength=ds.num_classes) / len(ds.y_train)
    majority = float(np.mean(ds.y_test == freq.argmax()))
    unigram = float(-np.mean(np.log(freq[ds.y_test])))
    return majority, unigram


def test_char_model_learns_on_one_roles_shard(ds: Dataset) -> None:
    majority, unigram = baselines(ds)
    assert 0.1 < majority < 0.2 and 3.0 < unigram < math.log(65)
    x, y = agent_shard(ds, 0, 4, "roles", seed=0, alpha=0.5)
    job = JobConfig(task="shakespeare", optimizer="adam", lr=0.01, batch_size=32)
    trainer = LocalTrainer.on_arrays(job, x, y, seed=0)
    loss0, _ = evaluate(trainer.model, ds.x_test, ds.y_test)
    assert abs(loss0 - math.log(65)) < 0.2  # untrained: about uniform
    started = time.perf_counter()
    for _ in range(300):
        trainer.step()
    seconds = time.perf_counter() - started
    loss, acc = evaluate(trainer.model, ds.x_test, ds.y_test)
    print(f"charlstm, 300 Adam steps on {len(y)} samples in {seconds:.1f} s: test loss "
          f"{loss:.3f} (log V {math.log(65):.3f}, unigram {unigram:.3f}), accuracy {acc:.3f} "
          f"(majority {majority:.3f})")
    assert loss < 0.7 * math.log(65) and loss < unigram - 0.5  # it uses the context
    assert acc > 1.6 * majority


# --- a federated run over the real broker -------------------------------------------------------

@pytest.mark.integration
def test_fedavg_four_role_agents_beat_the_majority_char(broker, tmp_path: Path, ds: Dataset,
                                                        text_path: Path) -> None:
    majority, _ = baselines(ds)
    target = 0.28  # ~2x the majority baseline; 4 agents x 20 steps reach it in ~15 versions
    config = tmp_path / "job.yaml"
    config.write_text("job:\n  optimizer: adam\n  lr: 0.01\n")  # charlstm's settings
    args = ["--config", str(config), "--algo", "fedavg", "--dataset", "shakespeare",
            "--partition", "roles", "--min-agents", "4", "--local-steps", "20",
            "--target-accuracy", str(target), "--max-versions", "40"]
    started = time.monotonic()
    with make_fleet(broker, tmp_path, "shakespeare-fedavg", args,
                    data_dir=str(text_path.parents[1])) as fleet:
        fleet.start_coordinator()
        fleet.start_agents(4)
        events = finish(fleet, timeout=240)
    elapsed = time.monotonic() - started
    accuracies = [e["accuracy"] for e in events if e["accuracy"] is not None]
    print(f"shakespeare FedAvg, 4 agents by role: {len(events)} versions, accuracy "
          f"{accuracies[0]:.3f} -> {max(accuracies):.3f} (majority {majority:.3f}), "
          f"{elapsed:.0f} s")
    assert accuracies[0] < majority + 0.05  # it learned over the run
    assert max(accuracies) >= target > 1.8 * majority
    assert events[-1]["rejected"] == {}
    assert all(len(e["contributors"]) == 4 for e in events)


def test_simulator_runs_shakespeare_split_by_role(text_path: Path, tmp_path: Path) -> None:
    """fl-sim deals out whole roles like the agents do, with the optimizer given as a flag."""
    from fleetfl.coordinator.simulator import main as sim_main

    assert sim_main(["--dataset", "shakespeare", "--data-dir", str(text_path.parents[1]),
                     "--partition", "roles", "--agents", "4", "--max-versions", "2",
                     "--local-steps", "5", "--optimizer", "adam", "--lr", "0.01",
                     "--run-dir", str(tmp_path), "--run", "roles"]) == 0
    from fleetfl.coordinator.rundir import RunDir

    events = RunDir(tmp_path / "roles").events()
    assert [e["version"] for e in events] == [1, 2]
    assert len(events[-1]["contributors"]) == 4
    config = (tmp_path / "roles" / "config.yaml").read_text()
    assert "optimizer: adam" in config and "partition: roles" in config
