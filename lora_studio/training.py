"""Fine-tuning: one recipe in, one run folder with a finished adapter out.

    recipe = Recipe.from_yaml("recipes/smollm2-lora-cpu.yaml", ["max_steps=20"])
    result = train(recipe)          # -> RunResult(run_dir, adapter_dir, metrics)

The run folder is self-describing, so anyone can rerun or resume a job from it alone:
    config.yaml        the resolved recipe, every default filled in
    data_report.json   duplicates, leakage, imbalance and truncation of the data
    metrics.jsonl      one line per log/validation: step, loss, val_loss, learning rate, tokens/s
    status.json        running / succeeded / failed / cancelled / interrupted (runs.STATES), with
                       timestamps, progress, the final metrics or the error
    train.log          the log
    checkpoints/       periodic Trainer checkpoints (for --resume)
    adapter/           the final (best) adapter; appears only when complete

The folder is $LORA_STUDIO_HOME/runs/<name>-<id> unless the recipe sets output_dir; `runs.py`
writes it (and nothing else here does), indexes it, and reads it back. Every file is written
atomically, and a run killed at any moment resumes from its last whole checkpoint (`run_folder`
tells whole from broken). The job service passes a `fence`: a run whose job attempt was taken
over by a newer one writes nothing more to the folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

from safetensors import SafetensorError
from transformers import set_seed

from . import runs
from .adapters import save_adapter
from .config import Recipe
from .errors import LoraStudioError, TrainingCancelled
from .models import BaseModelRef, load_tokenizer, model_fingerprint, resolve_base
from .remote_code import check_remote_code
from .run_folder import checkpoint_step, last_complete_checkpoint
from .tasks.base import Task, TaskData
from .tasks.registry import TASKS
from .thread_tuning import TrainingThreads
from .trainer_setup import (
    Fence,
    MetricRows,
    MetricsLog,
    mute_printed_logs,
    owns_console,
    run_callbacks,
    trainer_arguments,
)

__all__ = ["Fence", "MetricRows", "MetricsLog", "RunResult", "train"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    adapter_dir: Path
    metrics: dict[str, Any]


def train(
    recipe: Recipe,
    *,
    resume: bool = False,
    callbacks: Sequence[Any] = (),
    fence: Fence | None = None,
    prepare_trainer: Callable[[Any], Any] | None = None,
) -> RunResult:
    """Fine-tune a LoRA adapter as the recipe says and return where it was written.

    `callbacks` are extra transformers TrainerCallbacks (the job service stops runs with one; `progress.ProgressDisplay` draws the console in place of the Trainer's own).
    With `resume`, training continues from the run folder's last whole checkpoint.
    `fence()` is entered around every write to the run folder except the Trainer's checkpoints;
    it raises TrainingCancelled when this run may no longer write (its job attempt was superseded).
    `prepare_trainer(trainer)` returns the trainer to run (Ray Train's `prepare_trainer`, in ray_train.py).
    """
    recipe = runs.pin(recipe, resume=resume)  # paths absolute, the run folder chosen
    task = TASKS[recipe.task]
    callbacks = [*callbacks, TrainingThreads(recipe.output_dir, fence)]  # its share of the cores, from now on
    fence = fence or contextlib.nullcontext
    run_dir = recipe.output_dir
    ref = resolve_base(recipe.model.base_model, recipe.model.revision)
    tokenizer = load_tokenizer(ref.folder, check_remote_code(recipe.model))  # refused before anything is read
    data = task.prepare(recipe, tokenizer)  # bad data fails here, before anything is written
    checkpoint = _last_checkpoint(run_dir) if resume else None

    with fence():
        runs.start(recipe, dataclasses.asdict(data.report), resume_step=_step_of(checkpoint))
    handler = runs.log_to_file(run_dir)
    try:
        set_seed(recipe.train.seed)  # the new weights' random init: the same for the same recipe
        model, ref = task.build_model(recipe, tokenizer, data)
        trainer = build_trainer(task, recipe, model, tokenizer, data, ref, callbacks, checkpoint, fence)
        trainer = prepare_trainer(trainer) if prepare_trainer else trainer
        _log_start(recipe, model, data)
        output = _run(trainer, checkpoint)
        results = task.results(recipe, trainer, data)
        metrics = _final_metrics(trainer, output) | results.metrics
        adapter_dir = run_dir / "adapter"
        if runs.is_main_process():  # with several processes (accelerate launch), rank 0 writes the results
            metadata = _adapter_metadata(recipe, ref, data, metrics) | results.metadata
            with fence():
                if results.write is not None:
                    results.write()
                save_adapter(trainer.model, tokenizer, adapter_dir, metadata, extra_files=results.extra_files)
                runs.write_status(run_dir, "succeeded", metrics=metrics, adapter=str(adapter_dir))
            log.info("adapter saved to %s", adapter_dir)
        trainer.accelerator.wait_for_everyone()
        return RunResult(run_dir, adapter_dir, metrics)
    except BaseException as e:
        # TrainingCancelled comes from a callback (the job service) after it saved a checkpoint,
        # or from the fence: then a newer attempt owns the folder and this one must not write.
        with contextlib.suppress(TrainingCancelled), fence():
            runs.write_status(run_dir, runs.ended_state(e), error=f"{type(e).__name__}: {e}")
        raise
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def build_trainer(
    task: Task,
    recipe: Recipe,
    model: Any,
    tokenizer: Any,
    data: TaskData,
    ref: BaseModelRef,
    callbacks: Sequence[Any] = (),
    checkpoint: str | None = None,
    fence: Fence | None = None,
) -> Any:
    """The task's Trainer, from the arguments and callbacks every task shares (trainer_setup)."""
    has_val = bool(data.val)
    best = task.best_checkpoint[recipe.train.select_best]
    args = trainer_arguments(recipe, model, has_val, best, quiet=owns_console(callbacks))
    first = task.first_callbacks(recipe, tokenizer, has_val)
    every = run_callbacks(recipe, has_val, checkpoint is not None, fence, callbacks, first)
    trainer = task.trainer(recipe, model, tokenizer, data, ref, args, every, resuming=checkpoint is not None)
    return mute_printed_logs(trainer)


def _run(trainer: Any, checkpoint: str | None) -> Any:
    """trainer.train(), resuming from `checkpoint`; a damaged checkpoint is one line saying what to do."""
    try:
        return trainer.train(resume_from_checkpoint=checkpoint)
    except (  # a damaged checkpoint shows up as any of these (unreadable adapter weights, optimizer, rng)
        RuntimeError,
        OSError,
        ValueError,
        KeyError,
        SafetensorError,
        UnpicklingError,
    ) as e:
        if checkpoint is None or trainer.state.global_step > _step_of(checkpoint):
            raise  # not about the checkpoint: training got past it
        raise LoraStudioError(
            f"cannot resume from {checkpoint}: it is damaged or incomplete ({e}). "
            "Delete that checkpoint folder to resume from the one before it."
        ) from None


# --- run folder ---------------------------------------------------------------------------------
def _step_of(checkpoint: str | None) -> int | None:
    return checkpoint_step(checkpoint) if checkpoint else None


def _last_checkpoint(run_dir: Path) -> str:
    last = last_complete_checkpoint(run_dir)
    if last is None:
        raise LoraStudioError(
            f"nothing to resume: {run_dir / 'checkpoints'} has no complete checkpoint yet; "
            "start the run without --resume"
        )
    return str(last)


def _log_start(recipe: Recipe, model: Any, data: TaskData) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info(
        "training %s: %s trainable of %s parameters (%.2f%%)",
        recipe.name,
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
    )
    for line in data.report.lines():
        log.info("data %s", line)


def _final_metrics(trainer: Any, output: Any) -> dict[str, Any]:
    state = trainer.state
    return {
        "global_step": state.global_step,
        "world_size": trainer.args.world_size,
        "train_loss": output.training_loss,
        "train_runtime_s": output.metrics.get("train_runtime"),
        "tokens_per_second": _tokens_per_second(state, output),
    }


def _tokens_per_second(state: Any, output: Any) -> float | None:
    runtime = output.metrics.get("train_runtime")
    return round(state.num_input_tokens_seen / runtime, 1) if runtime else None


def _adapter_metadata(recipe: Recipe, ref: BaseModelRef, data: TaskData, metrics: dict) -> dict[str, Any]:
    import peft
    import torch
    import transformers
    import trl

    from .version import __version__

    return {
        "lora_studio_version": __version__,
        "task": recipe.task,
        "base_model": recipe.model.base_model,
        "base_model_hash": model_fingerprint(ref.folder),
        "recipe": recipe.to_dict(),
        "data_fingerprint": data.fingerprint,
        "data_report": dataclasses.asdict(data.report),
        "metrics": metrics,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "trl": trl.__version__,
        },
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
