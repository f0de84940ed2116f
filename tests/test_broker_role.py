"""Issue 14, findings 3 and 8, against the broker as ansible/roles/broker provisions it.

The role is applied to this machine as in the local fleet proof (tests/test_fleet.py:
supervisor mode, its own user, TLS, password file, ACL), but the broker alone; the client
certificates come from the agent and coordinator roles' own certificate tasks. Checked: the
memory limits are consistent (Mosquitto refuses before the kernel kills it), an agent cannot
park retained messages (made-up chunk levels are refused by the ACL, and what it parks on its
own topics is cleared by the coordinator), and a certificate speaks only for its own agent.
Needs root (the role creates the broker's user), like the fleet proof.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from conftest import require_root_and_mosquitto
from test_fleet import (
    ANSIBLE,
    BIN,
    _ansible_tool,
    _connack,
    _env,
    _mqtt_client,
    _puback,
    _supervisor,
)

from fleetfl.shared.devtools.local_broker import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]
RUN = "local"
AGENTS = ("pi01", "pi02")
MIB = 1024 * 1024


def _role_task(role: str, name: str) -> dict:
    """A task of a role as shipped, so the test issues certificates exactly as the role does."""
    tasks = yaml.safe_load((ANSIBLE / "roles" / role / "tasks" / "main.yml").read_text())
    return next(t for t in tasks if t.get("name") == name)


def _apply(root: Path, port: int, tag: str, agents: tuple[str, ...] = AGENTS,
           extra: dict | None = None) -> None:
    inventory = {"all": {
        "vars": {"ansible_connection": "local",
                 "ansible_python_interpreter": "{{ ansible_playbook_python }}",
                 "ansible_become": False, "fleet_name": "brokertest", "fleet_run": RUN,
                 "fleet_service_manager": "supervisor",
                 "fleet_supervisor_python": "{{ ansible_playbook_python }}",
                 "fleet_root": f"{root}/{{{{ inventory_hostname }}}}",
                 "fleet_unit_prefix": f"{tag}-", "fleet_secrets_dir": f"{root}/secrets",
                 "fleet_broker_host": "127.0.0.1", "fleet_broker_port": port,
                 "fleet_group": "root", **(extra or {})},
        "children": {
            "broker": {"hosts": {"server": None},
                       "vars": {"fleet_broker_install_package": False,
                                "fleet_broker_manage_user": True,
                                "fleet_broker_user": f"{tag}-mosquitto",
                                "fleet_broker_group": f"{tag}-mosquitto",
                                "fleet_broker_bind": "127.0.0.1"}},
            "coordinator": {"hosts": {"server": None}},
            "agents": {"hosts": dict.fromkeys(agents),
                       "vars": {"fleet_agent_id": "{{ inventory_hostname }}"}}}}}
    folder = {"name": "Configuration folder", "ansible.builtin.file": {
        "path": "{{ fleet_etc }}", "state": "directory", "mode": "0755"}}
    play = [
        {"name": "Broker", "hosts": "broker", "gather_facts": False, "roles": ["broker"]},
        {"name": "Agent certificates", "hosts": "agents", "gather_facts": False,
         "pre_tasks": [{"name": "Common defaults", "ansible.builtin.import_role":
                        {"name": "common", "tasks_from": "defaults"}}, folder],
         "tasks": [_role_task("agent", "Agent certificate")]},
        {"name": "Coordinator certificate", "hosts": "coordinator", "gather_facts": False,
         "tasks": [_role_task("coordinator", "Coordinator certificate")]},
    ]
    (root / "inventory.yml").write_text(yaml.safe_dump(inventory, sort_keys=False))
    (root / "broker.yml").write_text(yaml.safe_dump(play, sort_keys=False))
    proc = subprocess.run([_ansible_tool("ansible-playbook"), "-i", str(root / "inventory.yml"),
                           str(root / "broker.yml")], cwd=root, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


def _wait_for_broker(port: int, timeout: float = 30.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"the provisioned broker does not listen on {port}")


@contextmanager
def provisioned_broker(agents: tuple[str, ...] = AGENTS,
                       extra: dict | None = None) -> Iterator[dict]:
    """The role applied for `agents` (skips unless root with mosquitto), removed afterwards;
    also used by tests/test_hostile_fleet.py with a 16-agent roster."""
    require_root_and_mosquitto("the broker role creates its user: run as root (CI does)")
    root = Path(tempfile.mkdtemp(prefix="fleetfl-broker-", dir="/tmp"))
    root.chmod(0o755)  # the broker's user traverses it
    port, tag = free_port(), f"b{os.getpid() % 100000}"
    try:
        _apply(root, port, tag, agents, extra)
        _wait_for_broker(port)
        yield {"root": root, "port": port, "tag": tag}
    finally:
        if (root / "server/var/lib/fleet-supervisor").exists():
            _supervisor(root, "server", "stop")
        subprocess.run(["userdel", f"{tag}-mosquitto"], capture_output=True)
        subprocess.run(["groupdel", f"{tag}-mosquitto"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


# A fleet larger than the inventory (devices that join without being listed): the broker's
# limits follow fleet_broker_fleet_size (issue 21).
FLEET_SIZE = 400


@pytest.fixture(scope="module")
def broker() -> Iterator[dict]:
    with provisioned_broker(extra={"fleet_broker_fleet_size": FLEET_SIZE}) as provisioned:
        yield provisioned


def _identity(broker: dict, host: str) -> dict[str, Path]:
    etc = broker["root"] / host / "etc/fleetfl"
    name = "coordinator" if host == "server" else f"agent-{host}"
    user = "coordinator" if host == "server" else host
    return {"cert": etc / f"{name}.crt", "key": etc / f"{name}.key",
            "password": broker["root"] / "secrets/passwords" / user,
            "ca": broker["root"] / "server/etc/fleetfl/ca.crt"}


def _client(broker: dict, cert_of: str, username: str, password_of: str):
    """Connected with `cert_of`'s certificate, user name `username` and `password_of`'s
    password (so they can be mixed)."""
    cert, creds = _identity(broker, cert_of), _identity(broker, password_of)
    client = _mqtt_client(cert["ca"], username, creds["password"].read_text().split()[0],
                          cert["cert"], cert["key"])
    rc = _connack(client, broker["port"])
    assert rc is not None and not rc.is_failure, (cert_of, username, rc)
    return client


def _close(client) -> None:
    client.disconnect()
    client.loop_stop()


# -- finding 3: memory limits --------------------------------------------------------------

def _bytes(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    number, unit = re.fullmatch(r"(\d+)([KMG]?)", text.strip()).groups()
    return int(number) * units[unit]


def test_mosquitto_refuses_before_the_kernel_kills_it(broker):
    """The unit's MemoryMax was 512M, Mosquitto's memory_limit 1 GiB: the kernel killed the
    broker before Mosquitto's own refusal could fire. The limit must sit below MemoryMax,
    with room for what Mosquitto does not count (TLS buffers, allocator, the binary)."""
    server = broker["root"] / "server"
    conf = (server / "etc/mosquitto/conf.d/fleetfl.conf").read_text()
    dropin = (server / "etc/systemd/system/mosquitto.service.d/fleetfl.conf").read_text()
    limit = int(re.search(r"^memory_limit (\d+)$", conf, re.M)[1])
    memory_max = _bytes(re.search(r"^MemoryMax=(\S+)$", dropin, re.M)[1])
    assert 0 < limit <= memory_max - 64 * MIB, (limit, memory_max)


# -- finding 3: parking retained messages ---------------------------------------------------

def test_made_up_chunk_levels_are_refused_by_the_acl(broker):
    """`up/%u/chunk/+` let an agent keep any number of retained messages under levels such as
    chunk/not-a-number or chunk/4294967295. Only the indices a message can need are open."""
    pi01 = _client(broker, "pi01", "pi01", "pi01")
    try:
        for kind in ("up", "status"):
            for level in ("not-a-number", "4294967295", "2"):
                topic = f"fl/{RUN}/{kind}/pi01/chunk/{level}"
                assert _puback(pi01, topic, payload=b"parked", retain=True) == 0x87, topic
            for index in (0, 1):  # a 64 MiB message at the default packet limit: two chunks
                topic = f"fl/{RUN}/{kind}/pi01/chunk/{index}"
                assert _puback(pi01, topic, payload=b"", retain=True) < 0x80, topic
    finally:
        _close(pi01)


def _retained(broker: dict, timeout: float = 1.5) -> dict[str, int]:
    """Retained messages under up/ and status/ (topic -> bytes), as a new coordinator session
    would get them."""
    got: dict[str, int] = {}
    client = _client(broker, "server", "coordinator", "server")
    client.on_message = lambda c, u, m: got.__setitem__(m.topic, len(m.payload)) \
        if m.retain and m.payload else None
    try:
        client.subscribe([(f"fl/{RUN}/up/#", 1), (f"fl/{RUN}/status/#", 1)])
        time.sleep(timeout)
    finally:
        _close(client)
    return got


def _coordinator(broker: dict, tmp_path: Path) -> subprocess.Popen:
    ident = _identity(broker, "server")
    log = open(tmp_path / "coordinator.log", "wb")  # noqa: SIM115 (closed with the process)
    args = [str(BIN / "fl-coordinator"), "--broker", f"mqtt://127.0.0.1:{broker['port']}",
            "--run", RUN, "--run-dir", str(tmp_path / "runs"), "--min-agents", "1",
            "--tls-ca", str(ident["ca"]), "--tls-cert", str(ident["cert"]),
            "--tls-key", str(ident["key"]), "--username", "coordinator",
            "--password-file", str(ident["password"])]
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    log.close()
    deadline = time.monotonic() + 120
    while "waiting for agents" not in (tmp_path / "coordinator.log").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, \
            (tmp_path / "coordinator.log").read_text()[-3000:]
        time.sleep(0.2)
    return proc


def test_retained_messages_an_agent_parks_do_not_survive_a_coordinator_session(
        broker, tmp_path):
    """An agent publishes retained data on the topics the ACL leaves it: its update topic and
    its chunks (never retained by a real agent), a garbage status chunk, an oversized status.
    The coordinator clears them when its session gets them, and clears a retained update
    published while it runs; a later session finds none of them."""
    up, status = f"fl/{RUN}/up/pi01", f"fl/{RUN}/status/pi01"
    parked = {up: b"parked update", f"{up}/chunk/0": b"FLCK parked chunk",
              f"{up}/chunk/1": os.urandom(1000), f"{status}/chunk/1": b"not a chunk",
              status: os.urandom(MIB)}  # a real status (hello, offline) is a few hundred bytes
    pi01 = _client(broker, "pi01", "pi01", "pi01")
    try:
        for topic, payload in parked.items():
            assert _puback(pi01, topic, payload=payload, retain=True) < 0x80, topic
        assert set(parked) <= set(_retained(broker))  # the broker keeps them until cleared
        coordinator = _coordinator(broker, tmp_path)
        try:
            assert _puback(pi01, up, payload=b"parked while it runs", retain=True) < 0x80
            time.sleep(1.0)
        finally:
            coordinator.terminate()
            coordinator.wait(30)
    finally:
        _close(pi01)
    log = (tmp_path / "coordinator.log").read_text()
    assert _retained(broker) == {}, log[-3000:]
    assert log.count("cleared a retained message") == len(parked) + 1, log[-3000:]


# -- issue 21: limits that follow the fleet -------------------------------------------------

def _broker_pid(broker: dict) -> int:
    conf = str(broker["root"] / "server/etc/mosquitto/mosquitto.conf")
    found = subprocess.run(["pgrep", "-f", f"mosquitto -c {conf}"], capture_output=True,
                           text=True).stdout.split()
    assert len(found) == 1, found
    return int(found[0])


def test_the_broker_may_hold_a_connection_per_device(broker):
    """systemd's default soft limit of 1,024 open files refused the 1,021st device; the
    unit's LimitNOFILE= (applied by the supervisor here as systemd would) follows the fleet."""
    dropin = (broker["root"] / "server/etc/systemd/system/mosquitto.service.d/fleetfl.conf")
    rendered = int(re.search(r"^LimitNOFILE=(\d+)$", dropin.read_text(), re.M)[1])
    assert rendered == max(65536, 4 * FLEET_SIZE + 1024)
    limits = Path(f"/proc/{_broker_pid(broker)}/limits").read_text()
    soft = int(re.search(r"^Max open files\s+(\d+)", limits, re.M)[1])
    # a host whose root lacks CAP_SYS_RESOURCE (this sandbox: hard limit 20,000) caps it
    assert soft == min(rendered, resource.getrlimit(resource.RLIMIT_NOFILE)[1]), limits


def test_memory_the_broker_does_not_count_fits_what_the_role_leaves(broker):
    """Mosquitto's memory_limit does not count OpenSSL's state per TLS connection: the role
    keeps 128 MiB plus fleet_broker_tls_bytes_per_agent per agent of MemoryMax outside it
    (with a fixed 128 MiB, about 5,400 TLS agents would have taken the broker past MemoryMax).
    Measured: 300 more TLS connections to the provisioned broker."""
    import socket
    import ssl

    server = broker["root"] / "server"
    conf = (server / "etc/mosquitto/conf.d/fleetfl.conf").read_text()
    dropin = (server / "etc/systemd/system/mosquitto.service.d/fleetfl.conf").read_text()
    limit = int(re.search(r"^memory_limit (\d+)$", conf, re.M)[1])
    memory_max = _bytes(re.search(r"^MemoryMax=(\S+)$", dropin, re.M)[1])
    per_agent = 49152  # fleet_broker_tls_bytes_per_agent's default
    assert memory_max - limit >= 128 * MIB + FLEET_SIZE * per_agent
    ident = _identity(broker, "pi01")
    ctx = ssl.create_default_context(cafile=str(ident["ca"]))
    ctx.load_cert_chain(str(ident["cert"]), str(ident["key"]))
    pid, socks = _broker_pid(broker), []

    def rss() -> int:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)[1]) * 1024

    before = rss()
    try:
        for i in range(300):
            sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", broker["port"])),
                                   server_hostname="127.0.0.1")
            client_id = f"tls-mem-{i:04d}".encode()
            body = b"\x00\x04MQTT\x05\x02\x00\x3c\x00" + len(client_id).to_bytes(2, "big") \
                + client_id  # MQTT 5 CONNECT, clean start, no properties
            sock.sendall(bytes([0x10, len(body)]) + body)
            assert sock.recv(16)[:1] == b"\x20"  # CONNACK
            socks.append(sock)
        time.sleep(0.5)
        per_connection = (rss() - before) / len(socks)
    finally:
        for sock in socks:
            sock.close()
    assert 0 < per_connection <= per_agent, per_connection


def test_a_rounds_updates_wait_in_the_broker_for_a_busy_coordinator(broker):
    """Mosquitto drops a QoS 1 message beyond a client's queue (max_queued_messages) after it
    acknowledged it to the sender. A synchronous round puts one update per agent in the
    coordinator's queue at once (and all of them while it restarts): the role's fixed 1,000
    lost every update past the 1,020th of a round (20 in flight). Now the queue follows the
    fleet: 1,500 updates sent while the coordinator's session is away all arrive."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    sent = 1500
    assert sent > 1000 + 20 and sent <= 4 * FLEET_SIZE
    ident = _identity(broker, "server")
    password = ident["password"].read_text().split()[0]
    got: list[int] = []
    connected = threading.Event()

    def session():  # the coordinator's durable session, as fl-coordinator opens it
        client = _mqtt_client(ident["ca"], "coordinator", password, ident["cert"],
                              ident["key"], client_id="fleet-test-busy-coordinator")
        client.on_connect = lambda c, u, f, rc, p: connected.set()
        client.on_message = lambda c, u, m: got.append(len(m.payload))
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        client.connect("127.0.0.1", broker["port"], keepalive=30, clean_start=False,
                       properties=props)
        client.loop_start()
        assert connected.wait(10)
        return client

    coordinator = session()
    assert _suback_rc(coordinator, f"fl/{RUN}/up/+") == 1
    _close(coordinator)  # away: the broker queues what arrives for its session
    pi01 = _client(broker, "pi01", "pi01", "pi01")
    try:
        acked = _publish_many(pi01, f"fl/{RUN}/up/pi01", sent)
    finally:
        _close(pi01)
    assert acked == sent
    connected.clear()
    coordinator = session()
    try:
        deadline = time.monotonic() + 60
        while len(got) < sent and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # and nothing more
    finally:
        _close(coordinator)
    assert len(got) == sent


def _suback_rc(client, topic: str) -> int:
    done, codes = threading.Event(), []
    client.on_subscribe = lambda c, u, mid, rcs, p: (codes.extend(rcs), done.set())
    client.subscribe(topic, qos=1)
    assert done.wait(10), topic
    return codes[0].value


def _publish_many(client, topic: str, count: int) -> int:
    """`count` QoS 1 publishes; the number the broker acknowledged with success."""
    acked, done = [], threading.Event()

    def on_publish(c, u, mid, reason_code, props):
        acked.append(reason_code.value < 0x80)
        if len(acked) == count:
            done.set()

    client.on_publish = on_publish
    for i in range(count):
        client.publish(topic, i.to_bytes(4, "big") * 64, qos=1)
    assert done.wait(60), len(acked)
    return sum(acked)


# -- finding 8: certificate and user bound --------------------------------------------------

def test_a_certificate_speaks_only_for_its_own_agent(broker):
    """Any fleet certificate worked with any agent's password. Now the certificate's CN is
    the MQTT user: pi02's certificate with pi01's user name and password is pi02 to the broker,
    refused on pi01's topics (PUBACK 0x87), whatever it claims."""
    mixed = _client(broker, "pi02", "pi01", "pi01")
    try:
        assert _puback(mixed, f"fl/{RUN}/up/pi01") == 0x87
        assert _puback(mixed, f"fl/{RUN}/status/pi01") == 0x87
        assert _puback(mixed, f"fl/{RUN}/up/pi02") < 0x80  # it is pi02, and only pi02
    finally:
        _close(mixed)
    # the coordinator's rights go with the coordinator's certificate, not its password
    posing = _client(broker, "pi01", "coordinator", "server")
    try:
        assert _puback(posing, f"fl/{RUN}/down/avg") == 0x87
    finally:
        _close(posing)
    coordinator = _client(broker, "server", "coordinator", "server")
    try:
        assert _puback(coordinator, f"fl/{RUN}/down/avg") < 0x80
    finally:
        _close(coordinator)


def test_the_acl_and_listener_as_rendered(broker):
    """What the tests above rely on, in the files the role wrote."""
    etc = broker["root"] / "server/etc/mosquitto"
    conf = (etc / "conf.d/fleetfl.conf").read_text()
    assert "\nuse_identity_as_username true\n" in conf and "\nrequire_certificate true\n" in conf
    rules = [line for line in (etc / "fleetfl/acl").read_text().splitlines()
             if line and not line.startswith("#")]
    agents = rules[:rules.index("user coordinator")]
    assert agents and all(line.startswith("pattern ") for line in agents)
    assert not [line for line in agents if line.endswith(("/+", "/#")) and "write" in line]
