"""bench/time_to_accuracy.py (issue 17, item 5), scaled down: its simulated stage on digits with
4 agents, checked against the runs' own events.jsonl (the target rule, time to target from
version 1, per-seed speed-ups, the pick of the best), and its configurations against
fl-coordinator's parser (the real stage passes them as flags)."""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

import pytest

from fleetfl.coordinator.cli import parse_args as coordinator_args
from fleetfl.coordinator.rundir import RunDir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import time_to_accuracy as tta  # noqa: E402


def _accuracies(path: str) -> list[tuple[float, float]]:
    """(seconds since version 1, accuracy) of every evaluated version."""
    events = sorted(RunDir(path).events(), key=lambda e: e["version"])
    return [(e["time"] - events[0]["time"], e["accuracy"]) for e in events
            if e["accuracy"] is not None]


def _time_to(path: str, target: float) -> float | None:
    return next((t for t, a in _accuracies(path) if a >= target), None)


def test_sim_stage_reads_its_runs_right(tmp_path: Path) -> None:
    out = tmp_path / "out"
    tta.main(["--stage", "sim", "--dataset", "digits", "--agents", "4", "--versions", "5",
              "--seeds", "0,1", "--configs", "fedavg-drop,dga-D20", "--hop-s", "0.01",
              "--work", str(tmp_path / "work"), "--out", str(out)])
    with (out / "digits" / "runs.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["config"], r["seed"]) for r in rows) == sorted(
        (c, s) for c in ("fedavg-wait", "fedavg-drop", "dga-D20") for s in ("0", "1"))
    wait = {r["seed"]: r for r in rows if r["config"] == "fedavg-wait"}
    # the rule: FedAvg-wait's median final accuracy (its last evaluation) minus 1 pt
    finals = [_accuracies(r["path"])[-1][1] for r in wait.values()]
    target = round(statistics.median(finals) - 0.01, 4)
    assert all(float(r["target"]) == target for r in rows)
    ups: dict[str, list[float]] = {}
    for r in rows:
        expected = _time_to(r["path"], target)
        assert (float(r["to_target"]) if r["to_target"] else None) == pytest.approx(expected)
        base = _time_to(wait[r["seed"]]["path"], target)
        if expected and base:
            ups.setdefault(r["config"], []).append(base / expected)
    # a seed whose FedAvg-wait ends below the median - 1 pt has no speed-ups at all
    base_reached = [s for s, r in wait.items() if _time_to(r["path"], target) is not None]
    assert base_reached and ups["fedavg-wait"] == [1.0] * len(base_reached)
    plan = json.loads((out / "digits" / "plan.json").read_text())
    reached_all = {c: statistics.median(v) for c, v in ups.items()
                   if c != "fedavg-wait" and len(v) == 2}
    assert plan["best"] == (max(reached_all, key=reached_all.get) if reached_all else None)
    assert plan["sim_target"] == target
    summary = (out / "digits" / "summary.md").read_text()
    assert set(ups) >= {"fedavg-wait"}
    for config, values in ups.items():
        line = next(x for x in summary.splitlines() if x.startswith(f"| {config} |"))
        assert f"| {tta.median_range(values)}x |" in line
    assert (out / "digits" / "sim" / "accuracy_vs_time.png").stat().st_size > 0


def test_every_configuration_is_valid_coordinator_flags() -> None:
    args = tta.parse_args(["--stage", "summary"])
    assert "fedpmt" in args.configs_all and len(args.configs_all) >= 8
    for name, keys in args.configs_all.items():
        parsed = coordinator_args(tta.flags(keys))
        for key, value in keys.items():
            assert str(getattr(parsed, key)) == str(value), (name, key)
    drop = args.configs_all["fedavg-drop"]["window_timeout"]
    assert drop == pytest.approx((args.deadline_factor - 1) * args.fast_round)
    assert tta.strip(["--a", "1", "--data-dir", "x", "--b", "2"], {"data_dir": 0}) == \
        ["--a", "1", "--b", "2"]
