"""The model as one flat float32 vector plus a layer table (no torch: the algorithms see only
this; `fleetfl.shared.learn.torch_binding` makes a torch model's parameters views of the vector).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Layer:
    name: str
    offset: int
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.size)


@dataclass(frozen=True)
class LayerTable:
    layers: tuple[Layer, ...]

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)

    def to_list(self) -> list[dict]:
        return [{"name": la.name, "offset": la.offset, "shape": list(la.shape)}
                for la in self.layers]


@dataclass(frozen=True)
class LayerGroup:
    """One module's parameters (weight and bias): the unit FedPMT trains or freezes."""

    name: str
    start: int  # offset of its first parameter in the flat vector
    end: int


def layer_groups(table: LayerTable) -> list[LayerGroup]:
    """Consecutive layer-table entries of the same module, input side first."""
    groups: list[LayerGroup] = []
    for layer in table.layers:
        module = layer.name.rsplit(".", 1)[0]
        if groups and groups[-1].name == module and groups[-1].end == layer.offset:
            groups[-1] = LayerGroup(module, groups[-1].start, layer.offset + layer.size)
        else:
            groups.append(LayerGroup(module, layer.offset, layer.offset + layer.size))
    return groups
