"""Builds the device and coordinator sides of a job from the algorithm table (catalog.py) and
the payload table below: when updates are sent (timing), what is sent (payload), and how late
they may be applied (delay rule, staleness bound).

`job.payload` swaps the payload of any timing (e.g. DGA timing with LBGM payloads, FDA with
partial payloads) without new code.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from fleetfl.shared.core.averaging import WindowAveraging
from fleetfl.shared.core.base import Decoder, DeviceSide, Encoder
from fleetfl.shared.core.catalog import ALGORITHMS, Algorithm
from fleetfl.shared.core.choices import Payload
from fleetfl.shared.core.fedbuff import MAX_STALENESS, BufferedAveraging
from fleetfl.shared.core.job import JobConfig, job_to_dict
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
from fleetfl.shared.core.quantized import CompressedDecoder, CompressedEncoder, make_quantizer
from fleetfl.shared.core.robust import make_aggregator
from fleetfl.shared.core.selection import SelectionGate, Selector


class AveragingRules(Protocol):
    """The coordinator settings the averaging uses (config.RunConfig has them)."""

    run: str
    job: JobConfig
    max_staleness: int  # -1: the algorithm's lag
    window_timeout: float
    window_quorum: int  # fewest updates a timed-out window closes with (0: any)
    min_agents: int
    start_timeout: float  # the start barrier's timeout (0: none) ...
    start_quorum: int  # ... and the fewest reports it then takes (0: a majority)
    max_samples: int
    max_param: float
    max_versions: int
    aggregate: str
    clip_norm: float
    clip_median: float
    round_deadline: float
    deadline_rank: int
    deadline_factor: float
    buffer: int  # FedBuff B (0: min_agents); read only for buffered timings
    server_lr: float  # FedBuff eta_g


def algorithm(job: JobConfig) -> Algorithm:
    return ALGORITHMS[job.algo]


def payload_of(job: JobConfig) -> Payload:
    return job.payload or algorithm(job).payload


def _masks(job: JobConfig, layers: LayerTable) -> PartialMasks:
    return PartialMasks(job.seed, layers.size, job.rate, job.rate_walk)


def make_encoder(job: JobConfig, layers: LayerTable, sender: str = "") -> Encoder:
    encoder = _base_encoder(job, layers, sender)
    if job.compress:
        encoder = CompressedEncoder(encoder, make_quantizer(job.compress, job.topk_density),
                                    layers)
    # participant selection gates every payload: train only the windows selected for
    return SelectionGate(encoder, sender) if job.select else encoder


def _base_encoder(job: JobConfig, layers: LayerTable, sender: str) -> Encoder:
    match payload_of(job):
        case Payload.SUFFIX:
            return SuffixEncoder(layer_groups(layers), sender)
        case Payload.PARTIAL:
            return PartialEncoder(_masks(job, layers))
        case Payload.LBGM:
            return LBGMEncoder(layers, job.lbgm_threshold)
    return DenseEncoder()


def make_decoder(job: JobConfig, layers: LayerTable, assigner: Assigner | Selector | None
                 ) -> Decoder:
    """`assigner`: whatever says which layers each agent was told to train (FedPMT's, or the
    selection built around it)."""
    base = _base_decoder(job, layers, assigner)
    if not job.compress:
        return base
    return CompressedDecoder(base, make_quantizer(job.compress, job.topk_density), layers)


def _base_decoder(job: JobConfig, layers: LayerTable, assigner: Assigner | Selector | None
                  ) -> Decoder:
    match payload_of(job):
        case Payload.SUFFIX:
            if assigner is None:
                raise ValueError("the suffix payload needs layer assignments (FedPMT)")
            return SuffixDecoder(layer_groups(layers), assigner)
        case Payload.PARTIAL:
            return PartialDecoder(_masks(job, layers))
        case Payload.LBGM:
            return LBGMDecoder(layers)
    return DenseDecoder(layers.size)


def make_device(job: JobConfig, run: str, sender: str, samples: int, layers: LayerTable
                ) -> DeviceSide:
    return algorithm(job).device(job, run, sender, samples, layers.size,
                                 make_encoder(job, layers, sender))


def _assigner(rules: AveragingRules, layers: LayerTable) -> Assigner | None:
    """FedPMT's layer assigner, also the round deadline of any round-based algorithm."""
    job = rules.job
    if payload_of(job) != Payload.SUFFIX and rules.round_deadline <= 0 \
            and rules.deadline_rank <= 0:
        return None
    steps = job.period if algorithm(job).delayed else job.local_steps
    return Assigner(len(layer_groups(layers)), steps, rules.run, rules.round_deadline,
                    max(rules.deadline_rank, 1), rules.deadline_factor)


def make_coordinator(rules: AveragingRules, params: np.ndarray, layers: LayerTable
                     ) -> WindowAveraging:
    job, algo = rules.job, algorithm(rules.job)
    # Under DGA an update may be up to D // K versions behind, and as many windows ahead.
    lag = job.delay // job.period if algo.delayed else 0
    kind, buffered = WindowAveraging, {}
    if algo.buffered:  # FedBuff: B defaults to the fleet the operator declared
        lag, kind = MAX_STALENESS, BufferedAveraging
        buffered = {"buffer": rules.buffer or rules.min_agents, "server_lr": rules.server_lr}
    max_staleness = rules.max_staleness if rules.max_staleness >= 0 else lag
    assigner = _assigner(rules, layers)
    selector = None
    if job.select:  # decided ahead of the furthest window a device may train (FedBuff: next)
        selector = Selector(job.select, job.seed, rules.run,
                            ahead=2 if algo.buffered else lag + 2, inner=assigner,
                            layered=payload_of(job) == Payload.SUFFIX)
    return kind(
        params=params, run=rules.run, job=job_to_dict(job), max_staleness=max_staleness,
        max_ahead=lag + 1, window_timeout=rules.window_timeout,
        window_quorum=rules.window_quorum, min_agents=rules.min_agents,
        start_timeout=rules.start_timeout, start_quorum=rules.start_quorum,
        max_samples=rules.max_samples, max_param=rules.max_param,
        max_versions=rules.max_versions,
        decoder=make_decoder(job, layers, selector or assigner),
        monitor=algo.monitor(job) if algo.monitor else None,
        # robust rules work on every payload: per coordinate over its senders (robust.py)
        aggregator=make_aggregator(rules.aggregate, rules.clip_norm, rules.clip_median),
        assigner=assigner, selector=selector, **buffered)
