"""Evaluation: generate answers in batches, score JSON extraction, and measure how well a base fits data.

    answers = generate_answers(model, tokenizer, [prompt_messages, ...])     # greedy, batched
    score = score_json(answers, references)          # per-field and whole-record exact match
    fit = base_fit(model, tokenizer, examples)        # the base's loss on the answer tokens
    comparison = compare_with_base(adapter_dir, test_examples)   # base vs adapted, same prompts

`base_fit` answers the *task mismatch* question before any compute is spent: a base whose loss
(perplexity) on the answers of your data is already low mostly needs to learn the format; a very
high one means the task or language is far from what the base knows, so expect to need more
data, more steps or a larger base.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import IGNORE_INDEX, Example, encode
from .errors import DataError
from .inference import stop_token_ids

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


# --- prompts and references --------------------------------------------------------------------
def split_prompt(example: Example) -> tuple[Messages, str]:
    """The conversation up to the last answer (what the model is asked) and that answer."""
    if example.text is not None:
        raise ValueError(f"{example.where}: a plain-text row has no prompt/answer split to evaluate")
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
            out = model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
                temperature=None,
                top_p=None,
                top_k=None,
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


# --- the JSON exact-field-match metric ---------------------------------------------------------
def parse_json_object(text: str) -> dict[str, Any] | None:
    """The JSON object in an answer, or None when there is none.

    Lenient on the wrapping (a code fence or a sentence around the object is allowed, so a base
    model is not marked down for chattiness alone) but strict on the object itself.
    """
    text = text.strip()
    decoder = json.JSONDecoder()
    for start in [i for i, ch in enumerate(text) if ch == "{"]:
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _same(predicted: Any, expected: Any) -> bool:
    """Exact match up to surrounding spaces and letter case; 3 == "3" (a field, not a type test)."""
    if isinstance(predicted, (dict, list)) or predicted is None:
        return predicted == expected
    return str(predicted).strip().casefold() == str(expected).strip().casefold()


@dataclass(frozen=True)
class JsonScore:
    """Exact-field-match accuracy of predicted JSON objects against reference ones."""

    rows: int
    parse_errors: int  # answers with no JSON object at all (counted wrong on every field)
    field_accuracy: dict[str, float]  # per field of the reference schema
    record_accuracy: float  # every field right (extra keys allowed)
    mean_field_accuracy: float

    def lines(self) -> list[str]:
        return [
            f"whole-record accuracy: {self.record_accuracy:.1%}",
            f"mean field accuracy:   {self.mean_field_accuracy:.1%}",
            *(f"  {name}: {acc:.1%}" for name, acc in self.field_accuracy.items()),
            f"no JSON object: {self.parse_errors}/{self.rows}",
        ]


def _reference(number: int, text: str) -> dict[str, Any]:
    value = parse_json_object(text) if text.strip().startswith("{") else None
    if value is None:
        raise DataError(
            f"reference {number} is not a JSON object, so it cannot be scored field by field: "
            f"{text!r:.80}. The JSON metric needs answers that are JSON objects"
        )
    return value


def score_json(answers: Sequence[str], references: Sequence[str]) -> JsonScore:
    """Score answers against reference JSON strings, field by field and whole record."""
    if len(answers) != len(references) or not references:
        raise ValueError(f"need one answer per reference, got {len(answers)} answers for {len(references)}")
    refs = [_reference(i, r) for i, r in enumerate(references, start=1)]
    fields = list(dict.fromkeys(k for r in refs for k in r))
    right = dict.fromkeys(fields, 0)
    whole = errors = 0
    for answer, ref in zip(answers, refs, strict=True):
        got = parse_json_object(answer)
        errors += got is None
        got = got or {}
        hits = [k for k in ref if k in got and _same(got[k], ref[k])]
        for k in hits:
            right[k] += 1
        whole += len(hits) == len(ref)
    n = len(refs)
    per_field = {k: right[k] / n for k in fields}
    return JsonScore(
        rows=n,
        parse_errors=errors,
        field_accuracy=per_field,
        record_accuracy=whole / n,
        mean_field_accuracy=sum(per_field.values()) / len(per_field),
    )


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


def fit_advice(fit: Fit) -> str:
    """What a person should make of a task-fit score (mean loss per answer token of the base)."""
    if fit.loss < 0.5:
        return "the base already predicts these answers well: a short run (or none) should do"
    if fit.loss < 2.5:
        return "a partial fit: LoRA should adapt the base to this task in a few epochs"
    return (
        "a poor fit (task mismatch): the base is far from these answers; expect to need more data and "
        "epochs, a higher rank or more layers, or choose a base closer to the task"
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
        raise ValueError("the sampled examples have no answer tokens within max_length; raise max_length")
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
class Comparison:
    """The same prompts answered by the base and by base + adapter: answers, scores and fits."""

    prompts: list[Messages]
    references: list[str]
    base_answers: list[str]
    adapted_answers: list[str]
    base: JsonScore
    adapted: JsonScore
    base_fit: Fit  # answer-token loss on these examples, teacher-forced
    adapted_fit: Fit
    seconds: dict[str, float] = field(default_factory=dict)  # time spent generating, per side


def load_adapted(adapter_dir: str | Path) -> tuple[Any, Any]:
    """The base an adapter was trained on, loaded as its recipe said, with the adapter applied.

    Refuses (ModelError) when the base weights differ from those the adapter was trained on.
    """
    from peft import PeftModel

    from .adapters import read_metadata
    from .inference import base_settings, check_adapter_base
    from .models import load_base, model_fingerprint

    meta = read_metadata(adapter_dir)
    base, tokenizer, ref = load_base(base_settings(meta, adapter_dir))
    check_adapter_base(Path(adapter_dir), meta, model_fingerprint(ref.folder), ref.name)
    return PeftModel.from_pretrained(base, str(adapter_dir)), tokenizer


def compare_with_base(
    model: Any, tokenizer: Any, examples: Sequence[Example], max_new_tokens: int = 48, batch_size: int = 20
) -> Comparison:
    """Answer the examples' prompts with a PEFT model's base (adapter disabled) and with the adapter.

    Both sides use the very same weights object, so the only difference is the LoRA update.
    """
    prompts, references = (list(x) for x in zip(*(split_prompt(e) for e in examples), strict=True))
    answers, fits, seconds = {}, {}, {}
    for side in ("base", "adapted"):
        start = time.perf_counter()
        with model.disable_adapter() if side == "base" else contextlib.nullcontext():
            log.info("answering %d prompts with the %s model", len(prompts), side)
            answers[side] = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size)
            fits[side] = base_fit(model, tokenizer, examples, sample=len(examples))
        seconds[side] = round(time.perf_counter() - start, 1)
    return Comparison(
        prompts,
        references,
        answers["base"],
        answers["adapted"],
        score_json(answers["base"], references),
        score_json(answers["adapted"], references),
        fits["base"],
        fits["adapted"],
        seconds,
    )
