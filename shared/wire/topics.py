"""MQTT topic names of one run, and who may publish on each (the broker ACL's view)."""

from __future__ import annotations

from fleetfl.shared.core.messages import Kind, Message


class Topics:
    """Topic names of one run (README, "Wire contract")."""

    def __init__(self, run: str) -> None:
        self.run = run
        self.prefix = prefix = f"fl/{run}"
        self.up_all = f"{prefix}/up/+"  # the coordinator's subscriptions
        self.status_all = f"{prefix}/status/+"
        self.avg = f"{prefix}/down/avg"  # averages, to every agent
        self.ctl = f"{prefix}/down/ctl"  # control: stop, sync, assign, evaluate
        self.model = f"{prefix}/down/model"  # the retained full model, for joiners

    def up(self, agent: str) -> str:
        return f"{self.prefix}/up/{agent}"

    def status(self, agent: str) -> str:
        return f"{self.prefix}/status/{agent}"

    def refusal(self, agent: str) -> str:
        """Where the coordinator tells `agent` that a message of its was refused: below the
        agent's status topic, which the broker ACL lets only that agent (and the coordinator)
        read; agents may not write it."""
        return f"{self.prefix}/status/{agent}/refusal"

    def for_outgoing(self, msg: Message) -> tuple[str, bool]:
        """(topic, retain) on which a message of this kind travels."""
        match msg.kind:
            case Kind.UPDATE | Kind.FDA_STATE | Kind.METRICS:
                return self.up(msg.sender), False
            case Kind.HELLO | Kind.OFFLINE | Kind.REFUSED:
                return self.status(msg.sender), True
            case Kind.AVG:
                return self.avg, False
            case Kind.MODEL:
                return self.model, True
            case Kind.STOP | Kind.SYNC | Kind.ASSIGN | Kind.EVALUATE:
                return self.ctl, False
            case Kind.REFUSAL:
                return self.refusal(msg["agent"]), False
        raise ValueError(f"no topic for kind {msg.kind}")

    def sender_of(self, topic: str) -> str | None:
        """Agent id named by an up/ or status/ topic (what the broker ACL binds to)."""
        parts = topic.split("/")
        if len(parts) == 4 and parts[0] == "fl" and parts[1] == self.run:
            if parts[2] in ("up", "status"):
                return parts[3]
        return None


def topic_owner(topic: str) -> str:
    """Who may publish on `topic` under the broker ACL, for per-sender limits: one agent owns
    both fl/<run>/up/<id> and fl/<run>/status/<id> (and the chunks below them), the coordinator
    all of fl/<run>/down/ (and fl/<run>/status/<id>/refusal, never chunked: a few hundred
    bytes). Any other topic is its own owner."""
    parts = topic.split("/")
    if len(parts) >= 4 and parts[0] == "fl" and parts[2] in ("up", "status"):
        return f"fl/{parts[1]}/agent/{parts[3]}"
    if len(parts) >= 3 and parts[0] == "fl" and parts[2] == "down":
        return f"fl/{parts[1]}/down"
    return topic
