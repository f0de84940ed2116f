"""The agent: an MQTT shell around the device-side state machine and the local trainer.

Lifecycle: connect -> read the retained model (it carries the job) -> find the job's task here
and check its fingerprint (else refuse, saying why, and wait for another job) -> load this
device's data (its own folder, or a simulated shard) -> say hello -> train, publishing what the
state machine emits, applying the averages it is handed, evaluating the global model on its
validation data when asked -> stop when the coordinator says so. Messages arrive on paho's
thread and are handed over through a queue; training runs only here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import queue
import resource
import time
import zlib
from collections import deque

import torch

from fleetfl.agent import torch_lean
from fleetfl.agent.local_data import TaskRefused, device_data, task_for_job
from fleetfl.agent.progress import Progress
from fleetfl.agent.sequence import open_counter
from fleetfl.agent.validation import FederatedEvaluator
from fleetfl.shared import sd_notify
from fleetfl.shared.config import AgentConfig, ConfigError
from fleetfl.shared.core.base import DeviceSide, Rejected
from fleetfl.shared.core.job import job_from_dict
from fleetfl.shared.core.messages import (
    COORDINATOR_ID,
    PROTOCOL_VERSION,
    PROTOCOL_VERSIONS,
    Kind,
    Message,
)
from fleetfl.shared.core.registry import make_device
from fleetfl.shared.core.version import fleetfl_version
from fleetfl.shared.learn.data import DataError, parse_partition
from fleetfl.shared.net import mqtt_auth
from fleetfl.shared.net.broker_url import parse_broker_url
from fleetfl.shared.net.transport import CONNECTED, Incoming, MqttLink
from fleetfl.shared.tasks.trainer import LocalTrainer
from fleetfl.shared.wire.codec import (
    CodecError,
    decode,
    device_context,
    encode,
)
from fleetfl.shared.wire.signing import KeyRing, Signer
from fleetfl.shared.wire.topics import Topics

log = logging.getLogger("fleetfl.agent")
# How often the main loop, which passes every local step, asks sd_notify whether the watchdog
# is due: the check reads and parses the environment (3 % of a digits step's time); systemd's
# WatchdogSec is seconds (20 to 120 in the roles), pings go out at half of it
WATCHDOG_CHECK_S = 0.25


class Stop(Exception):
    pass


class AgentRunner:
    def __init__(self, cfg: AgentConfig) -> None:
        torch_lean.keep_compiler_out()  # no torch._dynamo/sympy in a device's memory (~70 MB)
        self.cfg = cfg
        self.index, self.parts = parse_partition(cfg.shard)
        self.topics = Topics(cfg.run)
        self.inbox: queue.Queue[Incoming] = queue.Queue()
        # Signed messages: ours with signing_key; with coordinator_key, downstream messages
        # not signed by the coordinator (or too old) are refused like any bad message.
        self.signer = Signer.from_file(cfg.signing_key) if cfg.signing_key else None
        self.ctx = device_context(
            cfg.run, max_bytes=cfg.max_message_bytes,
            keys=KeyRing.coordinator(cfg.coordinator_key) if cfg.coordinator_key else None,
            max_age_s=cfg.max_message_age)
        # Sequence numbers must grow across restarts (the coordinator refuses replays), also
        # when the clock steps back: a counter kept in state_dir (sequence.py)
        self.counter = open_counter(cfg)
        self.seq = 0
        # we write the protocol version of the last model read (PROTOCOL.md section 19); the
        # will, encoded before any model, is in the current one
        self.proto = PROTOCOL_VERSION
        self.status = sd_notify.Status()  # STATUS=: version and window, at most once a second
        self.watchdog_due = 0.0  # next WATCHDOG=1 check (_next_message)
        offline = encode(self._stamp(Message(Kind.OFFLINE, cfg.run, cfg.agent_id, 0, 0)),
                         self.signer)  # signed now, fired by the broker later (see coordinator)
        self.link = MqttLink(parse_broker_url(cfg.broker), f"fl-{cfg.run}-{cfg.agent_id}",
                             self.inbox, will=(self.topics.status(cfg.agent_id), offline),
                             auth=mqtt_auth.resolve(cfg),
                             max_packet_bytes=cfg.max_packet_bytes,
                             max_message_bytes=cfg.max_message_bytes)
        self.trainer: LocalTrainer | None = None
        self.device: DeviceSide | None = None
        self.validator: FederatedEvaluator | None = None
        self.refused_job: dict | None = None  # a job we cannot run: wait for another
        self.blocked_since: float | None = None
        self.hello: Message | None = None  # republished after a reconnect
        self.connections = 0
        self.step_seconds = 0.0  # wall time of local steps since the last update
        # (seq, paho's handle) of updates not yet PUBACKed: their acks are logged for the
        # accounting (coordinator/accounting.py), in publishing order
        self.unacked: deque = deque()
        self.stats = {"steps": 0, "sent": 0, "bytes_up": 0, "bytes_down": 0, "rejected": 0}
        self.progress = Progress(cfg.agent_id, interval=cfg.progress_interval)

    # -- plumbing -----------------------------------------------------------------------
    def _stamp(self, msg: Message) -> Message:
        self.seq = msg.seq = self.counter.next()
        return msg

    def _publish(self, msg: Message):
        if msg.kind is Kind.HELLO:
            self._await_acks()
        topic, retain = self.topics.for_outgoing(self._stamp(msg))
        payload = encode(msg, self.signer, proto=self.proto)
        self.stats["bytes_up"] += len(payload)
        return self.link.publish(topic, payload, retain=retain)

    def _next_message(self, timeout: float | None) -> Message | None:
        now = time.monotonic()
        if now >= self.watchdog_due:  # every loop passes here
            self.watchdog_due = now + WATCHDOG_CHECK_S
            sd_notify.watchdog(now)  # rate-limited to half the watchdog's interval
        self.status.poll()  # a STATUS= held back by its rate limit
        self._log_acks()
        try:
            item = self.inbox.get(timeout=timeout) if timeout else self.inbox.get_nowait()
        except queue.Empty:
            return None
        if item.topic == CONNECTED:
            self._on_connected()
            return None
        self.stats["bytes_down"] += len(item.payload)
        if not item.payload:
            return None  # a cleared retained message
        try:
            msg = decode(item.payload, self.ctx)
        except CodecError as exc:
            self.stats["rejected"] += 1
            log.warning("rejected message on %s: %s", item.topic, exc)
            return None
        if msg.sender != COORDINATOR_ID:
            self.stats["rejected"] += 1
            log.warning("rejected %s from %r: not the coordinator", msg.kind, msg.sender)
            return None
        if self.topics.for_outgoing(msg)[0] != item.topic:  # e.g. an avg on down/ctl
            self.stats["rejected"] += 1
            log.warning("rejected %s on %s: not its kind's topic", msg.kind, item.topic)
            return None
        if msg.kind is Kind.REFUSAL:
            self._log_refusal(msg)
            return None
        return msg

    def _log_refusal(self, msg: Message) -> None:
        """The coordinator refused a message of ours (PROTOCOL.md, "Refusal replies")."""
        if msg["agent"] != self.cfg.agent_id:
            return
        self.stats["refused_by_coordinator"] = self.stats.get("refused_by_coordinator", 0) + 1
        detail = "".join(c if c.isprintable() else "?" for c in msg["detail"][:200])
        held = f"; {msg['suppressed']} earlier refusal(s) not reported" \
            if msg["suppressed"] else ""
        log.warning("the coordinator refused our %s seq=%d: %s (%s)%s",
                    msg["refused_kind"] or "message", msg["seq"], msg["reason"], detail, held)

    def _on_connected(self) -> None:
        self.connections += 1
        if self.connections == 1 or self.hello is None:
            return
        # The broker may have restarted: our retained hello and averages sent meanwhile
        # may be gone. Say hello again; if we wait for an average, catch up from the model.
        self._publish(self.hello)  # a fresh seq: the coordinator refuses old ones
        if self.device.blocked:
            self.device.needs_resync = True

    # -- joining ------------------------------------------------------------------------
    def _wait_for_model(self) -> Message:
        self.link.subscribe(self.topics.model)
        log.info("waiting for the model on %s", self.topics.model)
        while True:
            msg = self._next_message(timeout=1.0)
            if msg is None:
                continue
            if msg.kind is Kind.STOP:
                raise Stop(msg["reason"])
            if msg.kind is Kind.MODEL and msg["job"] != self.refused_job:
                self.link.unsubscribe(self.topics.model)  # only joiners need full models
                self.proto = msg.proto  # our hello, updates (or refusal) follow the model's
                return msg

    def _join_first(self) -> None:
        """Join with the first job whose task is installed here and matches; refuse others,
        saying why on our status topic (the coordinator logs it), and wait for the next."""
        while True:
            model = self._wait_for_model()
            try:
                self._join(model)
                return
            except TaskRefused as refusal:
                self._refuse(str(refusal), model["job"].get("task_fingerprint", ""))
                self.refused_job = model["job"]
            except DataError as exc:  # this device's data is broken: never join with it
                self._refuse(f"data: {exc}", model["job"].get("task_fingerprint", ""))
                raise

    def _refuse(self, reason: str, task: str) -> None:
        log.error("not joining: %s", reason)
        self._publish(Message(Kind.REFUSED, self.cfg.run, self.cfg.agent_id, 0, 0,
                              {"reason": reason, "task": task}))

    def _join(self, model: Message) -> None:
        if self.trainer is None:
            self._build(model)
        elif model["params"].size != self.trainer.params.size:
            raise ConfigError("the coordinator's model changed size during the run")
        self.trainer.params[:] = model["params"]
        self.device.start(model["version"], model["next_window"], self.trainer.params,
                          model.arrays.get("last_avg"))
        self.blocked_since = None
        hello = Message(Kind.HELLO, self.cfg.run, self.cfg.agent_id, 0, model["version"],
                        {"samples": self.trainer.samples, "first_window": model["next_window"],
                         "validation_samples": self.validator.samples,
                         "capabilities": {"fleetfl": fleetfl_version(),
                                          "protocols": list(PROTOCOL_VERSIONS),
                                          "cpus": os.cpu_count() or 1,
                                          "machine": platform.machine(),
                                          "torch": torch.__version__,
                                          "slowdown": self.cfg.slowdown,
                                          "profile": self.profile}})
        self._publish(hello)
        self.hello = hello
        self.status.set(f"joined at version {model['version']}, first window "
                        f"{model['next_window']}")
        log.info("joined at version %d, first window %d", model["version"],
                 model["next_window"])

    def _build(self, model: Message) -> None:
        try:
            job = job_from_dict(model["job"])
        except ConfigError as exc:
            raise TaskRefused(f"the coordinator's job is invalid here: {exc}") from None
        task = task_for_job(job)
        data = device_data(task, job, self.cfg, self.index, self.parts)
        # own data: each device its own mini-batch order, whatever ids the fleet has
        index = zlib.crc32(self.cfg.agent_id.encode()) % 1000 if self.cfg.data else self.index
        self.trainer = LocalTrainer(task, job, data.train, seed=job.seed * 1000 + index,
                                    slowdown=self.cfg.slowdown)
        self.validator = FederatedEvaluator(task, job, data.validation)
        self.profile = self.trainer.profile()
        if self.trainer.params.size != model["params"].size:
            raise ConfigError(f"model size mismatch: job builds {self.trainer.params.size} "
                              f"parameters, the coordinator sent {model['params'].size}")
        self.ctx = dataclasses.replace(self.ctx, model_size=self.trainer.params.size)
        self.device = make_device(job, self.cfg.run, self.cfg.agent_id,
                                  self.trainer.samples, self.trainer.layers)
        log.info("%s: task %s, training on %s, validating on %s, algorithm %s",
                 self.cfg.agent_id, job.task_fingerprint or task.label, data.train.source,
                 data.validation.source if data.validation is not None else "nothing",
                 job.algo)

    # -- main loop ----------------------------------------------------------------------
    def _handle(self, msg: Message) -> None:
        if msg.kind is Kind.STOP:
            raise Stop(msg["reason"])
        if msg.kind is Kind.AVG:
            self.progress.at_version(msg["version"])
        if msg.kind is Kind.EVALUATE:
            self.validator.submit(msg["version"], msg["params"])
            return
        if msg.kind in (Kind.AVG, Kind.SYNC, Kind.ASSIGN):
            try:
                replies = self.device.on_message(msg, self.trainer.params)
            except Rejected as exc:
                self.stats["rejected"] += 1
                log.warning("rejected %s for window %s: %s", msg.kind, msg.fields.get("window"),
                            exc)
                return
            for out in replies:
                self._publish_update(out)
            if msg.kind is Kind.AVG:
                self.status.set(f"version {msg['version']}, training window "
                                f"{self.device.window}, {self.stats['sent']} updates sent")

    def _train(self) -> None:
        while True:
            while (msg := self._next_message(timeout=None)) is not None:
                self._handle(msg)
            for report in self.validator.reports(self.cfg.run, self.cfg.agent_id):
                self._publish(report)
            if self.device.needs_resync or self._blocked_too_long():
                log.warning("lost track of the averages; resynchronising from the model")
                self._join(self._wait_for_model())
                continue
            if self.device.blocked:
                if self.device.encoder.ready(self.device.window):
                    self.blocked_since = self.blocked_since or time.monotonic()
                else:  # selection or FedPMT let us sit out: averages keep us in sync
                    self.blocked_since = None  # (no timeout while told to wait)
                msg = self._next_message(timeout=0.5)
                if msg is not None:
                    self._handle(msg)
                continue
            self.blocked_since = None
            first = self.device.encoder.trainable_from(self.device.window)
            if first is not None and first != self.trainer.first_trainable:
                self.trainer.train_suffix(first)  # FedPMT: freeze what we were not assigned
                log.info("training layer groups %d.. of %d", first, len(self.trainer.groups))
            started = time.perf_counter()
            self.trainer.step()
            self.step_seconds += time.perf_counter() - started
            self.stats["steps"] += 1
            self.progress.step(self.trainer.last_loss)
            for out in self.device.after_step(self.trainer.params):
                self._publish_update(out)

    def _publish_update(self, out: Message) -> None:
        if out.kind is Kind.UPDATE and out["steps"] > 0:
            # measured speed, so the coordinator's FedPMT deadlines follow the real load
            out.fields["step_seconds"] = self.step_seconds / out["steps"]
            self.step_seconds = 0.0
        before = self.stats["bytes_up"]
        info = self._publish(out)
        if out.kind is Kind.UPDATE:
            self.stats["sent"] += 1
            log.info("update sent agent=%s seq=%d window=%d t=%.6f", self.cfg.agent_id,
                     out.seq, out["window"], time.time())
            self.unacked.append((out.seq, info))
            self.progress.published(self.stats["bytes_up"] - before)
            log.info("sent window %d (loss %.3f, %d steps so far)", out["window"],
                     self.trainer.last_loss, self.stats["steps"])

    def _blocked_too_long(self) -> bool:
        return (self.blocked_since is not None
                and time.monotonic() - self.blocked_since > self.cfg.block_timeout)

    def run(self) -> int:
        torch.set_num_threads(self.cfg.threads)
        self.link.subscribe(self.topics.avg)
        self.link.subscribe(self.topics.ctl)
        self.link.subscribe(self.topics.refusal(self.cfg.agent_id))  # what was refused, why
        self.link.connect(timeout=self.cfg.connect_timeout)
        sd_notify.ready(f"connected to {self.link.broker}")
        ended = ""
        try:
            self._join_first()
            with self.progress.attach():
                self._train()
        except Stop as stop:
            ended = f"run ended: {stop}"
            log.info("stopping: %s (%s; %s)", stop, self.progress.summary(), self.stats)
        finally:
            if self.validator is not None:
                self.validator.close()
            # A run's end is no stop request: STOPPING=1 would make systemd deactivate the
            # unit, which RemainAfterExit=yes must keep "active (exited)" (no restart on apply)
            if ended:
                sd_notify.status(ended)
            else:
                sd_notify.stopping()
            self._publish(Message(Kind.OFFLINE, self.cfg.run, self.cfg.agent_id, 0, 0))
            self.link.close()
            self._log_acks()
            # ru_maxrss is KiB on Linux (under qemu-user: the emulator's, guest included)
            log.info("peak RSS %.0f MiB",
                     resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return 0

    def _await_acks(self, timeout: float = 10.0) -> None:
        """Let the broker have every update we sent before a hello. The hello gets a fresh
        seq, and once the coordinator has it, it refuses anything older from us as a replay;
        after a reconnect paho resends what was in flight only after its on_connect, which
        is when we say hello again, so the hello could overtake them."""
        deadline = time.monotonic() + timeout
        while self.unacked and time.monotonic() < deadline:
            self._log_acks()
            if self.unacked:
                time.sleep(0.01)

    def _log_acks(self) -> None:
        while self.unacked and _acked(self.unacked[0][1]):
            log.info("update acked agent=%s seq=%d", self.cfg.agent_id,
                     self.unacked.popleft()[0])


def _acked(info) -> bool:
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        # published while disconnected: is_published() raises on that return code, yet paho
        # sends the message after reconnecting and its PUBACK sets the same flag
        return bool(getattr(info, "_published", False))
