"""An arm64 agent (emulated aarch64 Debian root, installed as the Ansible role installs a Pi)
in a mixed fleet with x86 agents: it joins, trains and is averaged into every version
(issue 15, item 2). The work is bench/arm64_agent.py's; see there.

Opt-in: FLEETFL_TEST_ARM64=1. Preparing the root the first time (debootstrap and pip under
emulation) takes 10-20 minutes and needs PyPI; with a prepared root (reused from
$FLEETFL_ARM64_ROOT, default /var/lib/fleetfl-arm64/root) a run takes 2-4 minutes on this
2-core machine, which is still too slow for every CI run. Skipped, with the reason, when not
root or when qemu/binfmt_misc or mosquitto is unavailable.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]

_spec = importlib.util.spec_from_file_location(
    "arm64_agent", Path(__file__).resolve().parents[1] / "bench" / "arm64_agent.py")
arm64_agent = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(arm64_agent)


@pytest.fixture(scope="module")
def arm64_root() -> Path:
    if os.environ.get("FLEETFL_TEST_ARM64") != "1":
        pytest.skip("opt-in: FLEETFL_TEST_ARM64=1 (an emulated arm64 root; minutes, root "
                    "and PyPI the first time; bench/arm64_agent.py)")
    why = arm64_agent.why_not_available()
    if why:
        pytest.skip(f"no arm64 emulation here: {why}")
    try:
        return arm64_agent.prepare_root(arm64_agent.DEFAULT_ROOT)
    except RuntimeError as exc:
        if "binfmt" in str(exc) or "aarch64" in str(exc):
            pytest.skip(f"qemu-aarch64 through binfmt_misc unavailable: {str(exc)[-300:]}")
        raise


def test_the_arm64_install_is_a_cpu_torch_without_coordinator_packages(arm64_root):
    got = arm64_agent.torch_import_rss(arm64_root)
    assert got["machine"] == "aarch64"
    assert got["cuda"] is None and "+cu" not in got["torch"]
    assert got["torch"].startswith(("2.9.", "2.10."))
    size = arm64_agent.installed_size(arm64_root)
    names = set(size["largest_mib"])
    assert not names & {"sklearn", "scipy", "matplotlib", "nvidia"}, size
    assert size["venv_mib"] < 1000, size  # a CUDA torch alone would be ~4,600 MiB


def test_arm64_agent_is_averaged_into_every_version(arm64_root, tmp_path):
    fleet = arm64_agent.run_mixed_fleet(arm64_root, x86_agents=2, versions=3, work=tmp_path)
    assert fleet["coordinator_exit"] == 0, fleet
    assert fleet["arm64_exit"] == 0, fleet["arm64_log_tail"]
    assert all(code == 0 for code in fleet["x86_exits"].values()), fleet
    assert fleet["versions"] == 3 and fleet["arm64_in_every_version"], fleet
    assert fleet["arm64_updates_sent"] >= 3
    assert fleet["final_accuracy"] is not None and fleet["final_accuracy"] > 0.5
