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
from transformers import TrainerCallback, set_seed

from . import fast_path, runs
from .adapters import attach_lora, save_adapter
from .config import Recipe
from .data import PreparedData, prepare
from .errors import LoraStudioError, TrainingCancelled
from .models import BaseModelRef, load_base, load_tokenizer, model_fingerprint, pick_device, resolve_base
from .remote_code import check_remote_code
from .run_folder import checkpoint_step, last_complete_checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    adapter_dir: Path
    metrics: dict[str, Any]


Fence = Callable[[], contextlib.AbstractContextManager[Any]]


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
    if recipe.task == "classify":  # a new label head on the body: its own data, model and trainer
        from .classify_train import train_classifier

        return train_classifier(recipe, resume=resume, callbacks=callbacks, fence=fence)
    fence = fence or contextlib.nullcontext
    run_dir = recipe.output_dir
    trust_remote_code = check_remote_code(recipe.model)  # refused before anything is read
    ref = resolve_base(recipe.model.base_model, recipe.model.revision)
    tokenizer = load_tokenizer(ref.folder, trust_remote_code)
    data = prepare(
        recipe.data, tokenizer, recipe.train.seed
    )  # bad data fails here, before anything is written
    checkpoint = _last_checkpoint(run_dir) if resume else None

    with fence():
        runs.start(recipe, dataclasses.asdict(data.report), resume_step=_step_of(checkpoint))
    handler = runs.log_to_file(run_dir)
    try:
        model, tokenizer, ref = load_base(recipe.model)
        set_seed(recipe.train.seed)  # the LoRA weights' random init: the same for the same recipe
        model = attach_lora(model, recipe.lora, _use_gradient_checkpointing(recipe))
        fast = fast_path.prepare(recipe, model, tokenizer, data, ref.folder)  # None: the plain path
        trainer = build_trainer(
            recipe, model, tokenizer, data, callbacks, resuming=checkpoint is not None, fence=fence, fast=fast
        )
        trainer = prepare_trainer(trainer) if prepare_trainer else trainer
        _log_start(recipe, model, data)
        try:
            output = trainer.train(resume_from_checkpoint=checkpoint)
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
        metrics = _final_metrics(trainer, output, data)
        adapter_dir = run_dir / "adapter"
        if runs.is_main_process():  # with several processes (accelerate launch), rank 0 writes the adapter
            metadata = _adapter_metadata(recipe, ref, data, metrics)
            with fence():
                save_adapter(trainer.model, tokenizer, adapter_dir, metadata)
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
    recipe: Recipe,
    model: Any,
    tokenizer: Any,
    data: PreparedData,
    callbacks: Sequence[Any] = (),
    resuming: bool = False,
    fence: Fence | None = None,
    fast: fast_path.FastPath | None = None,
) -> Any:
    """TRL's SFTTrainer set up from the recipe: the one place training arguments are chosen.

    With `fast` (see fast_path.py) the same arguments and callbacks drive the fast path's Trainer.
    """
    from datasets import Dataset
    from transformers import EarlyStoppingCallback
    from trl import SFTConfig, SFTTrainer

    t, run_dir = recipe.train, recipe.output_dir
    has_val = bool(data.val)
    device = pick_device(recipe.model.device)
    dtype = str(next(p for p in model.parameters()).dtype)
    args = SFTConfig(
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
        # The base's own validation loss at step 0: how far it starts from the task. A resumed run
        # validates at its start too, so its data order (drawn from the same RNG) matches an uninterrupted run.
        eval_on_start=has_val,
        eval_steps=t.eval_every_steps,
        save_strategy="steps",
        save_steps=t.save_every_steps or t.eval_every_steps,
        save_total_limit=2,
        load_best_model_at_end=has_val,
        metric_for_best_model="eval_balanced" if t.select_best == "balanced" else "eval_loss",
        greater_is_better=False,
        # TRL defaults to bf16 autocast even on CPUs (~12x slower on AVX2-only ones): follow the model's dtype.
        bf16="bfloat16" in dtype and device != "cpu",
        fp16="float16" in dtype and "bfloat16" not in dtype,
        use_cpu=device == "cpu",
        # transformers 5's name for gradient_checkpointing (the old one warns of its deprecation)
        activation_checkpointing=_use_gradient_checkpointing(recipe),
        disable_tqdm=True if owns_console(callbacks) else None,  # None: the Trainer's default
        max_length=recipe.data.max_length,
        packing=False,
        train_sampling_strategy="group_by_length",  # less padding per batch
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        seed=t.seed,
        data_seed=t.seed,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )
    columns = ("input_ids", "labels")
    extra = (
        [EarlyStoppingCallback(t.early_stopping_patience)] if has_val and t.early_stopping_patience else []
    )
    if has_val:  # validation loss rising while training loss falls: say so (overfit.py)
        from .overfit import overfit_callback

        extra.append(overfit_callback(run_dir))
    callbacks = [
        *_balanced(recipe, tokenizer, has_val),
        MetricsLog(run_dir, skip_first_eval=resuming, fence=fence),
        *extra,
        *callbacks,
    ]
    if fast is not None:
        return mute_printed_logs(fast.trainer(args, tokenizer, callbacks))
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([{k: r[k] for k in columns} for r in data.train]),
        eval_dataset=Dataset.from_list([{k: r[k] for k in columns} for r in data.val]) if has_val else None,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    return mute_printed_logs(trainer)


def owns_console(callbacks: Sequence[Any]) -> bool:
    """A callback draws the console itself (progress.ProgressDisplay): the Trainer's bars go."""
    return any(getattr(cb, "owns_console", False) for cb in callbacks)


def mute_printed_logs(trainer: Any) -> Any:
    """With `disable_tqdm` the Trainer prints its raw log dicts instead of bars: drop that too."""
    from transformers import PrinterCallback

    if trainer.args.disable_tqdm and owns_console(trainer.callback_handler.callbacks):
        trainer.remove_callback(PrinterCallback)
    return trainer


def _balanced(recipe: Recipe, tokenizer: Any, has_val: bool) -> list[Any]:
    """select_best: balanced scores general text at each validation (forgetting.py), before the log."""
    if not has_val or recipe.train.select_best != "balanced":
        return []
    from .forgetting import balanced_callback

    return [balanced_callback(tokenizer, recipe.data.max_length)]


def _use_gradient_checkpointing(recipe: Recipe) -> bool:
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


def _log_start(recipe: Recipe, model: Any, data: PreparedData) -> None:
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


def _final_metrics(trainer: Any, output: Any, data: PreparedData) -> dict[str, Any]:
    state = trainer.state
    metrics = {
        "global_step": state.global_step,
        "world_size": trainer.args.world_size,
        "train_loss": output.training_loss,
        "train_runtime_s": output.metrics.get("train_runtime"),
        "tokens_per_second": _tokens_per_second(state, output),
    }
    if data.val:
        metrics["best_val_loss"] = state.best_metric
        metrics["best_checkpoint"] = state.best_model_checkpoint and Path(state.best_model_checkpoint).name
        metrics["val_loss"] = trainer.evaluate()["eval_loss"]
        start = [log["eval_loss"] for log in state.log_history if "eval_loss" in log and log.get("step") == 0]
        metrics["base_val_loss"] = start[0] if start else None
    return metrics


def _tokens_per_second(state: Any, output: Any) -> float | None:
    runtime = output.metrics.get("train_runtime")
    return round(state.num_input_tokens_seen / runtime, 1) if runtime else None


def _adapter_metadata(recipe: Recipe, ref: BaseModelRef, data: PreparedData, metrics: dict) -> dict[str, Any]:
    import peft
    import torch
    import transformers
    import trl

    from . import __version__

    return {
        "lora_studio_version": __version__,
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
