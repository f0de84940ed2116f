"""The installed fleetfl's version: `--version` on every command, and in an agent's hello so
the coordinator's log shows which device runs which build during a rolling upgrade."""

from __future__ import annotations

import argparse
from importlib.metadata import PackageNotFoundError, version


def fleetfl_version() -> str:
    try:
        return version("fleetfl")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def add_version_flag(parser: argparse.ArgumentParser, *flags: str) -> None:
    """`--version` (or `flags`) prints the program's name and fleetfl's version."""
    parser.add_argument(*(flags or ("--version",)), action="version",
                        version=f"%(prog)s {fleetfl_version()}",
                        help="print fleetfl's version and exit")
