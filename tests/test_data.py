"""Data sets and partitions, on the real files (MNIST beside the repo, Fashion-MNIST from apt).
Shakespeare's real file is tested in test_shakespeare.py; here its parsing rules on tiny texts."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetfl.shared.learn import data
from fleetfl.shared.learn.data import (
    DataError,
    agent_shard,
    load_dataset,
    parse_partition,
    partition,
    resolve_data_dir,
    speeches_by_role,
    window_targets,
)

# shared/ sits beside the repo checkout (in CI too), so derive it instead of hard-coding.
DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def write_idx(folder: Path, images: np.ndarray, labels: np.ndarray, prefix: str,
              gz: bool = True) -> None:
    """Write a real IDX pair (images magic 2051, labels 2049) like the MNIST originals."""
    folder.mkdir(parents=True, exist_ok=True)
    n, rows, cols = images.shape
    img = struct.pack(">IIII", 2051, n, rows, cols) + images.astype(np.uint8).tobytes()
    lab = struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes()
    for stem, raw in ((f"{prefix}-images-idx3-ubyte", img), (f"{prefix}-labels-idx1-ubyte", lab)):
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / stem).write_bytes(raw)


def write_tiny_mnist(folder: Path, gz: bool = True, n_train: int = 20, n_test: int = 10) -> None:
    rng = np.random.default_rng(1)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder, rng.integers(0, 256, (n, 28, 28)), np.arange(n) % 10, prefix, gz)


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's FL_DATA_DIR must not change what these tests see.
    monkeypatch.delenv("FL_DATA_DIR", raising=False)


# --- digits -----------------------------------------------------------------------------------

def test_digits_shapes_and_split() -> None:
    ds = load_dataset("digits")
    assert ds.name == "digits" and ds.num_classes == 10
    assert ds.x_train.shape == (1437, 64) and ds.x_test.shape == (360, 64)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    # Stratified: every class in both splits in about the same share.
    train_share = np.bincount(ds.y_train) / len(ds.y_train)
    test_share = np.bincount(ds.y_test) / len(ds.y_test)
    assert np.abs(train_share - test_share).max() < 0.01
    assert load_dataset("DIGITS") is ds  # cached


def test_unknown_dataset_lists_known_names() -> None:
    with pytest.raises(DataError, match="digits.*mnist.*fashion.*shakespeare"):
        load_dataset("cifar10")


def test_resolve_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert resolve_data_dir(None) is None
    monkeypatch.setenv("FL_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    assert resolve_data_dir("/elsewhere") == Path("/elsewhere")


# --- MNIST and IDX parsing ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist() -> data.Dataset:
    if not (DATA_DIR / "mnist").is_dir():
        pytest.skip(f"MNIST not present at {DATA_DIR / 'mnist'}")
    return load_dataset("mnist", DATA_DIR)


def test_mnist_real_files(mnist: data.Dataset) -> None:
    assert mnist.x_train.shape == (60000, 1, 28, 28) and mnist.x_test.shape == (10000, 1, 28, 28)
    assert mnist.y_train.shape == (60000,) and mnist.y_test.shape == (10000,)
    assert mnist.x_train.dtype == np.float32 and mnist.y_train.dtype == np.int64
    assert np.bincount(mnist.y_train).tolist() == MNIST_TRAIN_COUNTS
    # Normalised with the published mean/std: the training set comes out ~N(0, 1).
    assert abs(float(mnist.x_train.mean())) < 0.01
    assert abs(float(mnist.x_train.std()) - 1.0) < 0.01


def test_mnist_env_var_and_flat_layout_share_cache(
    mnist: data.Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FL_DATA_DIR", str(DATA_DIR))
    assert load_dataset("mnist") is mnist
    # The folder holding the files directly is the same data, so the same cached object.
    assert load_dataset("mnist", DATA_DIR / "mnist") is mnist


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("gz", [True, False])
def test_idx_layouts(tmp_path: Path, nested: bool, gz: bool) -> None:
    write_tiny_mnist(tmp_path / "mnist" if nested else tmp_path, gz=gz)
    ds = load_dataset("mnist", tmp_path)
    assert ds.x_train.shape == (20, 1, 28, 28) and ds.x_test.shape == (10, 1, 28, 28)
    assert ds.y_train.tolist() == (np.arange(20) % 10).tolist()


def test_idx_pixels_normalised(tmp_path: Path) -> None:
    images = np.zeros((2, 28, 28), np.uint8)
    images[1] = 255
    write_idx(tmp_path, images, np.array([3, 4]), "train")
    write_idx(tmp_path, images, np.array([3, 4]), "t10k")
    ds = load_dataset("mnist", tmp_path)
    np.testing.assert_allclose(ds.x_train[0], (0 - 0.1307) / 0.3081, rtol=1e-5)
    np.testing.assert_allclose(ds.x_train[1], (1 - 0.1307) / 0.3081, rtol=1e-5)


def test_idx_bad_magic(tmp_path: Path) -> None:
    write_tiny_mnist(tmp_path)
    raw = bytearray(gzip.decompress((tmp_path / "train-images-idx3-ubyte.gz").read_bytes()))
    raw[:4] = struct.pack(">I", 1234)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match="bad IDX magic 1234"):
        load_dataset("mnist", tmp_path)


def test_idx_truncated(tmp_path: Path) -> None:
    write_tiny_mnist(tmp_path, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated"):
        load_dataset("mnist", tmp_path)


def test_idx_truncated_gzip_stream(tmp_path: Path) -> None:
    write_tiny_mnist(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DataError, match="cannot read"):
        load_dataset("mnist", tmp_path)


def test_idx_count_mismatch(tmp_path: Path) -> None:
    write_tiny_mnist(tmp_path)
    write_idx(tmp_path, np.zeros((5, 28, 28)), np.zeros(6), "t10k")
    with pytest.raises(DataError, match="5 images but 6 labels"):
        load_dataset("mnist", tmp_path)


def test_mnist_without_data_dir_says_how_to_set_it() -> None:
    with pytest.raises(DataError, match="--data-dir.*FL_DATA_DIR"):
        load_dataset("mnist")


def test_mnist_missing_dir_and_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("mnist", tmp_path / "nope")
    with pytest.raises(DataError, match="not found"):
        load_dataset("mnist", tmp_path)
    write_tiny_mnist(tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte"):
        load_dataset("mnist", tmp_path)


# --- Fashion-MNIST ------------------------------------------------------------------------------

@pytest.mark.skipif(not data.FASHION_SYSTEM_DIR.is_dir(),
                    reason="apt-get install dataset-fashion-mnist")
def test_fashion_from_debian_package() -> None:
    ds = load_dataset("fashion")
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert np.bincount(ds.y_train).tolist() == [6000] * 10
    assert np.bincount(ds.y_test).tolist() == [1000] * 10
    assert abs(float(ds.x_train.mean())) < 0.01
    assert load_dataset("fashion-mnist") is ds


def test_fashion_data_dir_wins_and_missing_says_apt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_tiny_mnist(tmp_path / "fashion-mnist")
    assert load_dataset("fashion-mnist", tmp_path).x_train.shape == (20, 1, 28, 28)
    # Point the system location at an empty folder to see the message a bare machine gives.
    monkeypatch.setattr(data, "FASHION_SYSTEM_DIR", tmp_path / "absent")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion", tmp_path / "fashion-mnist")


# --- Shakespeare text ---------------------------------------------------------------------------

PLAY = """FIRST WITCH:
When shall we three meet again
In thunder, lightning, or in rain?

SECOND WITCH:
When the hurlyburly's done,
When the battle's lost and won:
That will be ere the set of sun.

GHOST:

FIRST WITCH:
Where the place?
"""


def test_speeches_by_role_rules() -> None:
    roles = speeches_by_role(PLAY)
    # A line ending in ':' inside a speech is text, not a header; an empty speech is no role.
    assert list(roles) == ["FIRST WITCH", "SECOND WITCH"]
    assert roles["FIRST WITCH"] == ("When shall we three meet again\nIn thunder, lightning, or "
                                    "in rain?\nWhere the place?\n")
    assert roles["SECOND WITCH"].count("\n") == 3 and "won:\n" in roles["SECOND WITCH"]


def test_window_targets_split_before_windowing() -> None:
    train, test = window_targets(200, seq_len=10, stride=3, test_stride=2, test_fraction=0.1)
    assert train.tolist() == list(range(10, 180, 3))  # windows end before character 180
    assert test.tolist() == list(range(180, 200, 2))
    train, test = window_targets(50, seq_len=80)
    assert len(train) == 0 and len(test) == 0  # too short for one window


def test_shakespeare_from_a_tiny_file(tmp_path: Path) -> None:
    (tmp_path / "shakespeare").mkdir()
    (tmp_path / "shakespeare" / "input.txt").write_text("\n".join([PLAY] * 20))
    ds = load_dataset("shakespeare", tmp_path)
    assert ds.vocab == "".join(sorted(set(PLAY))) and ds.num_classes == len(ds.vocab)
    assert ds.role_names == ("FIRST WITCH", "SECOND WITCH")
    assert ds.x_train.shape[1] == data.SEQ_LEN and ds.x_train.dtype == np.uint8
    assert len(ds.y_train) == len(ds.roles_train) and len(ds.y_test) == len(ds.roles_test)
    first = "".join(ds.vocab[c] for c in ds.x_train[0]) + ds.vocab[ds.y_train[0]]
    assert speeches_by_role("\n".join([PLAY] * 20))["FIRST WITCH"].startswith(first)
    # the folder holding input.txt directly works too, and is the same file
    assert load_dataset("shakespeare", tmp_path / "shakespeare") is ds


def test_shakespeare_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--data-dir.*FL_DATA_DIR.*shakespeare/input.txt"):
        load_dataset("shakespeare")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("shakespeare", tmp_path / "nope")
    with pytest.raises(DataError, match="input.txt not found; searched"):
        load_dataset("shakespeare", tmp_path)
    (tmp_path / "input.txt").write_text("just prose\nwithout speakers\n")
    with pytest.raises(DataError, match="no speeches found"):
        load_dataset("shakespeare", tmp_path)


# --- partitions ---------------------------------------------------------------------------------

SCHEMES = ["iid", "dirichlet", "shards"]
LABELS = np.random.default_rng(42).integers(0, 10, 600)


def assert_covering(parts: list[np.ndarray], n: int) -> None:
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0)  # sorted, no duplicates
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))


@settings(max_examples=60, deadline=None)
@given(
    num_parts=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
    scheme=st.sampled_from(SCHEMES),
    alpha=st.floats(0.05, 10.0),
)
def test_partition_properties(num_parts: int, seed: int, scheme: str, alpha: float) -> None:
    parts = partition(LABELS, num_parts, scheme, seed=seed, alpha=alpha)
    assert len(parts) == num_parts
    assert_covering(parts, len(LABELS))
    again = partition(LABELS, num_parts, scheme, seed=seed, alpha=alpha)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    if scheme == "iid":
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    if scheme == "dirichlet":
        assert min(map(len, parts)) >= min(10, len(LABELS) // num_parts)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_partition_seed_changes_split(scheme: str) -> None:
    a = partition(LABELS, 5, scheme, seed=1, alpha=0.5)
    b = partition(LABELS, 5, scheme, seed=2, alpha=0.5)
    assert any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def mean_label_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    ents = []
    for p in parts:
        share = np.bincount(labels[p], minlength=10) / len(p)
        share = share[share > 0]
        ents.append(float(-(share * np.log(share)).sum()))
    return float(np.mean(ents))


def test_non_iid_schemes_are_skewed() -> None:
    labels = np.repeat(np.arange(10), 100)
    iid = mean_label_entropy(labels, partition(labels, 10, "iid", seed=0))
    skewed = mean_label_entropy(labels, partition(labels, 10, "dirichlet", seed=0, alpha=0.1))
    mild = mean_label_entropy(labels, partition(labels, 10, "dirichlet", seed=0, alpha=100.0))
    shards = partition(labels, 10, "shards", seed=0, shards_per_part=2)
    assert iid > 0.95 * np.log(10)
    assert skewed < 0.6 * iid
    assert mild > 0.95 * iid  # large alpha approaches iid
    assert all(len(np.unique(labels[p])) <= 2 for p in shards)  # shards align with classes


def test_dirichlet_tiny_alpha_falls_back_to_minimum() -> None:
    labels = np.repeat(np.arange(10), 30)
    parts = partition(labels, 20, "dirichlet", seed=3, alpha=0.01)
    assert_covering(parts, len(labels))
    assert min(map(len, parts)) >= 10


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_parts": 0}, "num_parts"),
        ({"num_parts": 601}, "num_parts"),
        ({"num_parts": 3, "scheme": "dirichlet", "alpha": 0.0}, "alpha"),
        ({"num_parts": 3, "scheme": "zipf"}, "unknown partition scheme"),
        ({"num_parts": 400, "scheme": "shards"}, "shards_per_part"),
    ],
)
def test_partition_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(DataError, match=match):
        partition(LABELS, **kwargs)


# 40 roles of very different sizes (a few big speaking parts, many small ones), like a play.
ROLES = np.random.default_rng(7).choice(40, 600, p=np.arange(1, 41)[::-1] / 820)


@settings(max_examples=40, deadline=None)
@given(num_parts=st.integers(1, 12), seed=st.integers(0, 2**32 - 1))
def test_roles_partition_properties(num_parts: int, seed: int) -> None:
    parts = partition(LABELS, num_parts, "roles", seed=seed, groups=ROLES)
    assert_covering(parts, len(LABELS))
    owners = [np.unique(ROLES[p]) for p in parts]
    assert sum(map(len, owners)) == len(np.unique(ROLES))  # every role in exactly one part
    assert all(len(p) > 0 for p in parts)
    again = partition(LABELS, num_parts, "roles", seed=seed, groups=ROLES)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    # balanced: no part exceeds the mean by more than the largest role
    sizes = np.array([len(p) for p in parts])
    assert sizes.max() <= len(LABELS) / num_parts + np.bincount(ROLES).max()


def test_roles_partition_needs_roles() -> None:
    with pytest.raises(DataError, match="needs the speaking role"):
        partition(LABELS, 3, "roles")
    with pytest.raises(DataError, match="groups must match labels"):
        partition(LABELS, 3, "roles", groups=ROLES[:10])
    with pytest.raises(DataError, match="2 roles cannot fill 3 parts"):
        partition(LABELS, 3, "roles", groups=np.arange(600) % 2)
    with pytest.raises(DataError, match="needs the speaking role"):
        agent_shard(load_dataset("digits"), 0, 2, "roles", seed=0, alpha=0.5)


@pytest.mark.parametrize("spec, expected", [("0/1", (0, 1)), ("3/4", (3, 4)), (" 2/10 ", (2, 10))])
def test_parse_partition_good(spec: str, expected: tuple[int, int]) -> None:
    assert parse_partition(spec) == expected


@pytest.mark.parametrize("spec", ["3/2", "2/2", "-1/3", "1/0", "a/b", "1", "", "1/2/3"])
def test_parse_partition_bad(spec: str) -> None:
    with pytest.raises(DataError, match="bad partition"):
        parse_partition(spec)


def test_agent_shard_covers_training_set() -> None:
    ds = load_dataset("digits")
    shards = [agent_shard(ds, i, 4, "dirichlet", seed=7, alpha=0.5) for i in range(4)]
    assert sum(len(y) for _, y in shards) == len(ds.y_train)
    for x, y in shards:
        assert x.shape == (len(y), 64) and x.dtype == np.float32
    x0, y0 = agent_shard(ds, 0, 4, "dirichlet", seed=7, alpha=0.5)
    assert np.array_equal(y0, shards[0][1]) and np.array_equal(x0, shards[0][0])
    with pytest.raises(DataError, match="out of range"):
        agent_shard(ds, 4, 4, "iid", seed=0, alpha=0.5)
