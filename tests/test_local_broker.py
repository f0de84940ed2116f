"""Real behaviour of the local Mosquitto helper and the broker fixtures."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from fleetfl.shared.devtools import local_broker
from fleetfl.shared.devtools.local_broker import BrokerError, LocalMosquitto, find_mosquitto
from fleetfl.shared.net.broker_url import BrokerURL, parse_broker_url

TIMEOUT = 10.0


class Peer:
    """A paho 2.x MQTTv5 client that records what it receives and how often it (dis)connects."""

    def __init__(self, host: str, port: int, name: str) -> None:
        self.name = name
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"{name}-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.messages: list[mqtt.MQTTMessage] = []
        self.connects = 0
        self.disconnects = 0
        self.subacks = 0
        # Every callback notifies, so tests wait on a condition instead of sleeping.
        self._cond = threading.Condition()
        self.client.on_connect = lambda *args: self._bump("connects")
        self.client.on_disconnect = lambda *args: self._bump("disconnects")
        self.client.on_subscribe = lambda *args: self._bump("subacks")
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()
        self.wait_until(lambda: self.connects >= 1, "connect")

    def _bump(self, counter: str) -> None:
        with self._cond:
            setattr(self, counter, getattr(self, counter) + 1)
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def wait_until(self, predicate: Callable[[], bool], what: str) -> None:
        with self._cond:
            assert self._cond.wait_for(predicate, TIMEOUT), f"{self.name}: no {what}"

    def subscribe(self, topic: str, qos: int = 1) -> None:
        before = self.subacks
        self.client.subscribe(topic, qos=qos)
        self.wait_until(lambda: self.subacks > before, f"SUBACK for {topic}")

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(TIMEOUT)
        assert info.is_published(), f"{self.name}: publish to {topic} not acknowledged"

    def on_topic(self, topic: str) -> list[mqtt.MQTTMessage]:
        with self._cond:
            return [m for m in self.messages if m.topic == topic]

    def wait_for(self, topic: str) -> mqtt.MQTTMessage:
        """Wait until a message on `topic` has arrived; return the first one."""
        self.wait_until(lambda: bool(self.on_topic(topic)), f"message on {topic}")
        return self.on_topic(topic)[0]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    made: list[Peer] = []
    yield made
    for peer in made:
        peer.close()


def make_peer(peers: list[Peer], broker: Any, name: str) -> Peer:
    peer = Peer(broker.host, broker.port, name)
    peers.append(peer)
    return peer


def topic() -> str:
    return f"test/{uuid.uuid4().hex}"


# -- round trips against the shared broker ------------------------------------------------


def test_qos1_round_trip(session_broker: Any, peers: list[Peer]) -> None:
    t = topic()
    sub = make_peer(peers, session_broker, "sub")
    sub.subscribe(t, qos=1)
    make_peer(peers, session_broker, "pub").publish(t, b"hello", qos=1)
    msg = sub.wait_for(t)
    assert msg.payload == b"hello"
    assert msg.qos == 1


def test_retained_message_reaches_late_subscriber(session_broker: Any, peers: list[Peer]) -> None:
    t = topic()
    make_peer(peers, session_broker, "pub").publish(t, b"model-v1", retain=True)
    late = make_peer(peers, session_broker, "late")
    late.subscribe(t)
    msg = late.wait_for(t)
    assert msg.payload == b"model-v1"
    assert msg.retain


def test_20mb_payload_round_trips_intact(session_broker: Any, peers: list[Peer]) -> None:
    t = topic()
    payload = os.urandom(20 * 1024 * 1024)
    sub = make_peer(peers, session_broker, "sub")
    sub.subscribe(t)
    make_peer(peers, session_broker, "pub").publish(t, payload)
    received = sub.wait_for(t).payload
    assert len(received) == len(payload)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


# -- a broker with a small packet limit -----------------------------------------------------


def test_payload_above_max_packet_size_is_not_delivered(peers: list[Peer]) -> None:
    with LocalMosquitto(max_packet_size=1024) as small:
        t = topic()
        sub = make_peer(peers, small, "sub")
        sub.subscribe(t)
        pub = make_peer(peers, small, "pub")
        pub.client.publish(t, b"x" * 2048, qos=1)
        # The broker drops the connection of a client sending an oversized packet.
        pub.wait_until(lambda: pub.disconnects >= 1, "disconnect by the broker")
        # Sent after that disconnect, so its arrival shows the big one was not forwarded.
        sub.subscribe(t + "/marker")
        sub.publish(t + "/marker", b"done")
        sub.wait_for(t + "/marker")
        assert sub.on_topic(t) == []
        assert "oversize packet" in small.log_text()


# -- lifecycle ------------------------------------------------------------------------------


def test_restart_keeps_port_and_clients_reconnect(broker: Any, peers: list[Peer]) -> None:
    port, url = broker.port, broker.url
    peer = make_peer(peers, broker, "reconnect")
    broker.restart()
    assert (broker.port, broker.url) == (port, url)
    # paho's loop thread reconnects on its own once the broker is back.
    peer.wait_until(lambda: peer.disconnects >= 1, "disconnect on restart")
    peer.wait_until(lambda: peer.connects >= 2, "reconnect after restart")
    t = topic()
    peer.subscribe(t)
    make_peer(peers, broker, "fresh").publish(t, b"after-restart")
    assert peer.wait_for(t).payload == b"after-restart"


def test_stop_ends_the_process_and_frees_the_port() -> None:
    with LocalMosquitto() as b:
        pid, port = b.pid, b.port
        assert pid is not None and b.running
        assert "running" in b.log_text()
    assert not b.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_start_failure_reports_log_tail() -> None:
    # Hold the port so mosquitto cannot bind it; with a fixed port it must give up.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        b = LocalMosquitto(port=holder.getsockname()[1], start_timeout=1.0)
        with pytest.raises(BrokerError, match="Address already in use"):
            b.start()
        b.close()


# -- find_mosquitto and URLs ----------------------------------------------------------------


def test_find_mosquitto_without_binary(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(local_broker, "FALLBACK_MOSQUITTO", tmp_path / "no-mosquitto")
    with pytest.raises(BrokerError) as err:
        find_mosquitto()
    assert "sudo apt-get install mosquitto" in str(err.value)
    assert "--broker mqtt://HOST:PORT" in str(err.value)
    with pytest.raises(BrokerError, match="mosquitto not found"):
        LocalMosquitto()


def test_find_mosquitto_falls_back_to_usr_sbin(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = tmp_path / "mosquitto"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(local_broker, "FALLBACK_MOSQUITTO", fake)
    assert find_mosquitto() == str(fake)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://broker.local:1884", BrokerURL("broker.local", 1884)),
        ("broker.local:1884", BrokerURL("broker.local", 1884)),
        ("mqtt://broker.local", BrokerURL("broker.local", 1883)),
        ("10.0.0.5", BrokerURL("10.0.0.5", 1883)),
        (" MQTT://127.0.0.1:8883/ ", BrokerURL("127.0.0.1", 8883)),
        ("mqtt://[::1]:1883", BrokerURL("::1", 1883)),
    ],
)
def test_parse_broker_url_good(url: str, expected: BrokerURL) -> None:
    assert parse_broker_url(url) == expected


def test_broker_url_str() -> None:
    assert str(parse_broker_url("host:1234")) == "mqtt://host:1234"
    assert str(parse_broker_url("mqtt://[::1]")) == "mqtt://[::1]:1883"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("http://host:1883", "scheme"),
        ("ws://host:1883", "scheme"),
        ("host:notaport", "bad port"),
        ("host:70000", "bad port"),
        ("host:0", "bad port"),
        ("mqtt://:1883", "missing host"),
        ("mqtt://host:1883/topic", "path"),
        ("mqtt://user:pw@host:1883", "credentials"),
    ],
)
def test_parse_broker_url_bad(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_broker_url(url)
