"""Small file primitives of the run directory: what a kill or a power cut can leave behind
is either the old file or the new one, never half of one, and a damaged file is kept for the
operator rather than deleted."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

DAMAGED = ".damaged"  # suffix of a file kept aside (set_aside)


def fsync_path(path: Path) -> None:
    """fsync a file by name, or a directory: a rename or a new file's name is durable only
    once its directory is."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """os.write may write less than asked (a full disk, a signal): go on from there."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_atomic(path: Path, data: bytes, previous: Path | None = None) -> None:
    """Write `data` to a temporary file, fsync it and rename it over `path`; with `previous`,
    the old `path` (if any) is first renamed to it. Killed at any point, `path` holds the old
    contents or the new, or (between the two renames) is missing while `previous` holds the
    old."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    if previous is not None and path.exists():
        os.replace(path, previous)
    os.replace(tmp, path)
    fsync_path(path.parent)


def set_aside(path: Path, copy: bool = False) -> Path:
    """Keep a damaged file as <name>.damaged (.damaged.1, ... if taken): renamed out of the
    way of the code that reads the run directory, or with `copy` linked (copied where links
    do not work) so the caller can rewrite `path` itself. Returns the kept file."""
    for n in range(1000):
        aside = path.with_name(path.name + DAMAGED + (f".{n}" if n else ""))
        if aside.exists():
            continue
        if not copy:
            os.replace(path, aside)
        else:
            try:
                os.link(path, aside)
            except OSError:
                shutil.copyfile(path, aside)
        fsync_path(path.parent)
        return aside
    raise FileExistsError(f"{path}: too many damaged copies kept aside already")
