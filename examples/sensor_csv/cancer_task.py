"""Breast cancer measurements as CSV files on each device: the fleetfl task a fleet owner
writes. (The data: scikit-learn's copy of the Wisconsin diagnostic data set, 30 real
measurements of cell nuclei per sample and the diagnosis.)

A device's folder (`fl-agent --data FOLDER`) holds FOLDER/train.csv and FOLDER/val.csv: a
header row, then one row per sample with the 30 numeric columns ("mean radius", ...) and a
"diagnosis" column, malignant or benign (make_devices.py writes such folders). The
coordinator has no test set: agents evaluate each version on their own val.csv.
"""

from pathlib import Path

import numpy as np
from torch import nn

from fleetfl.shared.tasks.formats import csv_table
from fleetfl.shared.tasks.samples import Samples
from fleetfl.shared.tasks.task import Task

CLASSES = ["malignant", "benign"]  # the diagnosis text; its index here is the label

# Every device scales its rows the same way, with fixed figures rather than its own skewed
# statistics: log1p (area runs to ~4000, fractal dimension from ~0.001), then each column
# centred and scaled by these log1p means and standard deviations of the public data set.
# Rows of 10: the "mean ...", "... error" and "worst ..." columns, in the CSV's order.
MEAN = np.array([2.69, 2.99, 4.50, 6.37, 0.092, 0.098, 0.083, 0.047, 0.17, 0.061,
                 0.32, 0.77, 1.26, 3.42, 0.0070, 0.025, 0.031, 0.012, 0.020, 0.0038,
                 2.81, 3.26, 4.64, 6.62, 0.12, 0.22, 0.23, 0.11, 0.25, 0.080], np.float32)
STD = np.array([0.22, 0.21, 0.25, 0.48, 0.013, 0.047, 0.070, 0.036, 0.023, 0.0066,
                0.17, 0.23, 0.40, 0.71, 0.0030, 0.017, 0.027, 0.0061, 0.0080, 0.0026,
                0.26, 0.23, 0.29, 0.55, 0.020, 0.12, 0.15, 0.058, 0.047, 0.016], np.float32)


def scale(x: np.ndarray) -> np.ndarray:
    """What a device feeds the model (the exported one too) for rows of the 30 columns."""
    return (np.log1p(x) - MEAN) / STD


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(30, 32), nn.ReLU(), nn.Linear(32, 2))


def rows(path: Path) -> Samples:
    return csv_table(path, label="diagnosis", classes=CLASSES, transform=scale)


task = Task(
    name="cancer-csv",
    version=1,
    model=model,
    train=lambda folder: rows(folder / "train.csv"),
    validation=lambda folder: rows(folder / "val.csv"),
    input_shape=(30,),  # one row of features, for fl-export
)
