"""mqtt_auth: settings from config keys over FL_MQTT_* variables, applied to a paho client.
(TLS and ACLs against a real provisioned broker: tests/test_fleet.py.)"""

from __future__ import annotations

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
