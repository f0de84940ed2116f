"""fl-report: turn run directories (real or simulated) into plots and a Markdown table.

Every run leaves events.jsonl (a record per version: time, bytes, ...; one per evaluation:
accuracy, ...; read through events.py), so a fleet run, a run through slow links and a
simulated run are compared with this one tool:

    fl-report runs/fedavg runs/dga --target 0.95 --baseline fedavg --out report/

writes accuracy_vs_time.png, accuracy_vs_version.png, accuracy_vs_bytes.png (up + down),
accuracy_vs_uplink.png (what compression and the send-less algorithms save), the plots
operators ask for first (loss_vs_version.png, agents_per_version.png: online and
participating, staleness_per_version.png: mean and max) and report.md (time, versions and bytes
to the target accuracy, with ratios to the baseline run).

A run's accuracy is the central test-set one; a run without a central test set is measured by
its federated evaluation (`fed_accuracy`: the agents' validation splits, sample-weighted).
Plots show both where a run has both (federated dotted).

What a reader can trust (issue 20, item 7): the target line is labelled; a time axis says
"virtual time" when it shows simulated runs (events' `simulated`); every x axis starts at 0
(a short run's first version is not the axis's start); a series with the same points as one
drawn before is drawn over it with a larger hollow marker and an offset dash, and its legend
entry says "same points as ...", so neither hides the other.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fleetfl.coordinator.rundir import RunDir
from fleetfl.shared.core.version import add_version_flag

CENTRAL, FEDERATED = "accuracy", "fed_accuracy"
PLOTS = {  # accuracy against: file -> x
    "accuracy_vs_time.png": "time",
    "accuracy_vs_version.png": "version",
    "accuracy_vs_bytes.png": "bytes",
    "accuracy_vs_uplink.png": "uplink",
}
# per version, what operators ask for first
OPERATIONS = ("loss_vs_version.png", "agents_per_version.png", "staleness_per_version.png")
XLABELS = {"version": "global version", "bytes": "bytes sent, up + down (MB)",
           "uplink": "uplink bytes, all agents (MB)"}
MARKERS = "osD^vP*X"  # one per run, in order (colours too)


@dataclass
class Run:
    label: str
    path: Path
    events: list[dict]
    config: dict = field(default_factory=dict)
    simulated: bool = False
    origin: float = 0.0  # subtracted from every time (see --time-origin)
    since: str = "start"  # what time 0 is: "start" (of the coordinator) or "first" (version)

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

    def series(self, metric: str, x: str = "version") -> tuple[list[float], list[float]]:
        """(xs, values) of the versions that logged `metric`; x: `time` (s from the origin),
        `version`, `bytes` (MB, up + down) or `uplink` (MB, up only)."""
        xs, ys = [], []
        for e in self.events:
            if e.get(metric) is None:
                continue
            xs.append(e["time"] - self.origin if x == "time" else e["version"] if x == "version"
                      else e.get("bytes_up_total", 0) / 1e6 if x == "uplink"
                      else (e.get("bytes_up_total", 0) + e.get("bytes_down_total", 0)) / 1e6)
            ys.append(float(e[metric]))
        return xs, ys

    def per_version(self, quantity) -> tuple[list[int], list[float]]:
        """(versions, quantity(event)) over the versions where it is not None."""
        pairs = [(e["version"], quantity(e)) for e in self.events]
        pairs = [(v, q) for v, q in pairs if q is not None]
        return [v for v, _ in pairs], [float(q) for _, q in pairs]


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
        run.origin, run.since = events[0]["time"], "first"
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
        "(> 1: the run gets there sooner or with fewer bytes)."
        + (" Times of sim runs are virtual (simulated) seconds."
           if any(r.simulated for r in runs) else ""),
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


def time_label(runs: list[Run]) -> str:
    """The time axis's label: virtual time for simulated runs (fl-sim's clock), said so."""
    if len({r.since for r in runs}) > 1:
        since = "coordinator start or the first version"
    else:
        since = "the first version" if runs and runs[0].since == "first" else "coordinator start"
    simulated = sum(r.simulated for r in runs)
    if runs and simulated == len(runs):
        return f"virtual time (simulated s since {since})"
    if simulated:
        return f"time (s since {since}; virtual time for the (sim) runs)"
    return f"time (s since {since})"


class _Series:
    """Draws series on one axes so that none hides another: one with the same points as a
    series drawn before gets a larger hollow marker and an offset dash over it, and its
    legend entry says which series it coincides with."""

    def __init__(self, ax) -> None:
        self.ax = ax
        self.seen: dict[tuple, tuple[str, int]] = {}  # points -> (first label, times drawn)

    def draw(self, xs: list[float], ys: list[float], label: str, color: str, marker: str,
             linestyle: str = "-") -> None:
        if not xs:
            return
        style = {"color": color, "marker": marker, "markersize": 4, "linewidth": 1.2,
                 "linestyle": linestyle, "clip_on": False}  # whole markers on an axis at 0
        key = (tuple(xs), tuple(ys))
        if key in self.seen:
            first, times = self.seen[key]
            self.seen[key] = (first, times + 1)
            label = f"{label} (same points as {first})"
            style.update(markersize=4 + 4 * min(times, 3), markerfacecolor="none",
                         markeredgewidth=1.2)
            if linestyle in ("-", "--"):  # dashes between those of the line it matches
                style["linestyle"] = (3 * times, (3, 3))
        else:
            self.seen[key] = (label, 1)
        self.ax.plot(xs, ys, label=label, **style)


def _finish(fig, ax, title: str, integer_y: bool = False, versions: bool = False) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlim(left=0)  # a short run's axis starts at 0, not at its first version
    if versions:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if integer_y:  # counts: 0 just above the x axis, whole numbers, room above the highest
        top = max(max((max(line.get_ydata(), default=0) for line in ax.get_lines()),
                      default=0), 1)
        ax.set_ylim(-0.04 * top, top * 1.12)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    entries = len(ax.get_legend_handles_labels()[0])
    if entries > 4:  # below the plot, where it hides no points
        fig.set_figheight(4.5 + 0.2 * entries)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    elif entries:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "not recorded in these runs", transform=ax.transAxes,
                ha="center", va="center", color="grey")
    fig.tight_layout()


def _staleness(e: dict, how) -> float | None:
    values = list((e.get("staleness") or {}).values())
    return how(values) if values else None


def figures(runs: list[Run], target: float | None = None, title: str = ""
            ) -> dict[str, object]:
    """The report's plots as matplotlib figures (file name -> Figure): the accuracy plots
    (PLOTS) and the per-version ones (OPERATIONS). The caller closes them (plot())."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    look = [(colours[i % len(colours)], MARKERS[i % len(MARKERS)]) for i in range(len(runs))]
    sim = [" (sim)" if r.simulated else "" for r in runs]
    figs: dict[str, object] = {}

    def new(name: str):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        figs[name] = fig
        return fig, ax, _Series(ax)

    for name, key in PLOTS.items():
        _accuracy_figure(new(name), runs, look, sim, key, target, title or
                         name.removesuffix(".png").replace("_", " "))
    _loss_figure(new("loss_vs_version.png"), runs, look, sim, title or "loss per version")

    fig, ax, series = new("agents_per_version.png")
    for r, (colour, marker), s in zip(runs, look, sim, strict=True):
        series.draw(*r.per_version(lambda e: e.get("agents_online")),
                     f"{r.label}{s}: online", colour, marker, "-")
        series.draw(*r.per_version(lambda e: len(e["contributors"]) if "contributors" in e
                                   else None),
                    f"{r.label}{s}: participating", colour, marker, "--")
    ax.set_xlabel(XLABELS["version"])
    ax.set_ylabel("agents (online; participating: update in the average)")
    _finish(fig, ax, title or "agents online and participating per version", integer_y=True,
            versions=True)

    fig, ax, series = new("staleness_per_version.png")
    for r, (colour, marker), s in zip(runs, look, sim, strict=True):
        series.draw(*r.per_version(lambda e: _staleness(e, lambda v: sum(v) / len(v))),
                    f"{r.label}{s}: mean", colour, marker, "-")
        series.draw(*r.per_version(lambda e: _staleness(e, max)),
                    f"{r.label}{s}: max", colour, marker, "--")
    ax.set_xlabel(XLABELS["version"])
    ax.set_ylabel("staleness (versions between an update's base and its version)")
    _finish(fig, ax, title or "staleness per version", integer_y=True, versions=True)
    return figs




def _loss_figure(made: tuple, runs: list[Run], look: list[tuple[str, str]], sim: list[str],
                 title: str) -> None:
    fig, ax, series = made
    for r, (colour, marker), s in zip(runs, look, sim, strict=True):
        for metric, style, suffix in (("loss", "--" if r.simulated else "-", ""),
                                      ("fed_loss", ":", " federated")):
            series.draw(*r.series(metric), f"{r.label}{suffix}{s}", colour, marker, style)
    ax.set_xlabel(XLABELS["version"])
    ax.set_ylabel("loss (test set; federated dotted: agents' validation)")
    _finish(fig, ax, title, versions=True)

def _accuracy_figure(made: tuple, runs: list[Run], look: list[tuple[str, str]],
                     sim: list[str], key: str, target: float | None, title: str) -> None:
    """Accuracy (central and federated) over `key` (version, time, bytes)."""
    fig, ax, series = made
    for r, (colour, marker), s in zip(runs, look, sim, strict=True):
        for metric, style, suffix in ((CENTRAL, "--" if r.simulated else "-", ""),
                                      (FEDERATED, ":", " federated")):
            series.draw(*r.series(metric, key), f"{r.label}{suffix}{s}", colour, marker,
                        style)
    if target:
        ax.axhline(target, color="grey", linewidth=0.8, linestyle=":",
                   label=f"target accuracy {target:g}")
        ax.annotate(f"target {target:g}", (1.0, target), xycoords=("axes fraction", "data"),
                    xytext=(-4, 3), textcoords="offset points", ha="right", va="bottom",
                    fontsize=8, color="grey")
    ax.set_xlabel(time_label(runs) if key == "time" else XLABELS[key])
    ax.set_ylabel("accuracy (test set; federated: agents' validation)")
    _finish(fig, ax, title, versions=key == "version")


def plot(runs: list[Run], out: Path, target: float | None = None, title: str = ""
         ) -> list[Path]:
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figures(runs, target, title).items():
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
    written = plot(runs, out, target, title)
    (out / "report.md").write_text(
        (f"# {title}\n\n" if title else "") + table + "\n"
        + "".join(f"![{p.name}]({p.name})\n" for p in written))
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="fl-report",
        description="Plots (accuracy vs time, versions, bytes, uplink bytes; loss, agents "
                    "online and participating, staleness per version) and a Markdown table of time "
                    "and bytes to a target accuracy, from run directories (events.jsonl).")
    add_version_flag(p)
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
