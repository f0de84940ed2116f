"""Issue 15, operators' view: every command says which fleetfl it is (`--version`; fl-export's
`--version N` is the model's, so its own is `-V`)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("command", sorted(SCRIPTS))
def test_every_command_prints_its_version(command: str) -> None:
    module, function = SCRIPTS[command].split(":")
    flag = "-V" if command == "fl-export" else "--version"
    code = f"import sys; from {module} import {function}; sys.argv[0] = {command!r}; {function}()"
    out = subprocess.run([sys.executable, "-c", code, flag], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == f"{command} {version('fleetfl')}"
