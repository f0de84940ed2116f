"""The README states keys, kinds and a task file; these tests hold it to the code."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from fleetfl.shared.config import AgentConfig, JobConfig, RunConfig
from fleetfl.shared.core.messages import Kind

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 3)
    return README[start:end if end > 0 else None]


def _table_keys() -> set[str]:
    keys = set()
    for line in _section("Configuration").splitlines():
        if line.startswith("| `"):
            keys |= set(re.findall(r"`([a-z_.]+)`", line.split("|")[1]))
    return keys


def test_the_config_table_lists_exactly_the_config_keys():
    run_keys = {f.name for f in dataclasses.fields(RunConfig)} - {"job"}
    job_keys = {f"job.{f.name}" for f in dataclasses.fields(JobConfig)}
    documented = _table_keys()
    assert documented - (run_keys | job_keys) == set(), "README documents keys the code lacks"
    assert (run_keys | job_keys) - documented == set(), "keys missing from the README table"


def test_the_agent_keys_paragraph_names_every_agent_key():
    start = README.index("Agent keys (`fl-agent --config agent.yaml`")
    paragraph = README[start:README.index("\n\n", start)]
    named = set(re.findall(r"`([a-z_]+)`", paragraph))
    assert {f.name for f in dataclasses.fields(AgentConfig)} - named == set()


def test_the_wire_section_names_every_message_kind():
    wire = _section("Wire contract and robustness")
    named = set(re.findall(r"`([a-z_]+)`", wire))
    assert {k.value for k in Kind} - named == set()


def test_the_task_shown_in_the_readme_is_the_example_file():
    block = _section("Your model, your data: tasks").split("```python\n", 1)[1].split("```")[0]
    assert block == (ROOT / "examples" / "sensor_csv" / "cancer_task.py").read_text()
    assert len(block.splitlines()) < 60
