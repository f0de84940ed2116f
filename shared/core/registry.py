"""Builds the device and coordinator sides an algorithm name stands for, from three separate
pieces (ALGORITHMS.md section 8): when updates are sent (timing), what is sent (payload), and
how late they may be applied (delay D, staleness bound).

| algo   | timing                       | default payload |
| ------ | ---------------------------- | --------------- |
| fedavg | round: H steps, then wait    | dense           |
| dga    | every K steps, applied D later | dense         |
| drpga  | as dga                       | partial         |
| lbgm   | round                        | lbgm            |
| fda    | on the coordinator's trigger | dense           |
| pmt    | round (with a deadline)      | suffix: the trailing layers each agent can train in time |

`job.payload` swaps the payload of any timing (e.g. DGA timing with LBGM payloads, FDA with
partial payloads) without new code.
"""

from __future__ import annotations

import numpy as np

from fleetfl.shared.config import RunConfig
from fleetfl.shared.core.averaging import WindowAveraging
from fleetfl.shared.core.base import DeviceSide
from fleetfl.shared.core.dga import DGADevice
from fleetfl.shared.core.fda import FDADevice, FDAMonitor
from fleetfl.shared.core.fedavg import FedAvgDevice
from fleetfl.shared.core.layers import LayerTable, layer_groups
from fleetfl.shared.core.payloads import (
    DenseDecoder,
    DenseEncoder,
    LBGMDecoder,
    LBGMEncoder,
    PartialDecoder,
    PartialEncoder,
    PartialMasks,
)
from fleetfl.shared.core.pmt import Assigner, SuffixDecoder, SuffixEncoder
from fleetfl.shared.core.robust import make_aggregator

DEFAULT_PAYLOAD = {"fedavg": "dense", "dga": "dense", "drpga": "partial", "lbgm": "lbgm",
                   "fda": "dense", "pmt": "suffix"}
DELAYED = ("dga", "drpga")
# Theta when neither the job nor the task gives one (tasks carry their calibrated value:
# bench/calibrate_fda.py, ALGORITHMS.md 5).
DEFAULT_FDA_THETA = 0.1


def payload_of(job: dict) -> str:
    return job.get("payload") or DEFAULT_PAYLOAD[job["algo"]]


def fda_theta(job: dict) -> float:
    return job.get("fda_theta") or DEFAULT_FDA_THETA


def make_encoder(job: dict, layers: LayerTable, sender: str = ""):
    kind = payload_of(job)
    if kind == "suffix":
        return SuffixEncoder(layer_groups(layers), sender)
    if kind == "partial":
        return PartialEncoder(PartialMasks(job["seed"], layers.size, job["rate"],
                                           job["rate_walk"]))
    if kind == "lbgm":
        return LBGMEncoder(layers, job["lbgm_threshold"])
    return DenseEncoder()


def make_decoder(job: dict, layers: LayerTable, assigner: Assigner | None):
    kind = payload_of(job)
    if kind == "suffix":
        if assigner is None:
            raise ValueError("the suffix payload needs layer assignments (FedPMT)")
        return SuffixDecoder(layer_groups(layers), assigner)
    if kind == "partial":
        return PartialDecoder(PartialMasks(job["seed"], layers.size, job["rate"],
                                           job["rate_walk"]))
    if kind == "lbgm":
        return LBGMDecoder(layers)
    return DenseDecoder(layers.size)


def make_device(job: dict, run: str, sender: str, samples: int, layers: LayerTable
                ) -> DeviceSide:
    algo, encoder = job.get("algo"), make_encoder(job, layers, sender)
    if algo in ("fedavg", "lbgm", "pmt"):
        return FedAvgDevice(run, sender, samples, job["local_steps"], encoder)
    if algo in DELAYED:
        return DGADevice(run, sender, samples, job["period"], job["delay"], encoder)
    if algo == "fda":
        return FDADevice(run, sender, samples, job["fda_variant"], job["rtc_steps"],
                         job["seed"], layers.size, encoder)
    raise ValueError(f"unknown algorithm {algo!r}")


def make_coordinator(cfg: RunConfig, job: dict, params: np.ndarray, layers: LayerTable
                     ) -> WindowAveraging:
    # Under DGA an update may be up to D // K versions behind, and as many windows ahead.
    lag = job["delay"] // job["period"] if job["algo"] in DELAYED else 0
    max_staleness = cfg.max_staleness if cfg.max_staleness >= 0 else lag
    monitor = None
    if job["algo"] == "fda":
        monitor = FDAMonitor(job["fda_variant"], fda_theta(job))
    # robust rules work on every payload: per coordinate over its senders (robust.py)
    aggregator = make_aggregator(cfg.aggregate, cfg.clip_norm, cfg.clip_median)
    assigner = None
    if payload_of(job) == "suffix" or cfg.round_deadline > 0 or cfg.deadline_rank > 0:
        steps = job["period"] if job["algo"] in DELAYED else job["local_steps"]
        assigner = Assigner(len(layer_groups(layers)), steps, cfg.run, cfg.round_deadline,
                            max(cfg.deadline_rank, 1), cfg.deadline_factor)
    return WindowAveraging(params=params, run=cfg.run, job=job, max_staleness=max_staleness,
                           max_ahead=lag + 1, window_timeout=cfg.window_timeout,
                           min_agents=cfg.min_agents, max_samples=cfg.max_samples,
                           max_param=cfg.max_param, max_versions=cfg.max_versions,
                           decoder=make_decoder(job, layers, assigner), monitor=monitor,
                           aggregator=aggregator, assigner=assigner)
