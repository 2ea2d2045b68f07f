"""The fast path's `prefix` lever: the prompt's start runs once per batch, not once per row.

    prefix = SharedPrefix(model, prompt_ids, lower_blocks_on)   # lower_blocks_on: FastPath.plain
    prefix.attach()     # from now on a batch whose mask is wider than its rows gets the start's keys
    batch = prefix.strip(rows)                                   # see ClassifyFastPath.collate

Every classify row is `before + text + after` (prompt.py), and `before` (the system line naming the
labels and the user turn's opening, 18-26 tokens on SmolLM2) is the same for every row: 40-56% of
a short text's tokens. A causal body computes those tokens' states without looking at the text, so
they are the same in every row of a batch. Here they run once, as a batch of one, with gradients
through the adapted blocks; the keys and values are repeated for the batch's rows and the rows run
from their text on, attending to them. The gradient through the start is the sum over the rows, as
in the plain path. Inference does the same once per model (model.py, `Classifier._logits`).
With cached lower blocks (`features`: their output for the start, computed once) the start runs
from there too; the skipped blocks' cache layers then hold zeros of the start's length, which those
blocks never read and from which the mask takes the start's length. The feature cache itself then
holds each row from after the start, computed once with the start's keys and values
(`FastPath.use_cache(..., start)`): 2.3x fewer values, filled 1.3-1.5x faster on the benchmark's sets.

A batch in this form carries only the rows' tokens after the start (ids or cached features) and an
attention mask `length` columns wider: ones for the start, then the rows' own mask. A forward hook
on the decoder sees that width, runs the start and passes its keys and values as the model's
`cache`; a second hook drops that cache from the output (only logits are compared). With
`lora_dropout` the rows of a batch share one dropout draw over the start: the same expected update,
slightly correlated noise. Gradient checkpointing would run the blocks twice and append the start's
keys twice, so the lever is ruled out with it (fast.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch


def rows_share(prefix: list[int], rows: list[dict[str, Any]]) -> bool:
    """True when every row starts with `prefix` and has at least one token after it."""
    n = len(prefix)
    return n > 0 and all(len(r["input_ids"]) > n and list(r["input_ids"][:n]) == prefix for r in rows)


class SharedPrefix:
    """Hooks on a model's decoder that run the rows' shared start once per batch (module doc)."""

    def __init__(
        self,
        model: Any,
        ids: list[int],
        lower_blocks_on: Callable[[], contextlib.AbstractContextManager],
        features: torch.Tensor | None = None,
    ):
        self.decoder = model.get_base_model().get_decoder()
        self.ids = torch.tensor([ids], dtype=torch.long)
        self.length = len(ids)
        self.lower_blocks_on = lower_blocks_on
        self.features = features  # [1, length, hidden]: the cached lower blocks' output for the start
        self._hooks: list[Any] = []
        self._running = False  # the start's own pass goes through the same hooks
        self._injected = False  # this pass got the start's cache from `_before`

    def attach(self) -> None:
        self._hooks = [
            self.decoder.register_forward_pre_hook(self._before, with_kwargs=True),
            self.decoder.register_forward_hook(self._after, with_kwargs=True),
        ]

    def detach(self) -> None:
        while self._hooks:
            self._hooks.pop().remove()

    def mask(self, rows_mask: torch.Tensor) -> torch.Tensor:
        """The attention mask of a batch in this form: the start (all ones), then the rows' mask."""
        return torch.cat([torch.ones(len(rows_mask), self.length, dtype=rows_mask.dtype), rows_mask], dim=1)

    def _batch_rows(self, args: tuple, kwargs: dict[str, Any]) -> int | None:
        """The batch's row count when it comes in this form (mask wider than its tokens), else None."""
        tokens = kwargs.get("inputs_embeds")
        if tokens is None:
            tokens = args[0] if args else kwargs.get("input_ids")
        mask = kwargs.get("attention_mask")
        if self._running or tokens is None or mask is None or kwargs.get("cache") is not None:
            return None
        return tokens.shape[0] if mask.shape[1] == tokens.shape[1] + self.length else None

    def _before(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        rows = self._batch_rows(args, kwargs)
        if rows is None:
            return None
        self._running = True
        try:
            cache = self._start(module, kwargs["attention_mask"].device)
        finally:
            self._running = False
        cache.batch_repeat_interleave(rows)  # differentiable: each row's gradient flows back to the start
        self._injected = True
        return args, {**kwargs, "cache": cache, "use_cache": False}

    def _start(self, decoder: Any, device: torch.device) -> Any:
        """The start's keys and values in every layer, from its tokens or its cached features."""
        mask = torch.ones(self.ids.shape, dtype=torch.long, device=device)
        if self.features is None:
            with self.lower_blocks_on():
                return decoder(input_ids=self.ids.to(device), attention_mask=mask, use_cache=True).cache
        cache = decoder(inputs_embeds=self.features.to(device), attention_mask=mask, use_cache=True).cache
        filled = next(layer for layer in cache.layers if layer.get_seq_length() > 0)
        for i, layer in enumerate(cache.layers):
            if layer.get_seq_length() == 0:  # a skipped block's: never read, but its length counts
                cache.update(torch.zeros_like(filled.keys), torch.zeros_like(filled.values), i)
        return cache

    def _after(self, module: Any, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        if self._injected and not self._running:
            self._injected = False
            output.cache = None  # the start's keys belong to this batch, not to the output
        return output
