"""task: classify: keep the pretrained body, put a new head sized to the labels on it, pick one label per text.

The building blocks: `data` (labeled rows, stratified split, report), `model` (the base as a
sequence classifier, LoRA on the body, `Classifier` to use it), `train` (the Trainer's loss and
scores), `scores` (accuracy, macro F1, confusion matrix), `files` (label a data file), `export`
(merge, verify). The adapter serves POST /v1/classify and merges into a plain
`AutoModelForSequenceClassification`; it does not write text, so the chat doors refuse it.
"""

from __future__ import annotations

import json
import logging
import typing
from pathlib import Path
from typing import Any

from ...config import Recipe, VerifyTarget
from ...models import BaseModelRef
from ..base import Results
from ..kinds import USE_INSTEAD

log = logging.getLogger(__name__)


class ClassifyTask:
    name = "classify"
    generates_text = False
    use_instead = USE_INSTEAD["classify"]
    best_checkpoint = {
        "val_loss": ("eval_loss", False),
        "macro_f1": ("eval_macro_f1", True),
        "accuracy": ("eval_accuracy", True),
    }

    # --- training ---------------------------------------------------------------------------------
    def check_data(self, recipe: Recipe) -> None:
        from .data import load_labeled
        from .lengths import reading_bound

        for path in (recipe.data.train_file, recipe.data.val_file):
            if path:
                columns = recipe.classify
                load_labeled(
                    path, columns.text_column, columns.label_column, reading_bound(recipe.data.max_length)
                )

    def prepare(self, recipe: Recipe, tokenizer: Any) -> Any:
        from .data import prepare_classification

        data = prepare_classification(recipe.data, tokenizer, recipe.train.seed, recipe.classify)
        tokenizer.padding_side = "right"  # the head reads the last token that is not padding
        tokenizer.model_max_length = data.max_length  # saved with it: a merged model truncates alike
        return data

    def build_model(self, recipe: Recipe, tokenizer: Any, data: Any) -> tuple[Any, BaseModelRef]:
        from ...trainer_setup import use_gradient_checkpointing
        from .model import attach_classification_lora, load_classification_base

        model, ref = load_classification_base(recipe.model, data.label_map.labels, tokenizer.pad_token_id)
        model.config.use_cache = False  # no key/value cache in the outputs: only logits are compared
        return attach_classification_lora(model, recipe.lora, use_gradient_checkpointing(recipe)), ref

    def first_callbacks(self, recipe: Recipe, tokenizer: Any, has_val: bool) -> list[Any]:
        return []

    def trainer(
        self,
        recipe: Recipe,
        model: Any,
        tokenizer: Any,
        data: Any,
        ref: BaseModelRef,
        args: dict,
        callbacks: list,
        resuming: bool = False,
    ) -> Any:
        from .fast import prepare as prepare_fast_path
        from .train import KeepStartIfBetter, build_classifier_trainer, freeze_verbalizer, informed_head

        fast = prepare_fast_path(recipe, model, tokenizer, data, ref.folder)  # None: the plain path
        if not resuming:  # a resumed run's head comes from its checkpoint
            informed_head(model, tokenizer, data, fast)
            if data.val:  # the start is a candidate too: kept when fine-tuning does not beat it
                best = self.best_checkpoint[recipe.train.select_best]
                callbacks = [*callbacks, KeepStartIfBetter(model, *best)]
        freeze_verbalizer(model, data)  # resumed too: the same parameters train
        return build_classifier_trainer(recipe, model, tokenizer, data, args, callbacks, fast)

    def results(self, recipe: Recipe, trainer: Any, data: Any) -> Results:
        """The best model's validation scores (metrics, and eval/ in the run folder); the label map in
        lora_studio.json and labels.json."""
        from .model import LABELS_FILE
        from .scores import write_scores
        from .train import classification_metadata, final_metrics

        metrics, scores = final_metrics(trainer, data, recipe)

        def write() -> None:
            if scores is not None:
                title = f"{recipe.name}: validation, {scores.rows} rows"
                write_scores(scores, recipe.output_dir / "eval", title)
                log.info("validation scores:\n%s", "\n".join(scores.lines()))

        labels = json.dumps(data.label_map.to_dict(), indent=2)
        metadata = classification_metadata(recipe, data.label_map, data.prompt, data.max_length)
        return Results(metrics, metadata, {LABELS_FILE: labels}, write)

    # --- use --------------------------------------------------------------------------------------
    def try_it(self, adapter: str) -> str:
        return f'try it:  lora-studio classify {adapter} "a text to label"'

    def merge(self, adapter_dir: Path, out_dir: Path, *, dtype: str = "auto", overwrite: bool = False) -> Any:
        from .export import merge_classifier

        return merge_classifier(adapter_dir, out_dir, dtype=dtype, overwrite=overwrite)

    def verify(self, adapter_dir: Path, **targets: Any) -> Any:
        from .export import verify_classifier

        targets.setdefault("targets", typing.get_args(VerifyTarget))  # GGUF: reported as not checked
        prompts = targets.pop("prompts", None)
        for chat_only in ("gguf_file", "quant", "max_new_tokens"):
            targets.pop(chat_only, None)
        texts = [p[-1]["content"] for p in prompts] if prompts else None
        return verify_classifier(adapter_dir, texts=texts, **targets)
