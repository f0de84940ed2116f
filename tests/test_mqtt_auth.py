"""mqtt_auth: settings from config keys over FL_MQTT_* variables, applied to a paho client.
(TLS and ACLs against a real provisioned broker: tests/test_fleet.py.)"""

from __future__ import annotations

import dataclasses
import ssl

import pytest

from fleetfl.shared.config import ConfigError, load_agent_config, load_config
from fleetfl.shared.net import mqtt_auth


class FakeClient:
    def __init__(self):
        self.tls = None
        self.creds = None

    def tls_set(self, **kwargs):
        self.tls = kwargs

    def username_pw_set(self, username, password=None):
        self.creds = (username, password)


def test_nothing_configured_changes_nothing():
    client = FakeClient()
    mqtt_auth.apply(client, mqtt_auth.from_env({}))
    assert client.tls is None and client.creds is None


def test_config_keys_override_environment(tmp_path):
    ca, pw = tmp_path / "ca.crt", tmp_path / "pw"
    ca.write_text("x")
    pw.write_text("s3cret\n")
    env = {"FL_MQTT_TLS_CA": "/nonexistent/ca.crt", "FL_MQTT_USERNAME": "pi01",
           "FL_MQTT_PASSWORD_FILE": str(pw)}
    cfg = load_agent_config(None, {"agent_id": "pi01", "tls_ca": str(ca)})
    auth = mqtt_auth.resolve(cfg, env)
    assert auth.tls_ca == str(ca) and auth.username == "pi01" and auth.password_file == str(pw)
    client = FakeClient()
    mqtt_auth.apply(client, auth)
    assert client.tls["ca_certs"] == str(ca) and client.tls["cert_reqs"] == ssl.CERT_REQUIRED
    assert client.tls["certfile"] is None
    assert client.creds == ("pi01", "s3cret")


def test_yaml_and_run_config_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("run: job1\nusername: coordinator\npassword_file: /etc/fleetfl/pw\n"
                    "job: {algo: dga}\n")
    cfg = load_config(path)
    assert cfg.username == "coordinator" and cfg.tls_ca == ""
    assert mqtt_auth.from_yaml(path).password_file == "/etc/fleetfl/pw"
    path.write_text("username: [1]\n")
    with pytest.raises(ConfigError, match="username"):
        mqtt_auth.from_yaml(path)


@pytest.mark.parametrize("settings, message", [
    ({"tls_cert": "a", "tls_key": "b"}, "need tls_ca"),
    ({"tls_ca": "{ca}", "tls_cert": "{ca}"}, "go together"),
    ({"password_file": "{ca}"}, "needs a username"),
    ({"tls_ca": "/nonexistent/ca.crt"}, "tls_ca: cannot read"),
])
def test_incomplete_settings_are_refused(tmp_path, settings, message):
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    auth = mqtt_auth.MqttAuth(**{k: v.format(ca=ca) for k, v in settings.items()})
    with pytest.raises(ConfigError, match=message):
        mqtt_auth.apply(FakeClient(), auth)


def test_empty_password_file_is_refused(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        mqtt_auth.apply(FakeClient(), mqtt_auth.MqttAuth(username="u", password_file=str(pw),
                                                         insecure_credentials=True))


def test_a_password_is_not_sent_in_clear_unless_allowed(tmp_path):
    """Issue 14, finding 8: a password_file without tls_ca went over plain TCP. Refused now,
    naming the way out; the explicit insecure setting (key, flag or variable) allows it."""
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    plain = mqtt_auth.MqttAuth(username="pi01", password_file=str(pw))
    client = FakeClient()
    with pytest.raises(ConfigError, match="in clear.*insecure_credentials"):
        mqtt_auth.apply(client, plain)
    assert client.creds is None
    env = {"FL_MQTT_USERNAME": "pi01", "FL_MQTT_PASSWORD_FILE": str(pw)}
    with pytest.raises(ConfigError, match="insecure_credentials"):
        mqtt_auth.apply(FakeClient(), mqtt_auth.resolve(None, env))
    for auth in (mqtt_auth.resolve(None, {**env, "FL_MQTT_INSECURE_CREDENTIALS": "1"}),
                 mqtt_auth.resolve(load_agent_config(None, {"agent_id": "pi01",
                                                            "insecure_credentials": True}), env),
                 mqtt_auth.resolve(load_config(None, {"insecure_credentials": True}), env)):
        client = FakeClient()
        mqtt_auth.apply(client, auth)
        assert client.creds == ("pi01", "s3cret") and client.tls is None
    # a user name alone is no secret; without a password nothing needs the flag
    mqtt_auth.apply(FakeClient(), mqtt_auth.MqttAuth(username="pi01"))


@pytest.mark.parametrize("cli", ["fleetfl.agent.cli", "fleetfl.coordinator.cli"])
def test_the_insecure_flag_reaches_the_config(cli):
    import importlib

    parse = importlib.import_module(cli).parse_args
    base = ["--agent-id", "pi01"] if "agent" in cli else []
    assert parse(base + ["--allow-insecure-credentials"]).insecure_credentials is True
    assert parse(base).insecure_credentials is None  # unset: the config file decides


def test_bad_ca_file_is_a_config_error(tmp_path):
    import paho.mqtt.client as mqtt

    ca = tmp_path / "ca.crt"
    ca.write_text("not a certificate")
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
    with pytest.raises(ConfigError, match="tls_ca"):
        mqtt_auth.apply(client, mqtt_auth.MqttAuth(tls_ca=str(ca)))


def test_mqtts_url_turns_tls_on_with_the_system_ca_store(tmp_path):
    """Issue 20, item 2: an mqtts:// broker URL is TLS without tls_ca, verified against the
    system CA store (paho: ca_certs None -> load_default_certs), and a password may go over
    it; tls_ca still overrides the store."""
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    client = FakeClient()
    auth = mqtt_auth.MqttAuth(username="pi01", password_file=str(pw), tls_url=True)
    mqtt_auth.apply(client, auth)
    assert client.tls["ca_certs"] is None and client.tls["cert_reqs"] == ssl.CERT_REQUIRED
    assert client.creds == ("pi01", "s3cret")
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    client = FakeClient()
    mqtt_auth.apply(client, mqtt_auth.MqttAuth(tls_ca=str(ca), tls_url=True))
    assert client.tls["ca_certs"] == str(ca)
    # a client certificate needs TLS: tls_ca or mqtts:// will do
    mqtt_auth.apply(FakeClient(), mqtt_auth.MqttAuth(tls_cert=str(ca), tls_key=str(ca),
                                                     tls_url=True))


def test_mqtts_reaches_the_link(tmp_path):
    import queue

    from fleetfl.shared.net.broker_url import parse_broker_url
    from fleetfl.shared.net.transport import MqttLink

    link = MqttLink(parse_broker_url("mqtts://broker.example"), "c", queue.Queue(),
                    auth=mqtt_auth.MqttAuth())
    assert link._auth.tls and link._auth.tls_ca == "" and link.broker.port == 8883
    assert link.client._ssl  # paho's TLS is on
    plain = MqttLink(parse_broker_url("mqtt://broker.example"), "c", queue.Queue(),
                     auth=mqtt_auth.MqttAuth())
    assert not plain._auth.tls and not plain.client._ssl


def test_an_agents_username_defaults_to_its_id(tmp_path):
    """Issue 20, item 3: a password file without a username was refused ("needs a
    username"); an agent's username is its id (README, ACL), so it is the default. An
    explicit username (flag, key or FL_MQTT_USERNAME) still wins."""
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    cfg = load_agent_config(None, {"agent_id": "pi07", "password_file": str(pw)})
    auth = mqtt_auth.resolve(cfg, {})
    assert auth.username == "pi07"
    client = FakeClient()
    mqtt_auth.apply(client, mqtt_auth.resolve(cfg, {"FL_MQTT_INSECURE_CREDENTIALS": "1"}))
    assert client.creds == ("pi07", "s3cret")
    assert mqtt_auth.resolve(cfg, {"FL_MQTT_USERNAME": "other"}).username == "other"
    named = load_agent_config(None, {"agent_id": "pi07", "password_file": str(pw),
                                     "username": "dev7"})
    assert mqtt_auth.resolve(named, {}).username == "dev7"
    # no password: no username is made up (an anonymous broker stays anonymous)
    assert mqtt_auth.resolve(load_agent_config(None, {"agent_id": "pi07"}), {}).username == ""
    # the coordinator has no id to fall back on: its account must be named
    coordinator = mqtt_auth.resolve(load_config(None, {"password_file": str(pw)}), {})
    assert coordinator.username == ""
    with pytest.raises(ConfigError, match="needs a username"):
        mqtt_auth.apply(FakeClient(), dataclasses.replace(coordinator, tls_url=True))
