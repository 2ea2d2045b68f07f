"""The classify prompt (tasks/classify/prompt.py): one formatting for training, classify, serve, merge
and verify; adapters from before prompts still read bare texts; the start kept when fine-tuning loses."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from classify_helpers import build_classifier_adapter, toy_rows, write_jsonl

from lora_studio import Recipe, train
from lora_studio.adapters import METADATA_FILE
from lora_studio.config import LoraSettings, ModelSettings
from lora_studio.export import MERGE_INFO_FILE
from lora_studio.models import load_tokenizer
from lora_studio.tasks.classify.data import prepare_classification
from lora_studio.tasks.classify.features import head_weight
from lora_studio.tasks.classify.model import (
    Classifier,
    attach_classification_lora,
    load_classification_base,
)
from lora_studio.tasks.classify.probe import train_probe
from lora_studio.tasks.classify.prompt import ClassifyPrompt, choose_prompt, instruction
from lora_studio.tasks.classify.train import KeepStartIfBetter
from lora_studio.tasks.registry import merge as merge_adapter
from lora_studio.tasks.registry import verify

LABELS = ["city", "fox", "greet"]
TEXTS = ["hello world after", "Paris capital city", "quick brown fox jumps"]
MAX_LENGTH = 128  # room for the tiny tokenizer's ~57-token prompt (it spells most words letter by letter)


def prompted_recipe(model_dir: Path, train_file: Path, run_dir: Path, prompt: str = "auto") -> Recipe:
    return Recipe.from_dict(
        {
            "name": "toy-prompted",
            "task": "classify",
            "model": {"base_model": str(model_dir)},
            "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
            "data": {"train_file": str(train_file), "max_length": MAX_LENGTH, "val_fraction": 0.2},
            "train": {
                "output_dir": str(run_dir),
                "num_train_epochs": 4,
                "per_device_train_batch_size": 8,
                "eval_every_steps": 6,
                "learning_rate": 3e-2,
            },
            "classify": {"prompt": prompt},
        }
    )


@pytest.fixture(scope="module")
def prompted(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Recipe, Path]:
    """A toy classifier trained once with the default prompt (its own studio home)."""
    root = tmp_path_factory.mktemp("prompted")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_STUDIO_HOME", str(root / "home"))
        recipe = prompted_recipe(tiny_model_dir, write_jsonl(root / "toy.jsonl", toy_rows(20)), root / "run")
        return recipe, train(recipe).adapter_dir


# --- the formatting itself ---------------------------------------------------------------------------
def test_the_prompt_is_the_chat_template_around_the_text_and_only_the_text_is_cut(tiny_model_dir: Path):
    tokenizer = load_tokenizer(tiny_model_dir)
    prompt = choose_prompt("auto", LABELS, tokenizer, MAX_LENGTH)
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": instruction(LABELS)}, {"role": "user", "content": TEXTS[0]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt.before + TEXTS[0] + prompt.after == rendered
    assert "Answer with one of: city, fox, greet." in prompt.before

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    long_text = " ".join(["quick brown fox"] * 40)
    encoded = prompt.encode(long_text, tokenizer, MAX_LENGTH)
    before, after = ids(prompt.before), ids(prompt.after)
    assert len(encoded["input_ids"]) == MAX_LENGTH and encoded["truncated"]
    assert encoded["input_ids"][: len(before)] == before and encoded["input_ids"][-len(after) :] == after
    assert (
        encoded["input_ids"][len(before) : -len(after)]
        == ids(long_text)[: MAX_LENGTH - len(before) - len(after)]
    )


def test_the_prompt_is_left_out_when_asked_when_it_does_not_fit_and_names_few_word_labels_only(
    tiny_model_dir: Path,
):
    tokenizer = load_tokenizer(tiny_model_dir)
    assert choose_prompt("none", LABELS, tokenizer, MAX_LENGTH).plain
    assert choose_prompt("auto", LABELS, tokenizer, 32).plain  # a 57-token prompt in 32 tokens: the bare text
    assert (
        ClassifyPrompt().encode(TEXTS[0], tokenizer, 4)["input_ids"] == tokenizer(TEXTS[0])["input_ids"][:4]
    )
    assert instruction(["K7QX", "B2RZ"]) == "Classify the text. Answer with its label."
    assert instruction([f"label{i}" for i in range(3)]) == "Classify the text. Answer with its label."


# --- one formatting at every door ------------------------------------------------------------------
def test_training_and_the_classifier_read_the_same_tokens(prompted: tuple[Recipe, Path]):
    recipe, adapter = prompted
    tokenizer = load_tokenizer(Path(recipe.model.base_model))
    data = prepare_classification(recipe.data, tokenizer, recipe.train.seed, recipe.classify)
    assert not data.prompt.plain
    recorded = json.loads((adapter / METADATA_FILE).read_text())["classification"]["prompt"]
    assert recorded == data.prompt.to_dict()
    classifier = Classifier.from_adapter(adapter)
    assert classifier.prompt == data.prompt
    for row, encoded in zip(data.train_rows[:5], data.train[:5], strict=True):
        batch = classifier.prompt.encode_batch([row.text], classifier.tokenizer, classifier.max_length)
        assert batch["input_ids"][0].tolist() == encoded["input_ids"]


def test_merge_serve_and_verify_read_texts_in_the_same_prompt(prompted: tuple[Recipe, Path], tmp_path: Path):
    _, adapter = prompted
    classifier = Classifier.from_adapter(adapter)
    with_prompt = classifier.probabilities(TEXTS)
    bare = Classifier(classifier.model, classifier.tokenizer, LABELS, MAX_LENGTH, "bare").probabilities(TEXTS)
    assert (with_prompt - bare).abs().max() > 1e-3  # the prompt changes what the model sees
    report = merge_adapter(adapter, tmp_path / "merged")
    assert report.check.passed and any("read inside a prompt" in line for line in report.lines())
    info = json.loads((tmp_path / "merged" / MERGE_INFO_FILE).read_text())
    assert info["classification"]["prompt"] == classifier.prompt.to_dict()
    merged = Classifier.from_merged(tmp_path / "merged")
    assert merged.prompt == classifier.prompt
    assert torch.allclose(merged.probabilities(TEXTS), with_prompt, atol=1e-4)
    checked = verify(adapter, merged_dir=tmp_path / "merged")  # merged folder and /v1/classify
    assert checked.ok, "\n".join(checked.lines())
    assert {c.what.split(" ")[0] for c in checked.checks} == {"merged", "server"}


def test_an_adapter_from_before_prompts_reads_bare_texts(tiny_model_dir: Path, tmp_path: Path):
    adapter = build_classifier_adapter(tiny_model_dir, tmp_path / "old", LABELS)
    meta_file = adapter / METADATA_FILE
    meta = json.loads(meta_file.read_text())
    del meta["classification"]["prompt"]  # written before prompts existed
    meta_file.write_text(json.dumps(meta))
    classifier = Classifier.from_adapter(adapter)
    assert classifier.prompt.plain
    tokens = classifier.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        direct = torch.softmax(classifier.model(**tokens).logits, -1)
    assert torch.allclose(classifier.probabilities(TEXTS, batch_size=3), direct, atol=1e-5)


def test_the_probe_can_read_texts_in_the_prompt(tiny_model_dir: Path):
    from lora_studio.tasks.classify.data import LabeledText

    rows = [LabeledText(f"row {i}", r["text"], r["label"]) for i, r in enumerate(toy_rows(10))]
    probe = train_probe(str(tiny_model_dir), rows[:24], rows[24:], MAX_LENGTH, prompt="auto")
    assert not probe.prompt.plain
    assert probe.features(TEXTS).shape == (3, 2 * head_weight(probe.model).shape[1])
    assert set(probe.predict(TEXTS)) <= set(LABELS)


# --- the start is kept when fine-tuning does not beat it ----------------------------------------------
def test_the_fitted_start_is_kept_when_validation_says_fine_tuning_lost(tiny_model_dir: Path):
    model, _ = load_classification_base(ModelSettings(base_model=str(tiny_model_dir)), LABELS, 2)
    model = attach_classification_lora(model, LoraSettings(r=4, lora_alpha=8))
    keep = KeepStartIfBetter(model, "eval_loss", greater_is_better=False)
    start = head_weight(model).detach().clone()
    with torch.no_grad():  # "training": the head and LoRA move
        head_weight(model).add_(1.0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.5)
    lost = SimpleNamespace(log_history=[{"step": 0, "eval_loss": 0.4}], best_metric=0.9)
    won = SimpleNamespace(log_history=[{"step": 0, "eval_loss": 0.4}], best_metric=0.2)
    keep.on_train_end(None, won, None)
    assert not keep.kept_start and not torch.equal(head_weight(model), start)
    keep.on_train_end(None, lost, None)
    assert keep.kept_start and torch.equal(head_weight(model), start)
    assert all(p.abs().sum() == 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_the_prompt_start_runs_once_and_gives_the_full_pass_probabilities(prompted: tuple[Recipe, Path]):
    """The prompt's tokens before the text are computed once and reused: the same probabilities as
    one full forward pass per batch, within 1e-5."""
    _, adapter = prompted
    classifier = Classifier.from_adapter(adapter)
    texts = [*TEXTS, "Paris", " ".join(["quick brown fox"] * 30)]  # lengths differ: padding is in play
    reused = classifier.probabilities(texts, batch_size=5)
    assert classifier._prefix_cache is not None and classifier._prefix_cache[1] > 0
    batch = classifier.prompt.encode_batch(texts, classifier.tokenizer, classifier.max_length)
    with torch.no_grad():
        full = torch.softmax(classifier.model(**batch).logits, -1)
    assert torch.allclose(reused, full, atol=1e-5)
    assert torch.allclose(classifier.probabilities(texts[:1]), full[:1], atol=1e-5)  # the kept start, again


def test_word_labels_in_the_prompt_keep_the_label_words_rows_as_a_frozen_verbalizer(
    prompted: tuple[Recipe, Path],
):
    """Trained with the prompt, word labels' head is the label words' embedding rows, unscaled and
    unchanged by training (only LoRA trained); the LoRA update is not zero."""
    from lora_studio.tasks.classify.head_init import label_word_rows

    _, adapter = prompted
    classifier = Classifier.from_adapter(adapter)
    expected = label_word_rows(classifier.model, classifier.tokenizer, LABELS)
    assert torch.equal(head_weight(classifier.model).detach().float(), expected)
    assert any(p.abs().sum() > 0 for n, p in classifier.model.named_parameters() if "lora_B" in n)
