"""fl-report: table figures from known logs, plots written, real and simulated runs together."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetfl.coordinator.report import load_run, main, markdown_table, reached
from fleetfl.coordinator.rundir import RunDir


def write_run(root: Path, name: str, algo: str, points: list[tuple[float, float, int]],
              simulated: bool = False) -> Path:
    """points: (time, accuracy, total bytes) per version."""
    rundir = RunDir(root / name)
    rundir.write_config({"run": name, "job": {"algo": algo}})
    for v, (t, acc, nbytes) in enumerate(points, start=1):
        rundir.append_event({"time": t, "version": v, "bytes_up_total": nbytes // 2,
                             "bytes_down_total": nbytes // 2, "simulated": simulated})
        rundir.append_evaluation(v, {"loss": 1.0, "accuracy": acc})
    return rundir.path


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    slow = write_run(tmp_path, "fedavg", "fedavg",
                     [(10, 0.5, 100), (20, 0.8, 200), (30, 0.91, 300), (40, 0.95, 400)])
    fast = write_run(tmp_path, "dga", "dga",
                     [(5, 0.6, 100), (8, 0.92, 200), (11, 0.96, 300)], simulated=True)
    return [slow, fast]


def test_time_and_bytes_to_target(runs: list[Path]) -> None:
    fedavg, dga = load_run(runs[0]), load_run(runs[1])
    assert reached(fedavg, 0.9).time == 30 and reached(fedavg, 0.9).bytes == 300
    assert reached(dga, 0.9).version == 2
    assert reached(dga, 0.99) is None
    assert dga.simulated and not fedavg.simulated
    # Time from the first version hides start-up: 8 - 5.
    assert reached(load_run(runs[1], origin="first"), 0.9).time == 3


def test_markdown_table_ratios(runs: list[Path]) -> None:
    table = markdown_table([load_run(p) for p in runs], 0.9, baseline="fedavg")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in table.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["fedavg"][8] == "1.00x"
    assert rows["dga"][5] == "8.00" and rows["dga"][8] == "3.75x"  # 30 s / 8 s
    assert rows["dga"][9] == "1.50x"  # 300 B / 200 B
    assert rows["dga"][2] == "sim"
    no_hit = markdown_table([load_run(p) for p in runs], 0.99)
    assert "n/a" in no_hit


def test_cli_writes_plots_and_report(runs: list[Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main([*map(str, runs), "--target", "0.9", "--baseline", "FedAvg", "--out",
                 str(out), "--label", "FedAvg", "--label", "DGA"]) == 0
    assert "| DGA | dga | sim |" in capsys.readouterr().out
    code = main([*map(str, runs), "--target", "0.9", "--out", str(out), "--title", "t"])
    assert code == 0
    for name in ("accuracy_vs_time.png", "accuracy_vs_version.png", "accuracy_vs_bytes.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "| dga |" in (out / "report.md").read_text()
    assert "speed-up" in capsys.readouterr().out
    assert main([str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_a_run_without_a_test_set_is_measured_by_federated_evaluation(tmp_path: Path) -> None:
    rundir = RunDir(tmp_path / "sensors")
    rundir.write_config({"run": "sensors", "job": {"algo": "fedavg"}})
    for v, (t, acc) in enumerate([(2.0, 0.6), (4.0, 0.85), (6.0, 0.93)], start=1):
        rundir.append_event({"time": t, "version": v, "bytes_up_total": 100 * v,
                             "bytes_down_total": 100 * v})
        rundir.append_evaluation(v, {"fed_accuracy": acc, "fed_loss": 1 - acc,
                                     "fed_samples": 400})
    run = load_run(rundir.path)
    assert run.measure == "fed_accuracy"
    assert reached(run, 0.9).version == 3 and reached(run, 0.9).time == 6.0
    assert "| sensors (federated) | fedavg | real | 3 | 0.9300 |" in markdown_table([run], 0.9)
    out = tmp_path / "out"
    assert main([str(rundir.path), "--out", str(out)]) == 0
    assert (out / "accuracy_vs_version.png").stat().st_size > 1000
