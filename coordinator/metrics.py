"""Prometheus metrics of the coordinator, served over HTTP with `--metrics-port` (0: off).

Message-level series (accepted and rejected messages, bytes) move as messages arrive, so an
operator sees an attack or a flood even while no version is published; version-level series
(version, averaged updates, staleness, round time, accuracy) move when a version is recorded
and match events.jsonl line for line.

Bytes are what the coordinator's own connection carries: `fleetfl_bytes{direction,kind}`,
`up` per accepted message by its kind, `down` once per published message; refused messages'
bytes are `fleetfl_bytes_rejected{reason}` (their kind is unknown when they do not decode),
so up + rejected is events.jsonl's `bytes_up_total`. events.jsonl counts the downlink per
recipient instead (one average reaches every online agent).

Counters export no `_created` series (prometheus_client's creation timestamps: a second
series per counter that dashboards do not use), and the evaluation gauges are absent until
the first evaluation (not 0.0, which reads as a model that is always wrong).

Per agent (`fleetfl_agent_*{agent}`, at most AGENT_SERIES_MAX agents): online, seconds since
its last accepted message, the base version of its last update and the staleness of its last
averaged one, its accepted bytes and its last reported seconds per local step. The process's
own series (`process_resident_memory_bytes`, CPU, open files) are exported too.

With TLS, `fleetfl_tls_certificate_expiry_timestamp_seconds{file}` is the notAfter (Unix time)
of the client certificate and of the CA file the coordinator was started with, read once at
start: the certificates this process presents and trusts (a renewed file is used, and shown,
after a restart). Absent without TLS files.

Each instance has its own registry, so several coordinators (tests) can live in one process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from cryptography import x509
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from fleetfl.shared.config import ConfigError
from fleetfl.shared.core.messages import Kind
from fleetfl.shared.core.pmt import MAX_STEP_SECONDS, MIN_STEP_SECONDS

log = logging.getLogger("fleetfl.coordinator")

STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32)
ROUND_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
EVAL_GAUGES = {  # name -> help; exported from the first evaluation on
    "fleetfl_eval_accuracy": "test accuracy of the last evaluated version",
    "fleetfl_eval_loss": "test loss of the last evaluated version",
    "fleetfl_federated_accuracy": "sample-weighted accuracy the agents measured on their "
                                  "validation data, last version evaluated",
    "fleetfl_federated_loss": "sample-weighted validation loss the agents measured, last "
                              "version evaluated",
    "fleetfl_federated_samples": "validation samples behind the last federated evaluation",
}


# a series per agent and name: bounded, as ids are chosen by whoever holds credentials
AGENT_SERIES_MAX = 10_000


@dataclass
class AgentSeries:
    last_seen: float = 0.0  # wall clock
    bytes_up: int = 0
    base_version: int = -1
    staleness: int = -1
    step_seconds: float = -1.0


class AgentCollector:
    """fleetfl_agent_*{agent}: written by the main loop, read at scrape time on the HTTP
    thread (hence the lock, and a copy taken under it)."""

    def __init__(self, online: Callable[[], list[tuple[str, bool]]]) -> None:
        self.online = online
        self.lock = threading.Lock()
        self.agents: dict[str, AgentSeries] = {}

    def get(self, agent: str) -> AgentSeries | None:
        """The series of `agent` (the caller holds the lock); None past AGENT_SERIES_MAX."""
        series = self.agents.get(agent)
        if series is None and len(self.agents) < AGENT_SERIES_MAX:
            series = self.agents[agent] = AgentSeries()
        return series

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        now = time.time()
        with self.lock:
            agents = {a: AgentSeries(**vars(s)) for a, s in self.agents.items()}
        online = GaugeMetricFamily("fleetfl_agent_online", "1 if the agent is online",
                                   labels=["agent"])
        for agent, is_online in self.online():
            if agent in agents:
                online.add_metric([agent], float(is_online))
        seen = GaugeMetricFamily("fleetfl_agent_last_seen_seconds", "seconds since the "
                                 "agent's last accepted message", labels=["agent"])
        base = GaugeMetricFamily("fleetfl_agent_base_version", "global version the agent's "
                                 "last update was based on", labels=["agent"])
        stale = GaugeMetricFamily("fleetfl_agent_staleness", "staleness of the agent's last "
                                  "averaged update (versions)", labels=["agent"])
        step = GaugeMetricFamily("fleetfl_agent_step_seconds", "seconds per local step the "
                                 "agent last reported", labels=["agent"])
        sent = CounterMetricFamily("fleetfl_agent_bytes_up", "payload bytes of the agent's "
                                   "accepted messages", labels=["agent"])
        for agent, s in agents.items():
            seen.add_metric([agent], max(0.0, now - s.last_seen))
            sent.add_metric([agent], s.bytes_up)
            for family, value in ((base, s.base_version), (stale, s.staleness),
                                  (step, s.step_seconds)):
                if value >= 0:  # not known yet: no sample rather than a made-up 0
                    family.add_metric([agent], value)
        yield from (online, seen, base, stale, step, sent)


class CoordinatorMetrics:
    def __init__(self, online: Callable[[], int], info: dict[str, str],
                 roster: Callable[[], list[tuple[str, bool]]] = list) -> None:
        """`online`: the number of online agents, `roster`: (agent, online) pairs, both
        called on the HTTP thread at scrape time (they must not iterate a dict the main loop
        may be resizing)."""
        disable_created_metrics()  # process-wide; the coordinator's process is ours
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)  # a registry of our own has none by default
        self.agents = AgentCollector(roster)
        r.register(self.agents)
        self.server: WSGIServer | None = None
        self._last_time: float | None = None
        Gauge("fleetfl_run_info", "the run this coordinator serves (value 1)", list(info),
              registry=r).labels(**info).set(1)
        self.version = Gauge("fleetfl_version", "global model version (averages published)",
                             registry=r)
        self.accepted = Counter("fleetfl_updates_accepted", "updates accepted into a window",
                                registry=r)
        self.averaged = Counter("fleetfl_updates_averaged",
                                "updates included in a published average", registry=r)
        self.rejected = Counter("fleetfl_messages_rejected", "messages refused, by reason",
                                ["reason"], registry=r)
        self.bytes = Counter("fleetfl_bytes", "payload bytes of messages accepted (up) and "
                             "published (down) by the coordinator, by message kind",
                             ["direction", "kind"], registry=r)
        self.rejected_bytes = Counter("fleetfl_bytes_rejected", "payload bytes of messages "
                                      "refused, by reason", ["reason"], registry=r)
        self.staleness = Histogram("fleetfl_update_staleness", "versions between an update's "
                                   "base and the version it was averaged into",
                                   buckets=STALENESS_BUCKETS, registry=r)
        self.round_time = Histogram("fleetfl_round_seconds", "seconds from one version to the "
                                    "next", buckets=ROUND_BUCKETS, registry=r)
        # absent until first set (a Gauge is registered, and exported at 0, when made)
        self._gauges: dict[str, Gauge] = {}
        Gauge("fleetfl_agents_online", "agents online", registry=r).set_function(online)

    # -- per message (main loop) ------------------------------------------------------------
    def received(self, kind: Kind, size: int, sender: str = "", base_version: int = -1,
                 step_seconds: float | None = None) -> None:
        self.bytes.labels("up", str(kind)).inc(size)
        if kind is Kind.UPDATE:
            self.accepted.inc()
        if not sender:
            return
        with self.agents.lock:
            series = self.agents.get(sender)
            if series is None:
                return
            series.last_seen = time.time()
            series.bytes_up += size
            if kind is Kind.UPDATE:
                series.base_version = base_version
                # a device's own figure: only a plausible one (FedPMT's bounds) is shown
                if step_seconds is not None \
                        and MIN_STEP_SECONDS <= step_seconds <= MAX_STEP_SECONDS:
                    series.step_seconds = step_seconds

    def refused(self, reason: str, size: int) -> None:
        self.rejected.labels(reason).inc()
        self.rejected_bytes.labels(reason).inc(size)

    def published(self, kind: Kind, size: int) -> None:
        self.bytes.labels("down", str(kind)).inc(size)

    # -- per version ------------------------------------------------------------------------
    def record(self, event: dict) -> None:
        """One version record of events.jsonl (results, if any, come to `evaluated`)."""
        self.version.set(event["version"])
        self.averaged.inc(len(event["contributors"]))
        for staleness in event["staleness"].values():
            self.staleness.observe(staleness)
        with self.agents.lock:
            for agent, staleness in event["staleness"].items():
                series = self.agents.get(agent)
                if series is not None:
                    series.staleness = staleness
        if self._last_time is not None:
            self.round_time.observe(event["time"] - self._last_time)
        self._last_time = event["time"]
        if event.get("accuracy") is not None:
            self.evaluated(event["loss"], event["accuracy"])

    def evaluated(self, loss: float, accuracy: float | None) -> None:
        self._set("fleetfl_eval_accuracy", accuracy)
        self._set("fleetfl_eval_loss", loss)

    def evaluated_federated(self, loss: float | None, accuracy: float | None,
                            samples: int) -> None:
        self._set("fleetfl_federated_samples", samples)
        self._set("fleetfl_federated_loss", loss)
        self._set("fleetfl_federated_accuracy", accuracy)

    def _set(self, name: str, value: float | None) -> None:
        """Set an evaluation gauge, registering it the first time it has a value."""
        if value is None:
            return
        gauge = self._gauges.get(name)
        if gauge is None:
            gauge = self._gauges[name] = Gauge(name, EVAL_GAUGES[name], registry=self.registry)
        gauge.set(value)

    # -- at start ---------------------------------------------------------------------------
    def certificates(self, *paths: str) -> None:
        """fleetfl_tls_certificate_expiry_timestamp_seconds{file} for each PEM file given
        (empty paths: not configured, skipped): its notAfter, the earliest one for a file
        with several certificates (a CA bundle). A file that does not read as certificates is
        left out with a warning (the TLS setup reports it properly)."""
        expiry: dict[str, float] = {}
        for path in filter(None, paths):
            try:
                with open(path, "rb") as f:
                    certs = x509.load_pem_x509_certificates(f.read())
            except (OSError, ValueError) as exc:
                log.warning("certificate expiry of %s not exported: %s", path, exc)
                continue
            expiry[path] = min(c.not_valid_after_utc.timestamp() for c in certs)
        if not expiry:
            return
        gauge = Gauge("fleetfl_tls_certificate_expiry_timestamp_seconds", "notAfter (Unix "
                      "time) of a TLS certificate file the coordinator loaded at start",
                      ["file"], registry=self.registry)
        for path, when in expiry.items():
            gauge.labels(path).set(when)

    # -- HTTP -------------------------------------------------------------------------------
    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Serve /metrics on a daemon thread; port 0 means off."""
        if not port:
            return
        try:
            self.server, _thread = start_http_server(port, addr, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"metrics_port {port}: {exc.strerror or exc}") from None

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
