"""Build one data folder per device from Fashion-MNIST, as PNG files sorted by class.

    python make_devices.py OUT [--devices 4] [--train 1500] [--val-share 0.2] [--alpha 0.5]
                               [--seed 0] [--idx-dir /usr/share/datasets/fashion-mnist]

writes OUT/pi01/train/<class>/<n>.png and OUT/pi01/val/<class>/<n>.png, then pi02, ...
Real fleets are not balanced, so each device gets its own mix of classes (label skew): its
class shares are drawn from a Dirichlet(alpha) (smaller alpha: fewer classes per device), and
its val images are drawn with the same shares. Train images come from Fashion-MNIST's
training split, val images from its test split; no image is on two devices.

The IDX files are read with gzip and numpy (`apt-get install dataset-fashion-mnist` puts them
in /usr/share/datasets/fashion-mnist).
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

import numpy as np
from fashion_task import CLASSES  # the folder names must be the task's class names
from PIL import Image


def read_idx(path: Path) -> np.ndarray:
    """An IDX file: 2 zero bytes, a type byte (8: uint8), the number of dimensions, each
    dimension as a big-endian uint32, then the data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = np.frombuffer(raw, ">u4", count=ndim, offset=4)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


class Pool:
    """The images of one split, dealt out class by class without replacement."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, rng: np.random.Generator
                 ) -> None:
        self.images = images
        self.left = [list(rng.permutation(np.flatnonzero(labels == c)))
                     for c in range(len(CLASSES))]

    def take(self, counts: np.ndarray) -> list[tuple[int, np.ndarray]]:
        out = []
        for c, n in enumerate(counts):
            if n > len(self.left[c]):
                sys.exit(f"not enough {CLASSES[c]} images left ({n} wanted, "
                         f"{len(self.left[c])} left): fewer devices or a smaller --train")
            out += [(c, self.images[i]) for i in self.left[c][:n]]
            del self.left[c][:n]
        return out


def write(folder: Path, samples: list[tuple[int, np.ndarray]]) -> None:
    for name in CLASSES:  # every class folder, even empty: the layout is the same everywhere
        (folder / name).mkdir(parents=True)
    for n, (c, pixels) in enumerate(samples):  # uint8 (28, 28): mode "L"
        Image.fromarray(pixels).save(folder / CLASSES[c] / f"{n}.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder to create the device folders in")
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--train", type=int, default=1500, help="training images per device")
    p.add_argument("--val-share", type=float, default=0.2,
                   help="validation images per device, as a share of --train")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="Dirichlet concentration of each device's class shares")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--idx-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    args = p.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    pools = {split: Pool(read_idx(args.idx_dir / f"{stem}-images-idx3-ubyte.gz"),
                         read_idx(args.idx_dir / f"{stem}-labels-idx1-ubyte.gz"), rng)
             for split, stem in (("train", "train"), ("val", "t10k"))}
    n_val = round(args.train * args.val_share)
    for k in range(1, args.devices + 1):
        device = args.out / f"pi{k:02d}"
        if device.exists():  # never mix two draws in one folder
            sys.exit(f"{device} exists: remove it or give another OUT")
        shares = rng.dirichlet(np.full(len(CLASSES), args.alpha))
        train = rng.multinomial(args.train, shares)
        write(device / "train", pools["train"].take(train))
        write(device / "val", pools["val"].take(rng.multinomial(n_val, shares)))
        mix = ", ".join(f"{CLASSES[c]} {n}" for c, n in enumerate(train) if n)
        print(f"{device}: {args.train} train, {n_val} val images ({mix})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
