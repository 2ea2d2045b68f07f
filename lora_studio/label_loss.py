"""Label-only logits: the vocabulary projection and the loss only where a token carries a label.

A causal LM's loss needs logits only at positions whose next token is a label (the answers), yet
the usual forward projects every position onto the whole vocabulary: for SmolLM2 that projection
is a fifth of the forward FLOPs, and most positions are prompt. Here the frozen output projection
runs on the labelled positions alone, a chunk at a time, so the full [tokens x vocab] logits never
exist. The gradient for the hidden states is computed in the same pass (the projection is frozen,
so that is all backward needs): one chunk of logits is alive at a time, never one per chunk.
"""

from __future__ import annotations

import torch

from .data import IGNORE_INDEX

CHUNK_ELEMENTS = 1 << 24  # logits per chunk (64 MB in fp32); bounds memory whatever the vocabulary


def label_only_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    num_items: int | torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled tokens, as a causal LM computes it from full logits.

    `hidden` [batch, seq, dim] are the final (normed) hidden states, `labels` [batch, seq] the
    unshifted labels (IGNORE_INDEX where there is none), `weight`/`bias` the frozen output layer.
    `num_items` divides the summed loss (the Trainer passes the labelled tokens of the whole
    accumulated batch); by default it is this batch's count. `compute_dtype` is the matmul dtype
    (bf16 on CPUs that have it); log-softmax is always fp32.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    selected = hidden[:, :-1][keep]  # [labelled tokens, dim]: only these reach the vocabulary
    total = _FrozenHeadCrossEntropy.apply(
        selected, weight, bias, targets[keep], compute_dtype or weight.dtype
    )
    count = num_items if num_items is not None else keep.sum()
    if isinstance(count, torch.Tensor):
        count = count.to(total.device)
    return total / count


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy of `hidden @ weight.T (+ bias)`, chunked; weight and bias get no gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, compute_dtype):  # type: ignore[override]
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        w = weight.to(compute_dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], rows):
                h, t = hidden[start : start + rows], targets[start : start + rows]
                logits = (h.to(compute_dtype) @ w.T).float()
                if bias is not None:
                    logits += bias.float()
                lse = logits.logsumexp(-1)
                total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if grad is not None:  # d(loss)/d(logits) = softmax - one_hot, reusing the logits' memory
                    probs = logits.sub_(lse[:, None]).exp_()
                    probs[torch.arange(len(t), device=t.device), t] -= 1
                    grad[start : start + rows] = (probs.to(compute_dtype) @ w).to(hidden.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return (grad * grad_total if grad is not None else None), None, None, None, None
