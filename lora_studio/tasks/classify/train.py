"""Training a classifier: the Trainer, its loss and its validation scores (for tasks.classify).

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
import logging
from typing import Any

import torch
from transformers import TrainerCallback

from ...config import Recipe
from .data import ClassifyData, LabelMap, class_weights
from .fast import ClassifyFastPath
from .prompt import ClassifyPrompt
from .scores import ClassScores, score_predictions

log = logging.getLogger(__name__)
FEATURE_BATCH = 16  # training rows per forward pass when the head's start is read


def build_classifier_trainer(
    recipe: Recipe,
    model: Any,
    tokenizer: Any,
    data: ClassifyData,
    args: dict,
    callbacks: list,
    fast: ClassifyFastPath | None = None,
) -> Any:
    """transformers' Trainer from the shared arguments and callbacks, with validation accuracy and
    macro F1. With `fast` (fast.py) the same arguments and callbacks run over its batches."""
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    has_val = bool(data.val)
    weights = None
    if recipe.classify.class_weight == "balanced":
        weights = torch.tensor(class_weights(data.train_rows, data.label_map))
        log.info("class weights: %s", dict(zip(data.label_map.labels, weights.tolist(), strict=True)))

    def rows(encoded: list[dict[str, Any]]) -> Dataset:
        return Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in encoded])

    arguments = TrainingArguments(**args, label_names=["labels"])
    train_set, val_set = rows(data.train), rows(data.val) if has_val else None
    collate = DataCollatorWithPadding(tokenizer)
    if fast is not None:
        arguments, collate = fast.arguments(arguments), fast.collate
        train_set, val_set = (
            fast.dataset(validation=False),
            fast.dataset(validation=True) if has_val else None,
        )
    return Trainer(
        model=model,
        args=arguments,
        train_dataset=train_set,
        eval_dataset=val_set,
        data_collator=collate,
        processing_class=tokenizer,
        compute_loss_func=cross_entropy_loss(weights),
        compute_metrics=lambda prediction: eval_scores(prediction, data.label_map),
        callbacks=callbacks,
    )


def informed_head(model: Any, tokenizer: Any, data: ClassifyData, fast: ClassifyFastPath | None) -> str:
    """Start the head from the label words or the class prototypes (head_init), reading the training
    rows' features through the frozen base once (with the fast path, this fills its feature cache);
    a verbalizer needs no features."""
    from transformers import DataCollatorWithPadding

    from .features import head_inputs
    from .head_init import init_head, init_verbalizer

    if is_verbalizer(data):  # its rows do not depend on the features: no pass through the base
        return init_verbalizer(model, tokenizer, data.label_map.labels)
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


def is_verbalizer(data: ClassifyData) -> bool:
    """Word labels named in the prompt: the head is the base's own rows for those words, kept frozen
    (PET's verbalizer), and LoRA teaches the body to answer with the right one, as a chat LoRA
    learns to write the label, in one forward pass. On the benchmark's held-out word set this scored
    85% against 72.5% for the fitted, trained head (docs/classification.md)."""
    from .head_init import init_kind

    return not data.prompt.plain and init_kind(data.label_map.labels) == "label_words"


def freeze_verbalizer(model: Any, data: ClassifyData) -> None:
    """With a verbalizer (is_verbalizer) the head's rows stay as they start: only LoRA trains."""
    from .features import head_weight

    if is_verbalizer(data):
        head_weight(model).requires_grad_(False)


class KeepStartIfBetter(TrainerCallback):
    """When validation at step 0 (the fitted head on the frozen body) beats the best checkpoint by the
    recipe's select_best, training ends with that start instead: the head's start rows back and every
    LoRA update zeroed. Fine-tuning that does not beat a linear probe on validation is not kept.
    It acts at the train end, after the Trainer loaded its best checkpoint."""

    def __init__(self, model: Any, metric: str, greater_is_better: bool):
        from .features import head_weight

        self.model, self.metric, self.greater = model, metric, greater_is_better
        self.start = head_weight(model).detach().clone()
        self.kept_start = False

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        start = next((r.get(self.metric) for r in state.log_history if r.get("step") == 0), None)
        best = state.best_metric
        if start is None or best is None or start == best or (start > best) != self.greater:
            return
        from .features import head_weight

        with torch.no_grad():
            head_weight(self.model).copy_(self.start)
            for name, parameter in self.model.named_parameters():
                if "lora_B" in name:
                    parameter.zero_()  # B = 0: no LoRA update, the body is the frozen base
        self.kept_start = True
        log.info(
            "validation %s at step 0 (%.4g) beats the best checkpoint's (%.4g): the fitted head on the "
            "frozen body is kept, the body's fine-tuning dropped",
            self.metric.removeprefix("eval_"),
            start,
            best,
        )


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


def final_metrics(
    trainer: Any, data: ClassifyData, recipe: Recipe
) -> tuple[dict[str, Any], ClassScores | None]:
    """The classes, and the best model's validation scores (with the scores for eval/)."""
    state = trainer.state
    metrics: dict[str, Any] = {"classes": len(data.label_map.labels)}
    if not data.val:
        return metrics, None
    result = trainer.predict(trainer.eval_dataset)  # the best model (loaded at the end)
    scores = _scores(result.predictions, result.label_ids, data.label_map)
    start = next((row for row in state.log_history if "eval_loss" in row and row.get("step") == 0), {})
    metrics.update(
        val_loss=result.metrics.get("test_loss"),
        val_accuracy=scores.accuracy,
        val_macro_f1=scores.macro_f1,
        select_best=recipe.train.select_best,
        best_metric=state.best_metric,
        best_checkpoint=state.best_model_checkpoint and state.best_model_checkpoint.rsplit("/", 1)[-1],
        base_val_loss=start.get("eval_loss"),  # the untrained head: chance level
        base_val_accuracy=start.get("eval_accuracy"),
        # True: the fitted head on the frozen body beat every checkpoint on validation and was kept
        kept_start=any(getattr(cb, "kept_start", False) for cb in trainer.callback_handler.callbacks),
    )
    return metrics, scores


def classification_metadata(
    recipe: Recipe, label_map: LabelMap, prompt: ClassifyPrompt | None = None, max_length: int | None = None
) -> dict[str, Any]:
    """What `lora_studio.json` adds for a classifier: the task, the label map, the prompt texts are
    read in (none: bare texts) and the max_length they were cut at (`auto`: the one chosen)."""
    return {
        "task": "classify",
        "classification": {
            **label_map.to_dict(),
            "text_column": recipe.classify.text_column,
            "label_column": recipe.classify.label_column,
            "max_length": recipe.data.max_length if max_length is None else max_length,
            "prompt": (prompt or ClassifyPrompt()).to_dict(),
        },
    }
