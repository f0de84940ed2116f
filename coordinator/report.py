"""fl-report: turn run directories (real or simulated) into plots and a Markdown table.

Every run leaves events.jsonl (a record per version: time, bytes, ...; one per evaluation:
accuracy, ...; read through events.py), so a fleet run, a run through slow links and a
simulated run are compared with this one tool:

    fl-report runs/fedavg runs/dga --target 0.95 --baseline fedavg --out report/

writes accuracy_vs_time.png, accuracy_vs_version.png, accuracy_vs_bytes.png and report.md
(time, versions and bytes to the target accuracy, with ratios to the baseline run).

A run's accuracy is the central test-set one; a run without a central test set is measured by
its federated evaluation (`fed_accuracy`: the agents' validation splits, sample-weighted).
Plots show both where a run has both (federated dotted).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fleetfl.coordinator.rundir import RunDir

CENTRAL, FEDERATED = "accuracy", "fed_accuracy"
PLOTS = {
    "accuracy_vs_time.png": ("time", "time (s)"),
    "accuracy_vs_version.png": ("version", "global version"),
    "accuracy_vs_bytes.png": ("bytes", "bytes sent, up + down (MB)"),
}


@dataclass
class Run:
    label: str
    path: Path
    events: list[dict]
    config: dict = field(default_factory=dict)
    simulated: bool = False
    origin: float = 0.0  # subtracted from every time (see --time-origin)

    @property
    def algo(self) -> str:
        return str(self.config.get("job", {}).get("algo", "?"))

    @property
    def measure(self) -> str:
        """The central accuracy if the run has one, else the federated one."""
        return CENTRAL if any(e.get(CENTRAL) is not None for e in self.events) else FEDERATED

    def points(self, metric: str | None = None) -> list[dict]:
        """Evaluated versions (by `metric`, default the run's measure), with time from the
        origin and total bytes."""
        metric = metric or self.measure
        return [{"time": e["time"] - self.origin, "version": e["version"],
                 "bytes": e.get("bytes_up_total", 0) + e.get("bytes_down_total", 0),
                 "accuracy": e[metric]}
                for e in self.events if e.get(metric) is not None]


@dataclass
class Reached:
    time: float
    version: int
    bytes: int


def load_run(path: str | Path, label: str | None = None, origin: str = "start") -> Run:
    if not Path(path).is_dir():  # RunDir would create it
        raise FileNotFoundError(f"{path}: not a run directory")
    events = sorted(RunDir(path).events(), key=lambda e: e["version"])
    if not events:
        raise FileNotFoundError(f"{path}: no events.jsonl with versions")
    config_path = Path(path) / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.exists() else {}
    run = Run(label or Path(path).name, Path(path), events, config or {},
              simulated=(Path(path) / "sim.yaml").exists() or bool(events[0].get("simulated")))
    if origin == "first":  # process start-up differs between real and simulated runs
        run.origin = events[0]["time"]
    return run


def reached(run: Run, target: float) -> Reached | None:
    """The first evaluated version at or above the target accuracy."""
    for p in run.points():
        if p["accuracy"] >= target:
            return Reached(p["time"], p["version"], p["bytes"])
    return None


def _fmt(value: float | None, unit: str = "", digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}{unit}"


def markdown_table(runs: list[Run], target: float, baseline: str | None = None) -> str:
    """One row per run; ratios are baseline / run, so > 1 means the run is better."""
    base = next((r for r in runs if r.label == baseline), runs[0] if runs else None)
    base_hit = reached(base, target) if base else None
    lines = [
        f"Target accuracy {target:g}; ratios are {base.label if base else '-'} / run "
        "(> 1: the run gets there sooner or with fewer bytes).",
        "",
        "| run | algo | kind | versions | best acc | time to target s | versions to target "
        "| MB to target | speed-up (time) | bytes ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        hit = reached(r, target)
        best = max((p["accuracy"] for p in r.points()), default=None)
        speed = bytes_ratio = None
        if hit and base_hit:
            speed = base_hit.time / hit.time if hit.time > 0 else None
            bytes_ratio = base_hit.bytes / hit.bytes if hit.bytes else None
        label = r.label if r.measure == CENTRAL else f"{r.label} (federated)"
        lines.append(
            f"| {label} | {r.algo} | {'sim' if r.simulated else 'real'} "
            f"| {r.events[-1]['version']} | {_fmt(best, digits=4)} "
            f"| {_fmt(hit.time if hit else None)} | {hit.version if hit else 'n/a'} "
            f"| {_fmt(hit.bytes / 1e6 if hit else None, digits=3)} "
            f"| {_fmt(speed, 'x')} | {_fmt(bytes_ratio, 'x')} |")
    return "\n".join(lines) + "\n"


def plot(runs: list[Run], out: Path, target: float | None = None,
         title: str = "") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (key, xlabel) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in runs:
            for metric, style, suffix in ((CENTRAL, "--" if r.simulated else "-", ""),
                                          (FEDERATED, ":", " federated")):
                pts = r.points(metric)
                if not pts:
                    continue
                xs = [p[key] / 1e6 if key == "bytes" else p[key] for p in pts]
                ax.plot(xs, [p["accuracy"] for p in pts], style, marker=".", markersize=4,
                        label=f"{r.label}{suffix}{' (sim)' if r.simulated else ''}")
        if target:
            ax.axhline(target, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy (test set; federated: agents' validation)")
        ax.set_title(title or name.removesuffix(".png").replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)
    return written


def report(paths: list[str | Path], out: Path, target: float, baseline: str | None = None,
           labels: list[str] | None = None, origin: str = "start", title: str = "") -> str:
    labels = labels or []
    runs = [load_run(p, labels[i] if i < len(labels) else None, origin)
            for i, p in enumerate(paths)]
    table = markdown_table(runs, target, baseline)
    plot(runs, out, target, title)
    (out / "report.md").write_text(
        (f"# {title}\n\n" if title else "") + table + "\n"
        + "".join(f"![{n}]({n})\n" for n in PLOTS))
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="fl-report",
        description="Plots (accuracy vs time, versions, bytes) and a Markdown table of time "
                    "and bytes to a target accuracy, from run directories (events.jsonl).")
    p.add_argument("runs", nargs="+", help="run directories (real or simulated)")
    p.add_argument("--out", default="report", help="output folder (default ./report)")
    p.add_argument("--target", type=float, default=0.9, help="target accuracy (default 0.9)")
    p.add_argument("--baseline", help="label of the run ratios refer to (default the first)")
    p.add_argument("--label", action="append", default=[],
                   help="label per run, in order (default: the folder name)")
    p.add_argument("--time-origin", choices=("start", "first"), default="start",
                   help="time from coordinator start, or from the first version "
                        "(hides process start-up)")
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    try:
        table = report(args.runs, Path(args.out), args.target, args.baseline, args.label,
                       args.time_origin, args.title)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"fl-report: error: {exc}", file=sys.stderr)
        return 2
    print(table)
    print(f"plots and report.md in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
