"""nspawn: run tasks inside a systemd-nspawn container that booted systemd, via nsenter.

The container-fleet proof (tests/nspawn_fleet.py, tests/test_systemd_fleet.py) boots one
container per host with systemd as PID 1 and no sshd. This plugin enters every namespace of
the container's PID 1 (`nsenter --target PID --all`: mount, PID, UTS, IPC, cgroup; the
network is the host's), so a module sees the container's files, users and systemd exactly as
it would over SSH on a Pi, and `systemctl` talks to the container's systemd. It runs as root
there (no become needed). Modules are piped to the remote python (pipelining); files are
written with `cat > file`.

The container is found by its machine name (`ansible_host`, else the inventory name): the
`systemd-nspawn` process started with `--machine=NAME` (or `-M NAME`) and its child, the
container's PID 1. Without systemd-machined on the host (`--register=no`) there is no
machinectl, so the process table is the registry. The PID is looked up on every connection,
so a container booted again (new PID) is found again.
"""

from __future__ import annotations

DOCUMENTATION = """
name: nspawn
short_description: run tasks in a booted systemd-nspawn container (nsenter into its PID 1)
description:
  - Enters all namespaces of the container's init process with nsenter; no sshd needed.
  - The container is the systemd-nspawn process started with C(--machine=NAME) or C(-M NAME).
author: fleetfl
options:
  remote_addr:
    description: the machine name of the container
    default: inventory_hostname
    vars:
      - name: inventory_hostname
      - name: ansible_host
"""

import os  # noqa: E402  (ansible reads DOCUMENTATION first)
import shlex  # noqa: E402
import subprocess  # noqa: E402

from ansible.errors import AnsibleConnectionFailure, AnsibleError  # noqa: E402
from ansible.plugins.connection import ConnectionBase  # noqa: E402

ENV = ["/usr/bin/env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
       "HOME=/root", "LANG=C.UTF-8", "TERM=dumb"]


def _cmdline(pid: str) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def machine_leader(name: str) -> int | None:
    """PID (host view) of the init process of the running container `name`, or None."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        argv = _cmdline(pid)
        if not argv or os.path.basename(argv[0]) != "systemd-nspawn":
            continue
        named = f"--machine={name}" in argv or any(
            a in ("-M", "--machine") and b == name for a, b in zip(argv, argv[1:], strict=False))
        if not named:
            continue
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                children = f.read().split()
        except OSError:
            continue
        for child in children:  # the container's init: in a PID namespace of its own
            try:
                if os.readlink(f"/proc/{child}/ns/pid") != os.readlink(f"/proc/{pid}/ns/pid"):
                    return int(child)
            except OSError:
                continue
    return None


class Connection(ConnectionBase):
    transport = "nspawn"
    has_pipelining = True
    has_tty = False
    default_user = "root"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.leader: int | None = None

    def _connect(self):
        if not self._connected:
            name = self.get_option("remote_addr")
            self.leader = machine_leader(name)
            if self.leader is None:
                raise AnsibleConnectionFailure(f"no running systemd-nspawn container {name!r}")
            self._connected = True
        return self

    def _nsenter(self, argv: list[str]) -> list[str]:
        return ["nsenter", "--target", str(self.leader), "--all", "--", *ENV, *argv]

    def exec_command(self, cmd, in_data=None, sudoable=True):
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        self._connect()
        proc = subprocess.run(self._nsenter(["/bin/sh", "-c", cmd]), input=in_data,
                              capture_output=True, check=False)
        return proc.returncode, proc.stdout, proc.stderr

    def put_file(self, in_path, out_path):
        super().put_file(in_path, out_path)
        self._connect()
        with open(in_path, "rb") as src:
            argv = self._nsenter(["/bin/sh", "-c", f"cat > {shlex.quote(out_path)}"])
            proc = subprocess.run(argv, stdin=src, capture_output=True, check=False)
        if proc.returncode:
            raise AnsibleError(f"put_file {in_path} -> {out_path}: "
                               f"{proc.stderr.decode()[-500:]}")

    def fetch_file(self, in_path, out_path):
        super().fetch_file(in_path, out_path)
        self._connect()
        with open(out_path, "wb") as dst:
            proc = subprocess.run(self._nsenter(["/bin/cat", in_path]), stdout=dst,
                                  stderr=subprocess.PIPE, check=False)
        if proc.returncode:
            raise AnsibleError(f"fetch_file {in_path}: {proc.stderr.decode()[-500:]}")

    def close(self):
        self._connected = False
