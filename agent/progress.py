"""What an agent has done so far, for the person watching it.

On a terminal: one tqdm bar (steps, with version, updates sent, bytes and loss alongside) and
log lines printed above it. Under systemd or in a log file: one summary line every
`interval` seconds, so a journal shows progress without a line per step.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from typing import TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger("fleetfl.agent")


class Progress:
    def __init__(self, agent_id: str, interval: float = 30.0, stream: TextIO | None = None,
                 bar: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.bar_wanted = self.stream.isatty() if bar is None else bar
        self.agent_id, self.interval = agent_id, interval
        self.steps = self.updates = self.bytes_up = 0
        self.version: int | None = None
        self.loss = math.nan
        self.started = self.last_line = time.monotonic()
        self._bar: tqdm | None = None

    def attach(self) -> AbstractContextManager:
        """Context for the training loop: opens the bar and routes log lines above it."""
        if not self.bar_wanted:
            return nullcontext()
        self._bar = tqdm(desc=self.agent_id, unit="step", file=self.stream, dynamic_ncols=True)
        return _Closing(self._bar, logging_redirect_tqdm())

    def step(self, loss: float) -> None:
        self.steps += 1
        self.loss = loss
        if self._bar is not None:
            self._bar.update(1)
        self._maybe_report()

    def published(self, nbytes: int) -> None:
        self.updates += 1
        self.bytes_up += nbytes
        self._maybe_report()

    def at_version(self, version: int) -> None:
        self.version = version
        self._maybe_report()

    def summary(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        version = "-" if self.version is None else str(self.version)
        return (f"{self.steps} steps ({self.steps / elapsed:.1f}/s), version {version}, "
                f"{self.updates} updates sent ({self.bytes_up / 1e6:.2f} MB), "
                f"loss {self.loss:.3f}")

    def _maybe_report(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(
                f"v{'-' if self.version is None else self.version} sent {self.updates} "
                f"{self.bytes_up / 1e6:.1f}MB loss {self.loss:.3f}", refresh=False)
            return
        now = time.monotonic()
        if now - self.last_line >= self.interval:
            self.last_line = now
            log.info("progress: %s", self.summary())


class _Closing(AbstractContextManager):
    """Closes the bar after the log redirection ends (tqdm's own order would lose the bar)."""

    def __init__(self, bar: tqdm, redirect: AbstractContextManager) -> None:
        self.bar, self.redirect = bar, redirect

    def __enter__(self) -> tqdm:
        self.redirect.__enter__()
        return self.bar

    def __exit__(self, *exc: object) -> None:
        self.redirect.__exit__(*exc)
        self.bar.close()
