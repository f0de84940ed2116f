"""Where every update went: the coordinator's side of the record and a checker.

Records (all keyed by the update's (sender, seq); one update is one MQTT message):

- the agent logs `update sent agent=A seq=S window=W t=WALL` when it publishes an update and
  `update acked agent=A seq=S` once the broker's PUBACK is in (agent/runner.py);
- the coordinator appends to `accounting.jsonl` in the run dir one line per update it decoded,
  `{"u": [A, S, W], "o": "accepted"}` or `{"u": ..., "o": "refused", "r": REASON}` (a
  journal replay after `--resume` writes its lines again: outcomes are facts about deliveries,
  read as sets), `"o": "unhandled"` for those still in its inbox when it stopped, and a last
  line `{"stop": WALL}`. The file is not cut back on resume;
- each events.jsonl version line lists the updates averaged into it: `"updates": [[A, S, W]..]`
  (lines past the checkpoint are dropped on resume and written again by the replay).

`check()` classifies every update an agent sent, best outcome first: applied (in a version),
pending (accepted, its window still open at stop), refused (by reason), in flight at stop
(unhandled, or sent after, or less than TRANSIT_S before, the coordinator stopped), lost
(PUBACKed, yet none of these), or
unconfirmed (never PUBACKed, never seen: the agent was killed or cut off before the broker
had it, which QoS 1 does not promise to deliver). Applied twice: one (sender, seq), or one
(sender, window), in more than one version.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fleetfl.coordinator import events
from fleetfl.shared.core.messages import Message

ACCOUNTING = "accounting.jsonl"
SENT = re.compile(r"update sent agent=(\S+) seq=(\d+) window=(-?\d+) t=([\d.]+)")
ACKED = re.compile(r"update acked agent=(\S+) seq=(\d+)")

Key = tuple[str, int]
# An update the agent sent this close before the coordinator stopped may still have been on
# its way (agent -> broker -> coordinator) when the coordinator closed its link: the broker
# then keeps it for the coordinator's session, so it is in flight, not lost. One second is
# hundreds of broker hops on a LAN (1.6 ms on loopback, bench/README.md "Round overhead");
# a CI run found one sent 4 ms before the stop and PUBACKed after it.
TRANSIT_S = 1.0


class AccountingLog:
    """The coordinator's append-only outcome file (flushed per line, not fsynced: it is a
    record for the checker, not state)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / ACCOUNTING
        self._file = None

    def reset(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)

    def update(self, msg: Message, outcome: str, reason: str = "") -> None:
        self.outcome((msg.sender, msg.seq, msg.fields.get("window", -1)), outcome, reason)

    def outcome(self, update: tuple[str, int, int], outcome: str, reason: str = "") -> None:
        """(sender, seq, window): an accepted update left out of its average is "refused"."""
        line: dict = {"u": list(update), "o": outcome}
        if reason:
            line["r"] = reason
        self._write(line)

    def stop(self, wall: float) -> None:
        self._write({"stop": wall})
        self.close()

    def _write(self, line: dict) -> None:
        if self._file is None:
            self._file = self.path.open("a")
        self._file.write(json.dumps(line, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class Accounting:
    sent: int = 0
    acked: int = 0  # PUBACKed by the broker (as far as the agents' logs say)
    accepted: int = 0  # accepted by the coordinator (each update once)
    applied: int = 0  # averaged into a version
    pending: int = 0  # accepted, its window still open when the run stopped
    refused: Counter[str] = field(default_factory=Counter)  # never accepted, by reason
    duplicates_refused: int = 0  # deliveries of an accepted update refused again (replays)
    in_flight_at_stop: int = 0
    unconfirmed: int = 0  # never PUBACKed and never seen by the coordinator
    lost: list[Key] = field(default_factory=list)
    twice: list[Key] = field(default_factory=list)
    window_twice: list[tuple[str, int]] = field(default_factory=list)  # (sender, window)
    unknown_applied: list[Key] = field(default_factory=list)  # applied, yet no agent sent it

    def table(self) -> str:
        refused = ", ".join(f"{r} {n}" for r, n in sorted(self.refused.items())) or "none"
        rows = [("sent", self.sent), ("acked (PUBACK)", self.acked),
                ("accepted", self.accepted), ("applied", self.applied),
                ("pending at stop", self.pending), ("refused", sum(self.refused.values())),
                ("  by reason", refused), ("duplicate deliveries refused",
                                           self.duplicates_refused),
                ("in flight at stop", self.in_flight_at_stop),
                ("unconfirmed (no PUBACK)", self.unconfirmed),
                ("lost", len(self.lost)), ("applied twice", len(self.twice)),
                ("(sender, window) twice", len(self.window_twice))]
        return "\n".join(f"{name:<30} {value}" for name, value in rows)


def read_agent_logs(texts: Iterable[str]) -> tuple[dict[Key, float], set[Key]]:
    """(sent: key -> wall time, acked keys) from agents' log texts."""
    sent: dict[Key, float] = {}
    acked: set[Key] = set()
    for text in texts:
        for m in SENT.finditer(text):
            sent[(m[1], int(m[2]))] = float(m[4])
        for m in ACKED.finditer(text):
            acked.add((m[1], int(m[2])))
    return sent, acked


def check(run_dir: str | Path, agent_logs: Iterable[str]) -> Accounting:
    run_dir = Path(run_dir)
    sent, acked = read_agent_logs(agent_logs)
    accepted: set[Key] = set()
    refused: dict[Key, set[str]] = defaultdict(set)
    unhandled: set[Key] = set()
    stop = float("inf")
    path = run_dir / ACCOUNTING
    for line in path.read_text().splitlines() if path.exists() else []:
        rec = json.loads(line)
        if "stop" in rec:
            stop = min(stop, rec["stop"])
            continue
        key = (rec["u"][0], int(rec["u"][1]))
        if rec["o"] == "accepted":
            accepted.add(key)
        elif rec["o"] == "refused":
            refused[key].add(rec.get("r", "?"))
        else:
            unhandled.add(key)
    applied, by_window = _applied(run_dir)
    acc = Accounting(sent=len(sent), acked=len(acked & sent.keys()),
                     accepted=len(accepted | applied.keys()), applied=len(applied))
    acc.duplicates_refused = sum(1 for k in accepted if "replayed" in refused.get(k, ()))
    for key, at in sorted(sent.items()):
        if key in applied:
            continue
        dropped = sorted(refused.get(key, set()) - {"replayed"})  # e.g. at averaging
        if key in accepted and not dropped:
            acc.pending += 1
        elif key in refused:
            acc.refused[(dropped or sorted(refused[key]))[0]] += 1
        elif key in unhandled or at >= stop - TRANSIT_S:
            acc.in_flight_at_stop += 1
        elif key in acked:
            acc.lost.append(key)
        else:
            acc.unconfirmed += 1
    # refusals of updates no agent log mentions (hostile or foreign senders) still count
    for key, reasons in refused.items():
        if key not in sent and key not in accepted:
            acc.refused[sorted(reasons)[0]] += 1
    acc.twice = sorted(k for k, versions in applied.items() if len(versions) > 1)
    acc.window_twice = sorted(k for k, versions in by_window.items() if len(versions) > 1)
    acc.unknown_applied = sorted(k for k in applied if k not in sent)
    return acc


def _applied(run_dir: Path) -> tuple[dict[Key, list[int]], dict[tuple[str, int], list[int]]]:
    """The versions each update (sender, seq) and each (sender, window) went into, from
    events.jsonl's version records (events.read: torn lines skipped)."""
    applied: dict[Key, list[int]] = defaultdict(list)
    by_window: dict[tuple[str, int], list[int]] = defaultdict(list)
    for event in events.read(run_dir / events.FILE)[0]:
        if event["type"] != events.VERSION:
            continue
        for sender, seq, window in event.get("updates", []):
            applied[(sender, int(seq))].append(event["version"])
            by_window[(sender, int(window))].append(event["version"])
    return applied, by_window

def main(argv: list[str] | None = None) -> int:
    """python -m fleetfl.coordinator.accounting RUN_DIR AGENT_LOG... (e.g. journalctl output
    of each agent unit): print the table; exit 1 if an update was lost or applied twice."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m fleetfl.coordinator.accounting",
                                description=main.__doc__)
    p.add_argument("run_dir", help="the run's directory (<run_dir>/<run>)")
    p.add_argument("agent_logs", nargs="+", help="agents' log files")
    args = p.parse_args(argv)
    acc = check(args.run_dir, [Path(f).read_text(errors="replace") for f in args.agent_logs])
    print(acc.table())
    for key in acc.lost:
        print(f"lost: {key[0]} seq {key[1]}")
    for key in acc.twice:
        print(f"applied twice: {key[0]} seq {key[1]}")
    return 1 if acc.lost or acc.twice or acc.window_twice else 0


if __name__ == "__main__":
    raise SystemExit(main())
