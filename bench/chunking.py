"""Chunked vs unchunked: publish -> receive of one large payload through a local Mosquitto.

What is measured: two MqttLinks on one local broker (loopback, 64 MiB max_packet_size). The
sender publishes a random payload of --mb MB (QoS 1); the time runs from the publish call until
the receiver's inbox hands over the whole payload (for chunks: reassembled, SHA-256 checked).
Once unchunked (max_packet_bytes 0), then chunked with each --chunk-kb packet limit; rounds are
interleaved and medians reported, with the ratio of chunked to unchunked throughput.
A second table times the pure parts without MQTT: split (hash + headers) and Reassembler.add
of every chunk (a SHA-256 per chunk + join), next to one hashlib.sha256 of the payload.

Run: ``.venv/bin/python bench/chunking.py [--mb 40] [--chunk-kb 256,1024,4096] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import hashlib
import os
import queue
import statistics
import time
import uuid
from collections.abc import Callable

from fleetfl.shared.devtools.local_broker import LocalMosquitto
from fleetfl.shared.net.broker_url import BrokerURL
from fleetfl.shared.net.transport import Incoming, MqttLink
from fleetfl.shared.wire.chunking import Reassembler, chunk_data_bytes, split

MB = 1024 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=40.0, help="payload size in MB (default 40)")
    p.add_argument("--chunk-kb", default="256,1024,4096",
                   help="comma-separated packet limits in KiB (default %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="rounds (default 5)")
    return p.parse_args(argv)


def wait_for(inbox: queue.Queue[Incoming], topic: str, timeout: float = 120.0) -> Incoming:
    deadline = time.monotonic() + timeout
    while True:
        item = inbox.get(timeout=max(0.01, deadline - time.monotonic()))
        if item.topic == topic and item.payload:
            return item


def link(broker: LocalMosquitto, max_packet_bytes: int, subscribe: str | None = None
         ) -> tuple[MqttLink, queue.Queue[Incoming]]:
    inbox: queue.Queue[Incoming] = queue.Queue()
    lk = MqttLink(BrokerURL(broker.host, broker.port), f"bench-{uuid.uuid4().hex[:8]}", inbox,
                  max_packet_bytes=max_packet_bytes, max_message_bytes=256 * MB)
    if subscribe:
        lk.subscribe(subscribe)
    lk.connect()  # returns once connected
    return lk, inbox


def one_round(sender: MqttLink, inbox: queue.Queue[Incoming], topic: str, payload: bytes
              ) -> float:
    start = time.perf_counter()
    sender.publish(topic, payload)
    got = wait_for(inbox, topic)
    elapsed = time.perf_counter() - start
    assert len(got.payload) == len(payload) and got.payload == payload
    return elapsed


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    size = int(args.mb * MB)
    payload = os.urandom(size)
    limits = [0] + [int(kb) * 1024 for kb in args.chunk_kb.split(",")]
    topic = "bench/chunking/payload"
    times: dict[int, list[float]] = {lim: [] for lim in limits}
    with LocalMosquitto() as broker:
        receiver, inbox = link(broker, 0, topic)
        senders = {lim: link(broker, lim)[0] for lim in limits}
        time.sleep(0.5)  # subscriptions in place
        one_round(senders[0], inbox, topic, payload)  # warm-up
        for _ in range(args.repeats):
            for lim in limits:
                times[lim].append(one_round(senders[lim], inbox, topic, payload))
        stats = receiver.chunk_stats
        for lk in [receiver, *senders.values()]:
            lk.close()
    base = statistics.median(times[0])
    print(f"\n{args.mb:g} MB payload, publish -> whole payload in the receiver's inbox, "
          f"median of {args.repeats} (loopback, local mosquitto)\n")
    print("| packet limit | chunks | median s | MB/s | vs unchunked |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for lim in limits:
        med = statistics.median(times[lim])
        chunks = -(-size // chunk_data_bytes(topic, lim)) if lim else 1
        label = "unchunked" if lim == 0 else f"{lim // 1024} KiB"
        print(f"| {label} | {chunks} | {med:.3f} | {size / MB / med:.0f} | "
              f"{base / med:.2f}x |")
    print(f"\nreceiver counters: {dict(sorted(stats.items()))}")

    print(f"\nPure parts, no MQTT ({args.mb:g} MB, median of {args.repeats}, interleaved; "
          "longest add: the most one chunk's arrival costs paho's network thread, "
          "in order)\n")
    print("| packet limit | split s | reassemble s | longest add s | sha256 alone s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    pure: dict[str, list[float]] = {"sha": []}
    for _ in range(args.repeats):
        pure["sha"] += _timed(lambda: hashlib.sha256(payload).digest(), 1)
        for lim in limits[1:]:
            pure.setdefault(f"split{lim}", []).extend(
                _timed(lambda lim=lim: split(topic, payload, False, lim), 1))
            parts = split(topic, payload, False, lim)
            r = Reassembler(256 * MB)
            longest, start = 0.0, time.perf_counter()
            for t, p in parts:
                t0 = time.perf_counter()
                out = r.add(t, p, 0.0)
                longest = max(longest, time.perf_counter() - t0)
            pure.setdefault(f"join{lim}", []).append(time.perf_counter() - start)
            pure.setdefault(f"add{lim}", []).append(longest)
            assert out is not None and out.payload == payload
            del parts, out
    sha = statistics.median(pure["sha"])
    for lim in limits[1:]:
        print(f"| {lim // 1024} KiB | {statistics.median(pure[f'split{lim}']):.3f} | "
              f"{statistics.median(pure[f'join{lim}']):.3f} | "
              f"{statistics.median(pure[f'add{lim}']):.3f} | {sha:.3f} |")


def _timed(fn: Callable[[], object], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


if __name__ == "__main__":
    main()
