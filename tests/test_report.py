"""fl-report: table figures from known logs, plots written, real and simulated runs together."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetfl.coordinator.report import (
    OPERATIONS,
    PLOTS,
    figures,
    load_run,
    main,
    markdown_table,
    reached,
)
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
    for name in (*PLOTS, *OPERATIONS):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"![{name}]({name})" in (out / "report.md").read_text()
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


# -- issue 20, item 7: plots a reader trusts -------------------------------------------------
def _legend(fig) -> list[str]:
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def _lines(fig) -> dict[str, object]:
    """Legend label -> Line2D of the figure's one axes."""
    return {line.get_label(): line for line in fig.axes[0].get_lines()}


@pytest.fixture
def close_figures():
    import matplotlib.pyplot as plt

    yield
    plt.close("all")


def test_accuracy_plots_label_the_target_and_start_at_zero(runs: list[Path],
                                                            close_figures) -> None:
    figs = figures([load_run(p) for p in runs], target=0.9)
    assert list(figs) == [*PLOTS, *OPERATIONS]
    assert all(len(fig.axes) == 1 for fig in figs.values())
    for name in PLOTS:
        ax = figs[name].axes[0]
        assert _legend(figs[name]) == ["fedavg", "dga (sim)", "target accuracy 0.9"]
        target = _lines(figs[name])["target accuracy 0.9"]
        assert list(target.get_ydata()) == [0.9, 0.9]
        assert [t.get_text() for t in ax.texts] == ["target 0.9"]  # on the line, too
        assert ax.get_xlim()[0] == 0  # fedavg's first version is at 10 s, 100 B
        assert ax.get_ylabel().startswith("accuracy")
    time_ax = figs["accuracy_vs_time.png"].axes[0]
    # a real and a simulated run on one time axis: the label says whose time is virtual
    assert time_ax.get_xlabel() == ("time (s since coordinator start; virtual time for the "
                                    "(sim) runs)")
    assert time_ax.get_xlim()[1] >= 40
    assert list(_lines(figs["accuracy_vs_time.png"])["dga (sim)"].get_xdata()) == [5, 8, 11]
    assert _lines(figs["accuracy_vs_time.png"])["dga (sim)"].get_linestyle() == "--"
    assert figs["accuracy_vs_version.png"].axes[0].get_xlabel() == "global version"
    bytes_line = _lines(figs["accuracy_vs_bytes.png"])["fedavg"]
    assert list(bytes_line.get_xdata()) == [1e-4, 2e-4, 3e-4, 4e-4]  # MB
    uplink = figs["accuracy_vs_uplink.png"].axes[0]  # half of write_run's bytes go up
    assert list(_lines(figs["accuracy_vs_uplink.png"])["fedavg"].get_xdata()) == \
        [0.5e-4, 1e-4, 1.5e-4, 2e-4]
    assert uplink.get_xlabel() == "uplink bytes, all agents (MB)"


def test_a_simulated_run_is_plotted_in_virtual_time(runs: list[Path], close_figures) -> None:
    sim = load_run(runs[1], origin="first")
    ax = figures([sim])["accuracy_vs_time.png"].axes[0]
    assert ax.get_xlabel() == "virtual time (simulated s since the first version)"
    assert ax.get_xlim()[0] == 0
    real = figures([load_run(runs[0])])["accuracy_vs_time.png"].axes[0]
    assert real.get_xlabel() == "time (s since coordinator start)"
    assert "virtual" not in real.get_xlabel()
    assert "Times of sim runs are virtual" in markdown_table([sim], 0.9)
    assert "virtual" not in markdown_table([load_run(runs[0])], 0.9)


def test_a_short_run_s_time_axis_starts_at_zero(tmp_path: Path, close_figures) -> None:
    short = write_run(tmp_path, "short", "fedavg", [(12.5, 0.7, 100), (13.0, 0.8, 200)])
    ax = figures([load_run(short)])["accuracy_vs_time.png"].axes[0]
    left, right = ax.get_xlim()
    assert left == 0 and right >= 13.0


def test_identical_series_do_not_hide_each_other(tmp_path: Path, close_figures) -> None:
    points = [(2.0, 0.5, 100), (4.0, 0.7, 200), (6.0, 0.9, 300)]
    first = write_run(tmp_path, "seed1", "dga", points)
    again = write_run(tmp_path, "seed1-again", "dga", points)
    other = write_run(tmp_path, "other", "dga", [(2.0, 0.4, 100), (4.0, 0.8, 200)])
    figs = figures([load_run(p) for p in (first, again, other)])
    for name in PLOTS:
        assert _legend(figs[name]) == ["seed1", "seed1-again (same points as seed1)", "other"]
        lines = _lines(figs[name])
        over, under = lines["seed1-again (same points as seed1)"], lines["seed1"]
        assert list(over.get_xdata()) == list(under.get_xdata())
        # drawn over it, bigger and hollow, dashed: both stay visible
        assert over.get_markersize() > under.get_markersize()
        assert over.get_markerfacecolor() == "none" and under.get_markerfacecolor() != "none"
        assert over.get_color() != under.get_color() and over.get_marker() != under.get_marker()
        assert over.get_linestyle() == "--" and under.get_linestyle() == "-"
    assert "seed1-again (same points as seed1)" in _legend(figs["loss_vs_version.png"])


def write_ops_run(root: Path, name: str, per_version: list[dict], simulated: bool = False
                  ) -> Path:
    """per_version: agents_online, contributors, staleness and (optional) loss, fed_loss."""
    rundir = RunDir(root / name)
    rundir.write_config({"run": name, "job": {"algo": "dga"}})
    for v, fields in enumerate(per_version, start=1):
        rundir.append_event({"time": 3.0 * v, "version": v, "simulated": simulated,
                             **{k: fields[k] for k in ("agents_online", "contributors",
                                                       "staleness") if k in fields}})
        if "loss" in fields:
            rundir.append_evaluation(v, {"loss": fields["loss"], "accuracy": 0.5})
        if "fed_loss" in fields:
            rundir.append_evaluation(v, {"fed_loss": fields["fed_loss"], "fed_accuracy": 0.4})
    return rundir.path


def test_loss_agents_and_staleness_per_version(tmp_path: Path, close_figures) -> None:
    run = write_ops_run(tmp_path, "ops", [
        {"agents_online": 4, "contributors": ["a", "b", "c"],
         "staleness": {"a": 0, "b": 1, "c": 2}, "loss": 2.0, "fed_loss": 2.2},
        {"agents_online": 4, "contributors": ["a", "b"], "staleness": {"a": 0, "b": 3}},
        {"agents_online": 3, "contributors": ["a", "b", "c"],
         "staleness": {"a": 1, "b": 1, "c": 1}, "loss": 1.0, "fed_loss": 1.3},
    ])
    figs = figures([load_run(run)], target=0.9)

    loss = figs["loss_vs_version.png"]
    assert _legend(loss) == ["ops", "ops federated"]
    lines = _lines(loss)
    assert list(lines["ops"].get_xdata()) == [1, 3] and list(lines["ops"].get_ydata()) == [2, 1]
    assert list(lines["ops federated"].get_ydata()) == [2.2, 1.3]
    assert lines["ops federated"].get_linestyle() == ":"
    assert loss.axes[0].get_xlabel() == "global version"
    assert loss.axes[0].get_ylabel().startswith("loss")
    assert "target" not in " ".join(_legend(loss))  # the accuracy target is not a loss

    agents = figs["agents_per_version.png"]
    assert _legend(agents) == ["ops: online", "ops: participating"]
    lines = _lines(agents)
    assert list(lines["ops: online"].get_ydata()) == [4, 4, 3]
    assert list(lines["ops: participating"].get_ydata()) == [3, 2, 3]
    assert list(lines["ops: participating"].get_xdata()) == [1, 2, 3]
    bottom, top = agents.axes[0].get_ylim()
    assert -0.2 < bottom <= 0 and top > 4 and agents.axes[0].get_xlim()[0] == 0
    assert agents.axes[0].get_ylabel().startswith("agents")

    staleness = figs["staleness_per_version.png"]
    assert _legend(staleness) == ["ops: mean", "ops: max"]
    lines = _lines(staleness)
    assert list(lines["ops: mean"].get_ydata()) == [1.0, 1.5, 1.0]
    assert list(lines["ops: max"].get_ydata()) == [2, 3, 1]
    assert -0.2 < staleness.axes[0].get_ylim()[0] <= 0
    assert "staleness" in staleness.axes[0].get_ylabel()


def test_two_runs_per_version_plots_and_what_was_not_recorded(tmp_path: Path,
                                                              close_figures) -> None:
    same = {"agents_online": 2, "contributors": ["a", "b"], "staleness": {"a": 0, "b": 0}}
    a = write_ops_run(tmp_path, "a", [same, same])
    b = write_ops_run(tmp_path, "b", [same, same], simulated=True)
    figs = figures([load_run(a), load_run(b)])
    agents = figs["agents_per_version.png"]
    # 2 runs x (online, participating); b's equal a's, and a's participating its online
    assert len(agents.axes[0].get_lines()) == 4
    assert _legend(agents) == ["a: online", "a: participating (same points as a: online)",
                               "b (sim): online (same points as a: online)",
                               "b (sim): participating (same points as a: online)"]
    sizes = [line.get_markersize() for line in agents.axes[0].get_lines()]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4  # each one visible around the last
    # events of an older fleetfl without these fields: an empty plot that says so
    old = RunDir(tmp_path / "old")
    old.append_event({"time": 1.0, "version": 1})
    old.append_evaluation(1, {"loss": 1.0, "accuracy": 0.5})
    figs = figures([load_run(old.path)])
    for name in ("agents_per_version.png", "staleness_per_version.png"):
        ax = figs[name].axes[0]
        assert ax.get_lines() == [] and ax.get_legend() is None
        assert [t.get_text() for t in ax.texts] == ["not recorded in these runs"]
