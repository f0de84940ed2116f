"""The agent's progress report: a bar on a terminal, periodic summary lines otherwise."""

from __future__ import annotations

import io
import logging

from fleetfl.agent.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_without_a_terminal_summary_lines_come_at_the_interval(caplog):
    stream = io.StringIO()
    progress = Progress("pi01", interval=0.0, stream=stream)
    assert not progress.bar_wanted
    with caplog.at_level(logging.INFO, logger="fleetfl.agent"), progress.attach():
        progress.step(2.5)
        progress.at_version(3)
        progress.step(1.25)
        progress.published(2048)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    assert len(lines) == 4  # interval 0: every event reports
    assert "2 steps" in lines[-1] and "version 3" in lines[-1]
    assert "1 updates sent (0.00 MB)" in lines[-1] and "loss 1.250" in lines[-1]
    assert stream.getvalue() == ""  # no bar drawn into a log file


def test_a_long_interval_keeps_the_log_quiet(caplog):
    progress = Progress("pi01", interval=3600.0, stream=io.StringIO())
    with caplog.at_level(logging.INFO, logger="fleetfl.agent"):
        for _ in range(100):
            progress.step(0.5)
    assert not [r for r in caplog.records if r.getMessage().startswith("progress:")]
    assert progress.summary().startswith("100 steps")


def test_on_a_terminal_a_bar_is_drawn_and_log_lines_go_above_it():
    term = _Terminal()
    progress = Progress("pi07", interval=0.0, stream=term)
    assert progress.bar_wanted
    logger = logging.getLogger("fleetfl.agent")
    logger.addHandler(handler := logging.StreamHandler(term))
    try:
        with progress.attach() as bar:
            for _ in range(5):
                progress.step(0.75)
            progress.at_version(9)
            progress.published(3_000_000)
            logger.warning("a warning while training")
            bar.refresh()
    finally:
        logger.removeHandler(handler)
    out = term.getvalue()
    assert "pi07" in out and "5step" in out.replace(" ", "")
    assert "v9 sent 1 3.0MB loss 0.750" in out
    assert "a warning while training" in out
