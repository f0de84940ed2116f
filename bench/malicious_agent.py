"""A hostile agent for benchmarks only: the real fl-agent (same flags, same training, same
MQTT code path) whose outgoing model updates are corrupted just before they are published.

    python bench/malicious_agent.py --attack sign_flip <fl-agent flags>

Attacks (Byzantine models common in the robust-aggregation literature):
  sign_flip  the honest delta times -10 (pushes the model backwards, hard)
  scale      the honest delta times 100 (one sender dominates a plain mean)
  noise      Gaussian noise N(0, std^2) per coordinate instead of the delta
  overflow   finite values that overflow a float32 average (issue 14): odd updates a delta of
             3e38 with the samples its hello declared, even ones 2**62 samples with a delta
             of 1e20 (tests/test_hostile_agent.py; not cycled by bench/poisoning.py)
  all        every attack of issue 14 in turn, posing as --victim (bench/hostile_agent.py,
             tests/test_hostile_fleet.py)

Kept out of the package on purpose: no user-facing agent can be told to misbehave.
"""

from __future__ import annotations

import argparse
import logging
import sys
import zlib

import numpy as np

from fleetfl.agent import cli
from fleetfl.agent.runner import AgentRunner
from fleetfl.shared.config import AgentConfig, load_agent_config
from fleetfl.shared.core.messages import Kind, Message

ATTACKS = ("sign_flip", "scale", "noise")  # cycled by bench/poisoning.py
OVERFLOW = "overflow"
ALL = "all"


def corrupt(delta: np.ndarray, attack: str, rng: np.random.Generator, std: float
            ) -> np.ndarray:
    """A new array: the honest one may be the device's own bookkeeping (DGA's `own`)."""
    if attack == "sign_flip":
        return delta * np.float32(-10.0)
    if attack == "scale":
        return delta * np.float32(100.0)
    if attack == "noise":
        return rng.normal(0.0, std, delta.shape).astype(np.float32)
    raise ValueError(f"unknown attack {attack!r}")


class MaliciousAgent(AgentRunner):
    def __init__(self, cfg: AgentConfig, attack: str, std: float = 1.0) -> None:
        super().__init__(cfg)
        self.attack, self.std = attack, std
        self.rng = np.random.default_rng(zlib.crc32(cfg.agent_id.encode()))
        self.updates = 0

    def _publish_update(self, out: Message) -> None:
        if out.kind is Kind.UPDATE and self.attack == OVERFLOW:
            self.updates += 1
            claim = self.updates % 2 == 0
            out.arrays["delta"] = np.full_like(out.arrays["delta"], 1e20 if claim else 3e38)
            if claim:
                out.fields["samples"] = 2**62
        elif out.kind is Kind.UPDATE:
            out.arrays["delta"] = corrupt(out.arrays["delta"], self.attack, self.rng,
                                          self.std)
        super()._publish_update(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    p.add_argument("--attack", choices=(*ATTACKS, OVERFLOW, ALL), required=True)
    p.add_argument("--noise-std", type=float, default=1.0)
    p.add_argument("--victim", default="pi01", help="all: the agent it poses as")
    own, rest = p.parse_known_args(argv)
    args = cli.parse_args(rest)  # the real agent's flags, checked the same way
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "verbose")}
    cfg = load_agent_config(args.config, overrides)
    logging.getLogger("fleetfl.agent").warning("HOSTILE agent %s: %s", cfg.agent_id,
                                               own.attack)
    if own.attack == ALL:
        from hostile_agent import HostileAgent  # it builds on this module

        return HostileAgent(cfg, own.victim).run()
    return MaliciousAgent(cfg, own.attack, own.noise_std).run()


if __name__ == "__main__":
    sys.exit(main())
