"""The recipe: every setting of a fine-tuning run, as frozen dataclasses.

A YAML file, `--set key=value` overrides and the web form all become one `Recipe`. Each field's
help text is written once here and reused by the CLI and the UI. Field names follow PEFT and
transformers where one exists, and are unique across sections so `--set max_steps=3` needs no
section prefix (`--set train.max_steps=3` works too).

    recipe = Recipe.load("recipes/smollm2-lora-cpu.yaml", ["max_steps=20"])  # or a dict, or a Recipe
    recipe.replace(max_steps=3, layers=None)                                  # checked again
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from .config_values import (
    COUNT,
    MAX_COUNT,
    POSITIVE,
    SHARE,
    Range,
    coerce,
    describe,
    matches,
    parse_yaml,
    unknown,
)
from .config_values import setting as _f
from .errors import ConfigError
from .text_checks import CONTROL_CHARS

log = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
# The shipped default recipe (in the source tree): the UI's form starts from its choices.
DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-lora-cpu.yaml"

Quantization = Literal["none", "8bit", "4bit"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda", "mps"]
DataFormat = Literal["auto", "messages", "alpaca", "prompt_completion", "text"]
Speedup = Literal["cache", "label_only", "bf16", "prefix"]
Task = Literal["chat", "classify"]
# Choices of commands beyond the recipe, here so that the CLI's --help imports nothing heavy.
GgufQuant = Literal["f16", "q8_0"]
VerifyTarget = Literal["merged", "gguf", "server"]
Baseline = Literal["scratch"]
TASK_HELP = (
    "What to train: 'chat' teaches the model to write answers; 'classify' keeps the pretrained body, "
    "puts a new head sized to the labels on it and trains it to pick one label per text."
)


@dataclass(frozen=True)
class ModelSettings:
    base_model: str = _f(
        DEFAULT_BASE_MODEL,
        "The pretrained model to adapt: the built-in 'smollm2-135m-instruct', a Hugging Face hub id, "
        "a local model folder or a .gguf file.",
    )
    quantization: Quantization = _f("none", "Load the frozen base in 4 or 8 bits (QLoRA) to save memory.")
    dtype: DType = _f("auto", "Weight dtype; 'auto' picks bf16/fp16 on GPUs and fp32 on CPUs (faster there).")
    device: Device = _f("auto", "Where to train; 'auto' picks CUDA, then MPS, then CPU.")
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) of base_model.")
    trust_remote_code: bool = _f(
        False,
        "The base needs its own Python code (hub models with custom code). Takes effect only with the "
        "operator's --trust-remote-code flag on the command; an adapter or recipe alone never runs code.",
    )


@dataclass(frozen=True)
class LoraSettings:
    r: int = _f(
        16,
        "LoRA rank: the size of the low-rank update. Higher learns more and costs more.",
        range=Range(1, 16384),  # no model's hidden size is larger; a rank beyond it adds nothing
    )
    lora_alpha: int = _f(32, "LoRA scaling; the update is multiplied by lora_alpha / r.", range=COUNT)
    lora_dropout: float = _f(0.05, "Dropout on the LoRA input during training.", range=SHARE)
    target_modules: list[str] | str = _f(
        "all-linear", "Which linear layers get adapters: 'all-linear' or a list of module names."
    )
    layers: int | None = _f(
        None,
        "Adapt only the top N transformer blocks; the lower ones stay frozen and backward stops early "
        "(faster). Empty, or more than the model has, adapts all blocks.",
        range=COUNT,
    )
    use_dora: bool = _f(False, "Use DoRA (weight-decomposed LoRA).")
    use_rslora: bool = _f(False, "Use rank-stabilised LoRA scaling (lora_alpha / sqrt(r)).")
    modules_to_save: list[str] | None = _f(None, "Extra modules trained in full and saved with the adapter.")


@dataclass(frozen=True)
class DataSettings:
    train_file: str = _f("", "Training data: .jsonl, .json, .csv, .parquet or a saved `datasets` folder.")
    val_file: str | None = _f(None, "Validation data; when empty, val_fraction of train_file is held out.")
    format: DataFormat = _f("auto", "Row format; 'auto' detects it from the fields of the first row.")
    val_fraction: float = _f(
        0.1, "Share of train_file held out for validation when val_file is empty.", range=SHARE
    )
    max_length: int | Literal["auto"] = _f(
        512,
        "Longest example in tokens; longer ones are truncated. 'auto' (task: classify, its default "
        "there): chosen from the training texts' lengths, and said in the log and the data report.",
        range=Range(1, 131072),  # also bounds the text tokenised per row (data.CHARS_PER_TOKEN)
        tasks={"auto": ("classify",)},
        task_defaults={"classify": "auto"},  # tasks/classify/lengths.py
    )
    system_prompt: str | None = _f(
        None, "A system message added to chat examples that have none.", tasks=("chat",)
    )
    dedupe: bool = _f(
        False, "Drop exact duplicate rows of train_file before the validation split (duplicates overfit)."
    )


@dataclass(frozen=True)
class TrainSettings:
    output_dir: str = _f("", "The run folder; empty means a fresh $LORA_STUDIO_HOME/runs/<recipe name>-<id>.")
    num_train_epochs: float = _f(1.0, "Passes over the training data.", range=POSITIVE)
    max_steps: int = _f(-1, "Stop after this many optimizer steps (-1: run num_train_epochs).")
    per_device_train_batch_size: int = _f(8, "Examples per step on each device.", range=COUNT)
    gradient_accumulation_steps: int = _f(
        1, "Steps whose gradients are summed before each update.", range=COUNT
    )
    learning_rate: float = _f(2e-4, "Peak learning rate of the adapter weights.", range=POSITIVE)
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = _f(
        "cosine", "How the learning rate changes over training."
    )
    # Below 1: transformers reads a warmup of 1 or more as a number of steps, not a share.
    warmup_ratio: float = _f(0.05, "Share of steps spent warming the learning rate up.", range=SHARE)
    weight_decay: float = _f(0.0, "AdamW weight decay.", range=Range(0, math.inf))
    eval_every_steps: int = _f(50, "Validate every N steps.", range=COUNT)
    save_every_steps: int | None = _f(
        None,
        "Checkpoint every N steps; empty means at every validation (needed to keep the best).",
        range=COUNT,
    )
    early_stopping_patience: int | None = _f(
        3, "Stop when validation loss has not improved for N validations; empty disables it.", range=COUNT
    )
    logging_steps: int = _f(5, "Record training loss every N steps.", range=COUNT)
    gradient_checkpointing: Literal["auto", "on", "off"] = _f(
        "auto", "Recompute activations to save memory; 'auto' turns it on for GPUs only (it slows CPUs)."
    )
    seed: int = _f(
        42,
        "Random seed for data order, the validation split and adapter init.",
        range=Range(0, 2**32 - 1),  # numpy's seeds
    )
    select_best: Literal["val_loss", "balanced", "macro_f1", "accuracy"] = _f(
        "val_loss",
        "Which checkpoint becomes the adapter (and what early stopping watches): the lowest validation "
        "loss; 'balanced' (chat): the lowest validation loss plus the rise of the loss on general text "
        "(keeps more of what the base knew); 'macro_f1' or 'accuracy' (classify): the best validation score.",
        tasks={"balanced": ("chat",), "macro_f1": ("classify",), "accuracy": ("classify",)},
    )
    # Ray clusters only (`jobs submit --cluster ray`): one run on several Ray Train workers.
    num_workers: int = _f(
        1,
        "Data-parallel Ray Train workers for this run (jobs on a Ray cluster only; 1: one process).",
        range=COUNT,
    )
    use_gpu: bool = _f(False, "Give each Ray Train worker a GPU (jobs on a Ray cluster only).")
    speedups: Literal["auto", "none"] | list[Speedup] = _f(
        "auto",
        "Exact shortcuts of the fast path: 'cache' (run frozen lower blocks once, with `layers`), "
        "'label_only' (logits only where the loss needs them), 'bf16' (bf16 autocast on CPUs with "
        "native bf16), 'prefix' (task: classify: the prompt's start runs once per batch). 'auto' uses "
        "each one that is exact here; 'none' or a list chooses.",
    )


@dataclass(frozen=True)
class ClassifySettings:
    """task: classify only: one text and one label per row."""

    text_column: str = _f("text", "The column (field) holding each row's text.")
    label_column: str = _f("label", "The column (field) holding each row's label.")
    class_weight: Literal["none", "balanced"] = _f(
        "none", "'balanced' weights the loss by inverse class frequency (for skewed labels)."
    )
    prompt: Literal["auto", "none"] = _f(
        "auto",
        "'auto' shows each text inside the base's chat template with a one-line instruction, so the head "
        "reads the state where the model would answer; 'none': the bare text.",
    )


SECTIONS: dict[str, type] = {
    "model": ModelSettings,
    "lora": LoraSettings,
    "data": DataSettings,
    "train": TrainSettings,
    "classify": ClassifySettings,
}
# A section only some tasks read: any setting in it is an error for the others.
SECTION_TASKS: dict[str, tuple[str, ...]] = {"classify": ("classify",)}
# Keys that moved to another section: still read, with a one-line note saying where they live now.
MOVED_KEYS: dict[tuple[str, str], tuple[str, str]] = {
    ("data", "text_column"): ("classify", "text_column"),
    ("data", "label_column"): ("classify", "label_column"),
    ("train", "class_weight"): ("classify", "class_weight"),
    ("train", "metric_for_best_model"): ("train", "select_best"),
}


@dataclass(frozen=True)
class Recipe:
    name: str = "run"
    task: Task = "chat"
    model: ModelSettings = field(default_factory=ModelSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    classify: ClassifySettings = field(default_factory=ClassifySettings)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def load(cls, source: Recipe | dict[str, Any] | str | Path, overrides: Sequence[str] = ()) -> Recipe:
        """A recipe from a YAML file, a raw mapping or a Recipe, with `key=value` overrides applied."""
        if isinstance(source, Recipe):
            return cls.from_dict(apply_overrides(source.to_dict(), list(overrides))) if overrides else source
        if isinstance(source, dict):
            return cls.from_dict(apply_overrides(source, list(overrides)))
        return cls.from_yaml(source, list(overrides))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "recipe") -> Recipe:
        """Build and validate a recipe; every problem is reported in one ConfigError."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
        problems: list[str] = []
        name = raw.get("name", "run")
        if not isinstance(name, str) or not name:
            problems.append(f"name: expected a non-empty string, got {name!r}")
        elif CONTROL_CHARS.search(name):  # an ESC sequence in a name rewrites terminals that list it
            problems.append(f"name: control characters are not allowed, got {name!r}")
        task = raw.get("task", "chat")
        if task not in typing.get_args(Task):
            problems.append(f"task: expected {describe(Task)}, got {task!r}")
            task = "chat"  # the rest is checked as the default task's
        raw = _move_old_keys(raw, source)
        for key in raw:
            if key not in ("name", "task") and key not in SECTIONS:
                problems.append(unknown(key, ["name", "task", *SECTIONS], "top-level key"))
        sections = {}
        for section, kind in SECTIONS.items():
            values = raw.get(section) or {}
            if not isinstance(values, dict):
                problems.append(f"{section}: expected a mapping, got {type(values).__name__}")
                values = {}
            values = {**task_defaults(kind, task), **values}
            sections[section] = _build_section(kind, section, values, problems)
        recipe = cls(name=name if isinstance(name, str) else "run", task=task, **sections)
        problems.extend(recipe._cross_checks())
        if problems:
            raise ConfigError(f"{source} has {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
        return recipe

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> Recipe:
        """Load a YAML recipe and apply `key=value` overrides; relative data paths follow the file."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"{path}: byte 0x{e.object[e.start]:02x} at position {e.start} is not UTF-8 text; "
                "re-save the recipe as UTF-8"
            ) from None
        raw = parse_yaml(text, str(path)) or {}
        if isinstance(raw, dict):
            raw.setdefault("name", path.stem)
            _resolve_data_paths(raw, path.parent)
            raw = apply_overrides(raw, overrides or [])
        return cls.from_dict(raw, source=str(path))

    # --- views ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes: Any) -> Recipe:
        """A copy with settings changed by plain name, e.g. `recipe.replace(max_steps=3, layers=None)`.

        Each section is copied with `dataclasses.replace`, then the whole recipe is checked again.
        """
        top = {key: changes.pop(key) for key in ("name", "task") if key in changes}
        by_section: dict[str, dict[str, Any]] = {}
        for key, value in changes.items():
            section = field_section(key)
            if section is None:
                all_names = [f.name for kind in SECTIONS.values() for f in fields(kind)]
                raise ConfigError(unknown(key, ["name", "task", *all_names], "setting"))
            by_section.setdefault(section, {})[key] = value
        sections = {s: dataclasses.replace(getattr(self, s), **v) for s, v in by_section.items()}
        return Recipe.from_dict(dataclasses.replace(self, **top, **sections).to_dict())

    @property
    def output_dir(self) -> Path:
        """The run folder; with output_dir empty, training picks a fresh one (runs.pin)."""
        if not self.train.output_dir:
            raise ValueError("this recipe's run folder is chosen when it is trained: see runs.pin")
        return Path(self.train.output_dir)

    def _cross_checks(self) -> list[str]:
        problems = (
            []
            if self.data.train_file
            else ["train_file: required (a .jsonl/.json/.csv/.parquet file or a datasets folder)"]
        )
        for section in SECTIONS:
            problems += _range_problems(getattr(self, section))
        steps = self.train.max_steps
        if steps != -1 and steps not in COUNT:
            problems.append(f"max_steps: expected -1 or a positive number (at most {MAX_COUNT}), got {steps}")
        problems += _task_problems(self)
        save, every = self.train.save_every_steps, self.train.eval_every_steps
        if save is not None and save in COUNT and every in COUNT and save % every:
            problems.append(
                f"save_every_steps: must be a positive multiple of eval_every_steps "
                f"({every}) so the best checkpoint can be kept, got {save}"
            )
        return problems


# --- helpers -------------------------------------------------------------------------------------
def _task_problems(recipe: Recipe) -> list[str]:
    """Settings the recipe's task cannot honour: an error naming the setting and the task, never ignored.

    A field's `tasks` metadata names the tasks that read it (a tuple), or, per choice, the tasks
    that honour that choice (a mapping); SECTION_TASKS does the same for a whole section.
    """
    problems = []
    for section, kind in SECTIONS.items():
        settings, default = getattr(recipe, section), kind()
        for f in fields(kind):
            value = getattr(settings, f.name)
            if value == getattr(default, f.name):
                continue
            readers = SECTION_TASKS.get(section) or f.metadata.get("tasks")
            if isinstance(readers, dict):
                readers = readers.get(value) if isinstance(value, str) else None
            if readers is not None and recipe.task not in readers:
                problems.append(
                    f"{section}.{f.name}: {value!r} is for task: {' or '.join(readers)}; "
                    f"task {recipe.task!r} cannot honour it (remove it or change the task)"
                )
    return problems


def task_defaults(kind: type, task: str) -> dict[str, Any]:
    """The settings of a section whose default differs for `task` (a field's `task_defaults`)."""
    return {
        f.name: f.metadata["task_defaults"][task]
        for f in fields(kind)
        if task in f.metadata.get("task_defaults", {})
    }


def _move_old_keys(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Keys of older recipes, moved to where they live now, with a one-line note each."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for (old_section, old_key), (new_section, new_key) in MOVED_KEYS.items():
        old = raw.get(old_section)
        if not isinstance(old, dict) or old_key not in old:
            continue
        new = raw.setdefault(new_section, {})
        if isinstance(new, dict):
            new.setdefault(new_key, old.pop(old_key))
            log.warning(
                "%s: %s.%s is now %s.%s; it is still read, but please move it",
                source,
                old_section,
                old_key,
                new_section,
                new_key,
            )
    return raw


def _range_problems(settings: Any) -> list[str]:
    """Every number of a section outside its field's range (an empty optional setting is fine)."""
    problems = []
    for f in fields(settings):
        value, limits = getattr(settings, f.name), f.metadata.get("range")
        if limits is None or value is None or isinstance(value, str):  # a word choice, e.g. 'auto'
            continue
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{f.name}: must be a finite number, got {value}")
        elif value not in limits:
            problems.append(f"{f.name}: must be {limits}, got {value}")
    return problems


def field_range(name: str) -> Range | None:
    """The range of a number setting, by plain name (for the UI's boxes and other checks)."""
    section = field_section(name)
    return (
        next(f.metadata.get("range") for f in fields(SECTIONS[section]) if f.name == name)
        if section
        else None
    )


def field_help() -> dict[str, str]:
    """Plain field name -> help text, for --help and the UI's hints."""
    return {"task": TASK_HELP} | {
        f.name: f.metadata["help"] for kind in SECTIONS.values() for f in fields(kind)
    }


def field_section(name: str) -> str | None:
    """The section that owns a plain field name (names are unique across sections)."""
    for section, kind in SECTIONS.items():
        if name in {f.name for f in fields(kind)}:
            return section
    return None


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    """The `--set KEY=VALUE` option of every command that takes a recipe (read by `Recipe.load`)."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe setting, e.g. --set max_steps=10 (repeatable)",
    )


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key=value` strings (values parsed as YAML) to a raw recipe mapping."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"override {item!r}: expected key=value, e.g. max_steps=10")
            continue
        try:
            value = parse_yaml(text, f"override {key}") if text.strip() else None
        except ConfigError as e:
            problems.append(str(e))
            continue
        if key in ("name", "task"):
            raw[key] = value
            continue
        section, _, name = key.rpartition(".")
        section = section or field_section(name) or _old_section(name)
        if section not in SECTIONS:
            all_names = [f.name for kind in SECTIONS.values() for f in fields(kind)]
            problems.append(unknown(key, all_names, "setting"))
            continue
        raw.setdefault(section, {})
        raw[section] = dict(raw[section] or {})
        raw[section][name] = value
    if problems:
        raise ConfigError("bad override(s):\n  - " + "\n  - ".join(problems))
    return raw


def _old_section(name: str) -> str | None:
    """Where a moved key used to live (`--set class_weight=balanced` keeps working)."""
    return next((section for section, key in MOVED_KEYS if key == name), None)


def _build_section(kind: type, section: str, values: dict[str, Any], problems: list[str]) -> Any:
    hints = typing.get_type_hints(kind)
    known = {f.name for f in fields(kind)}
    good = {}
    for key, value in values.items():
        if key not in known:
            problems.append(unknown(f"{section}.{key}", [f"{section}.{k}" for k in known], "setting"))
        elif not matches(value := coerce(value, hints[key]), hints[key]):
            problems.append(f"{key}: expected {describe(hints[key])}, got {value!r:.80}")
        else:
            good[key] = float(value) if hints[key] is float else value
    return kind(**good)


def _resolve_data_paths(raw: dict[str, Any], base: Path) -> None:
    """Make relative data paths in a recipe file relative to the file, not the shell's folder."""
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    for key in ("train_file", "val_file"):
        value = data.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            candidate = (base / value).resolve()
            if candidate.exists() or not Path(value).exists():
                data[key] = str(candidate)
