"""bench/bytes_to_accuracy.py's configuration names (issue 17 item 4): a compression composes
with any configuration, the names map to the job keys its docstring says, every one passes the
real config validation, and `--vs-fedavg` measures each run to FedAvg's final accuracy minus
the tolerance (one real fl-sim run of each kind on MNIST)."""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bytes_to_accuracy as bench  # noqa: E402

from fleetfl.coordinator.rundir import RunDir  # noqa: E402
from fleetfl.shared.config import load_config  # noqa: E402


@pytest.mark.parametrize("name, expected", [
    ("fedavg+q8", {"algo": "fedavg", "local_steps": 20, "compress": "q8"}),
    ("fedavg@5+q4", {"algo": "fedavg", "local_steps": 5, "compress": "q4"}),
    ("fedavg+topk", {"algo": "fedavg", "compress": "topk"}),
    ("fedavg+topk@0.005", {"compress": "topk", "topk_density": 0.005}),
    # drpga's rate is the job's default (0.1), not a key of its own
    ("drpga+q8", {"algo": "drpga", "rate": None, "compress": "q8", "eval_every": 5}),
    ("drpga-0.05+q4", {"algo": "drpga", "rate": 0.05, "compress": "q4"}),
    ("drpga@0.02+q4", {"algo": "drpga", "rate": 0.02, "compress": "q4"}),
    ("fda-linear+q4", {"algo": "fda", "fda_variant": "linear", "compress": "q4"}),
    ("fda-linear@120+q8", {"fda_theta": 120.0, "compress": "q8"}),
    ("fedbuff+topk@0.01", {"algo": "fedbuff", "period": 20, "compress": "topk",
                           "topk_density": 0.01}),
    ("fedbuff@4", {"algo": "fedbuff", "buffer": 4}),
    ("lbgm@0.95+q8", {"algo": "lbgm", "lbgm_threshold": 0.95, "compress": "q8"}),
])
def test_names_compose_with_a_compression(name: str, expected: dict) -> None:
    keys = bench.job_keys(name)
    assert {k: keys.get(k) for k in expected} == expected
    assert ("compress" in keys) == ("+" in name)
    assert ("topk_density" in keys) == ("topk@" in name)  # else the job's default 0.01
    cfg = load_config(None, {**keys, "run": "r", "task": "mnist"})  # validates, as a run does
    assert (cfg.job.compress.value if cfg.job.compress else None) == keys.get("compress")
    assert isinstance(keys.get("buffer", 0), int) and isinstance(keys.get("local_steps", 1), int)


@pytest.mark.parametrize("name", ["fedavg+q3", "fedavg+q8@0.1", "fedavg+topk@0",
                                  "fedavg+topk@1.5", "fedavg+topk@x", "nope+q8", "fedavg@x",
                                  "dga@3", "fedavg+"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(SystemExit, match="configuration"):
        bench.job_keys(name)


def test_the_docstring_names_only_what_parses(capsys) -> None:
    """Every configuration and flag the docstring (also --help) names is one the code takes."""
    doc = bench.__doc__
    names = re.findall(r"`([a-z+][a-z0-9.@+-]*)`", doc)
    examples = re.findall(r"--algos ([\w.@+-]+,[\w.@+,-]+)", doc)  # the usage lines
    names += [n for line in examples for n in line.split(",")]
    assert {"fedavg+q4", "+topk@0.005", "lbgm@0.95+q8", "fedbuff@4"} <= set(names)
    for name in names:
        bench.job_keys(f"fedavg{name}" if name.startswith("+") else name)
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    usage = capsys.readouterr().out
    for flag in set(re.findall(r"(--[a-z][a-z-]+)", doc)):
        assert f"{flag} " in usage.split("options:")[1] or flag == "--compress", flag


def test_paths_carry_neither_at_nor_plus() -> None:
    assert bench.run_name("mnist", "drpga-0.05+topk@0.01", 2) == "mnist-drpga-0.05_topk_0.01-s2"


def events(points: list[tuple[float | None, int]]) -> list[dict]:
    """(accuracy or None, uplink bytes of that version) -> folded events, one per version."""
    out, up = [], 0
    for v, (acc, nbytes) in enumerate(points, start=1):
        up += nbytes
        out.append({"version": v, "accuracy": acc, "bytes_up_total": up, "up_model": up,
                    "up_control": 0, "bytes_down_total": 2 * up, "local_steps": 10,
                    "contributors": ["a", "b"]})
    return out


def test_counts_stop_at_the_first_evaluation_at_the_target() -> None:
    run = events([(0.5, 100), (None, 100), (0.91, 100), (0.88, 100), (0.95, 100)])
    r = bench.summarise("x", 0, run, 0.9, 1.0)
    assert (r.reached, r.versions, r.up, r.down, r.local_steps) == (True, 3, 300, 600, 30)
    assert (r.accuracy, r.best) == (0.95, 0.95)  # final: where the run stopped
    assert r.kb_per_update == 300 / 6 / 1e3
    missed = bench.summarise("x", 0, run, 0.99, 1.0)
    assert (missed.reached, missed.versions, missed.up, missed.best) == (False, 5, 500, 0.95)


def test_vs_fedavg_targets_fedavg_final_minus_tolerance(tmp_path: Path, shared_data_dir: Path,
                                                        capsys) -> None:
    """Real fl-sim runs: FedAvg runs its N versions first, and the compressed run is
    measured to that seed's FedAvg accuracy minus 0.5 pt, with q4's eighth of the bytes."""
    out = tmp_path / "runs.csv"
    assert bench.main(["--datasets", "mnist", "--data-dir", str(shared_data_dir),
                       "--vs-fedavg", "2", "--agents", "2", "--seeds", "0", "--max-steps",
                       "60", "--algos", "fedavg+q4", "--keep", str(tmp_path / "k"),
                       "--csv", str(out), "--plot", str(tmp_path / "p")]) == 0
    rows = {r["name"]: r for r in csv.DictReader(out.open())}
    fedavg, q4 = rows["fedavg"], rows["fedavg+q4"]
    runs = tmp_path / "k" / "runs"
    final = [e["accuracy"] for e in RunDir(runs / "mnist-fedavg-s0").events()
             if e.get("accuracy") is not None][-1]
    assert float(fedavg["target"]) == pytest.approx(final - 0.005)
    assert float(q4["target"]) == float(fedavg["target"])
    assert fedavg["reached"] == "True"
    per_version = {n: int(r["up"]) / int(r["versions"]) for n, r in rows.items()}
    assert 0.1 < per_version["fedavg+q4"] / per_version["fedavg"] < 0.14  # 4 bits of 32
    assert float(q4["up_pct_of_fedavg"]) == pytest.approx(100 * int(q4["up"]) / int(fedavg["up"]))
    table = capsys.readouterr().out
    assert "FedAvg H=20's accuracy after 2 versions minus 0.5 pt" in table
    assert "| fedavg+q4 |" in table and "% of FedAvg up" in table
    assert (tmp_path / "p" / "accuracy_vs_uplink_mnist.png").read_bytes()[:4] == b"\x89PNG"
