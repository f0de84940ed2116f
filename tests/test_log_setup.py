"""Issue 15, operators' view: under systemd (stderr is the journal stream JOURNAL_STREAM
names) log lines carry syslog priority prefixes and no timestamp of their own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

CODE = """
import logging, os, sys
if os.environ.get("STREAM_IS_STDERR"):
    st = os.fstat(2)
    os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
from fleetfl.shared.log_setup import setup_logging
setup_logging()
log = logging.getLogger("fleetfl.coordinator")
log.info("version 3: accuracy 0.9")
log.warning("agent pi07 offline")
log.error("rejected message from pi02")
"""


def _run(tmp_path: Path, env: dict[str, str]) -> list[str]:
    err = tmp_path / "stderr"
    with open(err, "w") as f:
        subprocess.run([sys.executable, "-c", CODE], stderr=f, check=True, timeout=60,
                       env={**os.environ, **env})
    return err.read_text().splitlines()


def test_journal_lines_have_priorities_and_no_timestamp(tmp_path: Path) -> None:
    lines = _run(tmp_path, {"STREAM_IS_STDERR": "1"})
    assert lines == ["<6>fleetfl.coordinator INFO version 3: accuracy 0.9",
                     "<4>fleetfl.coordinator WARNING agent pi07 offline",
                     "<3>fleetfl.coordinator ERROR rejected message from pi02"]


def test_elsewhere_lines_keep_their_timestamp(tmp_path: Path) -> None:
    # an inherited JOURNAL_STREAM that is not our stderr (e.g. redirected to a file) is ignored
    for env in ({}, {"JOURNAL_STREAM": "1:2"}):
        lines = _run(tmp_path, env)
        assert len(lines) == 3
        assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} fleetfl\.coordinator ", line)
                   for line in lines), lines
