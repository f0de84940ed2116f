"""Ready-made loaders for a device's own data: a folder of images, CSV tables, an .npz file.

A task's `train(folder)` is usually one line, e.g.
`lambda folder: image_folder(folder / "train", CLASSES, mean=0.13, std=0.31)`.

Every loader checks the whole data set when it is built, so a broken file stops the agent
before it joins (a `DataError` naming the file and what is wrong), and then reads samples batch
by batch: images are decoded per batch, large CSV files are re-read per batch from recorded
row offsets, uncompressed .npz members are memory-mapped. Data larger than memory stays on disk.
"""

from __future__ import annotations

import csv
import math
import struct
import zipfile
from array import array
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from numpy.lib import format as npy_format
from PIL import Image, UnidentifiedImageError

from fleetfl.shared.learn.data import DataError
from fleetfl.shared.tasks.samples import ArraySamples, Samples

__all__ = ["csv_table", "image_folder", "npz_arrays"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
_CHANNELS = {"L": 1, "RGB": 3}


def _indices(indices: np.ndarray, n: int, source: str) -> np.ndarray:
    """`indices` as intp, refusing out-of-range ones (negative ones would silently wrap)."""
    idx = np.asarray(indices, dtype=np.intp).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"{source}: sample index out of range 0..{n - 1}")
    return idx


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


# ---------------------------------------------------------------------------------- images


class ImageFolder:
    """Images in `folder/<class>/`, decoded per batch (see `image_folder`)."""

    def __init__(self, folder: Path, files: list[Path], labels: np.ndarray, mode: str,
                 size: tuple[int, int], resize: bool, mean: np.ndarray, std: np.ndarray,
                 flatten: bool, source: str) -> None:
        self.folder, self.files, self.labels = folder, files, labels
        self.mode, self.size, self._resize = mode, size, resize
        self._mean, self._std, self.flatten, self.source = mean, std, flatten, source

    def __len__(self) -> int:
        return len(self.files)

    def batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = _indices(indices, len(self.files), self.source)
        width, height = self.size
        channels = _CHANNELS[self.mode]
        x = np.empty((len(idx), channels, height, width), dtype=np.float32)
        for row, i in enumerate(idx):
            path = self.files[i]
            try:
                with Image.open(path) as im:
                    im = im if im.mode == self.mode else im.convert(self.mode)
                    if self._resize and im.size != self.size:
                        im = im.resize(self.size, Image.Resampling.BILINEAR)
                    pixels = np.asarray(im)
            except (OSError, SyntaxError, ValueError) as exc:
                # Checked at construction, so the file changed since: still name it.
                raise DataError(f"{path}: cannot decode image ({exc})") from None
            if pixels.shape[:2] != (height, width):
                raise DataError(f"{path}: image is {pixels.shape[1]}x{pixels.shape[0]}, "
                                f"the others are {width}x{height}")
            # (H, W) for "L", (H, W, C) otherwise -> (C, H, W)
            x[row] = pixels.reshape(height, width, channels).transpose(2, 0, 1)
        x *= np.float32(1 / 255)
        x -= self._mean
        x /= self._std
        if self.flatten:
            x = x.reshape(len(idx), -1)
        return x, self.labels[idx]


def _check_image(path: Path) -> tuple[int, int]:
    """The image's (width, height) from its header, after Pillow verified the file."""
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()  # PNG: every chunk's CRC, so a truncated or damaged file is caught
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image Pillow can read (corrupt, or not a "
                        f"{path.suffix} file)") from None
    except (OSError, SyntaxError, ValueError, struct.error) as exc:
        raise DataError(f"{path}: corrupt image ({exc})") from None
    return size


def _per_channel(value: float | Sequence[float], channels: int, what: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float32).reshape(-1)
    if arr.size not in (1, channels):
        raise ValueError(f"image_folder: {what} needs 1 or {channels} values, got {arr.size}")
    return arr.reshape(-1, 1, 1) if arr.size > 1 else arr.reshape(())


def image_folder(folder: str | Path, classes: Sequence[str], *,
                 size: tuple[int, int] | None = None, mode: str = "L",
                 mean: float | Sequence[float] = 0.0, std: float | Sequence[float] = 1.0,
                 flatten: bool = False) -> Samples:
    """Images in `folder/<class name>/*.png|*.jpg|*.jpeg`, labelled by the class's index in
    `classes` (the task's full list, so a device lacking some classes keeps the same labels).

    A batch is float32 `(N, C, H, W)` (C = 1 for `mode="L"`, 3 for `"RGB"`), pixels scaled to
    [0, 1] then `(x - mean) / std` (`mean`/`std` a number or one per channel); `flatten=True`
    gives `(N, C*H*W)`. `size=(width, height)` resizes (bilinear); without it every image must
    have the same size. Every file is verified up front; images are decoded per batch.
    """
    folder, classes = Path(folder), list(classes)
    size, mean_arr, std_arr = _image_options(classes, size, mode, mean, std)
    files, y = _class_files(folder, classes)
    common = _common_size(files, size)
    present = len(np.unique(y))
    count = f"{len(classes)}" if present == len(classes) else f"{present} of {len(classes)}"
    source = f"{folder} ({len(files):,} images, {count} classes)"
    return ImageFolder(folder, files, y, mode, size or common, size is not None,
                       mean_arr, std_arr, flatten, source)


def _image_options(classes: list[str], size: tuple[int, int] | None, mode: str,
                   mean: float | Sequence[float], std: float | Sequence[float]
                   ) -> tuple[tuple[int, int] | None, np.ndarray, np.ndarray]:
    """The task's own arguments checked (a ValueError: the task is wrong, not the data)."""
    if mode not in _CHANNELS:
        raise ValueError(f"image_folder: mode must be one of {', '.join(_CHANNELS)}, "
                         f"not {mode!r}")
    if len(set(classes)) != len(classes) or not classes:
        raise ValueError("image_folder: classes must be a non-empty list of distinct names")
    if size is not None:
        size = (int(size[0]), int(size[1]))
        if min(size) < 1:
            raise ValueError(f"image_folder: size must be (width, height) >= 1, not {size}")
    channels = _CHANNELS[mode]
    mean_arr = _per_channel(mean, channels, "mean")
    std_arr = _per_channel(std, channels, "std")
    if np.any(std_arr == 0):
        raise ValueError("image_folder: std must not be 0")
    return size, mean_arr, std_arr


def _class_files(folder: Path, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    """Every image under `folder/<class>/` and its label (the class's index)."""
    known = ", ".join(classes)
    expected = f"expected {folder}/<class>/*.png or .jpg, classes: {known}"
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder ({expected})")
    index = {name: i for i, name in enumerate(classes)}
    files: list[Path] = []
    labels: list[int] = []
    # Files directly in `folder` are ignored (a README, a preview): only class folders count.
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p)):
        if sub.name not in index:
            raise DataError(f"{sub}: folder {sub.name!r} is not one of the task's classes "
                            f"({known})")
        found = sorted(p for p in sub.iterdir() if _visible(p) and p.is_file()
                       and p.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        labels += [index[sub.name]] * len(found)
    if not files:
        raise DataError(f"{folder}: no images ({expected})")
    return files, np.asarray(labels, dtype=np.int64)


def _common_size(files: list[Path], size: tuple[int, int] | None) -> tuple[int, int]:
    """Verify every file; without a resize, all must have the first one's size."""
    first_path, first = files[0], _check_image(files[0])
    for path in files[1:]:
        image_size = _check_image(path)
        if size is None and image_size != first:
            raise DataError(f"{path}: image is {image_size[0]}x{image_size[1]} but "
                            f"{first_path} is {first[0]}x{first[1]}; give size=(w, h) "
                            "to resize them all")
    return first


# ------------------------------------------------------------------------------------- CSV


def _lines(f: BinaryIO, name: Path, first_line: int) -> Iterator[str]:
    """Decoded lines of a binary file (so byte offsets stay known), for `csv.reader`."""
    for n, raw in enumerate(f, start=first_line):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{name}, line {n}: not UTF-8 text ({exc.reason})") from None


class _RowParser:
    """Turns one CSV record into (features, label), with errors naming file, line, column."""

    def __init__(self, header: list[str], label: str, features: list[str],
                 classes: list[str] | None) -> None:
        self.width = len(header)
        self.names = features
        self.feature_cols = [header.index(name) for name in features]
        self.label_col = header.index(label)
        self.label = label
        self.class_index = {c: i for i, c in enumerate(classes)} if classes is not None else None

    def __call__(self, row: list[str], path: Path, line: int) -> tuple[list[float], int]:
        if len(row) != self.width:
            raise DataError(f"{path}, line {line}: {len(row)} fields, the header has "
                            f"{self.width}")
        values = []
        for col, name in zip(self.feature_cols, self.names, strict=True):
            cell = row[col]
            try:
                value = float(cell)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise DataError(f"{path}, line {line}, column {name!r}: {cell!r} is not a "
                                "finite number")
            values.append(value)
        return values, self._label(row[self.label_col], path, line)

    def _label(self, cell: str, path: Path, line: int) -> int:
        where = f"{path}, line {line}, column {self.label!r}"
        text = cell.strip()
        if self.class_index is not None:
            if text not in self.class_index:
                raise DataError(f"{where}: label {cell!r} is not one of the classes "
                                f"({', '.join(self.class_index)})")
            return self.class_index[text]
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value.is_integer() and value >= 0):
            raise DataError(f"{where}: label {cell!r} is not a class index (an integer >= 0; "
                            "give classes=[...] for named labels)")
        return int(value)


class CsvTable:
    """Rows of one or more CSV files (see `csv_table`); parsed arrays in memory, or just each
    row's (file, byte offset) and the rows re-read per batch."""

    def __init__(self, files: list[Path], parser: _RowParser, y: np.ndarray,
                 x: np.ndarray | None, file_of: np.ndarray, offset_of: np.ndarray,
                 line_of: np.ndarray, transform: Callable[[np.ndarray], np.ndarray] | None,
                 source: str) -> None:
        self.files, self._parser, self.labels, self._x = files, parser, y, x
        self._file_of, self._offset_of, self._line_of = file_of, offset_of, line_of
        self.transform, self.source = transform, source

    @property
    def streamed(self) -> bool:
        return self._x is None

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = _indices(indices, len(self.labels), self.source)
        x = self._x[idx] if self._x is not None else self._read(idx)
        if self.transform is not None:
            x = np.asarray(self.transform(x), dtype=np.float32)
        return x, self.labels[idx]

    def _read(self, idx: np.ndarray) -> np.ndarray:
        x = np.empty((len(idx), len(self._parser.feature_cols)), dtype=np.float32)
        # Read in file order (sequential I/O, each file opened once), fill in the asked order.
        order = np.lexsort((self._offset_of[idx], self._file_of[idx]))
        handle, current = None, -1
        try:
            for pos in order:
                i = idx[pos]
                file_no = int(self._file_of[i])
                if file_no != current:
                    if handle is not None:
                        handle.close()
                    handle, current = open(self.files[file_no], "rb"), file_no
                path, line = self.files[file_no], int(self._line_of[i])
                handle.seek(int(self._offset_of[i]))
                row = next(csv.reader(_lines(handle, path, line)), None)
                if row is None:
                    raise DataError(f"{path}, line {line}: the file changed since it was read")
                x[pos] = self._parser(row, path, line)[0]
        finally:
            if handle is not None:
                handle.close()
        return x


def _csv_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and _visible(p) and p.suffix.lower() == ".csv")
        if not files:
            raise DataError(f"{path}: no .csv files in this folder")
        return files
    if not path.is_file():
        raise DataError(f"{path}: no such file or folder")
    return [path]


def csv_table(path: str | Path, label: str, *, features: Sequence[str] | None = None,
              classes: Sequence[str] | None = None,
              transform: Callable[[np.ndarray], np.ndarray] | None = None,
              in_memory_bytes: int = 64 * 2**20) -> Samples:
    """Rows of a CSV file, or of every `*.csv` in a folder (sorted, same header), as float32
    features `(N, F)` and int64 labels.

    `label` names the label column: integer class indices, or with `classes` one of those
    names. `features` lists the feature columns (default: every other column); every cell must
    be a finite number. `transform` (e.g. `np.log1p`) is applied to each float32 feature
    batch. Every row is checked up front; files larger than `in_memory_bytes` in total are
    not kept in memory but re-read row by row for each batch.
    """
    path = Path(path)
    files = _csv_files(path)
    found = _CsvRows(keep=sum(f.stat().st_size for f in files) <= in_memory_bytes)
    class_list = list(classes) if classes is not None else None
    header: list[str] | None = None
    for file_no, file in enumerate(files):
        with open(file, "rb") as f:
            records = _records(f, file)
            first = next(records, None)
            if first is None:
                raise DataError(f"{file}: empty file (expected a header row, then one row "
                                "per sample)")
            file_header = [name.strip() for name in first[2]]
            if header is None:
                header = file_header
                parser = _make_parser(file, header, label, features, class_list)
            elif file_header != header:
                raise DataError(f"{file}: header differs from {files[0]}'s "
                                f"({', '.join(file_header)} vs {', '.join(header)})")
            before = len(found.labels)
            for start, line, row in records:
                found.add(parser(row, file, line), file_no, start, line)
        if len(found.labels) == before:
            raise DataError(f"{file}: no rows after the header")
    return found.table(path, files, parser, transform)


def _records(f: BinaryIO, file: Path) -> Iterator[tuple[int, int, list[str]]]:
    """(byte offset, line number, fields) of each non-blank record of an open CSV file."""
    if f.read(3) != b"\xef\xbb\xbf":  # utf-8-sig: spreadsheet exports often start with a BOM
        f.seek(0)
    offset, line = f.tell(), 1
    reader = csv.reader(_lines(f, file, 1))
    # csv.reader pulls one line at a time and never reads ahead, so the offset before next()
    # is where the record starts. Text mode would not allow tell() here.
    while True:
        start, start_line = offset, line
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(f"{file}, line {reader.line_num}: {exc}") from None
        offset, line = f.tell(), reader.line_num + 1
        if row:  # not a blank line
            yield start, start_line, row


class _CsvRows:
    """What csv_table collects: each row's label and place, and its features if kept."""

    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.rows: list[list[float]] = []
        self.labels = array("q")
        self.file_of, self.offset_of, self.line_of = array("i"), array("q"), array("q")

    def add(self, parsed: tuple[list[float], int], file_no: int, offset: int, line: int
            ) -> None:
        if self.keep:
            self.rows.append(parsed[0])
        self.labels.append(parsed[1])
        self.file_of.append(file_no)
        self.offset_of.append(offset)
        self.line_of.append(line)

    def table(self, path: Path, files: list[Path], parser: _RowParser,
              transform: Callable[[np.ndarray], np.ndarray] | None) -> CsvTable:
        n_features = len(parser.feature_cols)
        x = np.asarray(self.rows, np.float32).reshape(-1, n_features) if self.keep else None
        source = f"{path} ({len(self.labels):,} rows, {n_features} features"
        source += ")" if self.keep else ", read per batch)"
        return CsvTable(files, parser, np.frombuffer(self.labels, np.int64).copy(), x,
                        np.frombuffer(self.file_of, np.int32),
                        np.frombuffer(self.offset_of, np.int64),
                        np.frombuffer(self.line_of, np.int64), transform, source)


def _make_parser(file: Path, header: list[str], label: str, features: Sequence[str] | None,
                 classes: list[str] | None) -> _RowParser:
    def missing(what: str, name: str) -> DataError:
        return DataError(f"{file}: no {what} column {name!r} (columns: {', '.join(header)})")

    if label not in header:
        raise missing("label", label)
    if features is None:
        chosen = [name for name in header if name != label]
    else:
        chosen = list(features)
        if not chosen:
            raise ValueError("csv_table: features must name at least one column")
        if label in chosen:
            raise ValueError(f"csv_table: the label column {label!r} is also a feature")
        for name in chosen:
            if name not in header:
                raise missing("feature", name)
    for name in [label, *chosen]:
        if header.count(name) > 1:
            raise DataError(f"{file}: column {name!r} appears {header.count(name)} times "
                            "in the header")
    if not chosen:
        raise DataError(f"{file}: no feature columns besides {label!r}")
    return _RowParser(header, label, chosen, classes)


# ------------------------------------------------------------------------------------- npz

_LOCAL_HEADER = struct.Struct("<4s5HIIIHH")  # a zip local file header, 30 bytes


def _npz_member(path: Path, zf: zipfile.ZipFile, name: str) -> tuple[np.ndarray, bool]:
    """Array `name` of the .npz: memory-mapped if stored uncompressed, else read whole.
    Returns (array, mapped)."""
    info = zf.getinfo(f"{name}.npy")
    where = f"{path}: array {name!r}"
    if info.compress_type != zipfile.ZIP_STORED:
        try:
            with zf.open(info) as f:
                return npy_format.read_array(f, allow_pickle=False), False
        except ValueError as exc:  # object arrays need pickle, which is never allowed
            raise DataError(f"{where}: cannot load ({exc})") from None
        except (OSError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"{where}: corrupt ({exc})") from None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(_LOCAL_HEADER.size)
        if len(local) != _LOCAL_HEADER.size or local[:4] != b"PK\x03\x04":
            raise DataError(f"{where}: corrupt zip (bad local header)")
        name_len, extra_len = _LOCAL_HEADER.unpack(local)[-2:]
        start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        f.seek(start)
        try:
            version = npy_format.read_magic(f)
            # 3.0 differs from 2.0 only in the header's text encoding (utf-8 field names)
            read_header = (npy_format.read_array_header_1_0 if version == (1, 0)
                           else npy_format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
        except ValueError as exc:
            raise DataError(f"{where}: not a valid .npy member ({exc})") from None
        offset = f.tell()
    if dtype.hasobject:
        raise DataError(f"{where}: holds Python objects ({dtype}), which would need pickle; "
                        "save plain numeric arrays")
    nbytes = math.prod(shape) * dtype.itemsize
    if offset - start + nbytes != info.file_size:
        raise DataError(f"{where}: {info.file_size} bytes in the zip, but its header says "
                        f"{offset - start + nbytes} (truncated or corrupt)")
    if nbytes == 0:  # mmap cannot map zero bytes; nothing is loaded either
        return np.empty(shape, dtype=dtype), True
    order = "F" if fortran else "C"
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order=order), True


def npz_arrays(path: str | Path, x: str = "x", y: str = "y") -> Samples:
    """Arrays `x` (inputs) and `y` (targets) of an .npz file, sample i being `x[i]`, `y[i]`.

    Arrays saved with `np.savez` are memory-mapped (read per batch, never loaded whole);
    `np.savez_compressed` ones are loaded into memory. Pickled (object) arrays are refused.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not an .npz file (not a zip archive: truncated, or not "
                        "written by np.savez)")
    try:
        with zipfile.ZipFile(path) as zf:
            names = sorted(m[:-4] for m in zf.namelist() if m.endswith(".npy"))
            for name in (x, y):
                if name not in names:
                    raise DataError(f"{path}: no array {name!r} (arrays: "
                                    f"{', '.join(names) or 'none'})")
            (xs, x_mapped), (ys, y_mapped) = _npz_member(path, zf, x), _npz_member(path, zf, y)
    except zipfile.BadZipFile as exc:
        raise DataError(f"{path}: corrupt .npz ({exc})") from None
    for name, arr in ((x, xs), (y, ys)):
        if arr.ndim == 0:
            raise DataError(f"{path}: array {name!r} is a single value, not one per sample")
    if len(xs) != len(ys):
        raise DataError(f"{path}: {len(xs):,} samples in {x!r} but {len(ys):,} in {y!r}")
    how = ("memory-mapped" if x_mapped and y_mapped
           else "compressed: loaded into memory" if not (x_mapped or y_mapped)
           else f"{x if x_mapped else y!r} memory-mapped, the other compressed: loaded")
    source = f"{path} ({len(xs):,} samples, {how})"
    return ArraySamples(xs, ys, source)
