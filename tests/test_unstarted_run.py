"""Issue 20, item 5: a coordinator that could not reach the broker leaves no run directory
(none that `--resume auto` would take for a run), and changes nothing in an earlier run's."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import local_broker_or_skip

from fleetfl.coordinator import cli
from fleetfl.coordinator.local_fleet import LocalFleet
from fleetfl.coordinator.rundir import RunDir
from fleetfl.shared.devtools.local_broker import free_port
from fleetfl.shared.net.transport import MqttLink


@pytest.fixture
def quick_connect(monkeypatch) -> None:
    """Give up on a refused port after 1 s instead of the link's 10 s of retries."""
    connect = MqttLink.connect
    monkeypatch.setattr(MqttLink, "connect", lambda self, timeout=10.0: connect(self, 1.0))


def _closed_port_run(runs: Path, *extra: str) -> int:
    return cli.main(["--run", "r1", "--run-dir", str(runs), "--dataset", "digits",
                     "--broker", f"mqtt://127.0.0.1:{free_port()}", *extra])


def test_a_coordinator_that_cannot_reach_the_broker_leaves_no_run_dir(
        tmp_path: Path, quick_connect, capsys) -> None:
    runs = tmp_path / "runs"
    assert _closed_port_run(runs, "--resume", "auto") == 2
    err = capsys.readouterr().err
    assert err.startswith("fl-coordinator: error: cannot reach the MQTT broker")
    assert "connection refused" in err
    assert not (runs / "r1").exists() and not runs.exists()  # both made by it, both gone
    assert _closed_port_run(runs) == 2  # a fresh run (no --resume) the same
    assert not runs.exists()
    runs.mkdir()  # a folder that was there before stays
    assert _closed_port_run(runs) == 2
    assert runs.is_dir() and list(runs.iterdir()) == []


def test_an_earlier_runs_dir_is_left_as_it_was(tmp_path: Path, quick_connect) -> None:
    """Not even a fresh run (which empties its run dir once it starts) touches it."""
    earlier = RunDir(tmp_path / "r1")
    earlier.write_config({"run": "r1", "job": {"algo": "dga"}})
    earlier.append_event({"version": 1, "time": 1.0})
    (earlier.path / "checkpoint.msgpack").write_bytes(b"an earlier run's checkpoint")
    (earlier.path / "journal-00000001.wal").write_bytes(b"")
    before = {p.name: p.read_bytes() for p in earlier.path.iterdir()}
    for extra in ([], ["--resume", "auto"]):
        _closed_port_run(tmp_path, *extra)
        assert {p.name: p.read_bytes() for p in earlier.path.iterdir()} == before


@pytest.mark.integration
@pytest.mark.slow
def test_after_a_failed_start_resume_auto_starts_afresh_at_version_0(
        tmp_path: Path, quick_connect, capsys) -> None:
    runs = tmp_path / "runs"
    assert _closed_port_run(runs, "--resume", "auto") == 2
    assert not (runs / "r1").exists()
    with local_broker_or_skip() as broker:
        fleet = LocalFleet(broker.url, "r1", tmp_path / "logs",
                           ["--run-dir", str(runs), "--resume", "auto", "--min-agents", "1",
                            "--max-versions", "2", "--local-steps", "5"])
        with fleet:
            fleet.start_coordinator()
            fleet.start_agents(1)
            code = fleet.wait_coordinator(timeout=240)
            log = fleet.log("coordinator")
            assert code == 0, log[-3000:]
    assert "--resume auto: nothing to resume, a fresh run" in log
    assert "resumed at version" not in log
    assert [e["version"] for e in RunDir(runs / "r1").events()] == [1, 2]
    assert (runs / "r1" / "config.yaml").exists()
