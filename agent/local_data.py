"""What an agent trains on: the job's task, found here by its reference and checked against
the coordinator's fingerprint, and this device's samples (its own folder, or a simulated
shard of the task's global data set)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fleetfl.shared.config import AgentConfig, JobConfig
from fleetfl.shared.learn.data import DataError, agent_shard
from fleetfl.shared.tasks.samples import ArraySamples, Samples
from fleetfl.shared.tasks.task import Task, TaskError, fingerprint, label_of, load_task


class TaskRefused(Exception):
    """The job's task is not installed here or is another version: we cannot join."""


def task_for_job(job: JobConfig) -> Task:
    """The job's task as installed here; TaskRefused (with the line the coordinator logs)
    when it is missing or its fingerprint differs from the coordinator's."""
    wanted = job.task_fingerprint or job.task
    try:
        task = load_task(job.task)
    except TaskError as exc:
        raise TaskRefused(f"task {label_of(wanted)} not installed here ({exc})") from None
    if job.task_fingerprint:
        here = fingerprint(task, task.build_model(job.seed))
        if here != job.task_fingerprint:
            raise TaskRefused(f"task {label_of(wanted)} differs here: the coordinator runs "
                              f"{job.task_fingerprint}, this device has {here}")
    return task


@dataclass(frozen=True)
class DeviceData:
    train: Samples
    validation: Samples | None


def device_data(task: Task, job: JobConfig, cfg: AgentConfig, index: int, parts: int
                ) -> DeviceData:
    """`cfg.data` set: the task reads this device's own folder (and nothing else). Else the
    simulation: shard `index` of `parts` of the task's global data set."""
    if cfg.data:
        return _own_data(task, Path(cfg.data))
    if task.simulation is None:
        raise DataError(f"task {task.label} reads each device's own data: give fl-agent "
                        "--data FOLDER (it has no global data set to deal out as --shard)")
    ds = task.simulation(Path(cfg.data_dir) if cfg.data_dir else None)
    x, y = agent_shard(ds, index, parts, job.partition, job.seed, job.alpha)
    return DeviceData(ArraySamples(x, y, f"simulated shard {index}/{parts} of {task.name} "
                                         f"({job.partition}, {len(x)} samples)"), None)


def _own_data(task: Task, folder: Path) -> DeviceData:
    if task.train is None:
        raise DataError(f"task {task.label} does not read device-local data (no train "
                        "loader); use --shard i/n to simulate a fleet on its data set")
    if not folder.is_dir():
        raise DataError(f"{folder}: no such data folder (fl-agent --data)")
    train = task.train(folder)
    if len(train) == 0:
        raise DataError(f"{train.source}: no training samples")
    validation = task.validation(folder) if task.validation is not None else None
    if validation is not None and len(validation) == 0:
        validation = None
    return DeviceData(train, validation)
