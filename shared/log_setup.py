"""Logging for the commands: timestamps on a terminal or in a file; under systemd (stderr is
the journal) syslog priority prefixes and no timestamp of our own, so `journalctl -p warning`
filters fleetfl's warnings and each line carries one time, the journal's."""

from __future__ import annotations

import logging
import os
import sys

PLAIN = "%(asctime)s %(name)s %(levelname)s %(message)s"
JOURNAL = "<%(priority)d>%(name)s %(levelname)s %(message)s"
# sd-daemon(3) priorities: <2> critical, <3> error, <4> warning, <6> info, <7> debug
PRIORITIES = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
              logging.DEBUG: 7}


def stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM to the journal stream's "device:inode" (systemd.exec(5));
    it is inherited, so it counts only while stderr is still that stream."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.priority = PRIORITIES.get(record.levelno, 6)
        return super().format(record)


def setup_logging(verbose: bool = False) -> None:
    """Configure the root logger once, for a command's main()."""
    handler = logging.StreamHandler()
    handler.setFormatter(_JournalFormatter(JOURNAL) if stderr_is_journal()
                         else logging.Formatter(PLAIN))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
