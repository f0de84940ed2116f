"""The coordinator: an MQTT shell around the coordinator-side state machine.

It decodes what agents send (refusing bad input with a counted reason, never crashing),
publishes the averages and the retained model the state machine emits, evaluates every new
version on the task's test set if it has one and/or asks the agents to evaluate it on their
validation data (federated.py), logs it to events.jsonl and checkpoints it.

No accepted update is lost to a kill: what changed the state is journaled (journal.py) before
the broker gets its PUBACK (manual acks), a checkpoint cuts the journal back, and `--resume`
replays it onto the checkpoint, then takes over the broker session (clean_start=False) to
receive what was queued meanwhile. Where every update went is in accounting.jsonl.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import signal
import time
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import torch

from fleetfl.coordinator.accounting import AccountingLog
from fleetfl.coordinator.durable import set_aside
from fleetfl.coordinator.federated import FederatedEvaluation, FederatedResult
from fleetfl.coordinator.fleet_view import FleetView
from fleetfl.coordinator.journal import MESSAGE, Journal, Report
from fleetfl.coordinator.ledger import ByteLedger
from fleetfl.coordinator.metrics import CoordinatorMetrics
from fleetfl.coordinator.recorder import Recorder, StopRule
from fleetfl.coordinator.rundir import (
    CHECKPOINT,
    PREVIOUS,
    Checkpoint,
    CheckpointError,
    ResumeError,
    RunDir,
)
from fleetfl.shared import sd_notify
from fleetfl.shared.config import ConfigError, RunConfig, to_dict
from fleetfl.shared.core.averaging import WindowResult
from fleetfl.shared.core.base import Rejected
from fleetfl.shared.core.messages import COORDINATOR_ID, Kind, Message, valid_id
from fleetfl.shared.core.registry import make_coordinator
from fleetfl.shared.learn.evaluator import BackgroundEvaluator
from fleetfl.shared.learn.torch_binding import bind_flat
from fleetfl.shared.net import mqtt_auth
from fleetfl.shared.net.broker_url import parse_broker_url
from fleetfl.shared.net.transport import CONNECTED, Incoming, MqttLink
from fleetfl.shared.tasks.evaluation import evaluate
from fleetfl.shared.tasks.task import fingerprint, load_task
from fleetfl.shared.wire.codec import (
    HEADER_MAX,
    MAX_STATUS_BYTES,
    CodecError,
    DecodeContext,
    decode,
    encode,
)
from fleetfl.shared.wire.layout import read_header
from fleetfl.shared.wire.signing import KeyRing, Signer
from fleetfl.shared.wire.topics import Topics

log = logging.getLogger("fleetfl.coordinator")
TICK_S = 0.2
# Updates the broker may hand us before we acknowledge them (MQTT 5 Receive Maximum; the
# broker's own default is Mosquitto's max_inflight_messages, 20). Each pass of the main loop
# journals what arrived, fsyncs once and acknowledges: with 20 in flight a 10,000-agent round
# waited for 500 fsyncs. Bounded by the bytes they may hold: 64 MiB of whole updates.
INFLIGHT_BYTES = 64 * 1024 * 1024
INFLIGHT_MIN, INFLIGHT_MAX = 20, 2000
EVAL_WAIT_S = 300
EVAL_THREADS = 1  # torch threads of the coordinator (its evaluation): see __init__
MAX_REFUSALS_KEPT = 1024
# what agents send, each on its own topic (status/<id> or up/<id>: protocol.Topics)
AGENT_KINDS = frozenset({Kind.HELLO, Kind.OFFLINE, Kind.REFUSED, Kind.UPDATE, Kind.FDA_STATE,
                         Kind.METRICS})
UNKNOWN_SENDER = "(unknown)"  # not a valid agent id, so it cannot collide with one
KIND_NAMES = frozenset(k.value for k in Kind)
# Refusals sent back (issue 18, PROTOCOL.md "Refusal replies"): a refused message that came on
# an agent's topics is answered on fl/<run>/status/<id>/refusal with its reason and seq, at
# most REPLY_BURST at once per agent, then one per REPLY_INTERVAL s, and REPLY_RATE_ALL per
# second to all agents together (made-up ids on an open broker must not make it a flood).
REPLY_BURST = 5
REPLY_INTERVAL = 2.0  # seconds
REPLY_RATE_ALL = 20.0  # replies per second, all agents together (also the burst)
REPLY_DETAIL_MAX = 200  # characters of the readable detail


class RefusalReplies:
    """The refusal replies' rate limit: token buckets per agent and for all together. Agents
    beyond MAX_REFUSALS_KEPT are forgotten oldest first (made-up ids must not grow it)."""

    def __init__(self, burst: int = REPLY_BURST, interval: float = REPLY_INTERVAL,
                 rate_all: float = REPLY_RATE_ALL, max_agents: int = MAX_REFUSALS_KEPT) -> None:
        self.burst, self.interval, self.rate_all = burst, interval, rate_all
        self.max_agents = max_agents
        # agent -> [tokens, refilled at, refusals held back since its last reply]
        self.agents: OrderedDict[str, list[float]] = OrderedDict()
        self.all_tokens, self.all_at = rate_all, None
        self.sent = self.held_back = 0

    def allow(self, agent: str, now: float) -> int | None:
        """None: no reply now (counted, and said in the agent's next reply); else the number
        of refusals held back since this agent's last reply."""
        self.all_tokens = min(self.rate_all, self.all_tokens + self.rate_all
                              * (now - (self.all_at if self.all_at is not None else now)))
        self.all_at = now
        state = self.agents.pop(agent, None)
        if state is None:
            state = [float(self.burst), now, 0]
            while len(self.agents) >= self.max_agents:
                self.agents.popitem(last=False)
        state[0] = min(self.burst, state[0] + (now - state[1]) / self.interval)
        state[1] = now
        self.agents[agent] = state  # most recently refused last
        if state[0] < 1.0 or self.all_tokens < 1.0:
            state[2] += 1
            self.held_back += 1
            return None
        state[0] -= 1.0
        self.all_tokens -= 1.0
        held, state[2] = int(state[2]), 0
        self.sent += 1
        return held


class CoordinatorRunner:
    def __init__(self, cfg: RunConfig, resume: bool | str = False,
                 accept_journal_loss: bool = False) -> None:
        """`resume`: True continues from the run dir's checkpoint (an error if there is
        none); "auto" continues if there is one and starts afresh otherwise. A run dir that
        cannot be resumed raises ResumeError; `accept_journal_loss` resumes past damage in
        the journal (its records lost) rather than refusing."""
        self.cfg = cfg
        # torch (the evaluation) on one thread, as BLAS (shared/threads.py): the cores are
        # shared with the broker and, in small fleets and demos, the agents; with torch's
        # default of one OpenMP thread per core a digits evaluation took 0.05-0.25 s instead
        # of 1 ms at load 12, its threads spinning on cores the agents needed
        # (bench/README.md, "Round overhead")
        torch.set_num_threads(EVAL_THREADS)
        self.task = load_task(cfg.job.task)
        self.model = self.task.build_model(cfg.job.seed)
        self.eval_params, self.layers = bind_flat(self.model)  # also the initial model
        cfg.job = dataclasses.replace(  # agents check the fingerprint
            cfg.job, task_fingerprint=fingerprint(self.task, self.model),
            fda_theta=cfg.job.fda_theta or self.task.fda_theta)
        data_dir = Path(cfg.data_dir) if cfg.data_dir else None
        self.test_set = self.task.test(data_dir) if self.task.test is not None else None
        federated = cfg.federated_eval == "on" or (cfg.federated_eval == "auto"
                                                   and self.test_set is None)
        self.federated = FederatedEvaluation(["loss", *self.task.metrics],
                                             cfg.window_timeout) if federated else None
        self.refusals: dict[str, str] = {}  # agent -> why it would not join (last said)
        self.replies = RefusalReplies()  # what agents are told of their refused messages
        self.core = make_coordinator(cfg, self.eval_params, self.layers)
        self.rundir = RunDir(Path(cfg.run_dir) / cfg.run)
        self.journal = Journal(self.rundir.path)
        self.accounting = AccountingLog(self.rundir.path)
        # The state machine's clock is monotonic + offset. A resumed coordinator sets the
        # offset so the clock goes on from where it stopped: downtime times out no window.
        self.clock_offset = 0.0
        self.resume_gen, self.resume_clock = 0, 0.0  # journal generation, clock to go on from
        self.to_ack: list[Incoming] = []  # handled, acknowledged once journaled (_commit)
        self.replay_refused: Counter[str] = Counter()
        self.resumed = False
        self._open_rundir(resume, accept_journal_loss)  # config.yaml: _start_rundir
        self._wire_up(cfg)
        self.rejected: Counter[str] = Counter()
        self.ledger = ByteLedger()
        self.seq = time.time_ns() // 1000
        self.started = time.monotonic()
        # events.jsonl's records and the stop rule, shared with fl-sim (recorder.py)
        self.recorder = Recorder(self.rundir, StopRule.of(cfg),
                                 lambda: time.monotonic() - self.started)
        self.evaluator = BackgroundEvaluator(self._evaluate)
        # list(): one atomic copy, as the scrape runs on the HTTP server's thread
        self.metrics = CoordinatorMetrics(
            lambda: sum(r.online for r in list(self.core.agents.values())),
            {"run": cfg.run, "algo": cfg.job.algo, "aggregate": cfg.aggregate},
            lambda: [(a, r.online) for a, r in list(self.core.agents.items())])
        tls = mqtt_auth.resolve(cfg)  # the TLS files the broker link uses (or FL_MQTT_*)
        self.metrics.certificates(tls.tls_cert, tls.tls_ca)  # their expiry
        # who the start barrier waits for (log) and STATUS= for systemd: fleet_view.py
        self.view = FleetView(cfg.min_agents, self.ctx.keys.keys if self.ctx.keys else ())

    def _wire_up(self, cfg: RunConfig) -> None:
        """Topics, the message checks and the broker link (connected by run())."""
        self.topics = Topics(cfg.run)
        self.inbox: queue.Queue[Incoming] = queue.Queue()
        # Signed messages (shared/wire/codec.py). With agent_keys every upstream message must be
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
                             manual_ack=True, durable_session=True,
                             resume_session=self.resumed,
                             auth=mqtt_auth.resolve(cfg),
                             max_packet_bytes=cfg.max_packet_bytes,
                             max_message_bytes=cfg.max_message_bytes,
                             receive_maximum=inflight_updates(self.layers.size))

    def _open_rundir(self, resume: bool | str, accept_journal_loss: bool) -> None:
        """Resume from the run dir; a fresh run empties it once it starts (_start_rundir)."""
        if resume == "auto":  # systemd's restart after a crash: go on if there is a state
            # (an unreadable checkpoint too: a fresh start would delete what is left)
            resume = self.rundir.has_checkpoint() or bool(self.journal.generations())
            log.info("--resume auto: %s", "resuming" if resume else "nothing to resume, a "
                     "fresh run")
        if resume:
            try:
                self._resume(accept_journal_loss)
            except OSError as exc:  # unreadable, not damaged: nothing to fall back on
                raise ResumeError(f"--resume: {exc}") from None

    def _start_rundir(self) -> None:
        """The broker took the connection: the run starts. Only now does a fresh run empty its
        run dir of an earlier run's files and open its journal, and config.yaml get written:
        a run that never started leaves no run dir (issue 20, item 5; _never_started)."""
        if not self.resumed:
            self.rundir.events_path.unlink(missing_ok=True)
            self.rundir.discard_checkpoints()
            self.journal.clear()
            self.accounting.reset()
            self.journal.open(0)
        self.rundir.write_config(to_dict(self.cfg))

    def _never_started(self) -> None:
        """The broker could not be reached: remove the run dir this process made (an empty
        folder); one that was there before is left as it was."""
        self.journal.close()
        if not self.resumed and self.rundir.remove_unstarted():
            log.info("run %s never started: removed its empty run dir %s", self.cfg.run,
                     self.rundir.path)

    def _resume(self, accept_journal_loss: bool) -> None:
        """Continue from the newest state that reads back whole, plus the journal after it:
        the checkpoint, else the previous one (kept on every save), else the initial model if
        the journal goes back to the start. A file passed over is said and kept aside; the
        run dir is changed only once the resume is sure to go ahead."""
        name, ckpt, gen, passed_over = self._resume_base(accept_journal_loss)
        report = self.journal.inspect(gen)
        if (report.damage or report.missing) and not accept_journal_loss:
            raise ResumeError(
                f"--resume: the journal of {self.rundir.path} is damaged: {_damage(report)}. "
                "Those records were acknowledged to their senders; nothing was changed. To "
                "resume without them: fl-coordinator --resume --accept-journal-loss (the "
                "damaged files are kept as *.damaged)")
        if ckpt is not None:  # else killed before version 1: the journal from the start
            params, state = ckpt
            try:
                self.core.load_state(state, params)
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                raise ResumeError(f"--resume: {name} does not fit this coordinator "
                                  f"({type(exc).__name__}: {exc})") from None
            self.resume_clock = state.get("shell", {}).get("clock", 0.0)
        self.resume_gen = self.journal.checkpoint_gen = gen
        # -- from here on the run dir changes ------------------------------------------------
        for bad, why in passed_over:
            kept = set_aside(self.rundir.path / bad)
            log.error("--resume: %s cannot be read back (%s): kept as %s", bad, why,
                      kept.name)
        if name != CHECKPOINT and (passed_over or name == PREVIOUS):
            log.warning("--resume: no usable %s: resuming from %s (version %d) and the "
                        "journal", CHECKPOINT, name or "the initial model", self.core.version)
        for torn in report.torn:
            log.warning("--resume: dropped the torn end of the journal, %s: a record cut by "
                        "the kill, never acknowledged", torn)
        if report.damage or report.missing:
            kept = [self.journal.salvage(g).name for g in sorted({d.gen for d in report.damage})]
            log.error("--resume --accept-journal-loss: %s of the journal lost (%s); the "
                      "damaged files are kept as %s", report.lost_text(), _damage(report),
                      ", ".join(kept) or "(none: generations missing)")
        # lines past the checkpoint go: the journal replay logs those versions again
        self.rundir.truncate_events(self.core.version)
        self.resumed = True
        log.info("resumed at version %d from %s and the journal from generation %d, in %s",
                 self.core.version, name or "the initial model", gen, self.rundir.path)

    def _resume_base(self, accept_journal_loss: bool
                     ) -> tuple[str, Checkpoint | None, int, list[tuple[str, str]]]:
        """(checkpoint file or "" for the initial model, its (params, state) or None, the
        journal generation to replay from, [(file, why)] of the unreadable checkpoints)."""
        passed_over: list[tuple[str, str]] = []
        problems: list[str] = []
        gapped: tuple[str, Checkpoint, int] | None = None  # readable, but generations gone
        for name in (CHECKPOINT, PREVIOUS):
            try:
                ckpt = self.rundir.load_checkpoint(name)
            except CheckpointError as exc:
                passed_over.append((name, str(exc)))
                problems.append(f"{name}: {exc}")
                continue
            if ckpt is None:
                problems.append(f"{name}: not there")
                continue
            params, state = ckpt
            if params.size != self.layers.size:  # a changed config, not a damaged file
                raise ResumeError(f"--resume: {name} holds {params.size} parameters, the "
                                  f"configured model {self.layers.size}: not this run's")
            gen = state.get("shell", {}).get("journal", 0)
            missing = self.journal.missing(gen)
            if not missing:
                return name, ckpt, gen, passed_over
            problems.append(f"{name} (version {state['version']}): journal generation(s) "
                            f"{missing} it needs are gone")
            gapped = gapped or (name, ckpt, gen)
        if not self.journal.missing(0) and 0 in self.journal.generations():
            return "", None, 0, passed_over  # killed before its first checkpoint
        if gapped is not None and accept_journal_loss:
            return *gapped, passed_over
        if not self.rundir.has_checkpoint() and not self.journal.generations():
            raise ConfigError(f"--resume: no checkpoint in {self.rundir.path}")
        problems.append("the journal does not go back to the start of the run")
        raise ResumeError(f"--resume: nothing in {self.rundir.path} to resume from: "
                          + "; ".join(problems) + ". The files are left as they are: restore "
                          "one, or start the run afresh (without --resume)")

    def _replay(self) -> list[Message]:
        """Feed the journal since the checkpoint through the same state machine, on the
        clock values it was first seen at: the same inputs in the same order give the same
        versions, bit for bit. Returns what they caused, to publish once connected."""
        # checked when they arrived; their age now is no reason to refuse them
        ctx = dataclasses.replace(self.ctx, ageless=frozenset(Kind))
        outputs: list[Message] = []
        last, count = self.resume_clock, 0
        self.clock_offset = 0.0  # entries carry the state machine's clock
        for entry in self.journal.entries(self.resume_gen):
            if entry.kind == MESSAGE:
                outputs += self._handle(Incoming(entry.topic, entry.payload, entry.retain,
                                                 at=entry.at), replay_ctx=ctx)
            else:  # a window closed on the clock
                outputs += self.core.on_tick(entry.at)
            last, count = max(last, entry.at), count + 1
        self.clock_offset = last - time.monotonic()
        self.journal.open(max([self.resume_gen, *self.journal.generations()]))
        log.info("replayed %d journal records: version %d, %d updates pending%s", count,
                 self.core.version, sum(len(p) for p in self.core.pending.values()),
                 f", refused again {dict(self.replay_refused)}" if self.replay_refused else "")
        return outputs

    def _now(self) -> float:
        return time.monotonic() + self.clock_offset

    # -- publishing ---------------------------------------------------------------------
    def _publish(self, msg: Message) -> None:
        if not _finite(msg.arrays):
            # the core checks every average (averaging.py), so this is a bug, not an agent:
            # agents would refuse it and resync from it forever (issue 14)
            log.critical("NOT publishing %s of version %s: it holds NaN or Inf", msg.kind,
                         msg.fields.get("version", msg.base_version))
            self.rejected["not_finite_out"] += 1
            return
        self.seq += 1
        msg.seq = self.seq
        topic, retain = self.topics.for_outgoing(msg)
        payload = encode(msg, self.signer, proto=self.cfg.protocol)  # the run's version
        if msg.kind is Kind.MODEL:
            self.model_at = time.monotonic()
        # a refusal reply goes to one agent, everything else to every agent online
        recipients = [self._known(msg["agent"])] if msg.kind is Kind.REFUSAL else self._online()
        self.ledger.down(msg.kind, len(payload), recipients)
        self.metrics.published(msg.kind, len(payload))
        self.link.publish(topic, payload, retain=retain)

    def _online(self) -> list[str]:
        return [a for a, r in self.core.agents.items() if r.online]

    # -- incoming -----------------------------------------------------------------------
    def _handle(self, item: Incoming, replay_ctx: DecodeContext | None = None
                ) -> list[Message]:
        """Check and apply one message; journal it if it changed the state, publish what it
        caused. With `replay_ctx` (a journal replay) return that instead of publishing."""
        if item.topic == CONNECTED:
            self._publish(self.core.model_message())  # (re)publish the retained model
            return []
        replay = replay_ctx is not None
        if not replay:
            self.to_ack.append(item)  # refused or applied: acknowledged after the batch
        sender = self.topics.sender_of(item.topic)
        if sender is None or (not item.payload and "/status/" in item.topic):
            return []  # not ours, or a cleared retained status (an empty update is refused)
        now = item.at + self.clock_offset
        msg = None
        try:
            msg = decode(item.payload, replay_ctx or self.ctx)
            if msg.sender != sender:
                raise Rejected("sender_mismatch", f"{msg.sender!r} wrote on {item.topic}")
            if msg.kind in AGENT_KINDS and self.topics.for_outgoing(msg)[0] != item.topic:
                raise Rejected("wrong_topic", f"{msg.kind} on {item.topic}")
            if msg.kind in (Kind.METRICS, Kind.REFUSED):  # reports, not state: not journaled
                self._on_report(msg)
                self.ledger.up(self._known(sender), msg.kind, len(item.payload))
                return []
            outputs = self.core.on_message(msg, now)
        except (CodecError, Rejected) as exc:
            self._refused(item, sender, msg, exc, replay)
            return []
        if not replay:  # before its PUBACK, and before anything it caused is published
            self.journal.append_message(now, item.topic, item.payload, item.retain)
        if msg.kind is Kind.UPDATE:
            self.accounting.update(msg, "accepted")
        self.ledger.up(self._known(sender), msg.kind, len(item.payload))
        step_s = msg.fields.get("step_seconds") if msg.kind is Kind.UPDATE else None
        self.metrics.received(msg.kind, len(item.payload), sender, msg.base_version, step_s)
        if msg.kind is Kind.HELLO:
            build = msg.fields.get("capabilities", {}).get("fleetfl")
            log.info("agent %s online (%d samples, from window %d, fleetfl %s)", sender,
                     msg["samples"], msg["first_window"],
                     _printable(build, 40) if isinstance(build, str) else "unknown")
        elif msg.kind is Kind.OFFLINE and not item.retain:  # a retained one is old news
            log.warning("agent %s offline (its last will: the connection dropped, or it "
                        "stopped)", sender)
        if replay:
            return outputs
        if outputs:
            self.journal.sync()  # what we publish must be replayable after a power cut
        for out in outputs:
            self._publish(out)
        return []

    def _refused(self, item: Incoming, sender: str, msg: Message | None,
                 exc: CodecError | Rejected, replay: bool) -> None:
        """Count, log and answer a refused message (a replayed one was counted before)."""
        if msg is not None and msg.kind is Kind.UPDATE:
            self.accounting.update(msg, "refused", exc.reason)
        if replay:  # already covered by the checkpoint
            self.replay_refused[exc.reason] += 1
            return
        if item.retain and exc.reason == "replayed":
            return  # the broker's stored status, sent again as we (re)subscribed
        self.rejected[exc.reason] += 1
        self.ledger.up(self._known(sender), None, len(item.payload))
        self.metrics.refused(exc.reason, len(item.payload))
        log.warning("rejected message from %s: %s", sender, exc)
        seq, kind = (msg.seq, str(msg.kind)) if msg is not None else _peek(item.payload)
        self._reply_refusal(sender, exc.reason, exc.detail, seq, kind)

    def _reply_refusal(self, agent: str, reason: str, detail: str, seq: int,
                       kind: str) -> None:
        """Tell `agent` (the id its topic names) that a message of its was refused, unless
        the rate limit holds the reply back (it is counted in the next one)."""
        if not valid_id(agent) or agent == COORDINATOR_ID:
            return
        held = self.replies.allow(agent, time.monotonic())
        if held is None:
            return
        self._publish(Message(Kind.REFUSAL, self.cfg.run, COORDINATOR_ID, 0, self.core.version,
                              {"agent": agent, "reason": reason, "seq": seq,
                               "refused_kind": kind,
                               "detail": _printable(detail, REPLY_DETAIL_MAX),
                               "suppressed": held}))

    def _on_report(self, msg: Message) -> None:
        if msg.kind is Kind.REFUSED:
            reason = _printable(msg["reason"])
            if self.refusals.get(msg.sender) != reason:  # the retained copy comes back
                log.error("%s: %s", msg.sender, reason)
            if len(self.refusals) >= MAX_REFUSALS_KEPT and msg.sender not in self.refusals:
                self.refusals.pop(next(iter(self.refusals)))  # made-up ids must not grow it
            self.refusals[msg.sender] = reason
            return
        if self.federated is None:
            raise Rejected("unasked_metrics", "federated evaluation is off")
        record = self.core.agents.get(msg.sender)
        declared = record.validation_samples if record is not None else 0
        self.federated.report(msg, declared)

    def _commit(self) -> None:
        """fsync the batch's journal records, then acknowledge its messages: a PUBACK says
        the update survives a kill or a power cut (journal.py: the cost)."""
        self.journal.sync()
        for item in self.to_ack:
            self.link.ack(item)
        self.to_ack.clear()

    def _tick(self) -> None:
        now = self._now()
        with self.inbox.mutex:  # an update already here but not yet handled is not late:
            if self.inbox.queue:  # windows close on arrival times, as updates are judged
                now = min(now, self.inbox.queue[0].at + self.clock_offset)
        outputs = self.core.on_tick(now)
        if outputs:  # a window closed on the clock: an input the replay must see too
            self.journal.append_tick(now)
            self.journal.sync()
        for out in outputs:
            self._publish(out)

    def _known(self, sender: str) -> str:
        # Senders that never said hello share one ledger row: a flood of made-up topic ids
        # must not grow the coordinator's memory or every events.jsonl line.
        return sender if sender in self.core.agents else UNKNOWN_SENDER

    # -- per version --------------------------------------------------------------------
    def _evaluate(self, params) -> dict[str, float]:
        """On the evaluator's thread: the only user of self.model and self.eval_params."""
        self.eval_params[:] = params
        return evaluate(self.task, self.model, self.test_set)

    def _request_evaluations(self, version: int) -> None:
        """Central and/or federated evaluation of `version`; results are logged when they are
        ready (_collect_evaluations). The model is kept for fl-export --version."""
        self.rundir.save_model(version, self.core.params)
        if self.test_set is not None:
            self.evaluator.submit(version, self.core.params,
                                  keep=version >= self.cfg.max_versions)
        if self.federated is not None:
            self.federated.request(version, set(self._online()), time.monotonic())
            self._publish(Message(Kind.EVALUATE, self.cfg.run, COORDINATOR_ID, 0, version,
                                  {"version": version}, {"params": self.core.params}))

    def _record_results(self) -> None:
        """Log the versions the state machine published (evaluating those due), then
        checkpoint once."""
        event = None
        while self.core.results:
            result = self.core.results.pop(0)
            event = self._record(result, evaluate_now=self.recorder.stop.due(result.version))
        if event is not None:
            self._checkpoint()

    def _record(self, result: WindowResult, evaluate_now: bool) -> dict:
        for sender, reason in result.refused.items():  # accepted, then left out of the average
            self.rejected[reason] += 1
            self.metrics.refused(reason, 0)
            self.accounting.outcome((sender, result.seqs.get(sender, -1), result.window),
                                    "refused", reason)
            log.warning("left %s's update out of version %d: %s", sender, result.version,
                        reason)
            self._reply_refusal(sender, reason, f"left out of version {result.version}: it "
                                f"would move a parameter beyond max_param "
                                f"{self.cfg.max_param:g}", result.seqs.get(sender, -1),
                                str(Kind.UPDATE))
        if evaluate_now:
            self._request_evaluations(result.version)
        event = self.recorder.version(result, len(self._online()),
                                      dict(self.rejected + self.link.refusals()), self.ledger)
        self.metrics.record(event)  # its evaluation comes later (_collect_evaluations)
        return event

    def _collect_evaluations(self, force: bool = False) -> None:
        for ev in self.evaluator.results():
            self.recorder.evaluated(ev.version, ev.values, ev.seconds)
            self.metrics.evaluated(ev.loss, ev.accuracy)
            log.info("version %d: %s (evaluated in %.2f s)", ev.version,
                     _format_values(ev.values), ev.seconds)
        if self.federated is None:
            return
        for fed in self.federated.closed(time.monotonic(), force):
            self._log_federated(fed)

    def _log_federated(self, fed: FederatedResult) -> None:
        # without a central test set the federated metric is the run's measure
        self.recorder.federated(fed, measure=self.test_set is None)
        self.metrics.evaluated_federated(fed.values.get("loss"), fed.values.get("accuracy"),
                                         fed.samples)
        log.info("version %d: federated %s over %d samples from %d agents%s", fed.version,
                 _format_values(fed.values) or "(no validation data)", fed.samples,
                 fed.reporters, f", {fed.missing} did not answer" if fed.missing else "")

    def _await_federated(self, wait: float) -> None:
        """Let the agents answer the last evaluation requests (they stop with STOP)."""
        deadline = time.monotonic() + min(wait, self.cfg.window_timeout)
        aside: list[Incoming] = []  # updates: the run is over, they stay unhandled
        while self.federated is not None and self.federated.waiting() \
                and time.monotonic() < deadline:
            try:
                item = self.inbox.get(timeout=TICK_S)
            except queue.Empty:
                continue
            if _is_metrics(item, self.ctx):
                self._handle(item)
                self._commit()
                self._collect_evaluations()
            else:
                aside.append(item)
        for item in aside:
            self.inbox.put(item)

    def _checkpoint(self) -> None:
        """After the versions' event lines: killed in between, the coordinator drops those
        lines on resume and the journal replay writes them again. The checkpoint names the
        journal generation after it; older ones are covered and deleted."""
        if not _finite({"params": self.core.params}):  # --resume would restore it
            log.critical("NOT checkpointing version %d: the model holds NaN or Inf; the "
                         "previous checkpoint stays", self.core.version)
            self.rejected["not_finite_out"] += 1
            return
        gen = self.journal.gen + 1
        state = {**self.core.state(), "shell": {"journal": gen, "clock": self._now()}}
        self.rundir.save_checkpoint(self.core.params, state)
        self.journal.rotate(gen)

    def _unhandled_at_stop(self) -> None:
        """Record the updates left in the inbox (not acknowledged: the broker keeps them)."""
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return
            if "/up/" not in item.topic:
                continue
            try:
                msg = decode(item.payload, self.ctx)
            except CodecError:
                continue
            if msg.kind is Kind.UPDATE:
                self.accounting.update(msg, "unhandled")

    def _done(self) -> str | None:
        return self.recorder.stop_reason(self.core.version)

    def run(self) -> int:
        terminated: list[int] = []

        def on_term(signum, frame):
            # a flag, not an exception: one raised between applying a message and journaling
            # it would leave an update neither journaled nor acknowledged (the loop sees the
            # flag within TICK_S)
            terminated.append(signum)

        signal.signal(signal.SIGTERM, on_term)
        replayed = self._replay() if self.resumed else []
        # Agents retain only their status, and that is small: anything else retained on
        # their topics is data parked in the broker (issue 14), cleared by the link.
        self.link.subscribe(self.topics.up_all, max_retained_bytes=0)
        self.link.subscribe(self.topics.status_all, max_retained_bytes=MAX_STATUS_BYTES)
        try:
            self.link.connect()
        except BaseException:  # BrokerUnreachable, or stopped while connecting
            self._never_started()
            raise
        self._start_rundir()
        for out in replayed:  # the killed coordinator may not have got them out
            self._publish(out)
        self.metrics.serve(self.cfg.metrics_port)
        sd_notify.ready(f"run {self.cfg.run} on {self.link.broker}")
        log.info("run %s: %s on %s, model %s (%d parameters), waiting for agents on %s",
                 self.cfg.run, self.cfg.job.algo, self.cfg.job.task, self.cfg.job.task_fingerprint,
                 self.layers.size, self.link.broker)
        reason = None
        try:
            while reason is None:
                if terminated:
                    raise KeyboardInterrupt
                sd_notify.watchdog()
                self._serve_once()
                reason = self._done()
        except KeyboardInterrupt:
            reason = "interrupted"
        return self._stop(reason)

    def _serve_once(self) -> None:
        """One pass of the main loop: what arrived, the clock, then the versions it made."""
        try:
            self._handle(self.inbox.get(timeout=TICK_S))
            for _ in range(self.inbox.qsize()):  # what queued up meanwhile
                self._handle(self.inbox.get_nowait())
        except queue.Empty:
            pass
        self._commit()
        self._tick()
        if self.signer is not None and \
                time.monotonic() - self.model_at > self.cfg.max_message_age / 3:
            # re-sign the retained model while idle, or a joiner would refuse it as
            # too old (agents check its ts like every signed message's)
            self._publish(self.core.model_message())
        self.view.tick(self.core, self._now(), self.recorder.stop.last_accuracy)
        self._record_results()  # after the view: it looks for a short-handed version 1
        self._collect_evaluations()

    def _stop(self, reason: str) -> int:
        """Log the last evaluations, tell the agents to stop, close everything."""
        # the last version's accuracy belongs in the log (its evaluation may still run)
        wait = EVAL_WAIT_S if reason != "interrupted" else 10  # a stop request is urgent
        if not self.evaluator.wait_idle(wait):
            log.warning("the last evaluation did not finish within %d s", wait)
        self._await_federated(wait if reason != "interrupted" else 0)
        self._collect_evaluations(force=True)
        self.evaluator.close()
        stopped_at = time.time()
        # STOPPING=1 only for a stop request: a finished run stays "active (exited)"
        if reason == "interrupted":
            sd_notify.stopping(reason)
        else:
            sd_notify.status(reason)
        self._publish(Message(Kind.STOP, self.cfg.run, COORDINATOR_ID, 0, self.core.version,
                              {"reason": reason}))
        self.link.close()
        self._unhandled_at_stop()
        self.accounting.stop(stopped_at)
        self.journal.close()
        self.metrics.close()
        log.info("stopped: %s; version %d, best accuracy %.4f, rejected %s", reason,
                 self.core.version, self.recorder.stop.best_accuracy,
                 dict(self.rejected) or "none")
        return 0 if reason != "interrupted" else 130


def _finite(arrays: dict) -> bool:
    """Every value finite as it goes on the wire (float32: 1e39 in float64 is Inf there)."""
    with np.errstate(over="ignore"):
        return all(np.isfinite(np.asarray(a, dtype=np.float32)).all() for a in arrays.values())


def _damage(report: Report) -> str:
    spans = [str(d) for d in report.damage[:5]] + (["..."] if len(report.damage) > 5 else [])
    if report.missing:
        spans.append(f"generation(s) {report.missing} missing")
    return f"{report.lost_text()} unreadable: " + "; ".join(spans)


def _format_values(values: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in values.items())


def _printable(text: str, limit: int = 300) -> str:
    """An agent's free text as one log line: no control characters, bounded length."""
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return clean if len(clean) <= limit else clean[:limit] + "..."


def _peek(payload: bytes) -> tuple[int, str]:
    """(seq, kind) of a message the codec refused, as far as its header can be read; -1 and
    "" for what cannot (a refusal reply still names the reason)."""
    try:
        _, head, _ = read_header(payload, HEADER_MAX)  # either layout version
    except CodecError:
        return -1, ""
    if not isinstance(head, dict):
        return -1, ""
    seq, kind = head.get("seq"), head.get("kind")
    seq = seq if isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq < 2**64 else -1
    return seq, kind if isinstance(kind, str) and kind in KIND_NAMES else ""


def inflight_updates(params: int) -> int:
    """The Receive Maximum for a model of `params` parameters (a float32 update of 4 bytes
    each): 2,000 for the built-in MLPs, 20 (the broker's default) from 3.4 MB updates on."""
    return max(INFLIGHT_MIN, min(INFLIGHT_MAX, INFLIGHT_BYTES // (4 * params + 1024)))


def _is_metrics(item: Incoming, ctx: DecodeContext) -> bool:
    if "/up/" not in item.topic:
        return False
    try:
        return decode(item.payload, ctx).kind is Kind.METRICS
    except CodecError:
        return False
