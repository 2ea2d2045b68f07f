"""What a sequence classifier's head sees: the final hidden state at each text's last token.

    last, mean = head_inputs(model, batches)   # [rows, hidden] each, float32 on the CPU

The head (`score`) of a transformers `*ForSequenceClassification` model is applied to every
position and read at the last real token; a forward hook on it captures its input, so the
features come from the model's own forward (plain batches or the fast path's, padded on either
side, or from after a shared start) and need no knowledge of the architecture. `mean` is the mean over the real tokens, which the
linear probe uses next to the last token. The informed head (head_init) and the linear probe
(linear_probe) both start here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .model import head_name


def head_module(model: Any) -> torch.nn.Module:
    """The label head as the forward pass calls it (PEFT's wrapper around it once LoRA is on)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, head_name(model))


def head_weight(model: Any) -> torch.nn.Parameter:
    """The weight that trains: PEFT's trainable copy of the head once LoRA is attached."""
    head = head_module(model)
    trained = getattr(head, "modules_to_save", None)
    if trained is not None:
        return trained[head.active_adapter if isinstance(head.active_adapter, str) else "default"].weight
    return head.weight


def last_positions(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, whichever side the padding is on."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return (positions * mask.to(positions.dtype)).argmax(-1)


@torch.no_grad()
def head_inputs(model: Any, batches: Iterable[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Last-token and mean-pooled head inputs of every row of `batches`, in order."""
    captured: list[torch.Tensor] = []
    hook = head_module(model).register_forward_hook(lambda m, args, out: captured.append(args[0]))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    last, mean = [], []
    try:
        for batch in batches:
            model(**{k: v.to(device) for k, v in batch.items() if k != "labels"}, use_cache=False)
            hidden = captured.pop().float().cpu()
            mask = batch["attention_mask"][
                :, -hidden.shape[1] :
            ]  # the rows' own columns (a shared start runs first)
            last.append(hidden[torch.arange(len(hidden)), last_positions(mask)])
            weights = mask.to(hidden.dtype)[..., None]
            mean.append((hidden * weights).sum(1) / weights.sum(1))
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(last), torch.cat(mean)
