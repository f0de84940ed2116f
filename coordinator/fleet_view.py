"""What an operator sees of the fleet while the coordinator runs (issue 15, item 4).

- While the start barrier holds the first window, a log line every BARRIER_LOG_S names whom it
  waits for: agents online without an update yet, agents gone offline, and, when `agent_keys`
  lists the fleet, those never seen; without that list it counts them and names the ones
  online. A first version that `start_timeout` let go ahead short-handed is logged loudly.
- systemd's STATUS= says the version, the agents online and the last accuracy (or the
  barrier's count), sent when it changes, at most once per second.

The view only reads the state machine: the barrier's decisions are the state machine's
(averaging.py), so a journal replay makes the same ones. It looks at the roster (a pass over
every agent) at most once per CHECK_S.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from fleetfl.shared.core.averaging import WindowAveraging
from fleetfl.shared.sd_notify import Status

log = logging.getLogger("fleetfl.coordinator")
BARRIER_LOG_S = 30.0  # seconds between two "waiting for" lines
CHECK_S = 1.0  # seconds between two looks at the roster
NAMES_SHOWN = 20  # ids named per list in a log line; the rest are counted


def names(ids: Collection[str], limit: int = NAMES_SHOWN) -> str:
    """Sorted ids, at most `limit` of them named."""
    ordered = sorted(ids)
    more = len(ordered) - limit
    return ", ".join(ordered[:limit]) + (f" and {more} more" if more > 0 else "")


class FleetView:
    def __init__(self, min_agents: int, roster: Collection[str] = (),
                 every: float = BARRIER_LOG_S, check: float = CHECK_S) -> None:
        """`roster`: the agent ids the coordinator expects (agent_keys), to name the ones
        never seen; empty: unknown."""
        self.min_agents = min_agents
        self.roster = frozenset(roster)
        self.every, self.check = every, check
        self.status = Status()
        self.waiting_since: float | None = None  # first tick: the barrier's log counts from it
        self.logged_at: float | None = None
        self.checked_at: float | None = None
        self.said_start = False

    def tick(self, core: WindowAveraging, now: float, accuracy: float | None) -> None:
        """From the main loop, before the shell takes the new versions (core.results). `now`
        is the state machine's clock."""
        if not self.said_start:
            self._short_handed_start(core)
        if self.checked_at is not None and now - self.checked_at < self.check:
            self.status.poll(now)
            return
        self.checked_at = now
        if self.waiting_since is None:
            self.waiting_since = now
        online = [a for a, r in list(core.agents.items()) if r.online]
        count = core.barrier_count()
        if count is not None and count < self.min_agents:
            self.status.set(f"waiting for agents: {count} of min_agents {self.min_agents} "
                            f"in, {len(online)} online", now)
            if now - (self.logged_at or self.waiting_since) >= self.every:
                self.logged_at = now
                self._log_waiting(core, count, online, now)
            return
        text = f"version {core.version}, {len(online)} agents online"
        self.status.set(text + (f", accuracy {accuracy:.4f}" if accuracy is not None
                                else ""), now)

    def _log_waiting(self, core: WindowAveraging, count: int, online: list[str],
                     now: float) -> None:
        """Who the start barrier waits for, and when start_timeout lets the run go ahead."""
        reported = set(core.pending.get(1, {}))
        parts = []
        if core.monitor is None and (idle := set(online) - reported):
            parts.append(f"{names(idle)} (online, no update yet)")
        if offline := {a for a, r in list(core.agents.items()) if not r.online} - reported:
            parts.append(f"{names(offline)} (offline)")
        if self.roster:
            if unseen := self.roster - core.agents.keys():
                parts.append(f"{names(unseen)} (never said hello)")
        elif (unseen_n := self.min_agents - len(core.agents)) > 0:
            parts.append(f"{unseen_n} more never seen (no agent_keys list to name them)")
        lifts_at, quorum = core.barrier_lifts_at(), core.quorum
        late = lifts_at is not None and now >= lifts_at
        if core.start_timeout <= 0:
            timeout = "no start_timeout: it waits for min_agents"
        elif lifts_at is None:
            timeout = f"start_timeout {core.start_timeout:g} s counts from the first hello"
        elif not late:
            timeout = f"goes ahead in {lifts_at - now:.0f} s with at least {quorum} in"
        else:
            timeout = f"start_timeout passed: it goes ahead once {quorum} are in (start_quorum)"
        log.log(logging.WARNING if late else logging.INFO,
                "start barrier: %d of min_agents %d in, %d online (%s); waiting for %s; %s",
                count, self.min_agents, len(online), names(online) or "none",
                "; ".join(parts) or "their updates", timeout)

    def _short_handed_start(self, core: WindowAveraging) -> None:
        """Say loudly that start_timeout started the run with fewer than min_agents."""
        first = next((r for r in core.results if r.window == 1), None)
        if first is None:
            if core.closed_window > 0:
                self.said_start = True  # resumed past it: nothing to say
            return
        self.said_start = True
        if len(first.seqs) >= self.min_agents:
            return
        without = (self.roster | core.agents.keys()) - first.seqs.keys()
        unnamed = self.min_agents - len(first.seqs) - len(without)
        log.warning("start barrier: start_timeout %g s passed: the run STARTS SHORT-HANDED with "
                    "%d of min_agents %d (%s); without %s%s", core.start_timeout,
                    len(first.seqs), self.min_agents, names(first.seqs),
                    names(without) or "none named",
                    f" and {unnamed} never seen" if unnamed > 0 else "")
