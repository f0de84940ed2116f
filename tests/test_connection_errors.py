"""A failed first connection says what happened, in one line (issue 20, item 4): refused,
timed out, TLS failure, bad credentials, not authorised, not MQTT. Against a real Mosquitto
on loopback (password file, TLS listener with a certificate of our own CA) and sockets of
this machine only.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import queue
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from test_integration import run_cli

from fleetfl.shared.config import load_agent_config
from fleetfl.shared.devtools.local_broker import BrokerError, LocalMosquitto, free_port
from fleetfl.shared.net import mqtt_auth
from fleetfl.shared.net.broker_url import parse_broker_url
from fleetfl.shared.net.transport import BrokerUnreachable, MqttLink

PASSWORD = "s3cret"


class ConfiguredMosquitto(LocalMosquitto):
    """LocalMosquitto with listener options of our own (TLS files, a password file)."""

    def __init__(self, options: str) -> None:
        super().__init__()
        self.options = options

    def _write_config(self) -> Path:
        conf = self.dir / "mosquitto.conf"
        user = "user root\n" if os.geteuid() == 0 else ""
        conf.write_text(f"{user}listener {self.port} {self.host}\n{self.options}"
                        f"persistence false\nlog_dest file {self.log_path}\nlog_type all\n")
        return conf


def _start(options: str) -> ConfiguredMosquitto:
    try:
        return ConfiguredMosquitto(options).start()
    except BrokerError as exc:
        pytest.skip(f"no mosquitto: {exc}")


def make_ca(directory: Path, name: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path = directory / f"{name}.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, path


def make_server_cert(directory: Path, ca_key, ca_cert) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "broker")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    crt, pem = directory / "server.crt", directory / "server.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.TraditionalOpenSSL,
                                      serialization.NoEncryption()))
    return crt, pem


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("certs")
    ca_key, ca_cert, ca = make_ca(d, "fleet-ca")
    _, _, other = make_ca(d, "other-ca")
    crt, key = make_server_cert(d, ca_key, ca_cert)
    for path in d.iterdir():
        path.chmod(0o644)
    return {"ca": ca, "other_ca": other, "cert": crt, "key": key}


@pytest.fixture(scope="module")
def tls_broker(certs):
    broker = _start(f"cafile {certs['ca']}\ncertfile {certs['cert']}\nkeyfile {certs['key']}\n"
                    "allow_anonymous true\n")
    yield broker
    broker.close()


@pytest.fixture(scope="module")
def password_broker(tmp_path_factory):
    d = tmp_path_factory.mktemp("passwd")
    passwd = d / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "pi01", PASSWORD], check=True,
                   capture_output=True)
    passwd.chmod(0o644)
    broker = _start(f"allow_anonymous false\npassword_file {passwd}\n")
    yield broker
    broker.close()


def password_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "pw"
    path.write_text(text + "\n")
    return str(path)


def failure(url: str, auth: mqtt_auth.MqttAuth | None = None, timeout: float = 10.0,
            durable: bool = False) -> tuple[BrokerUnreachable, float]:
    link = MqttLink(parse_broker_url(url), f"test-{time.time_ns()}", queue.Queue(),
                    auth=auth or mqtt_auth.MqttAuth(), durable_session=durable)
    t0 = time.monotonic()
    with pytest.raises(BrokerUnreachable) as info:
        link.connect(timeout=timeout)
    message = str(info.value)
    print(f"{info.value.cause}: {message}")  # the line the CLIs print, for the record
    assert "\n" not in message
    return info.value, time.monotonic() - t0


def test_refused_names_econnrefused():
    err, took = failure(f"mqtt://127.0.0.1:{free_port()}", timeout=1.0)
    assert err.cause == "refused"
    assert "cannot reach the MQTT broker" in str(err)  # as tests/test_integration.py expects
    assert "connection refused (ECONNREFUSED)" in str(err) and took < 5


@pytest.mark.parametrize("durable", [False, True])
def test_a_silent_listener_is_a_timeout(durable):
    """TCP connects (the kernel's backlog accepts it) but nothing ever answers CONNECT."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        err, took = failure(f"mqtt://127.0.0.1:{port}", timeout=1.0, durable=durable)
    assert err.cause == "timeout" and "timed out" in str(err) and "no CONNACK" in str(err)
    assert took < 15


def test_tcp_connect_timeout_is_named(monkeypatch):
    """A TCP connection that never completes (a dropped SYN: a host that is down, a
    firewall): paho's connect() raises TimeoutError after its connect timeout."""
    link = MqttLink(parse_broker_url("mqtt://127.0.0.1:1"), "t", queue.Queue(),
                    auth=mqtt_auth.MqttAuth())

    def dropped(*args, **kwargs):
        raise TimeoutError("timed out")

    monkeypatch.setattr(link.client, "connect", dropped)
    with pytest.raises(BrokerUnreachable, match=r"timed out: no answer to the TCP connection "
                                                r"within 5 s") as info:
        link.connect(timeout=0.2)
    assert info.value.cause == "timeout"


class AnsweringServer:
    """A TCP server on loopback that answers every connection's first bytes with `reply`
    and closes it: a stand-in for a server that is not a broker, or one that answers CONNECT
    with a given CONNACK."""

    def __init__(self, reply: bytes) -> None:
        self.reply, self.stop = reply, threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.url = f"mqtt://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.recv(1024)
                conn.sendall(self.reply)
                time.sleep(0.1)

    def __enter__(self) -> AnsweringServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()


def test_a_server_that_is_not_mqtt_is_named_at_once():
    """Issue 20's "unroutable" broker: something answered (here an HTTP 400, as the proxy of
    this machine's network does for any outside address) and paho saw a protocol error; it
    used to log four "Protocol error; reconnecting" lines and give up after 19 s."""
    with AnsweringServer(b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n"
                         b"content-length: 0\r\ndate: Sun, 06 Dec 2026 09:07:10 GMT\r\n"
                         b"server: a proxy, not a broker\r\n\r\n") as server:
        err, took = failure(server.url)
    assert err.cause == "protocol" and "not in MQTT" in str(err) and took < 5


@pytest.mark.parametrize("code, cause, words", [
    (0x86, "bad_credentials", "bad credentials: wrong user name or password"),
    (0x87, "not_authorised", "not authorised"),
    (0x8A, "connack", "refused user 'pi01' (CONNACK 0x8a Banned)"),
])
def test_connack_refusals_are_named(tmp_path, code, cause, words):
    """CONNACK reason codes as a broker sends them (MQTT 5: flags, reason, no properties)."""
    auth = mqtt_auth.MqttAuth(username="pi01", password_file=password_file(tmp_path, "pw"),
                              insecure_credentials=True)
    with AnsweringServer(bytes([0x20, 3, 0, code, 0])) as server:
        err, took = failure(server.url, auth)
    assert err.cause == cause and words in str(err) and took < 5
    assert f"CONNACK 0x{code:02x}" in str(err) and "'pi01'" in str(err)


def test_wrong_password_is_refused_by_mosquitto(password_broker, tmp_path):
    """Mosquitto 2.0 answers a wrong password with 0x87 Not authorized (not 0x86): the line
    says so, names the user and where the password came from."""
    auth = mqtt_auth.MqttAuth(username="pi01", password_file=password_file(tmp_path, "wrong"),
                              insecure_credentials=True)
    err, took = failure(password_broker.url, auth)
    assert err.cause == "not_authorised" and took < 5
    assert "'pi01'" in str(err) and "wrong password" in str(err) and "0x87" in str(err)


def test_no_username_is_not_authorised(password_broker):
    err, took = failure(password_broker.url, durable=True)
    assert err.cause == "not_authorised" and took < 5
    assert "no anonymous clients" in str(err) and "0x87" in str(err)


def test_the_right_password_connects(password_broker, tmp_path):
    auth = mqtt_auth.MqttAuth(username="pi01", password_file=password_file(tmp_path, PASSWORD),
                              insecure_credentials=True)
    link = MqttLink(parse_broker_url(password_broker.url), "ok", queue.Queue(), auth=auth)
    link.connect(timeout=10)
    link.close()


def test_agent_username_defaults_to_its_id(password_broker, tmp_path):
    """Item 3: fl-agent with a password file and no --username logs in as its agent id (the
    password here is wrong on purpose, so the broker's answer shows the name it was given)."""
    cfg = load_agent_config(None, {"agent_id": "pi01",
                                   "password_file": password_file(tmp_path, PASSWORD)})
    auth = mqtt_auth.resolve(cfg, {"FL_MQTT_INSECURE_CREDENTIALS": "1"})
    assert auth.username == "pi01"
    link = MqttLink(parse_broker_url(password_broker.url), "pi01", queue.Queue(), auth=auth)
    link.connect(timeout=10)
    link.close()
    proc = run_cli("fleetfl.agent.cli", "--broker", password_broker.url, "--agent-id", "pi01",
                   "--run", "r", "--password-file", password_file(tmp_path, "wrong"),
                   "--allow-insecure-credentials")
    assert proc.returncode == 2, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("fl-agent: error:")]
    print(lines)
    assert len(lines) == 1 and "not authorised: user 'pi01'" in lines[0]
    assert "needs a username" not in proc.stderr and "Traceback" not in proc.stderr


def test_wrong_ca_is_a_tls_failure(tls_broker, certs):
    auth = mqtt_auth.MqttAuth(tls_ca=str(certs["other_ca"]))
    err, took = failure(f"mqtts://127.0.0.1:{tls_broker.port}", auth)
    assert err.cause == "tls" and took < 5
    assert str(err).startswith("TLS failure") and "certificate verify failed" in str(err)
    assert "--tls-ca" in str(err)


def test_mqtts_without_ca_uses_the_system_store(tls_broker):
    """mqtts:// turns TLS on by itself, verified against the system CA store, which does not
    know our test CA: refused, not connected in clear or unverified."""
    err, _ = failure(f"mqtts://127.0.0.1:{tls_broker.port}")
    assert err.cause == "tls" and "certificate verify failed" in str(err)
    assert "system CA store does not trust" in str(err)


@pytest.mark.parametrize("scheme", ["mqtts", "mqtt"])
def test_tls_with_the_right_ca_connects(tls_broker, certs, scheme):
    """mqtts:// with --tls-ca, and (as before) mqtt:// with --tls-ca: TLS, verified."""
    auth = mqtt_auth.MqttAuth(tls_ca=str(certs["ca"]))
    link = MqttLink(parse_broker_url(f"{scheme}://127.0.0.1:{tls_broker.port}"), "tls",
                    queue.Queue(), auth=auth)
    link.connect(timeout=10)
    link.close()


def test_tls_to_a_plain_port_is_a_tls_failure(password_broker, certs):
    err, took = failure(f"mqtts://127.0.0.1:{password_broker.port}",
                        mqtt_auth.MqttAuth(tls_ca=str(certs["ca"])))
    assert err.cause == "tls" and took < 5


def test_plain_mqtt_to_a_tls_port_says_so(tls_broker):
    err, took = failure(f"mqtt://127.0.0.1:{tls_broker.port}", timeout=2.0)
    assert err.cause in ("closed", "protocol", "timeout") and "mqtts://" in str(err)
