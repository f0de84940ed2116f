"""mqtt_auth: settings from config keys over FL_MQTT_* variables, applied to a paho client.
(TLS and ACLs against a real provisioned broker: tests/test_fleet.py.)"""

from __future__ import annotations

import ssl

import pytest

from fleetfl.shared import mqtt_auth
from fleetfl.shared.config import ConfigError, load_agent_config, load_config


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
        mqtt_auth.apply(FakeClient(), mqtt_auth.MqttAuth(username="u", password_file=str(pw)))


def test_bad_ca_file_is_a_config_error(tmp_path):
    import paho.mqtt.client as mqtt

    ca = tmp_path / "ca.crt"
    ca.write_text("not a certificate")
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
    with pytest.raises(ConfigError, match="tls_ca"):
        mqtt_auth.apply(client, mqtt_auth.MqttAuth(tls_ca=str(ca)))
