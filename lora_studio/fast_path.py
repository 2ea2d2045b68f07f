"""The fast path: the same LoRA training, with less work wherever skipping it is exact.

Three levers for every task, each measured on its own by `lora-studio bench`:
  cache       with `layers: N`, the frozen blocks below the top N run once, not in every epoch
              (their output is a fixed function of the tokens): see feature_cache.py
  label_only  the vocabulary projection and loss only where a token carries a label: label_loss.py
  bf16        bf16 autocast on CPUs with native bf16 (AVX-512 BF16 / AMX); weights stay fp32
and one a task brings (`not_for_task` rules it out elsewhere):
  prefix      the prompt start every row shares runs once per batch (task: classify, its prefix.py)

It trains the same PEFT model with the same Trainer as the plain path (so checkpoints, resume,
callbacks, metrics and the adapter folder are the same); only what the model computes changes.
The cached lower blocks are wrapped to pass their input through, and the model gets their stored
output as `inputs_embeds`: its own forward still makes the positions (rotary), masks and the top
blocks. With label_only the output layer passes through too, and the loss applies its frozen
weights to the labelled positions alone. Before training a few rows are computed both ways (in
fp32); if the losses differ (a model whose forward does something we do not expect), the plain
path runs instead.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .adapters import decoder_blocks
from .config import Recipe
from .data import IGNORE_INDEX, PreparedData
from .feature_cache import FeatureCache, cache_key
from .hardware import cpu_has_native_bf16
from .label_loss import label_only_loss
from .models import model_fingerprint
from .version import __version__

log = logging.getLogger(__name__)

SPEEDUPS = ("cache", "label_only", "bf16", "prefix")
CHECK_ROWS = 4  # training rows computed both ways before training
# Below this width autocast's per-op casts cost more than bf16 matmuls save (tiny test model, hidden
# size 32: 4x slower; SmolLM2, 576: see `lora-studio bench`).
MIN_BF16_WIDTH = 256
NOT_FOR_CHAT = {"prefix": "chat rows run whole (the shared-start lever is task: classify's, for its prompt)"}
CHECK_RTOL = 2e-3  # fp16 feature storage moves the loss by ~1e-4 (SmolLM2: 6e-5); a wrong forward by far more


@dataclasses.dataclass(frozen=True)
class Levers:
    cache: bool = False
    label_only: bool = False
    bf16: bool = False
    prefix: bool = False

    def names(self) -> list[str]:
        return [name for name in SPEEDUPS if getattr(self, name)]


# --- choosing levers ---------------------------------------------------------------------------
def choose_levers(recipe: Recipe, model: Any, not_for_task: dict[str, str] | None = None) -> Levers:
    """The levers the recipe allows that are exact for this model; one log line per one ruled out.

    `not_for_task` names levers the task has no use for, with the reason (a classifier's head has
    no vocabulary projection for label_only to cut)."""
    wanted = recipe.train.speedups
    wanted = {"auto": SPEEDUPS, "none": ()}.get(wanted, wanted) if isinstance(wanted, str) else wanted
    chosen = {}
    for name in wanted:
        reason = (not_for_task or {}).get(name) or _ruled_out(name, recipe, model)
        if reason:
            log.info("fast path: no %s: %s", name, reason)
        chosen[name] = reason is None
    return Levers(**chosen)


def _ruled_out(name: str, recipe: Recipe, model: Any) -> str | None:
    base = model.get_base_model()
    if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
        return "the base is quantized (QLoRA)"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "training runs in several processes"
    if name in ("cache", "label_only") and recipe.train.select_best == "balanced":
        # its general-text score runs the model's own forward, which these levers cut short
        return "select_best: balanced scores general text with the whole model"
    if name == "cache":
        return _cache_ruled_out(recipe, model)
    if name == "prefix":
        return None  # the task that brings it checks its rows (tasks/classify/fast.py)
    if name == "label_only":
        head = base.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            return "the model has no plain linear output layer"
        if any(p.requires_grad for p in head.parameters()):
            return "the output layer is trained (modules_to_save)"
        return None
    return bf16_ruled_out(base)


def bf16_ruled_out(base: Any) -> str | None:
    """Why bf16 autocast would not speed up this (unquantized) model on its device; None: it would.
    Training's bf16 lever and a classifier's inference (tasks/classify/model.py) share this rule."""
    param = next(base.parameters())
    if param.device.type != "cpu":
        return f"on {param.device.type} the weights' dtype ({param.dtype}) is used"
    if param.dtype != torch.float32:
        return f"the weights are {param.dtype} already"
    if not cpu_has_native_bf16():
        return "this CPU has no native bf16 (AVX-512 BF16 or AMX), so fp32 is faster here"
    if base.config.hidden_size < MIN_BF16_WIDTH:
        return (
            f"the model is too narrow (hidden size {base.config.hidden_size}) for bf16 to pay for its casts"
        )
    return None


def _cache_ruled_out(recipe: Recipe, model: Any) -> str | None:
    _, blocks = decoder_blocks(model)
    if recipe.lora.layers is None or recipe.lora.layers >= len(blocks):
        return "every block is adapted (set `layers` to adapt only the top blocks)"
    if recipe.train.gradient_checkpointing == "on":
        return "gradient_checkpointing is on"
    lower = blocks[: len(blocks) - recipe.lora.layers]
    if any(p.requires_grad for p in lower.parameters()) or recipe.lora.modules_to_save:
        return "something below the top blocks is trained"
    config = model.get_base_model().config.to_dict()
    dropouts = {k: v for k, v in config.items() if ("dropout" in k or "pdrop" in k) and isinstance(v, float)}
    if any(v > 0 for v in dropouts.values()) or any(
        isinstance(m, nn.Dropout) and m.p > 0 for m in lower.modules()
    ):
        return "the model uses dropout, so the frozen blocks' output is not fixed"
    return None


# --- preparing the model -----------------------------------------------------------------------
def prepare(
    recipe: Recipe, model: Any, tokenizer: Any, data: PreparedData, base_folder: Path
) -> FastPath | None:
    """The fast path for this run, or None (the plain path) when no lever is allowed and exact."""
    levers = choose_levers(recipe, model, not_for_task=NOT_FOR_CHAT)
    if not levers.names():
        return None
    fast = FastPath(model, levers, tokenizer.pad_token_id, data.train + data.val, len(data.train))
    if levers.cache:
        fast.use_cache(recipe.lora.layers, model_fingerprint(base_folder))
    problem = fast.check_against_plain()
    if problem:
        fast.restore()
        log.info("fast path: not used, the plain path runs: %s", problem)
        return None
    log.info("fast path: %s", ", ".join(levers.names()))
    return fast


class Skippable(nn.Module):
    """Wraps a frozen module whose work is done elsewhere: while `skip` is set, its input passes through.

    The wrapped module stays a child, so parameter counts and `FastPath.restore` stay simple.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.skip = True

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states if self.skip else self.module(hidden_states, *args, **kwargs)


class _LowerOutput(Exception):  # noqa: N818 - a signal, not an error
    """Ends a forward pass right after the cached blocks, carrying their output."""

    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


class FastPath:
    """A PEFT model prepared for the fast path, its batches, its loss and its Trainer."""

    def __init__(self, model: Any, levers: Levers, pad_id: int | None, rows: list[dict], n_train: int):
        self.model, self.levers = model, levers
        self.base = model.get_base_model()
        self.pad_id = pad_id if pad_id is not None else 0
        self.rows, self.n_train = rows, n_train  # training rows first, then validation rows
        self.head = self.base.get_output_embeddings()
        self.cache: FeatureCache | None = None
        self.start_features: torch.Tensor | None = None  # use_cache's `start` through the cached blocks
        self.lower: list[Skippable] = []  # the cached blocks, wrapped
        self._swapped: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, name, original)
        self.dtype = next(self.base.parameters()).dtype
        self.device = next(self.base.parameters()).device

    def autocast(self, enabled: bool = True) -> contextlib.AbstractContextManager:
        if self.levers.bf16 and enabled:
            return torch.autocast(self.device.type, torch.bfloat16)
        return contextlib.nullcontext()

    # --- module swaps ------------------------------------------------------------------------
    def _wrap(self, parent: nn.Module, name: str) -> Skippable:
        original = getattr(parent, name)
        parent._modules[name] = wrapper = Skippable(original)  # list items ("3") and attributes alike
        self._swapped.append((parent, name, original))
        return wrapper

    def restore(self) -> None:
        """Put the model back as it was (every wrapped module in place)."""
        while self._swapped:
            parent, name, original = self._swapped.pop()
            parent._modules[name] = original
        self.lower = []
        self.model.__dict__.pop("main_input_name", None)
        if self.cache is not None:
            self.cache.close()

    def swap_head(self) -> None:
        """With label_only the output layer passes the final hidden states through to `loss`."""
        name = next(name for name, module in self.base.named_modules() if module is self.head)
        parent, _, attr = name.rpartition(".")
        self._wrap(self.base.get_submodule(parent), attr)

    # --- cached features ---------------------------------------------------------------------
    def use_cache(self, top_blocks: int, base_hash: str, start: Sequence[int] = ()) -> None:
        """Skip every block below the top `top_blocks`; their output comes from a FeatureCache.

        `start`: tokens every row begins with (a task's prompt). The cache then holds each row from
        after it, computed with the start's keys and values (run once, `start_features` its output)."""
        import transformers

        _, blocks = decoder_blocks(self.model)
        n_lower = len(blocks) - top_blocks
        token_rows = [row["input_ids"][len(start) :] for row in self.rows]
        key = cache_key(
            token_rows,
            start=list(start),
            base=base_hash,
            revision=getattr(self.base.config, "_commit_hash", None),
            lower_blocks=n_lower,
            bf16=self.levers.bf16,  # autocast
            weights=str(self.dtype),
            device=self.device.type,
            quantization=str(getattr(self.base, "quantization_method", None) or "none"),
            versions=[torch.__version__, transformers.__version__, np.__version__, __version__],
        )
        self.lower = [self._wrap(blocks, str(i)) for i in range(n_lower)]
        lower = self._run_lower
        if start:
            from transformers import DynamicCache

            ids = torch.tensor([list(start)])
            self.start_features, start_cache = self._lower_with_cache(
                ids, torch.ones_like(ids), DynamicCache(config=self.base.config)
            )
            lower = functools.partial(self._run_lower, start=start_cache)
        self.cache = FeatureCache(key, token_rows, self.base.config.hidden_size, lower)
        self.model.main_input_name = "inputs_embeds"  # the Trainer counts tokens in its model's main input

    def plain(self) -> contextlib.AbstractContextManager:
        """Within it the cached blocks run again: the model computes what the plain path computes."""
        return self._lower_blocks_on()

    @contextlib.contextmanager
    def _lower_blocks_on(self) -> Iterator[None]:
        for block in self.lower:
            block.skip = False
        try:
            yield
        finally:
            for block in self.lower:
                block.skip = True

    @torch.no_grad()
    def _run_lower(
        self, ids: torch.Tensor, mask: torch.Tensor, autocast: bool = True, start: Any = None
    ) -> torch.Tensor:
        """The cached blocks' output: the model's own forward (positions, masks), stopped after them.
        With `start` (a key/value cache of tokens before these, `use_cache`) the rows follow on from it."""
        if start is None:
            return self._lower_with_cache(ids, mask, autocast=autocast)[0]
        cache = copy.deepcopy(start)
        cache.batch_repeat_interleave(len(ids))
        before = torch.ones(len(ids), cache.get_seq_length(), dtype=mask.dtype)
        return self._lower_with_cache(ids, torch.cat([before, mask], dim=1), cache, autocast)[0]

    @torch.no_grad()
    def _lower_with_cache(
        self, ids: torch.Tensor, mask: torch.Tensor, cache: Any = None, autocast: bool = True
    ) -> tuple[torch.Tensor, Any]:
        """`_run_lower`, and the key/value `cache` the cached blocks filled (none kept unless given)."""

        def stop(module: nn.Module, args: Any, out: Any) -> None:
            raise _LowerOutput(out[0] if isinstance(out, tuple) else out)

        keys = {"cache": cache} if cache is not None else {"use_cache": False}
        hook = self.lower[-1].register_forward_hook(stop)
        was_training = self.model.training
        self.model.eval()
        try:
            with self._lower_blocks_on(), self.autocast(autocast):
                self.base.get_decoder()(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **keys
                )
        except _LowerOutput as done:
            return done.hidden, cache
        finally:
            hook.remove()
            self.model.train(was_training)
        raise AssertionError("the decoder never reached the last cached block")

    # --- batches and loss --------------------------------------------------------------------
    def collate(
        self, examples: list[dict[str, Any]], features: list[torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Right-padded batch: cached features as `inputs_embeds` (or token ids), mask and labels."""
        batch = self._padded(examples)
        if self.cache is None:
            return batch
        features = features or self.cache.rows([e["row"] for e in examples])
        embeds = torch.zeros(*batch.pop("input_ids").shape, self.cache.dim, dtype=self.dtype)
        for j, row in enumerate(features):
            embeds[j, : len(row)] = row.to(self.dtype)
        batch["inputs_embeds"] = embeds
        return batch

    def _padded(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Token ids, attention mask and labels, right-padded to the longest example."""
        shape = (len(examples), max(len(e["input_ids"]) for e in examples))
        ids = torch.full(shape, self.pad_id, dtype=torch.long)
        mask = torch.zeros(shape, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        for j, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[j, :n], mask[j, :n], labels[j, :n] = (
                torch.as_tensor(e["input_ids"]),
                1,
                torch.as_tensor(e["labels"]),
            )
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def loss(
        self, outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None, bf16: bool = True
    ) -> torch.Tensor:
        """The Trainer's loss with label_only: `outputs.logits` are the final hidden states here.
        The label rows' projection runs in bf16 with the bf16 lever, unless `bf16` is off (the check)."""
        return label_only_loss(
            outputs.logits,
            labels.to(outputs.logits.device),
            self.head.weight,
            self.head.bias,
            num_items=num_items_in_batch,
            compute_dtype=torch.bfloat16 if self.levers.bf16 and bf16 else self.head.weight.dtype,
        )

    def fast_loss(self, batch: dict[str, torch.Tensor], bf16: bool = True) -> torch.Tensor:
        """One batch through the fast path, as the Trainer computes it (`bf16` off: the label rows'
        projection in the head's dtype; autocast is the caller's)."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if not self.levers.label_only:
            return self.model(**batch, use_cache=False).loss
        labels = batch.pop("labels")
        return self.loss(self.model(**batch, use_cache=False), labels, bf16=bf16)

    @torch.no_grad()
    def check_against_plain(self) -> str | None:
        """A few training rows both ways, in fp32; a message if the fast loss is not the plain one.

        This checks the swaps (positions, masks, what the model does around its blocks). bf16 is
        left out: its rounding is the same on both paths but moves with the batch's padding.
        """
        rows = [{**r, "row": i} for i, r in enumerate(self.rows[: min(CHECK_ROWS, self.n_train)])]
        batch = self._padded(rows)
        was_training = self.model.training
        self.model.eval()
        try:
            with self._lower_blocks_on():
                plain = self.model(**{k: v.to(self.device) for k, v in batch.items()}, use_cache=False).loss
            if self.cache is not None:  # stored as the cache stores them (fp16)
                hidden = self._run_lower(batch["input_ids"], batch["attention_mask"], autocast=False).half()
                batch = self.collate(rows, [hidden[j, : len(r["input_ids"])] for j, r in enumerate(rows)])
            if self.levers.label_only:
                self.swap_head()
            with self.autocast(enabled=False):  # bf16 left out, the label rows' projection too
                fast = self.fast_loss(batch, bf16=False)
        finally:
            self.model.train(was_training)
        if not torch.isclose(fast.float(), plain.float(), rtol=CHECK_RTOL, atol=1e-5):
            return f"on {len(rows)} training rows its loss is {fast.item():.6f}, the plain one {plain.item():.6f}"
        return None

    # --- the Trainer -------------------------------------------------------------------------
    def trainer(self, args: Any, tokenizer: Any, callbacks: list[Any]) -> Any:
        """A transformers Trainer over these batches, with the plain path's arguments and callbacks."""
        from datasets import Dataset
        from transformers import Trainer

        args = dataclasses.replace(
            args,
            remove_unused_columns=False,  # the collator needs `row`
            prediction_loss_only=True,
            bf16=args.bf16 or self.levers.bf16,
            # with cached features the top blocks' activations are small: no need to recompute them
            activation_checkpointing=args.activation_checkpointing and not self.levers.cache,
        )

        def dataset(start: int, stop: int) -> Any:
            return Dataset.from_list(
                [
                    {
                        "input_ids": r["input_ids"],
                        "labels": r["labels"],
                        "length": len(r["input_ids"]),
                        "row": i,
                    }
                    for i, r in enumerate(self.rows[start:stop], start=start)
                ]
            )

        has_val = len(self.rows) > self.n_train
        return Trainer(
            model=self.model,
            args=args,
            train_dataset=dataset(0, self.n_train),
            eval_dataset=dataset(self.n_train, len(self.rows)) if has_val else None,
            data_collator=self.collate,
            processing_class=tokenizer,
            compute_loss_func=self.loss if self.levers.label_only else None,
            callbacks=callbacks,
        )
