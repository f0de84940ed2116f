"""Prometheus metrics of the coordinator, served over HTTP with `--metrics-port` (0: off).

Message-level series (accepted and rejected messages, bytes) move as messages arrive, so an
operator sees an attack or a flood even while no version is published; version-level series
(version, averaged updates, staleness, round time, accuracy) move when a version is recorded
and match events.jsonl line for line.

Bytes are what the coordinator's own connection carries: `up` per received message (as
events.jsonl's `bytes_up_total`), `down` once per published message. events.jsonl counts the
downlink per recipient instead (one average reaches every online agent).

Each instance has its own registry, so several coordinators (tests) can live in one process.
"""

from __future__ import annotations

from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from fleetfl.shared.config import ConfigError
from fleetfl.shared.core.messages import Kind

STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32)
ROUND_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class CoordinatorMetrics:
    def __init__(self, online: Callable[[], int], info: dict[str, str]) -> None:
        """`online`: the number of online agents, called on the HTTP thread at scrape time
        (it must not iterate a dict the main loop may be resizing)."""
        self.registry = r = CollectorRegistry()
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
        self.bytes = Counter("fleetfl_bytes", "payload bytes received (up) and published "
                             "(down) by the coordinator", ["direction", "kind"], registry=r)
        self.staleness = Histogram("fleetfl_update_staleness", "versions between an update's "
                                   "base and the version it was averaged into",
                                   buckets=STALENESS_BUCKETS, registry=r)
        self.round_time = Histogram("fleetfl_round_seconds", "seconds from one version to the "
                                    "next", buckets=ROUND_BUCKETS, registry=r)
        self.accuracy = Gauge("fleetfl_eval_accuracy", "test accuracy of the last evaluated "
                              "version", registry=r)
        self.loss = Gauge("fleetfl_eval_loss", "test loss of the last evaluated version",
                          registry=r)
        self.fed_accuracy = Gauge("fleetfl_federated_accuracy", "sample-weighted accuracy the "
                                  "agents measured on their validation data, last version "
                                  "evaluated", registry=r)
        self.fed_loss = Gauge("fleetfl_federated_loss", "sample-weighted validation loss the "
                              "agents measured, last version evaluated", registry=r)
        self.fed_samples = Gauge("fleetfl_federated_samples", "validation samples behind the "
                                 "last federated evaluation", registry=r)
        Gauge("fleetfl_agents_online", "agents online", registry=r).set_function(online)

    # -- per message (main loop) ------------------------------------------------------------
    def received(self, kind: Kind, size: int) -> None:
        self.bytes.labels("up", str(kind)).inc(size)
        if kind is Kind.UPDATE:
            self.accepted.inc()

    def refused(self, reason: str, size: int) -> None:
        self.rejected.labels(reason).inc()
        self.bytes.labels("up", "rejected").inc(size)

    def published(self, kind: Kind, size: int) -> None:
        self.bytes.labels("down", str(kind)).inc(size)

    # -- per version ------------------------------------------------------------------------
    def record(self, event: dict) -> None:
        """One events.jsonl line."""
        self.version.set(event["version"])
        self.averaged.inc(len(event["contributors"]))
        for staleness in event["staleness"].values():
            self.staleness.observe(staleness)
        if self._last_time is not None:
            self.round_time.observe(event["time"] - self._last_time)
        self._last_time = event["time"]
        if event["accuracy"] is not None:
            self.evaluated(event["loss"], event["accuracy"])

    def evaluated(self, loss: float, accuracy: float | None) -> None:
        if accuracy is not None:
            self.accuracy.set(accuracy)
        self.loss.set(loss)

    def evaluated_federated(self, loss: float | None, accuracy: float | None,
                            samples: int) -> None:
        self.fed_samples.set(samples)
        for gauge, value in ((self.fed_loss, loss), (self.fed_accuracy, accuracy)):
            if value is not None:
                gauge.set(value)

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
