"""Payload bytes per agent and direction, split into model traffic (deltas, averages) and
control traffic (hellos, FDA states, triggers), so every comparison comes from events.jsonl."""

from __future__ import annotations

from collections import Counter, defaultdict

from fleetfl.shared.core.messages import Kind

MODEL_KINDS = (Kind.UPDATE, Kind.AVG)
CATEGORIES = ("up_model", "up_control", "up_rejected", "down_model", "down_control")


class ByteLedger:
    def __init__(self) -> None:
        self.per_agent: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.model_published = 0  # retained full models, fetched only by joiners
        self._last: Counter[str] = Counter()

    def up(self, agent: str, kind: Kind | None, size: int) -> None:
        """`kind` None: the message was refused before its kind was known."""
        if kind is None:
            category = "up_rejected"
        else:
            category = "up_model" if kind in MODEL_KINDS else "up_control"
        self.per_agent[agent][category] += size

    def down(self, kind: Kind, size: int, recipients: list[str]) -> None:
        if kind is Kind.MODEL:
            self.model_published += size
            return
        category = "down_model" if kind in MODEL_KINDS else "down_control"
        for agent in recipients:
            self.per_agent[agent][category] += size

    def totals(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for counts in self.per_agent.values():
            total.update(counts)
        return total

    def snapshot(self) -> dict:
        """Totals, the change since the last snapshot, and per-agent totals."""
        total = self.totals()
        since = {f"{c}_since": total[c] - self._last[c] for c in CATEGORIES}
        self._last = total
        up = total["up_model"] + total["up_control"] + total["up_rejected"]
        down = total["down_model"] + total["down_control"]
        return {"bytes_up_total": up, "bytes_down_total": down,
                **{c: total[c] for c in CATEGORIES}, **since,
                "model_published": self.model_published,
                "bytes_by_agent": {a: dict(c) for a, c in sorted(self.per_agent.items())}}
