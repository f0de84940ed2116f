"""events.jsonl: the README's field table is what the coordinator and fl-sim write, both write
the same version records, and files of the previous format (schema 1) still read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fleetfl.coordinator import accounting, events
from fleetfl.coordinator.recorder import StopRule
from fleetfl.coordinator.report import load_run
from fleetfl.coordinator.rundir import RunDir
from fleetfl.coordinator.runner import CoordinatorRunner
from fleetfl.coordinator.simulator import SimConfig, Simulator
from fleetfl.shared.config import load_config
from fleetfl.shared.core.messages import Kind, Message
from fleetfl.shared.devtools.link_proxy import LinkSpec
from fleetfl.shared.net.transport import Incoming
from fleetfl.shared.tasks.task import load_task
from fleetfl.shared.wire.codec import encode

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
METRICS = list(load_task("digits").metrics)  # the task both runs below use
AGENTS = ("a0", "a1")


def documented() -> dict[str, set[str]]:
    """{record type: field names} from the README's table, `<metric>` expanded."""
    start = README.index("## Event log (events.jsonl)")
    section = README[start:README.index("\n## ", start + 3)]
    fields: dict[str, set[str]] = {t: set() for t in events.TYPES}
    for line in section.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) != 4 or not cells[1].startswith("`"):
            continue
        name = cells[1].strip("`")
        names = {name.replace("<metric>", m) for m in METRICS} if "<metric>" in name else {name}
        for kind in events.TYPES if cells[0] == "all" else [cells[0].strip("`")]:
            fields[kind] |= names
    return fields


def real_records(tmp_path: Path) -> list[dict]:
    """A coordinator fed two agents' hellos, updates and federated metrics without a broker,
    through its own handling, recording and evaluation code."""
    cfg = load_config(None, {"run": "schema", "run_dir": str(tmp_path), "task": "digits",
                             "federated_eval": "on", "min_agents": 2,
                             "broker": "mqtt://127.0.0.1:1"})  # never connected
    runner = CoordinatorRunner(cfg)
    runner.journal.open(0)
    runner.link.publish = lambda topic, payload, retain=False: None
    size = runner.layers.size
    for seq, (kind, fields, arrays) in enumerate([
            (Kind.HELLO, {"samples": 10, "first_window": 1, "validation_samples": 5}, {}),
            (Kind.UPDATE, {"window": 1, "samples": 10, "steps": 1},
             {"delta": np.full(size, 0.01, np.float32)})], 1):
        for agent in AGENTS:
            where = "status" if kind is Kind.HELLO else "up"
            msg = Message(kind, "schema", agent, seq, 0, fields, arrays)
            runner._handle(Incoming(f"fl/schema/{where}/{agent}", encode(msg),
                                    kind is Kind.HELLO))
    runner._commit()
    runner._record_results()
    assert runner.evaluator.wait_idle(60)
    for agent in AGENTS:
        runner._on_report(Message(Kind.METRICS, "schema", agent, 3, 1, {
            "version": 1, "samples": 5, "values": {"loss": 1.0, **dict.fromkeys(METRICS, 0.5)}}))
    runner._collect_evaluations(force=True)
    runner.evaluator.close()
    runner.journal.close()
    return RunDir(tmp_path / "schema").records()


def simulated_records(tmp_path: Path) -> list[dict]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(None, {"run": "sim", "min_agents": 2, "max_versions": 2,
                                 "algo": "fedavg", "local_steps": 2})
        Simulator(cfg, SimConfig(agents=2, up=LinkSpec(0.01), down=LinkSpec(0.01)),
                  run_dir=tmp_path / "sim").run()
    finally:
        torch.set_num_threads(before)
    return RunDir(tmp_path / "sim").records()


def by_type(records: list[dict]) -> dict[str, dict]:
    return {r["type"]: r for r in records}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, dict[str, dict]]:
    tmp = tmp_path_factory.mktemp("schema")
    return {"real": by_type(real_records(tmp)), "sim": by_type(simulated_records(tmp))}


def test_the_readme_table_lists_exactly_the_fields_written(written) -> None:
    table = documented()
    real = written["real"]
    assert set(real) == set(events.TYPES)
    for kind in events.TYPES:
        assert set(real[kind]) - table[kind] == set(), f"{kind}: fields missing from README"
        assert table[kind] - set(real[kind]) == set(), f"{kind}: README fields not written"
    assert set(written["sim"][events.EVALUATED]) == table[events.EVALUATED]


def test_simulated_and_real_version_records_have_the_same_fields(written) -> None:
    real, sim = written["real"][events.VERSION], written["sim"][events.VERSION]
    assert set(real) == set(sim)
    assert real["simulated"] is False and sim["simulated"] is True
    assert real["schema"] == sim["schema"] == events.SCHEMA
    assert sorted(u[0] for u in sim["updates"]) == ["agent0", "agent1"]
    assert sorted(u[0] for u in real["updates"]) == sorted(AGENTS)


def test_every_line_says_its_type_and_schema(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.append_event({"version": 1, "time": 0.5})
    run.append_evaluation(1, {"loss": 1.0, "accuracy": 0.5})
    run.append_evaluation(1, {"fed_accuracy": 0.4, "fed_samples": 3})
    lines = [json.loads(line) for line in run.events_path.read_text().splitlines()]
    assert [(r["type"], r["schema"]) for r in lines] == [
        ("version", 2), ("evaluated", 2), ("federated", 2)]
    [folded] = run.events()
    assert (folded["accuracy"], folded["fed_accuracy"], folded["time"]) == (0.5, 0.4, 0.5)


SCHEMA1 = [  # written by fleetfl before the record types
    '{"time":1.0,"wall":1.7e9,"version":1,"window":1,"contributors":["a"],"loss":null,'
    '"accuracy":null,"bytes_up_total":10,"bytes_down_total":10,"updates":[["a",4,1]]}',
    '{"evaluated":1,"loss":0.9,"accuracy":0.7,"eval_seconds":0.1,"eval_done":1.2}',
    '{"evaluated":1,"fed_accuracy":0.6,"fed_samples":9,"fed_agents":1,"fed_missing":0}',
    '{"time":2.0,"wall":1.7e9,"version":2,"window":2,"contributors":["a"],"loss":null,'
    '"accuracy":null,"bytes_up_total":20,"bytes_down_total":20,"updates":[["a",5,2]]}',
]


def test_a_schema_1_file_still_reads(tmp_path: Path) -> None:
    (tmp_path / events.FILE).write_text("\n".join(SCHEMA1) + "\n")
    (tmp_path / "config.yaml").write_text("job: {algo: fedavg}\n")
    records = RunDir(tmp_path).records()
    assert [(r["type"], r["schema"]) for r in records] == [
        ("version", 1), ("evaluated", 1), ("federated", 1), ("version", 1)]
    folded = RunDir(tmp_path).events()
    assert [(e["version"], e["accuracy"], e.get("fed_accuracy")) for e in folded] == [
        (1, 0.7, 0.6), (2, None, None)]
    assert load_run(tmp_path).points()[0]["accuracy"] == 0.7
    assert accounting.check(tmp_path, []).applied == 2
    # a resume of an old run rewrites it tagged, and appends schema 2 lines after it
    run = RunDir(tmp_path)
    run.truncate_events(1)
    run.append_event({"version": 2})
    assert [(r["type"], r["schema"]) for r in run.records()] == [
        ("version", 1), ("evaluated", 1), ("federated", 1), ("version", 2)]


def test_a_newer_schema_is_refused_with_a_message(tmp_path: Path) -> None:
    (tmp_path / events.FILE).write_text('{"type":"version","schema":3,"version":1}\n')
    with pytest.raises(events.EventLogError, match="schema 3, written by a newer fleetfl"):
        RunDir(tmp_path).events()


def test_the_stop_rule() -> None:
    rule = StopRule(max_versions=10, target_accuracy=0.9, eval_every=3)
    assert [v for v in range(1, 11) if rule.due(v)] == [3, 6, 9, 10]
    rule.observe(3, 0.5)
    assert rule.reason(3) is None
    rule.observe(6, 0.95)
    rule.observe(9, 0.97)
    assert rule.reason(9) == "reached target accuracy 0.9 at version 6"
    assert rule.best_accuracy == 0.97
    assert StopRule(10).reason(10) == "reached 10 versions"
