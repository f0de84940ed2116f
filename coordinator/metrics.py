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

Each instance has its own registry, so several coordinators (tests) can live in one process.
"""

from __future__ import annotations

from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)

from fleetfl.shared.config import ConfigError
from fleetfl.shared.core.messages import Kind

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


class CoordinatorMetrics:
    def __init__(self, online: Callable[[], int], info: dict[str, str]) -> None:
        """`online`: the number of online agents, called on the HTTP thread at scrape time
        (it must not iterate a dict the main loop may be resizing)."""
        disable_created_metrics()  # process-wide; the coordinator's process is ours
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
    def received(self, kind: Kind, size: int) -> None:
        self.bytes.labels("up", str(kind)).inc(size)
        if kind is Kind.UPDATE:
            self.accepted.inc()

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
