"""Training a classifier: `train(recipe)` comes here when the recipe says `task: classify`.

The base is loaded as a sequence classifier with a new head sized to the labels in the data; LoRA
goes on the body and the head is trained in full (see `classifier`). transformers' `Trainer` runs
it (TRL's trainers are for text generation). The run folder is the chat run folder (config.yaml,
data_report.json, metrics.jsonl with val_accuracy and val_macro_f1, status.json, train.log,
checkpoints/, adapter/) plus
    eval/scores.json     accuracy, macro F1, per-class precision/recall and the confusion matrix
    eval/confusion.png   the confusion matrix, of the best model on the validation split
and the adapter's `lora_studio.json` and `labels.json` hold the label map.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Sequence
from typing import Any

import torch

from . import classify_fast, runs
from .adapters import save_adapter
from .classifier import LABELS_FILE, attach_classification_lora, load_classification_base
from .classify_data import ClassifyData, LabelMap, class_weights, prepare_classification
from .classify_metrics import ClassScores, score_predictions, write_scores
from .config import Recipe
from .errors import TrainingCancelled
from .models import load_tokenizer, pick_device, resolve_base
from .remote_code import check_remote_code
from .training import (
    Fence,
    MetricsLog,
    RunResult,
    _adapter_metadata,
    _last_checkpoint,
    _log_start,
    _step_of,
    _tokens_per_second,
    _use_gradient_checkpointing,
    mute_printed_logs,
    owns_console,
)

log = logging.getLogger(__name__)
FEATURE_BATCH = 16  # training rows per forward pass when the head's start is read

# recipe name -> (Trainer metric, greater is better)
BEST_METRIC = {
    "val_loss": ("eval_loss", False),
    "macro_f1": ("eval_macro_f1", True),
    "accuracy": ("eval_accuracy", True),
}


def train_classifier(
    recipe: Recipe, *, resume: bool = False, callbacks: Sequence[Any] = (), fence: Fence | None = None
) -> RunResult:
    """Fine-tune a classification adapter as the recipe says; same contract as `training.train`,
    the job's `fence` included (a superseded attempt writes nothing more to the run folder)."""
    from transformers import set_seed

    fence = fence or contextlib.nullcontext
    run_dir = recipe.output_dir
    ref = resolve_base(recipe.model.base_model, recipe.model.revision)
    tokenizer = load_tokenizer(ref.folder, check_remote_code(recipe.model))
    data = prepare_classification(
        recipe.data, tokenizer, recipe.train.seed
    )  # bad data fails before any write
    tokenizer.padding_side = "right"
    tokenizer.model_max_length = (
        recipe.data.max_length
    )  # saved with it: a merged model truncates the same way
    checkpoint = _last_checkpoint(run_dir) if resume else None

    with fence():
        runs.start(recipe, dataclasses.asdict(data.report), resume_step=_step_of(checkpoint))
    handler = runs.log_to_file(run_dir)
    try:
        set_seed(recipe.train.seed)  # the new head's first weights
        model, ref = load_classification_base(recipe.model, data.label_map.labels, tokenizer.pad_token_id)
        model.config.use_cache = False  # no key/value cache in the outputs: only logits are compared
        model = attach_classification_lora(model, recipe.lora, _use_gradient_checkpointing(recipe))
        fast = classify_fast.prepare(recipe, model, tokenizer, data, ref.folder)  # None: the plain path
        if checkpoint is None:  # a resumed run's head comes from its checkpoint
            informed_head(model, tokenizer, data, fast)
        trainer = build_classifier_trainer(
            recipe, model, tokenizer, data, callbacks, resuming=checkpoint is not None, fence=fence, fast=fast
        )
        _log_start(recipe, model, data)
        output = trainer.train(resume_from_checkpoint=checkpoint)
        metrics, scores = _final_metrics(trainer, output, data, recipe)
        adapter_dir = run_dir / "adapter"
        if runs.is_main_process():  # with several processes (accelerate launch), rank 0 writes the results
            metadata = _adapter_metadata(recipe, ref, data, metrics) | classification_metadata(
                recipe, data.label_map
            )
            labels = json.dumps(data.label_map.to_dict(), indent=2)
            with fence():
                if scores is not None:
                    write_scores(scores, run_dir / "eval", f"{recipe.name}: validation, {scores.rows} rows")
                    log.info("validation scores:\n%s", "\n".join(scores.lines()))
                save_adapter(
                    trainer.model, tokenizer, adapter_dir, metadata, extra_files={LABELS_FILE: labels}
                )
                runs.write_status(run_dir, "succeeded", metrics=metrics, adapter=str(adapter_dir))
            log.info("adapter saved to %s", adapter_dir)
        trainer.accelerator.wait_for_everyone()
        return RunResult(run_dir, adapter_dir, metrics)
    except BaseException as e:
        with contextlib.suppress(TrainingCancelled), fence():  # as in training.train
            runs.write_status(run_dir, runs.ended_state(e), error=f"{type(e).__name__}: {e}")
        raise
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def build_classifier_trainer(
    recipe: Recipe,
    model: Any,
    tokenizer: Any,
    data: ClassifyData,
    callbacks: Sequence[Any] = (),
    resuming: bool = False,
    fence: Fence | None = None,
    fast: classify_fast.ClassifyFastPath | None = None,
) -> Any:
    """transformers' Trainer set up from the recipe, with validation accuracy and macro F1.

    With `fast` (classify_fast.py) the same arguments and callbacks run over its batches."""
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, EarlyStoppingCallback, Trainer

    t, run_dir, has_val = recipe.train, recipe.output_dir, bool(data.val)
    weights = None
    if t.class_weight == "balanced":
        weights = torch.tensor(class_weights(data.train_rows, data.label_map))
        log.info("class weights: %s", dict(zip(data.label_map.labels, weights.tolist(), strict=True)))

    def rows(encoded: list[dict[str, Any]]) -> Dataset:
        return Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in encoded])

    early = (
        [EarlyStoppingCallback(t.early_stopping_patience)] if has_val and t.early_stopping_patience else []
    )
    args = training_arguments(recipe, model, has_val, quiet=owns_console(callbacks))
    train_set, val_set = rows(data.train), rows(data.val) if has_val else None
    collate = DataCollatorWithPadding(tokenizer)
    if fast is not None:
        args, collate = fast.arguments(args), fast.collate
        train_set, val_set = (
            fast.dataset(validation=False),
            fast.dataset(validation=True) if has_val else None,
        )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=val_set,
        data_collator=collate,
        processing_class=tokenizer,
        compute_loss_func=cross_entropy_loss(weights),
        compute_metrics=lambda prediction: eval_scores(prediction, data.label_map),
        callbacks=[MetricsLog(run_dir, skip_first_eval=resuming, fence=fence), *early, *callbacks],
    )
    return mute_printed_logs(trainer)


def training_arguments(recipe: Recipe, model: Any, has_val: bool, quiet: bool = False) -> Any:
    """The one place the Trainer's settings are chosen for a classifier (the chat twin is in training).

    `quiet`: a progress display owns the console, so the Trainer draws no bars of its own.
    """
    from transformers import TrainingArguments

    t, run_dir = recipe.train, recipe.output_dir
    device = pick_device(recipe.model.device)
    dtype = str(next(p for p in model.parameters()).dtype)
    best, greater = BEST_METRIC[t.metric_for_best_model]
    return TrainingArguments(
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
        eval_on_start=has_val,  # the untrained head's scores: the floor training starts from
        eval_steps=t.eval_every_steps,
        save_strategy="steps",
        save_steps=t.save_every_steps or t.eval_every_steps,
        save_total_limit=2,
        load_best_model_at_end=has_val,
        metric_for_best_model=best,
        greater_is_better=greater,
        bf16="bfloat16" in dtype and device != "cpu",
        fp16="float16" in dtype and "bfloat16" not in dtype,
        use_cpu=device == "cpu",
        # activation_*: transformers 5's names (gradient_checkpointing* are deprecated)
        activation_checkpointing=_use_gradient_checkpointing(recipe),
        activation_checkpointing_kwargs={"use_reentrant": False},
        disable_tqdm=True if quiet else None,
        train_sampling_strategy="group_by_length",  # less padding per batch
        include_num_input_tokens_seen="non_padding",
        label_names=["labels"],
        report_to="none",
        seed=t.seed,
        data_seed=t.seed,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )


def informed_head(
    model: Any, tokenizer: Any, data: ClassifyData, fast: classify_fast.ClassifyFastPath | None
) -> str:
    """Start the head from the label words or the class prototypes (head_init), reading the training
    rows' features through the frozen base once (with the fast path, this fills its feature cache)."""
    from transformers import DataCollatorWithPadding

    from .head_features import head_inputs
    from .head_init import init_head

    collate = fast.collate if fast is not None else DataCollatorWithPadding(tokenizer)
    order = sorted(range(len(data.train)), key=lambda i: len(data.train[i]["input_ids"]))  # less padding
    batches = (
        collate([{**data.train[i], "row": i} for i in order[start : start + FEATURE_BATCH]])
        if fast is not None
        else collate(
            [{"input_ids": data.train[i]["input_ids"]} for i in order[start : start + FEATURE_BATCH]]
        )
        for start in range(0, len(order), FEATURE_BATCH)
    )
    with fast.autocast() if fast is not None else contextlib.nullcontext():
        last, _ = head_inputs(model, batches)
    features = torch.empty_like(last)
    features[order] = last
    label_ids = torch.tensor([row["labels"] for row in data.train])
    return init_head(model, tokenizer, data.label_map.labels, features, label_ids)


def cross_entropy_loss(weights: torch.Tensor | None) -> Any:
    """The Trainer's loss: cross-entropy, optionally class-weighted, normalised over the whole
    accumulated batch (`num_items_in_batch`) so gradient accumulation gives the same update."""

    def loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        logits = outputs["logits"].float()
        weight = weights.to(logits.device) if weights is not None else None
        total = torch.nn.functional.cross_entropy(
            logits, labels.to(logits.device), weight=weight, reduction="sum"
        )
        return total / (num_items_in_batch if num_items_in_batch is not None else labels.numel())

    return loss


def eval_scores(prediction: Any, label_map: LabelMap) -> dict[str, float]:
    scores = _scores(prediction.predictions, prediction.label_ids, label_map)
    return {"accuracy": scores.accuracy, "macro_f1": scores.macro_f1}


def _scores(predictions: Any, label_ids: Any, label_map: LabelMap) -> ClassScores:
    logits = predictions[0] if isinstance(predictions, tuple) else predictions
    return score_predictions(list(label_ids), list(logits.argmax(-1)), label_map.labels)


def _final_metrics(
    trainer: Any, output: Any, data: ClassifyData, recipe: Recipe
) -> tuple[dict[str, Any], ClassScores | None]:
    state = trainer.state
    metrics: dict[str, Any] = {
        "global_step": state.global_step,
        "world_size": trainer.args.world_size,
        "train_loss": output.training_loss,
        "train_runtime_s": output.metrics.get("train_runtime"),
        "tokens_per_second": _tokens_per_second(state, output),
        "classes": len(data.label_map.labels),
    }
    if not data.val:
        return metrics, None
    result = trainer.predict(trainer.eval_dataset)  # the best model (loaded at the end)
    scores = _scores(result.predictions, result.label_ids, data.label_map)
    start = next((row for row in state.log_history if "eval_loss" in row and row.get("step") == 0), {})
    metrics.update(
        val_loss=result.metrics.get("test_loss"),
        val_accuracy=scores.accuracy,
        val_macro_f1=scores.macro_f1,
        metric_for_best_model=recipe.train.metric_for_best_model,
        best_metric=state.best_metric,
        best_checkpoint=state.best_model_checkpoint and state.best_model_checkpoint.rsplit("/", 1)[-1],
        base_val_loss=start.get("eval_loss"),  # the untrained head: chance level
        base_val_accuracy=start.get("eval_accuracy"),
    )
    return metrics, scores


def classification_metadata(recipe: Recipe, label_map: LabelMap) -> dict[str, Any]:
    """What `lora_studio.json` adds for a classifier: the task and the label map."""
    return {
        "task": "classify",
        "classification": {
            **label_map.to_dict(),
            "text_column": recipe.data.text_column,
            "label_column": recipe.data.label_column,
            "max_length": recipe.data.max_length,
        },
    }
