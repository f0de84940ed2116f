"""Shared fixtures: a real MQTT broker, Mosquitto in a container when a Docker engine answers
(scripts/broker-image.sh builds its image), else the local mosquitto binary."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import time
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import pytest

from fleetfl.shared.devtools.local_broker import (
    DEFAULT_MAX_PACKET_SIZE,
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


# -- which broker: Mosquitto in a container when a Docker engine answers, else the binary -------
# The image is built locally by scripts/broker-image.sh (no registry). FLEETFL_TEST_BROKER=
# container makes its absence an error (CI), =binary skips Docker; the default is auto.
BROKER_IMAGE = os.environ.get("FLEETFL_BROKER_IMAGE", "fleetfl/mosquitto:2.0.11")
IMAGE_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "broker-image.sh"
# Tests address only this machine (testcontainers would report the bridge's gateway), and
# Ryuk, testcontainers' reaper, is an image from a registry: containers are removed here
# instead (ContainerBroker.close, and _remove_orphans for those of a killed session).
os.environ.setdefault("TESTCONTAINERS_HOST_OVERRIDE", "127.0.0.1")
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
_LABEL = "org.fleetfl.test-broker"  # value: the pid of the pytest that made it


def _why_not(exc: BaseException) -> str:
    """A short reason from a docker SDK error (its cause chain or args hold the socket error)."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, PermissionError):
            return "no permission on the Docker socket"
        if isinstance(e, FileNotFoundError | ConnectionRefusedError):
            return "no Docker engine answers"
        todo += [x for x in (e.__cause__, e.__context__, *e.args) if isinstance(x, BaseException)]
    return f"Docker: {str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}"


@functools.cache
def broker_choice() -> tuple[str, str]:
    """("container" | "binary", what for the report header); decided once per session."""
    wanted = os.environ.get("FLEETFL_TEST_BROKER", "auto")
    if wanted not in ("auto", "container", "binary"):
        raise pytest.UsageError(f"FLEETFL_TEST_BROKER={wanted}: use auto, container or binary")
    why = "FLEETFL_TEST_BROKER=binary"
    if wanted != "binary":
        try:
            import docker
            from testcontainers.community.mqtt import MosquittoContainer  # noqa: F401

            client = docker.from_env(timeout=3)  # without a daemon this fails in milliseconds
            try:
                client.ping()
                engine = client.version().get("Version", "?")
                label = client.images.get(BROKER_IMAGE).labels.get("org.fleetfl.recipe", "")
            finally:
                client.close()
            stale = ""
            recipe = subprocess.run(["bash", str(IMAGE_SCRIPT), "--hash"], capture_output=True,
                                    text=True, timeout=10).stdout.strip()
            if recipe and label != recipe:
                stale = f"; STALE, the recipe changed: run {IMAGE_SCRIPT.name}"
            return "container", (f"Mosquitto in a container of {BROKER_IMAGE} (recipe {label}"
                                 f"{stale}), Docker {engine}, testcontainers "
                                 f"{version('testcontainers')}, on 127.0.0.1")
        except ImportError as exc:
            why = f"{exc.name} is not installed (pip install -e '.[test]')"
        except Exception as exc:  # the SDK raises many kinds
            if type(exc).__name__ == "ImageNotFound":
                why = f"image {BROKER_IMAGE} not built (scripts/broker-image.sh)"
            else:
                why = _why_not(exc)
        if wanted == "container":
            raise pytest.UsageError(f"FLEETFL_TEST_BROKER=container, but {why}")
    try:
        binary = find_mosquitto()
    except BrokerError:
        return "binary", f"none ({why}; no mosquitto binary either: broker tests skip)"
    return "binary", f"the mosquitto binary {binary} on 127.0.0.1 ({why})"


def pytest_report_header(config: pytest.Config) -> str:
    kind, what = broker_choice()
    return f"broker: {kind}: {what}"


def pytest_sessionstart(session: pytest.Session) -> None:
    # `pytest -q` (make test) shows no report header: say it anyway, one line per session.
    config = session.config
    if config.get_verbosity() < 0 or config.getoption("no_header", False):
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(pytest_report_header(config))


def _remove_orphans(client) -> None:
    """Remove the containers and volumes of test sessions that are gone (killed before their
    teardown); those of live sessions, maybe another engineer's, stay."""
    def dead(labels: dict) -> bool:
        try:
            os.kill(int(labels.get(_LABEL, "0")), 0)
        except ProcessLookupError:
            return True
        except (ValueError, PermissionError):
            return False
        return False

    for container in client.containers.list(all=True, filters={"label": _LABEL}):
        if dead(container.labels):
            container.remove(force=True, v=True)
    for volume in client.volumes.list(filters={"label": _LABEL}):
        if dead(volume.attrs.get("Labels") or {}):
            volume.remove(force=True)


def _remove(client, container_id: str, volume: str | None) -> None:
    """Remove a test broker's container and volume; module-level for weakref.finalize."""
    import docker

    try:
        client.containers.get(container_id).remove(force=True, v=True)
    except docker.errors.NotFound:
        pass
    if volume:
        try:
            client.volumes.get(volume).remove(force=True)
        except docker.errors.NotFound:
            pass
    client.close()


class ContainerBroker:
    """Mosquitto in a container of BROKER_IMAGE, started by testcontainers, with LocalMosquitto's
    interface (host, port, url, restart, stop, close, log_text).

    Listens on 127.0.0.1 only, on a host port that survives restart(). The config is rendered
    by mosquitto_config() as for the binary (or given whole, e.g. with TLS and an ACL), and
    files (certificates, password file, ACL) are mounted read-only under FILES. As root in the
    container, Mosquitto drops to its user before reading them: they must be world-readable.
    With persistence, /mosquitto/data is a named volume that lives as long as this object, so a
    stop and start of the same container restores sessions and queued messages.
    """

    host = "127.0.0.1"
    FILES = "/mosquitto/etc"
    DATA = "/mosquitto/data"
    _RUNNING = re.compile(rb"mosquitto version \S+ running")
    _orphans_checked = False

    def __init__(self, workdir: Path, *, persistence: bool = False,
                 max_packet_size: int = DEFAULT_MAX_PACKET_SIZE, max_queued_messages: int = 0,
                 config: str | None = None, files: Path | None = None,
                 start_timeout: float = 30.0) -> None:
        import docker
        from testcontainers.community.mqtt import MosquittoContainer

        class _FixedPort(MosquittoContainer):
            # start() would expose 1883 on a random port; ours is fixed, on loopback only.
            def with_exposed_ports(self, *ports: str | int) -> _FixedPort:
                return self

        self.start_timeout = start_timeout
        self._client = docker.from_env(timeout=30)
        if not ContainerBroker._orphans_checked:
            ContainerBroker._orphans_checked = True
            _remove_orphans(self._client)
        labels = {_LABEL: str(os.getpid())}
        self.volume: str | None = None
        if persistence:
            self.volume = f"fleetfl-broker-{uuid.uuid4().hex[:12]}"
            self._client.volumes.create(self.volume, labels=labels)
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "mosquitto.conf"
        self.config_path.write_text(config if config is not None else mosquitto_config(
            "1883", max_packet_size=max_packet_size, max_queued_messages=max_queued_messages,
            persistence_dir=self.DATA if persistence else None,
            log_dest="stderr"))  # Mosquitto 2.0.11 does not flush stdout: docker logs would lag
        self._finalizer: weakref.finalize | None = None
        for attempt in range(3):  # a free port may be taken before Docker binds it
            self.port = free_port()
            container = _FixedPort(BROKER_IMAGE).with_kwargs(labels=labels)
            container.ports["1883/tcp"] = (self.host, self.port)
            if files is not None:
                container.with_volume_mapping(files, self.FILES, "ro")
            if self.volume:
                container.with_volume_mapping(self.volume, self.DATA, "rw")
            try:
                container.start(configfile=str(self.config_path))
                break
            except Exception as exc:  # also the wait for the "running" line timing out
                if container._container is not None:
                    container._container.remove(force=True, v=True)
                in_use = isinstance(exc, docker.errors.APIError) and "already" in str(exc)
                if not in_use or attempt == 2:  # "port is already allocated"
                    if self.volume:
                        self._client.volumes.get(self.volume).remove(force=True)
                    self._client.close()
                    raise BrokerError(f"broker container did not start: {exc}") from exc
        self._container = container
        self.container_id = container.get_wrapped_container().id
        self._finalizer = weakref.finalize(self, _remove, self._client, self.container_id,
                                           self.volume)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        wrapped = self._container.get_wrapped_container()
        wrapped.reload()
        return wrapped.status == "running"

    def stop(self, timeout: int = 10) -> None:
        """Stop the container (SIGTERM: Mosquitto saves its persistence file); it stays."""
        self._container.get_wrapped_container().stop(timeout=timeout)

    def start(self) -> ContainerBroker:
        """Start the stopped container again and wait until its broker runs."""
        wrapped = self._container.get_wrapped_container()
        before = len(self._RUNNING.findall(wrapped.logs()))
        wrapped.start()
        deadline = time.monotonic() + self.start_timeout
        while len(self._RUNNING.findall(wrapped.logs())) <= before:
            wrapped.reload()
            if wrapped.status == "exited" or time.monotonic() > deadline:
                raise BrokerError(f"mosquitto container did not come back:\n{self.log_text()}")
            time.sleep(0.1)
        return self

    def restart(self) -> ContainerBroker:
        """Stop and start the same container (same port, same volume)."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Remove the container and its volume."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None

    def log_text(self) -> str:
        return self._container.get_wrapped_container().logs().decode(errors="replace")

    def __repr__(self) -> str:
        return f"ContainerBroker({self.url}, {self.container_id[:12]})"


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
def any_broker(tmp: Path, **options) -> Iterator[LocalMosquitto | ContainerBroker]:
    """The session's kind of broker (broker_choice) with LocalMosquitto's options
    (persistence, max_packet_size, max_queued_messages), closed afterwards."""
    if broker_choice()[0] == "binary":
        with local_broker_or_skip(**options) as local:
            yield local
        return
    container = ContainerBroker(tmp / "broker", **options)
    try:
        yield container
    finally:
        container.close()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LocalMosquitto | ContainerBroker]:
    """A fresh broker per test, so tests may restart() it."""
    with any_broker(tmp_path) as b:
        yield b


@pytest.fixture(scope="session")
def session_broker(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LocalMosquitto | ContainerBroker]:
    """One broker for the whole session; do not restart it."""
    with any_broker(tmp_path_factory.mktemp("broker")) as b:
        yield b


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The data folder of the `shared` checkout beside this repo."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared data folder not found: {path}")
    return path
