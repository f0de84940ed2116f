"""Load: 1,000 lightweight agents against one Mosquitto and one real fl-coordinator.

What runs (all real processes on this host, real MQTT over loopback TCP):
- one Mosquitto (shared/devtools/local_broker.py: `max_queued_messages 0`, i.e. unlimited,
  instead of Mosquitto's default 1000 that silently drops QoS 1 messages for a slow subscriber);
- one `fl-coordinator` (FedAvg on digits, the default MLP: 4,810 float32 parameters, so an
  UPDATE is ~19 KB and an AVG ~19 KB plus its contributors list), with `--metrics-port` so its
  counters can be read live;
- `--procs` processes of bench/light_agent.py, each holding `agents / procs` MQTT clients
  (one connection, client id and retained hello per simulated agent) on one selector thread;
  they speak the real protocol through the real codec, without torch.

Presets:
- `all` (default): every round waits for all agents (`--window-timeout 120`, `--min-agents`
  = all); compute time per window uniform 0.05-0.15 s.
- `deadline`: a window closes `--window-timeout 1.5` s after its first update; 5 % of the
  (agent, window) pairs are stragglers (2-4 s of compute), so some updates arrive after their
  window closed and are refused, and some work is discarded when the average comes first.

Measured:
- updates/s: updates applied in versions 2..V over the wall time from version 1 to V;
- publish -> inclusion, two ways: (a) the coordinator's events.jsonl `wall` of the version
  that lists the update as a contributor minus the sender's `time.time()` just before
  `publish()` (both CLOCK_REALTIME on one host; `wall` is taken after that version was
  averaged, its AVG handed to paho and the model evaluated, before the checkpoint); (b) the
  AVG's arrival at the sender (paho read callback) minus the publish, both `time.monotonic()`
  in the sender process (includes the broker's fan-out of the AVG to every agent);
- coordinator RSS (/proc VmRSS) when it is up (before any agent), at versions 1, V/2 and V,
  its peak (VmHWM) and at the end; the growth from V/4 to V per 100 versions; Mosquitto's too;
- CPU seconds of the coordinator, Mosquitto and the sender processes over the run;
- accounting: every update the senders published (and the broker acknowledged) is either
  applied (listed in a version's contributors), refused with a counted reason (the
  coordinator's live rejected counters), or pending in the coordinator's open window when it
  is stopped; the rest is "unexplained" and must be 0.

The senders stop after window V; the bench then waits until the coordinator has processed
every update (accepted + refused = sent), reads its counters and stops it with SIGTERM.

Run: `.venv/bin/python bench/load_agents.py [--preset all|deadline] [--agents 1000]
[--procs 4] [--versions 60] [--profile]`; results in bench/results/load/.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path

from fleetfl.coordinator.rundir import RunDir
from fleetfl.shared.devtools.local_broker import LocalMosquitto, free_port

BENCH = Path(__file__).resolve().parent
RUN = "load"
PRESETS = {
    "all": {"window_timeout": 120.0, "compute": 0.1, "straggler_frac": 0.0},
    "deadline": {"window_timeout": 1.5, "compute": 0.1, "straggler_frac": 0.05,
                 "straggler_lo": 2.0, "straggler_hi": 4.0},
}


@dataclass
class LoadConfig:
    agents: int = 1000
    procs: int = 4
    versions: int = 60
    window_timeout: float = 120.0
    compute: float = 0.1
    straggler_frac: float = 0.0
    straggler_lo: float = 2.0
    straggler_hi: float = 4.0
    local_steps: int = 20
    eval_every: int = 1
    seed: int = 0
    timeout: float = 1200.0  # the whole run
    settle: float = 60.0  # after the senders: until every update is processed
    profile: str = ""  # cProfile output of the coordinator's main thread
    # Mosquitto's max_inflight_messages (0: its default of 20): unacknowledged QoS 1 messages
    # it sends to one client, the coordinator included, before waiting for PUBACKs
    broker_inflight: int = 0
    coordinator_flags: list[str] = field(default_factory=list)


class LoadBroker(LocalMosquitto):
    """LocalMosquitto, optionally with another max_inflight_messages."""

    def __init__(self, inflight: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.inflight = inflight

    def _write_config(self) -> Path:
        conf = super()._write_config()
        if self.inflight:
            with conf.open("a") as f:
                f.write(f"max_inflight_messages {self.inflight}\n")
        return conf


# -- /proc ------------------------------------------------------------------------------------
def _status_kb(pid: int, name: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(name):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _cpu_s(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds per thread (tid == pid is the main thread)."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


class Sampler(threading.Thread):
    """Every `every` s: wall time, VmRSS (KiB) of the coordinator and the broker."""

    def __init__(self, pids: dict[str, int], every: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pids, self.every = pids, every
        self.samples: list[tuple[float, dict[str, int | None]]] = []
        self.stop = threading.Event()

    def take(self) -> dict[str, int | None]:
        sample = {name: _status_kb(pid, "VmRSS:") for name, pid in self.pids.items()}
        self.samples.append((time.time(), sample))
        return sample

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.take()

    def at(self, wall: float, name: str) -> int | None:
        """The first sample at or after `wall` (the last one if none)."""
        for t, sample in self.samples:
            if t >= wall and sample.get(name) is not None:
                return sample[name]
        values = [s[name] for _, s in self.samples if s.get(name) is not None]
        return values[-1] if values else None

    def peak(self, name: str, start: float = 0.0, end: float = float("inf")) -> int | None:
        """Largest sample taken between `start` and `end` (wall)."""
        values = [s[name] for t, s in self.samples
                  if s.get(name) is not None and start <= t <= end]
        return max(values) if values else None


def metrics(port: int) -> dict:
    """The coordinator's counters: version, accepted, averaged, rejected by reason."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {"version": 0, "accepted": 0, "averaged": 0, "rejected": {}}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "fleetfl_version":
                out["version"] = int(s.value)
            elif s.name == "fleetfl_updates_accepted_total":
                out["accepted"] = int(s.value)
            elif s.name == "fleetfl_updates_averaged_total":
                out["averaged"] = int(s.value)
            elif s.name == "fleetfl_messages_rejected_total" and s.value:
                out["rejected"][s.labels["reason"]] = int(s.value)
    return out


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def _spread(values: list[float]) -> dict:
    """p50, p90, p99, max and n of `values` (seconds, 4 decimals)."""
    r4 = lambda x: None if x is None else round(x, 4)  # noqa: E731
    return {"p50": r4(_pct(values, 50)), "p90": r4(_pct(values, 90)),
            "p99": r4(_pct(values, 99)), "max": r4(max(values, default=None)),
            "n": len(values)}


def _wait_metrics(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the coordinator exited while starting")
        try:
            metrics(port)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the coordinator's metrics endpoint did not answer")


# -- the run ------------------------------------------------------------------------------------
def run_load(cfg: LoadConfig, work: Path, log=print) -> dict:  # noqa: C901 - one linear run
    """One load run in `work`; returns the figures (see analyse())."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = cfg.agents + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < need:
        raise RuntimeError(f"open-file limit {soft} < {need}: Mosquitto needs one descriptor "
                           "per agent (raise `ulimit -n`)")
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # max_queued_messages 0: unlimited; the broker inherits our RLIMIT_NOFILE
    with LoadBroker(cfg.broker_inflight, max_queued_messages=0) as broker:
        coord_args = ["--broker", broker.url, "--run", RUN, "--run-dir", str(work / "runs"),
                      "--algo", "fedavg", "--dataset", "digits",
                      "--local-steps", str(cfg.local_steps),
                      "--min-agents", str(cfg.agents),
                      "--window-timeout", str(cfg.window_timeout),
                      "--max-versions", str(cfg.versions + 100_000),  # stopped by us
                      "--eval-every", str(cfg.eval_every), "--seed", str(cfg.seed),
                      "--metrics-port", str(port), *cfg.coordinator_flags]
        prof = ["-m", "cProfile", "-o", cfg.profile] if cfg.profile else []
        with open(logs / "coordinator.log", "wb") as out:
            coord = subprocess.Popen([sys.executable, *prof, "-m", "fleetfl.coordinator.cli",
                                      *coord_args], stdout=out, stderr=out, env=env,
                                     start_new_session=True)
        senders: list[subprocess.Popen] = []
        try:
            _wait_metrics(port, coord, 120)
            sampler = Sampler({"coordinator": coord.pid, "mosquitto": broker.pid})
            start = sampler.take()
            sampler.start()
            cpu0 = {"coordinator": _cpu_s(coord.pid), "mosquitto": _cpu_s(broker.pid)}
            threads0 = _thread_cpu_s(coord.pid)
            log(f"coordinator up (RSS {start['coordinator'] / 1024:.0f} MiB); starting "
                f"{cfg.agents} agents in {cfg.procs} processes")
            t0 = time.time()
            load_before = os.getloadavg()[0]
            per = [cfg.agents // cfg.procs + (i < cfg.agents % cfg.procs)
                   for i in range(cfg.procs)]
            first = 0
            for i, count in enumerate(per):
                cmd = [sys.executable, str(BENCH / "light_agent.py"), "--broker", broker.url,
                       "--run", RUN, "--first", str(first), "--count", str(count),
                       "--windows", str(cfg.versions), "--compute", str(cfg.compute),
                       "--straggler-frac", str(cfg.straggler_frac),
                       "--straggler-lo", str(cfg.straggler_lo),
                       "--straggler-hi", str(cfg.straggler_hi), "--seed", str(cfg.seed),
                       "--timeout", str(cfg.timeout), "--out", str(work / f"senders{i}.json")]
                with open(logs / f"senders{i}.log", "wb") as out:
                    senders.append(subprocess.Popen(cmd, stdout=out, stderr=out, env=env,
                                                    start_new_session=True))
                first += count
            deadline = time.monotonic() + cfg.timeout + 60
            last_print = 0.0
            while any(p.poll() is None for p in senders):
                failed = [i for i, p in enumerate(senders) if p.poll() not in (None, 0)]
                if failed:  # its agents never send: every window would wait for them
                    raise RuntimeError(f"sender process {failed[0]} failed:\n" + (
                        logs / f"senders{failed[0]}.log").read_text()[-3000:])
                if coord.poll() is not None:
                    raise RuntimeError("the coordinator exited during the run:\n"
                                       + (logs / "coordinator.log").read_text()[-3000:])
                if time.monotonic() > deadline:
                    raise RuntimeError("the senders did not finish in time")
                if time.monotonic() - last_print > 15:
                    last_print = time.monotonic()
                    m = metrics(port)
                    rss = sampler.samples[-1][1]
                    log(f"  {time.time() - t0:6.0f} s: version {m['version']}, "
                        f"{m['averaged']} updates applied, coordinator RSS "
                        f"{(rss['coordinator'] or 0) / 1024:.0f} MiB, mosquitto "
                        f"{(rss['mosquitto'] or 0) / 1024:.0f} MiB")
                time.sleep(0.5)
            reports = [json.loads((work / f"senders{i}.json").read_text())
                       for i in range(cfg.procs)]
            sent = sum(len(r["updates"]) for r in reports)
            # settle: until the coordinator has processed every update it was sent
            settle_until = time.monotonic() + cfg.settle
            while True:
                m = metrics(port)
                processed = m["accepted"] + sum(m["rejected"].values())
                if (processed >= sent and m["accepted"] == m["averaged"]) \
                        or time.monotonic() > settle_until:
                    break
                time.sleep(0.5)
            end = sampler.take()
            load = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
            hwm = {"coordinator": _status_kb(coord.pid, "VmHWM:"),
                   "mosquitto": _status_kb(broker.pid, "VmHWM:")}
            cpu = {"coordinator": _cpu_s(coord.pid) - cpu0["coordinator"],
                   "mosquitto": _cpu_s(broker.pid) - cpu0["mosquitto"]}
            # main thread (decode, state machine, journal, events) vs the others (paho's
            # network thread reads and parses every packet; evaluation, metrics)
            threads = {tid: t - threads0.get(tid, 0.0)
                       for tid, t in _thread_cpu_s(coord.pid).items()}
            cpu["coordinator_main_thread"] = threads.pop(coord.pid, 0.0)
            cpu["coordinator_other_threads"] = sorted((round(t, 1) for t in threads.values()),
                                                      reverse=True)
            sampler.stop.set()
            coord.send_signal(signal.SIGTERM)
            coord.wait(timeout=60)
        finally:
            for p in [*senders, coord]:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        events = RunDir(work / "runs" / RUN).events()  # one dict per version
        coord_log = (logs / "coordinator.log").read_text(errors="replace")
    res = analyse(cfg, events, reports, m, sampler, start, end, hwm, cpu, coord_log)
    res["host"] = {"cpus": os.cpu_count(), "loadavg_1min": load}
    res["code"] = _code_state()
    return res


def _code_state() -> dict:
    """The commit measured and the files that differed from it (a shared working tree)."""
    root = BENCH.parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                  text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = [line[3:] for line in git("status", "--porcelain").splitlines()
               if line[3:].startswith(("agent/", "coordinator/", "shared/"))]
    return {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted": changed,
            "pythonpath": os.environ.get("PYTHONPATH", "")}


def analyse(cfg: LoadConfig, events: list[dict], reports: list[dict], final: dict,
            sampler: Sampler, start: dict, end: dict, hwm: dict, cpu: dict,
            coord_log: str) -> dict:
    by_window = {e["window"]: e for e in events}
    applied_ids = {(a, e["window"]) for e in events for a in e["contributors"]}
    fields = reports[0]["fields"]
    i = {name: k for k, name in enumerate(fields)}
    counters = Counter()
    for r in reports:
        counters.update(r["counters"])
    records = [u for r in reports for u in r["updates"]]
    sent = len(records)
    applied = 0
    lat_wall, lat_avg, not_applied_sender_view = [], [], Counter()
    lat_steady = []  # versions 2..V: version 1 also waits for the last agent to connect
    for u in records:
        key = (f"la{u[i['agent']]:04d}", u[i["window"]])
        if key in applied_ids:
            applied += 1
            lat_wall.append(by_window[u[i["window"]]]["wall"] - u[i["pub_wall"]])
            if by_window[u[i["window"]]]["version"] >= 2:
                lat_steady.append(lat_wall[-1])
            if u[i["avg_mono"]] is not None:
                lat_avg.append(u[i["avg_mono"]] - u[i["pub_mono"]])
        else:
            not_applied_sender_view[{1: "listed", 0: "not listed",
                                     -1: "no AVG seen"}[u[i["included"]]]] += 1
    refused = dict(final["rejected"])
    refused_total = sum(refused.values())
    pending = final["accepted"] - final["averaged"]
    unexplained = sent - applied - refused_total - pending
    versions = [e["version"] for e in events]
    v_last = versions[-1] if versions else 0
    first_wall = by_window[1]["wall"] if 1 in by_window else None
    last_wall = events[-1]["wall"] if events else None
    steady = sum(len(e["contributors"]) for e in events if e["version"] >= 2)
    span = (last_wall - first_wall) if first_wall and last_wall else 0.0

    def rss_at_version(v: int, name: str) -> float | None:
        e = next((e for e in events if e["version"] == v), None)
        kb = sampler.at(e["wall"], name) if e else None
        return None if kb is None else round(kb / 1024, 1)

    quarter, half = max(1, v_last // 4), max(1, v_last // 2)
    r_q, r_end = rss_at_version(quarter, "coordinator"), rss_at_version(v_last, "coordinator")
    growth = None
    if r_q is not None and r_end is not None and v_last > quarter:
        growth = (r_end - r_q) / (v_last - quarter) * 100
    # RSS swings within a round (a window's updates are held until averaged), so "bounded"
    # compares envelopes: the largest sample over each third of the versions
    walls = {e["version"]: e["wall"] for e in events}
    thirds = [round(v_last * k / 3) for k in range(4)]
    envelope = [sampler.peak("coordinator", walls.get(a, 0.0) if a else 0.0,
                             walls.get(b, float("inf"))) for a, b in pairwise(thirds)]
    envelope = [None if kb is None else round(kb / 1024, 1) for kb in envelope]
    mb = lambda kb: None if kb is None else round(kb / 1024, 1)  # noqa: E731
    r2 = lambda x: None if x is None else round(x, 4)  # noqa: E731
    return {
        "config": asdict(cfg),
        "versions": v_last,
        "timed_out_versions": sum(1 for e in events if e["timed_out"]),
        "run_s": round(span, 2),
        "updates_per_s": round(steady / span, 1) if span else None,
        "versions_per_s": round((v_last - 1) / span, 3) if span else None,
        "accounting": {
            "sent": sent, "acked_by_broker": counters["acked"], "applied": applied,
            "applied_metric": final["averaged"], "accepted_metric": final["accepted"],
            "contributors_in_events": sum(len(e["contributors"]) for e in events),
            "refused": refused, "refused_total": refused_total,
            "pending_at_stop": pending, "unexplained": unexplained,
            "not_applied_as_seen_by_senders": dict(not_applied_sender_view),
            "discarded_unsent": counters["discarded"],
        },
        "latency_s": {
            "publish_to_version_wall": _spread(lat_wall),
            "publish_to_version_wall_from_v2": _spread(lat_steady),
            "publish_to_avg_at_sender": _spread(lat_avg),
        },
        "coordinator_rss_mb": {
            "start": mb(start["coordinator"]), "version_1": rss_at_version(1, "coordinator"),
            "version_quarter": r_q, "version_half": rss_at_version(half, "coordinator"),
            "version_last": r_end, "peak_sampled": mb(sampler.peak("coordinator")),
            "peak_vmhwm": mb(hwm["coordinator"]), "end": mb(end["coordinator"]),
            "growth_per_100_versions_from_quarter": r2(growth),
            "peak_by_third_of_versions": envelope,
            "envelope_growth_last_vs_middle_third": (
                None if None in envelope[1:] else round(envelope[2] - envelope[1], 1)),
        },
        "mosquitto_rss_mb": {"start": mb(start["mosquitto"]),
                             "peak_vmhwm": mb(hwm["mosquitto"]),
                             "end": mb(end["mosquitto"])},
        "cpu_s": {"coordinator": round(cpu["coordinator"], 1),
                  "coordinator_main_thread": round(cpu["coordinator_main_thread"], 1),
                  "coordinator_other_threads": cpu["coordinator_other_threads"],
                  "mosquitto": round(cpu["mosquitto"], 1),
                  "senders": round(sum(r["cpu_s"] for r in reports), 1)},
        "senders": {"max_rss_mb": [round(r["max_rss_mb"], 1) for r in reports],
                    "counters": dict(counters),
                    "not_done": sum(len(r["not_done"]) for r in reports)},
        "coordinator_tracebacks": coord_log.count("Traceback"),
        "per_version": [{"version": e["version"], "contributors": len(e["contributors"]),
                         "timed_out": e["timed_out"], "wall": e["wall"],
                         "rss_mb": rss_at_version(e["version"], "coordinator")}
                        for e in events],
    }


def table(res: dict) -> str:
    a, lat = res["accounting"], res["latency_s"]
    rss, mq, cpu = res["coordinator_rss_mb"], res["mosquitto_rss_mb"], res["cpu_s"]
    c = res["config"]
    pw, pa = lat["publish_to_version_wall"], lat["publish_to_avg_at_sender"]
    rows = [
        ("agents (MQTT connections) / sender processes", f"{c['agents']} / {c['procs']}"),
        ("window timeout s / stragglers", f"{c['window_timeout']} / "
                                          f"{c['straggler_frac']:.0%}"),
        ("broker max_inflight_messages", c.get("broker_inflight") or "20 (default)"),
        ("versions (timed out)", f"{res['versions']} ({res['timed_out_versions']})"),
        ("wall s, version 1 -> last", res["run_s"]),
        ("updates/s applied (versions 2..V)", res["updates_per_s"]),
        ("versions/s", res["versions_per_s"]),
        ("publish -> version `wall` p50 / p99 / max s (CLOCK_REALTIME)",
         f"{pw['p50']} / {pw['p99']} / {pw['max']}"),
        ("the same, versions 2..V (version 1 waits for the last agent to connect)",
         "{p50} / {p99} / {max}".format(**lat["publish_to_version_wall_from_v2"])),
        ("publish -> AVG at sender p50 / p99 / max s (sender CLOCK_MONOTONIC)",
         f"{pa['p50']} / {pa['p99']} / {pa['max']}"),
        ("coordinator RSS MiB: start / v1 / v=V/2 / v=V / peak (VmHWM) / end",
         f"{rss['start']} / {rss['version_1']} / {rss['version_half']} / "
         f"{rss['version_last']} / {rss['peak_vmhwm']} / {rss['end']}"),
        ("coordinator RSS peak MiB per third of the versions",
         " / ".join(map(str, rss["peak_by_third_of_versions"]))),
        ("mosquitto RSS MiB: start / peak (VmHWM) / end",
         f"{mq['start']} / {mq['peak_vmhwm']} / {mq['end']}"),
        ("host: CPUs / 1-min load average before -> after",
         f"{res['host']['cpus']} / {res['host']['loadavg_1min']['before']} -> "
         f"{res['host']['loadavg_1min']['after']}"),
        ("CPU s: coordinator (main thread + others) / mosquitto / senders",
         f"{cpu['coordinator']} ({cpu['coordinator_main_thread']} + "
         f"{sum(cpu['coordinator_other_threads']):.1f}) / {cpu['mosquitto']} / "
         f"{cpu['senders']}"),
        ("coordinator CPU ms per applied update",
         round(cpu["coordinator"] * 1000 / max(1, a["applied"]), 3)),
        ("updates sent (acked by broker)", f"{a['sent']} ({a['acked_by_broker']})"),
        ("applied (listed as contributors)", a["applied"]),
        ("refused by reason", ", ".join(f"{k} {v}" for k, v in sorted(a["refused"].items()))
         or "none"),
        ("pending in the open window at stop", a["pending_at_stop"]),
        ("**unexplained** (sent - applied - refused - pending)", f"**{a['unexplained']}**"),
        ("work discarded unsent (AVG came first)", a["discarded_unsent"]),
    ]
    return "| figure | value |\n|---|---:|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="all")
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--procs", type=int, default=4)
    p.add_argument("--versions", type=int, default=60)
    p.add_argument("--window-timeout", type=float)
    p.add_argument("--compute", type=float)
    p.add_argument("--straggler-frac", type=float)
    p.add_argument("--eval-every", type=int, default=1)
    p.add_argument("--broker-inflight", type=int, default=0,
                   help="Mosquitto max_inflight_messages (default: Mosquitto's 20)")
    p.add_argument("--profile", action="store_true",
                   help="run the coordinator under cProfile and print its top functions")
    p.add_argument("--out", default=str(BENCH / "results" / "load"))
    p.add_argument("--tag", default="", help="suffix of the result file name")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    args = p.parse_args(argv)
    preset = dict(PRESETS[args.preset])
    for key in ("window_timeout", "compute", "straggler_frac"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    work = Path(tempfile.mkdtemp(prefix="fleetfl-load-"))
    cfg = LoadConfig(agents=args.agents, procs=args.procs, versions=args.versions,
                     eval_every=args.eval_every, broker_inflight=args.broker_inflight,
                     **preset,
                     profile=str(work / "coordinator.prof") if args.profile else "")
    try:
        res = run_load(cfg, work, log=lambda s: print(s, file=sys.stderr, flush=True))
        if args.profile:
            import pstats

            print("\ncoordinator main thread, top 25 by own time:", file=sys.stderr)
            pstats.Stats(cfg.profile, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    finally:
        if args.keep:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    res["preset"] = args.preset
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{args.preset}-{args.agents}{('-' + args.tag) if args.tag else ''}.json"
    (out / name).write_text(json.dumps(res, indent=1) + "\n")
    print(f"\nFedAvg, digits MLP (4,810 parameters), preset `{args.preset}`; "
          f"results in {out / name}\n")
    print(table(res))
    ok = res["accounting"]["unexplained"] == 0 and res["coordinator_tracebacks"] == 0
    print(f"\naccounting: {'PASS' if ok else 'SHORT'} (0 unexplained, 0 tracebacks)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
