"""Tasks: your model, your data, your fleet. See README "Write a task"."""

from .evaluation import evaluate
from .samples import ArraySamples, Samples
from .task import Task, TaskError, accuracy, fingerprint, load_task

__all__ = ["ArraySamples", "Samples", "Task", "TaskError", "accuracy", "evaluate",
           "fingerprint", "load_task"]
