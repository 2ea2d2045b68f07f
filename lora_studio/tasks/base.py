"""What a task is: the small protocol that chat and classify implement, and a new task would too.

A task decides what a run teaches the base and how the result is used. Everything else is shared:
training's skeleton (`training.train`: pin, start, train, fenced save, status), the run folder,
the job queue, the server's guards, the CLI and the UI look a task up once, in `TASKS`, and call
it. See docs/adding-a-task.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..config import Recipe
from ..models import BaseModelRef


class TaskData(Protocol):
    """A task's prepared data: what the skeleton reads of it."""

    train: list[Any]
    val: list[Any]
    report: Any  # a dataclass with `lines()`: written to data_report.json and the log
    fingerprint: str


@dataclass(frozen=True)
class Results:
    """What a task adds to a finished run: final metrics, keys of `lora_studio.json`, files beside
    the adapter, and `write` for results in the run folder (called under the job's fence, on the
    main process only)."""

    metrics: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    extra_files: dict[str, str] = field(default_factory=dict)
    write: Callable[[], None] | None = None


class Task(Protocol):
    name: str
    # True: the adapter writes text (chat, completions, GGUF, generation metrics); False: the doors
    # that generate text refuse it, naming the command that serves it instead (`use_instead`).
    generates_text: bool
    use_instead: str
    # select_best choice -> (the Trainer's metric, greater is better): the task's best-checkpoint rule
    best_checkpoint: dict[str, tuple[str, bool]]

    # --- training (called by training.train, in this order) ------------------------------------
    def check_data(self, recipe: Recipe) -> None:
        """Parse the data files (fast): bad rows fail at submit, not in the queue."""

    def prepare(self, recipe: Recipe, tokenizer: Any) -> TaskData:
        """Read, validate, split and tokenise the data, with its report."""

    def build_model(self, recipe: Recipe, tokenizer: Any, data: TaskData) -> tuple[Any, BaseModelRef]:
        """The base loaded for training, with LoRA attached (the seed is already set)."""

    def trainer(
        self,
        recipe: Recipe,
        model: Any,
        tokenizer: Any,
        data: TaskData,
        ref: BaseModelRef,
        args: dict,
        callbacks: list,
        resuming: bool = False,
    ) -> Any:
        """A Hugging Face Trainer from the shared `args` (keywords) and `callbacks` (trainer_setup);
        `resuming`: the weights will come from a checkpoint (nothing to initialise)."""

    def first_callbacks(self, recipe: Recipe, tokenizer: Any, has_val: bool) -> list[Any]:
        """Callbacks that must run before the metrics log (e.g. a score added at validation)."""

    def results(self, recipe: Recipe, trainer: Any, data: TaskData) -> Results:
        """After training: the best model's validation scores and what is saved with the adapter."""

    # --- use --------------------------------------------------------------------------------------
    def try_it(self, adapter: str) -> str:
        """The command a person runs next, shown when training ends."""

    def merge(self, adapter_dir: Path, out_dir: Path, *, dtype: str, overwrite: bool) -> Any:
        """A standalone model folder with the adapter merged in, checked against the adapter."""

    def verify(self, adapter_dir: Path, **targets: Any) -> Any:
        """The adapter, its merged model and a server give the same answers (a report with .ok)."""
