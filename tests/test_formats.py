"""The task data loaders (shared/tasks/formats.py) on real data: scikit-learn's bundled digits
(as PNG files and .npz) and breast cancer table (as CSV), plus the broken inputs a user hits."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_breast_cancer, load_digits

from fleetfl.shared.learn.data import DataError
from fleetfl.shared.tasks.formats import csv_table, image_folder, npz_arrays
from fleetfl.shared.tasks.samples import Samples

CLASSES = [str(d) for d in range(10)]


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    # 0..16 -> 0..255, the pixel values the PNGs hold
    images = np.round(data.images * (255 / 16)).astype(np.uint8)
    return images, data.target.astype(np.int64)


def write_pngs(root: Path, images: np.ndarray, labels: np.ndarray,
               keep: set[int] | None = None) -> None:
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        if keep is not None and int(label) not in keep:
            continue
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(root / str(label) / f"{i:04d}.png")


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory: pytest.TempPathFactory, digits) -> Path:
    root = tmp_path_factory.mktemp("digits")
    write_pngs(root, *digits)
    return root


def original_index(samples) -> np.ndarray:
    """Each sample's row in load_digits (the PNG's file name)."""
    return np.array([int(p.stem) for p in samples.files])


# ------------------------------------------------------------------------------- images


def test_image_folder_round_trips_the_digits(digit_folder: Path, digits) -> None:
    images, targets = digits
    samples = image_folder(digit_folder, CLASSES)
    assert isinstance(samples, Samples)
    assert len(samples) == len(images)
    assert samples.source == f"{digit_folder} (1,797 images, 10 classes)"
    orig = original_index(samples)
    assert sorted(orig) == list(range(len(images)))
    idx = np.random.default_rng(0).integers(0, len(samples), 300)  # any order, repeats
    x, y = samples.batch(idx)
    assert x.dtype == np.float32 and x.shape == (300, 1, 8, 8)
    assert y.dtype == np.int64
    np.testing.assert_array_equal(y, targets[orig[idx]])
    np.testing.assert_allclose(x[:, 0], images[orig[idx]] / 255, atol=1e-6, rtol=0)


def test_image_folder_normalises_and_flattens(digit_folder: Path, digits) -> None:
    images, _ = digits
    samples = image_folder(digit_folder, CLASSES, mean=0.5, std=0.25, flatten=True)
    x, _ = samples.batch(np.arange(50))
    assert x.shape == (50, 64)
    want = (images[original_index(samples)[:50]] / 255 - 0.5) / 0.25
    np.testing.assert_allclose(x, want.reshape(50, 64), atol=1e-6 / 0.25, rtol=0)


def test_image_folder_resizes_and_converts_to_rgb(digit_folder: Path, digits) -> None:
    images, _ = digits
    resized = image_folder(digit_folder, CLASSES, size=(16, 12))
    x, _ = resized.batch(np.arange(5))
    assert x.shape == (5, 1, 12, 16)
    first = original_index(resized)[0]
    want = Image.fromarray(images[first]).resize((16, 12), Image.Resampling.BILINEAR)
    np.testing.assert_allclose(x[0, 0], np.asarray(want) / 255, atol=1e-6, rtol=0)
    assert resized.batch(np.arange(5))[0].shape == (5, 1, 12, 16)
    assert image_folder(digit_folder, CLASSES, size=(4, 4), flatten=True).batch(
        np.arange(3))[0].shape == (3, 16)

    rgb = image_folder(digit_folder, CLASSES, mode="RGB", mean=[0.1, 0.2, 0.3])
    x, _ = rgb.batch(np.arange(7))
    assert x.shape == (7, 3, 8, 8)
    gray = images[original_index(rgb)[:7]] / 255
    for channel, mean in enumerate([0.1, 0.2, 0.3]):
        np.testing.assert_allclose(x[:, channel], gray - mean, atol=1e-6, rtol=0)


def test_a_device_missing_classes_keeps_the_task_labels(tmp_path: Path, digits) -> None:
    images, targets = digits
    write_pngs(tmp_path, images[:200], targets[:200], keep={3, 7})
    (tmp_path / ".DS_Store").write_bytes(b"\0\0")
    (tmp_path / "README.txt").write_text("not data")
    (tmp_path / "3" / "notes.txt").write_text("ignored")
    (tmp_path / "3" / ".hidden.png").write_bytes(b"ignored, hidden")
    (tmp_path / ".cache").mkdir()  # hidden folder: not a class
    samples = image_folder(tmp_path, CLASSES)
    expected = [i for i in range(200) if targets[i] in (3, 7)]
    assert len(samples) == len(expected)
    assert "2 of 10 classes" in samples.source
    _, y = samples.batch(np.arange(len(samples)))
    assert set(y.tolist()) == {3, 7}  # indices in CLASSES, not 0 and 1
    np.testing.assert_array_equal(y, targets[original_index(samples)])


def test_image_suffixes_are_case_insensitive(tmp_path: Path, digits) -> None:
    images, _ = digits
    (tmp_path / "0").mkdir()
    Image.fromarray(images[0]).save(tmp_path / "0" / "a.PNG")
    Image.fromarray(images[0]).save(tmp_path / "0" / "b.JPEG", format="JPEG", quality=100)
    Image.fromarray(images[0]).save(tmp_path / "0" / "c.jpg", format="JPEG", quality=100)
    samples = image_folder(tmp_path, CLASSES)
    assert [p.name for p in samples.files] == ["a.PNG", "b.JPEG", "c.jpg"]
    x, _ = samples.batch(np.arange(3))
    np.testing.assert_allclose(x[0, 0], images[0] / 255, atol=1e-6, rtol=0)
    np.testing.assert_allclose(x[1:, 0], np.stack([images[0]] * 2) / 255, atol=0.05)


def test_image_folder_refuses_bad_input(tmp_path: Path, digits) -> None:
    images, targets = digits
    with pytest.raises(DataError, match="no such folder"):
        image_folder(tmp_path / "absent", CLASSES)

    empty = tmp_path / "empty"
    (empty / "3").mkdir(parents=True)
    with pytest.raises(DataError) as err:
        image_folder(empty, CLASSES)
    assert str(err.value).startswith(f"{empty}: no images (expected {empty}/<class>/*.png")
    assert "0, 1, 2" in str(err.value)

    unknown = tmp_path / "unknown"
    write_pngs(unknown, images[:20], targets[:20])
    (unknown / "cats").mkdir()
    with pytest.raises(DataError) as err:
        image_folder(unknown, CLASSES)
    assert str(unknown / "cats") in str(err.value)
    assert "'cats' is not one of the task's classes (0, 1, 2, 3" in str(err.value)

    sizes = tmp_path / "sizes"
    write_pngs(sizes, images[:20], targets[:20])
    odd = sizes / "5" / "odd.png"
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(odd)
    with pytest.raises(DataError) as err:
        image_folder(sizes, CLASSES)
    assert str(odd) in str(err.value) and "8x9" in str(err.value) and "8x8" in str(err.value)
    assert len(image_folder(sizes, CLASSES, size=(8, 8))) == 21  # resizing accepts it


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_image_folder_refuses_a_corrupt_png(tmp_path: Path, digits, damage: str) -> None:
    images, targets = digits
    write_pngs(tmp_path, images[:30], targets[:30])
    bad = sorted((tmp_path / "4").iterdir())[0]
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x13\x37" * 40)
    with pytest.raises(DataError) as err:
        image_folder(tmp_path, CLASSES)
    message = str(err.value)
    assert message.startswith(f"{bad}: ")
    if damage == "truncated":
        assert "corrupt image (" in message  # with Pillow's reason
    else:
        assert "not an image Pillow can read" in message


# ---------------------------------------------------------------------------------- CSV


@pytest.fixture(scope="module")
def cancer() -> tuple[np.ndarray, np.ndarray, list[str]]:
    data = load_breast_cancer(as_frame=False)
    return data.data, data.target.astype(np.int64), [str(n) for n in data.feature_names]


def write_csv(path: Path, header: list[str], rows) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def cancer_rows(x: np.ndarray, y) -> list[list]:
    # repr() round-trips a float64 exactly
    return [[*(repr(float(v)) for v in row), label] for row, label in zip(x, y, strict=True)]


@pytest.fixture(scope="module")
def cancer_csv(tmp_path_factory: pytest.TempPathFactory, cancer) -> Path:
    x, y, names = cancer
    path = tmp_path_factory.mktemp("cancer") / "cancer.csv"
    return write_csv(path, [*names, "label"], cancer_rows(x, y))


def test_csv_table_reads_the_breast_cancer_table(cancer_csv: Path, cancer) -> None:
    x_true, y_true, _ = cancer
    samples = csv_table(cancer_csv, "label")
    assert isinstance(samples, Samples)
    assert samples.source == f"{cancer_csv} (569 rows, 30 features)"
    x, y = samples.batch(np.arange(len(samples)))
    assert x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_array_equal(x, x_true.astype(np.float32))
    np.testing.assert_array_equal(y, y_true)


def test_csv_streaming_gives_the_same_batches(cancer_csv: Path, cancer) -> None:
    x_true, y_true, _ = cancer
    memory = csv_table(cancer_csv, "label")
    streamed = csv_table(cancer_csv, "label", in_memory_bytes=0)
    assert not memory.streamed and streamed.streamed
    assert "read per batch" in streamed.source
    rng = np.random.default_rng(1)
    for _ in range(5):
        idx = rng.integers(0, len(memory), 64)
        (xm, ym), (xs, ys) = memory.batch(idx), streamed.batch(idx)
        np.testing.assert_array_equal(xm, xs)
        np.testing.assert_array_equal(ym, ys)
        np.testing.assert_array_equal(xs, x_true[idx].astype(np.float32))
        np.testing.assert_array_equal(ys, y_true[idx])


def test_csv_folder_is_concatenated(tmp_path: Path, cancer) -> None:
    x_true, y_true, names = cancer
    rows = cancer_rows(x_true, y_true)
    write_csv(tmp_path / "part-b.csv", [*names, "label"], rows[300:])
    write_csv(tmp_path / "part-a.csv", [*names, "label"], rows[:300])
    (tmp_path / "notes.txt").write_text("ignored")
    for budget in (2**30, 0):
        samples = csv_table(tmp_path, "label", in_memory_bytes=budget)
        assert len(samples) == 569
        idx = np.r_[568, 0, 299, 300, 299, 17]
        x, y = samples.batch(idx)
        np.testing.assert_array_equal(x, x_true[idx].astype(np.float32))
        np.testing.assert_array_equal(y, y_true[idx])

    write_csv(tmp_path / "part-c.csv", [*names[:-1], "other", "label"], rows[:5])
    with pytest.raises(DataError) as err:
        csv_table(tmp_path, "label")
    assert str(err.value).startswith(f"{tmp_path / 'part-c.csv'}: header differs")


def test_csv_string_classes_feature_subset_and_transform(tmp_path: Path, cancer) -> None:
    x_true, y_true, names = cancer
    classes = ["malignant", "benign"]  # scikit-learn's target_names order
    # a quoted text column with line breaks: records spanning lines must keep their offsets
    header = ["id", "note", "diagnosis", *names]
    rows = [[f"p{i}", f"seen\non day {i}" if i % 3 == 0 else "", classes[label],
             *(repr(float(v)) for v in row)]
            for i, (row, label) in enumerate(zip(x_true, y_true, strict=True))]
    path = write_csv(tmp_path / "named.csv", header, rows)
    cols = ["mean radius", "worst area"]
    want = np.log1p(x_true[:, [names.index(c) for c in cols]].astype(np.float32))
    idx = np.random.default_rng(2).permutation(569)[:100]
    batches = []
    for budget in (2**30, 0):
        samples = csv_table(path, "diagnosis", features=cols, classes=classes,
                            transform=np.log1p, in_memory_bytes=budget)
        assert samples.source.startswith(f"{path} (569 rows, 2 features")
        x, y = samples.batch(idx)
        np.testing.assert_array_equal(y, y_true[idx])
        np.testing.assert_allclose(x, want[idx], rtol=1e-6)
        batches.append(x)
    np.testing.assert_array_equal(*batches)

    # a bad cell after multi-line records: the line number is the one an editor shows
    rows[10][3] = "n/a"
    write_csv(path, header, rows)
    line = 2 + 10 + sum(1 for r in rows[:10] if "\n" in r[1])  # header, 10 rows, breaks
    with pytest.raises(DataError) as err:
        csv_table(path, "diagnosis", features=[names[0]], classes=classes)
    assert str(err.value) == (f"{path}, line {line}, column {names[0]!r}: 'n/a' is not a "
                              "finite number")


def test_csv_integer_labels(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", ["a", "label"], [["1.5", "2.0"], ["2", " 3 "]])
    _, y = csv_table(path, "label").batch(np.arange(2))
    np.testing.assert_array_equal(y, [2, 3])
    for bad in ("1.5", "-1", "cat"):
        write_csv(path, ["a", "label"], [["1", "0"], ["2", bad]])
        with pytest.raises(DataError) as err:
            csv_table(path, "label")
        assert str(err.value).startswith(f"{path}, line 3, column 'label': label {bad!r} is not")


def test_csv_table_refuses_bad_input(tmp_path: Path, cancer_csv: Path, cancer) -> None:
    x_true, y_true, names = cancer
    with pytest.raises(DataError) as err:
        csv_table(cancer_csv, "diagnosis")
    message = str(err.value)
    assert message.startswith(f"{cancer_csv}: no label column 'diagnosis' (columns: mean radius")
    assert message.endswith("worst fractal dimension, label)")

    with pytest.raises(DataError, match="no feature column 'mean colour'"):
        csv_table(cancer_csv, "label", features=["mean radius", "mean colour"])

    rows = cancer_rows(x_true[:50], y_true[:50])
    rows[41][7] = "abc"
    path = write_csv(tmp_path / "bad.csv", [*names, "label"], rows)
    with pytest.raises(DataError) as err:
        csv_table(path, "label")
    assert str(err.value) == f"{path}, line 43, column {names[7]!r}: 'abc' is not a finite number"
    rows[41][7] = "inf"
    write_csv(path, [*names, "label"], rows)
    with pytest.raises(DataError, match="line 43, column .*'inf' is not a finite number"):
        csv_table(path, "label")
    rows[41] = rows[41][:-1]
    write_csv(path, [*names, "label"], rows)
    with pytest.raises(DataError, match="line 43: 30 fields, the header has 31"):
        csv_table(path, "label")

    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(DataError) as err:
        csv_table(empty, "label")
    assert str(err.value).startswith(f"{empty}: empty file")
    header_only = write_csv(tmp_path / "header.csv", [*names, "label"], [])
    with pytest.raises(DataError) as err:
        csv_table(header_only, "label")
    assert str(err.value) == f"{header_only}: no rows after the header"
    with pytest.raises(DataError, match="no such file or folder"):
        csv_table(tmp_path / "absent.csv", "label")
    folder = tmp_path / "nocsv"
    folder.mkdir()
    with pytest.raises(DataError, match="no .csv files"):
        csv_table(folder, "label")


def test_csv_byte_order_mark_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfa,b,label\r\n1,2,0\r\n\r\n3,4,1\r\n")
    for budget in (2**30, 0):
        x, y = csv_table(path, "label", in_memory_bytes=budget).batch(np.array([1, 0]))
        np.testing.assert_array_equal(x, [[3, 4], [1, 2]])
        np.testing.assert_array_equal(y, [1, 0])


# ---------------------------------------------------------------------------------- npz


def test_npz_savez_is_memory_mapped(tmp_path: Path, digits) -> None:
    images, targets = digits
    path = tmp_path / "digits.npz"
    np.savez(path, x=images.astype(np.float32) / 255, y=targets)
    samples = npz_arrays(path)
    assert samples.source == f"{path} (1,797 samples, memory-mapped)"
    # the arrays are views of the file itself, not copies in memory
    assert isinstance(samples.x, np.memmap) and isinstance(samples.y, np.memmap)
    assert Path(samples.x.filename) == path.resolve()
    assert samples.x.offset > 0
    idx = np.random.default_rng(3).integers(0, 1797, 200)
    x, y = samples.batch(idx)
    assert type(x) is np.ndarray and type(y) is np.ndarray  # copies, not file views
    np.testing.assert_array_equal(x, images[idx].astype(np.float32) / 255)
    np.testing.assert_array_equal(y, targets[idx])


def test_npz_fortran_order_and_other_names(tmp_path: Path, digits) -> None:
    images, targets = digits
    path = tmp_path / "f.npz"
    flat = np.asfortranarray(images.reshape(len(images), -1))
    np.savez(path, inputs=flat, labels=targets, extra=np.arange(3))
    samples = npz_arrays(path, x="inputs", y="labels")
    assert isinstance(samples.x, np.memmap) and samples.x.flags.f_contiguous
    np.testing.assert_array_equal(samples.batch(np.arange(100))[0], flat[:100])


def test_npz_savez_compressed_is_loaded(tmp_path: Path, digits) -> None:
    images, targets = digits
    path = tmp_path / "digits.npz"
    np.savez_compressed(path, x=images, y=targets)
    samples = npz_arrays(path)
    assert "compressed: loaded into memory" in samples.source
    assert not isinstance(samples.x, np.memmap)
    idx = np.arange(1797)[::-7]
    x, y = samples.batch(idx)
    np.testing.assert_array_equal(x, images[idx])
    np.testing.assert_array_equal(y, targets[idx])


def test_npz_refuses_bad_input(tmp_path: Path, digits) -> None:
    images, targets = digits
    path = tmp_path / "d.npz"
    np.savez(path, images=images, target=targets)
    with pytest.raises(DataError) as err:
        npz_arrays(path)
    assert str(err.value) == f"{path}: no array 'x' (arrays: images, target)"

    text = tmp_path / "notes.npz"
    text.write_text("x,y\n1,2\n")
    with pytest.raises(DataError) as err:
        npz_arrays(text)
    assert str(err.value).startswith(f"{text}: not an .npz file")

    with pytest.raises(DataError, match="no such file"):
        npz_arrays(tmp_path / "absent.npz")

    np.savez(path, x=images, y=targets[:-1])
    with pytest.raises(DataError) as err:
        npz_arrays(path)
    assert str(err.value) == f"{path}: 1,797 samples in 'x' but 1,796 in 'y'"

    for save in (np.savez, np.savez_compressed):
        save(path, x=images, y=np.array([object()] * len(images)))
        with pytest.raises(DataError) as err:
            npz_arrays(path)
        assert str(err.value).startswith(f"{path}: array 'y': ")

    np.savez(path, x=images, y=targets)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 4000])  # cut into the last member and the directory
    with pytest.raises(DataError) as err:
        npz_arrays(path)
    assert str(err.value).startswith(f"{path}: not an .npz file (not a zip archive: truncated")


def test_loaders_accept_str_paths(digit_folder: Path, cancer_csv: Path) -> None:
    assert len(image_folder(str(digit_folder), CLASSES)) == 1797
    assert len(csv_table(str(cancer_csv), "label")) == 569
    copy = digit_folder.parent / "copy"
    shutil.copytree(digit_folder / "1", copy / "1")
    assert len(image_folder(copy, CLASSES)) == len(list((digit_folder / "1").iterdir()))
