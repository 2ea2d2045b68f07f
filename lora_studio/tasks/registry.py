"""Every task by name: each door (training, jobs, CLI, server, UI) looks its task up here, once.

task = TASKS[recipe.task]             # training a recipe
task = task_of(adapter_dir)           # using an adapter (its lora_studio.json says the task)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..adapters import read_metadata
from .base import Task
from .chat import ChatTask
from .classify import ClassifyTask
from .kinds import task_name

TASKS: dict[str, Task] = {task.name: task for task in (ChatTask(), ClassifyTask())}


def task_of(adapter_dir: str | Path) -> Task:
    """The task an adapter folder was trained for (its metadata is checked on the way)."""
    return TASKS[task_name(read_metadata(adapter_dir))]


def group_by_task(adapters: dict[str, Path]) -> dict[str, dict[str, Path]]:
    """{task name: {adapter name: folder}}, for a server that serves several tasks at once."""
    groups: dict[str, dict[str, Path]] = {}
    for name, folder in adapters.items():
        groups.setdefault(task_of(folder).name, {})[name] = folder
    return groups


def merge(
    adapter_dir: str | Path, out_dir: str | Path, *, dtype: str = "auto", overwrite: bool = False
) -> Any:
    """Merge any adapter into a standalone model folder of its task's kind, checked against the adapter."""
    folder = Path(adapter_dir)
    return task_of(folder).merge(folder, Path(out_dir), dtype=dtype, overwrite=overwrite)


def verify(adapter_dir: str | Path, **targets: Any) -> Any:
    """Any adapter, its merged model and a server give the same answers (see each task's verify)."""
    folder = Path(adapter_dir)
    return task_of(folder).verify(folder, **targets)
