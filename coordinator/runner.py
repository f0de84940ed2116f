"""The coordinator: an MQTT shell around the coordinator-side state machine.

It decodes what agents send (refusing bad input with a counted reason, never crashing),
publishes the averages and the retained model the state machine emits, evaluates every new
version on the held-out test set, logs it to events.jsonl and checkpoints it.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import signal
import time
from collections import Counter
from pathlib import Path

from fleetfl.agent import sd_notify
from fleetfl.agent.trainer import model_for_job
from fleetfl.shared import mqtt_auth
from fleetfl.shared.algorithms.averaging import WindowResult
from fleetfl.shared.algorithms.base import Rejected
from fleetfl.shared.algorithms.registry import make_coordinator
from fleetfl.shared.codec import CodecError, DecodeContext, decode, encode
from fleetfl.shared.config import ConfigError, RunConfig, to_dict
from fleetfl.shared.data import load_dataset
from fleetfl.shared.local_broker import parse_broker_url
from fleetfl.shared.models import default_model_for, evaluate
from fleetfl.shared.params import bind_flat
from fleetfl.shared.protocol import COORDINATOR_ID, Kind, Message, Topics
from fleetfl.shared.signing import KeyRing, Signer
from fleetfl.shared.transport import CONNECTED, Incoming, MqttLink

from .ledger import ByteLedger
from .metrics import CoordinatorMetrics
from .rundir import RunDir

log = logging.getLogger("fleetfl.coordinator")
TICK_S = 0.2
UNKNOWN_SENDER = "(unknown)"  # not a valid agent id, so it cannot collide with one


class CoordinatorRunner:
    def __init__(self, cfg: RunConfig, resume: bool = False) -> None:
        self.cfg = cfg
        if not cfg.job.model:
            cfg.job.model = default_model_for(cfg.job.dataset)
        ds = load_dataset(cfg.job.dataset, cfg.data_dir or None)
        self.x_test, self.y_test = ds.x_test, ds.y_test
        self.model = model_for_job(cfg.job)
        self.eval_params, self.layers = bind_flat(self.model)  # also the initial model
        self.core = make_coordinator(cfg, dataclasses.asdict(cfg.job), self.eval_params,
                                     self.layers)
        self.rundir = RunDir(Path(cfg.run_dir) / cfg.run)
        self.resumed = False
        if resume:
            self._resume()
        else:
            for stale in (self.rundir.events_path, self.rundir.path / "checkpoint.msgpack"):
                stale.unlink(missing_ok=True)
        self.rundir.write_config(to_dict(cfg))
        self.topics = Topics(cfg.run)
        self.inbox: queue.Queue[Incoming] = queue.Queue()
        # Signed messages (shared/codec.py). With agent_keys every upstream message must be
        # signed by its sender and fresh, except the age of OFFLINE: the last will is signed
        # when the agent starts and fired by the broker much later (a replayed one only marks
        # the agent offline until its next message, as the real will would).
        self.signer = Signer.from_file(cfg.signing_key) if cfg.signing_key else None
        self.ctx = DecodeContext(
            cfg.run, self.layers.size, cfg.max_message_bytes,
            keys=KeyRing.from_file(cfg.agent_keys) if cfg.agent_keys else None,
            max_age_s=cfg.max_message_age, ageless=frozenset({Kind.OFFLINE}))
        self.model_at = time.monotonic()  # when the retained model was last published
        self.link = MqttLink(parse_broker_url(cfg.broker or "mqtt://127.0.0.1:1883"),
                             f"fl-{cfg.run}-coordinator", self.inbox,
                             auth=mqtt_auth.resolve(cfg),
                             max_packet_bytes=cfg.max_packet_bytes,
                             max_message_bytes=cfg.max_message_bytes)
        self.rejected: Counter[str] = Counter()
        self.ledger = ByteLedger()
        self.seq = time.time_ns() // 1000
        self.started = time.monotonic()
        self.best_accuracy = 0.0
        # list(): one atomic copy, as the scrape runs on the HTTP server's thread
        self.metrics = CoordinatorMetrics(
            lambda: sum(r.online for r in list(self.core.agents.values())),
            {"run": cfg.run, "algo": cfg.job.algo, "aggregate": cfg.aggregate})

    def _resume(self) -> None:
        ckpt = self.rundir.load_checkpoint()
        if ckpt is None:
            raise ConfigError(f"--resume: no checkpoint in {self.rundir.path}")
        params, state = ckpt
        if params.size != self.layers.size:
            raise ConfigError("--resume: the checkpoint does not match the configured model")
        self.core.load_state(state, params)
        self.rundir.truncate_events(self.core.version)
        self.resumed = True
        log.info("resumed at version %d from %s", self.core.version, self.rundir.path)

    # -- publishing ---------------------------------------------------------------------
    def _publish(self, msg: Message) -> None:
        self.seq += 1
        msg.seq = self.seq
        topic, retain = self.topics.for_outgoing(msg)
        payload = encode(msg, self.signer)
        if msg.kind is Kind.MODEL:
            self.model_at = time.monotonic()
        self.ledger.down(msg.kind, len(payload), self._online())
        self.metrics.published(msg.kind, len(payload))
        self.link.publish(topic, payload, retain=retain)

    def _online(self) -> list[str]:
        return [a for a, r in self.core.agents.items() if r.online]

    # -- incoming -----------------------------------------------------------------------
    def _handle(self, item: Incoming) -> None:
        if item.topic == CONNECTED:
            self._publish(self.core.model_message())  # (re)publish the retained model
            return
        sender = self.topics.sender_of(item.topic)
        if sender is None or (not item.payload and "/status/" in item.topic):
            return  # not ours, or a cleared retained status (an empty update is refused)
        msg = None
        try:
            msg = decode(item.payload, self.ctx)
            if msg.sender != sender:
                raise Rejected("sender_mismatch", f"{msg.sender!r} wrote on {item.topic}")
            if msg.kind in (Kind.HELLO, Kind.OFFLINE) and "/status/" not in item.topic:
                raise Rejected("wrong_topic", f"{msg.kind} on {item.topic}")
            outputs = self.core.on_message(msg, item.at)
        except (CodecError, Rejected) as exc:
            self.rejected[exc.reason] += 1
            self.ledger.up(self._known(sender), None, len(item.payload))
            self.metrics.refused(exc.reason, len(item.payload))
            log.warning("rejected message from %s: %s", sender, exc)
            return
        self.ledger.up(self._known(sender), msg.kind, len(item.payload))
        self.metrics.received(msg.kind, len(item.payload))
        if msg.kind is Kind.HELLO:
            log.info("agent %s online (%d samples, from window %d)", sender,
                     msg["samples"], msg["first_window"])
        for out in outputs:
            self._publish(out)

    def _known(self, sender: str) -> str:
        # Senders that never said hello share one ledger row: a flood of made-up topic ids
        # must not grow the coordinator's memory or every events.jsonl line.
        return sender if sender in self.core.agents else UNKNOWN_SENDER

    # -- per version --------------------------------------------------------------------
    def _record(self, result: WindowResult, evaluate_now: bool) -> dict:
        loss = accuracy = None
        if evaluate_now:
            self.eval_params[:] = self.core.params
            loss, accuracy = evaluate(self.model, self.x_test, self.y_test)
            self.best_accuracy = max(self.best_accuracy, accuracy)
        event = {
            "time": round(time.monotonic() - self.started, 3), "wall": time.time(),
            "version": result.version, "window": result.window,
            "contributors": result.contributors, "missing": result.missing,
            "staleness": result.staleness, "timed_out": result.timed_out,
            "local_steps": result.local_steps, "assignments": result.assignments,
            "loss": loss, "accuracy": accuracy, "agents_online": len(self._online()),
            "rejected": dict(self.rejected), **self.ledger.snapshot(),
        }
        self.rundir.save_checkpoint(self.core.params, self.core.state())
        self.rundir.append_event(event)
        self.metrics.record(event)
        if accuracy is not None:
            log.info("version %d: accuracy %.4f loss %.4f, %d contributors, %.1f s",
                     result.version, accuracy, loss, len(result.contributors), event["time"])
        return event

    def _done(self, event: dict | None) -> str | None:
        if self.core.version >= self.cfg.max_versions:
            return f"reached {self.cfg.max_versions} versions"
        target = self.cfg.target_accuracy
        if event and target and (event["accuracy"] or 0.0) >= target:
            return f"reached target accuracy {target}"
        return None

    def run(self) -> int:
        def on_term(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, on_term)
        self.link.subscribe(self.topics.up_all)
        self.link.subscribe(self.topics.status_all)
        self.link.connect()
        self.metrics.serve(self.cfg.metrics_port)
        sd_notify.ready(f"run {self.cfg.run} on {self.link.broker}")
        log.info("run %s: %s on %s, model %s (%d parameters), waiting for agents on %s",
                 self.cfg.run, self.cfg.job.algo, self.cfg.job.dataset, self.cfg.job.model,
                 self.layers.size, self.link.broker)
        reason = None
        try:
            while reason is None:
                sd_notify.watchdog()
                try:
                    self._handle(self.inbox.get(timeout=TICK_S))
                    for _ in range(self.inbox.qsize()):  # what queued up meanwhile
                        self._handle(self.inbox.get_nowait())
                except queue.Empty:
                    pass
                for out in self.core.on_tick(time.monotonic()):
                    self._publish(out)
                if self.signer is not None and \
                        time.monotonic() - self.model_at > self.cfg.max_message_age / 3:
                    # re-sign the retained model while idle, or a joiner would refuse it as
                    # too old (agents check its ts like every signed message's)
                    self._publish(self.core.model_message())
                event = None
                while self.core.results:
                    result = self.core.results.pop(0)
                    last = not self.core.results
                    due = result.version % self.cfg.eval_every == 0 \
                        or result.version >= self.cfg.max_versions
                    event = self._record(result, evaluate_now=last and due)
                reason = self._done(event)
        except KeyboardInterrupt:
            reason = "interrupted"
        sd_notify.stopping(reason)
        self._publish(Message(Kind.STOP, self.cfg.run, COORDINATOR_ID, 0, self.core.version,
                              {"reason": reason}))
        self.link.close()
        self.metrics.close()
        log.info("stopped: %s; version %d, best accuracy %.4f, rejected %s", reason,
                 self.core.version, self.best_accuracy, dict(self.rejected) or "none")
        return 0 if reason != "interrupted" else 130
