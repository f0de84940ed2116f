"""Broker addresses as users write them: mqtt://HOST:PORT, mqtts://HOST:PORT, HOST:PORT or HOST.

``mqtts://`` is MQTT over TLS (default port 8883): the broker's certificate is checked against
the system's CA store, or against `tls_ca` (``--tls-ca``) when one is given. ``mqtt://`` is
plain TCP (default port 1883), unless `tls_ca` is set, which also turns TLS on.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883
SCHEMES = {"mqtt": False, "mqtts": True}  # scheme -> TLS
EXPECTED = "expected mqtt://HOST:PORT or mqtts://HOST:PORT"


@dataclass(frozen=True)
class BrokerURL:
    host: str
    port: int = DEFAULT_PORT
    tls: bool = False  # mqtts://: TLS even without tls_ca (system CA store)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6 literal
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"


def parse_broker_url(url: str) -> BrokerURL:
    """Parse ``mqtt://host:port``, ``mqtts://host:port``, ``host:port``, ``mqtt://host`` or
    ``host``; the port defaults to 1883, or 8883 for ``mqtts://``."""
    text = url.strip() if isinstance(url, str) else ""
    if not text:
        raise ValueError(f"empty broker address {url!r}; {EXPECTED}")
    if "://" not in text:
        text = "mqtt://" + text
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"unsupported broker URL scheme {parts.scheme!r} in {url!r}; {EXPECTED}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"broker URL {url!r} must not have a path or query; {EXPECTED}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"broker URL {url!r} must not contain credentials")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad port in broker URL {url!r}; expected a number 1-65535") from None
    host = parts.hostname
    if not host:
        raise ValueError(f"missing host in broker URL {url!r}; {EXPECTED}")
    if port == 0:
        raise ValueError(f"bad port in broker URL {url!r}; expected a number 1-65535")
    tls = SCHEMES[scheme]
    if port is None:
        port = DEFAULT_TLS_PORT if tls else DEFAULT_PORT
    return BrokerURL(host=host, port=port, tls=tls)
