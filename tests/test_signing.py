"""Issue 8 item 3: Ed25519 signed messages (shared/wire/signing.py and codec.py), unit tests and
runs against the real broker."""

from __future__ import annotations

import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from fleet_helpers import hello
from test_integration import finish, make_fleet, wait_for_version

from fleetfl.shared.config import ConfigError, load_agent_config, load_config
from fleetfl.shared.core.averaging import WindowAveraging
from fleetfl.shared.core.base import Rejected
from fleetfl.shared.core.messages import COORDINATOR_ID, Kind, Message
from fleetfl.shared.wire.codec import CodecError, DecodeContext, decode, encode
from fleetfl.shared.wire.layout import split
from fleetfl.shared.wire.signing import (
    SIGNATURE_BYTES,
    KeyFileError,
    KeyRing,
    Signer,
    keygen_main,
    load_private_key,
    load_public_key,
    public_b64,
    public_pem,
    write_key_pair,
)
from fleetfl.shared.wire.topics import Topics

RUN = "r1"
D = 16


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Signer]:
    folder = tmp_path_factory.mktemp("keys")
    return {name: Signer.from_file(write_key_pair(name, folder)[0])
            for name in ("pi01", "pi02", COORDINATOR_ID)}


@pytest.fixture(scope="module")
def ring(keys) -> KeyRing:
    return KeyRing({name: s.public_key for name, s in keys.items() if name != COORDINATOR_ID})


def ctx(ring: KeyRing | None, **kw) -> DecodeContext:
    return DecodeContext(RUN, D, keys=ring, **kw)


def update(sender: str = "pi01", seq: int = 1000, base: int = 0, delta=None) -> Message:
    return Message(Kind.UPDATE, RUN, sender, seq, base, {"window": 1, "samples": 5, "steps": 2},
                   {"delta": np.arange(D, dtype=np.float32) if delta is None else delta})


def refused(payload: bytes, context: DecodeContext) -> str:
    with pytest.raises(CodecError) as exc:
        decode(payload, context)
    return exc.value.reason


# -- the codec ----------------------------------------------------------------------------

def test_signed_round_trip(keys, ring):
    msg = update()
    payload = encode(msg, keys["pi01"])
    # sig + ts/sig header keys (version 1: no padding that the longer header could shift)
    assert len(encode(msg, keys["pi01"], proto=1)) == \
        len(encode(msg, proto=1)) + SIGNATURE_BYTES + 24
    back = decode(payload, ctx(ring))
    assert (back.kind, back.sender, back.seq, back.fields) == (msg.kind, "pi01", 1000,
                                                              msg.fields)
    np.testing.assert_array_equal(back["delta"], msg["delta"])
    assert not back["delta"].flags.writeable  # still a view of the payload, not a copy


def test_signed_messages_decode_without_keys_and_unsigned_stays_as_it_was(keys):
    msg = update()
    assert decode(encode(msg, keys["pi01"]), ctx(None)).seq == 1000  # e.g. the simulator
    plain = encode(msg)
    assert b"ts" not in plain and b"ed25519" not in plain  # unsigned wire format unchanged
    assert decode(plain, ctx(None)).seq == 1000


def test_what_is_signed_is_the_documented_digest(keys):
    import hashlib

    from fleetfl.shared.wire.signing import DOMAIN

    payload = encode(update(), keys["pi01"], ts=1234.5)
    _, header, _ = split(payload)  # version 2: after the 8-byte prefix
    assert (header["ts"], header["sig"]) == (1234.5, "ed25519")
    signed, sig = payload[:-SIGNATURE_BYTES], payload[-SIGNATURE_BYTES:]
    keys["pi01"].public_key.verify(sig, DOMAIN + hashlib.sha256(signed).digest())


def test_unsigned_refused_when_keys_are_configured(ring):
    assert refused(encode(update()), ctx(ring)) == "unsigned"


def test_unknown_key(keys, ring):
    # the coordinator's key is not in the agents' ring; a sender with no entry is refused
    msg = update(sender="pi03")
    assert refused(encode(msg, keys["pi01"]), ctx(ring)) == "unknown_key"


def test_signed_by_another_agents_key(keys, ring):
    assert refused(encode(update(sender="pi01"), keys["pi02"]), ctx(ring)) == "bad_signature"


def test_tampered_array_byte(keys, ring):
    payload = bytearray(encode(update(), keys["pi01"]))
    payload[-SIGNATURE_BYTES - 3] ^= 0x01  # a byte of the last float
    assert refused(bytes(payload), ctx(ring)) == "bad_signature"


def test_tampered_signature_byte(keys, ring):
    payload = bytearray(encode(update(), keys["pi01"]))
    payload[-1] ^= 0x80
    assert refused(bytes(payload), ctx(ring)) == "bad_signature"


@pytest.mark.parametrize("field, old, new", [
    ("seq", 1000, 1001),          # a replay dressed up as a new message
    ("base_version", 7, 8),       # looks fresher than it is
])
def test_tampered_envelope(keys, ring, field, old, new):
    msg = update(seq=1000, base=7)
    payload = encode(msg, keys["pi01"])
    before = msgpack.packb(field) + msgpack.packb(old)
    after = msgpack.packb(field) + msgpack.packb(new)
    assert payload.count(before) == 1 and len(before) == len(after)
    assert refused(payload.replace(before, after), ctx(ring)) == "bad_signature"


def test_refreshed_timestamp_breaks_the_signature(keys, ring):
    old = time.time() - 1000
    payload = encode(update(), keys["pi01"], ts=old)
    fresh = payload.replace(msgpack.packb(old), msgpack.packb(time.time()))
    assert fresh != payload
    assert refused(fresh, ctx(ring)) == "bad_signature"


def test_too_old_and_from_the_future(keys, ring):
    now = time.time()
    assert refused(encode(update(), keys["pi01"], ts=now - 301), ctx(ring)) == "too_old"
    assert refused(encode(update(), keys["pi01"], ts=now - 20), ctx(ring, max_age_s=10)) \
        == "too_old"
    assert decode(encode(update(), keys["pi01"], ts=now - 250), ctx(ring)).seq == 1000
    assert refused(encode(update(), keys["pi01"], ts=now + 120), ctx(ring)) == "from_future"
    assert decode(encode(update(), keys["pi01"], ts=now + 30), ctx(ring)).seq == 1000  # skew


def test_ageless_kinds_skip_only_the_age_check(keys, ring):
    """The agent's last will is signed at start and fired by the broker much later."""
    will = Message(Kind.OFFLINE, RUN, "pi01", 5, 0)
    old = encode(will, keys["pi01"], ts=time.time() - 86400)
    assert refused(old, ctx(ring)) == "too_old"
    lenient = ctx(ring, ageless=frozenset({Kind.OFFLINE}))
    assert decode(old, lenient).kind is Kind.OFFLINE
    assert refused(encode(will, keys["pi02"], ts=time.time() - 86400), lenient) \
        == "bad_signature"
    assert refused(encode(update(), keys["pi01"], ts=time.time() - 86400), lenient) == "too_old"


def test_stripped_or_cut_signature(keys, ring):
    payload = encode(update(), keys["pi01"])
    assert refused(payload[:-1], ctx(ring)) == "truncated"
    assert refused(payload[:-SIGNATURE_BYTES], ctx(None)) == "truncated"
    # signature and its header keys removed: an unsigned message, refused as such
    assert refused(encode(update()), ctx(ring)) == "unsigned"


def test_bad_signature_header_fields(keys, ring):
    payload = encode(update(), keys["pi01"], ts=1.5)
    assert refused(payload.replace(b"\xa7ed25519", b"\xa7ed44800"), ctx(None)) == "malformed"
    as_int = payload.replace(msgpack.packb("ts") + msgpack.packb(1.5),
                             msgpack.packb("ts") + msgpack.packb(2**62))
    assert refused(as_int, ctx(None)) == "bad_type"


def test_coordinator_keys_verify_downstream(keys, tmp_path):
    pub = tmp_path / "coordinator.pub"
    pub.write_text(public_pem(keys[COORDINATOR_ID].public_key))
    agent_side = DecodeContext(RUN, D, keys=KeyRing.coordinator(pub))
    avg = Message(Kind.AVG, RUN, COORDINATOR_ID, 9, 0,
                  {"window": 1, "version": 1, "contributors": ["pi01"]},
                  {"delta": np.zeros(D, np.float32)})
    assert decode(encode(avg, keys[COORDINATOR_ID]), agent_side).kind is Kind.AVG
    assert refused(encode(avg, keys["pi01"]), agent_side) == "bad_signature"
    assert refused(encode(avg), agent_side) == "unsigned"
    forged = Message(Kind.AVG, RUN, "pi01", 9, 0, avg.fields, avg.arrays)
    assert refused(encode(forged, keys["pi01"]), agent_side) == "unknown_key"


def test_a_replayed_signed_update_is_refused_by_sequence_number(keys, ring):
    """The signature is valid and fresh: the coordinator's sequence check refuses it."""
    core = WindowAveraging(params=np.zeros(D, np.float32), run=RUN, job={}, min_agents=2)
    context = ctx(ring)
    for name in ("pi01", "pi02"):
        core.on_message(decode(encode(hello(RUN, name, 10, seq=1), keys[name]), context), 0.0)
    payload = encode(update("pi01", seq=2), keys["pi01"])
    core.on_message(decode(payload, context), 0.0)
    with pytest.raises(Rejected) as exc:
        core.on_message(decode(payload, context), 0.0)  # decodes fine: same bytes
    assert exc.value.reason == "replayed"


# -- keys, key lists, fl-keygen, config -------------------------------------------------------

def test_openssl_keys_load_and_interoperate(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    key, pub = tmp_path / "a.key", tmp_path / "a.pub"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(key)], check=True)
    subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout", "-out", str(pub)],
                   check=True)
    signer = Signer.from_file(key)
    ring = KeyRing({"pi01": load_public_key(pub)})
    assert decode(encode(update(), signer), ctx(ring)).sender == "pi01"
    # and ours read back by openssl
    ours, _ = write_key_pair("pi09", tmp_path)
    out = subprocess.run(["openssl", "pkey", "-in", str(ours), "-pubout"], check=True,
                         capture_output=True, text=True).stdout
    assert out == public_pem(load_private_key(ours).public_key())


def test_key_list_yaml_with_pem_and_base64(keys, tmp_path):
    pem = public_pem(keys["pi01"].public_key)
    path = tmp_path / "agents.yaml"
    path.write_text("pi01: |\n" + "".join(f"  {line}\n" for line in pem.splitlines())
                    + f"pi02: {public_b64(keys['pi02'].public_key)}\n")
    ring = KeyRing.from_file(path)
    assert len(ring) == 2 and "pi01" in ring and "pi02" in ring
    assert decode(encode(update("pi02"), keys["pi02"]), ctx(ring)).sender == "pi02"


@pytest.mark.parametrize("text, message", [
    ("", "must map ids"),
    ("- pi01\n", "must map ids"),
    ("pi01: [1]\n", "not a string"),
    ("pi01: notbase64!\n", "not a PEM or base64"),
    ("pi01: AAAA\n", "not a PEM or base64"),  # 3 bytes, not 32
    ("'bad/id': AAAA\n", "not a valid id"),
    ("pi01: [unclosed\n", "not valid YAML"),
])
def test_bad_key_lists(tmp_path, text, message):
    path = tmp_path / "agents.yaml"
    path.write_text(text)
    with pytest.raises(KeyFileError, match=message):
        KeyRing.from_file(path)


def test_bad_key_files(tmp_path):
    with pytest.raises(KeyFileError, match="cannot read private key"):
        load_private_key(tmp_path / "missing.key")
    (tmp_path / "junk.key").write_text("junk")
    with pytest.raises(KeyFileError, match="not an unencrypted PEM"):
        load_private_key(tmp_path / "junk.key")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    other = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ec.key").write_bytes(other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    with pytest.raises(KeyFileError, match="not an Ed25519"):
        load_private_key(tmp_path / "ec.key")
    (tmp_path / "ec.pub").write_bytes(other.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(KeyFileError, match="not an Ed25519"):
        load_public_key(tmp_path / "ec.pub")


def test_fl_keygen(tmp_path, capsys):
    assert keygen_main(["pi01", "--dir", str(tmp_path), "--key-list",
                        str(tmp_path / "agents.yaml")]) == 0
    assert keygen_main(["pi02", "--dir", str(tmp_path), "--key-list",
                        str(tmp_path / "agents.yaml")]) == 0
    assert stat.S_IMODE((tmp_path / "pi01.key").stat().st_mode) == 0o600
    ring = KeyRing.from_file(tmp_path / "agents.yaml")
    assert len(ring) == 2
    signer = Signer.from_file(tmp_path / "pi02.key")
    assert decode(encode(update("pi02"), signer), ctx(ring)).sender == "pi02"
    before = (tmp_path / "pi01.key").read_bytes()
    assert keygen_main(["pi01", "--dir", str(tmp_path)]) == 2  # never overwrites by accident
    assert "exists" in capsys.readouterr().err
    assert (tmp_path / "pi01.key").read_bytes() == before
    assert keygen_main(["pi01", "--dir", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "pi01.key").read_bytes() != before


def test_config_checks_key_files(tmp_path, keys):
    priv, pub = write_key_pair("coordinator", tmp_path)
    listing = tmp_path / "agents.yaml"
    listing.write_text(f"pi01: {public_b64(keys['pi01'].public_key)}\n")
    cfg = load_config(None, {"signing_key": str(priv), "agent_keys": str(listing),
                             "max_message_age": 60})
    assert cfg.max_message_age == 60.0
    with pytest.raises(ConfigError, match="signing_key: cannot read private key"):
        load_config(None, {"signing_key": str(tmp_path / "nope.key")})
    with pytest.raises(ConfigError, match="agent_keys: .*not an unencrypted|agent_keys: key"):
        load_config(None, {"agent_keys": str(priv)})  # a private key is no key list
    with pytest.raises(ConfigError, match="max_message_age"):
        load_config(None, {"max_message_age": 0})
    agent = load_agent_config(None, {"agent_id": "pi01", "signing_key": str(priv),
                                     "coordinator_key": str(pub)})
    assert agent.coordinator_key == str(pub)
    with pytest.raises(ConfigError, match="coordinator_key: .*not a PEM"):
        load_agent_config(None, {"agent_id": "pi01", "coordinator_key": str(listing)})
    with pytest.raises(ConfigError, match="signing_key"):
        load_agent_config(None, {"agent_id": "pi01", "signing_key": str(pub)})


# -- against the real broker --------------------------------------------------------------

class Mallory:
    """Valid broker access (the test broker has no ACL), but none of the fleet's keys."""

    def __init__(self, broker, run: str) -> None:
        self.topics = Topics(run)
        self.captured: list[bytes] = []
        self.got = threading.Event()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id="mallory-signing", protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        self.captured.append(message.payload)
        self.got.set()

    def capture(self, topic: str, timeout: float = 60) -> bytes:
        self.client.subscribe(topic, qos=1)
        assert self.got.wait(timeout), f"nothing on {topic}"
        self.client.unsubscribe(topic)
        return self.captured[0]

    def send(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _fleet_keys(folder: Path, agents: list[str]) -> tuple[Path, Path, Path]:
    """Agent key pairs, the coordinator's, and the key list (fl-keygen, as an operator would)."""
    listing = folder / "agents.yaml"
    for name in agents:
        assert keygen_main([name, "--dir", str(folder), "--key-list", str(listing)]) == 0
    assert keygen_main([COORDINATOR_ID, "--dir", str(folder)]) == 0
    return folder / "coordinator.key", folder / "coordinator.pub", listing


@pytest.mark.integration
def test_signed_run_refuses_forged_unsigned_and_replayed_updates(broker, tmp_path):
    run, agents = "signed", ["agent0", "agent1", "agent2", "agent3"]
    keydir = tmp_path / "keys"
    coord_key, coord_pub, listing = _fleet_keys(keydir, agents)
    _, wrong_pub = write_key_pair("impostor", keydir)  # not the coordinator's key
    args = ["--algo", "fedavg", "--dataset", "digits", "--min-agents", "3",
            "--max-versions", "40", "--local-steps", "40", "--window-timeout", "20",
            "--signing-key", str(coord_key), "--agent-keys", str(listing)]
    d = 64 * 64 + 64 + 64 * 10 + 10  # the digits MLP
    with make_fleet(broker, tmp_path, run, args) as fleet:
        fleet.start_coordinator()
        for i in range(3):
            fleet.start_agent(i, 3, extra=["--signing-key", str(keydir / f"agent{i}.key"),
                                           "--coordinator-key", str(coord_pub)])
        # a fourth agent that trusts the wrong coordinator key: refuses everything it gets
        wrong = fleet.start_agent(3, 4, extra=["--signing-key", str(keydir / "agent3.key"),
                                               "--coordinator-key", str(wrong_pub)])
        wait_for_version(fleet, tmp_path / "runs", 3, timeout=180)
        m = Mallory(broker, run)
        topics = m.topics
        captured = m.capture(topics.up("agent1"))  # a real, signed, accepted update
        forger = Signer.from_file(keydir / "agent2.key")  # right topic, wrong agent's key
        seq = time.time_ns() // 1000 + 10**9  # would lock agent0 out if it were accepted
        forged = Message(Kind.UPDATE, run, "agent0", seq, 0,
                         {"window": 1, "samples": 5, "steps": 1},
                         {"delta": np.full(d, 100.0, np.float32)})
        m.send(topics.up("agent0"), encode(forged, forger))                 # bad_signature
        m.send(topics.up("agent0"), encode(forged))                         # unsigned
        m.send(topics.up("agent1"), captured)                               # replayed
        stranger = Signer.from_file(keydir / "impostor.key")
        m.send(topics.up("mallory"), encode(Message(
            Kind.UPDATE, run, "mallory", seq, 0, forged.fields, forged.arrays), stranger))
        m.close()                                                           # unknown_key
        injected_at = wait_for_version(fleet, tmp_path / "runs", 0, timeout=10)["version"]
        deadline = time.monotonic() + 60
        while "bad_signature" not in fleet.log("agent3") and time.monotonic() < deadline:
            time.sleep(0.5)
        wrong.terminate()
        wrong.wait(timeout=30)
        del fleet.agents["agent3"]
        events = finish(fleet, timeout=300)
    last = events[-1]
    assert injected_at <= 30 and last["version"] == 40  # mid-run, and it went on to its end
    assert last["rejected"] == {"bad_signature": 1, "unsigned": 1, "replayed": 1,
                                "unknown_key": 1}, last["rejected"]
    assert last["accuracy"] >= 0.85
    assert all("agent0" in e["contributors"] for e in events)  # the forgery did not lock it out
    log = fleet.log("coordinator")
    assert "rejected message from agent0: bad_signature" in log and "Traceback" not in log
    for name in ("agent0", "agent1", "agent2"):
        assert "rejected message" not in fleet.log(name)  # every coordinator message verified
    wrong_log = fleet.log("agent3")
    assert "bad_signature" in wrong_log and "joined at version" not in wrong_log
    assert "Traceback" not in wrong_log
