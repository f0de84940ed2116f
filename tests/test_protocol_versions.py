"""Protocol versions on the real broker (issue 18, item 2): the coordinator writes the version
--protocol names (2 by default, the aligned layout behind the header-length prefix), and the
agents of this release follow it: a `--protocol 1` run trains with them entirely in version 1,
and a default run entirely in version 2. A raw MQTT client sees the bytes every subscriber
gets."""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt
import pytest
from test_integration import finish, make_fleet

from fleetfl.shared.core.messages import PROTOCOL_VERSIONS, Kind
from fleetfl.shared.wire.codec import DOWNLINK_HEADER_MAX, DecodeContext, decode
from fleetfl.shared.wire.layout import MAP_TYPES

pytestmark = pytest.mark.integration


class Listener:
    """A plain paho client subscribed to everything of a run: (topic, payload) as sent."""

    def __init__(self, broker, run: str) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"listener-{run}", protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(f"fl/{run}/#", qos=1)
        self.client.loop_start()
        assert self.subscribed.wait(10), "the listener's subscription was not acknowledged"

    def _on_message(self, _client, _userdata, message) -> None:
        with self.lock:
            self.got.append((message.topic, bytes(message.payload)))

    def close(self) -> list[tuple[str, bytes]]:
        self.client.disconnect()
        self.client.loop_stop()
        with self.lock:
            return list(self.got)


@pytest.mark.parametrize("protocol", PROTOCOL_VERSIONS)
def test_the_fleet_speaks_the_version_the_coordinator_writes(broker, tmp_path, protocol):
    run = f"proto{protocol}"
    args = ["--algo", "fedavg", "--dataset", "digits", "--min-agents", "2", "--max-versions",
            "3", "--local-steps", "5", *(["--protocol", "1"] if protocol == 1 else [])]
    listener = Listener(broker, run)
    try:
        with make_fleet(broker, tmp_path, run, args) as fleet:
            fleet.start_coordinator()
            fleet.start_agents(2)
            events = finish(fleet, timeout=180)
    finally:
        got = listener.close()
    assert events[-1]["version"] == 3 and events[-1]["rejected"] == {}
    ctx = DecodeContext(run, None, header_max=DOWNLINK_HEADER_MAX)
    kinds = {}
    for topic, payload in got:
        if not payload:
            continue  # a cleared retained message
        assert "/chunk/" not in topic  # the digits model is far below the packet limit
        if protocol == 2:
            assert payload[:4] == b"FLM\x02", (topic, payload[:8])
        else:
            assert payload[0] in MAP_TYPES, (topic, payload[:8])
        msg = decode(payload, ctx)
        assert msg.proto == protocol
        kinds.setdefault(msg.kind, []).append(msg)
    # both directions: the coordinator's model, averages and stop, the agents' answers
    assert {Kind.MODEL, Kind.AVG, Kind.STOP, Kind.HELLO, Kind.UPDATE, Kind.OFFLINE} <= set(kinds)
    assert {m.sender for m in kinds[Kind.UPDATE]} == {"agent0", "agent1"}
    assert all(m["capabilities"]["protocols"] == [1, 2] for m in kinds[Kind.HELLO])
