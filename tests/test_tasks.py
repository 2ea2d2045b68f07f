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


# --- every door that generates text refuses a label adapter, in one line --------------------------
@pytest.fixture(scope="module")
def label_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from classify_helpers import build_classifier_adapter

    return build_classifier_adapter(tiny_model_dir, tmp_path_factory.mktemp("clf") / "adapter", ["a", "b"])


def text_doors(tmp_path: Path) -> dict:
    from lora_studio.adapters import load_adapted
    from lora_studio.evaluation.report import EvalOptions, run_eval
    from lora_studio.export import export_gguf
    from lora_studio.inference import InferenceEngine
    from lora_studio.verify import verify_chat

    data = tmp_path / "test.jsonl"
    data.write_text('{"prompt": "hi", "completion": "a"}\n')
    return {
        "load_adapted": lambda a: load_adapted(a),
        "engine": lambda a: InferenceEngine.from_adapters([a], ["x"]),
        "gguf": lambda a: export_gguf(a, tmp_path / "x.gguf"),
        "eval": lambda a: run_eval(EvalOptions(adapter=str(a), data=str(data))),
        "verify (chat's)": lambda a: verify_chat(a),
    }


@pytest.mark.parametrize("door", ["load_adapted", "engine", "gguf", "eval", "verify (chat's)"])
def test_every_text_door_refuses_a_label_adapter(door: str, label_adapter: Path, tmp_path: Path):
    with pytest.raises(ModelError, match=r"is a 'classify' adapter .*: it does not write text"):
        text_doors(tmp_path)[door](label_adapter)


def test_the_task_of_an_adapter_picks_its_merge_and_verify(label_adapter: Path, tmp_path: Path):
    from lora_studio.tasks.registry import merge, task_of

    assert task_of(label_adapter).name == "classify"
    report = merge(label_adapter, tmp_path / "merged")  # a sequence classifier, checked
    assert (tmp_path / "merged" / "config.json").is_file() and list(report.labels) == ["a", "b"]


def test_dedupe_drops_repeated_rows_of_a_classify_recipe(tiny_model_dir: Path, tmp_path: Path):
    from classify_helpers import classify_recipe, toy_rows, write_jsonl

    from lora_studio.models import load_tokenizer
    from lora_studio.tasks.registry import TASKS

    rows = toy_rows(10)
    path = write_jsonl(tmp_path / "d.jsonl", rows + rows[:7])  # 7 exact repeats
    recipe = classify_recipe(tiny_model_dir, path, tmp_path / "run")
    tokenizer = load_tokenizer(tiny_model_dir)
    plain = TASKS["classify"].prepare(recipe, tokenizer)
    deduped = TASKS["classify"].prepare(recipe.replace(dedupe=True), tokenizer)
    assert len(plain.train) + len(plain.val) == len(rows) + 7
    assert len(deduped.train) + len(deduped.val) == len({(r["text"], r["label"]) for r in rows})
