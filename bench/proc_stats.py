"""Process memory from /proc (Linux), for benches: no extra dependency.

RSS counts shared pages (torch's libraries) in full in every process; PSS splits them among
the processes that share them, so PSS is what N processes add up to on one host.
"""

from __future__ import annotations


def _field_kb(path: str, name: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(name):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def rss_mb(pid: int) -> float | None:
    """Resident set size in MiB, or None when the process is gone."""
    kb = _field_kb(f"/proc/{pid}/status", "VmRSS:")
    return None if kb is None else kb / 1024


def pss_mb(pid: int) -> float | None:
    """Proportional set size in MiB, or None when the process is gone."""
    kb = _field_kb(f"/proc/{pid}/smaps_rollup", "Pss:")
    return None if kb is None else kb / 1024
