"""A head that starts from what the base knows, instead of from random weights.

    kind = init_head(model, tokenizer, labels, features, label_ids)   # "label_words" or "prototypes"

The classification head is a bias-free linear map from the final hidden state (at the last token)
to one logit per label. Two starts, chosen by what the labels look like:

  label_words  labels that are words ("billing", "card_arrival"): row c is the mean of the base's
               token embeddings of the label's tokens (" billing"), which for a model with tied
               embeddings, SmolLM2's case, is its language-model head: the untrained classifier
               asks "which label word would the base say next".
  prototypes   opaque ids or codes ("17", "X-42"): weight imprinting. Row c is the class's mean
               feature (training rows through the frozen base; LoRA starts at zero, so the model
               *is* the frozen base here) minus the mean over all rows, divided per dimension by the
               within-class variance (a diagonal linear discriminant, shrunk towards the average
               variance so a near-constant dimension cannot dominate). Without the division a few
               very large hidden dimensions, the same for every text, would decide every logit.

Either way the rows are then multiplied by the one scale that minimises the cross-entropy on the
training features, so the first probabilities are neither flat nor overconfident.

Measured on SmolLM2 (the demo's 4 ticket teams, examples/classification: its 400 training rows, the
120 held-out rows), neither start is where a head should begin: label words score at chance
(27.5%: without a prompt the last token's state does not ask for the next word) and prototypes
56.7%, while logistic regression on the same frozen features reaches 90%. So by default the start
is then *fitted*: L-BFGS minimises the training cross-entropy (plus a small L2 penalty on
standardised features) over the head's rows, starting from the rows above. It reuses the features
already computed, so it costs far less than the pass that made them. The head then begins where
a (last-token, bias-free) linear probe ends, and training the body adds to that.

With the prompt (prompt.py: the text inside the chat template, the labels named in its system line)
the last token is where the model answers, and word labels take the label-word rows unfitted and
frozen: a verbalizer, trained through the body only (train.is_verbalizer). On SmolLM2-135M their
zero-shot answer is still near chance (25-35% on the benchmark's 4-label sets): the rows give the
direction, LoRA teaches the body to answer. Opaque ids keep the fitted prototypes, trained in full.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any, Literal

import torch

from .features import head_weight

log = logging.getLogger(__name__)

HeadInit = Literal["label_words", "prototypes"]
WORD_LABEL = re.compile(r"[A-Za-z][A-Za-z _'-]*")  # letters (and word separators) only: no digits
SHRINK = 0.1  # prototypes: variance + SHRINK * mean variance
SCALES = torch.logspace(-3, 3, 61)  # candidate scales, relative to 1 / std of the raw logits
FIT_L2 = 1e-2  # penalty per squared weight on standardised features (chosen on the demo data only)
FIT_ITERATIONS = 100


def init_kind(labels: Sequence[str]) -> HeadInit:
    """label_words when every label is made of letters, else prototypes (ids, codes, numbers)."""
    return "label_words" if all(WORD_LABEL.fullmatch(label) for label in labels) else "prototypes"


def label_word_rows(model: Any, tokenizer: Any, labels: Sequence[str]) -> torch.Tensor:
    """Row c: the mean input embedding of the tokens of " label c" (underscores read as spaces)."""
    embeddings = model.get_input_embeddings().weight.detach().float().cpu()
    rows = []
    for label in labels:
        ids = tokenizer(" " + label.replace("_", " "), add_special_tokens=False)["input_ids"]
        rows.append(embeddings[ids].mean(0))
    return torch.stack(rows)


def prototype_rows(features: torch.Tensor, label_ids: torch.Tensor, classes: int) -> torch.Tensor:
    """Row c: (class mean - overall mean) / (within-class variance + SHRINK x its mean), per dimension."""
    features = features.float()
    means = torch.stack([features[label_ids == c].mean(0) for c in range(classes)])
    within = (features - means[label_ids]).pow(2).mean(0)
    return (means - features.mean(0)) / (within + SHRINK * within.mean() + 1e-12)


def fit_scale(rows: torch.Tensor, features: torch.Tensor, label_ids: torch.Tensor) -> float:
    """The multiplier of `rows` with the lowest training cross-entropy (a grid over 6 decades)."""
    logits = features.float() @ rows.T
    unit = 1.0 / (logits.std() + 1e-12)
    losses = [torch.nn.functional.cross_entropy(logits * (s * unit), label_ids) for s in SCALES]
    return float(SCALES[int(torch.stack(losses).argmin())] * unit)


def fitted_rows(
    start: torch.Tensor, features: torch.Tensor, label_ids: torch.Tensor, l2: float = FIT_L2
) -> torch.Tensor:
    """Bias-free logistic regression from `start`: the rows minimising training cross-entropy + l2 |V|^2,
    where V = rows x feature std (the penalty is on standardised features, the rows stay bias-free)."""
    std = features.float().std(0) + 1e-6
    x = features.float() / std
    v = (start.float() * std).clone().requires_grad_()
    optimizer = torch.optim.LBFGS([v], max_iter=FIT_ITERATIONS, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ v.T, label_ids) + l2 * v.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return v.detach() / std


def start_rows(
    model: Any,
    tokenizer: Any,
    labels: Sequence[str],
    features: torch.Tensor,
    label_ids: torch.Tensor,
    kind: HeadInit,
) -> torch.Tensor:
    """The stated rows of `kind`, times the scale with the lowest training cross-entropy."""
    if kind == "label_words":
        rows = label_word_rows(model, tokenizer, labels)
    else:
        rows = prototype_rows(features, label_ids, len(labels))
    return rows * fit_scale(rows, features, label_ids)


@torch.no_grad()
def init_head(
    model: Any,
    tokenizer: Any,
    labels: Sequence[str],
    features: torch.Tensor,
    label_ids: torch.Tensor,
    kind: HeadInit | None = None,
    fit: bool = True,
) -> HeadInit:
    """Set the head's rows from the label words or the class prototypes of `features` (training rows'
    last-token head inputs, from `head_features.head_inputs`), fitted to them unless `fit` is off;
    returns which start it took."""
    kind = kind or init_kind(labels)
    features = features.float()
    rows = start_rows(model, tokenizer, labels, features, label_ids, kind)
    start_accuracy = _accuracy(rows, features, label_ids)
    if fit:
        rows = fitted_rows(rows, features, label_ids)
    weight = head_weight(model)
    weight.copy_(rows.to(weight.device, weight.dtype))
    log.info(
        "head: starts from the %s (%d labels; training accuracy %.1f%%)%s",
        kind.replace("_", " "),
        len(labels),
        100 * start_accuracy,
        f", fitted to the frozen features: {100 * _accuracy(rows, features, label_ids):.1f}%" if fit else "",
    )
    return kind


@torch.no_grad()
def init_verbalizer(model: Any, tokenizer: Any, labels: Sequence[str]) -> HeadInit:
    """The label words' rows as they are, unscaled and unfitted: the head's logits are the base's own
    next-token logits for the label words (no features needed, so no pass through the base)."""
    weight = head_weight(model)
    weight.copy_(label_word_rows(model, tokenizer, labels).to(weight.device, weight.dtype))
    log.info(
        "head: the label words' rows as the base has them (%d labels), frozen: a verbalizer", len(labels)
    )
    return "label_words"


def _accuracy(rows: torch.Tensor, features: torch.Tensor, label_ids: torch.Tensor) -> float:
    return float(((features @ rows.T).argmax(-1) == label_ids).float().mean())
