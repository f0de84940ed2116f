"""A fleet of systemd-nspawn containers booted with systemd as PID 1, provisioned by
ansible/fleet.yml: the fleet proof under real systemd (tests/test_systemd_fleet.py, 1 server +
3 agents; bench/systemd_fleet.py, 16 agents). Needs root.

What is shared, so that it is fast:
- one wheelhouse (`pip wheel` of the package's dependencies and torch, built once per set of
  dependencies: the torch CPU wheel comes from pip's own configuration), bind-mounted
  read-only into every container at /opt/fleetfl-wheelhouse; the roles install from it
  (fleet_pip_extra_args: --no-index --find-links ...);
- one base root (debootstrap --variant=minbase bookworm from apt's own mirror, with systemd,
  D-Bus, python3 and a venv at /opt/fleetfl/venv holding the dependencies from the
  wheelhouse), built once per recipe and kept in $FLEETFL_NSPAWN_DIR
  (/var/lib/fleetfl-nspawn);
- each container's root is an overlay on it: only what the playbook and the services write
  lands in the container's own upper layer.

Ansible reaches the containers with the connection plugin ansible/connection_plugins/nspawn.py
(nsenter into the container's PID 1; no sshd). Everything the containers listen on is on the
host's loopback (they share its network): the broker binds 127.0.0.1 on a free port.

    python tests/nspawn_fleet.py prepare            # tools, wheelhouse, base root; timings
    python tests/nspawn_fleet.py up --agents 3      # boot, apply; leaves the fleet running
    python tests/nspawn_fleet.py down NAME          # power off, unmount, remove
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ANSIBLE = REPO / "ansible"
BIN = Path(sys.executable).parent
STATE = Path(os.environ.get("FLEETFL_NSPAWN_DIR", "/var/lib/fleetfl-nspawn"))
DEB_CACHE = Path(os.environ.get("FLEETFL_NSPAWN_DEBS", "/var/cache/fleetfl-nspawn/debs"))
WHEELHOUSE_IN = "/opt/fleetfl-wheelhouse"  # where containers see the wheelhouse
VENV_IN = "/opt/fleetfl/venv"  # fleet_venv: the role's default
SUITE = "bookworm"
# What every host gets from debootstrap: systemd as init, D-Bus, python3 with venv (a Pi's
# Raspberry Pi OS has them), python3-apt and python3-packaging (Ansible's apt and pip
# modules need them on the host). Mosquitto is not here: the broker role installs it with apt
# on the server.
PACKAGES = ["systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "python3-apt",
            "python3-packaging"]
RECIPE_VERSION = 1  # bump to rebuild every base root
RECAP = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)"
                   r"\s+skipped=(\d+)\s+rescued=(\d+)\s+ignored=(\d+)", re.M)
TIMINGS: dict[str, float] = {}
# The role deploys a commit of a git checkout (fleet_package_src, fleet_package_ref: HEAD of
# this repository); FLEETFL_PACKAGE_SRC points it at another checkout.
PACKAGE_SRC = (["-e", f"fleet_package_src={os.environ['FLEETFL_PACKAGE_SRC']}"]
               if os.environ.get("FLEETFL_PACKAGE_SRC") else [])  # step -> seconds, for the reports


@contextlib.contextmanager
def timed(step: str) -> Iterator[None]:
    start = time.monotonic()
    try:
        yield
    finally:
        TIMINGS[step] = round(TIMINGS.get(step, 0.0) + time.monotonic() - start, 1)


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    try:
        return subprocess.run(argv, **kw)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"{' '.join(map(str, argv))[:300]} failed ({exc.returncode}):\n"
                           f"{(exc.stdout or '')[-3000:]}\n{(exc.stderr or '')[-3000:]}") from None


# -- what is needed and why not -------------------------------------------------------------

def why_not() -> str | None:
    """None when this machine can run the container fleet, else the reason."""
    if os.geteuid() != 0:
        return "the systemd container fleet needs root (debootstrap, overlay mounts, nspawn)"
    if not Path("/proc/filesystems").read_text().count("overlay"):
        return "the kernel has no overlay file system"
    if shutil.which("apt-get") is None and not (shutil.which("debootstrap")
                                                and shutil.which("systemd-nspawn")):
        return "debootstrap and systemd-nspawn are missing and there is no apt-get"
    return None


def install_tools() -> None:
    """debootstrap and systemd-container (systemd-nspawn) from apt, if missing."""
    missing = [pkg for pkg, tool in (("debootstrap", "debootstrap"),
                                     ("systemd-container", "systemd-nspawn"))
               if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists()]
    if missing:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(["apt-get", "update", "-qq"], env=env)
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)


def apt_mirror() -> str:
    """The Debian mirror apt uses here (deb822 .sources or sources.list), for debootstrap."""
    texts = []
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d")
                                                        .glob("*"))]:
        if path.is_file() and not path.name.endswith((".disabled", ".save")) \
                and "disabled" not in path.name:
            texts.append(path.read_text(errors="replace"))
    for text in texts:
        for stanza in re.split(r"\n\s*\n", text):  # deb822
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            if uris and suites and SUITE in suites[1].split() and "security" not in uris[1]:
                return uris[1]
        for m in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", text, re.M):
            if m[2] == SUITE:
                return m[1]
    return "http://deb.debian.org/debian"


# -- the wheelhouse and the base root ---------------------------------------------------------

def _requirements() -> tuple[list[str], list[str]]:
    """(the package's dependencies, its extras' but those of tests and exports): the base
    venv gets the first; the wheelhouse holds both, for whatever extra the roles install."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = [req for name, reqs in project.get("optional-dependencies", {}).items()
              if name not in ("test", "export") for req in reqs
              if not req.startswith(project["name"])]
    return sorted(project["dependencies"]), sorted(set(extras))


def _torch_spec() -> str:
    """The role's torch requirement for this machine (fleet_torch_spec: a string, or one per
    architecture)."""
    import platform

    import yaml
    spec = yaml.safe_load((ANSIBLE / "roles/common/defaults/main.yml").read_text()).get(
        "fleet_torch_spec", "torch")
    if isinstance(spec, dict):
        spec = spec.get(platform.machine(), spec.get("x86_64", "torch"))
    return str(spec).strip()


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:12]


def wheelhouse() -> Path:
    """Wheels of every dependency (and of setuptools, the package's build backend), made
    once per dependency list; pip's own configuration supplies the torch CPU wheel."""
    base, extras = _requirements()
    reqs = sorted({*base, *extras, _torch_spec(), "setuptools>=69", "wheel"})
    path = STATE / f"wheelhouse-{_key(reqs)}"
    if (path / ".complete").exists():
        return path
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    run([str(BIN / "pip"), "wheel", "-q", "--wheel-dir", str(tmp), *reqs], timeout=1800)
    (tmp / ".complete").write_text("\n".join(reqs) + "\n")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


@contextlib.contextmanager
def _bound(src: Path, root: Path, target: str, readonly: bool = True) -> Iterator[None]:
    dest = root / target.lstrip("/")
    dest.mkdir(parents=True, exist_ok=True)
    run(["mount", "--bind", str(src), str(dest)])
    if readonly:
        run(["mount", "-o", "remount,bind,ro", str(dest)])
    try:
        yield
    finally:
        run(["umount", "-l", str(dest)], check=False)


def base_root(wheels: Callable[[], Path]) -> Path:
    """The debootstrapped root every container is an overlay of (made once per recipe), with
    the venv at /opt/fleetfl/venv (made again when the wheelhouse changes). `wheels` gives
    the wheelhouse; debootstrap runs before it is asked for."""
    mirror = apt_mirror()
    path = STATE / f"base-{_key(RECIPE_VERSION, SUITE, PACKAGES)}"
    if not (path / ".debootstrapped").exists():
        with timed("debootstrap"):
            tmp = path.with_name(path.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            DEB_CACHE.mkdir(parents=True, exist_ok=True)
            log = STATE / "debootstrap.log"
            with log.open("w") as out:
                proc = subprocess.run(["debootstrap", "--variant=minbase",
                                       f"--cache-dir={DEB_CACHE}",
                                       "--include=" + ",".join(PACKAGES), SUITE, str(tmp),
                                       mirror], stdout=out, stderr=subprocess.STDOUT,
                                      timeout=1800)
            if proc.returncode:
                raise RuntimeError(f"debootstrap failed:\n{log.read_text()[-3000:]}")
            _configure(tmp)
            (tmp / ".debootstrapped").write_text(mirror + "\n")
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
    wheelhouse_dir = wheels()
    marker = path / ".venv-from"
    if not marker.exists() or marker.read_text().strip() != wheelhouse_dir.name:
        with timed("base venv"):
            marker.unlink(missing_ok=True)
            shutil.rmtree(path / VENV_IN.lstrip("/"), ignore_errors=True)
            _base_venv(path, wheelhouse_dir)
            marker.write_text(wheelhouse_dir.name + "\n")
    return path


def _configure(root: Path) -> None:
    # a persistent journal (/var/log/journal): an agent's log survives a power-off
    (root / "var/log/journal").mkdir(parents=True, exist_ok=True)
    (root / "etc/machine-id").write_text("")  # each container gets its own (Fleet.create)
    (root / "etc/hostname").unlink(missing_ok=True)  # nspawn names it after the machine
    # no recommends on apt installs (the broker role's mosquitto)
    (root / "etc/apt/apt.conf.d/90fleetfl").write_text('APT::Install-Recommends "false";\n')


def _base_venv(root: Path, wheels: Path) -> None:
    """The package's own dependencies (an agent's) and the role's torch from the wheelhouse
    in the base's /opt/fleetfl/venv; not fleetfl nor its extras: the roles install those."""
    with _bound(wheels, root, WHEELHOUSE_IN):
        run(["chroot", str(root), "/usr/bin/python3", "-m", "venv", VENV_IN])
        run(["chroot", str(root), f"{VENV_IN}/bin/pip", "install", "-q", "--no-index",
             "--find-links", WHEELHOUSE_IN, _torch_spec(), *_requirements()[0]],
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}, timeout=1800)


def prepare() -> tuple[Path, Path]:
    """Tools, wheelhouse and base root (cached). The wheelhouse (PyPI) and debootstrap
    (Debian's mirror) are fetched side by side."""
    with timed("install tools"):
        install_tools()
    STATE.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(2) as pool:
        wheels = pool.submit(_timed_wheelhouse)
        # debootstrap does not need the wheels; the venv step waits for them
        base = pool.submit(base_root, wheels.result)
        return wheels.result(), base.result()


def _timed_wheelhouse() -> Path:
    with timed("wheelhouse"):
        return wheelhouse()


# -- the fleet ------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine_leader(name: str) -> int | None:
    sys.path.insert(0, str(ANSIBLE / "connection_plugins"))
    try:
        from nspawn import machine_leader as leader  # the connection plugin's own lookup
    finally:
        sys.path.pop(0)
    return leader(name)


class Fleet:
    """Containers `<prefix>-server` and `<prefix>-pi01`.. with overlay roots in `workdir`."""

    def __init__(self, agents: int, workdir: Path, base: Path, wheels: Path,
                 prefix: str | None = None) -> None:
        self.agents = [f"pi{i:02d}" for i in range(1, agents + 1)]
        self.hosts = ["server", *self.agents]
        self.workdir, self.base, self.wheels = workdir, base, wheels
        self.prefix = prefix or f"fl{os.getpid() % 100000}"
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.secrets = workdir / "secrets"
        self.inventory = workdir / "hosts.yml"

    def machine(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def root(self, host: str) -> Path:
        return self.workdir / host / "root"

    # - containers -
    def create(self) -> None:
        for host in self.hosts:
            d = self.workdir / host
            for sub in ("upper", "work", "root"):
                (d / sub).mkdir(parents=True, exist_ok=True)
            (d / "upper/etc").mkdir(exist_ok=True)
            (d / "upper/etc/machine-id").write_text(uuid.uuid4().hex + "\n")
            run(["mount", "-t", "overlay", "overlay", "-o",
                 f"lowerdir={self.base},upperdir={d / 'upper'},workdir={d / 'work'}",
                 str(d / "root")])
        self.workdir.chmod(0o755)
        self.inventory.write_text(json.dumps(self.inventory_data(), indent=2))

    def inventory_data(self) -> dict:
        """The hosts (the settings are in ansible/inventory/nspawn.yml): each host's
        ansible_host is its container's machine name."""
        hosts = {h: {"ansible_host": self.machine(h)} for h in self.hosts}
        return {"all": {"children": {
            "servers": {"hosts": {"server": hosts["server"]}},
            "broker": {"hosts": {"server": {}}},
            "coordinator": {"hosts": {"server": {}}},
            "agents": {"hosts": {h: hosts[h] for h in self.agents}},
        }}}

    def boot(self, host: str, timeout: float = 180) -> float:
        """Start the container (systemd-nspawn -b, console to console.log) and wait for
        `systemctl is-system-running`: running (or degraded). Seconds it took."""
        start = time.monotonic()
        console = (self.workdir / host / "console.log").open("ab")
        self.procs[host] = subprocess.Popen(
            ["systemd-nspawn", "--keep-unit", "--register=no", "--quiet", "--console=read-only",
             "-D", str(self.root(host)), f"--machine={self.machine(host)}",
             f"--bind-ro={self.wheels}:{WHEELHOUSE_IN}", "-b"],
            stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
            start_new_session=True)
        console.close()
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            if self.procs[host].poll() is not None:
                raise RuntimeError(f"{host}: systemd-nspawn exited "
                                   f"{self.procs[host].returncode}:\n{self.console(host)}")
            if machine_leader(self.machine(host)) is not None:
                state = self.sh(host, "systemctl is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return time.monotonic() - start
            time.sleep(0.5)
        raise RuntimeError(f"{host}: not booted after {timeout} s ({state!r}):\n"
                           f"{self.console(host)}")

    def console(self, host: str) -> str:
        path = self.workdir / host / "console.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def boot_all(self) -> None:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(self.boot, self.hosts))

    def poweroff(self, host: str, timeout: float = 120) -> float:
        """`systemctl poweroff` in the container; seconds until it is gone."""
        start = time.monotonic()
        if machine_leader(self.machine(host)) is None:
            return 0.0
        self.sh(host, "systemctl poweroff", check=False)
        proc = self.procs.get(host)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and machine_leader(self.machine(host)) is not None:
            time.sleep(0.2)
        if proc is not None:
            try:
                proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # our own systemd-nspawn's process group
                proc.wait(30)
        return time.monotonic() - start

    def destroy(self) -> None:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(self.poweroff, self.hosts))
        for host in self.hosts:
            root = self.root(host)
            if root.is_mount():
                run(["umount", "-l", str(root)], check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)

    # - inside a container -
    def sh(self, host: str, cmd: str, check: bool = True, timeout: float = 120,
           ) -> subprocess.CompletedProcess:
        leader = machine_leader(self.machine(host))
        if leader is None:
            raise RuntimeError(f"{host} is not running")
        return run(["nsenter", "--target", str(leader), "--all", "--", "/usr/bin/env", "-i",
                    "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", "SYSTEMD_PAGER=",
                    "/bin/sh", "-c", cmd], check=check, timeout=timeout)

    def show(self, host: str, unit: str, *props: str) -> dict[str, str]:
        out = self.sh(host, f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props),
                      check=False).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, host: str, unit: str, output: str = "cat") -> str:
        return self.sh(host, f"journalctl --no-pager -o {output} -u {unit}", check=False,
                       timeout=300).stdout

    # - ansible -
    def apply(self, *extra: str, timeout: float = 1800) -> tuple[str, float, dict]:
        """ansible-playbook fleet.yml on the containers: (output, seconds, recap)."""
        start = time.monotonic()
        env = dict(os.environ, ANSIBLE_CONFIG=str(ANSIBLE / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
                   ANSIBLE_FORCE_COLOR="0", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                   ANSIBLE_LOG_PATH=str(self.workdir / "ansible.log"))  # timestamped lines
        proc = subprocess.run(
            [str(BIN / "ansible-playbook"), "-i", "inventory/nspawn.yml", "-i",
             str(self.inventory), "fleet.yml", "-e", f"fleet_secrets_dir={self.secrets}",
             "-e", f"fleet_broker_port={self.port}", *PACKAGE_SRC, *extra],
            cwd=ANSIBLE, env=env, capture_output=True, text=True, timeout=timeout)
        took = time.monotonic() - start
        out = proc.stdout + proc.stderr
        (self.workdir / f"apply-{int(time.time())}.log").write_text(out)
        if proc.returncode:
            raise RuntimeError(f"ansible-playbook failed ({proc.returncode}):\n{out[-8000:]}")
        return out, took, recap(out)


# -- the proof ---------------------------------------------------------------------------------

UNIT_PROPS = ("ActiveState", "SubState", "Type", "Result", "StatusText", "MainPID", "NRestarts",
              "WatchdogUSec", "WatchdogTimestampMonotonic", "ExecMainStatus", "ExecStart",
              "StartLimitIntervalUSec", "StartLimitBurst", "InvocationID")
# The sandbox as systemd reports it applied (systemctl show), per unit.
HARDENING = {"ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
             "PrivateDevices": "yes", "PrivateUsers": "yes", "NoNewPrivileges": "yes",
             "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
             "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes", "ProtectClock": "yes",
             "ProtectHostname": "yes", "ProtectProc": "invisible", "RestrictRealtime": "yes",
             "RestrictSUIDSGID": "yes", "LockPersonality": "yes", "RemoveIPC": "yes",
             "KeyringMode": "private", "CapabilityBoundingSet": "", "AmbientCapabilities": "",
             "UMask": "0077", "SystemCallErrorNumber": "EPERM"}


class Proof:
    """The proof on a booted, provisioned fleet: facts, each step's seconds, and what failed.
    Every behaviour is read from systemd's own state (systemctl show, the journal) and from
    the run's files (events.jsonl, accounting.jsonl)."""

    def __init__(self, fleet: Fleet, run: str = "nspawn", log=print) -> None:
        self.fleet, self.run, self.log = fleet, run, log
        self.facts: dict = {"steps": {}, "errors": {}}
        self.run_dir = fleet.root("server") / "var/lib/fleetfl/coordinator/runs" / run

    def units(self, host: str) -> list[str]:
        return (["mosquitto.service", "fl-coordinator.service"] if host == "server"
                else [f"fl-agent@{host}.service"])

    def events(self) -> list[dict]:
        sys.path.insert(0, str(REPO.parent))
        from fleetfl.coordinator.rundir import RunDir
        return RunDir(self.run_dir).events() if (self.run_dir / "events.jsonl").exists() else []

    def version(self) -> int:
        events = self.events()
        return events[-1]["version"] if events else 0

    def wait(self, what: str, cond, timeout: float, every: float = 1.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = cond()
            if value:
                return value
            time.sleep(every)
        raise AssertionError(f"timed out after {timeout:.0f} s: {what}")

    def step(self, name: str, fn) -> None:
        start = time.monotonic()
        try:
            self.facts[name] = fn()
        except Exception as exc:  # recorded: the tests say which step failed and why
            self.facts["errors"][name] = f"{type(exc).__name__}: {exc}"[:6000]
            self.log(f"step {name} FAILED: {self.facts['errors'][name][:2000]}")
        took = round(time.monotonic() - start, 1)
        self.facts["steps"][name] = took
        self.log(f"step {name}: {took} s")

    def contributed_after(self, agent: str, version: int, timeout: float) -> int:
        """The first version > `version` that averaged an update of `agent` (it rejoined)."""
        def found():
            for event in self.events():
                if event["version"] > version and agent in event.get("contributors", ()):
                    return event["version"]
            return None
        return self.wait(f"{agent} contributes after version {version}", found, timeout)

    # - the steps -
    def all_active(self) -> dict:
        f, out = self.fleet, {}
        for host in f.hosts:
            for unit in self.units(host):
                out[f"{host}:{unit}"] = f.show(host, unit, *UNIT_PROPS, *HARDENING,
                                                "SystemCallFilter", "IPAddressDeny",
                                                "MemoryMax", "CPUQuotaPerSecUSec",
                                                "MemoryDenyWriteExecute")
        return out

    def in_process(self) -> dict:
        """What the kernel says about each service's main process: no new privileges,
        seccomp on, no capabilities, a read-only root, its own /tmp."""
        f, out = self.fleet, {}
        for host in f.hosts:
            for unit in self.units(host):
                if unit == "mosquitto.service":
                    continue
                pid = f.show(host, unit, "MainPID")["MainPID"]
                status = f.sh(host, f"cat /proc/{pid}/status", check=False).stdout
                fields = dict(line.split(":\t", 1) for line in status.splitlines()
                              if ":\t" in line)
                mounts = f.sh(host, f"cat /proc/{pid}/mountinfo", check=False).stdout
                root_opts = next((line.split()[5] for line in mounts.splitlines()
                                  if line.split()[4] == "/"), "")
                venv_ro = any(line.split()[4] == VENV_IN or line.split()[4] == "/opt"
                              for line in mounts.splitlines()) or "ro" in root_opts.split(",")
                out[f"{host}:{unit}"] = {
                    "NoNewPrivs": fields.get("NoNewPrivs", "").strip(),
                    "Seccomp": fields.get("Seccomp", "").strip(),
                    "CapEff": fields.get("CapEff", "").strip(),
                    "root_mount": root_opts, "venv_read_only": venv_ro,
                    "private_tmp": any(line.split()[4] == "/tmp" for line in mounts.splitlines()),
                }
        return out

    def watchdog_pings(self) -> dict:
        """WatchdogTimestamp moves on: systemd got WATCHDOG=1 from each service."""
        f = self.fleet
        targets = [("server", "fl-coordinator.service"),
                   *[(h, f"fl-agent@{h}.service") for h in f.agents]]
        before = {t: int(f.show(*t, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"])
                  for t in targets}
        time.sleep(12)
        after = {t: int(f.show(*t, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"])
                 for t in targets}
        return {f"{h}:{u}": {"before": before[(h, u)], "after": after[(h, u)]}
                for h, u in targets}

    def freeze_agent(self, host: str, watchdog_sec: float) -> dict:
        """SIGSTOP the agent's main process; systemd's watchdog kills it and restarts it."""
        f, unit = self.fleet, f"fl-agent@{host}.service"
        before = f.show(host, unit, "MainPID", "NRestarts")
        version = self.version()
        f.sh(host, f"kill -STOP {before['MainPID']}")
        stopped_at = _monotonic_usec()

        def restarted():
            now = f.show(host, unit, "MainPID", "NRestarts", "ActiveState", "SubState")
            return now if (int(now["NRestarts"]) > int(before["NRestarts"])
                           and now["SubState"] == "running") else None
        after = self.wait(f"{unit} restarted by the watchdog", restarted, watchdog_sec + 90)
        entries = _journal_json(f, host, unit)
        timeout = next((e for e in entries if "Watchdog timeout" in e.get("MESSAGE", "")
                        and int(e["__MONOTONIC_TIMESTAMP"]) >= stopped_at), None)
        result = next((e["MESSAGE"] for e in entries if "Failed with result" in
                       e.get("MESSAGE", "") and int(e["__MONOTONIC_TIMESTAMP"]) >= stopped_at),
                      "")
        rejoined = self.contributed_after(host, self.version(), 180)
        return {"version_at_stop": version, "pid_before": before["MainPID"],
                "pid_after": after["MainPID"], "nrestarts": int(after["NRestarts"]),
                "watchdog_message": timeout and timeout["MESSAGE"],
                "killed_after_s": timeout and
                (int(timeout["__MONOTONIC_TIMESTAMP"]) - stopped_at) / 1e6,
                "result_message": result, "rejoined_at_version": rejoined}

    def kill_coordinator(self) -> dict:
        f, unit = self.fleet, "fl-coordinator.service"
        self.wait("a version past the checkpointed start", lambda: self.version() >= 2, 300)
        before = f.show("server", unit, "MainPID", "NRestarts")
        version = self.version()
        killed_at = _monotonic_usec()
        f.sh("server", f"systemctl kill -s KILL {unit}")

        def restarted():
            now = f.show("server", unit, "MainPID", "NRestarts", "SubState", "ExecStart")
            return now if (int(now["NRestarts"]) > int(before["NRestarts"])
                           and now["SubState"] == "running") else None
        after = self.wait("the coordinator restarted", restarted, 120)
        messages = [e.get("MESSAGE", "") for e in _journal_json(f, "server", unit)
                    if int(e["__MONOTONIC_TIMESTAMP"]) >= killed_at]
        resumed = [m for m in messages if "--resume auto" in m]
        goes_on = self.wait("versions go on after the resume",
                            lambda: (v := self.version()) >= version + 3 and v, 300)
        return {"version_at_kill": version, "pid_before": before["MainPID"],
                "pid_after": after["MainPID"], "nrestarts": int(after["NRestarts"]),
                "exec_start": after["ExecStart"], "resume_log": resumed,
                "killed_message": next((m for m in messages if "status=9/KILL" in m
                                        or "signal=KILL" in m), ""),
                "version_after": goes_on}

    def reboot(self, host: str) -> dict:
        f, unit = self.fleet, f"fl-agent@{host}.service"
        version = self.version()
        off = f.poweroff(host)
        down_version = self.version()
        boot = f.boot(host)

        def active():
            now = f.show(host, unit, "ActiveState", "SubState", "NRestarts", "InvocationID")
            return now if now["SubState"] == "running" else None
        state = self.wait(f"{unit} running after the boot", active, 300)
        boots = f.sh(host, "journalctl --list-boots --no-pager", check=False).stdout
        rejoined = self.contributed_after(host, self.version(), 240)
        return {"version_at_poweroff": version, "poweroff_s": round(off, 1),
                "version_while_down": down_version, "boot_s": round(boot, 1),
                "state": state, "boots": len([b for b in boots.splitlines() if b.strip()
                                              and not b.lstrip().startswith("IDX")]),
                "rejoined_at_version": rejoined}

    def operator_stops_run(self, timeout: float) -> dict:
        """`systemctl stop fl-coordinator`: the run ends (STOP to the agents), the unit is
        inactive without failing (SuccessExitStatus=130) and every agent exits 0."""
        f = self.fleet
        version = self.version()
        f.sh("server", "systemctl stop fl-coordinator.service", timeout=timeout)
        coordinator = f.show("server", "fl-coordinator.service", "ActiveState", "SubState",
                             "Result", "ExecMainStatus")

        def agents_done():
            states = {h: f.show(h, f"fl-agent@{h}.service", "ActiveState", "SubState",
                                "Result", "ExecMainStatus") for h in f.agents}
            return states if all(s["SubState"] != "running" for s in states.values()) else None
        agents = self.wait("the agents stop", agents_done, 180, every=2)
        events = self.events()
        return {"coordinator": coordinator, "agents": agents, "version_at_stop": version,
                "versions": events[-1]["version"] if events else 0,
                "accuracy": events[-1].get("accuracy") if events else None}

    def enforcement(self) -> dict:
        """Whether this host lets the containers' systemd enforce the cgroup-based settings:
        a transient unit with IPAddressDeny=any connecting to the broker, and one with
        MemoryMax=64M allocating 256 MiB (both in an agent's container)."""
        f, host = self.fleet, self.fleet.agents[0]
        ip = f.sh(host, "systemd-run --wait --pipe -q -p IPAddressDeny=any /usr/bin/python3 -c "
                  f"\"import socket; socket.create_connection(('127.0.0.1', {f.port}), 3)\"",
                  check=False)
        mem = f.sh(host, "systemd-run --wait --pipe -q -p MemoryMax=64M /usr/bin/python3 -c "
                   "\"b = bytearray(256 << 20); b[::4096] = b'x' * len(b[::4096])\"",
                   check=False)
        mode = f.sh(host, "stat -fc %T /sys/fs/cgroup", check=False).stdout.strip()
        return {"cgroup_fs": mode, "ip_filter_enforced": ip.returncode != 0,
                "memory_max_enforced": mem.returncode != 0}

    def accounting(self) -> dict:
        sys.path.insert(0, str(REPO.parent))
        from fleetfl.coordinator.accounting import check
        logs = [self.fleet.journal(h, f"fl-agent@{h}.service") for h in self.fleet.agents]
        acc = check(self.run_dir, logs)
        coordinator_log = self.fleet.journal("server", "fl-coordinator.service")
        return {"table": acc.table(), "sent": acc.sent, "acked": acc.acked,
                "applied": acc.applied, "lost": acc.lost, "twice": acc.twice,
                "window_twice": acc.window_twice, "unknown_applied": acc.unknown_applied,
                "unconfirmed": acc.unconfirmed,
                "tracebacks": coordinator_log.count("Traceback"),
                "directive_warnings": self.directive_warnings()}

    def directive_warnings(self) -> list[str]:
        """Lines of systemd's own log about a unit setting it could not apply."""
        pattern = re.compile(r"(not supported|unsupported|Failed to set up|ignoring|"
                             r"BPF|Unknown key|Invalid)", re.I)
        out = []
        for host in self.fleet.hosts:
            text = self.fleet.sh(host, "journalctl --no-pager -o cat _PID=1", check=False,
                                 timeout=300).stdout
            out += [f"{host}: {line}" for line in text.splitlines()
                    if pattern.search(line) and ("fl-" in line or "mosquitto" in line)]
        return out


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _journal_json(fleet: Fleet, host: str, unit: str) -> list[dict]:
    text = fleet.sh(host, f"journalctl --no-pager -o json -u {unit}", check=False,
                    timeout=300).stdout
    out = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry.get("MESSAGE"), str):
            out.append(entry)
    return out


def prove(fleet: Fleet, watchdog_sec: float = 20, log=print) -> dict:
    """Boot, apply and every behaviour of the proof, in order; a failed step is recorded
    and the next ones still run where they can. Returns the facts."""
    p = Proof(fleet, log=log)
    p.step("boot", lambda: (fleet.create(), fleet.boot_all()) and None)
    p.step("first_apply", lambda: _apply_facts(fleet))
    if "first_apply" in p.facts["errors"]:
        return p.facts
    p.step("units", p.all_active)
    p.step("in_process", p.in_process)
    p.step("watchdog_pings", p.watchdog_pings)
    p.step("first_versions", lambda: p.wait("version 3", lambda: p.version() >= 3, 600))
    p.step("freeze", lambda: p.freeze_agent(fleet.agents[0], watchdog_sec))
    p.step("kill_coordinator", p.kill_coordinator)
    p.step("reboot", lambda: p.reboot(fleet.agents[-1]))
    p.step("second_apply", lambda: _apply_facts(fleet))
    p.step("enforcement", p.enforcement)
    p.step("run_end", lambda: p.operator_stops_run(120))
    p.step("accounting", p.accounting)
    return p.facts


def _apply_facts(fleet: Fleet) -> dict:
    out, took, hosts = fleet.apply()
    return {"seconds": round(took, 1), "recap": hosts, "tail": out[-3000:]}


def recap(output: str) -> dict[str, dict[str, int]]:
    keys = ("ok", "changed", "unreachable", "failed", "skipped", "rescued", "ignored")
    return {m[0]: dict(zip(keys, map(int, m[1:]), strict=True)) for m in RECAP.findall(output)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare")
    up = sub.add_parser("up")
    up.add_argument("--agents", type=int, default=3)
    up.add_argument("--name", default="manual")
    pr = sub.add_parser("prove", help="the whole proof; prints its facts as JSON")
    pr.add_argument("--agents", type=int, default=3)
    pr.add_argument("--name", default=f"fl{os.getpid() % 100000}")
    pr.add_argument("--keep", action="store_true", help="leave the containers running")
    pr.add_argument("--out", help="write the facts (JSON) here")
    down = sub.add_parser("down")
    down.add_argument("name")
    args = parser.parse_args()
    if (reason := why_not()) is not None:
        print(reason, file=sys.stderr)
        return 1
    if args.cmd == "down":
        workdir = STATE / "fleets" / args.name
        hosts = json.loads((workdir / "hosts.yml").read_text())
        agents = len(hosts["all"]["children"]["agents"]["hosts"])
        Fleet(agents, workdir, Path("/nonexistent"), Path("/nonexistent"),
              prefix=args.name).destroy()
        return 0
    if args.cmd == "prepare":
        print(prepare())
    elif args.cmd == "up":
        wheels, base = prepare()
        fleet = Fleet(args.agents, STATE / "fleets" / args.name, base, wheels, prefix=args.name)
        fleet.create()
        with timed("boot"):
            fleet.boot_all()
        with timed("first apply"):
            fleet.apply()
        print(f"fleet {args.name} up; broker port {fleet.port}; inventory {fleet.inventory}")
        print("note: the containers' systemd-nspawn processes end with this command's session")
    elif args.cmd == "prove":
        wheels, base = prepare()
        fleet = Fleet(args.agents, STATE / "fleets" / args.name, base, wheels, prefix=args.name)
        try:
            facts = prove(fleet)
        finally:
            if not args.keep:
                fleet.destroy()
        facts["prepare"] = dict(TIMINGS)
        text = json.dumps(facts, indent=2, default=str)
        if args.out:
            Path(args.out).write_text(text)
        print(text)
        return 1 if facts["errors"] else 0
    print(json.dumps(TIMINGS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
