"""`fl-coordinator --resume auto` (the systemd unit's): resume when the run dir holds a
checkpoint or journal, start afresh otherwise; plain `--resume` without one is an error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fleetfl.coordinator.runner import CoordinatorRunner
from fleetfl.shared.config import ConfigError, load_config


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
