"""A torch model's parameters as views into one flat float32 vector.

The torch parameters become views into one buffer, so the numpy vector the algorithms work on
and the tensors the optimizer updates are the same memory: going between them copies nothing.
"""

from __future__ import annotations

import numpy as np
import torch

from fleetfl.shared.core.layers import Layer, LayerTable


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
