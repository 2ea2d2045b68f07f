"""The informed head, the classify fast path and the linear probe, on the tiny model."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from classify_helpers import TOY_WORDS, classify_recipe, toy_rows, write_jsonl

from lora_studio import train
from lora_studio.config import DataSettings, LoraSettings, ModelSettings
from lora_studio.fast_path import FastPath, Levers
from lora_studio.models import load_tokenizer
from lora_studio.tasks.classify.data import LabeledText, LabelMap, prepare_classification
from lora_studio.tasks.classify.fast import ClassifyFastPath
from lora_studio.tasks.classify.features import head_inputs, head_weight
from lora_studio.tasks.classify.head_init import (
    fit_scale,
    init_head,
    init_kind,
    label_word_rows,
    prototype_rows,
)
from lora_studio.tasks.classify.model import attach_classification_lora, load_classification_base
from lora_studio.tasks.classify.probe import train_probe


def test_labels_made_of_letters_start_from_words_and_codes_from_prototypes():
    assert init_kind(["billing", "card_arrival", "Tech support"]) == "label_words"
    assert init_kind(["billing", "x42"]) == "prototypes"
    assert init_kind(["0", "1", "2"]) == "prototypes"


def test_label_word_rows_are_the_mean_embedding_of_each_labels_tokens(tiny_model_dir: Path):
    tokenizer = load_tokenizer(tiny_model_dir)
    labels = ["fox", "quick_brown"]
    model, _ = load_classification_base(ModelSettings(base_model=str(tiny_model_dir)), labels, 2)
    rows = label_word_rows(model, tokenizer, labels)
    embeddings = model.get_input_embeddings().weight.detach()
    for row, words in zip(rows, [" fox", " quick brown"], strict=True):
        ids = tokenizer(words, add_special_tokens=False)["input_ids"]
        assert torch.allclose(row, embeddings[ids].mean(0))
    assert len(tokenizer(" quick brown", add_special_tokens=False)["input_ids"]) > 1  # a real mean


def test_prototype_rows_are_class_means_over_the_within_class_variance():
    features = torch.tensor([[1.0, 10.0], [3.0, 10.0], [-2.0, 12.0], [-4.0, 12.0]])
    label_ids = torch.tensor([0, 0, 1, 1])
    rows = prototype_rows(features, label_ids, 2)
    # means (2, 10) and (-3, 12), overall (-0.5, 11); within-class variance (1, 0) shrunk by 0.1 x mean 0.5
    variance = torch.tensor([1.0, 0.0]) + 0.1 * 0.5
    assert torch.allclose(rows, torch.tensor([[2.5, -1.0], [-2.5, 1.0]]) / variance)
    # the scale picked has a lower training loss than the rows as they are and than 10x them
    scale = fit_scale(rows, features, label_ids)

    def loss(s: float) -> float:
        return float(torch.nn.functional.cross_entropy(features @ (rows * s).T, label_ids))

    assert loss(scale) < min(loss(1.0), loss(10 * scale), loss(scale / 10))


def _tiny_classifier(tiny_model_dir: Path, labels: list[str], layers: int | None = None):
    model, _ = load_classification_base(ModelSettings(base_model=str(tiny_model_dir)), labels, 2)
    return attach_classification_lora(model, LoraSettings(r=4, lora_alpha=8, lora_dropout=0.0, layers=layers))


def _toy_data(tiny_model_dir: Path, tmp_path: Path, per_class: int = 20, max_length: int = 32, **labels: str):
    rows = [{**r, "label": labels.get(r["label"], r["label"])} for r in toy_rows(per_class)]
    settings = DataSettings(train_file=str(write_jsonl(tmp_path / "toy.jsonl", rows)), max_length=max_length)
    return prepare_classification(settings, load_tokenizer(tiny_model_dir))


def _features(model, tokenizer, rows):
    from transformers import DataCollatorWithPadding

    collate = DataCollatorWithPadding(tokenizer)
    last, _ = head_inputs(model, [collate([{"input_ids": r["input_ids"]} for r in rows])])
    return last, torch.tensor([r["labels"] for r in rows])


def test_init_head_writes_the_scaled_prototypes_into_the_trained_head(tiny_model_dir: Path, tmp_path: Path):
    data = _toy_data(tiny_model_dir, tmp_path, city="7", fox="8", greet="9")
    tokenizer = load_tokenizer(tiny_model_dir)
    model = _tiny_classifier(tiny_model_dir, list(data.label_map.labels))
    features, ids = _features(model, tokenizer, data.train)
    kind = init_head(model, tokenizer, data.label_map.labels, features, ids, fit=False)
    rows = prototype_rows(features, ids, 3)
    assert kind == "prototypes"
    assert torch.allclose(head_weight(model), rows * fit_scale(rows, features, ids), rtol=1e-5)
    original = model.get_base_model().score.original_module.weight  # PEFT's trained copy changed, not it
    assert not torch.allclose(original, head_weight(model))


def test_the_step_0_classifier_beats_chance_on_a_separable_toy_set(tiny_model_dir: Path, tmp_path: Path):
    """Three classes (chance 1/3) told apart by their words; the untrained random head scores ~chance."""
    data = write_jsonl(tmp_path / "toy.jsonl", toy_rows(40))
    recipe = classify_recipe(tiny_model_dir, data, tmp_path / "run", max_steps=1, eval_every_steps=1)
    metrics = train(recipe).metrics
    assert metrics["base_val_accuracy"] >= 0.9  # step 0: the fitted start
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and rows[0]["val_accuracy"] == metrics["base_val_accuracy"]


@pytest.mark.parametrize(
    "levers", [Levers(cache=True), Levers(cache=True, prefix=True), Levers(prefix=True)], ids=str
)
def test_the_classify_fast_path_gives_the_plain_loss_and_gradients(
    tiny_model_dir: Path, tmp_path: Path, levers: Levers
):
    """Cached fp16 features, left padding and positions, the prompt's start run once per batch: the
    loss agrees to 1e-4 relative and every trained gradient (LoRA of the top block, or of every block
    without the cache, and the head) to 2e-3 of its largest entry."""
    data = _toy_data(tiny_model_dir, tmp_path, max_length=128)
    assert not data.prompt.plain  # the rows share the prompt's start
    model = _tiny_classifier(tiny_model_dir, list(data.label_map.labels), layers=1 if levers.cache else None)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # a non-zero update, so every LoRA weight gets a gradient
    rows = [{**r, "row": i} for i, r in enumerate(data.train[:6])]
    assert len({len(r["input_ids"]) for r in rows}) > 1  # padding is part of the test
    labels = torch.tensor([r["labels"] for r in rows])

    def loss_and_grads(batch):
        model.zero_grad()
        logits = model(**batch).logits
        loss = torch.nn.functional.cross_entropy(logits, labels)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    from transformers import DataCollatorWithPadding

    plain_batch = DataCollatorWithPadding(load_tokenizer(tiny_model_dir))(
        [{"input_ids": r["input_ids"]} for r in rows]
    )
    plain, plain_grads = loss_and_grads(dict(plain_batch))
    fast = ClassifyFastPath(FastPath(model, levers, 2, data.train + data.val, len(data.train)))
    start = data.prompt.prefix_ids(load_tokenizer(tiny_model_dir))
    if levers.cache:  # with the prefix lever the cache holds each row from after the start
        fast.inner.use_cache(1, "test", start if levers.prefix else ())
        assert fast.inner.cache.offsets[-1] == sum(len(r["input_ids"]) for r in data.train + data.val) - (
            len(start) * len(data.train + data.val) if levers.prefix else 0
        )
    if levers.prefix:
        fast.use_prefix(start)
    assert fast.check_against_plain() is None
    batch = fast.collate(rows)  # features from the cache, filled here
    batch.pop("labels")
    assert ("inputs_embeds" in batch) == levers.cache and ("input_ids" in batch) != levers.cache
    tokens = batch.get("inputs_embeds", batch.get("input_ids"))
    width = max(len(r["input_ids"]) for r in rows) - (len(start) if levers.prefix else 0)
    assert tokens.shape[1] == width and batch["attention_mask"].shape[1] == max(
        len(r["input_ids"]) for r in rows
    )
    got, got_grads = loss_and_grads(batch)
    fast.restore()
    assert loss_and_grads(dict(plain_batch))[0] == pytest.approx(plain, rel=1e-6)  # no hook left behind
    assert got == pytest.approx(plain, rel=1e-4)
    assert got_grads.keys() == plain_grads.keys() and any("score" in n for n in got_grads)
    for name, want in plain_grads.items():
        assert want.abs().max() > 0, name
        assert (got_grads[name] - want).abs().max() <= 2e-3 * want.abs().max(), name


@pytest.mark.parametrize("max_length", [128, 32], ids=["prompt", "bare texts"])
def test_a_classifier_trains_the_same_on_the_fast_path(
    tiny_model_dir: Path, tmp_path: Path, caplog, max_length
):
    data = write_jsonl(tmp_path / "toy.jsonl", toy_rows(20))

    def curve(name: str, speedups: object) -> list[tuple[int, float]]:
        recipe = classify_recipe(tiny_model_dir, data, tmp_path / name, max_steps=6, eval_every_steps=3)
        result = train(recipe.replace(layers=1, speedups=speedups, max_length=max_length))
        rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r.get("loss", r.get("val_loss"))) for r in rows if "loss" in r or "val_loss" in r]

    plain = curve("plain", "none")
    with caplog.at_level(logging.INFO, logger="lora_studio"):
        fast = curve("fast", "auto")
    assert "fast path: no label_only: a classifier's head has no vocabulary projection" in caplog.text
    if max_length == 128:  # the prompt fits: its start runs once per batch
        assert "fast path: cache, prefix" in caplog.text
    else:
        assert "fast path: no prefix: the texts are read bare (no prompt)" in caplog.text
        assert "fast path: cache" in caplog.text
    assert [s for s, _ in fast] == [s for s, _ in plain]
    assert [v for _, v in fast] == pytest.approx([v for _, v in plain], abs=1e-3)


def test_the_linear_probe_runs_end_to_end(tiny_model_dir: Path):
    rows = [LabeledText(f"row {i}", r["text"], r["label"]) for i, r in enumerate(toy_rows(20))]
    probe = train_probe(str(tiny_model_dir), rows[:48], rows[48:], max_length=32)
    assert probe.labels == sorted(TOY_WORDS) and probe.fit.l2 > 0
    test = toy_rows(10, seed=1)
    predicted = probe.predict([r["text"] for r in test])
    accuracy = sum(p == r["label"] for p, r in zip(predicted, test, strict=True)) / len(test)
    assert accuracy > 0.8  # chance is 1/3
    assert LabelMap.from_labels(predicted).labels <= tuple(probe.labels)


def test_the_prefix_lever_is_ruled_out_where_it_cannot_be_exact(tiny_model_dir: Path, tmp_path: Path):
    from lora_studio.tasks.classify.fast import prefix_ruled_out
    from lora_studio.tasks.classify.prefix import rows_share

    data = _toy_data(tiny_model_dir, tmp_path, max_length=128)
    start = data.prompt.prefix_ids(load_tokenizer(tiny_model_dir))
    recipe = classify_recipe(tiny_model_dir, tmp_path / "toy.jsonl", tmp_path / "run")
    assert prefix_ruled_out(recipe, Levers(), start, data) is None
    assert "read bare" in prefix_ruled_out(recipe, Levers(), [], data)
    checkpointing = recipe.replace(gradient_checkpointing="on")
    assert "gradient checkpointing" in prefix_ruled_out(checkpointing, Levers(), start, data)
    assert prefix_ruled_out(checkpointing, Levers(cache=True), start, data) is None  # the cache turns it off
    assert rows_share(start, data.train) and not rows_share(start[:-1] + [start[-1] + 1], data.train)
    assert not rows_share(start, [{"input_ids": start}])  # a row must keep a token after the start
