"""Sequence numbers that never go backwards, whatever the clock does (issue 15, item 5).

The coordinator refuses an agent's message whose `seq` is not above the last it accepted from
that agent, across the agent's restarts too (PROTOCOL.md, section 10). The wall clock alone
(microseconds at start) breaks that on a Pi: it has no real-time clock, boots with the time it
last saved (or 1970) and is stepped by NTP later, possibly back. So the counter is persisted:
`<state_dir>/<agent_id>.seq` holds a bound no number issued so far has reached. A process
starts at the larger of that bound and the wall clock in microseconds (an agent whose state
was wiped still starts above what the coordinator has seen, as before) and reserves numbers
a block at a time: a block's end is written durably (temporary file, fsync, rename, fsync of
the folder) before any number in it is used. A crash loses at most the rest of a block.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from fleetfl.shared.config import AgentConfig, ConfigError

log = logging.getLogger("fleetfl.agent")
BLOCK = 1000  # numbers reserved per write: an fsync per 1,000 messages, not per message
SEQ_MAX = 2**63  # the state file's sanity bound (the wire allows < 2**64)


def default_state_dir(env: dict[str, str] | None = None) -> Path | None:
    """$STATE_DIRECTORY (systemd's StateDirectory=; the first of several), else
    $XDG_STATE_HOME/fleetfl, else ~/.local/state/fleetfl; None without a home."""
    env = os.environ if env is None else env
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    if env.get("XDG_STATE_HOME"):
        return Path(env["XDG_STATE_HOME"]) / "fleetfl"
    try:
        return Path.home() / ".local" / "state" / "fleetfl"
    except (RuntimeError, KeyError):  # no HOME and no passwd entry
        return None


class SeqCounter:
    """The agent's message counter; `path` None: wall clock only (nowhere to keep it)."""

    def __init__(self, path: Path | None, block: int = BLOCK) -> None:
        self.path, self.block = path, block
        stored = self._read() if path is not None else 0
        self.seq = max(stored, time.time_ns() // 1000) - 1  # next() returns seq + 1
        self.limit = 0  # numbers below it are reserved in the file
        if path is not None:
            self._reserve(self.seq + 1 + block)  # raises OSError: the caller decides

    def next(self) -> int:
        self.seq += 1
        if self.path is not None and self.seq >= self.limit:
            try:
                self._reserve(self.seq + self.block)
            except OSError as exc:
                # a full or read-only card must not stop training: numbers still grow in
                # this process; only a restart with the clock stepped back could reuse them
                log.error("cannot keep the sequence counter in %s (%s): from now on it "
                          "follows the wall clock only", self.path, exc)
                self.path = None
        return self.seq

    def _read(self) -> int:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            log.warning("cannot read the sequence counter %s (%s): starting from the clock",
                        self.path, exc)
            return 0
        try:
            value = int(text.strip())
        except ValueError:
            value = -1
        if not 0 <= value < SEQ_MAX:
            log.warning("sequence counter %s holds %r, not a number: starting from the clock",
                        self.path, text[:40])
            return 0
        return value

    def _reserve(self, limit: int) -> None:
        """Write `limit` durably, then let numbers below it be used."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, f"{limit}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        folder = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself survives a power cut
        finally:
            os.close(folder)
        self.limit = limit


def open_counter(cfg: AgentConfig) -> SeqCounter:
    """The counter of `cfg.agent_id` in `cfg.state_dir` (else the default folder). A folder
    that was asked for and cannot be used is a ConfigError; the default one is only warned
    about (the agent then numbers by the wall clock, as before)."""
    folder = Path(cfg.state_dir) if cfg.state_dir else default_state_dir()
    if folder is None:
        log.warning("no state_dir and no home folder: sequence numbers follow the wall clock "
                    "only (give --state-dir)")
        return SeqCounter(None)
    path = folder / f"{cfg.agent_id}.seq"
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        return SeqCounter(path)
    except OSError as exc:
        if cfg.state_dir:
            raise ConfigError(f"state_dir {cfg.state_dir}: cannot keep the sequence counter "
                              f"there: {exc}") from None
        log.warning("cannot keep the sequence counter in %s (%s): sequence numbers follow the "
                    "wall clock only (give --state-dir)", path, exc)
        return SeqCounter(None)
