"""Compressed payloads (PROTOCOL.md section 15.5): 8-bit and 4-bit quantization with one scale
per layer, and top-k sparsification, each with error feedback, on top of the dense, partial or
LBGM payload (`job.compress`).

The compression works on the values the base payload sends (dense: all N; partial: the
window's masked coordinates; LBGM: the layers sent in full, whose look-backs both sides then
set to the dequantized values). Error feedback: the device adds each delta to its residual,
sends the compressed residual and keeps in the residual what did not go out; so after any
sequence of updates sum(sent, dequantized) + residual == sum(deltas). Its `own` is the whole
delta: the timings then take the model back to the shared one and the unsent part waits here
(in every timing, rounds included). The coordinator decompresses, averages, and sends the
average compressed the same way with its own residual; it applies to its model exactly what
it sent, so every copy of the model stays equal.

Rounding is deterministic, to nearest (ties to even): error feedback carries each rounding
error into the next update, so the bias stochastic rounding avoids does not build up; nearest
rounding halves the worst error (scale / 2 against a whole scale), needs no random stream
both sides would have to agree on, and keeps runs reproducible.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

from fleetfl.shared.core.base import Encoder, Rejected
from fleetfl.shared.core.choices import Compression
from fleetfl.shared.core.layers import LayerTable
from fleetfl.shared.core.messages import Kind, Message
from fleetfl.shared.core.payloads import (
    Decoded,
    DenseDecoder,
    DenseEncoder,
    Encoded,
    LBGMDecoder,
    LBGMEncoder,
    LookBack,
    PartialDecoder,
    PartialEncoder,
)

INBOX = 16  # averages' arrays held until expanded (a timing that ignores them: bounded)


class Quantizer(Protocol):
    """Values (float32) <-> wire arrays; `segments`: the values' count per layer."""

    def pack(self, values: np.ndarray, segments: list[int]) -> tuple[dict, np.ndarray]:
        """The arrays to send and what the receiver will decode from them."""
        ...

    def unpack(self, arrays: dict, segments: list[int]) -> np.ndarray:
        """The values the arrays carry, or Rejected if they do not fit `segments`."""
        ...


def _scale_per_value(scales: np.ndarray, segments: list[int]) -> np.ndarray:
    return np.repeat(scales.astype(np.float32), segments)


class Uniform:
    """Symmetric uniform quantization, one float32 scale per layer: s = max|x| / L,
    code = rint(x / s) in -L .. L (L = 127 for 8 bits, 7 for 4), value = code * s."""

    def __init__(self, bits: int) -> None:
        if bits not in (4, 8):
            raise ValueError("bits must be 4 or 8")
        self.bits, self.levels = bits, 2 ** (bits - 1) - 1

    def pack(self, values: np.ndarray, segments: list[int]) -> tuple[dict, np.ndarray]:
        x = np.asarray(values, dtype=np.float32).reshape(-1)
        peaks = np.array([float(np.max(np.abs(part), initial=0.0))
                          for part in np.split(x, np.cumsum(segments)[:-1])] if segments
                         else [], dtype=np.float64)
        scales = (peaks / self.levels).astype(np.float32)
        per = _scale_per_value(scales, segments)
        with np.errstate(divide="ignore", invalid="ignore"):
            codes = np.where(per > 0, np.rint(x / np.where(per > 0, per, 1)), 0)
        codes = np.clip(codes, -self.levels, self.levels).astype(np.int8)
        arrays = {"delta": codes if self.bits == 8 else pack_nibbles(codes), "scales": scales}
        return arrays, self.unpack(arrays, segments)  # exactly what the receiver computes

    def unpack(self, arrays: dict, segments: list[int]) -> np.ndarray:
        n = sum(segments)
        data, scales = arrays.get("delta"), arrays.get("scales")
        if scales is None or set(arrays) != {"delta", "scales"}:
            raise Rejected("bad_shape", f"a q{self.bits} payload carries delta and scales")
        scales = scales.reshape(-1)
        if scales.size != len(segments) or scales.dtype != np.float32:
            raise Rejected("bad_shape", f"{scales.size} scales for {len(segments)} layers")
        if not (np.isfinite(scales).all() and (scales >= 0).all()):
            raise Rejected("bad_value", "a scale is negative or not finite")
        if self.bits == 8:
            if data.dtype != np.int8 or data.size != n:
                raise Rejected("bad_shape", f"q8 needs {n} int8 codes, got {data.size} "
                                            f"{data.dtype}")
            codes = data.reshape(-1)
            if (codes == -128).any():
                raise Rejected("bad_value", "q8 code -128 (codes are -127 .. 127)")
        else:
            if data.dtype != np.uint8 or data.size != (n + 1) // 2:
                raise Rejected("bad_shape", f"q4 needs {(n + 1) // 2} bytes for {n} codes, "
                                            f"got {data.size} {data.dtype}")
            codes = unpack_nibbles(data.reshape(-1), n)
        return codes.astype(np.float32) * _scale_per_value(scales, segments)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """4-bit codes c in -7..7 as nibbles c + 8, code 2j in the low nibble of byte j and code
    2j + 1 in its high nibble; an odd count leaves the last high nibble 0."""
    nib = (codes.astype(np.int16) + 8).astype(np.uint8)
    if nib.size % 2:
        nib = np.append(nib, np.uint8(0))
    return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)


def unpack_nibbles(data: np.ndarray, n: int) -> np.ndarray:
    nib = np.empty(data.size * 2, dtype=np.uint8)
    nib[0::2], nib[1::2] = data & 0x0F, data >> 4
    if (nib[:n] == 0).any() or (nib[n:] != 0).any():
        raise Rejected("bad_value", "q4 nibble 0 (codes are 1 .. 15) or nonzero padding")
    return nib[:n].astype(np.int8) - 8


class TopK:
    """The k = ceil(density * n) values of largest magnitude (ties: lower index first), as
    ascending "<u4" `indices` and "<f4" values in `delta`; one k over all layers."""

    def __init__(self, density: float) -> None:
        if not 0.0 < density <= 1.0:
            raise ValueError("density must be in (0, 1]")
        self.density = density

    def k(self, n: int) -> int:
        return min(n, math.ceil(self.density * n))

    def pack(self, values: np.ndarray, segments: list[int]) -> tuple[dict, np.ndarray]:
        x = np.asarray(values, dtype=np.float32).reshape(-1)
        top = np.argsort(-np.abs(x), kind="stable")[:self.k(x.size)]
        idx = np.sort(top).astype(np.uint32)
        arrays = {"delta": x[idx], "indices": idx}
        return arrays, self.unpack(arrays, segments)

    def unpack(self, arrays: dict, segments: list[int]) -> np.ndarray:
        n = sum(segments)
        vals, idx = arrays.get("delta"), arrays.get("indices")
        if idx is None or set(arrays) != {"delta", "indices"}:
            raise Rejected("bad_shape", "a top-k payload carries delta and indices")
        vals, idx = vals.reshape(-1), idx.reshape(-1)
        k = self.k(n)
        if vals.dtype != np.float32 or idx.dtype != np.uint32 or vals.size != k \
                or idx.size != k:
            raise Rejected("bad_shape", f"top-k of {n} values needs {k} indices and values, "
                                        f"got {idx.size} and {vals.size}")
        if k and (int(idx[-1]) >= n or (np.diff(idx.astype(np.int64)) <= 0).any()):
            raise Rejected("bad_value", f"indices not strictly increasing below {n}")
        dense = np.zeros(n, dtype=np.float32)
        dense[idx] = vals
        return dense


def make_quantizer(kind: Compression, density: float) -> Quantizer:
    if kind is Compression.TOPK:
        return TopK(density)
    return Uniform({Compression.Q8: 8, Compression.Q4: 4}[kind])


def positions(base: object, window: int, fields: dict | None = None) -> np.ndarray | None:
    """Which coordinates the base payload's values are, in ascending order (a bool mask;
    None: all N). `fields`: an update's (LBGM: its full layers); None: an average's."""
    if isinstance(base, PartialEncoder | PartialDecoder):
        return base.masks(window)
    if isinstance(base, LBGMEncoder | LBGMDecoder):
        return None if fields is None else full_layers(base.layers, fields.get("scalars"))
    if type(base) in (DenseEncoder, DenseDecoder):
        return None
    raise ValueError(f"compression works on the dense, partial and lbgm payloads, not "
                     f"{base!r}")


def full_layers(layers: LayerTable, scalars: object) -> np.ndarray:
    """LBGM: the coordinates of the layers sent in full (scalars[i] is None)."""
    if not isinstance(scalars, list) or len(scalars) != len(layers.layers):
        raise Rejected("bad_shape", f"LBGM update needs one entry per layer "
                                    f"({len(layers.layers)})")
    mask = np.zeros(layers.size, dtype=bool)
    for layer, entry in zip(layers.layers, scalars, strict=True):
        mask[layer.slice] = entry is None
    return mask


def segments(layers: LayerTable, mask: np.ndarray | None) -> list[int]:
    """The base values' count per layer (layers in table order)."""
    if mask is None:
        return [layer.size for layer in layers.layers]
    return [int(np.count_nonzero(mask[layer.slice])) for layer in layers.layers]


def scatter(values: np.ndarray, mask: np.ndarray | None, size: int) -> np.ndarray:
    if mask is None:
        return values
    dense = np.zeros(size, dtype=np.float32)
    dense[mask] = values
    return dense


class CompressedEncoder(DenseEncoder):
    """Device side: error feedback around the base encoder (dense, partial or LBGM)."""

    def __init__(self, base: Encoder, quantizer: Quantizer, layers: LayerTable) -> None:
        self.base, self.quantizer, self.layers = base, quantizer, layers
        self.residual = np.zeros(layers.size, dtype=np.float32)
        self.inbox: dict[int, dict] = {}

    def encode(self, delta: np.ndarray, window: int) -> Encoded:
        self.residual += delta
        enc = self.base.encode(self.residual, window)
        mask = positions(self.base, window, enc.fields)
        arrays, sent = self.quantizer.pack(enc.values, segments(self.layers, mask))
        # what the coordinator decodes: the values sent, and (LBGM) rho x look-back elsewhere
        got = scatter(sent, mask, self.residual.size) if mask is None \
            else np.where(mask, scatter(sent, mask, self.residual.size), enc.own)
        if isinstance(self.base, LBGMEncoder):  # look-backs as the coordinator stores them
            for i, layer in enumerate(self.layers.layers):
                if enc.fields["scalars"][i] is None:
                    self.base.lookback[i] = LookBack(got[layer.slice].copy(), window)
        self.residual -= got
        # `own` is the whole delta: what was not sent waits in the residual, not the model
        return Encoded(enc.fields, arrays, delta)

    def arrived(self, msg: Message) -> None:
        if msg.kind is Kind.AVG:
            if len(self.inbox) >= INBOX:
                self.inbox.pop(min(self.inbox))
            self.inbox[msg["window"]] = dict(msg.arrays)

    def expand(self, window: int, values: np.ndarray, size: int) -> np.ndarray:
        sent = self._unpack(window, positions(self.base, window))
        return self.base.expand(window, sent, size)

    def expand_all(self, window: int, values: np.ndarray, size: int) -> np.ndarray:
        """An average compressed over all N values whatever the base payload (fedbuff)."""
        return self._unpack(window, None)

    def _unpack(self, window: int, mask: np.ndarray | None) -> np.ndarray:
        arrays = self.inbox.pop(window, None)
        if arrays is None:
            raise Rejected("bad_shape", f"no compressed average of window {window}")
        return self.quantizer.unpack(arrays, segments(self.layers, mask))

    def settle(self, window: int, included: bool) -> None:
        self.base.settle(window, included)


class CompressedDecoder:
    """Coordinator side: decompress, then the base decoder; downlink with its own residual."""

    def __init__(self, base: DenseDecoder | PartialDecoder | LBGMDecoder, quantizer: Quantizer,
                 layers: LayerTable) -> None:
        self.base, self.quantizer, self.layers = base, quantizer, layers
        self.residual = np.zeros(layers.size, dtype=np.float32)

    def decode(self, sender: str, msg: Message) -> Decoded:
        mask = positions(self.base, msg["window"], msg.fields)
        values = self.quantizer.unpack(msg.arrays, segments(self.layers, mask))
        plain = Message(kind=msg.kind, run=msg.run, sender=msg.sender, seq=msg.seq,
                        base_version=msg.base_version, fields=msg.fields,
                        arrays={"delta": values}, proto=msg.proto)
        return self.base.decode(sender, plain)

    def compress(self, window: int, avg: np.ndarray, coverage: np.ndarray | None
                 ) -> np.ndarray:
        return self.base.compress(window, avg, coverage)

    def downlink(self, window: int, avg: np.ndarray, coverage: np.ndarray | None
                 ) -> tuple[dict, np.ndarray]:
        """(arrays of the AVG, the dense delta they carry: what the model moves by)."""
        return self._send(self.base.compress(window, avg, coverage),
                          positions(self.base, window))

    def downlink_all(self, avg: np.ndarray) -> tuple[dict, np.ndarray]:
        """`downlink` over all N values whatever the base payload (fedbuff: a buffer mixes
        the masks of several windows)."""
        return self._send(avg, None)

    def _send(self, values: np.ndarray, mask: np.ndarray | None) -> tuple[dict, np.ndarray]:
        held = self.residual if mask is None else self.residual[mask]
        values = values + held
        arrays, sent = self.quantizer.pack(values, segments(self.layers, mask))
        if mask is None:
            self.residual = values - sent
        else:
            self.residual[mask] = values - sent
        return arrays, scatter(sent, mask, self.residual.size)

    def forget(self, sender: str) -> None:
        self.base.forget(sender)


def compressor(decoder: object) -> CompressedDecoder | None:
    """The compressed payload of this coordinator-side decoder (or of the one it wraps:
    fedbuff), None if it reads float32 values."""
    for d in (decoder, getattr(decoder, "inner", None)):
        if isinstance(d, CompressedDecoder):
            return d
    return None
