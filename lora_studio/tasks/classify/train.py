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

import logging
from typing import Any

import torch

from ...config import Recipe
from .data import ClassifyData, LabelMap, class_weights
from .scores import ClassScores, score_predictions

log = logging.getLogger(__name__)


def build_classifier_trainer(
    recipe: Recipe, model: Any, tokenizer: Any, data: ClassifyData, args: dict, callbacks: list
) -> Any:
    """transformers' Trainer from the shared arguments and callbacks, with validation accuracy and macro F1."""
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    has_val = bool(data.val)
    weights = None
    if recipe.classify.class_weight == "balanced":
        weights = torch.tensor(class_weights(data.train_rows, data.label_map))
        log.info("class weights: %s", dict(zip(data.label_map.labels, weights.tolist(), strict=True)))

    def rows(encoded: list[dict[str, Any]]) -> Dataset:
        return Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in encoded])

    return Trainer(
        model=model,
        args=TrainingArguments(**args, label_names=["labels"]),
        train_dataset=rows(data.train),
        eval_dataset=rows(data.val) if has_val else None,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_loss_func=cross_entropy_loss(weights),
        compute_metrics=lambda prediction: eval_scores(prediction, data.label_map),
        callbacks=callbacks,
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
    )
    return metrics, scores


def classification_metadata(recipe: Recipe, label_map: LabelMap) -> dict[str, Any]:
    """What `lora_studio.json` adds for a classifier: the task and the label map."""
    return {
        "task": "classify",
        "classification": {
            **label_map.to_dict(),
            "text_column": recipe.classify.text_column,
            "label_column": recipe.classify.label_column,
            "max_length": recipe.data.max_length,
        },
    }
