"""Tasks: your model, your data, your fleet. See README "Write a task"."""

from fleetfl.shared.tasks.evaluation import evaluate
from fleetfl.shared.tasks.samples import ArraySamples, Samples
from fleetfl.shared.tasks.task import Task, TaskError, accuracy, fingerprint, load_task

__all__ = ["ArraySamples", "Samples", "Task", "TaskError", "accuracy", "evaluate",
           "fingerprint", "load_task"]
