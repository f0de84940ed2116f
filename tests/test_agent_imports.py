"""The agent's import set stays Pi-sized (issue 15, item 3): what only the coordinator and the
tools need (matplotlib, prometheus_client, scikit-learn and scipy, the coordinator package) and
torch's compiler stack (torch._dynamo, sympy: ~70 MB resident) are never imported by fl-agent,
not even after it has joined a run and trained; the digits data and split are unchanged."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import textwrap
import time
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest

from fleetfl.shared.learn.data import DIGITS_FILE, DataError, load_dataset, stratified_split

# Top-level names (a module or any of its submodules) an agent must never import.
NOT_IN_AGENT = ("matplotlib", "prometheus_client", "sklearn", "scipy", "joblib", "narwhals",
                "pandas", "sympy", "torch._dynamo", "torch._inductor", "fleetfl.coordinator",
                "PIL")  # PIL: only tasks reading image folders (formats.py) import it


def offenders(modules: set[str]) -> list[str]:
    return sorted(m for m in modules
                  if any(m == bad or m.startswith(bad + ".") for bad in NOT_IN_AGENT))


def run_python(code: str, timeout: float = 240) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_agent_side_training_imports_nothing_of_the_coordinator(optimizer):
    """Everything the agent runs after joining, in a fresh interpreter: its modules, the job's
    task, a simulated digits shard, local steps with the job's optimizer, an evaluation."""
    got = run_python(f"""
        import json, sys
        from fleetfl.agent import runner, cli  # noqa: F401  (fl-agent's modules)
        from fleetfl.agent import torch_lean
        from fleetfl.agent.validation import FederatedEvaluator  # noqa: F401
        from fleetfl.shared.core.job import job_from_dict
        from fleetfl.shared.learn.data import agent_shard, load_dataset
        from fleetfl.shared.tasks.evaluation import evaluate
        from fleetfl.shared.tasks.samples import ArraySamples
        from fleetfl.shared.tasks.task import load_task
        from fleetfl.shared.tasks.trainer import LocalTrainer

        marked = torch_lean.keep_compiler_out()  # as AgentRunner does
        job = job_from_dict({{"task": "digits", "optimizer": "{optimizer}", "lr": 0.01}})
        ds = load_dataset("digits")
        x, y = agent_shard(ds, 1, 4, job.partition, job.seed, job.alpha)
        task = load_task(job.task)
        trainer = LocalTrainer(task, job, ArraySamples(x, y), seed=1)
        losses = [trainer.step() for _ in range(5)]
        evaluate(task, trainer.model, ArraySamples(ds.x_test, ds.y_test))
        state = trainer.optimizer.state_dict()
        trainer.optimizer.load_state_dict(state)
        print(json.dumps({{"modules": sorted(sys.modules), "marked": marked,
                          "losses": losses}}))
    """)
    assert got["marked"] > 0, "torch_lean found nothing to mark in this torch version"
    assert offenders(set(got["modules"])) == []
    assert all(np.isfinite(got["losses"]))


def test_lean_torch_trains_bit_identically():
    """keep_compiler_out() changes which modules load, not one bit of the training."""
    code = """
        import json, sys, torch
        if {lean}:
            from fleetfl.agent.torch_lean import keep_compiler_out
            keep_compiler_out()
        out = {{}}
        for name in ("SGD", "Adam"):
            torch.manual_seed(0)
            m = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                    torch.nn.Linear(32, 10))
            kwargs = {{"momentum": 0.9}} if name == "SGD" else {{}}
            opt = getattr(torch.optim, name)(m.parameters(), lr=0.05, **kwargs)
            for _ in range(5):
                x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(m(x), y).backward()
                opt.step()
            opt.load_state_dict(opt.state_dict())
            out[name] = torch.cat([p.detach().flatten() for p in m.parameters()]).tolist()
        out["dynamo"] = "torch._dynamo" in sys.modules
        print(json.dumps(out))
    """
    lean = run_python(code.format(lean=True))
    plain = run_python(code.format(lean=False))
    assert not lean["dynamo"] and plain["dynamo"]
    assert lean["SGD"] == plain["SGD"] and lean["Adam"] == plain["Adam"]


def test_digits_split_is_scikit_learns():
    """The numpy reimplementation draws exactly scikit-learn's stratified split."""
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    ds = load_dataset("digits")
    for ours, theirs in [(ds.x_train, x_tr), (ds.x_test, x_te), (ds.y_train, y_tr),
                         (ds.y_test, y_te)]:
        assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)
    # and on other label sets and seeds (ties in the remainders broken the same way)
    rng = np.random.default_rng(3)
    for seed in range(4):
        labels = rng.integers(0, 7, size=211)
        labels[:14] = np.arange(7).repeat(2)  # every class at least twice
        tr, te = train_test_split(np.arange(211), test_size=50, random_state=seed,
                                  stratify=labels)
        ours_tr, ours_te = stratified_split(labels, 50, seed)
        assert np.array_equal(tr, ours_tr) and np.array_equal(te, ours_te)


def _sklearn_digits_file() -> Path:
    spec = find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-learn is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / DIGITS_FILE


def test_digits_from_the_data_dir_without_scikit_learn(tmp_path):
    """A device without scikit-learn reads digits.csv.gz from --data-dir; without either the
    error says what to install or copy."""
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / DIGITS_FILE).write_bytes(_sklearn_digits_file().read_bytes())
    got = run_python(f"""
        import json, sys
        sys.modules["sklearn"] = None  # as if not installed
        from fleetfl.shared.learn.data import DataError, load_dataset
        ds = load_dataset("digits", {str(tmp_path)!r})
        try:
            load_dataset("digits", None)
            error = ""
        except DataError as exc:
            error = str(exc)
        print(json.dumps({{"n": [len(ds.y_train), len(ds.y_test)], "sum": float(ds.x_test.sum()),
                          "error": error}}))
    """)
    ref = load_dataset("digits")
    assert got["n"] == [1437, 360]
    assert got["sum"] == pytest.approx(float(ref.x_test.sum()))
    assert "pip install 'fleetfl[digits]'" in got["error"] and DIGITS_FILE in got["error"]


def test_a_damaged_digits_file_is_a_data_error(tmp_path):
    (tmp_path / DIGITS_FILE).write_bytes(gzip.compress(b"1,2,3\n4,5,6\n"))
    with pytest.raises(DataError, match="expected rows of 64 pixels"):
        load_dataset("digits", tmp_path)


def _imported_modules(log: str) -> set[str]:
    """Module names from `python -X importtime` lines (PYTHONPROFILEIMPORTTIME=1)."""
    names = set()
    for line in log.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            if name and name != "imported package":
                names.add(name)
    return names


@pytest.mark.integration
def test_a_joined_agent_imported_nothing_of_the_coordinator(broker, tmp_path):
    """The real fl-agent process in a run: every module it imported, lazily ones included,
    from start to exit (PYTHONPROFILEIMPORTTIME=1), after it has joined, trained and left."""
    from fleetfl.coordinator.local_fleet import LocalFleet

    fleet = LocalFleet(broker.url, f"imports-{int(time.time())}", tmp_path / "logs",
                       ["--run-dir", str(tmp_path / "runs"), "--task", "digits", "--algo",
                        "fedavg", "--local-steps", "5", "--max-versions", "2",
                        "--min-agents", "1"])
    with fleet:
        fleet.start_coordinator()
        fleet.env["PYTHONPROFILEIMPORTTIME"] = "1"  # the agent only
        fleet.start_agent(0, 1)
        assert fleet.wait_coordinator(timeout=180) == 0, fleet.log("coordinator")[-3000:]
        assert fleet.wait_agents(timeout=60) == {"agent0": 0}, fleet.log("agent0")[-3000:]
    log = fleet.log("agent0")
    modules = _imported_modules(log)
    assert "fleetfl.agent.runner" in modules and "torch" in modules, log[-2000:]
    assert "update sent" in log and "peak RSS" in log, log[-2000:]
    assert offenders(modules) == []
