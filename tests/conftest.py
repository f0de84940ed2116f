"""Shared fixtures: a real MQTT broker (Docker if it answers, else a local mosquitto)."""

from __future__ import annotations

import functools
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fleetfl.shared.devtools.local_broker import (
    BrokerError,
    LocalMosquitto,
    find_mosquitto,
    free_port,
    mosquitto_config,
)


def require_root_and_mosquitto(why: str) -> None:
    """Skip unless root (the Ansible roles create users) with a mosquitto binary."""
    if os.geteuid() != 0:
        pytest.skip(why)
    try:
        find_mosquitto()
    except Exception as exc:
        pytest.skip(str(exc))


@functools.cache
def _docker_answers() -> bool:
    # Checked once per session; without a daemon this fails in milliseconds.
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


class _ContainerBroker:
    """MosquittoContainer behind LocalMosquitto's interface (host, port, url, restart)."""

    _RUNNING = re.compile(rb"mosquitto version \S+ running")

    def __init__(self, config: Path) -> None:
        from testcontainers.community.mqtt import MosquittoContainer

        class _FixedPort(MosquittoContainer):
            # start() re-exposes 1883 on a random port; a fixed one survives restart().
            def with_exposed_ports(self, *ports: str | int) -> _FixedPort:
                return self

        self.port = free_port()
        self._container = _FixedPort().with_bind_ports(1883, self.port)
        self._container.start(configfile=str(config))
        self.host = self._container.get_container_host_ip()
        self.url = f"mqtt://{self.host}:{self.port}"

    def restart(self, timeout: float = 30.0) -> _ContainerBroker:
        wrapped = self._container.get_wrapped_container()
        before = len(self._RUNNING.findall(wrapped.logs()))
        wrapped.restart(timeout=5)
        deadline = time.monotonic() + timeout
        while len(self._RUNNING.findall(wrapped.logs())) <= before:
            if time.monotonic() > deadline:
                raise BrokerError(f"mosquitto container did not come back within {timeout} s")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        self._container.stop()


@contextmanager
def local_broker_or_skip(**options) -> Iterator[LocalMosquitto]:
    """A LocalMosquitto with these options, closed afterwards; the test skips without one."""
    try:
        local = LocalMosquitto(**options).start()
    except BrokerError as exc:
        pytest.skip(f"no MQTT broker available: {exc}")
    try:
        yield local
    finally:
        local.close()


@contextmanager
def _any_broker(tmp: Path) -> Iterator[LocalMosquitto | _ContainerBroker]:
    if _docker_answers():
        config = tmp / "mosquitto.conf"
        config.write_text(mosquitto_config("1883"))  # same limits as LocalMosquitto
        container = _ContainerBroker(config)
        try:
            yield container
        finally:
            container.stop()
        return
    with local_broker_or_skip() as local:
        yield local


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LocalMosquitto | _ContainerBroker]:
    """A fresh broker per test, so tests may restart() it."""
    with _any_broker(tmp_path) as b:
        yield b


@pytest.fixture(scope="session")
def session_broker(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LocalMosquitto | _ContainerBroker]:
    """One broker for the whole session; do not restart it."""
    with _any_broker(tmp_path_factory.mktemp("broker")) as b:
        yield b


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The data folder of the `shared` checkout beside this repo."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared data folder not found: {path}")
    return path
