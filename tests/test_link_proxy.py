"""The slow-link proxy: measured delay and bandwidth, cuts, and a DGA run through it."""

from __future__ import annotations

import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetfl.coordinator.local_fleet import LocalFleet
from fleetfl.coordinator.rundir import RunDir
from fleetfl.shared.devtools.link_proxy import LinkModel, LinkSpec, ProxyHost


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _Sink(socketserver.BaseRequestHandler):
    """Reads everything, then answers with one byte: how the sender learns it all arrived."""

    def handle(self) -> None:
        expected = int.from_bytes(self.request.recv(8, socket.MSG_WAITALL), "big")
        got = 0
        while got < expected and (data := self.request.recv(65536)):
            got += len(data)
        self.request.sendall(b"!")


def _server(handler: type[socketserver.BaseRequestHandler]) -> socketserver.ThreadingTCPServer:
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture
def host() -> Iterator[ProxyHost]:
    with ProxyHost() as h:
        yield h


def _rtt(port: int, n: int = 8) -> list[float]:
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(n):
            t0 = time.perf_counter()
            s.sendall(b"x" * 100)
            got = 0
            while got < 100:
                got += len(s.recv(100))
            out.append(time.perf_counter() - t0)
    return out


def test_link_model_is_fifo_and_paced() -> None:
    link = LinkModel(LinkSpec(latency=0.1, bandwidth=1000.0))
    assert link.transmit(0.0, 500) == pytest.approx(0.6)  # 0.5 s on the wire + 0.1 s
    assert link.transmit(0.0, 500) == pytest.approx(1.1)  # queued behind the first
    jittery = LinkModel(LinkSpec(latency=0.1, jitter=0.1))
    arrivals = [jittery.transmit(i * 0.001, 1) for i in range(200)]
    assert arrivals == sorted(arrivals)  # a stream never reorders


def test_proxy_adds_configured_delay(host: ProxyHost) -> None:
    srv = _server(_Echo)
    try:
        target = srv.server_address
        direct = min(_rtt(host.add(target).port))
        proxy = host.add(target, up=LinkSpec(0.06), down=LinkSpec(0.04))
        rtts = _rtt(proxy.port)
    finally:
        srv.shutdown()
    # Expected RTT = 60 + 40 ms; asyncio timers may fire a little late on a busy host.
    assert direct < 0.02
    assert 0.099 <= min(rtts) <= 0.115, rtts
    assert sorted(rtts)[len(rtts) // 2] <= 0.13, rtts


def test_proxy_caps_bandwidth(host: ProxyHost) -> None:
    srv = _server(_Sink)
    size, rate = 1_000_000, 2_000_000.0  # 1 MB at 2 MB/s: 0.5 s
    try:
        proxy = host.add(srv.server_address, up=LinkSpec(bandwidth=rate))
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
            t0 = time.perf_counter()
            s.sendall(size.to_bytes(8, "big") + b"\0" * size)
            assert s.recv(1) == b"!"
            elapsed = time.perf_counter() - t0
    finally:
        srv.shutdown()
    measured = size / elapsed
    assert 0.85 * rate <= measured <= 1.05 * rate, f"{measured / 1e6:.2f} MB/s"
    assert proxy.bytes_up == size + 8


def test_proxy_drops_connections_on_command(host: ProxyHost) -> None:
    srv = _server(_Echo)
    try:
        proxy = host.add(srv.server_address)
        s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        s.sendall(b"ping")
        assert s.recv(4) == b"ping"
        assert host.drop(proxy, refuse_for=0.5) == 1
        s.settimeout(2)
        with pytest.raises(OSError):  # reset, or a clean EOF followed by a failing send
            if s.recv(4) == b"":
                raise ConnectionResetError
        s.close()
        with socket.create_connection(("127.0.0.1", proxy.port)) as refused:
            refused.settimeout(2)
            try:
                assert refused.recv(4) == b""  # cut at once while refusing
            except ConnectionResetError:
                pass
        time.sleep(0.6)
        assert min(_rtt(proxy.port, 2)) < 0.05  # accepted again afterwards
    finally:
        srv.shutdown()


def test_command_line_proxy_prints_ports_and_forwards() -> None:
    srv = _server(_Echo)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleetfl.shared.devtools.link_proxy", "--target",
         "{}:{}".format(*srv.server_address), "--count", "2", "--latency", "0.03"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ports = [int(proc.stdout.readline().split()[1]) for _ in range(2)]
        rtts = _rtt(ports[1], 3)
        assert 0.059 <= min(rtts) <= 0.09, rtts
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        srv.shutdown()


@pytest.mark.integration
def test_dga_run_through_slow_links(broker, tmp_path: Path, host: ProxyHost) -> None:
    """Three agents, each behind its own 150 ms (each way) link, against the real broker."""
    target = (broker.host, broker.port)
    proxies = [host.add(target, up=LinkSpec(0.15), down=LinkSpec(0.15)) for _ in range(3)]
    run = "slow-dga"
    fleet = LocalFleet(broker.url, run, tmp_path / "logs",
                       ["--run-dir", str(tmp_path / "runs"), "--algo", "dga", "--period", "5",
                        "--delay", "10", "--min-agents", "3", "--max-versions", "12"])
    with fleet:
        fleet.start_coordinator()
        for i, proxy in enumerate(proxies):
            fleet.broker_url = f"mqtt://127.0.0.1:{proxy.port}"
            fleet.start_agent(i, len(proxies))
        try:
            code = fleet.wait_coordinator(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("coordinator hung:\n" + fleet.log("coordinator")[-3000:])
        assert code == 0, fleet.log("coordinator")[-3000:]
        assert all(c == 0 for c in fleet.wait_agents(timeout=30).values())
    events = RunDir(tmp_path / "runs" / run).events()
    assert [e["version"] for e in events] == list(range(1, 13))
    assert all(len(e["contributors"]) == 3 for e in events[1:])
    assert all(p.bytes_up > 0 and p.bytes_down > 0 for p in proxies)
    # The update of window p + 3 leaves an agent only after the average of window p reached
    # it (D = 2K), so T(p + 3) >= T(p) + 0.3 s (one way up, one way down): from version 3 to
    # version 12 that is three such hops.
    span = events[-1]["time"] - events[0]["time"]
    assert span >= 3 * 0.3, span
    assert events[-1]["accuracy"] > 0.5
