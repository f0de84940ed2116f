"""fl-conformance: walk a device (agent) under test through PROTOCOL.md over a real broker.

The checker plays the coordinator itself (conformance_session.py), so it can send crafted
messages and check the device's exact replies: a job it must refuse, the join and hello, rounds
of each timing the device claims, windows it is told to sit out (participant selection, in a
run of its own), averages it must be able to read (a 130 KB header, an unknown top-level key,
chunks), messages it must ignore, a late joiner, the last will, a restarted device's sequence
numbers, a broker restart, the MQTT settings in the broker's log, and stop. Each step is a row:
PASS, FAIL (what broke, which section) or SKIP (why).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from fleetfl.coordinator.conformance_session import Failed, Plan, Session
from fleetfl.coordinator.conformance_wire import bad_downlink
from fleetfl.shared.core.job import ConfigError, JobConfig, job_to_dict, job_with
from fleetfl.shared.core.messages import (
    COORDINATOR_ID,
    PROTOCOL_VERSION,
    PROTOCOL_VERSIONS,
    Kind,
    Message,
)
from fleetfl.shared.core.pmt import SITS_OUT
from fleetfl.shared.core.selection import in_force
from fleetfl.shared.core.version import add_version_flag
from fleetfl.shared.devtools.local_broker import BrokerError, LocalMosquitto
from fleetfl.shared.flags import HelpFormatter
from fleetfl.shared.net.transport import BrokerUnreachable

TIMINGS = {"round": "fedavg", "delayed": "dga", "fda": "fda"}  # timing -> the job's algo
FIRST, SECOND = "dut-a", "dut-b"  # the devices' ids


class Broker(Protocol):
    """A broker the checker may restart and whose log it reads (LocalMosquitto, or the
    tests' container broker)."""

    url: str

    def restart(self) -> object: ...

    def log_text(self) -> str: ...


class Skipped(Exception):
    """A step that cannot run here; the row's detail says why."""


@dataclass
class Row:
    step: str
    result: str  # PASS, FAIL or SKIP
    detail: str
    seconds: float = 0.0


# -- steps: each returns its detail, raises Failed or Skipped ----------------------------------
def refuse_job(s: Session, broker: Broker | None) -> str:
    bad = dict(s.plan.job, local_steps=0)
    s.publish_model(bad)
    s.start_device(FIRST)
    msg, _ = s.await_kind(Kind.REFUSED, FIRST, s.plan.join_timeout)
    if msg["task"] != bad["task_fingerprint"]:
        raise Failed(f"the refused status names task {msg['task']!r}, the job "
                     f"{bad['task_fingerprint']!r} (section 13.2)")
    return f"refused local_steps 0 in a refused status: {msg['reason'][:70]!r}"


def join(s: Session, broker: Broker | None) -> str:
    s.publish_model()
    if FIRST not in s.devices:
        s.start_device(FIRST)
    hello, _ = s.await_kind(Kind.HELLO, FIRST, s.plan.join_timeout)
    return (f"hello at base_version {hello.base_version}, first_window "
            f"{hello['first_window']} (the model's version and next_window), "
            f"{hello['samples']} samples, layout {s.plan.protocol}")


def rounds(s: Session, broker: Broker | None) -> str:
    first = s.next_window
    versions = [s.window() for _ in range(3)]
    s.collect(s.next_window)  # its next update shows the last average applied
    return (f"windows {first}..{first + 2} -> versions {versions[0]}..{versions[-1]}; every "
            "message checked (window, base_version, seq, samples, steps, size, finite)")


def selection(s: Session, broker: Broker | None) -> str:
    """Participant selection (section 14.5), in a run of its own whose job has `select` 1:
    the device, told to sit two windows out, and SECOND, never started, selected for those.
    Told as a coordinator does: two windows ahead, on its hello, naming only the changes."""
    plan = replace(s.plan, run=f"{s.run}-sel", job=dict(s.plan.job, select=1.0))
    work = s.workdir / plan.run
    work.mkdir(parents=True, exist_ok=True)
    sub = Session(s.broker_url, s.template, plan, work)
    first = sub.next_window
    out = {first + 1, first + 2}  # the windows FIRST sits out
    decided = first + 1

    def tell(names: list[str], start: int, end: int, always: str = "") -> None:
        for window in range(start, end + 1):
            wanted = {a: SITS_OUT if (a == FIRST) == (window in out) else 0 for a in names}
            changed = {a: f for a, f in wanted.items() if (a == always and window == start)
                       or in_force(sub.assigned.get(a, []), window) != f}
            if changed:
                sub.assign(window, changed)

    # a hello (a join, a resynchronisation) is answered with the windows decided from it on
    sub.on_hello = lambda hello: tell([hello.sender], hello["first_window"], decided,
                                      always=hello.sender)
    try:
        sub.publish_model()
        sub.start_device(FIRST)
        sub.await_kind(Kind.HELLO, FIRST, plan.join_timeout)
        started = time.monotonic()
        last = sub.collect(first)[FIRST]
        wait = max(0.3, 3 * (time.monotonic() - started))  # 3 times its window, at least
        for window in range(first, first + 3):
            decided = window + 2
            tell([FIRST, SECOND], decided, decided)
            # a window FIRST sat out: as if SECOND had sent what FIRST sent last
            sub.publish_avg(window, {SECOND if window in out else FIRST: last})
            if window + 1 not in out:
                last = sub.collect(window + 1)[FIRST]  # its base_version: averages applied
                continue
            sub.linger(wait / 2)  # nothing may come
            if sub.algo == "fda":  # SECOND's trigger, which FIRST must ignore
                sub.sync(window + 1)
            sub.linger(wait / 2)
        stop(sub, broker)
    finally:
        sub.close()
    silent = "no state, the sync ignored" if sub.algo == "fda" else "nothing sent"
    return (f"select 1: sat out windows {first + 1}..{first + 2} ({silent}), applied their "
            f"averages (version {sub.version_of[first + 2]} the base_version of its update "
            f"for window {first + 3}) and trained the windows it was selected for")


def evaluate(s: Session, broker: Broker | None) -> str:
    version = s.version
    s.publish(Message(Kind.EVALUATE, s.run, COORDINATOR_ID, s.next_seq(), version,
                      {"version": version}, {"params": s.params}))
    msg, _ = s.await_kind(Kind.METRICS, FIRST, s.plan.timeout)
    samples, values = msg["samples"], msg["values"]
    limit = s.agents[FIRST].hello.fields.get("validation_samples", 0)
    names = {"loss", *s.plan.metrics}
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                  and abs(v) <= 1e9 for v in values.values())
    if (msg.base_version, msg["version"]) != (version, version) or not 0 <= samples <= limit \
            or not numbers or (set(values) != names and (samples > 0 or values)):
        raise Failed(f"metrics with base_version {msg.base_version}, version {msg['version']} "
                     f"(asked {version}), {samples} samples (hello: at most {limit}), values "
                     f"{values} (expected {sorted(names)}, finite: section 13.5)")
    return f"metrics for version {version}: {samples} samples, {sorted(values) or 'none'}"


def variant(kind: str, what: str) -> Callable[[Session, Broker | None], str]:
    def step(s: Session, broker: Broker | None) -> str:
        version = s.window(kind)
        s.collect(s.next_window)
        return f"applied {what} (version {version} is the next update's base_version)"
    return step


def bad_messages(s: Session, broker: Broker | None) -> str:
    window = s.next_window
    s.collect(window)  # the devices now wait for this window's average
    marker = s.version + 1000
    bads = bad_downlink(s.run, s.seq, window, s.params.size, s.plan.protocol, s.topics, FIRST,
                        marker)
    s.markers = set(range(marker, marker + len(bads) + 1))
    sent: list[str] = []
    try:
        for bad in bads:
            for topic, payload in bad.parts:
                s.publish_raw(topic, payload)
            sent.append(bad.why)
            s.quiet(0.005)  # a device that dies is seen near what killed it
        s.quiet(1.5)
    except Failed as exc:
        raise Failed(f"{exc} (after: {'; '.join(sent[-3:])})") from None
    version = s.window()
    s.collect(s.next_window)
    return (f"{len(bads)} messages ignored (wrong run, types, fields, sizes, NaN, chunks, "
            f"golden invalid vectors...); the next average (version {version}) applied")


def late_join(s: Session, broker: Broker | None) -> str:
    window = s.next_window
    s.collect(window)
    s.start_device(SECOND)
    hello, _ = s.await_kind(Kind.HELLO, SECOND, s.plan.join_timeout)
    s.window()
    s.window()
    s.collect(s.next_window)
    return (f"{SECOND} joined at version {hello.base_version}, window {window} while "
            f"{FIRST} waited; windows {window}..{window + 1} averaged from both")


def last_will(s: Session, broker: Broker | None) -> str:
    agent = s.agents[SECOND]
    s.released(SECOND)
    s.devices[SECOND].kill()
    will = s.await_offline([SECOND], 10.0)[SECOND]
    for updates in s.pending.values():
        updates.pop(SECOND, None)
    first_hello = agent.first_hello_seq
    if will.base_version != 0 or not will.seq < first_hello:
        raise Failed(f"the will has base_version {will.base_version}, seq {will.seq}: 0 and "
                     f"below the hello's {first_hello} (encoded at start: sections 3.4, 10)")
    listed = agent.hello.fields.get("capabilities", {}).get("protocols", [1])  # a list (hello)
    newest = max((p for p in listed if type(p) is int), default=1)
    if will.proto != newest:
        raise Failed(f"the will is in protocol {will.proto}, not the newest the device lists "
                     f"in its hello ({newest}): encoded before any model (section 3.4)")
    return (f"SIGKILL: the broker published its offline will (retained, seq {will.seq}, "
            f"protocol {will.proto})")


def restart_device(s: Session, broker: Broker | None) -> str:
    agent = s.agents[SECOND]
    before = max([agent.last_seq, *(m.seq for m in agent.offlines)])
    agent.last_seq = before  # the restarted process must number above all of these
    s.start_device(SECOND)
    hello, _ = s.await_kind(Kind.HELLO, SECOND, s.plan.join_timeout)
    s.window()
    s.collect(s.next_window)
    return (f"restarted {SECOND}: hello seq {hello.seq} > {before}, the largest it used "
            "before (section 10); rejoined and sent its update")


def broker_restart(s: Session, broker: Broker | None) -> str:
    if broker is None:
        raise Skipped("--broker given: the checker cannot restart that broker")
    window = s.next_window
    s.collect(window)  # every device waits for this window's average
    online = sorted(s.expected(window))
    hellos = {a: s.agents[a].hellos for a in online}
    broker.restart()
    s.await_reconnect(30.0)
    s.pending.pop(window, None)  # the restarted broker lost the state: devices resynchronise
    s.publish_model()
    s.window()
    s.window()
    s.collect(s.next_window)
    silent = [a for a in online if s.agents[a].hellos <= hellos[a]]
    if silent:
        raise Failed(f"{', '.join(silent)} sent no hello after reconnecting (section 13.4)")
    return (f"{', '.join(online)} reconnected, said hello again with a fresh seq, "
            f"resynchronised from the model and sent windows {window}..{window + 1}")


CONNECT = re.compile(r"New client connected from \S+ as (\S+) \(p(\d+), c(\d), k(\d+)")


def mqtt_settings(s: Session, broker: Broker | None) -> str:
    if broker is None:
        raise Skipped("--broker given: the checker cannot read that broker's log")
    seen = [m.groups() for m in CONNECT.finditer(broker.log_text())]
    notes = []
    for agent in sorted(s.agents):
        mine = [(p, c, k) for cid, p, c, k in seen if cid == f"fl-{s.run}-{agent}"]
        if not mine:
            raise Failed(f"no connection with client id fl-{s.run}-{agent} in the broker's "
                         "log (section 3.1)")
        if mine[0][1] != "1":
            raise Failed(f"{agent}'s first connection has clean start 0 (section 3.1: 1)")
        notes.append(f"{agent}: {len(mine)} connections, MQTT "
                     f"{'5' if mine[0][0] == '5' else '3.1.1'}, keepalive {mine[0][2]} s")
    reconnects = [c for cid, _, c, _ in seen if cid == f"fl-{s.run}-{FIRST}"][1:]
    if "1" in reconnects:
        raise Failed(f"{FIRST} reconnected with clean start 1 (section 3.1: 0 on reconnects)")
    return "; ".join(notes) + "; clean start 1 first, 0 on reconnects"


def stop(s: Session, broker: Broker | None) -> str:
    running = [a for a, d in s.devices.items() if d.exited() is None]
    if not running:
        raise Skipped("no device is running")
    for agent in running:
        s.released(agent)
    started = time.monotonic()
    s.stop_run("fl-conformance: done")
    last = {a: s.agents[a].last_seq for a in running}
    for agent, msg in s.await_offline(running, 10.0).items():
        if msg.seq <= last[agent]:
            raise Failed(f"{agent}'s offline has seq {msg.seq}, not above {last[agent]} "
                         "(section 10)")
    for agent in running:
        code = s.devices[agent].wait(max(1.0, 10.0 - (time.monotonic() - started)))
        if code != 0:
            raise Failed(f"{agent} exited with code {code} after stop (13.6: exit cleanly)")
    return (f"{', '.join(running)}: offline (retained), then exit 0, in "
            f"{time.monotonic() - started:.1f} s")


SELECTION = ("sits out when told (select)", selection)
FULL = [("refuses an invalid job", refuse_job), ("join", join), ("rounds", rounds), SELECTION,
        ("answers evaluate", evaluate),
        ("reads a 130 KB avg header", variant("large_header", "an avg of 2,000 contributors")),
        ("ignores unknown top-level keys", variant("unknown_key", "an avg with a later key")),
        ("reassembles a chunked avg", variant("chunked", "an avg in 4 KiB chunks")),
        ("ignores bad messages", bad_messages), ("late join", late_join),
        ("last will", last_will), ("restart: seq grows", restart_device),
        ("broker restart", broker_restart), ("MQTT settings", mqtt_settings)]
SHORT = [("join", join), ("rounds", rounds), SELECTION]


# -- sessions ---------------------------------------------------------------------------------
def task_model(task: str, seed: int) -> tuple[np.ndarray, str, tuple[str, ...]]:
    """The task's initial parameters at `seed`, its fingerprint (section 12) and the names of
    its metrics."""
    from fleetfl.shared.learn.torch_binding import bind_flat  # torch: only when checking
    from fleetfl.shared.tasks.task import fingerprint, load_task

    found = load_task(task)
    model = found.build_model(seed)
    params, _ = bind_flat(model)
    return params.copy(), fingerprint(found, model), tuple(found.metrics)


def job_for(timing: str, task: str, fingerprint: str, seed: int) -> dict:
    """A short job of `timing`: 5 local steps a round, K = 5 and D = 2 delayed, FDA naive
    reporting every 2 steps."""
    return job_to_dict(job_with(JobConfig(), {
        "algo": TIMINGS[timing], "task": task, "task_fingerprint": fingerprint, "seed": seed,
        "local_steps": 5, "period": 5, "delay": 2, "fda_variant": "naive", "rtc_steps": 2,
        "fda_theta": 1.0}))


def run_timing(broker_url: str, restartable: Broker | None, device: str, plan: Plan,
               workdir: Path, full: bool) -> list[Row]:
    timing = next(t for t, algo in TIMINGS.items() if algo == plan.job["algo"])
    rows: list[Row] = []
    session = Session(broker_url, device, plan, workdir)
    try:
        for name, step in (FULL if full else SHORT) + [("stop", stop)]:
            label = f"{name} [{timing}]"
            if any(r.result == "FAIL" for r in rows) and step is not stop:
                rows.append(Row(label, "SKIP", "after a failure above"))
                continue
            started = time.monotonic()
            try:
                row = Row(label, "PASS", step(session, restartable))
            except Skipped as exc:
                row = Row(label, "SKIP", str(exc))
            except Failed as exc:
                row = Row(label, "FAIL", str(exc))
            row.seconds = round(time.monotonic() - started, 2)
            rows.append(row)
    finally:
        session.close()
    return rows


def check(device: str, broker: Broker | str | None = None, timings: tuple[str, ...] = ("round",),
          protocol: int = PROTOCOL_VERSION, task: str = "digits", seed: int = 0,
          timeout: float = 20.0, join_timeout: float = 60.0,
          workdir: Path | None = None) -> list[Row]:
    """Every step against the device `device` starts (a command template), in one run per
    timing (the full walk in the first). `broker`: a URL (not restarted), a broker object
    (restarted, its log read), or None: a Mosquitto of our own."""
    own = LocalMosquitto().start() if broker is None else None
    handle = own or (None if isinstance(broker, str) else broker)
    url = broker if isinstance(broker, str) else handle.url  # type: ignore[union-attr]
    work = workdir or Path(tempfile.mkdtemp(prefix="fl-conformance-"))
    try:
        params, fingerprint, metrics = task_model(task, seed)
        rows: list[Row] = []
        for i, timing in enumerate(timings):
            plan = Plan(run=f"conf-{timing}-{uuid.uuid4().hex[:6]}",
                        job=job_for(timing, task, fingerprint, seed), params=params,
                        metrics=metrics, protocol=protocol, timeout=timeout,
                        join_timeout=join_timeout)
            rows += run_timing(url, handle, device, plan, work, full=i == 0)
        return rows
    finally:
        if own is not None:
            own.close()


# -- command line -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fl-conformance", formatter_class=HelpFormatter,
        description="Check a device (agent) against PROTOCOL.md over a real broker: this "
                    "tool plays the coordinator, starts the device from a command template "
                    "and prints a pass/fail table (exit code 0 only if nothing failed).",
        epilog="Examples: fl-conformance --device \"fl-agent --broker {broker} --run {run} "
               "--agent-id {id} --state-dir {state}\" --timings round,delayed,fda; "
               "fl-conformance --device \"node examples/node_client/client.js --broker "
               "{broker} --run {run} --id {id} --state-dir {state}\"")
    add_version_flag(p)
    p.add_argument("--device", required=True,
                   help="command starting one device; {broker}, {run}, {id} and {state} (a "
                        "folder for its state) are filled in (default: none, required)")
    p.add_argument("--broker", default="",
                   help="use this broker, mqtt://HOST:PORT (the broker restart and MQTT "
                        "settings steps are then skipped) (default: a Mosquitto of its own "
                        "on 127.0.0.1)")
    p.add_argument("--timings", default="round",
                   help=f"comma-separated timings the device claims: {', '.join(TIMINGS)}")
    p.add_argument("--protocol", type=int, choices=PROTOCOL_VERSIONS, default=PROTOCOL_VERSION,
                   help="protocol version of the run (the model the device joins)")
    p.add_argument("--task", default="digits",
                   help="the job's task (its model gives the parameters, at --seed)")
    p.add_argument("--seed", type=int, default=0, help="the job's seed")
    p.add_argument("--timeout", type=float, default=20.0,
                   help="seconds to wait for each expected message")
    p.add_argument("--join-timeout", type=float, default=60.0,
                   help="seconds a device may take to start and say hello")
    p.add_argument("--workdir", default="",
                   help="folder for the devices' logs and state (default: a temporary one, "
                        "kept when a step fails)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    return p


def table(rows: list[Row]) -> str:
    width = max(len(r.step) for r in rows)
    return "\n".join(f"{r.step:<{width}}  {r.result:<4}  {r.seconds:5.1f} s  {r.detail}"
                     for r in rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # our link's reconnect notes would cut the table
    timings = tuple(t.strip() for t in args.timings.split(",") if t.strip())
    unknown = set(timings) - set(TIMINGS)
    if unknown or not timings:
        print(f"fl-conformance: error: --timings: one or more of {', '.join(TIMINGS)}",
              file=sys.stderr)
        return 2
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(
        prefix="fl-conformance-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        rows = check(args.device, args.broker or None, timings, args.protocol, args.task,
                     args.seed, args.timeout, args.join_timeout, workdir)
    except (BrokerError, BrokerUnreachable, ConfigError) as exc:  # ConfigError: a bad task
        print(f"fl-conformance: error: {exc}", file=sys.stderr)
        return 2
    failed = any(r.result == "FAIL" for r in rows)
    print(json.dumps([asdict(r) for r in rows], indent=1) if args.json else table(rows))
    if failed or args.workdir:
        print(f"device logs: {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
