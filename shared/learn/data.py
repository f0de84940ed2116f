"""Datasets and federated partitions, in plain numpy (no torch, so the coordinator stays light)."""

from __future__ import annotations

import functools
import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fleetfl.shared.core.choices import Partition

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "SCHEMES",
    "agent_shard",
    "load_dataset",
    "parse_partition",
    "partition",
    "resolve_data_dir",
    "shard_indices",
    "speeches_by_role",
    "window_targets",
]

ENV_DATA_DIR = "FL_DATA_DIR"
# Where `apt-get install dataset-fashion-mnist` puts the files; a module constant so tests and
# unusual installs can point it elsewhere.
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

DATASETS = ("digits", "mnist", "fashion", "shakespeare")
_ALIASES = {"fashion-mnist": "fashion"}
SCHEMES = tuple(p.value for p in Partition)  # the job's dealing schemes

_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_IMAGE_MAGIC, _LABEL_MAGIC = 2051, 2049
# Per-dataset (mean, std) of the training pixels in [0, 1], the usual published values.
_NORM = {"mnist": (0.1307, 0.3081), "fashion": (0.2860, 0.3530)}
# Shakespeare (tiny-shakespeare, char-rnn's input.txt), next-character prediction as in LEAF:
# a sample is SEQ_LEN characters of one role's text, its label the character that follows.
SHAKESPEARE_FILE = "input.txt"
SEQ_LEN = 80  # LEAF's window
# Test targets: the last 10% of each role's characters (a per-role split in text order, as
# LEAF splits each user's samples). Every role is then in both splits, so the test set measures
# the fleet's own speakers and `roles` agents are all represented; a role-disjoint split would
# instead hinge on which few big roles land in the test set.
SHAKESPEARE_TEST_FRACTION = 0.1
# Subsampling: a training window starts every TRAIN_STRIDE characters, about 226k windows
# (18 MB as uint8) instead of ~920k: every process of a 16-agent fleet holds the data set, and
# more near-duplicate overlapping windows would not make the few minutes of a run learn more.
SHAKESPEARE_TRAIN_STRIDE = 4
# The coordinator evaluates the whole test set at every version, and an LSTM forward over 80
# characters is costly on a CPU: ~3.4k test windows (~0.6 s on one core), accuracy noise ~1%.
SHAKESPEARE_TEST_STRIDE = 32
# Dirichlet resampling: give up after this many draws and repair the last one instead.
_DIRICHLET_MIN_SIZE = 10
_DIRICHLET_MAX_TRIES = 100


class DataError(ValueError):
    """A data set cannot be found or read, or a partition request is invalid."""


# eq=False: array fields make the generated __eq__ ambiguous; identity is what callers need.
@dataclass(frozen=True, eq=False)
class Dataset:
    """Train/test arrays of one data set. Arrays are shared through the cache: do not mutate.

    Text data sets (shakespeare) hold integer character codes in `x` (indices into `vocab`),
    and the speaking role of every sample (`roles_*`, indices into `role_names`), which the
    `roles` partition splits by.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    vocab: str = ""
    role_names: tuple[str, ...] = ()
    roles_train: np.ndarray | None = None
    roles_test: np.ndarray | None = None


def resolve_data_dir(flag: str | Path | None) -> Path | None:
    """The `--data-dir` flag if given, else env FL_DATA_DIR, else None."""
    if flag:
        return Path(flag)
    env = os.environ.get(ENV_DATA_DIR)
    return Path(env) if env else None


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """Load `digits`, `mnist`, `fashion` (alias `fashion-mnist`) or `shakespeare`; cached per
    process."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        known = ", ".join(DATASETS + tuple(_ALIASES))
        raise DataError(f"unknown dataset {name!r}; known datasets: {known}")
    root = resolve_data_dir(data_dir)
    if key == "digits":
        return _load_digits(root)
    # Cache on the folder the files were found in, so two spellings of a path share one copy.
    if key == "shakespeare":
        return _load_shakespeare(_find_text_file(key, root))
    return _load_idx_dataset(key, _find_idx_dir(key, root))


DIGITS_FILE = "digits.csv.gz"  # scikit-learn's copy of UCI's 8x8 digits: 64 pixels, label
DIGITS_TEST_SIZE = 360  # 20% of 1,797 rounded up, as scikit-learn's train_test_split


def _load_digits(root: Path | None = None) -> Dataset:
    """Digits from `<dir>/digits/digits.csv.gz` or `<dir>/digits.csv.gz`, else scikit-learn's
    installed copy, which is read without importing scikit-learn (and scipy): a device that
    trains the digits demo keeps ~80 MB less resident."""
    searched = [root / "digits", root] if root is not None else []
    for folder in searched:
        if (folder / DIGITS_FILE).is_file():
            return _read_digits((folder / DIGITS_FILE).resolve())
    from importlib.util import find_spec  # finds the package without running its __init__

    spec = find_spec("sklearn")
    if spec is not None and spec.submodule_search_locations:
        for base in spec.submodule_search_locations:
            path = Path(base) / "datasets" / "data" / DIGITS_FILE
            if path.is_file():
                return _read_digits(path.resolve())
    where = "".join(f"{d}, " for d in searched)
    raise DataError(f"digits: no {DIGITS_FILE} in {where or 'no --data-dir, '}and scikit-learn "
                    "is not installed: pip install 'fleetfl[digits]' (or fleetfl[coordinator]), "
                    f"or copy scikit-learn's sklearn/datasets/data/{DIGITS_FILE} into --data-dir")


@functools.lru_cache(maxsize=2)
def _read_digits(path: Path) -> Dataset:
    try:
        with gzip.open(path, "rt") as f:
            data = np.loadtxt(f, delimiter=",")
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if data.ndim != 2 or data.shape[1] != 65:
        raise DataError(f"{path}: expected rows of 64 pixels and a label, got shape {data.shape}")
    x = (data[:, :-1] / 16.0).astype(np.float32)
    y = data[:, -1].astype(np.int64)
    train, test = stratified_split(y, DIGITS_TEST_SIZE, seed=0)
    return Dataset("digits", x[train], y[train], x[test], y[test], num_classes=10)


def stratified_split(y: np.ndarray, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices as scikit-learn's `train_test_split(..., test_size=n_test,
    random_state=seed, stratify=y)` draws them (StratifiedShuffleSplit, the same random
    stream): the digits split did not change when scikit-learn stopped being imported
    (tests/test_agent_imports.py compares the two)."""
    rng = np.random.RandomState(seed)
    n_train = len(y) - n_test
    _, y_indices, class_counts = np.unique(y, return_inverse=True, return_counts=True)
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    n_i = _approximate_mode(class_counts, n_train, rng)
    t_i = _approximate_mode(class_counts - n_i, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for i, count in enumerate(class_counts):
        perm = class_indices[i].take(rng.permutation(count), mode="clip")
        train.extend(perm[: n_i[i]])
        test.extend(perm[n_i[i]: n_i[i] + t_i[i]])
    return rng.permutation(train), rng.permutation(test)


def _approximate_mode(class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState
                      ) -> np.ndarray:
    """Per-class draws summing to n_draws, ties broken at random (scikit-learn's helper)."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need_to_add)
            floored[rng.choice(inds, size=add_now, replace=False)] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(int)


def _candidate_dirs(key: str, root: Path | None) -> list[Path]:
    if key in ("mnist", "shakespeare"):
        return [root / key, root] if root is not None else []
    dirs = [root / "fashion-mnist", root / "fashion"] if root is not None else []
    return dirs + [FASHION_SYSTEM_DIR]


def _idx_path(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _find_idx_dir(key: str, root: Path | None) -> Path:
    if key == "mnist" and root is None:
        raise DataError(
            f"no data directory for 'mnist': pass --data-dir DIR or set {ENV_DATA_DIR}=DIR "
            "(DIR holding mnist/train-images-idx3-ubyte.gz etc.)"
        )
    if root is not None and not root.is_dir():
        raise DataError(f"data directory {root} does not exist (from --data-dir/{ENV_DATA_DIR})")
    searched = _candidate_dirs(key, root)
    for folder in searched:
        if all(_idx_path(folder, stem) for stem in _IDX_FILES.values()):
            return folder.resolve()
    msg = f"{key} IDX files not found; searched {', '.join(str(d) for d in searched)}"
    # Name what is missing in the first folder holding some of the files: the likely intent.
    for folder in searched:
        missing = [s for s in _IDX_FILES.values() if _idx_path(folder, s) is None]
        if len(missing) < len(_IDX_FILES):
            msg += f"; {folder} is missing {', '.join(m + '[.gz]' for m in missing)}"
            break
    if key == "fashion":
        msg += "; install them with `apt-get install dataset-fashion-mnist` or use --data-dir"
    raise DataError(msg)


def _find_text_file(key: str, root: Path | None) -> Path:
    if root is None:
        raise DataError(
            f"no data directory for {key!r}: pass --data-dir DIR or set {ENV_DATA_DIR}=DIR "
            f"(DIR holding {key}/{SHAKESPEARE_FILE})"
        )
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist (from --data-dir/{ENV_DATA_DIR})")
    searched = _candidate_dirs(key, root)
    for folder in searched:
        if (folder / SHAKESPEARE_FILE).is_file():
            return (folder / SHAKESPEARE_FILE).resolve()
    raise DataError(f"{key} {SHAKESPEARE_FILE} not found; searched "
                    f"{', '.join(str(d) for d in searched)} (tiny-shakespeare, char-rnn's "
                    "data/tinyshakespeare/input.txt)")


def speeches_by_role(text: str) -> dict[str, str]:
    """Each speaking role's speeches, in order, joined into one text (LEAF's per-role user).

    A speech starts with a line `Name:` at the top of a paragraph (first line of the file or
    after a blank line) and runs to the next blank line; its lines keep their newlines. Colons
    ending lines inside a speech are not headers. The same name in two plays is one role.
    """
    roles: dict[str, list[str]] = {}
    speech: list[str] | None = None
    after_blank = True
    for line in text.split("\n"):
        if not line.strip():
            speech, after_blank = None, True
            continue
        if after_blank and line.endswith(":") and len(line) > 1:
            speech = roles.setdefault(line[:-1].strip(), [])
        elif speech is not None:
            speech.append(line + "\n")
        # else: a paragraph without a speaker header; not in tiny-shakespeare, skipped
        after_blank = False
    return {name: "".join(lines) for name, lines in sorted(roles.items()) if lines}


def window_targets(length: int, seq_len: int = SEQ_LEN, stride: int = SHAKESPEARE_TRAIN_STRIDE,
                   test_stride: int = SHAKESPEARE_TEST_STRIDE,
                   test_fraction: float = SHAKESPEARE_TEST_FRACTION
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Positions (in one role's text of `length` characters) of the characters predicted by its
    training and by its test windows; window `i` is text[i - seq_len:i] -> text[i].

    Training windows lie wholly before the split point, test targets at or after it: no test
    character is ever inside a training window. A test window's context may reach back into
    the role's training text, as in any language-model evaluation of a continuation.
    """
    split = length - int(length * test_fraction)
    train = np.arange(seq_len, split, stride, dtype=np.int64)
    test = np.arange(max(split, seq_len), length, test_stride, dtype=np.int64)
    return train, test


@functools.lru_cache(maxsize=2)
def _load_shakespeare(path: Path) -> Dataset:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    roles = speeches_by_role(text)
    if not roles:
        raise DataError(f"{path}: no speeches found (expected paragraphs starting with a "
                        "'Name:' line, as in tiny-shakespeare)")
    vocab = "".join(sorted(set(text)))  # every character of the file, so any role encodes
    # Code points -> vocabulary index through a lookup table: fast for a 1 MB text.
    points = np.frombuffer(vocab.encode("utf-32-le"), "<u4")
    lookup = np.zeros(int(points.max()) + 1, np.int64)
    lookup[points] = np.arange(len(points))
    code_dtype = np.uint8 if len(vocab) <= 256 else np.int32  # uint8: 8x less memory than int64
    arrays: dict[str, list[np.ndarray]] = {k: [] for k in ("xtr", "ytr", "rtr", "xte", "yte",
                                                          "rte")}
    names: list[str] = []
    for name, speech in roles.items():
        codes = lookup[np.frombuffer(speech.encode("utf-32-le"), "<u4")].astype(code_dtype)
        train, test = window_targets(len(codes))
        if len(train) == 0:
            continue  # a few lines only: no full training window
        role = len(names)
        names.append(name)
        windows = np.lib.stride_tricks.sliding_window_view(codes, SEQ_LEN)
        for targets, (xk, yk, rk) in ((train, ("xtr", "ytr", "rtr")),
                                      (test, ("xte", "yte", "rte"))):
            arrays[xk].append(windows[targets - SEQ_LEN])
            arrays[yk].append(codes[targets].astype(np.int64))
            arrays[rk].append(np.full(len(targets), role, np.int32))
    cat = {k: np.concatenate(v) for k, v in arrays.items()}
    return Dataset("shakespeare", cat["xtr"], cat["ytr"], cat["xte"], cat["yte"],
                   num_classes=len(vocab), vocab=vocab, role_names=tuple(names),
                   roles_train=cat["rtr"], roles_test=cat["rte"])


@functools.lru_cache(maxsize=4)
def _load_idx_dataset(key: str, folder: Path) -> Dataset:
    mean, std = _NORM[key]
    arrays = {field: _read_idx(_idx_path(folder, stem)) for field, stem in _IDX_FILES.items()}
    for split in ("train", "test"):
        nx, ny = len(arrays[f"x_{split}"]), len(arrays[f"y_{split}"])
        if nx != ny:
            raise DataError(f"{folder}: {split} has {nx} images but {ny} labels")
    for field in ("x_train", "x_test"):
        if arrays[field].ndim != 3:
            raise DataError(f"{folder}: {_IDX_FILES[field]} does not hold images")
        x = arrays[field].astype(np.float32)
        x /= 255.0
        x -= mean
        x /= std
        arrays[field] = x[:, None, :, :]  # add the channel axis: (N, 1, H, W)
    for field in ("y_train", "y_test"):
        if arrays[field].ndim != 1:
            raise DataError(f"{folder}: {_IDX_FILES[field]} does not hold labels")
        arrays[field] = arrays[field].astype(np.int64)
    return Dataset(key, num_classes=10, **arrays)


def _read_idx(path: Path | None) -> np.ndarray:
    """Parse one IDX file (images: magic 2051, labels: 2049) into a uint8 array."""
    assert path is not None  # _find_idx_dir checked all four exist
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if len(raw) < 8:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    magic, count = (int(v) for v in np.frombuffer(raw, ">u4", count=2))
    if magic == _IMAGE_MAGIC:
        if len(raw) < 16:
            raise DataError(f"{path}: truncated IDX image header ({len(raw)} bytes)")
        rows, cols = (int(v) for v in np.frombuffer(raw, ">u4", count=2, offset=8))
        shape, offset = (count, rows, cols), 16
    elif magic == _LABEL_MAGIC:
        shape, offset = (count,), 8
    else:
        raise DataError(
            f"{path}: bad IDX magic {magic} (expected {_IMAGE_MAGIC} images or {_LABEL_MAGIC} "
            "labels); the file is corrupt or not an IDX file"
        )
    expected = offset + int(np.prod(shape))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DataError(f"{path}: {what}: {len(raw)} bytes, header says {expected}")
    return np.frombuffer(raw, np.uint8, offset=offset).reshape(shape)


def partition(
    labels: np.ndarray,
    num_parts: int,
    scheme: str = "iid",
    seed: int = 0,
    alpha: float = 0.5,
    shards_per_part: int = 2,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Split sample indices into `num_parts` disjoint, covering, sorted int64 arrays.

    `groups` (one id per sample, e.g. the speaking role) is needed by the `roles` scheme only:
    each part then gets whole groups.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if labels.ndim != 1:
        raise DataError(f"labels must be 1-D, got shape {labels.shape}")
    if not 1 <= num_parts <= n:
        raise DataError(f"num_parts must be between 1 and the number of samples ({n}), "
                        f"got {num_parts}")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_parts)
    elif scheme == "dirichlet":
        if not alpha > 0:
            raise DataError(f"dirichlet alpha must be > 0, got {alpha}")
        parts = _dirichlet_parts(labels, num_parts, alpha, rng)
    elif scheme == "shards":
        if shards_per_part < 1 or num_parts * shards_per_part > n:
            raise DataError(f"shards_per_part must be >= 1 and num_parts * shards_per_part <= {n}, "
                            f"got {shards_per_part}")
        parts = _shard_parts(labels, num_parts, shards_per_part, rng)
    elif scheme == "roles":
        if groups is None:
            raise DataError("partition 'roles' needs the speaking role of every sample "
                            "(groups=; shard_indices(ds, ...) passes a data set's): only the "
                            "shakespeare data set has them")
        groups = np.asarray(groups)
        if groups.shape != labels.shape:
            raise DataError(f"groups must match labels, got shapes {groups.shape} and "
                            f"{labels.shape}")
        parts = _role_parts(groups, num_parts, rng)
    else:
        raise DataError(f"unknown partition scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _dirichlet_parts(
    labels: np.ndarray, num_parts: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    # Never ask for more than an even split could give.
    min_size = min(_DIRICHLET_MIN_SIZE, len(labels) // num_parts)
    classes = np.unique(labels)
    for _ in range(_DIRICHLET_MAX_TRIES):
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_parts)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(num_parts, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for bucket, chunk in zip(buckets, np.split(idx, cuts), strict=True):
                bucket.append(chunk)
        parts = [np.concatenate(b) for b in buckets]
        if min(len(p) for p in parts) >= min_size:
            return parts
    return _top_up(parts, min_size)


def _top_up(parts: list[np.ndarray], min_size: int) -> list[np.ndarray]:
    """Deterministic fallback: move samples from the largest parts to the ones below min_size."""
    parts = list(parts)
    for i in range(len(parts)):
        while len(parts[i]) < min_size:
            donor = int(np.argmax([len(p) for p in parts]))  # ties -> lowest index
            take = min(min_size - len(parts[i]), len(parts[donor]) - min_size)
            parts[i] = np.concatenate([parts[i], parts[donor][-take:]])
            parts[donor] = parts[donor][:-take]
    return parts


def _role_parts(groups: np.ndarray, num_parts: int, rng: np.random.Generator
                ) -> list[np.ndarray]:
    """Whole roles per part, balanced by samples: largest role first to the lightest part
    (LPT greedy; imbalance at most one small role). The seed orders equal-sized roles and
    decides which part index gets which roles."""
    roles, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    if len(roles) < num_parts:
        raise DataError(f"partition 'roles': {len(roles)} roles cannot fill {num_parts} parts")
    shuffled = rng.permutation(len(roles))
    order = shuffled[np.argsort(-counts[shuffled], kind="stable")]
    part_of_slot = rng.permutation(num_parts)  # who receives the first (largest) roles
    load = np.zeros(num_parts, np.int64)
    owner = np.empty(len(roles), np.int64)
    for r in order:
        slot = int(np.argmin(load))  # ties -> lowest slot
        owner[r] = part_of_slot[slot]
        load[slot] += counts[r]
    sample_owner = owner[inverse]
    return [np.flatnonzero(sample_owner == i) for i in range(num_parts)]


def _shard_parts(
    labels: np.ndarray, num_parts: int, shards_per_part: int, rng: np.random.Generator
) -> list[np.ndarray]:
    # Shuffle first, then stable-sort by label: label-sorted, but which samples of a class land
    # in which shard depends on the seed.
    perm = rng.permutation(len(labels))
    order = perm[np.argsort(labels[perm], kind="stable")]
    shards = np.array_split(order, num_parts * shards_per_part)
    owner = rng.permutation(len(shards))
    return [
        np.concatenate([shards[s] for s in owner[i * shards_per_part:(i + 1) * shards_per_part]])
        for i in range(num_parts)
    ]


def parse_partition(spec: str) -> tuple[int, int]:
    """Parse `"i/n"` (agent i of n, 0-based) into `(i, n)`."""
    head, sep, tail = spec.strip().partition("/")
    try:
        if not sep:
            raise ValueError
        index, total = int(head), int(tail)
    except ValueError:
        msg = f"bad partition {spec!r}: expected 'i/n' with integers, e.g. '0/4'"
        raise DataError(msg) from None
    if total < 1 or not 0 <= index < total:
        raise DataError(f"bad partition {spec!r}: need n >= 1 and 0 <= i < n (i is 0-based)")
    return index, total


def agent_shard(
    ds: Dataset,
    index: int,
    num_parts: int,
    scheme: str,
    seed: int,
    alpha: float,
    shards_per_part: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """The (x, y) training data of agent `index` out of `num_parts`."""
    if not 0 <= index < num_parts:
        raise DataError(f"agent index {index} out of range for {num_parts} parts")
    idx = shard_indices(ds, num_parts, scheme, seed, alpha, shards_per_part)[index]
    return ds.x_train[idx], ds.y_train[idx]


def shard_indices(
    ds: Dataset,
    num_parts: int,
    scheme: str,
    seed: int,
    alpha: float,
    shards_per_part: int = 2,
) -> list[np.ndarray]:
    """`partition` of a data set's training samples, with its roles for the `roles` scheme."""
    return partition(ds.y_train, num_parts, scheme, seed, alpha, shards_per_part,
                     groups=ds.roles_train)
