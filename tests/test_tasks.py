"""The task seam: every task implements the protocol, the building blocks' view of a task agrees
with the task itself, and no code outside lora_studio/tasks/ branches on a task's name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lora_studio.config import Task as TaskName
from lora_studio.config import TrainSettings
from lora_studio.errors import ModelError
from lora_studio.tasks import kinds
from lora_studio.tasks.base import Task
from lora_studio.tasks.registry import TASKS

ROOT = Path(__file__).resolve().parents[1]


def test_every_recipe_task_has_an_implementation_of_the_protocol():
    import typing

    assert sorted(TASKS) == sorted(typing.get_args(TaskName))
    members = [name for name in dir(Task) if not name.startswith("_")] + list(Task.__annotations__)
    for task in TASKS.values():
        missing = [m for m in members if not hasattr(task, m)]
        assert not missing, f"{task.name} lacks {missing}"


def test_each_select_best_choice_is_honoured_by_some_task():
    import typing

    choices = typing.get_args(typing.get_type_hints(TrainSettings)["select_best"])
    honoured = {choice for task in TASKS.values() for choice in task.best_checkpoint}
    assert honoured == set(choices)


def test_the_loaders_view_of_each_task_agrees_with_the_task():
    for name, task in TASKS.items():
        assert kinds.generates_text({"task": name}) is task.generates_text
        if not task.generates_text:
            assert kinds.USE_INSTEAD[name] == task.use_instead


def test_a_text_door_refuses_a_label_adapter_in_one_line(tmp_path: Path):
    with pytest.raises(ModelError, match=r"'classify' adapter .* use `lora-studio classify ADAPTER TEXT`"):
        kinds.require_text({"task": "classify"}, tmp_path)
    kinds.require_text({}, tmp_path)  # adapters from before tasks existed are chat adapters


def test_no_code_outside_tasks_compares_a_task_name():
    compare = re.compile(
        r"""(==|!=)\s*["'](chat|classify)["']|["'](chat|classify)["']\s*(==|!=)|task\s+in\s*\("""
    )
    offenders = []
    for folder in ("lora_studio", "ui", "recipes"):
        for path in (ROOT / folder).rglob("*.py"):
            if "tasks" in path.relative_to(ROOT).parts:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if compare.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
