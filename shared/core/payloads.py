"""What is sent (ALGORITHMS.md section 8): dense deltas, random partial deltas (DPGA/DRPGA) and
look-back multipliers (LBGM), each a device-side encoder and a coordinator-side decoder.

Every encoder maps a delta to the wire (`fields`, `values`) and also returns `own`: the dense
vector the coordinator will reconstruct for this agent, zero where nothing was sent. Timing
pieces correct with `own`, never with the raw delta, so whatever was not sent stays in the
agent's residual. Every decoder turns a received update back into a dense vector plus the
coordinates it covers (None = all), which is all the averaging needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fleetfl.shared.core.base import Rejected
from fleetfl.shared.core.choices import RATES
from fleetfl.shared.core.layers import LayerTable
from fleetfl.shared.core.messages import Message


@dataclass
class Encoded:
    fields: dict
    values: np.ndarray | dict[str, np.ndarray]  # the update's `delta`, or all its arrays
    own: np.ndarray


@dataclass
class Decoded:
    dense: np.ndarray
    coverage: np.ndarray | None  # bool mask of the coordinates sent; None: all


def plain_values(values: np.ndarray) -> None:
    """Refuse a compressed payload's integer codes where float32 values belong (a run
    without job.compress: PROTOCOL.md 15.5)."""
    if values.dtype != np.float32:
        raise Rejected("bad_shape", f"{values.dtype} values without compression")


# -- dense ----------------------------------------------------------------------------------
class DenseEncoder:
    """Sends the whole delta; the base of every encoder (their defaults live here)."""

    def encode(self, delta: np.ndarray, window: int) -> Encoded:
        return Encoded({}, delta, delta)

    def settle(self, window: int, included: bool) -> None:
        """Called when the average of `window` arrives; `included`: we were in it."""

    def assign(self, msg: Message) -> None:
        """A FedPMT layer assignment; only the suffix encoder uses it."""

    def arrived(self, msg: Message) -> None:
        """An average arrived; compressed payloads (quantized.py) keep its arrays."""

    def ready(self, window: int) -> bool:
        """May the agent train for `window` (FedPMT: it has an assignment)?"""
        return True

    def trainable_from(self, window: int) -> int | None:
        """First layer group to train in `window` (0: all)."""
        return 0

    def expand(self, window: int, values: np.ndarray, size: int) -> np.ndarray:
        plain_values(values)
        if values.size != size:
            raise Rejected("bad_shape", f"average has {values.size} values, model {size}")
        return values

    def expand_all(self, window: int, values: np.ndarray, size: int) -> np.ndarray:
        """An average of all N values whatever the payload (fedbuff's downlink)."""
        return DenseEncoder.expand(self, window, values, size)


class DenseDecoder:
    def __init__(self, size: int) -> None:
        self.size = size

    def decode(self, sender: str, msg: Message) -> Decoded:
        delta = msg["delta"]
        if delta.size != self.size or "scalars" in msg.fields:
            raise Rejected("bad_shape", f"dense update has {delta.size} values, "
                                        f"model {self.size}")
        return Decoded(delta.reshape(-1), None)

    def compress(self, window: int, avg: np.ndarray, coverage: np.ndarray | None) -> np.ndarray:
        return avg

    def forget(self, sender: str) -> None:
        """Drop per-agent state (an agent that resynchronises starts afresh)."""


# -- random partial (DPGA / DRPGA) ------------------------------------------------------------
MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def sm64(x: np.ndarray | int) -> np.ndarray:
    """SplitMix64 finaliser, vectorised; uint64 arithmetic wraps as the spec requires."""
    with np.errstate(over="ignore"):
        x = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def period_key(run_seed: int, period: int, agent: int = 0) -> np.uint64:
    inner = sm64(sm64(np.uint64(run_seed)) ^ np.uint64(period))
    return sm64(inner ^ np.uint64(agent))[()]


def random_mask(run_seed: int, period: int, size: int, rate: float, agent: int = 0
                ) -> np.ndarray:
    """Bernoulli(rate) mask over `size` coordinates, identical on every machine."""
    if rate >= 1.0:
        return np.ones(size, dtype=bool)
    key = period_key(run_seed, period, agent)
    threshold = np.uint64(min(int(rate * 2.0**64), 2**64 - 1))
    return sm64(key ^ np.arange(size, dtype=np.uint64)) < threshold


class RateWalk:
    """The update rate per period: a seeded random walk over RATES (or fixed)."""

    def __init__(self, run_seed: int, start_rate: float, walk: bool) -> None:
        if start_rate not in RATES:
            raise ValueError(f"rate must be one of {RATES}")
        self.run_seed, self.walk = run_seed, walk
        self.start = RATES.index(start_rate)
        self._index = {0: self.start}

    def rate(self, period: int) -> float:
        if not self.walk:
            return RATES[self.start]
        last = max(p for p in self._index if p <= period)
        index = self._index[last]
        for p in range(last + 1, period + 1):
            step = int(sm64(period_key(self.run_seed, p) ^ np.uint64(0xA5A5)) % np.uint64(3)) - 1
            index = min(max(index + step, 0), len(RATES) - 1)
            self._index[p] = index
        return RATES[index]


class PartialMasks:
    """Mask of each period, shared by all agents (mask_scope = shared), cached."""

    def __init__(self, run_seed: int, size: int, rate: float, walk: bool) -> None:
        self.run_seed, self.size = run_seed, size
        self.rates = RateWalk(run_seed, rate, walk)
        self._cache: dict[int, np.ndarray] = {}

    def __call__(self, period: int) -> np.ndarray:
        if period not in self._cache:
            if len(self._cache) > 64:
                self._cache.pop(min(self._cache))
            self._cache[period] = random_mask(self.run_seed, period, self.size,
                                              self.rates.rate(period))
        return self._cache[period]


class PartialEncoder(DenseEncoder):
    def __init__(self, masks: PartialMasks) -> None:
        self.masks = masks

    def encode(self, delta: np.ndarray, window: int) -> Encoded:
        mask = self.masks(window)
        own = np.zeros_like(delta)
        own[mask] = delta[mask]
        return Encoded({}, delta[mask], own)

    def expand(self, window: int, values: np.ndarray, size: int) -> np.ndarray:
        plain_values(values)
        mask = self.masks(window)
        if values.size != int(mask.sum()):
            raise Rejected("bad_shape", f"average of window {window} has {values.size} "
                                        f"values, its mask {int(mask.sum())}")
        dense = np.zeros(size, dtype=np.float32)
        dense[mask] = values
        return dense


class PartialDecoder:
    def __init__(self, masks: PartialMasks) -> None:
        self.masks = masks

    def decode(self, sender: str, msg: Message) -> Decoded:
        mask = self.masks(msg["window"])
        values = msg["delta"].reshape(-1)
        if values.size != int(mask.sum()) or "scalars" in msg.fields:
            raise Rejected("bad_shape", f"{values.size} values do not fit the mask of "
                                        f"window {msg['window']} ({int(mask.sum())})")
        dense = np.zeros(self.masks.size, dtype=np.float32)
        dense[mask] = values
        return Decoded(dense, mask)

    def compress(self, window: int, avg: np.ndarray, coverage: np.ndarray | None) -> np.ndarray:
        return avg[self.masks(window)]

    def forget(self, sender: str) -> None:
        pass


# -- look-back gradient multiplier (LBGM) -----------------------------------------------------
@dataclass
class LookBack:
    values: np.ndarray
    window: int  # when it was set: both sides must agree on it


def lookback_fit(g: np.ndarray, lb: np.ndarray) -> tuple[float, float]:
    """(rho, sin^2 of the angle) of g against the look-back lb (ALGORITHMS.md section 6)."""
    g64, lb64 = g.astype(np.float64), lb.astype(np.float64)
    dot, gg, ll = float(g64 @ lb64), float(g64 @ g64), float(lb64 @ lb64)
    if gg == 0.0:
        return 0.0, 0.0
    return dot / ll, max(0.0, 1.0 - dot * dot / (gg * ll))


class LBGMEncoder(DenseEncoder):
    def __init__(self, layers: LayerTable, threshold: float) -> None:
        self.layers, self.threshold = layers, threshold
        self.lookback: list[LookBack | None] = [None] * len(layers.layers)

    def encode(self, delta: np.ndarray, window: int) -> Encoded:
        scalars: list = []
        full: list[np.ndarray] = []
        own = np.empty_like(delta)
        for i, layer in enumerate(self.layers.layers):
            g = delta[layer.slice]
            lb = self.lookback[i]
            if lb is not None and float(lb.values @ lb.values) > 0.0:
                rho, sin2 = lookback_fit(g, lb.values)
                if sin2 <= self.threshold:
                    scalars.append([rho, lb.window])
                    own[layer.slice] = np.float32(rho) * lb.values
                    continue
            scalars.append(None)
            full.append(g)
            own[layer.slice] = g
            # Used at once for later windows; rolled back if the coordinator leaves us out.
            self.lookback[i] = LookBack(g.copy(), window)
        values = np.concatenate(full) if full else np.zeros(0, dtype=np.float32)
        return Encoded({"scalars": scalars}, values, own)

    def settle(self, window: int, included: bool) -> None:
        if included:
            return
        # The coordinator never stored look-backs we set from this window on: forget them,
        # so those layers go out in full next time.
        for i, lb in enumerate(self.lookback):
            if lb is not None and lb.window >= window:
                self.lookback[i] = None


class LBGMDecoder:
    def __init__(self, layers: LayerTable) -> None:
        self.layers = layers
        self.lookback: dict[str, list[LookBack | None]] = {}

    def decode(self, sender: str, msg: Message) -> Decoded:
        scalars = msg.fields.get("scalars")
        layers = self.layers.layers
        if not isinstance(scalars, list) or len(scalars) != len(layers):
            raise Rejected("bad_shape", f"LBGM update needs one entry per layer ({len(layers)})")
        store = self.lookback.setdefault(sender, [None] * len(layers))
        values = msg["delta"].reshape(-1)
        needed = sum(la.size for la, s in zip(layers, scalars, strict=True) if s is None)
        if values.size != needed:
            raise Rejected("bad_shape", f"LBGM update carries {values.size} values, its full "
                                        f"layers need {needed}")
        dense = np.empty(self.layers.size, dtype=np.float32)
        refreshed, offset = {}, 0
        for i, (layer, entry) in enumerate(zip(layers, scalars, strict=True)):
            if entry is None:
                dense[layer.slice] = values[offset:offset + layer.size]
                refreshed[i] = LookBack(dense[layer.slice].copy(), msg["window"])
                offset += layer.size
                continue
            rho, since = self._scalar(entry, layer.name)
            lb = store[i]
            if lb is None:
                raise Rejected("no_lookback", f"scalar for {layer.name} with no look-back yet")
            if lb.window != since:
                raise Rejected("lookback_mismatch", f"{layer.name}: look-back of window "
                                                    f"{since}, we hold {lb.window}")
            dense[layer.slice] = np.float32(rho) * lb.values
        for i, lb in refreshed.items():  # only once the whole update is valid
            store[i] = lb
        return Decoded(dense, None)

    @staticmethod
    def _scalar(entry: object, name: str) -> tuple[float, int]:
        if (isinstance(entry, list) and len(entry) == 2
                and isinstance(entry[0], float | int) and not isinstance(entry[0], bool)
                and isinstance(entry[1], int) and not isinstance(entry[1], bool)
                and np.isfinite(entry[0])):
            return float(entry[0]), entry[1]
        raise Rejected("bad_value", f"{name}: look-back entry {entry!r} is not [rho, window]")

    compress = DenseDecoder.compress

    def forget(self, sender: str) -> None:
        self.lookback.pop(sender, None)
