"""The linear probe: logistic regression on the frozen base's features, the cheapest transfer there is.

    probe = train_probe("smollm2-135m-instruct", train_rows, val_rows)   # LabeledText rows
    probe.predict(["my parcel never came"])                              # -> ["shipping"]

No LoRA and no fine-tuning: each text goes once through the frozen base, its last-token and
mean-pooled final hidden states (head_features) are standardised, and a multinomial logistic
regression with an L2 penalty is fitted to them by L-BFGS in torch. The penalty is chosen on the
validation rows. This is the baseline a trained classifier must beat: if the probe is as good, the
fine-tune bought nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ...config import ModelSettings
from ...models import load_tokenizer, resolve_base
from .data import LabeledText, LabelMap
from .features import head_inputs
from .lengths import AUTO, choose_max_length, reading_bound
from .model import load_classification_base
from .prompt import ClassifyPrompt, PromptSetting, choose_prompt

log = logging.getLogger(__name__)

L2_CHOICES = (1e-4, 1e-3, 1e-2, 1e-1)  # penalty per weight, on standardised features
BATCH = 16
MAX_ITER = 200


@dataclass
class LinearFit:
    """Weights on standardised features: logits = ((x - mean) / std) @ weight.T + bias."""

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    l2: float

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return ((features - self.mean) / self.std) @ self.weight.T + self.bias


def fit_logistic(features: torch.Tensor, label_ids: torch.Tensor, classes: int, l2: float) -> LinearFit:
    """Multinomial logistic regression, mean cross-entropy + l2 * sum of squared weights, by L-BFGS."""
    mean, std = features.mean(0), features.std(0) + 1e-6
    x = (features - mean) / std
    weight = torch.zeros(classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], max_iter=MAX_ITER, line_search_fn="strong_wolfe", tolerance_grad=1e-6
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, label_ids) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return LinearFit(weight.detach(), bias.detach(), mean, std, l2)


def choose_fit(
    train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor] | None, classes: int
) -> LinearFit:
    """The fit whose penalty scores best on validation (accuracy, then loss); 1e-2 without validation."""
    if val is None or not len(val[1]):
        return fit_logistic(*train, classes, 1e-2)
    best, best_key = None, None
    for l2 in L2_CHOICES:
        fit = fit_logistic(*train, classes, l2)
        logits = fit.logits(val[0])
        key = (
            (logits.argmax(-1) == val[1]).float().mean().item(),
            -torch.nn.functional.cross_entropy(logits, val[1]).item(),
        )
        if best_key is None or key > best_key:
            best, best_key = fit, key
    log.info("linear probe: L2 penalty %g chosen on %d validation rows", best.l2, len(val[1]))
    return best


class LinearProbe:
    """The frozen base and a fitted logistic regression: a classifier with no fine-tuning."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        labels: Sequence[str],
        fit: LinearFit,
        max_length: int,
        prompt: ClassifyPrompt | None = None,
    ):
        self.model, self.tokenizer, self.labels = model, tokenizer, list(labels)
        self.fit, self.max_length, self.prompt = fit, max_length, prompt or ClassifyPrompt()

    def features(self, texts: Sequence[str]) -> torch.Tensor:
        return text_features(self.model, self.tokenizer, texts, self.max_length, self.prompt)

    def predict(self, texts: Sequence[str]) -> list[str]:
        ids = self.fit.logits(self.features(texts)).argmax(-1)
        return [self.labels[int(i)] for i in ids]


def text_features(
    model: Any, tokenizer: Any, texts: Sequence[str], max_length: int, prompt: ClassifyPrompt | None = None
) -> torch.Tensor:
    """[last token, mean over tokens] of each text's final hidden states (read in `prompt`, by default
    the bare text), batches sorted by length."""
    prompt = prompt or ClassifyPrompt()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    batches = (
        prompt.encode_batch([texts[i] for i in order[start : start + BATCH]], tokenizer, max_length)
        for start in range(0, len(order), BATCH)
    )
    last, mean = head_inputs(model, batches)
    features = torch.empty(len(texts), last.shape[1] * 2)
    features[order] = torch.cat([last, mean], dim=1)
    return features


def train_probe(
    base_model: str,
    train_rows: Sequence[LabeledText],
    val_rows: Sequence[LabeledText] = (),
    max_length: int | Literal["auto"] = 512,
    model_settings: ModelSettings | None = None,
    prompt: PromptSetting = "none",
) -> LinearProbe:
    """Read the texts through the frozen base once and fit the probe (penalty chosen on `val_rows`).
    The classic probe reads bare texts; `prompt="auto"` reads them as a prompted classifier does.
    `max_length="auto"`: chosen from the training rows as a classifier's is (lengths.py)."""
    settings = model_settings or ModelSettings(base_model=base_model)
    tokenizer = load_tokenizer(resolve_base(settings.base_model, settings.revision).folder)
    label_map = LabelMap.from_labels(r.label for r in train_rows)
    model, _ = load_classification_base(settings, label_map.labels, tokenizer.pad_token_id)
    ids = label_map.label2id
    bound = reading_bound(max_length, tokenizer)
    chosen = choose_prompt(prompt, label_map.labels, tokenizer, bound)
    if max_length == AUTO:
        lengths = [chosen.encode(r.text, tokenizer, bound)["length"] for r in train_rows]
        overhead = chosen.encode("", tokenizer, bound)["length"]
        max_length = choose_max_length(lengths, overhead, bound).max_length

    def encoded(rows: Sequence[LabeledText]) -> tuple[torch.Tensor, torch.Tensor]:
        features = text_features(model, tokenizer, [r.text for r in rows], max_length, chosen)
        return features, torch.tensor([ids[r.label] for r in rows], dtype=torch.long)

    known = [r for r in val_rows if r.label in ids]
    fit = choose_fit(encoded(train_rows), encoded(known) if known else None, len(label_map.labels))
    return LinearProbe(model, tokenizer, label_map.labels, fit, max_length, chosen)
