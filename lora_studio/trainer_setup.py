"""The Hugging Face Trainer's settings and callbacks that every task shares.

Each task (tasks/) builds its own Trainer, but from these pieces: the arguments chosen in one
place (`trainer_arguments`), the callbacks every run gets (`run_callbacks`: the metrics log, early
stopping, the overfitting alarm), and the console rules. A fix here reaches every task.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from . import runs
from .config import Recipe
from .models import pick_device

Fence = Callable[[], contextlib.AbstractContextManager[Any]]


def trainer_arguments(recipe: Recipe, model: Any, has_val: bool, best: tuple[str, bool], quiet: bool) -> dict:
    """The Trainer's arguments (as keywords) from the recipe: the same for every task.

    `best` is the task's (metric, greater is better) for the recipe's select_best; `quiet`: a
    progress display owns the console, so the Trainer draws no bars of its own.
    """
    t, run_dir = recipe.train, recipe.output_dir
    device = pick_device(recipe.model.device)
    dtype = str(next(p for p in model.parameters()).dtype)
    return dict(
        output_dir=str(run_dir / "checkpoints"),
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a share of all steps
        weight_decay=t.weight_decay,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if has_val else "no",
        # The base's own validation scores at step 0: how far it starts from the task. A resumed run
        # validates at its start too, so its data order (drawn from the same RNG) matches an uninterrupted run.
        eval_on_start=has_val,
        eval_steps=t.eval_every_steps,
        save_strategy="steps",
        save_steps=t.save_every_steps or t.eval_every_steps,
        save_total_limit=2,
        load_best_model_at_end=has_val,
        metric_for_best_model=best[0],
        greater_is_better=best[1],
        # TRL defaults to bf16 autocast even on CPUs (~12x slower on AVX2-only ones): follow the model's dtype.
        bf16="bfloat16" in dtype and device != "cpu",
        fp16="float16" in dtype and "bfloat16" not in dtype,
        use_cpu=device == "cpu",
        # transformers 5's names for gradient_checkpointing* (the old ones warn of their deprecation)
        activation_checkpointing=use_gradient_checkpointing(recipe),
        activation_checkpointing_kwargs={"use_reentrant": False},
        disable_tqdm=True if quiet else None,  # None: the Trainer's default
        train_sampling_strategy="group_by_length",  # less padding per batch
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        seed=t.seed,
        data_seed=t.seed,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )


def run_callbacks(
    recipe: Recipe, has_val: bool, resuming: bool, fence: Fence | None, callbacks: Sequence[Any], first=()
) -> list[Any]:
    """Every run's callbacks: `first` (the task's own, e.g. one scoring at validation before the log),
    the metrics log, early stopping and the overfitting alarm, then the caller's."""
    from transformers import EarlyStoppingCallback

    extra = []
    if has_val and recipe.train.early_stopping_patience:
        extra.append(EarlyStoppingCallback(recipe.train.early_stopping_patience))
    if has_val:  # validation loss rising while training loss falls: say so (evaluation/overfit.py)
        from .evaluation.overfit import overfit_callback

        extra.append(overfit_callback(recipe.output_dir))
    metrics_log = MetricsLog(recipe.output_dir, skip_first_eval=resuming, fence=fence)
    return [*first, metrics_log, *extra, *callbacks]


def owns_console(callbacks: Sequence[Any]) -> bool:
    """A callback draws the console itself (progress.ProgressDisplay): the Trainer's bars go."""
    return any(getattr(cb, "owns_console", False) for cb in callbacks)


def mute_printed_logs(trainer: Any) -> Any:
    """With `disable_tqdm` the Trainer prints its raw log dicts instead of bars: drop that too."""
    from transformers import PrinterCallback

    if trainer.args.disable_tqdm and owns_console(trainer.callback_handler.callbacks):
        trainer.remove_callback(PrinterCallback)
    return trainer


def use_gradient_checkpointing(recipe: Recipe) -> bool:
    choice = recipe.train.gradient_checkpointing
    return choice == "on" or (choice == "auto" and pick_device(recipe.model.device) == "cuda")


class MetricRows:
    """Turns Trainer log events into metrics rows (our names), with tokens/s since the last loss row."""

    NAMES = {
        "loss": "loss",
        "eval_loss": "val_loss",
        "learning_rate": "learning_rate",
        "grad_norm": "grad_norm",
        "train_loss": "train_loss",
        "eval_general_loss": "general_loss",  # select_best: balanced
        "eval_balanced": "balanced",
        "eval_accuracy": "val_accuracy",  # task: classify
        "eval_macro_f1": "val_macro_f1",
    }

    def __init__(self) -> None:
        self._last = (time.time(), 0)  # (time, tokens seen) at the last loss row

    def restart(self, state: Any) -> None:
        """Call at the start of training (or of a resumed run)."""
        self._last = (time.time(), state.num_input_tokens_seen)

    def row(self, state: Any, logs: dict[str, float]) -> dict[str, Any]:
        row: dict[str, Any] = {
            "step": state.global_step,
            "max_steps": state.max_steps,
            "epoch": round(state.epoch or 0, 4),
            "time": round(time.time(), 3),
        }
        row.update({ours: logs[theirs] for theirs, ours in self.NAMES.items() if theirs in logs})
        if "loss" in logs:
            now, seen = time.time(), state.num_input_tokens_seen
            row["tokens_per_second"] = round((seen - self._last[1]) / max(now - self._last[0], 1e-9), 1)
            self._last = (now, seen)
        return row


class MetricsLog(TrainerCallback):
    """Writes the run's metrics rows (metrics.jsonl) and its progress (status.json), through `runs`.

    Progress is written at most every PROGRESS_SECONDS, and at every checkpoint, validation and
    the end, so a stopped run's status names the step of its last checkpoint. A resumed run's first
    validation repeats the one its checkpoint already logged: skip it.
    """

    PROGRESS_SECONDS = 0.5

    def __init__(self, run_dir: Path, skip_first_eval: bool = False, fence: Fence | None = None):
        self.run_dir = Path(run_dir)
        self._rows = MetricRows()
        self._skip_eval = skip_first_eval
        self._fence = fence or contextlib.nullcontext
        self._begin = (time.time(), 0)  # (time, step) when this attempt's training loop began
        self._written = 0.0  # when progress was last written

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        if self._skip_eval and "eval_loss" in logs:
            self._skip_eval = False
            return
        with self._fence():
            runs.append_metrics(self.run_dir, self._rows.row(state, logs))

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._rows.restart(state)
        self._begin = (time.time(), state.global_step)
        self._progress(state, force=True)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._progress(state)

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._progress(state, force=True)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._progress(state, force=True)

    def _progress(self, state: Any, force: bool = False) -> None:
        now = time.time()
        if not state.is_world_process_zero or (not force and now - self._written < self.PROGRESS_SECONDS):
            return
        began, first_step = self._begin
        done = state.global_step - first_step
        per_step = (now - began) / done if done > 0 else None
        with self._fence():
            runs.write_progress(self.run_dir, state.global_step, state.max_steps, per_step)
        self._written = now
