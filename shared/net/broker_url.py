"""Broker addresses as users write them: mqtt://HOST:PORT, HOST:PORT or HOST."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_PORT = 1883


@dataclass(frozen=True)
class BrokerURL:
    host: str
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6 literal
        return f"mqtt://{host}:{self.port}"


def parse_broker_url(url: str) -> BrokerURL:
    """Parse ``mqtt://host:port``, ``host:port``, ``mqtt://host`` or ``host`` (port 1883)."""
    text = url.strip() if isinstance(url, str) else ""
    if not text:
        raise ValueError(f"empty broker address {url!r}; expected mqtt://HOST:PORT")
    if "://" not in text:
        text = "mqtt://" + text
    parts = urlsplit(text)
    if parts.scheme.lower() != "mqtt":
        raise ValueError(
            f"unsupported broker URL scheme {parts.scheme!r} in {url!r}; expected mqtt://HOST:PORT"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(
            f"broker URL {url!r} must not have a path or query; expected mqtt://HOST:PORT"
        )
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"broker URL {url!r} must not contain credentials")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad port in broker URL {url!r}; expected a number 1-65535") from None
    host = parts.hostname
    if not host:
        raise ValueError(f"missing host in broker URL {url!r}; expected mqtt://HOST:PORT")
    if port == 0:
        raise ValueError(f"bad port in broker URL {url!r}; expected a number 1-65535")
    return BrokerURL(host=host, port=DEFAULT_PORT if port is None else port)
