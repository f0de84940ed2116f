"""Issue 19: the integration tests' broker in a container (tests/conftest.py, ContainerBroker).

The broker *container* stopped and started mid-run, its persistence file on a named volume:
the run goes on and loses nothing (as test_faults.test_broker_restart_loses_no_update shows for
the binary). A TLS, password and ACL config mounted into the container. And the choice between
container and binary, which must fall back cleanly where Docker is absent or refuses.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from conftest import BROKER_IMAGE, ContainerBroker, broker_choice
from test_faults import assert_nothing_lost, run_fleet, wait_for_version
from test_faults import test_durable_session_survives_a_broker_restart as durable_session_check
from test_fleet import _connack

from fleetfl.coordinator.local_fleet import LocalFleet
from fleetfl.shared.devtools.link_proxy import ProxyHost
from fleetfl.shared.devtools.local_broker import mosquitto_config


def _need_container() -> None:
    kind, what = broker_choice()
    if kind != "container":
        pytest.skip(f"needs the broker container; this session uses {what}")


@pytest.fixture
def persistent_container(tmp_path: Path) -> Iterator[ContainerBroker]:
    """Like the fleet's broker: persistence on, its file on a named volume of the container."""
    _need_container()
    broker = ContainerBroker(tmp_path, persistence=True)
    try:
        yield broker
    finally:
        broker.close()


# -- the choice and its fallback (no Docker needed) ----------------------------------------
def test_without_an_engine_the_binary_is_chosen_and_says_why(monkeypatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    monkeypatch.setenv("FLEETFL_TEST_BROKER", "auto")
    kind, what = broker_choice.__wrapped__()
    assert kind == "binary" and "no Docker engine answers" in what, what
    monkeypatch.setenv("FLEETFL_TEST_BROKER", "container")  # CI: no silent fallback
    with pytest.raises(pytest.UsageError, match="no Docker engine answers"):
        broker_choice.__wrapped__()
    monkeypatch.setenv("FLEETFL_TEST_BROKER", "binary")
    assert broker_choice.__wrapped__()[1].endswith("(FLEETFL_TEST_BROKER=binary)")


# -- a stop and start of the same container -------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("durable", [True, False])
def test_durable_session_survives_a_container_restart(persistent_container: ContainerBroker,
                                                      durable: bool) -> None:
    """test_faults' check against the container: a session opened with clean_start=0 gets
    what was published while it was away, restored from the volume."""
    before = persistent_container.container_id
    durable_session_check(persistent_container, durable)
    assert persistent_container.container_id == before
    assert "Saving in-memory database to /mosquitto/data" in persistent_container.log_text()


@pytest.mark.integration
@pytest.mark.slow
def test_broker_container_restart_loses_no_update(persistent_container: ContainerBroker,
                                                  tmp_path: Path) -> None:
    """test_faults.test_broker_restart_loses_no_update with `docker stop` and `docker start`
    of the broker's container, down for 2 s. The coordinator's link goes through a proxy that
    keeps it out for 6 s, so agents are back first and their updates can only reach it through
    the session Mosquitto restored from its file on the volume."""
    broker = persistent_container
    args = ["--algo", "dga", "--dataset", "digits", "--min-agents", "4", "--max-versions",
            "50", "--window-timeout", "5"]
    marks: dict = {}
    with ProxyHost() as host:
        proxy = host.add(("127.0.0.1", broker.port))

        def restart(fleet: LocalFleet) -> None:
            marks["at"] = wait_for_version(fleet, tmp_path / "runs", 10, timeout=120)
            host.drop(proxy, refuse_for=6.0)
            t0 = time.monotonic()
            broker.stop()
            marks["stopped"] = time.monotonic() - t0
            assert not broker.running
            time.sleep(2.0)
            t0 = time.monotonic()
            broker.start()
            marks["started"] = time.monotonic() - t0

        fleet, events, acc = run_fleet(
            broker.url, tmp_path, "container", args, ["--block-timeout", "10"], 4, restart,
            coordinator_url=f"mqtt://127.0.0.1:{proxy.port}")
    assert_nothing_lost(acc, fleet)
    assert events[-1]["version"] == 50 and marks["at"] < 50
    assert "disconnected" in fleet.log("coordinator")  # the restart really happened
    log = broker.log_text()
    assert log.count("mosquitto version 2.0.11 running") == 2  # one container, two lives
    assert "Saving in-memory database to /mosquitto/data" in log
    print(f"container {broker.container_id[:12]} stopped at version {marks['at']} "
          f"(stop {marks['stopped']:.1f} s, down 2 s, start {marks['started']:.1f} s); "
          f"final accuracy {events[-1]['accuracy']:.4f}")
    assert events[-1]["accuracy"] >= 0.85


# -- TLS, passwords and an ACL mounted into the container ----------------------------------
def _certificates(out: Path) -> None:
    """A CA and a server certificate for 127.0.0.1 (ca.crt, server.crt, server.key)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(subject: str, key, issuer: str, signer, ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    pem = serialization.Encoding.PEM
    (out / "ca.crt").write_bytes(cert("test CA", ca_key, "test CA", ca_key, True).public_bytes(pem))
    (out / "server.crt").write_bytes(
        cert("127.0.0.1", key, "test CA", ca_key, False).public_bytes(pem))
    (out / "server.key").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def _password_line(user: str, password: str) -> str:
    """A Mosquitto password file line in its salted SHA-512 format ($6$)."""
    salt = os.urandom(12)
    digest = hashlib.sha512(password.encode() + salt).digest()
    return f"{user}:$6${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}\n"


def _tls_client(ca: Path, user: str, password: str) -> mqtt.Client:
    # MQTT 3.1.1: Mosquitto 2.0.11 acknowledges a publish its ACL denies as if delivered (with
    # MQTT 5, paho now and then dropped the connection after such an acknowledgement)
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                         client_id=f"{user}-{os.urandom(4).hex()}", protocol=mqtt.MQTTv311)
    client.tls_set(ca_certs=str(ca), cert_reqs=ssl.CERT_REQUIRED)
    client.username_pw_set(user, password)
    return client


def _publish_connected(client: mqtt.Client, topic: str) -> None:
    """Publish at QoS 1 and wait for the PUBACK; under load Mosquitto 2.0.11 now and then drops
    a TLS client ("Bad socket read/write"): paho reconnects in the background, so try again."""
    deadline = time.monotonic() + 20
    while True:
        try:
            client.publish(topic, b"update", qos=1).wait_for_publish(5)
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.integration
def test_tls_passwords_and_acl_mounted_into_the_container(tmp_path: Path) -> None:
    _need_container()
    files = tmp_path / "files"
    files.mkdir(mode=0o755)
    _certificates(files)
    (files / "passwd").write_text(_password_line("coordinator", "c-secret")
                                  + _password_line("pi01", "p-secret"))
    (files / "acl").write_text("user coordinator\ntopic read fl/#\n\n"
                               "user pi01\ntopic write fl/r/up/pi01\n")
    for f in files.iterdir():
        f.chmod(0o644)  # Mosquitto reads them as its user, after dropping root
    etc = ContainerBroker.FILES
    config = (mosquitto_config("1883", log_dest="stderr")
              .replace("allow_anonymous true", "allow_anonymous false")
              + f"cafile {etc}/ca.crt\ncertfile {etc}/server.crt\nkeyfile {etc}/server.key\n"
              + f"password_file {etc}/passwd\nacl_file {etc}/acl\n")
    broker = ContainerBroker(tmp_path / "broker", config=config, files=files)
    clients: list[mqtt.Client] = []
    try:
        ca = files / "ca.crt"
        plain = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                            protocol=mqtt.MQTTv5)
        clients.append(plain)
        assert _connack(plain, broker.port, timeout=3) is None  # TLS only: no CONNACK
        wrong = _tls_client(ca, "pi01", "not-it")
        clients.append(wrong)
        assert _connack(wrong, broker.port) == 135  # Mosquitto 2.0.11: "not authorized"
        for refused in (plain, wrong):  # no reconnecting in the background
            refused.loop_stop()
        got: list[str] = []
        coordinator = _tls_client(ca, "coordinator", "c-secret")
        coordinator.on_message = lambda c, u, m: got.append(m.topic)
        clients.append(coordinator)
        assert _connack(coordinator, broker.port) == 0
        coordinator.subscribe("fl/#", qos=1)
        pi01 = _tls_client(ca, "pi01", "p-secret")
        clients.append(pi01)
        assert _connack(pi01, broker.port) == 0
        for topic in ("fl/r/up/pi02", "fl/r/up/pi01"):  # another's topic, then its own
            _publish_connected(pi01, topic)
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert set(got) == {"fl/r/up/pi01"}, got  # (a resend after a reconnect repeats it)
        assert broker._container.image == BROKER_IMAGE
    except BaseException:
        print(broker.log_text()[-3000:])
        raise
    finally:
        for client in clients:
            client.loop_stop()
            client.disconnect()
        broker.close()
