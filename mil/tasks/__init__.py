"""Task types: one file per type, all registered in :data:`TASKS` (``task.type`` in the config).

``classification`` (binary / multi-class), ``multi_target`` (several categorical targets,
one head each), ``regression`` (a continuous target) and ``survival`` (Cox model of time and
event). See :class:`mil.tasks.base.Task` for the contract.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from mil.cohort import LabelColumn
from mil.tasks import classification, multi_target, regression, survival  # noqa: F401  (registers the tasks)
from mil.tasks.base import TASKS, OutputAffine, Task, ValMetrics


def task_class(cfg: DictConfig) -> type[Task]:
    """The task type ``cfg.task.type`` names, after checking the config's label keys fit it."""
    cls = TASKS.get(cfg.task.type)
    cls.check_config(cfg)
    return cls


def create_task(cfg: DictConfig, columns: list[LabelColumn]) -> Task:
    """The configured task over ``columns`` (the cohort's label columns, classes resolved)."""
    return task_class(cfg)(columns, cfg)


def task_from_meta(meta: DictConfig, cfg: DictConfig | None = None) -> Task:
    """The task of a run folder's ``run.yaml`` (runs from before task types are classification)."""
    if "columns" in meta:
        columns = [LabelColumn(**OmegaConf.to_container(c)) for c in meta.columns]
    else:
        columns = [LabelColumn(str(meta.target), classes=[str(c) for c in meta.classes])]
    task = TASKS.get(str(meta.get("task", "classification")))(columns, cfg)
    if meta.get("thresholds") is not None:
        task.thresholds = OmegaConf.to_container(meta.thresholds)
    return task


__all__ = ["TASKS", "OutputAffine", "Task", "ValMetrics", "create_task", "task_class", "task_from_meta"]
