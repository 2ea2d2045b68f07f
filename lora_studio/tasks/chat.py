"""task: chat: teach the base to write answers (chat, instruction, prompt/completion or plain text).

TRL's SFTTrainer trains LoRA on the frozen base, with the loss on the answer's tokens only; the
fast path (fast_path.py) takes over where it is exact. The adapter chats (`lora-studio chat`),
serves POST /v1/chat/completions, merges into a causal LM and exports to GGUF.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import fast_path
from ..adapters import attach_lora
from ..config import Recipe
from ..data import PreparedData, load_examples, prepare
from ..models import BaseModelRef, load_base
from ..trainer_setup import use_gradient_checkpointing
from .base import Results


class ChatTask:
    name = "chat"
    generates_text = True
    use_instead = "`lora-studio chat ADAPTER` or POST /v1/chat/completions"
    best_checkpoint = {"val_loss": ("eval_loss", False), "balanced": ("eval_balanced", False)}

    # --- training ---------------------------------------------------------------------------------
    def check_data(self, recipe: Recipe) -> None:
        for path in (recipe.data.train_file, recipe.data.val_file):
            if path:
                load_examples(path, recipe.data.format, recipe.data.system_prompt, recipe.data.max_length)

    def prepare(self, recipe: Recipe, tokenizer: Any) -> PreparedData:
        return prepare(recipe.data, tokenizer, recipe.train.seed)

    def build_model(self, recipe: Recipe, tokenizer: Any, data: PreparedData) -> tuple[Any, BaseModelRef]:
        model, _, ref = load_base(recipe.model)
        return attach_lora(model, recipe.lora, use_gradient_checkpointing(recipe)), ref

    def first_callbacks(self, recipe: Recipe, tokenizer: Any, has_val: bool) -> list[Any]:
        """select_best: balanced scores general text at each validation, before the metrics log."""
        if not has_val or recipe.train.select_best != "balanced":
            return []
        from ..evaluation.forgetting import balanced_callback

        return [balanced_callback(tokenizer, recipe.data.max_length)]

    def trainer(
        self,
        recipe: Recipe,
        model: Any,
        tokenizer: Any,
        data: PreparedData,
        ref: BaseModelRef,
        args: dict,
        callbacks: list,
        resuming: bool = False,
    ) -> Any:
        """TRL's SFTTrainer, or the fast path's Trainer with the same arguments and callbacks."""
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        config = SFTConfig(**args, max_length=recipe.data.max_length, packing=False)
        fast = fast_path.prepare(recipe, model, tokenizer, data, ref.folder)  # None: the plain path
        if fast is not None:
            return fast.trainer(config, tokenizer, callbacks)

        def rows(encoded: list[dict[str, Any]]) -> Dataset:
            return Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in encoded])

        return SFTTrainer(
            model=model,
            args=config,
            train_dataset=rows(data.train),
            eval_dataset=rows(data.val) if data.val else None,
            processing_class=tokenizer,
            callbacks=callbacks,
        )

    def results(self, recipe: Recipe, trainer: Any, data: PreparedData) -> Results:
        if not data.val:
            return Results()
        state = trainer.state
        start = [row["eval_loss"] for row in state.log_history if "eval_loss" in row and row.get("step") == 0]
        metrics = {
            "best_val_loss": state.best_metric,
            "best_checkpoint": state.best_model_checkpoint and Path(state.best_model_checkpoint).name,
            "val_loss": trainer.evaluate()["eval_loss"],
            "base_val_loss": start[0] if start else None,
        }
        return Results(metrics)

    # --- use --------------------------------------------------------------------------------------
    def try_it(self, adapter: str) -> str:
        return f"try it:  lora-studio chat {adapter} --compare"

    def merge(self, adapter_dir: Path, out_dir: Path, *, dtype: str = "auto", overwrite: bool = False) -> Any:
        from ..export import merge_adapter

        return merge_adapter(adapter_dir, out_dir, dtype=dtype, overwrite=overwrite)

    def verify(self, adapter_dir: Path, **targets: Any) -> Any:
        from ..verify import verify_chat

        return verify_chat(adapter_dir, **targets)
