"""Evaluation on a model: greedy batched answers, answer-token loss, and base vs adapter on the same prompts.

    answers = generate_answers(model, tokenizer, [prompt_messages, ...])     # greedy, batched
    fit = base_fit(model, tokenizer, examples)        # mean loss on the answer tokens (teacher-forced)
    adapted = load_adapted(adapter_dir)               # (adapters) the adapter on the base it was trained on
    comparison = compare_with_base(adapted.model, adapted.tokenizer, test_examples)  # base vs adapter

Scoring answers against references is `metrics`; the `eval` command's report is `eval_report`;
the fit check of a base before training is `fit`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..data import IGNORE_INDEX, Example, encode
from ..errors import DataError
from ..generation import GenerationSettings, stop_token_ids
from ..threads import use as use_threads
from .scoring import Score, choose_metric, score

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


# --- prompts and references --------------------------------------------------------------------
def split_prompt(example: Example) -> tuple[Messages, str]:
    """The conversation up to the last answer (what the model is asked) and that answer."""
    if example.text is not None:
        raise DataError(
            f"{example.where}: a plain-text row has no prompt and answer to evaluate; "
            "use a chat, alpaca or prompt/completion file"
        )
    last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
    return [dict(m) for m in example.messages[:last]], example.messages[last]["content"]


# --- generation --------------------------------------------------------------------------------
@torch.no_grad()
def generate_answers(
    model: Any, tokenizer: Any, prompts: Sequence[Messages], max_new_tokens: int = 64, batch_size: int = 16
) -> list[str]:
    """Greedy answers to chat prompts, one per prompt, in the prompts' order.

    Prompts are sorted by length and batched with left padding (so every row's answer starts at
    the same position), rendered with the chat template's generation prompt.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(json.dumps(prompts[i])))
    answers: list[str] = [""] * len(prompts)
    stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    greedy = GenerationSettings(max_new_tokens=max_new_tokens).check()
    device = next(model.parameters()).device
    was_training, old_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            inputs = tokenizer.apply_chat_template(
                [prompts[i] for i in batch],
                add_generation_prompt=True,
                padding=True,
                return_tensors="pt",
                return_dict=True,
            )
            inputs = {k: v.to(device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
            use_threads("evaluation")  # this process's share of the cores now (threads.py)
            out = model.generate(
                **inputs,
                **greedy.generate_kwargs(),
                eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = out[:, inputs["input_ids"].shape[1] :]
            for i, text in zip(
                batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True), strict=True
            ):
                answers[i] = text.strip()
            log.info("generated %d/%d answers", min(start + batch_size, len(order)), len(order))
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return answers


# --- task fit: how well the base already predicts the answers ----------------------------------
@dataclass(frozen=True)
class Fit:
    """The mean loss of a model on the answer tokens of a data sample, and its perplexity."""

    loss: float
    perplexity: float
    examples: int
    tokens: int

    def line(self) -> str:
        return (
            f"answer loss {self.loss:.3f} (perplexity {self.perplexity:.1f}) "
            f"over {self.tokens} answer tokens of {self.examples} examples"
        )


@torch.no_grad()
def base_fit(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    sample: int = 64,
    max_length: int = 512,
    batch_size: int = 8,
    seed: int = 0,
) -> Fit:
    """Mean loss per answer token of a seeded sample of examples (prompts are context, not scored).

    Lower is a better fit. Costs one forward pass per sampled example, no training.
    """
    if not examples:
        raise ValueError("base_fit needs at least one example")
    chosen = random.Random(seed).sample(list(examples), min(sample, len(examples)))
    rows = [encode(e, tokenizer, max_length) for e in chosen]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    try:
        for start in range(0, len(rows), batch_size):
            ids, labels, mask = _pad(rows[start : start + batch_size], tokenizer.pad_token_id)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            # Token t predicts token t+1: shift, then sum the loss over answer tokens only.
            shifted = labels[:, 1:].to(device)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), shifted, ignore_index=IGNORE_INDEX, reduction="sum"
            )
            total_loss += loss.item()
            total_tokens += int((shifted != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if total_tokens == 0:
        raise DataError(
            f"no answer of the {len(rows)} examples starts within max_length={max_length} tokens: their "
            "prompts are longer; use shorter prompts or train with a larger max_length"
        )
    mean = total_loss / total_tokens
    return Fit(loss=mean, perplexity=math.exp(min(mean, 50.0)), examples=len(rows), tokens=total_tokens)


def _pad(rows: list[dict[str, Any]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return ids, labels, mask


# --- base vs adapted ---------------------------------------------------------------------------
@dataclass
class Side:
    """One model's answers to the test prompts, their score and its answer-token loss."""

    name: str  # "base", "adapter" or "scratch"
    answers: list[str]
    score: Score
    fit: Fit  # teacher-forced loss on the reference answers
    seconds: float  # time to answer every prompt and compute the loss


@dataclass
class Comparison:
    """The same prompts answered by several models (base, adapter, ...), scored the same way."""

    prompts: list[Messages]
    references: list[str]
    metric: str
    sides: dict[str, Side]

    @property
    def base(self) -> Side:
        return self.sides["base"]

    @property
    def adapter(self) -> Side:
        return self.sides["adapter"]


def answer_budget(tokenizer: Any, references: Sequence[str], cap: int = 256) -> int:
    """New tokens to allow per answer: the longest reference's length plus room for chattiness."""
    longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references)
    return min(cap, longest + 16)


def answer_side(
    name: str,
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    metric: str,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    max_length: int = 512,
) -> Side:
    """Answer the examples' prompts with `model`, score the answers and measure its answer loss."""
    prompts, references = (list(x) for x in zip(*(split_prompt(e) for e in examples), strict=True))
    budget = max_new_tokens or answer_budget(tokenizer, references)
    start = time.perf_counter()
    log.info("answering %d prompts with the %s model", len(prompts), name)
    answers = generate_answers(model, tokenizer, prompts, budget, batch_size)
    fit = base_fit(model, tokenizer, examples, sample=len(examples), max_length=max_length)
    seconds = round(time.perf_counter() - start, 1)
    return Side(name, answers, score(answers, references, metric), fit, seconds)


def compare_with_base(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    metric: str = "auto",
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    with_base: bool = True,
    max_length: int = 512,
) -> Comparison:
    """Answer the examples' prompts with a PEFT model's base (adapter disabled) and with the adapter.

    Both sides use the very same weights object, so the only difference is the LoRA update.
    """
    prompts, references = (list(x) for x in zip(*(split_prompt(e) for e in examples), strict=True))
    metric = choose_metric(references) if metric == "auto" else metric
    sides = {}
    for name in ("base", "adapter") if with_base else ("adapter",):
        with model.disable_adapter() if name == "base" else contextlib.nullcontext():
            sides[name] = answer_side(
                name, model, tokenizer, examples, metric, max_new_tokens, batch_size, max_length
            )
    return Comparison(prompts, references, metric, sides)
