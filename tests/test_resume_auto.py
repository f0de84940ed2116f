"""`fl-coordinator --resume auto` (the systemd unit's): resume when the run dir holds a
checkpoint or journal, start afresh otherwise; plain `--resume` without one is an error."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from fleetfl.coordinator import cli
from fleetfl.coordinator.cli import EXIT_CANNOT_RESUME
from fleetfl.coordinator.rundir import ResumeError, RunDir
from fleetfl.coordinator.runner import CoordinatorRunner
from fleetfl.shared.config import ConfigError, load_config
from fleetfl.shared.core.messages import Kind, Message
from fleetfl.shared.net.transport import Incoming
from fleetfl.shared.wire.codec import encode


def _cfg(tmp_path: Path):
    return load_config(None, {"run": "auto", "run_dir": str(tmp_path), "dataset": "digits",
                              "broker": "mqtt://127.0.0.1:1"})  # never connected here


def test_auto_starts_afresh_without_a_checkpoint(tmp_path: Path):
    runner = CoordinatorRunner(_cfg(tmp_path), resume="auto")
    assert not runner.resumed and runner.core.version == 0
    with pytest.raises(ConfigError, match="no checkpoint"):
        CoordinatorRunner(_cfg(tmp_path / "other"), resume=True)


def test_auto_resumes_from_a_checkpoint(tmp_path: Path):
    first = CoordinatorRunner(_cfg(tmp_path))
    first.core.version = 7
    first.core.params += 0.5
    first._checkpoint()
    saved = first.core.params.copy()
    again = CoordinatorRunner(_cfg(tmp_path), resume="auto")
    assert again.resumed and again.core.version == 7
    np.testing.assert_array_equal(again.core.params, saved)


# -- issue 14, finding 4: a torn or broken file must not crash-loop `--resume auto` ----------
class Driver:
    """A coordinator fed two agents' hellos and updates without a broker (paho queues what it
    publishes), checkpointed after every version as its main loop does."""

    AGENTS = ("a0", "a1")

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.runner = CoordinatorRunner(_cfg(tmp_path))
        self.runner.journal.open(0)
        self.seq, self.at = 0, 0.0
        for agent in self.AGENTS:
            self.send(agent, Kind.HELLO, {"samples": 10, "first_window": 1})

    @property
    def path(self) -> Path:
        return self.runner.rundir.path

    def send(self, agent: str, kind: Kind, fields: dict, arrays: dict | None = None,
             base: int = 0) -> None:
        self.seq, self.at = self.seq + 1, self.at + 1.0
        msg = Message(kind, "auto", agent, self.seq, base, fields, arrays or {})
        where = "status" if kind is Kind.HELLO else "up"
        self.runner._handle(Incoming(f"fl/auto/{where}/{agent}", encode(msg),
                                     kind is Kind.HELLO, at=self.at))
        self.runner._commit()

    def update(self, agent: str, window: int) -> None:
        delta = np.random.default_rng(window * 10 + int(agent[1:])).normal(
            0, 0.01, self.runner.layers.size).astype(np.float32)
        self.send(agent, Kind.UPDATE, {"window": window, "samples": 10, "steps": 1},
                  {"delta": delta}, base=window - 1)

    def versions(self, upto: int, checkpoint: bool = True) -> None:
        """Both agents' updates for each window up to `upto`, each closing a version."""
        for window in range(self.runner.core.version + 1, upto + 1):
            for agent in self.AGENTS:
                self.update(agent, window)
            self.record(checkpoint)
        assert self.runner.core.version == upto

    def record(self, checkpoint: bool = True) -> None:
        while self.runner.core.results:
            self.runner._record(self.runner.core.results.pop(0), evaluate_now=False)
            if checkpoint:
                self.runner._checkpoint()

    def resumed(self, **kwargs) -> CoordinatorRunner:
        runner = CoordinatorRunner(_cfg(self.tmp_path), resume="auto", **kwargs)
        runner._replay()
        return runner


def _break(path: Path, how: str) -> None:
    data = path.read_bytes()
    broken = {"empty": b"", "truncated": data[: len(data) // 2], "nul": bytes(len(data)),
              "altered": data[:200] + bytes([data[200] ^ 0x40]) + data[201:]}[how]
    path.write_bytes(broken)


def test_a_torn_events_line_is_dropped_loudly_and_the_run_resumes(tmp_path: Path,
                                                                 caplog) -> None:
    d = Driver(tmp_path)
    d.versions(3)
    with (d.path / "events.jsonl").open("a") as f:
        f.write('{"time":1.5,"wall":17000')  # killed mid-line
    again = d.resumed()
    assert again.core.version == 3
    assert [e["version"] for e in RunDir(d.path).events()] == [1, 2, 3]
    assert (d.path / "events.jsonl").read_bytes().endswith(b"}\n")  # rewritten clean
    assert "events.jsonl: dropped 1 damaged line" in caplog.text


def test_an_append_after_a_torn_line_starts_a_new_line(tmp_path: Path) -> None:
    """One write per line with O_APPEND: a crash tears at most the line being written, and the
    next line written does not run on from it."""
    run = RunDir(tmp_path)
    run.append_event({"version": 1})
    with run.events_path.open("a") as f:
        f.write('{"version":2,"win')
    run.append_event({"version": 3})
    run.append_evaluation(3, {"accuracy": 0.5})
    assert [(e["version"], e.get("accuracy")) for e in run.events()] == [(1, None), (3, 0.5)]


def test_rewriting_the_events_file_never_leaves_half_of_it(tmp_path: Path, monkeypatch) -> None:
    run = RunDir(tmp_path)
    for v in (1, 2, 3):
        run.append_event({"version": v})
    before = run.events_path.read_bytes()

    def crash(fd: int) -> None:
        raise OSError("killed")

    monkeypatch.setattr(os, "fsync", crash)  # the crash lands before the rename
    with pytest.raises(OSError, match="killed"):
        run.truncate_events(1)
    assert run.events_path.read_bytes() == before


@pytest.mark.parametrize("how", ["empty", "truncated", "nul", "altered"])
def test_a_broken_checkpoint_falls_back_to_the_previous_one_and_the_journal(
        tmp_path: Path, how: str, caplog) -> None:
    d = Driver(tmp_path)
    d.versions(4)
    ckpt = d.path / "checkpoint.msgpack"
    _break(ckpt, how)
    broken = ckpt.read_bytes()
    again = d.resumed()
    # the previous checkpoint (version 3) and the journal since it give version 4 again
    assert again.core.version == 4
    np.testing.assert_array_equal(again.core.params, d.runner.core.params)
    assert (d.path / "checkpoint.msgpack.damaged").read_bytes() == broken  # kept aside
    assert "checkpoint.msgpack" in caplog.text and "version 3" in caplog.text


def test_after_a_fallback_the_next_checkpoints_still_have_one(tmp_path: Path) -> None:
    d = Driver(tmp_path)
    d.versions(3)
    _break(d.path / "checkpoint.msgpack", "truncated")
    d.runner = d.resumed()  # from version 2's checkpoint and the journal
    d.versions(5)
    _break(d.path / "checkpoint.msgpack", "nul")
    again = d.resumed()
    assert again.core.version == 5
    np.testing.assert_array_equal(again.core.params, d.runner.core.params)


def test_a_checkpoint_missing_between_its_two_renames_is_not_a_loss(tmp_path: Path) -> None:
    d = Driver(tmp_path)
    d.versions(3)
    (d.path / "checkpoint.msgpack").unlink()  # killed after checkpoint -> .prev
    again = d.resumed()
    assert again.core.version == 3
    np.testing.assert_array_equal(again.core.params, d.runner.core.params)


def test_nothing_recoverable_exits_with_a_message_and_code_65(tmp_path: Path, capsys) -> None:
    d = Driver(tmp_path)
    d.versions(3)  # generation 0 is gone: no replay from the initial model either
    for name in ("checkpoint.msgpack", "checkpoint.msgpack.prev"):
        _break(d.path / name, "truncated")
    before = {p.name: p.read_bytes() for p in d.path.iterdir()}
    code = cli.main(["--run", "auto", "--run-dir", str(tmp_path), "--dataset", "digits",
                     "--broker", "mqtt://127.0.0.1:1", "--resume", "auto"])
    err = capsys.readouterr().err
    assert code == EXIT_CANNOT_RESUME == 65
    assert err.startswith("fl-coordinator: error: ") and "Traceback" not in err
    assert "checkpoint.msgpack:" in err and "checkpoint.msgpack.prev:" in err
    assert {p.name: p.read_bytes() for p in d.path.iterdir()} == before  # nothing touched


def test_the_unit_does_not_restart_a_run_it_cannot_resume() -> None:
    root = Path(__file__).resolve().parents[1]
    for unit in (root / "systemd" / "fl-coordinator.service",
                 root / "ansible/roles/coordinator/templates/fl-coordinator.service.j2"):
        assert f"RestartPreventExitStatus={EXIT_CANNOT_RESUME}" in unit.read_text()


# -- issue 14, finding 5: damage inside the journal is not a torn tail -----------------------
def _damaged_journal(tmp_path: Path) -> tuple[Driver, Path, bytes]:
    """Versions 1, 2 checkpointed; then a0 and a1 close window 3 (killed before its
    checkpoint) and a0 sends window 4. The first of those three records gets a flipped bit."""
    d = Driver(tmp_path)
    d.versions(2)
    d.versions(3, checkpoint=False)
    d.update("a0", 4)
    gen = max(d.runner.journal.generations())
    path = d.path / f"journal-{gen:08d}.wal"
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01  # inside the first record's payload
    path.write_bytes(bytes(data))
    return d, path, bytes(data)


def test_a_bad_crc_mid_journal_refuses_to_resume_and_changes_nothing(tmp_path: Path,
                                                                    capsys) -> None:
    d, path, damaged = _damaged_journal(tmp_path)
    before = {p.name: p.read_bytes() for p in d.path.iterdir()}
    with pytest.raises(ResumeError, match="--accept-journal-loss"):
        CoordinatorRunner(_cfg(tmp_path), resume="auto")
    assert {p.name: p.read_bytes() for p in d.path.iterdir()} == before
    code = cli.main(["--run", "auto", "--run-dir", str(tmp_path), "--dataset", "digits",
                     "--broker", "mqtt://127.0.0.1:1", "--resume"])
    assert code == EXIT_CANNOT_RESUME
    assert "1 record unreadable" in capsys.readouterr().err
    assert path.read_bytes() == damaged


def test_accept_journal_loss_keeps_the_file_aside_and_replays_the_rest(tmp_path: Path,
                                                                       caplog) -> None:
    d, path, damaged = _damaged_journal(tmp_path)
    caplog.set_level(logging.INFO, "fleetfl.coordinator")
    again = d.resumed(accept_journal_loss=True)
    assert "1 record of the journal lost" in caplog.text
    assert "replayed 2 journal records" in caplog.text  # a1's window 3 and a0's window 4
    aside = list(d.path.glob(path.name + ".damaged*"))
    assert len(aside) == 1 and aside[0].read_bytes() == damaged
    # a0's window-3 update is lost: window 3 waits for it (its timeout closes it later), and
    # a0's window-4 update is refused as ahead of the open round, as it would be live
    assert again.core.version == 2
    assert {w: sorted(got) for w, got in again.core.pending.items()} == {3: ["a1"]}
    assert sum(again.replay_refused.values()) == 1
    # the rewritten journal is clean: the next resume needs no flag and gets the same state
    again.journal.close()
    third = d.resumed()
    assert third.core.version == 2
    np.testing.assert_array_equal(third.core.params, again.core.params)
