"""An arm64 (aarch64) agent in a mixed fleet with x86 agents (issue 15, item 2).

The arm64 agent runs in an emulated Debian bookworm arm64 root (qemu-user through binfmt_misc;
the base of 64-bit Raspberry Pi OS), installed the way the Ansible role installs a Pi: real
aarch64 wheels from PyPI, torch 2.10.0 (CPU-only there), the constraint file and a wheelhouse
(scripts/arm64-root.sh prepares the root once and reuses it). The broker, the coordinator and
the x86 agents run on the host; a chroot shares the host's loopback, so the arm64 agent
reaches the broker at 127.0.0.1.

Reports: versions reached, whether every version averaged the arm64 agent's update, the arm64
venv's installed size (and torch's share), the arm64 agent's peak RSS (VmHWM of the emulated
process, which includes qemu's own memory and translated-code cache: an upper bound of a Pi's
figure) and `import torch` alone on arm64, the x86 agents' peak RSS beside it. Emulated speed
is not a Pi's speed: times are printed only as how long this bench took.

    sudo .venv/bin/python bench/arm64_agent.py [--x86-agents 3] [--versions 4] [--root DIR]

Needs root (chroot, binfmt_misc), qemu-user-static (installed by scripts/arm64-root.sh from
apt), mosquitto, and network access to PyPI the first time (the root's wheelhouse after).
The digits data is copied into the root's data folder (the arm64 agent has no scikit-learn:
the base install, what a Pi gets).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = Path(os.environ.get("FLEETFL_ARM64_ROOT", "/var/lib/fleetfl-arm64/root"))
VENV_IN_ROOT = "/opt/fleetfl/venv"
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"
DATA_IN_ROOT = "/opt/fleetfl/data"


def why_not_available() -> str:
    """'' when this machine can run the arm64 agent, else why not."""
    if os.geteuid() != 0:
        return "not root (chroot, binfmt_misc and debootstrap need root)"
    if sys.platform != "linux":
        return "not Linux"
    if os.uname().machine == "aarch64":
        return "the host is aarch64 already: nothing to emulate"
    if not (shutil.which("qemu-aarch64-static") or Path("/usr/libexec/qemu-binfmt").is_dir()
            or shutil.which("apt-get")):
        return "no qemu-user-static and no apt-get to install it"
    if not shutil.which("mosquitto") and not Path("/usr/sbin/mosquitto").exists():
        return "no mosquitto binary for the broker"
    return ""


def prepare_root(root: Path) -> Path:
    """scripts/arm64-root.sh: reuses a prepared root, reinstalls this tree's package."""
    started = time.monotonic()
    out = subprocess.run(["bash", str(HERE / "scripts" / "arm64-root.sh"), str(root)],
                         capture_output=True, text=True,
                         env=dict(os.environ, HOST_PY=sys.executable))
    if out.returncode != 0:
        raise RuntimeError(f"scripts/arm64-root.sh failed ({out.returncode}):\n"
                           + out.stderr[-4000:])
    print(f"arm64 root ready in {time.monotonic() - started:.0f} s: "
          f"{out.stdout.strip().splitlines()[0]}", flush=True)
    return root


def _du_mib(path: Path) -> float:
    out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0]) / 1024


def installed_size(root: Path) -> dict:
    venv = root / VENV_IN_ROOT.lstrip("/")
    site = next((venv / "lib").glob("python3*/site-packages"))
    packages = {p.name: _du_mib(p) for p in site.iterdir() if p.is_dir()
                and not p.name.endswith((".dist-info", "__pycache__"))}
    big = dict(sorted(packages.items(), key=lambda kv: -kv[1])[:6])
    wheelhouse = root / "opt/fleetfl/wheelhouse"
    return {"venv_mib": round(_du_mib(venv), 1),
            "largest_mib": {k: round(v, 1) for k, v in big.items()},
            "wheelhouse_mib": round(_du_mib(wheelhouse), 1) if wheelhouse.is_dir() else None}


def chroot_python(root: Path, code: str, timeout: float = 600) -> str:
    out = subprocess.run([CHROOT, str(root), f"{VENV_IN_ROOT}/bin/python", "-c", code],
                         capture_output=True, text=True, timeout=timeout,
                         env={"PATH": "/usr/bin:/bin", "HOME": "/root"})
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return out.stdout.strip()


def torch_import_rss(root: Path) -> dict:
    return json.loads(chroot_python(root, (
        "import json, platform, resource, time; t = time.monotonic(); import torch; "
        "print(json.dumps({'machine': platform.machine(), 'torch': torch.__version__, "
        "'cuda': torch.version.cuda, 'maxrss_mib': round(resource.getrusage("
        "resource.RUSAGE_SELF).ru_maxrss / 1024, 1), 'import_s': round(time.monotonic() - t, 1)"
        "}))")))


def _vm_hwm_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def copy_digits(root: Path) -> None:
    """The arm64 agent's --data-dir holds scikit-learn's digits.csv.gz (from the host)."""
    spec = find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-learn on the host is needed for its copy of the digits data")
    src = Path(list(spec.submodule_search_locations)[0]) / "datasets/data/digits.csv.gz"
    dest = root / DATA_IN_ROOT.lstrip("/") / "digits"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest / "digits.csv.gz")


def run_mixed_fleet(root: Path, x86_agents: int, versions: int, work: Path,
                    algo: str = "fedavg", local_steps: int = 20,
                    timeout: float = 1200) -> dict:
    from fleetfl.coordinator.local_fleet import LocalFleet
    from fleetfl.coordinator.rundir import RunDir
    from fleetfl.shared.devtools.local_broker import LocalMosquitto

    copy_digits(root)
    parts = x86_agents + 1
    arm_index = x86_agents  # the last shard
    run = f"arm64-{int(time.time())}"
    broker = LocalMosquitto().start()
    hwm: dict[str, float] = {}
    loads: list[float] = []
    started = time.monotonic()
    try:
        fleet = LocalFleet(broker.url, run, work / "logs",
                           ["--run-dir", str(work / "runs"), "--task", "digits", "--algo", algo,
                            "--local-steps", str(local_steps), "--period", str(local_steps),
                            "--max-versions", str(versions), "--min-agents", str(parts),
                            "--window-timeout", "600"])
        with fleet:
            fleet.start_coordinator()
            for i in range(x86_agents):
                fleet.start_agent(i, parts, agent_id=f"x86-{i}", extra=["--threads", "1"])
            arm_log = open(work / "logs" / "arm64.log", "ab")  # noqa: SIM115
            arm = subprocess.Popen(
                [CHROOT, str(root), f"{VENV_IN_ROOT}/bin/fl-agent", "--broker", broker.url,
                 "--run", run, "--agent-id", "arm64", "--shard", f"{arm_index}/{parts}",
                 "--data-dir", DATA_IN_ROOT, "--threads", "1", "--block-timeout", "600"],
                stdout=arm_log, stderr=arm_log, start_new_session=True,
                env={"PATH": "/usr/bin:/bin", "HOME": "/root", "PYTHONUNBUFFERED": "1"})
            pids = {"arm64": arm.pid, **{n: p.pid for n, p in fleet.agents.items()}}
            deadline = time.monotonic() + timeout
            while fleet.coordinator.poll() is None and time.monotonic() < deadline:
                for name, pid in pids.items():
                    value = _vm_hwm_mib(pid)
                    if value is not None:
                        hwm[name] = max(hwm.get(name, 0.0), value)
                loads.append(os.getloadavg()[0])
                time.sleep(0.5)
            code = fleet.coordinator.poll()
            if code is None:
                raise RuntimeError("coordinator did not finish in time:\n"
                                   + fleet.log("coordinator")[-3000:])
            try:
                arm_code = arm.wait(timeout=120)
            except subprocess.TimeoutExpired:
                arm.kill()
                arm_code = None
            agent_codes = fleet.wait_agents(timeout=60)
        arm_text = (work / "logs" / "arm64.log").read_text(errors="replace")
        events = [e for e in RunDir(work / "runs" / run).events() if e.get("type") == "version"]
    finally:
        broker.close()
    accuracies = [e["accuracy"] for e in events if e.get("accuracy") is not None]
    peak_line = [ln for ln in arm_text.splitlines() if "peak RSS" in ln]
    x86 = [v for k, v in hwm.items() if k != "arm64"]
    return {
        "run": run, "coordinator_exit": code, "arm64_exit": arm_code,
        "x86_exits": agent_codes, "versions": len(events),
        "arm64_in_every_version": bool(events) and all(
            "arm64" in e.get("contributors", []) for e in events),
        "final_accuracy": accuracies[-1] if accuracies else None,
        "arm64_updates_sent": arm_text.count("update sent"),
        "arm64_vm_hwm_mib": round(hwm.get("arm64", 0.0), 1),
        "arm64_logged_peak": peak_line[-1].split("peak RSS")[-1].strip() if peak_line else None,
        "x86_vm_hwm_mib_median": round(statistics.median(x86), 1) if x86 else None,
        "x86_vm_hwm_mib_range": [round(min(x86), 1), round(max(x86), 1)] if x86 else None,
        "load_median": round(statistics.median(loads), 2) if loads else None,
        "bench_seconds": round(time.monotonic() - started, 1),
        "arm64_log_tail": arm_text[-1500:] if arm_code != 0 else "",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    p.add_argument("--x86-agents", type=int, default=3)
    p.add_argument("--versions", type=int, default=4)
    p.add_argument("--work", type=Path, default=None, help="logs and run folder (default: tmp)")
    args = p.parse_args(argv)
    why = why_not_available()
    if why:
        print(f"arm64_agent: cannot run here: {why}", file=sys.stderr)
        return 2
    import tempfile

    root = prepare_root(args.root)
    work = args.work or Path(tempfile.mkdtemp(prefix="fleetfl-arm64-"))
    report = {"installed": installed_size(root), "torch_import": torch_import_rss(root)}
    report["fleet"] = run_mixed_fleet(root, args.x86_agents, args.versions, work)
    print(json.dumps(report, indent=2))
    ok = (report["fleet"]["coordinator_exit"] == 0 and report["fleet"]["arm64_exit"] == 0
          and report["fleet"]["arm64_in_every_version"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
