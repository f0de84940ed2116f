"""The coordinator's background evaluator: results in order, stale versions skipped, the last
version always evaluated, the caller never blocked."""

from __future__ import annotations

import threading
import time

import numpy as np

from fleetfl.shared.learn.evaluator import BackgroundEvaluator


def _gated_eval(gate: threading.Event, seen: list[float]):
    def evaluate(params: np.ndarray) -> dict[str, float]:
        gate.wait(10)
        seen.append(float(params[0]))
        return {"loss": float(params[0]) * 2, "accuracy": float(params[0]) / 10}

    return evaluate


def test_submit_does_not_wait_and_results_carry_the_submitted_params():
    gate, seen = threading.Event(), []
    ev = BackgroundEvaluator(_gated_eval(gate, seen))
    params = np.array([3.0], np.float32)
    started = time.monotonic()
    ev.submit(1, params)
    params[0] = 99.0  # the evaluator holds its own copy
    assert time.monotonic() - started < 1.0 and ev.results() == []
    gate.set()
    assert ev.wait_idle(10)
    [result] = ev.results()
    assert (result.version, result.loss, result.accuracy) == (1, 6.0, 0.3)
    assert seen == [3.0]
    ev.close()


def test_versions_waiting_behind_a_busy_evaluator_are_skipped_except_kept_ones():
    gate, seen = threading.Event(), []
    ev = BackgroundEvaluator(_gated_eval(gate, seen))
    ev.submit(1, np.array([1.0], np.float32))
    time.sleep(0.2)  # version 1 is now being evaluated (held at the gate)
    ev.submit(2, np.array([2.0], np.float32), keep=True)
    ev.submit(3, np.array([3.0], np.float32))
    ev.submit(4, np.array([4.0], np.float32))  # replaces 3, not the kept 2
    gate.set()
    assert ev.wait_idle(10)
    assert [r.version for r in ev.results()] == [1, 2, 4]
    assert seen == [1.0, 2.0, 4.0] and ev.skipped == 1
    ev.close()


def test_a_failing_evaluation_is_logged_and_the_worker_goes_on(caplog):
    def evaluate(params):
        if params[0] < 0:
            raise RuntimeError("boom")
        return {"loss": 0.0, "accuracy": 1.0}

    ev = BackgroundEvaluator(evaluate)
    ev.submit(1, np.array([-1.0], np.float32), keep=True)
    ev.submit(2, np.array([1.0], np.float32), keep=True)
    assert ev.wait_idle(10)
    assert [r.version for r in ev.results()] == [2]
    assert "evaluating version 1 failed" in caplog.text
    ev.close()
