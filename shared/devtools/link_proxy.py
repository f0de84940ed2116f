"""A slow link in user space: a TCP proxy that delays, paces and cuts one agent's connection.

This kernel has no `netem` qdisc and Debian/PyPI ship no maintained latency proxy we can
install by package (toxiproxy's server is a Go binary, not packaged; `toxiproxy-python` is only
its client), so the link is emulated here. Each direction of a proxied connection is modelled
like a network link: bytes are serialised at `bandwidth` (bytes/s, 0 = unlimited), then
propagate for `latency` seconds (+ uniform jitter in [-jitter, +jitter], clipped at 0). A TCP
stream cannot reorder, so a chunk is never delivered before the one read before it.

The virtual-clock simulator (`fleetfl.coordinator.simulator`) uses the same `LinkSpec` and
`LinkModel`, so a simulated link and a proxied one follow one formula.

Library::

    with ProxyHost() as host:                       # one event loop in a daemon thread
        p = host.add(("127.0.0.1", 1883), up=LinkSpec(0.2), down=LinkSpec(0.2))
        ... agent connects to mqtt://127.0.0.1:{p.port} ...
        host.drop(p)                                # cut its connections (clients reconnect)

Command line (stdin takes `drop`, `down SECONDS`, `quit`; SIGUSR1 also drops)::

    python -m fleetfl.shared.devtools.link_proxy --target 127.0.0.1:1883 --count 4 --latency 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["LinkModel", "LinkProxy", "LinkSpec", "ProxyHost", "main"]

READ_CHUNK = 64 * 1024
# With a bandwidth cap, chunks are split into pieces of at most this many seconds of
# transmission, so delivery is smooth rather than one burst per 64 KiB read.
PACE_SLICE_S = 0.005
# How far ahead of the link the reader may run before it stops reading (so a capped link
# pushes back on the sender through TCP instead of buffering without bound here); generous
# enough that a late wake-up on a busy host does not leave the link idle.
READ_AHEAD_S = 0.2


@dataclass(frozen=True)
class LinkSpec:
    """One direction of a link."""

    latency: float = 0.0  # one-way propagation delay, seconds
    jitter: float = 0.0  # uniform +-jitter seconds added to the latency (never below 0)
    bandwidth: float = 0.0  # bytes per second; 0 = unlimited

    def __post_init__(self) -> None:
        if self.latency < 0 or self.jitter < 0 or self.bandwidth < 0:
            raise ValueError(f"link values must be >= 0: {self}")


class LinkModel:
    """FIFO link state: when does a chunk of `size` bytes sent at `now` arrive?

    Serialisation queues behind earlier chunks (`free_at`); propagation adds latency and
    jitter; arrival is clamped to be no earlier than the previous arrival (in-order stream).
    """

    def __init__(self, spec: LinkSpec, rng: random.Random | None = None) -> None:
        self.spec = spec
        self.rng = rng or random.Random()
        self.free_at = 0.0
        self.last_arrival = 0.0

    def transmit(self, now: float, size: int) -> float:
        spec = self.spec
        start = max(now, self.free_at)
        self.free_at = start + (size / spec.bandwidth if spec.bandwidth else 0.0)
        delay = spec.latency
        if spec.jitter:
            delay = max(0.0, delay + self.rng.uniform(-spec.jitter, spec.jitter))
        self.last_arrival = max(self.free_at + delay, self.last_arrival)
        return self.last_arrival


@dataclass(eq=False)  # identity: kept in a set
class _Conn:
    writers: list[asyncio.StreamWriter]
    tasks: list[asyncio.Task] = field(default_factory=list)

    def abort(self) -> None:
        for w in self.writers:
            # A cut link, not a polite close: the peers see a reset.
            with contextlib.suppress(Exception):
                w.transport.abort()
        for t in self.tasks:
            t.cancel()


class LinkProxy:
    """Listens on one port and forwards every connection to `target` through a slow link."""

    def __init__(self, target: tuple[str, int], up: LinkSpec | None = None,
                 down: LinkSpec | None = None, listen: tuple[str, int] = ("127.0.0.1", 0),
                 seed: int | None = None) -> None:
        self.target, self.listen = target, listen
        self.up, self.down = up or LinkSpec(), down or LinkSpec()
        self.rng = random.Random(seed)
        self.port = 0
        self.bytes_up = self.bytes_down = 0
        self.connections = 0
        self.refuse_until = 0.0  # monotonic time before which new connections are cut
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[_Conn] = set()

    @property
    def address(self) -> str:
        return f"{self.listen[0]}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, *self.listen)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.drop()
        if self._server is not None:
            await self._server.wait_closed()

    def drop(self, refuse_for: float = 0.0) -> int:
        """Cut all current connections; refuse new ones for `refuse_for` seconds."""
        self.refuse_until = time.monotonic() + refuse_for
        conns, self._conns = list(self._conns), set()
        for c in conns:
            c.abort()
        return len(conns)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        if time.monotonic() < self.refuse_until:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        conn = _Conn([writer, up_writer])
        self._conns.add(conn)
        conn.tasks = [
            asyncio.create_task(self._pump(reader, up_writer, LinkModel(self.up, self.rng),
                                           "up")),
            asyncio.create_task(self._pump(up_reader, writer, LinkModel(self.down, self.rng),
                                           "down")),
        ]
        try:
            await asyncio.gather(*conn.tasks, return_exceptions=True)
        except asyncio.CancelledError:
            pass  # the loop is shutting down: this connection ends with it, quietly
        finally:
            conn.abort()
            self._conns.discard(conn)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    link: LinkModel, direction: str) -> None:
        """Read from one side, deliver to the other when the link model says it arrives."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        delivery = asyncio.create_task(self._deliver(queue, writer, direction))
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await reader.read(READ_CHUNK)
                if not data:
                    break
                now = loop.time()
                piece = len(data)
                if link.spec.bandwidth:
                    piece = max(512, int(link.spec.bandwidth * PACE_SLICE_S))
                for off in range(0, len(data), piece):
                    chunk = data[off:off + piece]
                    queue.put_nowait((link.transmit(now, len(chunk)), chunk))
                ahead = link.free_at - loop.time() - READ_AHEAD_S
                if ahead > 0:
                    await asyncio.sleep(ahead)  # back-pressure: the link is busy
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            delivery.cancel()  # the link was cut: what is in flight is lost
            raise
        queue.put_nowait((0.0, b""))  # end of stream after what is queued
        await delivery

    async def _deliver(self, queue: asyncio.Queue[tuple[float, bytes]],
                       writer: asyncio.StreamWriter, direction: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                at, chunk = await queue.get()
                if not chunk:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                wait = at - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(chunk)
                if direction == "up":
                    self.bytes_up += len(chunk)
                else:
                    self.bytes_down += len(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass


class ProxyHost:
    """Runs proxies on one asyncio loop in a daemon thread, for synchronous callers
    (tests, benches, LocalFleet drivers)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.proxies: list[LinkProxy] = []
        self._thread = threading.Thread(target=self.loop.run_forever, name="link-proxy",
                                        daemon=True)
        self._thread.start()

    def _call(self, fn: Callable[[], object]) -> object:
        async def run() -> object:
            result = fn()
            return await result if asyncio.iscoroutine(result) else result

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=30)

    def add(self, target: tuple[str, int], up: LinkSpec | None = None,
            down: LinkSpec | None = None, seed: int | None = None) -> LinkProxy:
        proxy = LinkProxy(target, up, down, seed=seed)
        self._call(proxy.start)
        self.proxies.append(proxy)
        return proxy

    def drop(self, proxy: LinkProxy, refuse_for: float = 0.0) -> int:
        return int(self._call(lambda: proxy.drop(refuse_for)))

    def set_link(self, proxy: LinkProxy, up: LinkSpec | None = None,
                 down: LinkSpec | None = None) -> None:
        """New link values for connections made from now on."""
        def apply() -> None:
            proxy.up, proxy.down = up or proxy.up, down or proxy.down
        self._call(apply)

    def close(self) -> None:
        if not self.loop.is_running():
            return
        for p in self.proxies:
            with contextlib.suppress(Exception):
                self._call(p.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()

    def __enter__(self) -> ProxyHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- command line ---------------------------------------------------------------------------
def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m fleetfl.shared.devtools.link_proxy",
        description="TCP proxies that emulate slow links (latency, jitter, bandwidth) between "
                    "agents and an MQTT broker. Prints one 'PORT n' line per proxy, then reads "
                    "commands on stdin: 'drop' (cut all connections), 'down S' (cut and refuse "
                    "for S seconds), 'quit'. SIGUSR1 also drops.")
    p.add_argument("--target", required=True, help="HOST:PORT of the broker")
    p.add_argument("--listen", action="append", default=[],
                   help="HOST:PORT to listen on (repeatable; port 0 = any free port)")
    p.add_argument("--count", type=int, default=0,
                   help="additionally open this many proxies on free ports")
    p.add_argument("--latency", type=float, default=0.0, help="one-way seconds, both ways")
    p.add_argument("--jitter", type=float, default=0.0, help="+- seconds, both ways")
    p.add_argument("--bandwidth", type=float, default=0.0, help="bytes/s each way, 0 = off")
    for d in ("up", "down"):
        p.add_argument(f"--{d}-latency", type=float, help=f"override --latency {d}stream")
        p.add_argument(f"--{d}-bandwidth", type=float, help=f"override --bandwidth {d}stream")
    p.add_argument("--seed", type=int, help="jitter seed")
    return p.parse_args(argv)


def _spec(args: argparse.Namespace, direction: str) -> LinkSpec:
    lat = getattr(args, f"{direction}_latency")
    bw = getattr(args, f"{direction}_bandwidth")
    return LinkSpec(args.latency if lat is None else lat, args.jitter,
                    args.bandwidth if bw is None else bw)


async def _serve(args: argparse.Namespace) -> None:
    target = _host_port(args.target)
    listens = [_host_port(x) for x in args.listen]
    listens += [("127.0.0.1", 0)] * args.count
    if not listens:
        listens = [("127.0.0.1", 0)]
    proxies = [LinkProxy(target, _spec(args, "up"), _spec(args, "down"), listen=addr,
                         seed=args.seed) for addr in listens]
    for p in proxies:
        await p.start()
        print(f"PORT {p.port}", flush=True)
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGUSR1, lambda: [p.drop() for p in proxies])
    stop = asyncio.Event()
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGTERM, stop.set)

    def on_line(line: str) -> None:
        words = line.split()
        if not line:  # EOF on stdin: keep serving until SIGTERM
            loop.remove_reader(sys.stdin)
        elif words[0] == "quit":
            stop.set()
        elif words[0] == "drop":
            print(f"dropped {sum(p.drop() for p in proxies)}", flush=True)
        elif words[0] == "down" and len(words) == 2:
            print(f"dropped {sum(p.drop(float(words[1])) for p in proxies)}", flush=True)
        else:
            print(f"unknown command {line.strip()!r}", flush=True)

    with contextlib.suppress(OSError, ValueError):
        loop.add_reader(sys.stdin, lambda: on_line(sys.stdin.readline()))
    await stop.wait()
    for p in proxies:
        await p.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        asyncio.run(_serve(args))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
