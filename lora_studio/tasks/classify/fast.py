"""The fast path for `task: classify`: chat's levers (fast_path.py) on a sequence classifier.

    fast = prepare(recipe, model, tokenizer, data, base_folder)   # None: the plain path
    fast.collate(rows)   # batches for the Trainer; fast.arguments(args): its settings

  cache       as for chat: with `layers: N` the frozen blocks below the top N run once per text
              (FeatureCache, filled as batches come); the model gets their output as `inputs_embeds`
  bf16        as for chat: bf16 autocast on CPUs with native bf16, weights fp32
  label_only  ruled out: the head is a labels x hidden matrix, there is no vocabulary to skip
  prefix      the prompt's start, the same in every row, runs once per batch (prefix.py); ruled
              out for bare texts and with gradient checkpointing

transformers' sequence classifier finds each text's last real token from `input_ids`; given
`inputs_embeds` it reads the last position. So with cached features the batches are padded on the
left and carry `position_ids` counted from each text's first token: the top blocks see the same
positions and masks as the plain path's right-padded batch, and the last position is the last
token. With `prefix` the batches carry only what follows the start, and masks and positions count
it. Before training a few rows are computed both ways in fp32 (fast_path's check): if the loss
differs, the plain path runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from ...config import Recipe
from ...fast_path import CHECK_ROWS, CHECK_RTOL, FastPath, Levers, choose_levers
from ...models import model_fingerprint
from ...trainer_setup import use_gradient_checkpointing
from .data import ClassifyData
from .prefix import SharedPrefix, rows_share

log = logging.getLogger(__name__)

NOT_FOR_CLASSIFY = {"label_only": "a classifier's head has no vocabulary projection to cut"}


def prepare(
    recipe: Recipe, model: Any, tokenizer: Any, data: ClassifyData, base_folder: Path
) -> ClassifyFastPath | None:
    """The fast path for this classifier run, or None when no lever is allowed and exact."""
    levers = choose_levers(recipe, model, not_for_task=NOT_FOR_CLASSIFY)
    start = data.prompt.prefix_ids(tokenizer) if not data.prompt.plain else []
    reason = prefix_ruled_out(recipe, levers, start, data)
    if levers.prefix and reason:
        log.info("fast path: no prefix: %s", reason)
        levers = dataclasses.replace(levers, prefix=False)
    if not levers.names():
        return None
    fast = ClassifyFastPath(
        FastPath(model, levers, tokenizer.pad_token_id, data.train + data.val, len(data.train))
    )
    if levers.cache:  # with the prefix lever the cache holds the rows from after the start
        fast.inner.use_cache(
            recipe.lora.layers, model_fingerprint(base_folder), start if levers.prefix else ()
        )
    if levers.prefix:
        fast.use_prefix(start)
    problem = fast.check_against_plain()
    if problem:
        fast.restore()
        log.info("fast path: not used, the plain path runs: %s", problem)
        return None
    log.info("fast path: %s", ", ".join(levers.names()))
    return fast


def prefix_ruled_out(recipe: Recipe, levers: Levers, start: list[int], data: ClassifyData) -> str | None:
    """Why the rows' start cannot run once per batch here; None: it can."""
    if not start:
        return "the texts are read bare (no prompt), so the rows share no start"
    if use_gradient_checkpointing(recipe) and not levers.cache:  # the cache lever turns it off
        return "gradient checkpointing would run the start's keys into the cache twice"
    if not rows_share(start, data.train + data.val):
        return "not every row starts with the prompt's start"
    return None


class _PaddedEmbeds(logging.Filter):
    """transformers warns that it cannot see padding in `inputs_embeds`; our padding is on the left,
    where reading the last position is right."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "will not detect padding tokens in `inputs_embeds`" not in str(record.msg)


class ClassifyFastPath:
    """Chat's FastPath (cached lower blocks, bf16) with a classifier's batches, check and Trainer settings."""

    def __init__(self, inner: FastPath):
        self.inner = inner
        self.prefix: SharedPrefix | None = None
        logging.getLogger("transformers.modeling_layers").addFilter(_PaddedEmbeds())

    @property
    def model(self) -> Any:
        return self.inner.model

    def use_prefix(self, start: list[int]) -> None:
        """Batches carry the rows from their text on; the start runs once per batch (prefix.py)."""
        features = self.inner.start_features  # with the cache: the start's lower-block output
        assert self.inner.cache is None or features is not None, "use_cache(..., start) comes first"
        self.prefix = SharedPrefix(self.model, start, self.inner.plain, features)
        self.prefix.attach()

    def restore(self) -> None:
        """The model as it was: no hooks, every cached block back."""
        if self.prefix is not None:
            self.prefix.detach()
        self.inner.restore()

    def collate(
        self, examples: list[dict[str, Any]], features: list[torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Token ids padded on the right, or with the cache: features padded on the left, with positions.
        With the prefix lever the rows start after the shared start and the mask counts it first."""
        labels = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
        skip = self.prefix.length if self.prefix is not None else 0
        lengths = [len(e["input_ids"]) - skip for e in examples]
        cache = self.inner.cache
        if cache is None:
            ids, mask = self._right_padded([e["input_ids"][skip:] for e in examples])
            return {"input_ids": ids, "attention_mask": self._with_start(mask), "labels": labels}
        shape = (len(examples), max(lengths))
        mask = torch.zeros(shape, dtype=torch.long)
        features = features or cache.rows([e["row"] for e in examples])
        embeds = torch.zeros(*shape, cache.dim, dtype=self.inner.dtype)
        for j, row in enumerate(features):  # the cache holds the rows from after the start
            embeds[j, shape[1] - lengths[j] :] = row.to(self.inner.dtype)
            mask[j, shape[1] - lengths[j] :] = 1
        positions = skip + (mask.cumsum(-1) - 1).clamp(min=0)  # each text counts from its first token
        return {
            "inputs_embeds": embeds,
            "attention_mask": self._with_start(mask),
            "position_ids": positions,
            "labels": labels,
        }

    def _with_start(self, mask: torch.Tensor) -> torch.Tensor:
        return self.prefix.mask(mask) if self.prefix is not None else mask

    def _right_padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids padded on the right, and their attention mask."""
        ids = torch.full((len(rows), max(map(len, rows))), self.inner.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, row in enumerate(rows):
            ids[j, : len(row)], mask[j, : len(row)] = torch.as_tensor(row), 1
        return ids, mask

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.inner.autocast()

    @torch.no_grad()
    def check_against_plain(self) -> str | None:
        """A few training rows both ways in fp32 (bf16 left out, as for chat): the same loss, or why not."""
        rows = [{**r, "row": i} for i, r in enumerate(self.inner.rows[: min(CHECK_ROWS, self.inner.n_train)])]
        ids, mask = self._right_padded([r["input_ids"] for r in rows])
        labels = torch.tensor([r["labels"] for r in rows])
        device, model = self.inner.device, self.model
        was_training = model.training
        model.eval()
        try:
            with self.inner.plain():
                plain = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            features = None
            if self.inner.cache is not None:  # computed as the cache computes them, stored as it stores them
                features = [f.half() for f in self._fp32_features(rows)]
            batch = self.collate(rows, features)
            batch.pop("labels")
            fast = model(**{k: v.to(device) for k, v in batch.items()}).logits
        finally:
            model.train(was_training)
        plain_loss = torch.nn.functional.cross_entropy(plain.float(), labels.to(device))
        fast_loss = torch.nn.functional.cross_entropy(fast.float(), labels.to(device))
        if not torch.isclose(fast_loss, plain_loss, rtol=CHECK_RTOL, atol=1e-5):
            return (
                f"on {len(rows)} training rows its loss is {fast_loss.item():.6f}, "
                f"the plain one {plain_loss.item():.6f}"
            )
        return None

    def _fp32_features(self, rows: list[dict[str, Any]]) -> list[torch.Tensor]:
        """The cached blocks' output for `rows` as the cache computes it (from after the prompt's
        start, with its keys and values, under the prefix lever), in fp32."""
        from transformers import DynamicCache

        skip = self.prefix.length if self.prefix is not None else 0
        body = [r["input_ids"][skip:] for r in rows]
        ids, mask = self._right_padded(body)
        start = None
        if skip:
            first = torch.tensor([rows[0]["input_ids"][:skip]])
            config = self.inner.base.config
            _, start = self.inner._lower_with_cache(
                first, torch.ones_like(first), DynamicCache(config=config), False
            )
        hidden = self.inner._run_lower(ids, mask, autocast=False, start=start)
        return [hidden[j, : len(b)] for j, b in enumerate(body)]

    # --- the Trainer -------------------------------------------------------------------------
    def arguments(self, args: Any) -> Any:
        """The plain path's Trainer arguments, with what these batches and levers need."""
        return dataclasses.replace(
            args,
            remove_unused_columns=False,  # the collator needs `row`
            bf16=args.bf16 or self.inner.levers.bf16,
            # with cached features the top blocks' activations are small: no need to recompute them
            activation_checkpointing=args.activation_checkpointing and not self.inner.levers.cache,
        )

    def dataset(self, validation: bool) -> Any:
        from datasets import Dataset

        start, stop = (self.inner.n_train, len(self.inner.rows)) if validation else (0, self.inner.n_train)
        return Dataset.from_list(
            [
                {"input_ids": r["input_ids"], "labels": r["labels"], "length": len(r["input_ids"]), "row": i}
                for i, r in enumerate(self.inner.rows[start:stop], start=start)
            ]
        )
