"""Agents forked from a process that has imported their code once (fl-demo on one machine).

Started as new interpreters, the 16 agents of a demo each import torch and fleetfl: 1.7-1.9 s
of CPU apiece, so on a 2-core host the fleet spent some 14 s importing before version 1
(bench/README.md, "Round overhead"). Forked from a parent that imported `fleetfl.agent.runner`
once, each agent is still its own process running fl-agent's `main()` (its own session, log
file, broker connection, data and model) but shares the imported modules, copy-on-write.

Forking is safe only from a process with no other thread (a lock held by one would stay held
in the child forever): `can_fork()` says whether this one qualifies; LocalFleet starts new
interpreters otherwise. Children leave with `os._exit`, so nothing of the parent (its atexit
handlers, a broker's finalizer) runs in them.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path


def can_fork() -> bool:
    return hasattr(os, "fork") and threading.active_count() == 1


def preload(module: str) -> None:
    """Import `module` here, once, for the children forked after it."""
    importlib.import_module(module)


class Forked:
    """The part of subprocess.Popen that LocalFleet uses, for a forked child."""

    POLL_S = 0.02  # wait(): how often to look while the child runs (only when waiting)

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"forked pid {self.pid}", timeout)
            time.sleep(self.POLL_S)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def fork_main(module: str, args: list[str], log: Path, env: dict[str, str]) -> Forked:
    """Fork a child that runs `module.main(args)` in a session of its own, its stdout and
    stderr appended to `log`, with `env` as its environment, and exits with its code."""
    main = importlib.import_module(module).main
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    sys.stdout.flush()  # or the child would write the parent's buffered output again
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(fd)
        return Forked(pid)
    code = 1
    try:  # the child: never returns into the parent's code
        os.setsid()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.environ.clear()
        os.environ.update(env)
        sys.argv = [module, *args]
        code = main(args)
    except SystemExit as exc:  # argparse's errors
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported in the child's log, then exit 1
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)
