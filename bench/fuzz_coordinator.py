"""Hostile input at a live coordinator: 10,000 random and mutated messages over a real broker.

One local Mosquitto, one fl-coordinator and 2 honest fl-agent processes (`LocalFleet`,
FedAvg on digits). Once the run is warm, a hostile MQTT client fires messages at the
coordinator's topics: random bytes, empty payloads, truncated and byte-mutated messages,
oversized ones, wrong types, huge or wrong shapes, NaN/Inf values, wrong dtypes and protocol
versions, messages of other runs, from unknown senders or under someone else's name, kinds that
only the coordinator sends, invalid hellos, and verbatim replays of the honest agents' own
messages (captured from the broker). The sender is paced by the coordinator's live rejection
counter (Prometheus, --metrics-port) so the broker is not the bottleneck.

Reported: crashes (the coordinator exited), hangs (versions must keep advancing afterwards),
messages counted by reason (events.jsonl `rejected`, the difference over the fuzz) against
messages sent, and the coordinator's RSS before, at its peak and after.
Goal: 0 crashes, 0 hangs, every message rejected with a counted reason, memory flat.

Run: `.venv/bin/python bench/fuzz_coordinator.py [--messages 10000 --seed 1]`
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from proc_stats import rss_mb
from prometheus_client.parser import text_string_to_metric_families

from fleetfl.coordinator.local_fleet import LocalFleet
from fleetfl.coordinator.rundir import RunDir
from fleetfl.shared.core.messages import Kind, Message
from fleetfl.shared.devtools.local_broker import LocalMosquitto, free_port
from fleetfl.shared.wire.codec import DecodeContext, decode, encode
from fleetfl.shared.wire.layout import edit_header
from fleetfl.shared.wire.topics import Topics

RUN = "fuzz"
MAX_BYTES = 256 * 1024  # the coordinator's --max-message-bytes: oversized stays cheap
FUZZ_IDS = [f"fz{i}" for i in range(10)]


class Fuzzer:
    """Makes one hostile (topic, payload) per call of a category."""

    def __init__(self, rng: random.Random, model_size: int, honest: list[tuple[str, bytes]]
                 ) -> None:
        self.rng, self.size, self.honest = rng, model_size, honest
        self.topics = Topics(RUN)
        self.seq = 10**15  # larger than any honest sequence number: never "replayed" by luck
        self.categories: dict[str, Callable[[], tuple[str, bytes]]] = {
            name[4:]: getattr(self, name) for name in dir(self) if name.startswith("gen_")}

    # -- helpers --------------------------------------------------------------------------
    def fid(self) -> str:
        return self.rng.choice(FUZZ_IDS)

    def up(self, sender: str | None = None) -> str:
        return self.topics.up(sender or self.fid())

    def update(self, sender: str, delta: np.ndarray | None = None, run: str = RUN) -> Message:
        self.seq += 1
        return Message(Kind.UPDATE, run, sender, self.seq, self.rng.randint(0, 3),
                       {"window": self.rng.randint(1, 5), "samples": 5, "steps": 1},
                       {"delta": np.zeros(self.size, np.float32) if delta is None else delta})

    def raw(self, change: Callable[[dict], None], sender: str) -> bytes:
        """A valid update whose msgpack header is edited by `change` (arrays kept)."""
        return edit_header(encode(self.update(sender)), change)

    def junk_value(self) -> object:
        return self.rng.choice([None, True, -1, 2**63 - 1, 1.5, float("nan"), "x" * 70,
                                [1, 2], {"a": 1}, b"\x00\x01"])

    # -- categories -----------------------------------------------------------------------
    def gen_random_bytes(self) -> tuple[str, bytes]:
        # a fresh topic id each time: per-sender bookkeeping must not grow with them
        return self.up(f"rnd{self.rng.randrange(10**9)}"), self.rng.randbytes(
            self.rng.randint(1, 2048))

    def gen_empty(self) -> tuple[str, bytes]:
        return self.up(f"rnd{self.rng.randrange(10**9)}"), b""

    def gen_truncated(self) -> tuple[str, bytes]:
        sender = self.fid()
        payload = encode(self.update(sender))
        return self.up(sender), payload[:self.rng.randrange(len(payload))]

    def gen_oversized(self) -> tuple[str, bytes]:
        sender = self.fid()
        big = np.zeros(MAX_BYTES // 4 + self.rng.randint(1, 10_000), np.float32)
        return self.up(sender), encode(self.update(sender, big))

    def gen_wrong_types(self) -> tuple[str, bytes]:
        sender = self.fid()
        key = self.rng.choice(["proto", "kind", "run", "sender", "seq", "base_version",
                               "fields", "arrays", "window", "samples", "steps"])

        def change(head: dict) -> None:
            (head["fields"] if key in head["fields"] else head)[key] = self.junk_value()

        return self.up(sender), self.raw(change, sender)

    def gen_huge_shape(self) -> tuple[str, bytes]:
        sender = self.fid()
        shape = self.rng.choice([[2**39], [2**20, 2**20], [self.size + 1], [-1], [0],
                                 [self.size, 2], [1] * 9, [2**40]])

        def change(head: dict) -> None:
            head["arrays"]["delta"]["shape"] = shape

        return self.up(sender), self.raw(change, sender)

    def gen_not_finite(self) -> tuple[str, bytes]:
        sender = self.fid()
        delta = np.zeros(self.size, np.float32)
        delta[self.rng.randrange(self.size)] = self.rng.choice([np.nan, np.inf, -np.inf])
        return self.up(sender), encode(self.update(sender, delta))

    def gen_bad_dtype(self) -> tuple[str, bytes]:
        sender = self.fid()
        dtype = self.rng.choice(["<f8", ">f4", "<i4", "float32", ""])

        def change(head: dict) -> None:
            head["arrays"]["delta"]["dtype"] = dtype

        return self.up(sender), self.raw(change, sender)

    def gen_bad_protocol(self) -> tuple[str, bytes]:
        sender = self.fid()
        proto = self.rng.choice([0, 1, 99])  # 1: a version-1 header in a version-2 layout
        return self.up(sender), self.raw(lambda head: head.update(proto=proto), sender)

    def gen_other_run(self) -> tuple[str, bytes]:
        sender = self.fid()
        return self.up(sender), encode(self.update(sender, run=f"run{self.rng.randrange(99)}"))

    def gen_unknown_agent(self) -> tuple[str, bytes]:
        sender = self.fid()
        return self.up(sender), encode(self.update(sender))

    def gen_sender_mismatch(self) -> tuple[str, bytes]:
        return self.up(), encode(self.update("agent0"))

    def gen_wrong_kind(self) -> tuple[str, bytes]:
        sender = self.fid()
        self.seq += 1
        kind, fields, arrays = self.rng.choice([
            (Kind.AVG, {"window": 1, "version": 1, "contributors": []},
             {"delta": np.zeros(self.size, np.float32)}),
            (Kind.STOP, {"reason": "pwned"}, {}),
            (Kind.SYNC, {"version": 1, "window": 1, "estimate": 1.0}, {}),
            (Kind.HELLO, {"samples": 5, "first_window": 1}, {}),  # a hello on up/: wrong topic
        ])
        return self.up(sender), encode(Message(kind, RUN, sender, self.seq, 0, fields, arrays))

    def gen_bad_hello(self) -> tuple[str, bytes]:
        sender = self.fid()
        self.seq += 1
        samples = self.rng.choice([0, -5])
        return self.topics.status(sender), encode(Message(
            Kind.HELLO, RUN, sender, self.seq, 0, {"samples": samples, "first_window": 1}))

    def gen_replay(self) -> tuple[str, bytes]:
        return self.rng.choice(self.honest)

    def gen_mutated(self) -> tuple[str, bytes]:
        _topic, payload = self.rng.choice(self.honest)
        data = bytearray(payload)
        for _ in range(self.rng.randint(1, 8)):
            data[self.rng.randrange(min(len(data), 200))] = self.rng.randrange(256)
        return self.up(), bytes(data)  # never on the honest topic: see the closing note

    def next(self) -> tuple[str, str, bytes]:
        category = self.rng.choice(sorted(self.categories))
        return (category, *self.categories[category]())


class Hostile:
    """A plain MQTT client: captures the honest agents' messages and fires the fuzz."""

    def __init__(self, broker: LocalMosquitto) -> None:
        self.topics = Topics(RUN)
        self.honest: list[tuple[str, bytes]] = []
        self.model: bytes | None = None
        self.lock = threading.Lock()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id="hostile", protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.max_queued_messages_set(2000)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        for topic in (self.topics.up_all, self.topics.status_all, self.topics.model):
            self.client.subscribe(topic, qos=1)

    def _on_message(self, client, userdata, message) -> None:
        with self.lock:
            if message.topic == self.topics.model:
                self.model = message.payload
            elif self.topics.sender_of(message.topic) in ("agent0", "agent1") \
                    and message.payload and len(self.honest) < 50:
                self.honest.append((message.topic, message.payload))

    def send(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def counted(port: int) -> float:
    """The coordinator's live count of refused messages."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text)
               for s in fam.samples if s.name == "fleetfl_messages_rejected_total")


def wait_until(check: Callable[[], bool], timeout: float, alive: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            return False
        if check():
            return True
        time.sleep(0.2)
    return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--backlog", type=int, default=1000,
                   help="messages in flight before the sender waits for the coordinator")
    p.add_argument("--keep", action="store_true", help="keep the run and log folders")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:  # noqa: C901 - one linear script
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fleetfl-fuzz-"))
    port = free_port()
    rundir = RunDir(work / "runs" / RUN)
    sent: Counter[str] = Counter()
    config = work / "run.yaml"  # max_message_bytes has no flag
    config.write_text(f"max_message_bytes: {MAX_BYTES}\n")
    try:
        with LocalMosquitto() as broker, LocalFleet(
                broker.url, RUN, work / "logs",
                ["--algo", "fedavg", "--dataset", "digits", "--min-agents", "2",
                 "--max-versions", "100000", "--local-steps", "10", "--window-timeout", "5",
                 "--eval-every", "10", "--config", str(config),
                 "--metrics-port", str(port), "--run-dir", str(work / "runs")],
                ["--block-timeout", "10"]) as fleet:
            coordinator = fleet.start_coordinator()
            alive = lambda: coordinator.poll() is None  # noqa: E731
            hostile = Hostile(broker)
            fleet.start_agents(2)
            if not wait_until(lambda: len(rundir.events()) >= 3 and len(hostile.honest) >= 4
                              and hostile.model is not None, 180, alive):
                print("the honest run did not warm up:\n" + fleet.log("coordinator")[-3000:],
                      file=sys.stderr)
                return 1
            model = decode(hostile.model, DecodeContext(RUN))
            fuzzer = Fuzzer(random.Random(args.seed), model["params"].size, hostile.honest)
            base_events = rundir.events()[-1]
            base_counted = counted(port)
            rss_before = rss_mb(coordinator.pid)
            rss_peak = rss_before
            print(f"warm at version {base_events['version']}; coordinator RSS "
                  f"{rss_before:.0f} MiB; firing {args.messages} messages ...", file=sys.stderr,
                  flush=True)
            start = time.monotonic()
            crashed = False
            for i in range(args.messages):
                category, topic, payload = fuzzer.next()
                sent[category] += 1
                hostile.send(topic, payload)
                if i % 200 == 199:
                    rss_peak = max(rss_peak, rss_mb(coordinator.pid) or 0.0)
                    if not wait_until(lambda i=i: i + 1 - (counted(port) - base_counted)
                                      < args.backlog, 30, alive):
                        crashed = not alive()
                        if crashed:
                            break
            # drained: the count stops moving (a message not counted never shows up)
            last, still = -1.0, 0
            while alive() and still < 10:
                now = counted(port)
                still = still + 1 if now == last else 0
                last = now
                rss_peak = max(rss_peak, rss_mb(coordinator.pid) or 0.0)
                time.sleep(0.3)
            fuzz_s = time.monotonic() - start
            crashed = crashed or not alive()
            at_end = rundir.events()[-1]["version"]
            advancing = wait_until(lambda: rundir.events()[-1]["version"] >= at_end + 3, 60,
                                   alive)
            crashed = crashed or not alive()
            rss_after = rss_mb(coordinator.pid) if alive() else None
            last_event = rundir.events()[-1]
            hostile.close()
            log = fleet.log("coordinator")
    finally:
        if args.keep:
            print(f"run and log folders kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    before, after = Counter(base_events["rejected"]), Counter(last_event["rejected"])
    by_reason = after - before
    total_sent, total_counted = sum(sent.values()), sum(by_reason.values())
    print(f"\n{total_sent} hostile messages in {fuzz_s:.1f} s "
          f"({total_sent / fuzz_s:.0f} msg/s processed), seed {args.seed}; coordinator with 2 "
          f"honest agents, FedAvg on digits\n")
    print("| sent by category | n |\n|---|---:|")
    for category, n in sorted(sent.items()):
        print(f"| {category} | {n} |")
    print("\n| rejected by reason (events.jsonl) | n |\n|---|---:|")
    for reason, n in sorted(by_reason.items()):
        print(f"| {reason} | {n} |")
    print(f"| **total counted** | {total_counted} |")
    senders = len(last_event.get("bytes_by_agent", {}))
    rss_text = f"{rss_after:.0f}" if rss_after is not None else "gone"
    print(f"\ncrashed: {'yes' if crashed else 'no'}; versions still advancing afterwards: "
          f"{'yes' if advancing else 'NO (hang)'} (version {base_events['version']} before, "
          f"{last_event['version']} at the end)")
    print(f"not counted: {total_sent - total_counted} of {total_sent}")
    print(f"coordinator RSS MiB: before {rss_before:.0f}, peak {rss_peak:.0f}, after {rss_text}")
    print(f"senders with a bytes_by_agent row in events.jsonl: {senders}")
    print(f"tracebacks in the coordinator log: {log.count('Traceback')}")
    flat = rss_after is not None and rss_after - rss_before < 0.1 * rss_before
    ok = (not crashed and advancing and total_counted == total_sent and flat
          and "Traceback" not in log)
    print(f"\ngoal (0 crashes, 0 hangs, all counted, RSS within 10%): "
          f"{'PASS' if ok else 'SHORT'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
