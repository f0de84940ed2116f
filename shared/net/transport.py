"""A thin paho-mqtt 2.x client shared by the agent and coordinator shells.

The paho callbacks run on paho's network thread, so they only put (topic, payload) on a queue;
all decoding, training and aggregation happen on the caller's thread. Subscriptions are
re-made on every (re)connect, so a restarted broker (which forgets them) is transparent.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import queue
import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from fleetfl.shared.net import mqtt_auth
from fleetfl.shared.net.broker_url import BrokerURL
from fleetfl.shared.wire import chunking

log = logging.getLogger(__name__)

MAX_RETRY_PAUSE_S = 30.0  # longest pause between first-connection attempts
SESSION_EXPIRY_S = 300
# Put on the inbox after every (re)connect: a restarted broker has forgotten retained
# messages, so the shells republish theirs from their own thread.
CONNECTED = "$fleetfl/connected"  # the broker queues QoS 1 messages this long while we are away


class BrokerUnreachable(RuntimeError):
    """The first connection to the broker failed. The message names the cause in one line;
    `cause` is one of CAUSES."""

    def __init__(self, message: str, cause: str = "error") -> None:
        super().__init__(message)
        self.cause = cause


# why a connection failed: nothing listens; no answer (TCP, TLS handshake or CONNACK); no route;
# unknown host name; TLS handshake failed (certificate, version); CONNACK 0x86 (3.1.1: 4);
# CONNACK 0x87 (3.1.1: 5); another CONNACK refusal; something not MQTT answered; closed early
CAUSES = ("refused", "timeout", "unreachable", "dns", "tls", "bad_credentials",
          "not_authorised", "connack", "protocol", "closed", "error")
BAD_CREDENTIALS = (0x86, 4)  # Bad user name or password (MQTT 5, MQTT 3.1.1)
NOT_AUTHORISED = (0x87, 5)  # Not authorized


def describe_connect_error(exc: OSError, broker: BrokerURL, connect_timeout: float,
                           tls: str = "") -> tuple[str, str, bool]:
    """(cause, what happened in words, worth retrying) for an error of paho's connect(),
    which makes the TCP connection and the TLS handshake. `tls`: "" (plain TCP), "ca" (TLS
    verified against tls_ca) or "system" (mqtts:// verified against the system CA store)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code == 62:  # X509_V_ERR_HOSTNAME_MISMATCH
            where = f"the broker's certificate is not valid for {broker.host!r}"
        elif tls == "system":
            where = ("the system CA store does not trust the broker's certificate: give its "
                     "CA with --tls-ca")
        else:
            where = "the CA given by --tls-ca (tls_ca) did not sign the broker's certificate"
        return "tls", f"certificate verify failed: {exc.verify_message} ({where})", False
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or exc.strerror or str(exc)
        hint = ("; is it a plain MQTT port? use mqtt://" if "WRONG_VERSION" in str(reason)
                else "")
        return "tls", f"TLS handshake failed: {reason}{hint}", False
    if tls and isinstance(exc, (ConnectionResetError, ConnectionAbortedError)):
        return "tls", (f"the server closed the connection in the TLS handshake "
                       f"({exc.strerror}): a plain MQTT port? (use mqtt:// without "
                       "--tls-ca)"), False
    if isinstance(exc, ConnectionRefusedError):
        return "refused", (f"connection refused (ECONNREFUSED): nothing listens on port "
                           f"{broker.port} there; is the broker running?"), True
    if isinstance(exc, TimeoutError):
        if "handshake" in str(exc):
            return "timeout", (f"timed out: no answer to the TLS handshake within "
                               f"{connect_timeout:g} s; is it a TLS port?"), True
        if "CONNACK" in str(exc):
            return "timeout", f"timed out: {exc}", True
        return "timeout", (f"timed out: no answer to the TCP connection within "
                           f"{connect_timeout:g} s (host down, wrong address, or a firewall "
                           "dropping packets)"), True
    if isinstance(exc, socket.gaierror):
        return "dns", f"cannot resolve host name {broker.host!r}: {exc.strerror}", True
    if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        name = errno.errorcode.get(exc.errno, "")
        return "unreachable", f"unreachable: {exc.strerror} ({name})", True
    return "error", exc.strerror or str(exc) or type(exc).__name__, True


@dataclass(frozen=True)
class Incoming:
    topic: str
    payload: bytes
    retain: bool
    # arrival (monotonic): deadlines are judged on it, not on when the main loop gets to it
    at: float = field(default_factory=time.monotonic)
    # manual acknowledgement (MqttLink.ack): packet id and QoS, valid only on the connection
    # (`session`, counted from 1) it arrived on; mid 0: nothing to acknowledge
    mid: int = 0
    qos: int = 0
    session: int = 0


class MqttLink:
    def __init__(self, broker: BrokerURL, client_id: str, inbox: queue.Queue,
                 will: tuple[str, bytes] | None = None,
                 auth: mqtt_auth.MqttAuth | None = None,
                 max_packet_bytes: int = 0,
                 max_message_bytes: int = 64 * 1024 * 1024,
                 manual_ack: bool = False, durable_session: bool = False,
                 resume_session: bool = False, receive_maximum: int = 0) -> None:
        """`manual_ack`: QoS 1 messages are acknowledged by `ack()`, once the caller has
        made them durable, not by paho on arrival. `durable_session`: every connection,
        the first included, has clean_start=False, after discarding any session an earlier
        process left under this client id: Mosquitto 2.0.11 keeps a session across its own
        restart (persistence) only if it was opened so, not one opened with clean_start=1
        even with a session expiry. `resume_session`: durable, and take over the session
        left by an earlier process, with what the broker queued while it was away.
        `receive_maximum` (0: the broker's max_inflight_messages, Mosquitto's 20): QoS 1
        messages the broker may send us unacknowledged (MQTT 5 Receive Maximum)."""
        self.broker, self.inbox = broker, inbox
        self.manual_ack, self.resume_session = manual_ack, resume_session
        self.receive_maximum = receive_maximum
        self.durable_session = durable_session or resume_session
        # TLS and credentials; default: the FL_MQTT_* variables. mqtts:// turns TLS on.
        auth = auth if auth is not None else mqtt_auth.from_env()
        if broker.tls and not auth.tls_url:
            auth = dataclasses.replace(auth, tls_url=True)
        self._client_id, self._auth = client_id, auth
        # the first connect(): a CONNACK refusal, or closes before any CONNACK (paho reason)
        self._refusal: object | None = None
        self._early_closes: list[str] = []
        self.sessions = 0  # connections so far: an ack is only valid on the current one
        self.connected = threading.Event()
        self.closing = False
        self._last: mqtt.MQTTMessageInfo | None = None
        self._subscriptions: set[str] = set()
        # filter -> the largest retained message it may carry (subscribe(max_retained_bytes))
        self._retained_caps: dict[str, int] = {}
        self._lock = threading.Lock()
        # Chunking (shared/wire/chunking.py): payloads whose packet would exceed the limit (0:
        # never) go out in chunks; the broker's CONNACK limit lowers it. Chunks received are
        # reassembled on paho's thread: per chunk it costs about what paho spent reading it
        # (the hash advances in index order), and the inbox keeps the publisher's order.
        self.max_packet_bytes = max_packet_bytes
        self._broker_packet_limit = 0
        self._reassembler = chunking.Reassembler(max_message_bytes)
        self._chunk_lock = threading.Lock()
        self._retained_chunks: dict[str, int] = {}  # topic -> chunks of our last retained
        self._chunks_sent: dict[str, int] = {"chunked_messages_sent": 0, "chunks_sent": 0}
        self._refused: Counter[str] = Counter()  # parked_retained (under _chunk_lock)
        self.client = self._paho_client(will)

    def _paho_client(self, will: tuple[str, bytes] | None) -> mqtt.Client:
        client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                             client_id=self._client_id, protocol=mqtt.MQTTv5)
        client.reconnect_delay_set(min_delay=1, max_delay=16)
        client.manual_ack_set(self.manual_ack)
        mqtt_auth.apply(client, self._auth)  # ConfigError if incomplete or unreadable
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    # -- paho callbacks (network thread: no work here) ----------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            if self.sessions == 0:  # connect() says it, once
                self._refusal = reason_code
            else:
                log.error("%s", self._refusal_text(reason_code))
            return
        sock = client.socket()
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # without it Nagle holds a publish that follows a received message ~40 ms
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._broker_packet_limit = int(getattr(properties, "MaximumPacketSize", 0) or 0)
        with self._lock:
            topics = sorted(self._subscriptions)
        for topic in topics:
            client.subscribe(topic, options=self._options(topic))
        self.sessions += 1
        self.connected.set()
        self.inbox.put(Incoming(CONNECTED, b"", False))
        log.info("connected to %s", self.broker)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if self.sessions == 0 and not self.closing:  # never connected: connect() reports it
            self._early_closes.append(str(reason_code))
            log.debug("%s closed the connection before any CONNACK (%s)", self.broker,
                      reason_code)
        elif not self.closing:
            log.warning("disconnected from %s (%s); reconnecting", self.broker, reason_code)

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        if message.retain and self._retained_caps and self._cleared_parked(message):
            return
        if chunking.parse_chunk_topic(message.topic) is not None:
            self._ack_chunk(message)
            with self._chunk_lock:
                whole = self._reassembler.add(message.topic, message.payload,
                                              time.monotonic(), bool(message.retain))
            if whole is not None:  # arrival time: that of its last chunk
                self.inbox.put(Incoming(whole.topic, whole.payload, whole.retain))
            return
        self.inbox.put(Incoming(message.topic, message.payload, bool(message.retain),
                                mid=message.mid, qos=message.qos, session=self.sessions))

    def _cleared_parked(self, message: mqtt.MQTTMessage) -> bool:
        """A retained message above its filter's cap is data an agent parks in the broker
        (which keeps it, persisted, until someone clears it): clear it with an empty retained
        publish, acknowledge and count it, and deliver nothing."""
        with self._lock:
            caps = [cap for filt, cap in self._retained_caps.items()
                    if mqtt.topic_matches_sub(filt, message.topic)]
        if not caps or not message.payload:  # empty: a clear, nothing held
            return False
        size = _retained_size(message.topic, message.payload)
        if size <= min(caps):
            return False
        if self.manual_ack and message.qos > 0:
            self.client.ack(message.mid, message.qos)
        self.client.publish(message.topic, b"", qos=1, retain=True)
        with self._chunk_lock:
            self._refused["parked_retained"] += 1
        log.warning("cleared a retained message on %s (%d bytes; at most %d may be retained "
                    "there): data parked in the broker, not a message", message.topic,
                    len(message.payload), min(caps))
        return True

    def _ack_chunk(self, message: mqtt.MQTTMessage) -> None:
        # With manual acks a chunk is acknowledged on arrival: holding its PUBACK until the
        # whole message is handled would stall a message of more chunks than the broker's
        # in-flight window (Mosquitto's max_inflight_messages, 20). A chunked message is
        # therefore durable only from when its receiver journals the reassembled whole.
        if self.manual_ack and message.qos > 0:
            self.client.ack(message.mid, message.qos)

    # -- API ----------------------------------------------------------------------------
    def _open(self, start: float, deadline: float) -> None:
        """paho's connect() (TCP and TLS), retried until `deadline` while it may pass."""
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        if self.receive_maximum:
            props.ReceiveMaximum = self.receive_maximum
        said = 0.0  # the pause last logged: a line when it grows, not one per attempt
        while True:
            try:
                if self.durable_session and not self.resume_session:
                    self._discard_session()
                self.client.connect(self.broker.host, self.broker.port, keepalive=30,
                                    clean_start=False if self.durable_session
                                    else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                                    properties=props)
                break
            except OSError as exc:  # ssl.SSLError and socket.gaierror are OSErrors
                cause, what, retry = describe_connect_error(
                    exc, self.broker, self.client.connect_timeout,
                    "" if not self._auth.tls else "ca" if self._auth.tls_ca else "system")
                log.debug("connecting to %s: %s", self.broker, what)
            if not retry:
                raise BrokerUnreachable(self._fail_text(cause, what), cause)
            waited = time.monotonic() - start
            if time.monotonic() > deadline:
                raise BrokerUnreachable(f"{self._fail_text(cause, what)} (tried for "
                                        f"{waited:.0f} s)", cause)
            # Forever (deadline inf: an agent booted before its server): back off to 30 s
            pause = min(0.5 * 2 ** (waited // 10), MAX_RETRY_PAUSE_S)
            if pause > said and deadline == math.inf:
                log.warning("%s; retrying every %g s", self._fail_text(cause, what), pause)
                said = pause
            time.sleep(pause)

    def connect(self, timeout: float = 10.0) -> None:
        """Connect, retrying until `timeout` what may pass (refused, timed out, unreachable:
        a broker still starting, a network coming up; timeout <= 0: forever, backing off);
        raise BrokerUnreachable naming the cause in one line, at once for what will not pass
        (TLS, credentials, not MQTT)."""
        start = time.monotonic()
        deadline = start + timeout if timeout > 0 else math.inf
        self._refusal, self._early_closes = None, []
        self._open(start, deadline)
        self.client.loop_start()
        end = max(deadline, time.monotonic() + 0.1) + 2.0
        while not self.connected.wait(0.05):
            failure = self._first_connect_failure()
            if failure is None and time.monotonic() < end:
                continue
            self.client.loop_stop()
            if failure is None:
                if self._early_closes:
                    failure = ("closed", self._fail_text(
                        "closed", f"the server closed the connection before any CONNACK "
                        f"({len(self._early_closes)} time(s), {self._early_closes[-1]}): a "
                        "TLS port reached with mqtt:// (use mqtts://), not an MQTT broker, or "
                        "a broker refusing more clients"))
                else:
                    failure = ("timeout", self._fail_text(
                        "timeout", f"timed out: the TCP connection was made but no CONNACK "
                        f"came within {time.monotonic() - start:.0f} s (not an MQTT broker, "
                        "or one too busy to answer)"))
            raise BrokerUnreachable(failure[1], failure[0])

    def _first_connect_failure(self) -> tuple[str, str] | None:
        """(cause, message) once the first connection has failed for good, else None."""
        if self._refusal is not None:
            code = getattr(self._refusal, "value", 0)
            cause = ("bad_credentials" if code in BAD_CREDENTIALS else
                     "not_authorised" if code in NOT_AUTHORISED else "connack")
            return cause, self._refusal_text(self._refusal)
        if "Protocol error" in self._early_closes:
            return "protocol", self._fail_text(
                "protocol", "the server answered, but not in MQTT (protocol error before "
                "CONNACK): not an MQTT broker (an HTTP server or proxy?), or a TLS port "
                "reached with mqtt://")
        return None

    def _fail_text(self, cause: str, what: str) -> str:
        if cause == "tls":
            return f"TLS failure with the MQTT broker at {self.broker}: {what}"
        return f"cannot reach the MQTT broker at {self.broker}: {what}"

    def _refusal_text(self, reason_code: object) -> str:
        code = getattr(reason_code, "value", 0)
        user = self._auth.username
        who = f"user {user!r}" if user else "a client without a username"
        if code in BAD_CREDENTIALS:
            what = (f"bad credentials: wrong user name or password for {who} (check "
                    "--username and --password-file)")
        elif code in NOT_AUTHORISED and not user:
            what = ("not authorised: the broker takes no anonymous clients (give --username "
                    "and --password-file, or the client certificate it expects)")
        elif code in NOT_AUTHORISED:
            # Mosquitto answers a wrong password so too, not with 0x86
            what = (f"not authorised: {who} may not connect: a wrong password, an account "
                    "the broker does not know, or one it bars (check --username and "
                    "--password-file)")
        else:
            what = f"refused {who}"
        return (f"the MQTT broker at {self.broker} refused the connection: {what} "
                f"(CONNACK 0x{code:02x} {reason_code})")

    def _discard_session(self) -> None:
        """A clean connection under our client id, closed at once (no session expiry: the
        broker drops the session with it), so a new process starts with nothing queued."""
        done = threading.Event()
        tmp = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                          client_id=self._client_id, protocol=mqtt.MQTTv5)
        mqtt_auth.apply(tmp, self._auth)
        # a refusal or an early close: the real connection below meets it again and says so
        tmp.on_connect = lambda *args: done.set()
        tmp.on_disconnect = lambda *args: done.set()
        tmp.connect(self.broker.host, self.broker.port, keepalive=30, clean_start=True)
        tmp.loop_start()
        try:
            if not done.wait(10.0):
                raise TimeoutError("the TCP connection was made but no CONNACK came within "
                                   "10 s (not an MQTT broker, or one too busy to answer)")
            tmp.disconnect()
        finally:
            tmp.loop_stop()

    def ack(self, item: Incoming) -> None:
        """Acknowledge `item` (manual_ack). After a reconnect its packet id is void: the
        broker delivers it again (its session kept it unacknowledged), and the copy is acked."""
        if self.manual_ack and item.mid and item.qos > 0 and item.session == self.sessions:
            self.client.ack(item.mid, item.qos)

    def subscribe(self, topic: str, max_retained_bytes: int | None = None) -> None:
        """Subscribe `topic` and the chunks of messages published on it.

        `max_retained_bytes`: the largest retained message these topics carry (a chunk counts
        as its whole message; 0: none is ever retained). A larger retained message is data
        someone parks in the broker: it is cleared (an empty retained publish: needs write
        access to the topic) and counted, not delivered. With 0, retained publishes are also
        caught as they arrive (Retain As Published), not only when a new session gets the
        broker's store. Our own publishes there are not echoed back (No Local)."""
        for t in filter(None, (topic, chunking.chunk_filter(topic))):
            with self._lock:
                self._subscriptions.add(t)
                if max_retained_bytes is not None:
                    self._retained_caps[t] = max_retained_bytes
            self.client.subscribe(t, options=self._options(t))

    def _options(self, topic: str) -> SubscribeOptions:
        with self._lock:
            cap = self._retained_caps.get(topic)
        return SubscribeOptions(qos=1, noLocal=cap is not None, retainAsPublished=cap == 0)

    def unsubscribe(self, topic: str) -> None:
        for t in filter(None, (topic, chunking.chunk_filter(topic))):
            with self._lock:
                self._subscriptions.discard(t)
                self._retained_caps.pop(t, None)
            self.client.unsubscribe(t)

    @property
    def packet_limit(self) -> int:
        """Largest packet we send (0: no limit): ours, lowered to what the broker announced."""
        if self.max_packet_bytes <= 0:
            return 0
        if 0 < self._broker_packet_limit < self.max_packet_bytes:
            return self._broker_packet_limit
        return self.max_packet_bytes

    def refusals(self) -> Counter[str]:
        """What the link refused before delivery, by reason (parked_retained)."""
        with self._chunk_lock:
            return Counter(self._refused)

    @property
    def chunk_stats(self) -> dict[str, int]:
        """Chunks sent and received, and every chunk or set refused or dropped, by reason."""
        with self._chunk_lock:
            received = self._reassembler.snapshot(time.monotonic())
        return {**self._chunks_sent, **received}

    def publish(self, topic: str, payload: bytes, retain: bool = False
                ) -> mqtt.MQTTMessageInfo:
        # paho queues the message while disconnected and sends it after reconnecting.
        limit = self.packet_limit
        if not chunking.needs_chunking(topic, len(payload), limit):
            if retain and limit:
                self._clear_stale_chunks(topic, 0)
            self._last = self.client.publish(topic, payload, qos=1, retain=retain)
            return self._last
        parts = chunking.split(topic, payload, retain, limit)
        if retain:  # first clear what a joiner could mistake for the current message
            self._clear_stale_chunks(topic, len(parts))
        for chunk_topic, chunk in parts:
            self._last = self.client.publish(chunk_topic, chunk, qos=1, retain=retain)
        self._chunks_sent["chunked_messages_sent"] += 1
        self._chunks_sent["chunks_sent"] += len(parts)
        return self._last

    def _clear_stale_chunks(self, topic: str, now: int) -> None:
        """Empty retained publishes over what a joiner could take for the current message
        (chunking.stale_retained_topics says which)."""
        for stale in chunking.stale_retained_topics(topic, self._retained_chunks.get(topic), now):
            self.client.publish(stale, b"", qos=1, retain=True)
        self._retained_chunks[topic] = now

    def close(self, flush_timeout: float = 5.0) -> None:
        """Wait (bounded) until the broker acknowledged our last publish, then disconnect."""
        if self._last is not None and self.connected.is_set():
            try:
                self._last.wait_for_publish(timeout=flush_timeout)
            except (RuntimeError, ValueError):
                pass  # not delivered; the disconnect below still happens
        self.closing = True
        self.client.disconnect()
        self.client.loop_stop()


def _retained_size(topic: str, payload: bytes) -> float:
    """The size a retained message stands for: a chunk's is its whole message's; anything
    else at a chunk level is no message at all (inf)."""
    head = topic.rpartition("/")[0]
    if not head.endswith("/" + chunking.CHUNK_LEVEL):
        return len(payload)
    if chunking.parse_chunk_topic(topic) is None:
        return math.inf
    try:
        return chunking.parse_chunk(payload)[0].total
    except chunking.ChunkError:
        return math.inf
