"""sd_notify: datagrams to $NOTIFY_SOCKET (path or abstract '@'), no-op without it."""

from __future__ import annotations

import os
import socket

import pytest

from fleetfl.shared import sd_notify


@pytest.fixture
def listener(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(2)
    yield str(path), sock
    sock.close()


def test_no_socket_is_a_noop(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert sd_notify.ready() is False
    assert sd_notify.watchdog() is False
    assert sd_notify.stopping() is False


def test_ready_status_stopping_to_a_path(monkeypatch, listener):
    path, sock = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert sd_notify.ready("joined at version 3")
    assert sock.recv(256) == b"READY=1\nSTATUS=joined at version 3"
    assert sd_notify.status("training")
    assert sock.recv(256) == b"STATUS=training"
    assert sd_notify.stopping()
    assert sock.recv(256) == b"STOPPING=1"


def test_abstract_namespace(monkeypatch):
    name = f"fleetfl-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd_notify.notify("READY=1")
        assert sock.recv(64) == b"READY=1"


def test_unreachable_socket_never_raises(monkeypatch, tmp_path):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "missing.sock"))
    assert sd_notify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert sd_notify.ready() is False


def test_watchdog_is_rate_limited(monkeypatch, listener):
    path, sock = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")  # 10 s: ping at most every 5 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setattr(sd_notify, "_last_ping", 0.0)
    assert sd_notify.watchdog(now=100.0)
    assert sock.recv(64) == b"WATCHDOG=1"
    assert not sd_notify.watchdog(now=103.0)
    assert sd_notify.watchdog(now=105.5)
    assert sock.recv(64) == b"WATCHDOG=1"


def test_watchdog_for_another_pid_is_ignored(monkeypatch, listener):
    path, _ = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sd_notify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sd_notify.watchdog_interval() == 1.0
    monkeypatch.setenv("WATCHDOG_USEC", "junk")
    assert sd_notify.watchdog_interval() is None


def test_status_line_sends_the_newest_text_at_most_once_a_second(monkeypatch, listener):
    """STATUS= kept current (issue 15, item 4) without a datagram per change: at most one a
    second, the newest text held back goes out with the next poll."""
    path, sock = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    line = sd_notify.Status()
    assert line.set("version 1", now=10.0)
    assert not line.set("version 2", now=10.4)  # held back ...
    assert not line.set("version 3", now=10.6)  # ... and replaced by the newest
    assert not line.poll(now=10.9)
    assert line.poll(now=11.0)
    assert not line.poll(now=20.0)  # nothing new
    assert not line.set("version 3", now=30.0)  # unchanged text: nothing sent
    assert sock.recv(64) == b"STATUS=version 1"
    assert sock.recv(64) == b"STATUS=version 3"
    sock.settimeout(0.1)
    with pytest.raises(TimeoutError):
        sock.recv(64)
