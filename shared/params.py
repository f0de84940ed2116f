"""The model as one flat float32 vector plus a layer table.

The torch parameters become views into one buffer, so the numpy vector the algorithms work on
and the tensors the optimizer updates are the same memory: going between them copies nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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


def bind_flat(model: torch.nn.Module) -> tuple[np.ndarray, LayerTable]:
    """Move every parameter of `model` into one float32 buffer; return its numpy view.

    After this call `flat[layer.slice]` and the parameter tensor share memory: an optimizer
    step shows up in `flat`, and writing `flat[:] = ...` changes the model.
    """
    named = list(model.named_parameters())
    total = sum(p.numel() for _, p in named)
    buffer = torch.empty(total, dtype=torch.float32)
    layers, offset = [], 0
    with torch.no_grad():
        for name, p in named:
            n = p.numel()
            view = buffer[offset:offset + n].view_as(p)
            view.copy_(p.detach().to(torch.float32))
            p.data = view
            layers.append(Layer(name, offset, tuple(p.shape)))
            offset += n
    return buffer.numpy(), LayerTable(tuple(layers))


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
