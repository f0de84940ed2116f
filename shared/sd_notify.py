"""systemd's service notification protocol, without a C library.

A `Type=notify` unit gets `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace);
the service sends plain datagrams such as ``READY=1`` to it. With `WatchdogSec=` set, systemd
also passes `$WATCHDOG_USEC` (and `$WATCHDOG_PID`) and kills the service unless ``WATCHDOG=1``
arrives at least that often. Everything here is a no-op when the variables are unset, so the
same code runs by hand, under the test supervisor, or under systemd.

    ready("joined at version 3")   # once the service does its job
    watchdog()                     # from the main loop; rate-limited, cheap to call often
    stopping()                     # on the way out
    line = Status(); line.set("version 3, 4 agents online")   # STATUS=, at most 1/s
"""

from __future__ import annotations

import os
import socket
import time

__all__ = ["Status", "notify", "ready", "status", "stopping", "watchdog",
           "watchdog_interval"]
STATUS_INTERVAL = 1.0  # seconds: the least time between two STATUS= of a Status line

_last_ping = 0.0


def _address(value: str) -> str | None:
    if not value or value[0] not in "/@":
        return None  # systemd also knows vsock addresses; not used by services on a Pi
    return "\0" + value[1:] if value[0] == "@" else value


def notify(state: str, env: dict[str, str] | None = None) -> bool:
    """Send one notification (e.g. ``"READY=1\\nSTATUS=..."``); False if there is no socket
    or sending failed (never raises: a notification must not take the service down)."""
    address = _address((env if env is not None else os.environ).get("NOTIFY_SOCKET", ""))
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
        return True
    except OSError:
        return False


def watchdog_interval(env: dict[str, str] | None = None) -> float | None:
    """Seconds systemd waits for WATCHDOG=1, or None when the watchdog is off (or not ours)."""
    env = env if env is not None else os.environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 1e6


def ready(text: str = "") -> bool:
    return notify("READY=1" + (f"\nSTATUS={text}" if text else ""))


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def stopping(text: str = "") -> bool:
    return notify("STOPPING=1" + (f"\nSTATUS={text}" if text else ""))


def watchdog(now: float | None = None) -> bool:
    """Ping the watchdog if half its interval has passed since the last ping."""
    global _last_ping
    interval = watchdog_interval()
    if interval is None:
        return False
    now = time.monotonic() if now is None else now
    if now - _last_ping < interval / 2:
        return False
    _last_ping = now
    return notify("WATCHDOG=1")


class Status:
    """STATUS= kept current without flooding the service manager: `set()` the newest text as
    often as it changes; at most one datagram per `interval` goes out, and a text held back
    goes out with a later `set()` or `poll()` once the interval has passed (call `poll()`
    from the main loop so the last change is not left unsaid)."""

    def __init__(self, interval: float = STATUS_INTERVAL) -> None:
        self.interval = interval
        self.text = self.sent = ""
        self.sent_at: float | None = None

    def set(self, text: str, now: float | None = None) -> bool:
        self.text = text
        return self.poll(now)

    def poll(self, now: float | None = None) -> bool:
        """Send the newest text if it is new and the interval has passed; True if sent."""
        if self.text == self.sent:
            return False
        now = time.monotonic() if now is None else now
        if self.sent_at is not None and now - self.sent_at < self.interval:
            return False
        self.sent, self.sent_at = self.text, now
        return status(self.text)
