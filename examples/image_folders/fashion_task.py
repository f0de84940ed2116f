"""Fashion-MNIST as PNG files on each device: the fleetfl task a fleet owner writes.

A device's folder (`fl-agent --data FOLDER`) holds FOLDER/train/<class>/*.png and
FOLDER/val/<class>/*.png, 28x28 greyscale (make_devices.py writes such folders). The
coordinator has no test set: agents evaluate each version on their own val/ images.
Change the model or the classes? Raise `version`: agents refuse a task that differs.
"""

from pathlib import Path

from torch import nn

from fleetfl.shared.tasks.formats import image_folder
from fleetfl.shared.tasks.samples import Samples
from fleetfl.shared.tasks.task import Task

# An image's label is its folder's index in this list, on every device: a device that has
# no bags still calls class 8 "bag".
CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat",
           "sandal", "shirt", "sneaker", "bag", "boot"]
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST's pixel mean and std, the same on every device


def model() -> nn.Module:
    # Small enough for one core of a Raspberry Pi: 2 conv layers, 9,098 parameters.
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 8 x 14 x 14
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16 x 7 x 7
        nn.Flatten(), nn.Linear(16 * 7 * 7, 10))


def images(folder: Path) -> Samples:
    return image_folder(folder, CLASSES, mean=MEAN, std=STD)


task = Task(
    name="fashion-png",
    version=1,
    model=model,
    train=lambda folder: images(folder / "train"),
    validation=lambda folder: images(folder / "val"),
    input_shape=(1, 28, 28),  # one image, for fl-export
)
