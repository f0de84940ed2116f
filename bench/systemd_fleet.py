"""The fleet proof under real systemd at rack size: 1 server + 16 agent containers booted with
systemd as PID 1 (systemd-nspawn), provisioned by ansible/fleet.yml, every fault of
tests/test_systemd_fleet.py (watchdog kill of a frozen agent, coordinator SIGKILL and
resume, an agent's container powered off and booted, second apply, operator stop, the run's
accounting). Prints a Markdown table of each step's seconds and its outcome. Needs root.

    sudo .venv/bin/python bench/systemd_fleet.py [--agents 16] [--json facts.json] [--keep]

The wheelhouse and the base root are cached in $FLEETFL_NSPAWN_DIR (/var/lib/fleetfl-nspawn),
so only the first run pays for debootstrap and the wheels (tests/nspawn_fleet.py prepare).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import nspawn_fleet as nf  # noqa: E402


def outcome(facts: dict, step: str) -> str:
    if step in facts["errors"]:
        return "FAILED: " + facts["errors"][step].splitlines()[0][:90]
    value = facts.get(step)
    if step in ("first_apply", "second_apply"):
        recap = value["recap"]
        return (f"{len(recap)} hosts, changed={sum(r['changed'] for r in recap.values())}, "
                f"failed={sum(r['failed'] for r in recap.values())}")
    if step == "units":
        states = {(v["ActiveState"], v["SubState"]) for v in value.values()}
        return f"{len(value)} units, states {sorted(states)}"
    if step == "freeze":
        return (f"watchdog kill {value['killed_after_s']:.1f} s after SIGSTOP, restarts "
                f"{value['nrestarts']}, rejoined at version {value['rejoined_at_version']}")
    if step == "kill_coordinator":
        return (f"killed at version {value['version_at_kill']}, resumed "
                f"({len(value['resume_log'])} resume line), version {value['version_after']}")
    if step == "reboot":
        return (f"off {value['poweroff_s']} s, boot {value['boot_s']} s, rejoined at version "
                f"{value['rejoined_at_version']}")
    if step == "run_end":
        c = value["coordinator"]
        return (f"coordinator {c['ActiveState']}/{c['Result']}, {value['versions']} versions, "
                f"agents exited {sum(a['ExecMainStatus'] == '0' for a in value['agents'].values())}"
                f"/{len(value['agents'])}")
    if step == "accounting":
        return (f"sent {value['sent']}, applied {value['applied']}, lost {len(value['lost'])}, "
                f"twice {len(value['twice'])}")
    if step == "enforcement":
        return json.dumps(value)
    return "ok"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=16)
    parser.add_argument("--json", help="write every fact here")
    parser.add_argument("--keep", action="store_true", help="leave the containers running")
    args = parser.parse_args()
    if (reason := nf.why_not()) is not None:
        print(f"skipped: {reason}")
        return 0
    start = time.monotonic()
    wheels, base = nf.prepare()
    name = f"b{os.getpid() % 100000}"
    fleet = nf.Fleet(args.agents, nf.STATE / "fleets" / name, base, wheels, prefix=name)
    try:
        facts = nf.prove(fleet, log=lambda line: print(line, file=sys.stderr, flush=True))
    finally:
        if not args.keep:
            fleet.destroy()
    facts["prepare"] = dict(nf.TIMINGS)
    facts["total_s"] = round(time.monotonic() - start, 1)
    print(f"\n## systemd fleet: 1 server + {args.agents} agent containers\n")
    print("| step | seconds | outcome |\n| --- | ---: | --- |")
    for step, seconds in nf.TIMINGS.items():
        print(f"| prepare: {step} | {seconds} | cached after the first run |")
    for step, seconds in facts["steps"].items():
        print(f"| {step} | {seconds} | {outcome(facts, step)} |")
    print(f"| total | {facts['total_s']} | |")
    if "accounting" in facts and "table" in facts["accounting"]:
        print(f"\n```\n{facts['accounting']['table']}\n```")
    if args.json:
        Path(args.json).write_text(json.dumps(facts, indent=2, default=str))
    return 1 if facts["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
