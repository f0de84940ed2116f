"""Issue 6: the fleet playbook (ansible/), its systemd units (systemd/) and a local proof.

The local proof applies ansible/fleet.yml to this machine with inventory/local.yml: 17 host
aliases (a server with Mosquitto and the coordinator, pi01..pi16), each with its own path
prefix, user and unit names, services run by the small supervisor (systemd is not PID 1
here). It checks --check on a blank machine, the first apply, the 16-agent DGA run on digits
to its end, a second apply with changed=0 everywhere, the broker's TLS, credentials and ACL,
and `systemd-analyze verify` / `security` on every rendered unit. It needs root (it creates
users) and removes what it made afterwards. Figures go to stdout (pytest -s) and to
$FLEET_PROOF_SUMMARY if set.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import resource
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import require_root_and_mosquitto

from fleetfl.coordinator.rundir import RunDir
from fleetfl.shared.config import load_agent_config
from fleetfl.shared.devtools.local_broker import free_port

REPO = Path(__file__).resolve().parents[1]
ANSIBLE = REPO / "ansible"
SUPERVISOR = ANSIBLE / "roles" / "common" / "files" / "fleet-supervisor"
BIN = Path(sys.executable).parent
AGENTS = [f"pi{i:02d}" for i in range(1, 17)]
HOSTS = ["server", *AGENTS]
RUN = "local"  # fleet_run in inventory/local.yml
MAX_VERSIONS = 15  # fleet_coordinator_settings.max_versions there
RECAP = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)"
                   r"\s+skipped=(\d+)\s+rescued=(\d+)\s+ignored=(\d+)", re.M)
EXPOSURE = re.compile(r"Overall exposure level for \S+: ([0-9.]+) (\w+)")


# -- tools --------------------------------------------------------------------------------

def _ansible_tool(name: str) -> str:
    """ansible-playbook / ansible-lint from this venv; installed from the pins of the test
    extra in pyproject.toml when missing (make install normally does that)."""
    path = BIN / name
    if not path.exists():
        extra = tomllib.loads((REPO / "pyproject.toml").read_text())
        pins = [p for p in extra["project"]["optional-dependencies"]["test"]
                if p.startswith("ansible")]
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *pins], check=True)
    assert path.exists(), f"{name} is not installed in {BIN}"
    return str(path)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, ANSIBLE_CONFIG=str(ANSIBLE / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_FORCE_COLOR="0", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.update(extra)
    return env


CPU_SECONDS: dict[str, float] = {}  # ansible's CPU time per playbook run (children's rusage)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def playbook(inventory: str, *args: str, timeout: float = 900) -> tuple[str, float]:
    start, cpu = time.monotonic(), _children_cpu()
    proc = subprocess.run([_ansible_tool("ansible-playbook"), "-i", f"inventory/{inventory}",
                           "fleet.yml", *args], cwd=ANSIBLE, env=_env(), capture_output=True,
                          text=True, timeout=timeout)
    took = time.monotonic() - start
    CPU_SECONDS[" ".join(args[:1])] = _children_cpu() - cpu
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"ansible-playbook {' '.join(args)} failed:\n{out[-6000:]}"
    return out, took


def recap(output: str) -> dict[str, dict[str, int]]:
    keys = ("ok", "changed", "unreachable", "failed", "skipped", "rescued", "ignored")
    return {m[0]: dict(zip(keys, map(int, m[1:]), strict=True))
            for m in RECAP.findall(output)}


def _supervisor(root: Path, host: str, *args: str) -> str:
    sup_dir = root / host / "var/lib/fleet-supervisor"
    proc = subprocess.run([sys.executable, str(SUPERVISOR), "--dir", str(sup_dir), *args],
                          capture_output=True, text=True, timeout=120)
    return proc.stdout


def _status(root: Path, host: str) -> dict[str, dict]:
    lines = _supervisor(root, host, "status").splitlines()
    # a service never started yet has no state file: the supervisor prints it without a name
    return {state["name"]: state for state in map(json.loads, filter(None, lines))
            if "name" in state}


# -- fast checks --------------------------------------------------------------------------

def test_ansible_lint_offline_is_clean():
    proc = subprocess.run([_ansible_tool("ansible-lint"), "--offline", "--nocolor"],
                          cwd=ANSIBLE, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.mark.parametrize("inventory", ["example.yml", "example-simulated.yml", "local.yml"])
def test_syntax_check(inventory):
    playbook(inventory, "--syntax-check", timeout=120)


@pytest.mark.parametrize("inventory", ["example.yml", "example-simulated.yml"])
def test_example_inventory_is_16_pis_and_a_server(inventory):
    proc = subprocess.run([_ansible_tool("ansible-inventory"), "-i", f"inventory/{inventory}",
                           "--list"], cwd=ANSIBLE, env=_env(), capture_output=True, text=True,
                          check=True, timeout=120)
    inv = json.loads(proc.stdout)
    assert inv["agents"]["hosts"] == AGENTS
    assert inv["broker"]["hosts"] == ["server"] and inv["coordinator"]["hosts"] == ["server"]
    assert "password" not in proc.stdout.lower()  # no secrets in the inventory


def test_mosquitto_hash_filter_is_deterministic_pbkdf2():
    import base64
    import hashlib

    spec = importlib.util.spec_from_file_location("fleet_filters",
                                                  ANSIBLE / "filter_plugins" / "fleet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    line = mod.fleet_mosquitto_hash("s3cret", "pi01", 1000)
    assert line == mod.fleet_mosquitto_hash("s3cret", "pi01", 1000)
    assert line != mod.fleet_mosquitto_hash("s3cret", "pi02", 1000)
    _, kind, rounds, salt, digest = line.split("$")
    assert (kind, rounds, len(base64.b64decode(salt))) == ("7", "1000", 12)
    expected = hashlib.pbkdf2_hmac("sha512", b"s3cret", base64.b64decode(salt), 1000)
    assert base64.b64decode(digest) == expected


# -- the supervisor -------------------------------------------------------------------------

def _sup(sup_dir: Path, *args: str) -> str:
    return subprocess.run([sys.executable, str(SUPERVISOR), "--dir", str(sup_dir), *args],
                          capture_output=True, text=True, timeout=60, check=True).stdout


def _wait_state(sup_dir: Path, name: str, states: set[str], timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = json.loads(_sup(sup_dir, "status", name))
        if state["state"] in states or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


def _service(sup_dir: Path, name: str, code: str, **spec) -> None:
    (sup_dir / "services").mkdir(parents=True, exist_ok=True)
    spec = {"argv": [sys.executable, "-c", code], "notify": True, "restart_sec": 0.2, **spec}
    (sup_dir / "services" / f"{name}.json").write_text(json.dumps(spec))


NOTIFY = "from fleetfl.shared import sd_notify as s; import time; "


def test_supervisor_notify_watchdog_restart_and_start_limit(tmp_path):
    sup = tmp_path / "sup"
    # READY, then WATCHDOG pings, then a clean exit: stays "exited", `up` leaves it alone
    _service(sup, "ok", NOTIFY + "s.ready('hi')\nfor _ in range(8): s.watchdog(); "
             "time.sleep(0.1)", watchdog_sec=1)
    # READY, then silence: the watchdog kills it and it is restarted (until the start limit)
    _service(sup, "hung", NOTIFY + "s.ready()\ntime.sleep(60)", watchdog_sec=1,
             start_limit_burst=2, timeout_stop_sec=2)
    # fails at once: restarted, then "failed" at the start limit
    _service(sup, "bad", "raise SystemExit(3)", start_limit_burst=3)
    assert _sup(sup, "up", "ok", "--dry-run") == "ok: started\n"
    try:
        assert _sup(sup, "up", "ok", "hung", "bad") == (
            "ok: started\nhung: started\nbad: started\n")
        assert _sup(sup, "up", "ok") in ("ok: running\n", "ok: exited\n")
        ok = _wait_state(sup, "ok", {"exited"})
        assert ok["ready"] and ok["status"] == "hi" and ok["exit_code"] == 0
        assert _sup(sup, "up", "ok") == "ok: exited\n"
        bad = _wait_state(sup, "bad", {"failed"})
        assert bad["restarts"] == 3
        hung = _wait_state(sup, "hung", {"failed"}, timeout=40)
        assert hung["restarts"] == 2
        log = (sup / "run" / "hung.supervisor.log").read_text()
        assert log.count("watchdog timeout") == 2  # two starts allowed, both hung
    finally:
        _sup(sup, "stop")


def test_supervisor_stop_and_reload(tmp_path):
    sup = tmp_path / "sup"
    code = ("import signal, time\nsignal.signal(signal.SIGHUP, lambda *a: print('HUP', "
            "flush=True))\n" + NOTIFY.replace("; ", "\n") + "s.ready()\ntime.sleep(60)")
    _service(sup, "svc", code, log=str(tmp_path / "svc.log"))
    try:
        _sup(sup, "up", "svc")
        assert _wait_state(sup, "svc", {"running"})["ready"] is True
        assert _sup(sup, "reload", "svc") == "svc: reloaded\n"
        deadline = time.monotonic() + 10
        while "HUP" not in (tmp_path / "svc.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "HUP" in (tmp_path / "svc.log").read_text()
        assert _sup(sup, "restart", "svc") == "svc: restarted\n"
        assert _wait_state(sup, "svc", {"running"})["ready"] is True
    finally:
        assert _sup(sup, "stop", "svc") == "svc: stopped\n"
    assert json.loads(_sup(sup, "status", "svc"))["state"] == "inactive"
    assert _sup(sup, "stop", "svc") == "svc: inactive\n"


# -- systemd units --------------------------------------------------------------------------

def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    return tool


def verify_unit(unit: Path, instance: str | None, workdir: Path) -> float:
    """`systemd-analyze verify` (must pass) and the `security` exposure score of a unit file
    (a template unit is checked as the given instance)."""
    tool = _systemd_analyze()
    workdir.mkdir(parents=True, exist_ok=True)
    name = unit.name.replace("@.", f"@{instance}.") if instance else unit.name
    target = workdir / name
    shutil.copy(unit, target)
    proc = subprocess.run([tool, "verify", str(target)], capture_output=True, text=True,
                          timeout=60)
    problems = [line for line in proc.stderr.splitlines() if "Special user" not in line]
    assert proc.returncode == 0 and not problems, f"{unit}:\n{proc.stderr}"
    proc = subprocess.run([tool, "security", "--offline=true", "--no-pager", str(target)],
                          capture_output=True, text=True, timeout=60)
    match = EXPOSURE.search(proc.stdout + proc.stderr)
    assert match, proc.stdout[-2000:] + proc.stderr[-2000:]
    return float(match[1])


def test_repo_units_verify_with_an_existing_binary(tmp_path):
    """systemd/*.service as shipped, with ExecStart pointed at this venv's entry points."""
    scores = {}
    for unit in sorted((REPO / "systemd").glob("*.service")):
        text = unit.read_text().replace("/opt/fleetfl/venv/bin/", f"{BIN}/")
        assert f"{BIN}/fl-" in text, unit
        patched = tmp_path / "src" / unit.name
        patched.parent.mkdir(exist_ok=True)
        patched.write_text(text)
        scores[unit.name] = verify_unit(patched, "pi01" if "@" in unit.name else None,
                                        tmp_path / "check")
    assert scores["fl-agent@.service"] <= 4.0 and scores["fl-coordinator.service"] <= 4.0
    print(f"\nexposure (systemd-analyze security): {scores}")


def verify_dropin(dropin: Path, workdir: Path) -> float:
    """Debian's mosquitto.service with our drop-in: verify (no warnings) and exposure."""
    tool = _systemd_analyze()
    base = Path("/lib/systemd/system/mosquitto.service")
    if not base.exists():
        pytest.skip("Debian's mosquitto.service is not installed")
    (workdir / "mosquitto.service.d").mkdir(parents=True, exist_ok=True)
    shutil.copy(base, workdir / "mosquitto.service")
    shutil.copy(dropin, workdir / "mosquitto.service.d" / "fleetfl.conf")
    env = dict(os.environ, SYSTEMD_UNIT_PATH=f"{workdir}:")
    unit = str(workdir / "mosquitto.service")
    proc = subprocess.run([tool, "verify", unit], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    proc = subprocess.run([tool, "security", "--offline=true", "--no-pager", unit], env=env,
                          capture_output=True, text=True, timeout=60)
    return float(EXPOSURE.search(proc.stdout + proc.stderr)[1])


def test_repo_mosquitto_dropin_verifies(tmp_path):
    score = verify_dropin(REPO / "systemd/mosquitto.service.d/fleetfl.conf", tmp_path)
    assert score < 9.0  # Debian's unit alone: 9.6 UNSAFE
    print(f"\nmosquitto.service with the drop-in: exposure {score}")


def test_repo_units_match_the_role_templates(tmp_path):
    """systemd/ is the role templates rendered with the defaults (ansible/render-units.yml)."""
    proc = subprocess.run([_ansible_tool("ansible-playbook"), "render-units.yml", "-e",
                           f"fleet_units_out={tmp_path}"], cwd=ANSIBLE, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rendered = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert rendered, "nothing rendered"
    for rel in rendered:
        shipped = REPO / "systemd" / rel
        assert shipped.exists(), f"systemd/{rel} missing (run: make fleet-units)"
        assert shipped.read_text() == (tmp_path / rel).read_text(), (
            f"systemd/{rel} differs from the role template (run: make fleet-units)")


def test_units_order_after_time_sync(tmp_path):
    """Issue 15, item 5: a Pi has no real-time clock, so the rendered agent and coordinator
    units start after time-sync.target. Ordered after it, not pulled in (systemd.special(7):
    the NTP service pulls it in, and the common role sets that up only under systemd)."""
    proc = subprocess.run([_ansible_tool("ansible-playbook"), "render-units.yml", "-e",
                           f"fleet_units_out={tmp_path}"], cwd=ANSIBLE, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for unit in ("fl-agent@.service", "fl-coordinator.service"):
        text = (tmp_path / unit).read_text()
        unit_section = text.split("[Service]")[0]
        [after] = re.findall(r"^After=(.*)$", unit_section, re.M)
        [wants] = re.findall(r"^Wants=(.*)$", unit_section, re.M)
        assert {"network-online.target", "time-sync.target"} <= set(after.split()), unit
        assert "time-sync.target" not in wants.split(), unit
    tasks = yaml.safe_load((ANSIBLE / "roles/common/tasks/main.yml").read_text())
    [sync] = [t for t in tasks if t.get("ansible.builtin.import_tasks") == "time.yml"]
    assert sync["when"] == "fleet_service_manager == 'systemd' and fleet_time_sync | bool"


def test_time_sync_leaves_a_container_alone(tmp_path):
    """roles/common/tasks/time.yml on this machine, a container: it keeps its host's clock,
    so nothing is installed or enabled (timesyncd's unit would refuse to run here)."""
    virt = subprocess.run(["systemd-detect-virt", "--container"], capture_output=True,
                          text=True)
    if virt.returncode != 0:
        pytest.skip("not in a container: the role would install systemd-timesyncd here")
    play = [{"name": "Time sync in a container", "hosts": "localhost", "connection": "local",
             "gather_facts": False,
             "vars": {"ansible_python_interpreter": "{{ ansible_playbook_python }}",
                      "fleet_service_manager": "systemd"},
             "tasks": [
                 {"name": "Common defaults", "ansible.builtin.import_role":
                  {"name": "common", "tasks_from": "defaults"}},
                 {"name": "Time", "ansible.builtin.import_role":
                  {"name": "common", "tasks_from": "time"}},
                 {"name": "Outcome", "ansible.builtin.copy": {
                     "content": "{{ {'timesyncd': fleet_timesyncd | bool, "
                                "'virt': fleet_time_virt.stdout} | to_json }}",
                     "dest": str(tmp_path / "outcome.json"), "mode": "0644"}}]}]
    proc = _run_local_play(tmp_path, "time.yml", play)
    outcome = json.loads((tmp_path / "outcome.json").read_text())
    assert outcome == {"timesyncd": False, "virt": virt.stdout.strip()}
    assert re.search(r"TASK \[common : Time sync package\][^\n]*\nskipping", proc.stdout)
    assert not re.search(r"TASK \[common : [^\]]*\][^\n]*\nchanged", proc.stdout)  # the role's


# -- device-local data and growing the fleet -------------------------------------------------

DATA = "/var/lib/fleetfl/data"  # fleet_agent_data (example.yml) and fleet_data_dir (simulated)


def render_agents(inventory: Path, out: Path) -> dict[str, str]:
    """Every agent's /etc/fleetfl/agent-<id>.yaml as the agent role renders it, host -> text
    (ansible/render-agents.yml: on the control node, no host contacted)."""
    proc = subprocess.run([_ansible_tool("ansible-playbook"), "-i", str(inventory),
                           "render-agents.yml", "-e", f"fleet_agents_out={out}"], cwd=ANSIBLE,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "agents.json").read_text())


@pytest.fixture(scope="module")
def grown(tmp_path_factory) -> dict[str, dict[str, dict[str, str]]]:
    """The agents' configs of both example inventories as shipped (16 Pis) and with a 17th Pi
    appended to the agents group: style -> {"16": host -> text, "17": host -> text}."""
    tmp = tmp_path_factory.mktemp("grown")
    rendered: dict[str, dict[str, dict[str, str]]] = {}
    for style, name in (("device", "example.yml"), ("simulated", "example-simulated.yml")):
        shipped = ANSIBLE / "inventory" / name
        inv = yaml.safe_load(shipped.read_text())
        inv["all"]["children"]["agents"]["hosts"]["pi17"] = {"ansible_host": "192.168.10.117"}
        bigger = tmp / f"17-{name}"
        bigger.write_text(yaml.safe_dump(inv, sort_keys=False))
        rendered[style] = {"16": render_agents(shipped, tmp / f"{style}-16"),
                           "17": render_agents(bigger, tmp / f"{style}-17")}
    return rendered


def _agent_config(text: str, path: Path):
    """The rendered text as fl-agent reads it (the signing key files exist only on a Pi)."""
    path.write_text(text)
    return load_agent_config(path, {"signing_key": "", "coordinator_key": ""})


def test_agent_config_reads_the_device_folder_or_deals_a_shard(grown, tmp_path):
    """fleet_agent_data set: `data` and no shard/data_dir; unset: `shard: i/n`."""
    device, simulated = grown["device"]["16"], grown["simulated"]["16"]
    assert sorted(device) == sorted(simulated) == AGENTS
    for i, host in enumerate(AGENTS):
        keys = yaml.safe_load(device[host])
        folder = "/mnt/usb/fleetfl" if host == "pi16" else DATA  # pi16: a host var
        assert keys["data"] == folder and "shard" not in keys and "data_dir" not in keys
        cfg = _agent_config(device[host], tmp_path / f"{host}-device.yaml")
        assert (cfg.data, cfg.shard, cfg.data_dir, cfg.agent_id) == (folder, "0/1", "", host)
        keys = yaml.safe_load(simulated[host])
        assert keys["shard"] == f"{i}/16" and keys["data_dir"] == DATA and "data" not in keys
        cfg = _agent_config(simulated[host], tmp_path / f"{host}-simulated.yaml")
        assert (cfg.data, cfg.shard, cfg.data_dir) == ("", f"{i}/16", DATA)


def test_a_17th_pi_leaves_the_others_untouched_with_device_data(grown):
    """Device-local data: adding pi17 leaves pi01..pi16's configs byte-identical. A simulated
    fleet re-deals every shard: all 16 change (i/16 -> i/17)."""
    before, after = grown["device"]["16"], grown["device"]["17"]
    assert sorted(after) == [*AGENTS, "pi17"]
    assert {h: after[h] for h in AGENTS} == before
    assert yaml.safe_load(after["pi17"])["data"] == DATA
    before, after = grown["simulated"]["16"], grown["simulated"]["17"]
    changed = [h for h in AGENTS if after[h] != before[h]]
    assert changed == AGENTS
    for i, host in enumerate(AGENTS):
        old, new = yaml.safe_load(before[host]), yaml.safe_load(after[host])
        assert (old.pop("shard"), new.pop("shard")) == (f"{i}/16", f"{i}/17")
        assert old == new  # the shard is the only difference
    assert yaml.safe_load(after["pi17"])["shard"] == "16/17"


def test_agent_unit_lets_the_agent_read_its_data_folder(tmp_path):
    """With fleet_agent_data the unit names the folder read-only (ProtectSystem=strict keeps
    it readable); the shipped unit (no data folder) has no such line. Still verifies."""
    proc = subprocess.run([_ansible_tool("ansible-playbook"), "render-units.yml", "-e",
                           f"fleet_units_out={tmp_path / 'units'}", "-e",
                           f"fleet_agent_data={DATA}"], cwd=ANSIBLE, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (tmp_path / "units" / "fl-agent@.service").read_text()
    assert f"\nReadOnlyPaths=-{DATA}\n" in text and "\nProtectSystem=strict\n" in text
    assert "ReadOnlyPaths" not in (REPO / "systemd" / "fl-agent@.service").read_text()
    patched = tmp_path / "src" / "fl-agent@.service"
    patched.parent.mkdir()
    patched.write_text(text.replace("/opt/fleetfl/venv/bin/", f"{BIN}/"))
    assert verify_unit(patched, "pi01", tmp_path / "check") <= 4.0


def test_data_folder_is_made_when_missing_else_only_checked(tmp_path):
    """roles/agent/tasks/data.yml on this machine: a missing folder is made with the role's
    owner, group and mode; an existing one the agent's user cannot read stops the play with
    the fix, and is left as it was; paths the unit hides are refused under systemd."""
    import grp
    import pwd
    me, my_group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
    made, closed, shared = tmp_path / "made" / "data", tmp_path / "closed", tmp_path / "shared"
    for folder, mode in ((closed, 0o700), (shared, 0o750)):
        folder.mkdir()
        (folder / "device.csv").write_text("x,label\n1,0\n")
        folder.chmod(mode)
    cases = {  # name -> fleet_agent_data and the other vars of the case
        "made": {"fleet_agent_data": str(made)},
        "closed": {"fleet_agent_data": str(closed), "fleet_user": "not-the-owner",
                   "fleet_group": "not-the-group"},
        "shared": {"fleet_agent_data": str(shared), "fleet_user": "not-the-owner"},
        "home": {"fleet_agent_data": "/home/pi/data", "fleet_service_manager": "systemd"},
    }
    tasks = [{"name": "Common defaults", "ansible.builtin.import_role":
              {"name": "common", "tasks_from": "defaults"}}]
    for name, case_vars in cases.items():
        tasks.append({"name": name, "block": [
            {"ansible.builtin.import_role": {"name": "agent", "tasks_from": "data"},
             "vars": case_vars},
            {"ansible.builtin.set_fact": {f"outcome_{name}": "ok"}}],
            "rescue": [{"ansible.builtin.set_fact":
                        {f"outcome_{name}": "{{ ansible_failed_result.msg }}"}}]})
    tasks.append({"name": "Outcomes", "ansible.builtin.copy": {
        "content": "{{ {" + ", ".join(f"'{n}': outcome_{n}" for n in cases) + "} | to_json }}",
        "dest": str(tmp_path / "outcomes.json"), "mode": "0644"}})
    play = [{"name": "Data folder cases", "hosts": "localhost", "connection": "local",
             "gather_facts": False, "tasks": tasks,
             "vars": {"ansible_python_interpreter": "{{ ansible_playbook_python }}",
                      "fleet_service_manager": "supervisor", "fleet_user": me,
                      "fleet_group": my_group, "fleet_agent_data_owner": me}}]
    _run_local_play(tmp_path, "data.yml", play)
    outcomes = json.loads((tmp_path / "outcomes.json").read_text())
    assert outcomes["made"] == "ok" and outcomes["shared"] == "ok"
    st = made.stat()
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o750, os.getuid(), os.getgid())
    assert "is not readable by the agent's user not-the-owner" in outcomes["closed"]
    assert f"chgrp -R not-the-group {closed}" in outcomes["closed"]
    assert "outside /home" in outcomes["home"]
    for folder, mode in ((closed, 0o700), (shared, 0o750)):  # left as they were
        assert folder.stat().st_mode & 0o7777 == mode
        assert (folder / "device.csv").read_text() == "x,label\n1,0\n"


def _wheel(path: Path, build: int) -> None:
    """A pure-Python wheel of `mypkg` 0.1.0 (a user's task package) whose BUILD is `build`."""
    import base64
    import hashlib
    import zipfile
    files = {"mypkg/__init__.py": f"BUILD = {build}\n",
             "mypkg/tasks.py": "sensor = 'the task'\n",
             "mypkg-0.1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: mypkg\n"
                                              "Version: 0.1.0\n",
             "mypkg-0.1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\n"
                                           "Root-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{name},sha256="
              f"{base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).decode().rstrip('=')}"
              f",{len(text.encode())}" for name, text in files.items()]
    files["mypkg-0.1.0.dist-info/RECORD"] = "\n".join([*record, "mypkg-0.1.0.dist-info/RECORD,,"])
    with zipfile.ZipFile(path, "w") as whl:
        for name, text in files.items():
            whl.writestr(name, text)


@pytest.mark.slow  # a venv and three applies: about 20 s
def test_python_packages_install_a_wheel_from_the_control_node(tmp_path):
    """fleet_python_packages (roles/common/tasks/venv.yml) with a wheel built on the control
    node: copied and installed into the venv; a second apply changes nothing; a rebuilt wheel
    of the same version is installed again. torch and fleetfl are stood in for by pip."""
    if subprocess.run(["/usr/bin/python3", "-c", "import ensurepip, venv"]).returncode:
        pytest.skip("/usr/bin/python3 with venv/ensurepip is needed for the venv")
    wheel, venv = tmp_path / "dist" / "mypkg-0.1.0-py3-none-any.whl", tmp_path / "venv"
    wheel.parent.mkdir()
    play = [{"name": "Venv with extra packages", "hosts": "localhost", "connection": "local",
             "gather_facts": False,
             "vars": {"ansible_python_interpreter": "{{ ansible_playbook_python }}",
                      "fleet_venv": str(venv), "fleet_python": "/usr/bin/python3",
                      "fleet_torch_spec": "pip", "fleet_torch_index_url": "",
                      "fleet_package_spec": "pip", "fleet_python_packages": [str(wheel)]},
             "tasks": [{"name": "Venv", "ansible.builtin.import_role":
                        {"name": "common", "tasks_from": "venv"}}],
             "handlers": [{"name": "Package changed", "ansible.builtin.debug": {"msg": "x"},
                           "listen": "fleetfl package changed"}]}]
    (tmp_path / "venv.yml").write_text(yaml.safe_dump(play, sort_keys=False))

    def apply() -> tuple[dict, str]:
        proc = subprocess.run([_ansible_tool("ansible-playbook"), "-i", "localhost,",
                               str(tmp_path / "venv.yml")], cwd=tmp_path, env=_env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        build = subprocess.run([str(venv / "bin/python"), "-c", "import mypkg; print(mypkg.BUILD)"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return recap(proc.stdout)["localhost"], build

    _wheel(wheel, 1)
    first, build = apply()
    assert first["changed"] > 0 and build == "1"
    assert (venv / "packages" / wheel.name).exists()
    second, build = apply()
    assert second["changed"] == 0 and build == "1"
    _wheel(wheel, 2)  # rebuilt, same version
    third, build = apply()
    assert third["changed"] > 0 and build == "2"


# -- the local proof --------------------------------------------------------------------------

def _run_local_play(tmp_path: Path, name: str, play: list) -> subprocess.CompletedProcess:
    """`play` written to tmp_path/name and applied to localhost; it must succeed."""
    (tmp_path / name).write_text(yaml.safe_dump(play, sort_keys=False))
    proc = subprocess.run([_ansible_tool("ansible-playbook"), "-i", "localhost,",
                           str(tmp_path / name)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _mqtt_client(ca: Path, username: str | None = None, password: str | None = None,
                 cert: Path | None = None, key: Path | None = None, tls: bool = True,
                 client_id: str = ""):
    import paho.mqtt.client as mqtt

    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                         client_id=client_id or f"fleet-test-{username}-{time.monotonic_ns()}",
                         protocol=mqtt.MQTTv5)
    if tls:
        client.tls_set(ca_certs=str(ca), certfile=str(cert) if cert else None,
                       keyfile=str(key) if key else None, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    if username:
        client.username_pw_set(username, password)
    return client


def _connack(client, port: int, timeout: float = 5.0):
    """CONNACK reason code, or None if the broker dropped the connection without one."""
    result: dict = {}
    done = threading.Event()

    def on_connect(c, u, flags, reason_code, props):
        result["rc"] = reason_code
        done.set()

    def on_disconnect(c, u, flags, reason_code, props):
        done.set()

    client.on_connect, client.on_disconnect = on_connect, on_disconnect
    try:
        client.connect("127.0.0.1", port, keepalive=10)
    except (OSError, ssl.SSLError):
        return None
    client.loop_start()
    done.wait(timeout)
    return result.get("rc")


def _puback(client, topic: str, timeout: float = 5.0, payload: bytes = b"not a real update",
            retain: bool = False) -> int:
    acks: dict = {}
    done = threading.Event()

    def on_publish(c, u, mid, reason_code, props):
        acks[mid] = reason_code
        done.set()

    client.on_publish = on_publish
    info = client.publish(topic, payload, qos=1, retain=retain)
    assert done.wait(timeout), f"no PUBACK for {topic}"
    return acks[info.mid].value


def _suback(client, topic: str, timeout: float = 5.0) -> int:
    got: list = []
    done = threading.Event()

    def on_subscribe(c, u, mid, reason_codes, props):
        got.extend(reason_codes)
        done.set()

    client.on_subscribe = on_subscribe
    client.subscribe(topic, qos=1)
    assert done.wait(timeout), f"no SUBACK for {topic}"
    return got[0].value


def _cleanup(root: Path, tag: str) -> None:
    for host in HOSTS:
        if (root / host / "var/lib/fleet-supervisor").exists():
            _supervisor(root, host, "stop")
    for user in [f"{tag}-{h}" for h in HOSTS] + [f"{tag}-mosquitto"]:
        subprocess.run(["userdel", user], capture_output=True)
        subprocess.run(["groupdel", user], capture_output=True)
    for _ in range(3):
        shutil.rmtree(root, ignore_errors=True)
        if not root.exists():
            break
        time.sleep(1)


def _inject_unsigned_and_forged(root: Path, port: int) -> dict:
    """Mid-run, with pi01's valid TLS certificate and MQTT password (the broker accepts the
    publish): an unsigned update, and one signed with pi02's signing key, both as pi01 on
    pi01's own topic. The coordinator must refuse them as `unsigned` and `bad_signature`."""
    import numpy as np

    from fleetfl.shared.core.messages import Kind, Message
    from fleetfl.shared.wire.codec import encode
    from fleetfl.shared.wire.signing import Signer
    from fleetfl.shared.wire.topics import Topics

    etc = root / "pi01/etc/fleetfl"
    client = _mqtt_client(etc / "ca.crt", "pi01", (etc / "agent-pi01.password").read_text().strip(),
                          etc / "agent-pi01.crt", etc / "agent-pi01.key")
    rc = _connack(client, port)
    assert rc is not None and not rc.is_failure, rc
    d = 64 * 64 + 64 + 64 * 10 + 10  # the digits MLP
    # a seq far ahead: were it accepted, pi01's real updates would be refused from then on
    msg = Message(Kind.UPDATE, RUN, "pi01", time.time_ns() // 1000 + 10**9, 0,
                  {"window": 1, "samples": 5, "steps": 1},
                  {"delta": np.full(d, 10.0, np.float32)})
    forger = Signer.from_file(root / "pi02/etc/fleetfl/agent-pi02-signing.key")
    acks = {}
    try:
        for name, payload in (("unsigned", encode(msg)), ("forged", encode(msg, forger))):
            info = client.publish(Topics(RUN).up("pi01"), payload, qos=1)
            info.wait_for_publish(10)
            acks[name] = info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()
    return acks


def _inject_when_live(root: Path, port: int, facts: dict) -> None:
    """Runs beside the first apply: as soon as the coordinator is ready and pi01's agent runs
    (the start barrier holds the run until all 16 are up, so the run is live but not over),
    inject the unsigned and the forged update. A run of 15 versions can end within the
    2 s between two polls once it starts, so waiting for its first version is too late."""
    deadline = time.monotonic() + 1500
    while time.monotonic() < deadline and "injected" not in facts:
        try:
            coord = _status(root, "server").get("flt-fl-coordinator.service", {})
            pi01 = _status(root, "pi01").get("flt-fl-agent@pi01.service", {})
        except (OSError, ValueError, KeyError, subprocess.SubprocessError):
            coord, pi01 = {}, {}  # not installed yet (the supervisor answers without names)
        if coord.get("ready") and coord.get("state") == "running" \
                and pi01.get("state") == "running":
            try:
                facts["injected"] = _inject_unsigned_and_forged(root, port)
            except Exception as exc:  # reported by the test, not lost in this thread
                facts["injected"] = f"failed: {exc!r}"
            return
        time.sleep(2)


def _git_head() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


@pytest.fixture(scope="module")
def fleet():
    require_root_and_mosquitto("the local fleet proof creates users: run as root (CI does)")
    commit = _git_head()
    if commit is None:
        pytest.skip("the playbook deploys a git commit: not a git checkout")
    if subprocess.run(["/usr/bin/python3", "-c", "import ensurepip, venv"]).returncode:
        pytest.skip("/usr/bin/python3 with venv/ensurepip is needed for the fleet venv")
    root = Path(tempfile.mkdtemp(prefix="fleetfl-proof-", dir="/tmp"))
    root.chmod(0o755)  # the service users traverse it
    port = free_port()
    tag = f"f{os.getpid() % 100000}"  # user names of this run: two runs never share one
    extra = ["-e", f"fleet_local_root={root}", "-e", f"fleet_broker_port={port}",
             "-e", f"fleet_local_tag={tag}",
             "-e", f"fleet_package_ref={commit}", "-e", "fleet_agent_serial=8"]
    facts: dict = {"root": root, "port": port, "tag": tag}
    try:
        out, facts["check_s"] = playbook("local.yml", "--check", *extra)
        facts["check_recap"] = recap(out)
        facts["check_cpu_s"] = CPU_SECONDS["--check"]
        injector = threading.Thread(target=_inject_when_live, args=(root, port, facts),
                                    daemon=True)
        injector.start()
        out, facts["first_s"] = playbook("local.yml", *extra)
        injector.join(timeout=60)
        facts["first_recap"] = recap(out)
        facts["first_cpu_s"] = CPU_SECONDS["-e"]
        events = root / "server/var/lib/fleetfl/coordinator/runs" / RUN / "events.jsonl"
        deadline, start = time.monotonic() + 600, time.monotonic()
        while time.monotonic() < deadline:
            coord = _status(root, "server").get("flt-fl-coordinator.service", {})
            if coord.get("state") in ("exited", "failed"):
                break
            time.sleep(2)
        facts["run_wait_s"] = time.monotonic() - start
        facts["coordinator"] = coord
        if not events.exists():  # say why, before the cleanup removes the logs
            run_dir = root / "server/var/lib/fleet-supervisor/run"
            tails = {name: (run_dir / name).read_text(errors="replace")[-3000:]
                     for name in ("flt-fl-coordinator.service.log",
                                  "flt-fl-coordinator.service.supervisor.log",
                                  "flt-mosquitto.service.log") if (run_dir / name).exists()}
            raise AssertionError(f"no events after {facts['run_wait_s']:.0f} s; coordinator "
                                 f"{coord}\n" + "\n".join(f"== {n}\n{t}" for n, t in
                                                          tails.items()))
        # one dict per version, the background evaluation's lines folded in
        facts["events"] = RunDir(events.parent).events()
        deadline = time.monotonic() + 120  # the agents stop on the coordinator's STOP
        while True:
            agents = {h: _status(root, h).get(f"flt-fl-agent@{h}.service", {}) for h in AGENTS}
            if (all(a.get("state") in ("exited", "failed") for a in agents.values())
                    or time.monotonic() > deadline):
                break
            time.sleep(2)
        facts["agents"] = agents
        out, facts["second_s"] = playbook("local.yml", *extra)
        facts["second_recap"] = recap(out)
        facts["second_cpu_s"] = CPU_SECONDS["-e"]
        facts["second_out"] = out
        yield facts
    finally:
        if os.environ.get("FLEET_PROOF_KEEP") != "1":
            _cleanup(root, tag)


@pytest.mark.slow
@pytest.mark.integration
def test_check_mode_on_a_blank_machine_and_first_apply(fleet):
    for name in ("check_recap", "first_recap"):
        hosts = fleet[name]
        assert sorted(hosts) == sorted(HOSTS), name
        assert all(h["failed"] == 0 and h["unreachable"] == 0 for h in hosts.values()), hosts
    assert all(h["changed"] > 0 for h in fleet["first_recap"].values())


@pytest.mark.slow
@pytest.mark.integration
def test_the_16_agent_run_finishes(fleet):
    coord, events = fleet["coordinator"], fleet["events"]
    assert coord.get("state") == "exited" and coord.get("exit_code") == 0, coord
    assert coord.get("ready") is True and coord.get("watchdog_pings", 0) >= 1
    assert events[-1]["version"] == MAX_VERSIONS
    assert len(events[-1]["contributors"]) == 16
    # signed run: the two updates injected into the live run with pi01's broker credentials
    # (accepted by the broker) were refused by the coordinator, and nothing else was
    assert fleet.get("injected") == {"unsigned": True, "forged": True}, fleet.get("injected")
    assert events[-1]["rejected"] == {"unsigned": 1, "bad_signature": 1}, events[-1]["rejected"]
    accuracy = events[-1]["accuracy"]
    assert accuracy >= 0.85, events[-1]
    for host, state in fleet["agents"].items():
        assert state.get("state") == "exited" and state.get("exit_code") == 0, (host, state)
        assert state.get("ready") is True, (host, state)
    summary = {"playbook_check_s": round(fleet["check_s"], 1),
               "playbook_first_apply_s": round(fleet["first_s"], 1),
               "run_after_first_apply_s": round(fleet["run_wait_s"], 1),
               "playbook_second_apply_s": round(fleet["second_s"], 1),
               "ansible_cpu_s": {k: round(fleet[f"{k}_cpu_s"], 1)
                                 for k in ("check", "first", "second")},
               "versions": events[-1]["version"], "final_accuracy": accuracy}
    print(f"\nlocal fleet proof: {json.dumps(summary)}")
    if os.environ.get("FLEET_PROOF_SUMMARY"):
        Path(os.environ["FLEET_PROOF_SUMMARY"]).write_text(json.dumps(summary, indent=2))


@pytest.mark.slow
@pytest.mark.integration
def test_signing_keys_are_installed_and_configured(fleet):
    import yaml

    from fleetfl.shared.wire.signing import KeyRing, load_private_key, load_public_key

    root = fleet["root"]
    server = root / "server/etc/fleetfl"
    coordinator = yaml.safe_load((server / "coordinator.yaml").read_text())
    assert coordinator["signing_key"] == str(server / "coordinator-signing.key")
    ring = KeyRing.from_file(coordinator["agent_keys"])
    assert sorted(ring.keys) == AGENTS
    coordinator_pub = load_private_key(coordinator["signing_key"]).public_key()
    for host in AGENTS:
        etc = root / host / "etc/fleetfl"
        cfg = yaml.safe_load((etc / f"agent-{host}.yaml").read_text())
        key = Path(cfg["signing_key"])
        info = key.stat()
        assert (oct(info.st_mode & 0o777), info.st_uid) == ("0o640", 0), (host, info)
        assert key.group() == fleet["tag"] + "-" + host  # readable by its service user only
        assert load_private_key(key).public_key() == ring.keys[host]
        assert load_public_key(cfg["coordinator_key"]) == coordinator_pub


@pytest.mark.slow
@pytest.mark.integration
def test_second_apply_changes_nothing(fleet):
    hosts = fleet["second_recap"]
    assert sorted(hosts) == sorted(HOSTS)
    changed = {h: r["changed"] for h, r in hosts.items() if r["changed"] or r["failed"]}
    assert not changed, fleet["second_out"][-8000:]


@pytest.mark.slow
@pytest.mark.integration
def test_broker_refuses_anonymous_plain_and_foreign_topics(fleet):
    root, port = fleet["root"], fleet["port"]
    etc = root / "pi01/etc/fleetfl"
    ca, cert, key = etc / "ca.crt", etc / "agent-pi01.crt", etc / "agent-pi01.key"
    password = (etc / "agent-pi01.password").read_text().strip()
    run = RUN

    # non-TLS: no CONNACK (the listener speaks TLS only)
    plain = _mqtt_client(ca, "pi01", password, tls=False)
    assert _connack(plain, port, timeout=3) is None
    plain.loop_stop()
    # TLS without a client certificate: the handshake is refused
    nocert = _mqtt_client(ca, "pi01", password)
    assert _connack(nocert, port, timeout=3) is None
    nocert.loop_stop()
    # the certificate is the identity (use_identity_as_username): with pi01's, whatever user
    # name and password a client claims (none, a wrong one, pi02's), it is pi01 to the broker
    for username, pw in ((None, None), ("pi01", "wrong-password"), ("pi02", "wrong-password")):
        client = _mqtt_client(ca, username, pw, cert, key)
        rc = _connack(client, port, timeout=5)
        assert rc is not None and not rc.is_failure, (username, rc)
        try:
            assert _puback(client, f"fl/{run}/up/pi01") < 0x80, username
            assert _puback(client, f"fl/{run}/up/pi02") == 0x87, username
        finally:
            client.disconnect()
            client.loop_stop()

    # pi01's own credentials: accepted; its own topics yes, another agent's no (0x87)
    client = _mqtt_client(ca, "pi01", password, cert, key)
    rc = _connack(client, port)
    assert rc is not None and not rc.is_failure, rc
    try:
        assert _puback(client, f"fl/{run}/up/pi01") < 0x80
        assert _puback(client, f"fl/{run}/up/pi02") == 0x87
        assert _puback(client, f"fl/{run}/status/pi02") == 0x87
        assert _puback(client, f"fl/{run}/down/avg") == 0x87  # only the coordinator
        # it may subscribe to everyone's updates, but the broker delivers none of them
        received: list[str] = []
        client.on_message = lambda c, u, msg: received.append(msg.topic)
        assert _suback(client, f"fl/{run}/up/+") < 0x80
        assert _suback(client, f"fl/{run}/down/avg") < 0x80
        etc2 = root / "pi02/etc/fleetfl"
        other = _mqtt_client(ca, "pi02", (etc2 / "agent-pi02.password").read_text().strip(),
                             etc2 / "agent-pi02.crt", etc2 / "agent-pi02.key")
        assert not _connack(other, port).is_failure
        try:
            assert _puback(other, f"fl/{run}/up/pi02") < 0x80
        finally:
            other.disconnect()
            other.loop_stop()
        time.sleep(1)
        assert received == []
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.slow
@pytest.mark.integration
def test_rendered_units_verify_and_agent_exposure(fleet, tmp_path):
    root = fleet["root"]
    scores = {}
    for host in HOSTS:
        for unit in sorted((root / host / "etc/systemd/system").glob("*.service")):
            instance = host if "@" in unit.name else None
            scores[f"{host}:{unit.name}"] = verify_unit(unit, instance, tmp_path / host)
    dropin = root / "server/etc/systemd/system/mosquitto.service.d/fleetfl.conf"
    scores["server:mosquitto.service+fleetfl.conf"] = verify_dropin(dropin, tmp_path / "mq")
    assert len([k for k in scores if "fl-agent@" in k]) == 16
    assert "server:flt-fl-coordinator.service" in scores
    worst = max(v for k, v in scores.items() if "fl-agent@" in k)
    assert worst <= 4.0, scores
    print(f"\nagent unit exposure: {worst}, coordinator: "
          f"{scores['server:flt-fl-coordinator.service']}")
