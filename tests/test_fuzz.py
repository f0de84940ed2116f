"""Stateful fuzzing of the coordinator's state machine: random sequences of valid-looking,
mutated and garbage messages go through codec.decode into WindowAveraging, as the coordinator
shell feeds them. Nothing but CodecError or Rejected may come out, and the state stays sound.
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from fleetfl.shared.core.averaging import WindowAveraging
from fleetfl.shared.core.base import Rejected
from fleetfl.shared.core.layers import Layer, LayerTable
from fleetfl.shared.core.messages import Kind, Message
from fleetfl.shared.core.payloads import LBGMDecoder, PartialDecoder, PartialMasks
from fleetfl.shared.core.robust import make_aggregator
from fleetfl.shared.wire import layout
from fleetfl.shared.wire.codec import CodecError, DecodeContext, decode, encode

RUN = "fuzz"
LAYERS = LayerTable((Layer("w", 0, (2, 2)), Layer("b", 4, (2,))))
SIZE = LAYERS.size  # 6
AGENTS = ("a", "b", "c")
CTX = DecodeContext(RUN, SIZE, max_bytes=4096)
# the overflow the LBGM rule provokes on purpose (and the coordinator refuses)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

# Values a sender may put in a delta: ordinary floats, and the hostile ones the codec must stop.
values = st.one_of(st.floats(-1e3, 1e3, width=32), st.sampled_from([np.nan, np.inf, -np.inf]))
# LBGM look-back multipliers: ordinary, and finite ones that overflow float32 once decoded
rhos = st.one_of(st.floats(-1e3, 1e3), st.sampled_from([1e300, -3e38, 1e39]))
fields_noise = st.one_of(st.none(), st.booleans(), st.integers(-5, 2**63 - 1), st.text(max_size=5),
                         st.floats(allow_nan=True),
                         st.lists(st.integers(-2**63, 2**63 - 1), max_size=3))


class CoordinatorMachine(RuleBasedStateMachine):
    """Subclasses pick what the coordinator decodes and how it aggregates."""

    def make_core(self) -> WindowAveraging:
        return WindowAveraging(params=np.zeros(SIZE, np.float32), run=RUN, job={},
                               max_staleness=1, max_ahead=2, window_timeout=5.0, min_agents=2)

    @initialize()
    def start(self) -> None:
        self.core = self.make_core()
        self.now, self.seq = 0.0, 100
        self.published = 0  # AVG messages seen
        self.last_seqs: dict[str, int] = {}
        self.valid: list[bytes] = [encode(self.update_msg("a", 1, 0, [0.0] * SIZE))]

    # -- message makers -------------------------------------------------------------------
    def fresh_seq(self) -> int:
        self.seq += 1
        return self.seq

    def update_msg(self, sender: str, window: int, base: int, delta: list[float],
                   samples: int = 5, steps: int = 3, scalars: list | None = None,
                   seq: int | None = None) -> Message:
        fields = {"window": window, "samples": samples, "steps": steps}
        if scalars is not None:
            fields["scalars"] = scalars
        return Message(Kind.UPDATE, RUN, sender, self.fresh_seq() if seq is None else seq,
                       base, fields, {"delta": np.asarray(delta, np.float32)})

    def feed(self, payload: bytes) -> None:
        """What the shell does with one payload: decode, hand over, route AVG outputs."""
        try:
            msg = decode(payload, CTX)
            outputs = self.core.on_message(msg, self.now)
        except (CodecError, Rejected):
            return
        self.valid = [payload, *self.valid[:15]]  # material for replays and mutations
        self.check_outputs(outputs)

    def check_outputs(self, outputs: list[Message]) -> None:
        for out in outputs:
            if out.kind is Kind.AVG:
                self.published += 1
                assert out["version"] == self.published
                assert np.isfinite(out["delta"]).all()
            # what the coordinator publishes must pass its own receivers' decoder
            decode(encode(out), DecodeContext(RUN, SIZE))

    # -- rules ----------------------------------------------------------------------------
    @rule(sender=st.sampled_from(AGENTS), samples=st.integers(-2, 50),
          first_window=st.integers(0, 6), replay=st.booleans())
    def hello(self, sender, samples, first_window, replay):
        seq = self.last_seqs.get(sender, 0) if replay else self.fresh_seq()
        self.feed(encode(Message(Kind.HELLO, RUN, sender, seq, 0,
                                 {"samples": samples, "first_window": first_window})))

    @rule(sender=st.sampled_from(AGENTS))
    def offline(self, sender):
        self.feed(encode(Message(Kind.OFFLINE, RUN, sender, self.fresh_seq(), 0)))

    @rule(sender=st.sampled_from((*AGENTS, "stranger")), window_offset=st.integers(-1, 3),
          staleness=st.integers(-1, 3), samples=st.integers(-1, 50), steps=st.integers(-1, 9),
          delta=st.one_of(st.lists(values, min_size=SIZE - 1, max_size=SIZE + 1),
                          st.lists(values, max_size=SIZE)),  # short: LBGM's full layers
          scalars=st.one_of(st.none(), st.lists(st.one_of(
              st.none(), st.tuples(rhos, st.integers(0, 5)).map(list), fields_noise),
              min_size=2, max_size=3)),
          replay=st.booleans())
    def update(self, sender, window_offset, staleness, samples, steps, delta, scalars, replay):
        window = self.core.closed_window + window_offset
        base = max(0, self.core.version - staleness)
        seq = self.last_seqs.get(sender, 0) if replay else None
        self.feed(encode(self.update_msg(sender, window, base, delta, samples, steps, scalars,
                                         seq)))

    @rule(sender=st.sampled_from(AGENTS))
    def honest_update(self, sender):
        """A well-formed update for the open window: keeps windows closing."""
        window = self.core.closed_window + 1
        self.feed(encode(self.update_msg(sender, window, self.core.version,
                                         [0.5] * SIZE, scalars=self.scalars())))

    def scalars(self) -> list | None:
        return None  # dense and partial updates carry no scalars

    @rule(kind=st.sampled_from([Kind.AVG, Kind.MODEL, Kind.SYNC, Kind.STOP, Kind.FDA_STATE]))
    def wrong_direction(self, kind):
        fields = {Kind.AVG: {"window": 1, "version": 1, "contributors": ["a"]},
                  Kind.MODEL: {"version": 0, "next_window": 1, "job": {}},
                  Kind.SYNC: {"version": 0, "window": 1, "estimate": 1.0},
                  Kind.STOP: {"reason": "x"},
                  Kind.FDA_STATE: {"step": 1, "drift_sq": 0.5}}[kind]
        arrays = {Kind.AVG: {"delta": np.zeros(SIZE, np.float32)},
                  Kind.MODEL: {"params": np.zeros(SIZE, np.float32)}}.get(kind, {})
        self.feed(encode(Message(kind, RUN, "a", self.fresh_seq(), 0, fields, arrays)))

    @rule(data=st.data())
    def mutated(self, data):
        """A byte-level mutation of a message that was accepted earlier (or its replay)."""
        payload = bytearray(data.draw(st.sampled_from(self.valid)))
        op = data.draw(st.sampled_from(["replay", "truncate", "flip", "append", "splice"]))
        if op == "truncate":
            payload = payload[:data.draw(st.integers(0, len(payload)))]
        elif op == "flip":
            for _ in range(data.draw(st.integers(1, 4))):
                i = data.draw(st.integers(0, len(payload) - 1))
                payload[i] = data.draw(st.integers(0, 255))
        elif op == "append":
            payload += data.draw(st.binary(min_size=1, max_size=64))
        elif op == "splice":
            i = data.draw(st.integers(0, len(payload)))
            payload[i:i] = data.draw(st.binary(min_size=1, max_size=16))
        self.feed(bytes(payload))

    @rule(data=st.data())
    def wrong_types(self, data):
        """A valid envelope with one field or envelope entry swapped for another type."""
        version, body, rest = layout.split(self.valid[0])
        where = data.draw(st.sampled_from(["seq", "base_version", "run", "sender", "kind",
                                           "proto", "field", "shape", "dtype"]))
        noise = data.draw(fields_noise)
        if where == "field" and body["fields"]:
            body["fields"][data.draw(st.sampled_from(sorted(body["fields"])))] = noise
        elif where in ("shape", "dtype") and body["arrays"]:
            spec = body["arrays"][sorted(body["arrays"])[0]]
            spec[where] = data.draw(st.one_of(
                st.lists(st.integers(-3, 2**45), max_size=10), fields_noise)) \
                if where == "shape" else noise
        else:
            body[where] = noise
        self.feed(layout.join(version, body, rest))

    @rule(junk=st.binary(max_size=200))
    def garbage(self, junk):
        self.feed(junk)

    @rule(run=st.text(min_size=1, max_size=8))
    def other_run(self, run):
        msg = self.update_msg("a", self.core.closed_window + 1, self.core.version, [0.0] * SIZE)
        msg.run = run
        self.feed(encode(msg))

    @rule(seconds=st.floats(0, 8))
    def tick(self, seconds):
        self.now += seconds
        self.check_outputs(self.core.on_tick(self.now))

    # -- invariants -----------------------------------------------------------------------
    @invariant()
    def sound_state(self):
        core = self.core
        assert core.version == self.published == len(core.results)
        assert core.closed_window == core.version  # one window per version
        assert np.isfinite(core.params).all() and core.params.dtype == np.float32
        for window, got in core.pending.items():
            assert core.closed_window < window <= core.closed_window + core.max_ahead
            assert got and set(got) <= set(core.agents)
            assert window in core.opened_at
            assert all(np.isfinite(c.decoded.dense).all() for c in got.values())
        for name, rec in core.agents.items():
            assert rec.last_seq >= self.last_seqs.get(name, -1)  # sequences never go back
            self.last_seqs[name] = rec.last_seq
            assert rec.samples > 0
        msgpack.packb(core.state(), use_bin_type=True)  # the checkpoint can be written


class MedianMachine(CoordinatorMachine):
    def make_core(self) -> WindowAveraging:
        core = super().make_core()
        core.aggregator = make_aggregator("trimmed_mean:0.2", clip_median=2.0)
        return core


class PartialMachine(CoordinatorMachine):
    def make_core(self) -> WindowAveraging:
        core = super().make_core()
        core.decoder = PartialDecoder(PartialMasks(0, SIZE, 1.0, False))  # rate 1: all sent
        return core


class LBGMMachine(CoordinatorMachine):
    def make_core(self) -> WindowAveraging:
        core = super().make_core()
        core.decoder = LBGMDecoder(LAYERS)
        return core

    def scalars(self) -> list | None:
        return [None, None]  # both layers in full

    @rule(sender=st.sampled_from(AGENTS), rho=rhos,
          since=st.one_of(st.none(), st.integers(0, 3)),
          window_offset=st.integers(1, 2),
          tail=st.lists(st.floats(-1e3, 1e3, width=32), min_size=2, max_size=2))
    def lookback_update(self, sender, rho, since, window_offset, tail):
        """Layer w as a multiple of a look-back (None: the one the coordinator holds, as an
        agent would know), layer b in full."""
        held = (self.core.decoder.lookback.get(sender) or [None])[0]
        if since is None:
            since = held.window if held is not None else 0
        window = self.core.closed_window + window_offset
        self.feed(encode(self.update_msg(sender, window, self.core.version, tail,
                                         scalars=[[rho, since], None])))


FUZZ = settings(max_examples=60, stateful_step_count=30, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestDenseMean = CoordinatorMachine.TestCase
TestDenseMean.settings = FUZZ
TestDenseTrimmedClipped = MedianMachine.TestCase
TestDenseTrimmedClipped.settings = FUZZ
TestPartial = PartialMachine.TestCase
TestPartial.settings = FUZZ
TestLBGM = LBGMMachine.TestCase
TestLBGM.settings = FUZZ


def test_lbgm_scalar_that_overflows_float32_is_rejected():
    """Found by LBGMMachine: a finite rho (1e300) times a finite look-back is inf."""
    m = LBGMMachine()
    m.start()
    m.hello("a", 5, 1, False)
    m.honest_update("a")  # the coordinator now holds a's look-backs of window 1
    with pytest.raises(Rejected, match="not_finite"):
        m.core.on_message(decode(encode(m.update_msg("a", 2, 0, [0.0, 0.0],
                                                     scalars=[[1e300, 1], None])), CTX), 0.0)
    assert list(m.core.pending) == [1]
