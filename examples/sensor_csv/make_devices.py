"""Build one data folder per device from scikit-learn's breast cancer data set, as CSV files.

    python make_devices.py OUT [--devices 4] [--alpha 1.0] [--val-share 0.2] [--seed 0]
                               [--min-rows 40]

writes OUT/pi01/train.csv and OUT/pi01/val.csv, then pi02, ... Each of the 569 samples goes
to exactly one device. Real sites see different patients, so the class balance is skewed per
device: each class's samples are dealt out in shares drawn from a Dirichlet(alpha) over the
devices (smaller alpha: more skew), redrawn until every device has --min-rows samples. A
--val-share of each device's samples of each class goes to its val.csv.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer


def deal(labels: np.ndarray, devices: int, alpha: float, min_rows: int,
         rng: np.random.Generator) -> list[np.ndarray]:
    """Sample indices per device: each class split by its own Dirichlet shares."""
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(devices)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(devices, alpha)))[:-1] * len(idx))
            for k, chunk in enumerate(np.split(idx, cuts.astype(int))):
                parts[k] += chunk.tolist()
        if min(len(p) for p in parts) >= min_rows:
            return [np.array(p) for p in parts]
    sys.exit(f"no draw gave every device {min_rows} rows: fewer --devices, a larger --alpha "
             "or a smaller --min-rows")


def write_csv(path: Path, header: list[str], x: np.ndarray, names: list[str]) -> None:
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(header)
        for row, name in zip(x, names, strict=True):
            out.writerow([repr(float(v)) for v in row] + [name])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder to create the device folders in")
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--alpha", type=float, default=1.0,
                   help="Dirichlet concentration of each class's shares over the devices")
    p.add_argument("--val-share", type=float, default=0.2,
                   help="share of each device's samples (per class) kept for validation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-rows", type=int, default=40, help="samples per device, at least")
    args = p.parse_args(argv)

    data = load_breast_cancer()
    header = [*data.feature_names, "diagnosis"]  # the task reads the label by this name
    diagnosis = data.target_names  # 0 malignant, 1 benign: written as text
    rng = np.random.default_rng(args.seed)
    for k, idx in enumerate(deal(data.target, args.devices, args.alpha, args.min_rows, rng),
                            start=1):
        device = args.out / f"pi{k:02d}"
        if device.exists():  # never mix two draws in one folder
            sys.exit(f"{device} exists: remove it or give another OUT")
        device.mkdir(parents=True)
        y = data.target[idx]
        # stratified: val.csv has the device's own class balance
        val = np.concatenate([idx[y == c][:round(args.val_share * np.sum(y == c))]
                              for c in np.unique(y)])
        train = np.setdiff1d(idx, val)
        for name, part in (("train.csv", rng.permutation(train)), ("val.csv", val)):
            write_csv(device / name, header, data.data[part], list(diagnosis[data.target[part]]))
        malignant = np.mean(data.target[idx] == 0)
        print(f"{device}: {len(train)} train, {len(val)} val rows, "
              f"{malignant:.0%} malignant")
    return 0


if __name__ == "__main__":
    sys.exit(main())
