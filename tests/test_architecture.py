"""Issue 12: the rooms of shared/ and who may import whom, held to the code.

The core (algorithms, messages, layer table, job) must run where torch, cryptography and
PyYAML are absent: a light agent or a third-party tool uses it with numpy alone.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# room -> the rooms it may import (besides itself). Top-level shared modules (config,
# sd_notify, ...) form the room "shared".
ALLOWED = {
    "shared.core": set(),
    "shared.wire": {"shared.core"},
    "shared.net": {"shared.core", "shared.wire"},
    "shared.learn": {"shared.core"},
    "shared.tasks": {"shared.core", "shared.learn"},
    "shared.devtools": {"shared.core", "shared.wire", "shared.net"},
    "shared": {"shared.core", "shared.wire", "shared.net"},
    "agent": {"shared", "shared.core", "shared.wire", "shared.net", "shared.learn",
              "shared.tasks"},
    "coordinator": {"shared", "shared.core", "shared.wire", "shared.net", "shared.learn",
                    "shared.tasks", "shared.devtools"},
}
ROOMS = ("core", "wire", "net", "learn", "tasks", "devtools")


def room_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "fleetfl" or len(parts) < 2:
        return None
    if parts[1] != "shared":
        return parts[1]
    return f"shared.{parts[2]}" if len(parts) > 2 and parts[2] in ROOMS else "shared"


def imports_of(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:
            names.append("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return names


def wrong_arrows(source_room: str, imported: list[str]) -> list[str]:
    wrong = []
    for name in imported:
        if name.startswith("."):
            wrong.append(f"relative import {name} (write fleetfl.… so the room shows)")
            continue
        target = room_of(name)
        if target is not None and target != source_room and target not in ALLOWED[source_room]:
            wrong.append(f"{source_room} -> {target} ({name})")
    return wrong


def package_modules() -> list[tuple[str, Path]]:
    found = []
    for top in ("agent", "coordinator", "shared"):
        for path in sorted((ROOT / top).rglob("*.py")):
            module = "fleetfl." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found.append((module, path))
    return found


def test_every_module_is_in_a_known_room() -> None:
    for module, path in package_modules():
        assert room_of(module) in ALLOWED, path


def test_imports_follow_the_room_rules() -> None:
    wrong = []
    for module, path in package_modules():
        wrong += [f"{path.relative_to(ROOT)}: {w}"
                  for w in wrong_arrows(room_of(module), imports_of(path))]
    assert not wrong, "\n".join(wrong)


def test_the_rule_check_catches_a_wrong_arrow() -> None:
    """The checker itself: the arrows this test exists to stop are reported."""
    assert wrong_arrows("shared.core", ["fleetfl.shared.wire.codec"])
    assert wrong_arrows("shared.core", ["fleetfl.shared.config"])
    assert wrong_arrows("coordinator", ["fleetfl.agent.runner"])
    assert wrong_arrows("agent", ["fleetfl.coordinator.rundir"])
    assert wrong_arrows("shared.learn", ["fleetfl.shared.tasks.task"])
    assert not wrong_arrows("shared.wire", ["fleetfl.shared.core.messages", "numpy"])


BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'cryptography', 'yaml'}:
            raise ImportError(f'{name} is unimportable in this test')
sys.meta_path.insert(0, Block())
"""

CORE_ROUND = """
import pkgutil, importlib
import numpy as np
import fleetfl.shared.core as core
for info in pkgutil.iter_modules(core.__path__):
    importlib.import_module(f'fleetfl.shared.core.{info.name}')
from fleetfl.shared.core.job import job_from_dict
from fleetfl.shared.core.layers import Layer, LayerTable
from fleetfl.shared.core.messages import Kind, Message
from fleetfl.shared.core.registry import make_coordinator, make_device

class Rules:  # what registry.AveragingRules asks of the coordinator's settings
    run, max_staleness, window_timeout, min_agents = 'r', -1, 30.0, 2
    start_timeout, start_quorum, window_quorum = 0.0, 0, 0
    max_samples, max_param, max_versions = 10**6, 1e6, 0
    aggregate, clip_norm, clip_median = 'mean', 0.0, 0.0
    round_deadline, deadline_rank, deadline_factor = 0.0, 0, 1.0
    job = job_from_dict({'algo': 'fedavg', 'local_steps': 1})

layers = LayerTable((Layer('w', 0, (3,)),))
coordinator = make_coordinator(Rules(), np.zeros(3, np.float32), layers)
out = []
for name, step in (('a', 1.0), ('b', 3.0)):
    device = make_device(Rules.job, 'r', name, 10, layers)
    params = np.zeros(3, np.float32)
    device.start(0, 1, params)
    hello = Message(Kind.HELLO, 'r', name, 1, 0, {'samples': 10, 'first_window': 1})
    coordinator.on_message(hello, 0.0)
    params += step
    out += device.after_step(params)
for update in out:
    update.seq = 2
    published = coordinator.on_message(update, 1.0)
avg = [m for m in published if m.kind is Kind.AVG][0]
print(coordinator.version, avg.arrays['delta'].tolist())
assert not [m for m in sys.modules if m.split('.')[0] in {'torch', 'cryptography', 'yaml'}]
"""


def test_core_runs_without_torch_cryptography_or_yaml() -> None:
    done = subprocess.run([sys.executable, "-c", BLOCKER + "import sys\n" + CORE_ROUND],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "[2.0,", "2.0,", "2.0]"]


def test_the_readme_architecture_names_every_module() -> None:
    """README's Architecture block lists every module of the package, and no module that is
    not there (its Layout once listed 23 of 39)."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Architecture", 1)[1].split("```", 2)[1]
    named = set(re.findall(r"\b([a-z_]+)\.py\b", block))
    modules = {path.stem for _, path in package_modules() if path.stem != "__init__"}
    assert modules - named == set(), "modules missing from README's Architecture"
    assert named - modules == set(), "README's Architecture names modules that do not exist"


def test_bench_readme_lists_every_script() -> None:
    """bench/README opens with a table of the scripts (it once said "Three scripts" of 17)."""
    text = (ROOT / "bench" / "README.md").read_text()
    table = text.split("| script |", 1)[1].split("\n\n", 1)[0]
    named = set(re.findall(r"`([a-z0-9_]+\.py)`", table))
    assert named == {path.name for path in (ROOT / "bench").glob("*.py")}
