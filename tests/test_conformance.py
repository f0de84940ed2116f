"""Issue 18 item 4: fl-conformance walks a device through PROTOCOL.md over a real broker. The
Python agent passes it, so does the Node.js client of examples/node_client (written from the
spec alone, in both protocol versions), and a deliberately broken device fails the row of the
rule it breaks (one ignoring participant selection's assign: in every timing). The README's
commands use flags that exist."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fleetfl.agent import cli as agent_cli
from fleetfl.coordinator import conformance
from fleetfl.shared.core.messages import PROTOCOL_VERSION, PROTOCOL_VERSIONS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
NODE_DIR = ROOT / "examples" / "node_client"
BIN = Path(sys.executable).parent  # the venv's console scripts
AGENT = f"{BIN / 'fl-agent'} --broker {{broker}} --run {{run}} --agent-id {{id}} " \
        "--state-dir {state}"
NODE = f"node {NODE_DIR / 'client.js'} --broker {{broker}} --run {{run}} --id {{id}} " \
       "--state-dir {state}"
# every step of the first timing's walk, and the stop; the later timings' short walk
FULL_STEPS = [name for name, _ in conformance.FULL] + ["stop"]
SHORT_STEPS = [name for name, _ in conformance.SHORT] + ["stop"]
SELECTION = conformance.SELECTION[0]


@pytest.fixture(scope="session")
def node() -> str:
    """node, with the client's pinned packages installed (npm ci on a fresh clone)."""
    found = shutil.which("node")
    if found is None or shutil.which("npm") is None:
        pytest.skip("node or npm is not installed: the Node.js client cannot run")
    if not (NODE_DIR / "node_modules" / "mqtt").is_dir():
        done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"npm ci failed:\n{done.stderr[-2000:]}"
    return found


def results(rows: list[conformance.Row]) -> dict[str, tuple[str, str]]:
    """step (timing label removed) -> (result, detail)."""
    return {re.sub(r" \[\w+\]$", "", r.step): (r.result, r.detail) for r in rows}


def assert_all_pass(rows: list[conformance.Row]) -> None:
    got = results(rows)
    assert list(got) == FULL_STEPS, got
    failed = {step: detail for step, (result, detail) in got.items() if result != "PASS"}
    assert not failed, failed


def test_the_python_agent_passes(broker, tmp_path: Path) -> None:
    rows = conformance.check(AGENT, broker, ("round",), workdir=tmp_path)
    assert_all_pass(rows)
    assert f"layout {PROTOCOL_VERSION}" in results(rows)["join"][1]


@pytest.mark.parametrize("protocol", PROTOCOL_VERSIONS)
def test_the_node_client_passes(node: str, broker, tmp_path: Path, protocol: int) -> None:
    rows = conformance.check(NODE, broker, ("round", "delayed", "fda"), protocol=protocol,
                             workdir=tmp_path)
    got = results(rows)
    assert_all_pass(rows[:len(FULL_STEPS)])
    assert [r.step for r in rows[len(FULL_STEPS):]] == [
        f"{step} [{timing}]" for timing in ("delayed", "fda") for step in SHORT_STEPS]
    assert all(r.result == "PASS" for r in rows), got
    assert f"layout {protocol}" in got["join"][1]


@pytest.mark.parametrize("fault, step, says", [
    ("samples", "rounds", "claims 101 samples; its hello 100"),
    ("any_run", "ignores bad messages", "while it had to wait for the average"),
    # an avg on down/ctl (section 3.2): applied, its marker version shows in the next update
    ("any_topic", "ignores bad messages", "while it had to wait for the average"),
])
def test_a_broken_device_fails_the_row_of_its_rule(node: str, broker, tmp_path: Path,
                                                   monkeypatch, fault: str, step: str,
                                                   says: str) -> None:
    monkeypatch.setenv("FLEETFL_NODE_FAULT", fault)  # the device processes inherit it
    got = results(conformance.check(NODE, broker, ("round",), workdir=tmp_path))
    result, detail = got[step]
    assert result == "FAIL" and says in detail, got
    before = FULL_STEPS[:FULL_STEPS.index(step)]
    assert all(got[s][0] == "PASS" for s in before), got
    after = FULL_STEPS[FULL_STEPS.index(step) + 1:-1]
    assert all(got[s][0] == "SKIP" for s in after), got
    assert got["stop"][0] == "PASS"  # the broken device still stops cleanly


def test_a_device_ignoring_assign_fails_the_selection_row_of_every_timing(
        node: str, broker, tmp_path: Path, monkeypatch) -> None:
    # it trains the windows it is told to sit out (FDA: its states give it away first)
    monkeypatch.setenv("FLEETFL_NODE_FAULT", "no_assign")
    rows = conformance.check(NODE, broker, ("round", "delayed", "fda"), workdir=tmp_path)
    got = {r.step: (r.result, r.detail) for r in rows}
    # each walk: PASS up to the selection row, FAIL there, SKIP after it, the stop PASS
    walk = [FULL_STEPS] + [SHORT_STEPS] * 2
    assert [r.result for r in rows] == [
        "FAIL" if step == SELECTION else "SKIP" if i > steps.index(SELECTION)
        and step != "stop" else "PASS" for steps in walk for i, step in enumerate(steps)], got
    for timing in ("round", "delayed"):
        assert "sent an update for window 5, which an assign told it to sit out" \
            in got[f"{SELECTION} [{timing}]"][1], got
    assert "sent an fda_state in window 5, which an assign told it to sit out" \
        in got[f"{SELECTION} [fda]"][1], got


def test_the_command_line_prints_json_and_skips_what_a_given_broker_prevents(
        node: str, broker, tmp_path: Path, capsys) -> None:
    # in this process (torch is imported once); test_version.py runs the console script
    code = conformance.main(["--device", NODE, "--broker", broker.url, "--json",
                             "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    got = {re.sub(r" \[\w+\]$", "", r["step"]): r["result"] for r in json.loads(out)}
    assert got.pop("broker restart") == got.pop("MQTT settings") == "SKIP"
    assert set(got.values()) == {"PASS"}, out
    assert code == 0


def test_the_node_client_reads_every_golden_vector(node: str) -> None:
    done = subprocess.run([node, str(NODE_DIR / "golden.js")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout[-3000:]
    checked = int(re.search(r"(\d+) golden vectors, 0 mismatches", done.stdout).group(1))
    assert checked > 100


# -- the README's commands -------------------------------------------------------------------
def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Conformance")
    section = text[start:text.find("\n## ", start + 3)]
    return [line.strip() for line in section.splitlines()
            if line.strip().startswith("fl-conformance ")]


def _flags(command: str) -> list[str]:
    return re.findall(r"(?<![\w-])--[a-z][a-z-]*", command)


def test_the_readme_commands_use_flags_that_exist() -> None:
    commands = _readme_commands()
    assert len(commands) >= 2
    ours = {s for a in conformance.build_parser()._actions for s in a.option_strings}
    agent = {s for a in agent_cli.build_parser()._actions for s in a.option_strings}
    client = set(re.findall(r"([a-z-]+)'?: ", (NODE_DIR / "client.js").read_text()
                            .split("const opts = {", 1)[1].split("};", 1)[0]))
    for command in commands:
        device = re.search(r'--device "([^"]+)"', command).group(1)
        outer = command.replace(device, "")
        assert set(_flags(outer)) <= ours, outer
        known = agent if device.startswith("fl-agent") else {f"--{k}" for k in client}
        assert set(_flags(device)) <= known, device
        assert {"{broker}", "{run}", "{id}"} <= set(re.findall(r"\{\w+\}", device))


def test_the_node_readme_lists_every_fault_of_the_client() -> None:
    documented = re.search(r"FLEETFL_NODE_FAULT=([a-z_|]+)",
                           (NODE_DIR / "README.md").read_text()).group(1).split("|")
    used = re.findall(r"FAULT [!=]== '(\w+)'", (NODE_DIR / "client.js").read_text())
    assert sorted(documented) == sorted(set(used))
