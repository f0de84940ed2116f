"""What a large fleet needs of the wire (issue 21): the AVG of a version lists every
contributor's id in its header, so it grows with the fleet. Devices read it with the
downlink header limit; the 64 KiB limit of what devices send would refuse it (at 10,000
agents of 6-character ids every agent refused every AVG and the run crawled at one version
per window timeout)."""

from __future__ import annotations

import queue
import time
import uuid

import numpy as np
import pytest

from fleetfl.coordinator.runner import inflight_updates
from fleetfl.shared.core.averaging import WindowAveraging
from fleetfl.shared.core.messages import COORDINATOR_ID, Kind, Message
from fleetfl.shared.net.broker_url import BrokerURL
from fleetfl.shared.net.transport import CONNECTED, Incoming, MqttLink
from fleetfl.shared.wire.codec import (
    HEADER_MAX,
    CodecError,
    DecodeContext,
    decode,
    device_context,
    encode,
)

RUN, SIZE = "r", 8


def _avg_of(ids: list[str]) -> Message:
    """The AVG the coordinator's averaging publishes once every agent in `ids` sent one
    update to the first window."""
    core = WindowAveraging(params=np.zeros(SIZE, np.float32), run=RUN, job={},
                           window_timeout=1e9, min_agents=len(ids))
    for seq, agent in enumerate(ids):
        core.on_message(Message(Kind.HELLO, RUN, agent, seq + 1, 0,
                                {"samples": 3, "first_window": 1}, {}), 0.0)
    out: list[Message] = []
    for seq, agent in enumerate(ids):
        out += core.on_message(Message(Kind.UPDATE, RUN, agent, len(ids) + seq + 1, 0,
                                       {"window": 1, "samples": 3, "steps": 1},
                                       {"delta": np.ones(SIZE, np.float32)}), 1.0)
    return next(m for m in out if m.kind is Kind.AVG)


@pytest.mark.parametrize(("agents", "width"), [(10_000, 6), (2_000, 64)])
def test_a_large_fleets_avg_decodes_on_every_device(agents: int, width: int) -> None:
    ids = [f"a{i:0{width - 1}d}" for i in range(agents)]
    avg = _avg_of(ids)
    assert len(avg.fields["contributors"]) == agents
    payload = encode(avg)
    device = device_context(RUN, SIZE)  # as fl-agent reads
    back = decode(payload, device)
    assert back.fields["contributors"] == ids
    np.testing.assert_allclose(back.arrays["delta"], 1.0)
    # the limit of what devices send: this AVG is beyond it (the cause of the cliff)
    with pytest.raises(CodecError, match="malformed"):
        decode(payload, DecodeContext(RUN, SIZE, header_max=HEADER_MAX))


def test_the_largest_avg_fits_the_downlink_limit() -> None:
    """65,536 contributors (the array limit) of 64-character ids (the id limit)."""
    names = [f"{i:064d}" for i in range(1 << 16)]
    avg = Message(Kind.AVG, RUN, COORDINATOR_ID, 0, 0,
                  {"window": 1, "version": 1, "contributors": names},
                  {"delta": np.zeros(SIZE, np.float32)})
    back = decode(encode(avg), device_context(RUN, SIZE))
    assert len(back.fields["contributors"]) == 1 << 16


def _delivered_unacknowledged(broker, receive_maximum: int, sent: int) -> int:
    """Updates a coordinator-like link (manual acknowledgements, durable session) gets from
    `sent` published while it acknowledges none."""
    inbox: queue.Queue[Incoming] = queue.Queue()
    url = BrokerURL(broker.host, broker.port)
    link = MqttLink(url, f"fl-r-coordinator-{uuid.uuid4().hex[:6]}", inbox, manual_ack=True,
                    durable_session=True, receive_maximum=receive_maximum)
    agent = MqttLink(url, f"fl-r-a{uuid.uuid4().hex[:6]}", queue.Queue())
    link.subscribe("fl/r/up/+")
    link.connect()
    agent.connect()
    try:
        assert inbox.get(timeout=10).topic == CONNECTED
        for i in range(sent):
            agent.publish(f"fl/r/up/a{i}", b"u")
        got, deadline = 0, time.monotonic() + 5.0
        while time.monotonic() < deadline:
            try:
                inbox.get(timeout=0.5)
                got += 1
            except queue.Empty:
                if got >= min(sent, receive_maximum or 20):
                    break
        return got
    finally:
        agent.close()
        link.close()


@pytest.mark.integration
def test_the_coordinator_takes_a_whole_round_before_acknowledging(broker) -> None:
    """The cliff's cause: the coordinator acknowledges an update once it is journaled (one
    fsync per pass of its loop), and Mosquitto hands a client at most max_inflight_messages
    (20) unacknowledged messages unless it announces a larger MQTT 5 Receive Maximum: a
    10,000-agent round waited for 500 fsyncs, ~30 s with a busy disk."""
    assert _delivered_unacknowledged(broker, 0, 300) == 20  # the broker's default
    receive = inflight_updates(4810)  # the digits MLP
    assert receive >= 1000
    assert _delivered_unacknowledged(broker, receive, 300) == 300
