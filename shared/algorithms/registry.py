"""Builds the device and coordinator sides an algorithm name stands for."""

from __future__ import annotations

import numpy as np

from ..config import RunConfig
from .averaging import WindowAveraging
from .base import DeviceSide
from .dga import DGADevice
from .fedavg import FedAvgDevice


def make_device(job: dict, run: str, sender: str, samples: int) -> DeviceSide:
    algo = job.get("algo")
    if algo == "fedavg":
        return FedAvgDevice(run, sender, samples, job["local_steps"])
    if algo == "dga":
        return DGADevice(run, sender, samples, job["period"], job["delay"])
    raise ValueError(f"unknown algorithm {algo!r}")


def make_coordinator(cfg: RunConfig, job: dict, params: np.ndarray) -> WindowAveraging:
    # Under DGA an update may be up to D // K versions behind, and as many windows ahead.
    lag = cfg.job.delay // cfg.job.period if cfg.job.algo == "dga" else 0
    max_staleness = cfg.max_staleness if cfg.max_staleness >= 0 else lag
    return WindowAveraging(params=params, run=cfg.run, job=job, max_staleness=max_staleness,
                           max_ahead=lag + 1, window_timeout=cfg.window_timeout,
                           min_agents=cfg.min_agents)
