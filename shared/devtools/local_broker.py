"""Start a real local Mosquitto broker for demos and tests.

Usage::

    with LocalMosquitto() as broker:
        client.connect(broker.host, broker.port)

The broker listens on 127.0.0.1 only, on a free TCP port picked here (in
Mosquitto 2.0.11 ``listener 0`` means a unix socket, not "any free port").
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType

__all__ = [
    "DEFAULT_MAX_PACKET_SIZE",
    "BrokerError",
    "LocalMosquitto",
    "find_mosquitto",
    "free_port",
    "mosquitto_config",
]

# Model updates are sent as single messages; 64 MiB leaves room for mid-sized models.
DEFAULT_MAX_PACKET_SIZE = 64 * 1024 * 1024
# Debian's package path; used when /usr/sbin is not on PATH (common for non-root users).
FALLBACK_MOSQUITTO = Path("/usr/sbin/mosquitto")

_INSTALL_HINT = (
    "mosquitto not found: install it with `sudo apt-get install mosquitto` "
    "(Debian/Raspberry Pi OS) or pass --broker mqtt://HOST:PORT"
)


class BrokerError(RuntimeError):
    """The local broker could not be found, started or reached."""


def find_mosquitto() -> str:
    """Return the path of the ``mosquitto`` binary or raise BrokerError."""
    found = shutil.which("mosquitto")
    if found:
        return found
    if FALLBACK_MOSQUITTO.is_file() and os.access(FALLBACK_MOSQUITTO, os.X_OK):
        return str(FALLBACK_MOSQUITTO)
    raise BrokerError(_INSTALL_HINT)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago, below the kernel's range
    for outgoing connections when it can: a port from that range (what binding port 0 gives)
    may be taken by a client's connection before the broker binds it, which a 10,000-agent
    bench on the same host made frequent."""
    low = _ephemeral_low()
    for _ in range(50):
        port = random.randrange(10_000, low) if low > 10_100 else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def mosquitto_config(
    listener: str,
    *,
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
    max_queued_messages: int = 0,
    log_dest: str = "stdout",
    user: str | None = None,
    persistence_dir: str | None = None,
) -> str:
    """Render a mosquitto.conf; also used for the Docker broker in tests so both behave alike.

    `persistence_dir`: keep sessions, their queued messages and retained messages across a
    restart (saved on a clean shutdown), as the fleet's broker does (ansible/roles/broker).
    """
    lines = [f"user {user}"] if user else []
    lines += [
        f"listener {listener}",
        "allow_anonymous true",
        f"max_packet_size {max_packet_size}",
        # Mosquitto's default of 1000 silently drops messages for slow subscribers.
        f"max_queued_messages {max_queued_messages}",
        "set_tcp_nodelay true",  # forward small messages at once (no Nagle delay)
        *(["persistence true", f"persistence_location {persistence_dir.rstrip('/')}/"]
          if persistence_dir else ["persistence false"]),
        f"log_dest {log_dest}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
    ]
    return "\n".join(lines) + "\n"


def _kill(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Terminate a broker process; module-level so finalizers hold no reference to the owner."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


class LocalMosquitto:
    """A Mosquitto subprocess on 127.0.0.1 with a generated config in a temp dir."""

    host = "127.0.0.1"

    def __init__(
        self,
        *,
        port: int | None = None,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        max_queued_messages: int = 0,
        start_timeout: float = 10.0,
        binary: str | None = None,
        persistence: bool = False,
    ) -> None:
        if max_packet_size < 20:
            raise ValueError("max_packet_size must be at least 20 bytes (Mosquitto's minimum)")
        if max_queued_messages < 0:
            raise ValueError("max_queued_messages must be >= 0 (0 means unlimited)")
        self._binary = binary or find_mosquitto()
        self._port = port if port is not None else free_port()
        # A port we picked may be grabbed by someone else before mosquitto binds it;
        # then we may pick another, but never once clients know the port.
        self._port_fixed = port is not None
        self.max_packet_size = max_packet_size
        self.max_queued_messages = max_queued_messages
        self.persistence = persistence  # restart() keeps sessions and queued messages
        self.start_timeout = start_timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="fleetfl-mosquitto-")
        self.dir = Path(self._tmp.name)
        self.log_path = self.dir / "mosquitto.log"
        self._out_path = self.dir / "stdout.log"  # errors before the log file opens
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None

    # -- public API -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self._port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> LocalMosquitto:
        """Start the broker and wait until its port accepts connections."""
        if self.running:
            return self
        deadline = time.monotonic() + self.start_timeout
        while True:
            log_offset = self._log_size()
            self._spawn()
            if self._wait_ready(log_offset, deadline):
                self._port_fixed = True  # clients now know this port; restart() keeps it
                return self
            in_use = "Address already in use" in self._log_since(log_offset)
            self.stop()
            if in_use and time.monotonic() < deadline:
                if self._port_fixed:
                    time.sleep(0.2)  # the previous socket on this port is not released yet
                else:
                    self._port = free_port()
                continue
            raise BrokerError(
                f"mosquitto did not start on {self.url} within {self.start_timeout:.0f} s"
                f" ({self._binary}); log tail:\n{self._tail()}"
            )

    def stop(self) -> None:
        """Stop the broker process (the temp dir and log stay until close())."""
        if self._finalizer is not None:
            self._finalizer()  # runs _kill once and unregisters it from atexit
            self._finalizer = None
        self._proc = None

    def restart(self) -> LocalMosquitto:
        """Stop and start again on the same port, e.g. to test client reconnects."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the broker and delete its temp dir."""
        self.stop()
        self._tmp.cleanup()

    def log_text(self) -> str:
        """The broker's log, plus anything it printed before opening the log file."""
        text = ""
        for path in (self._out_path, self.log_path):
            try:
                text += path.read_text(errors="replace")
            except FileNotFoundError:
                pass
        return text

    def __enter__(self) -> LocalMosquitto:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"LocalMosquitto({self.url}, {state})"

    # -- internals --------------------------------------------------------------------------

    def _write_config(self) -> Path:
        # As root, mosquitto drops to user `mosquitto`, which cannot write our temp dir
        # (and may not exist); `user root` keeps it root. Ignored when not run as root.
        user = "root" if os.geteuid() == 0 else None
        conf = self.dir / "mosquitto.conf"
        conf.write_text(
            mosquitto_config(
                f"{self._port} {self.host}",
                max_packet_size=self.max_packet_size,
                max_queued_messages=self.max_queued_messages,
                log_dest=f"file {self.log_path}",
                user=user,
                persistence_dir=str(self.dir) if self.persistence else None,
            )
        )
        return conf

    def _spawn(self) -> None:
        conf = self._write_config()
        with open(self._out_path, "ab") as out:
            proc = subprocess.Popen(
                [self._binary, "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Same process group on purpose: Ctrl-C or a group kill also stops the broker.
            )
        self._proc = proc
        # Kills the broker when this object is garbage collected or at interpreter exit.
        self._finalizer = weakref.finalize(self, _kill, proc)

    def _wait_ready(self, log_offset: int, deadline: float) -> bool:
        """Wait for the 'running' log line (all listeners bound), then for a TCP connect."""
        assert self._proc is not None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            if " running" in self._log_since(log_offset) and self._port_accepts():
                return True
            time.sleep(0.02)
        return False

    def _port_accepts(self) -> bool:
        try:
            with socket.create_connection((self.host, self._port), timeout=0.5):
                return True
        except OSError:
            return False

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _tail(self, lines: int = 20) -> str:
        text = self.log_text().strip()
        return "\n".join(text.splitlines()[-lines:]) if text else "(log is empty)"
