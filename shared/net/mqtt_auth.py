"""TLS and username/password for the MQTT link, from config keys or environment variables.

A provisioned fleet's broker accepts only TLS connections with a per-device username and
password (and, if it requires one, a client certificate). The settings come from the agent or
run config (keys below, flags `--tls-ca` ...) and fall back to environment variables, so a
systemd unit or a test can also set them with `Environment=`:

| key | variable | meaning |
| --- | --- | --- |
| `tls_ca` | `FL_MQTT_TLS_CA` | CA (PEM) of the broker's certificate; turns TLS on |
| `tls_cert` / `tls_key` | `FL_MQTT_TLS_CERT` / `FL_MQTT_TLS_KEY` | client certificate and key |
| `username` | `FL_MQTT_USERNAME` | MQTT username (an agent's: its id, bound by the ACL) |
| `password_file` | `FL_MQTT_PASSWORD_FILE` | file whose first line is the password |
| `insecure_credentials` | `FL_MQTT_INSECURE_CREDENTIALS` | allow a password without TLS |

The password is read from a file, never given on the command line (where `ps` shows it),
and it is not sent over plain TCP, where anyone on the path reads it: a password without
TLS (`tls_ca` or an `mqtts://` broker URL) is refused unless `insecure_credentials` (flag
`--allow-insecure-credentials`, the variable set to 1/true/yes) says the network is trusted.
The host name in the broker URL is checked against the broker's certificate. An
`mqtts://` broker URL turns TLS on without `tls_ca`, verified against the system CA store.
An agent given a password file and no username uses its id as the username.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fleetfl.shared.core.job import ConfigError

__all__ = ["ENV", "INSECURE_ENV", "MqttAuth", "apply", "from_env", "from_yaml", "read_password",
           "resolve"]

ENV = {
    "tls_ca": "FL_MQTT_TLS_CA",
    "tls_cert": "FL_MQTT_TLS_CERT",
    "tls_key": "FL_MQTT_TLS_KEY",
    "username": "FL_MQTT_USERNAME",
    "password_file": "FL_MQTT_PASSWORD_FILE",
}
INSECURE_ENV = "FL_MQTT_INSECURE_CREDENTIALS"  # the one flag: not a path or name like ENV's


@dataclass(frozen=True)
class MqttAuth:
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    username: str = ""
    password_file: str = ""
    insecure_credentials: bool = False
    # the broker URL is mqtts://: TLS, verified against the system CA store unless tls_ca
    tls_url: bool = False

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca) or self.tls_url

    def check(self) -> None:
        """Refuse incomplete or unreadable settings, naming the key."""
        if (self.tls_cert or self.tls_key) and not self.tls:
            raise ConfigError("tls_cert/tls_key need tls_ca (the CA of the broker's "
                              "certificate) or an mqtts:// broker URL")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key go together")
        if self.password_file and not self.username:
            raise ConfigError("password_file needs a username (username, --username or "
                              "FL_MQTT_USERNAME; an agent's defaults to its id)")
        if self.password_file and not self.tls and not self.insecure_credentials:
            raise ConfigError("password_file without TLS would send the password in clear: "
                              "use an mqtts:// broker URL or set tls_ca, or insecure_credentials "
                              "(--allow-insecure-credentials) on a network you trust")
        for key in ("tls_ca", "tls_cert", "tls_key", "password_file"):
            path = getattr(self, key)
            if path and not os.access(path, os.R_OK):
                raise ConfigError(f"{key}: cannot read {path}")


def from_env(env: dict[str, str] | None = None) -> MqttAuth:
    env = os.environ if env is None else env
    insecure = env.get(INSECURE_ENV, "").strip().lower() in ("1", "true", "yes")
    return MqttAuth(**{key: env.get(var, "") for key, var in ENV.items()},
                    insecure_credentials=insecure)


def from_yaml(path: str | Path) -> MqttAuth:
    """A small YAML mapping with (some of) the keys above; other keys are ignored, so an
    agent's or coordinator's whole config file can be passed."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read MQTT settings from {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping")
    return _from_mapping(data, str(path))


def _from_mapping(data: dict, where: str) -> MqttAuth:
    values = {}
    for key in ENV:
        value = data.get(key) or ""
        if not isinstance(value, str):
            raise ConfigError(f"{key} in {where}: expected a string, got {value!r}")
        values[key] = value
    insecure = data.get("insecure_credentials", False)
    if not isinstance(insecure, bool):
        raise ConfigError(f"insecure_credentials in {where}: expected true or false, "
                          f"got {insecure!r}")
    return MqttAuth(**values, insecure_credentials=insecure)


def resolve(cfg: Any = None, env: dict[str, str] | None = None) -> MqttAuth:
    """The environment's settings, overridden key by key by non-empty config values.

    An agent's config (one with an `agent_id`) given a password file but no username uses
    its id as the username, the name the fleet's broker and ACL know it by. The coordinator
    has no such default: its account is whatever the operator provisioned."""
    base = from_env(env)
    if cfg is None:
        return base
    mine = {key: getattr(cfg, key, "") or "" for key in ENV}
    insecure = base.insecure_credentials or bool(getattr(cfg, "insecure_credentials", False))
    auth = dataclasses.replace(base, **{k: v for k, v in mine.items() if v},
                               insecure_credentials=insecure)
    agent_id = getattr(cfg, "agent_id", "") or ""
    if auth.password_file and not auth.username and isinstance(agent_id, str) and agent_id:
        auth = dataclasses.replace(auth, username=agent_id)
    return auth


def read_password(path: str | Path) -> str:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"password_file: cannot read {path}: {exc.strerror}") from None
    lines = text.splitlines()
    if not lines or not lines[0]:
        raise ConfigError(f"password_file: {path} is empty")
    return lines[0]


def apply(client: Any, auth: MqttAuth) -> None:
    """Configure a paho Client: TLS (certificate and host name verified) and credentials."""
    auth.check()
    if auth.tls:
        try:  # ca_certs None: the system CA store (mqtts:// without tls_ca)
            client.tls_set(ca_certs=auth.tls_ca or None, certfile=auth.tls_cert or None,
                           keyfile=auth.tls_key or None, cert_reqs=ssl.CERT_REQUIRED,
                           tls_version=ssl.PROTOCOL_TLS_CLIENT)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(f"tls_ca/tls_cert/tls_key: {exc}") from None
    if auth.username:
        password = read_password(auth.password_file) if auth.password_file else None
        client.username_pw_set(auth.username, password)


def add_auth_flags(parser: Any) -> None:
    """The TLS and credential flags shared by fl-agent and fl-coordinator."""
    parser.add_argument("--tls-ca", dest="tls_ca",
                        help="CA certificate (PEM) of the broker: use TLS, verified against "
                             "this CA (mqtts:// URLs use the system CA store without it)")
    parser.add_argument("--tls-cert", dest="tls_cert", help="client certificate (PEM)")
    parser.add_argument("--tls-key", dest="tls_key", help="client certificate's key (PEM)")
    parser.add_argument("--username", help="MQTT username (fl-agent: defaults to its "
                                           "--agent-id when a password file is given)")
    parser.add_argument("--password-file", dest="password_file",
                        help="file with the MQTT password (first line); needs TLS "
                             "(mqtts:// or --tls-ca)")
    parser.add_argument("--allow-insecure-credentials", dest="insecure_credentials",
                        action="store_true", default=None,
                        help="send the password without TLS (a network you trust)")
