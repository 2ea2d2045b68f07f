"""`max_length: auto` for task: classify: chosen from the data, said, recorded and read back."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from classify_helpers import TOY_WORDS, build_classifier_adapter, classify_recipe, toy_rows, write_jsonl
from tiny_model import build_tokenizer

from lora_studio import Recipe, train
from lora_studio.config import DataSettings
from lora_studio.errors import ConfigError, ModelError
from lora_studio.evaluation.report import EvalOptions, run_eval
from lora_studio.models import load_tokenizer
from lora_studio.tasks.classify.data import LabeledText, prepare_classification
from lora_studio.tasks.classify.lengths import (
    CAP,
    FLOOR,
    choose_max_length,
    reading_bound,
    recorded_max_length,
)
from lora_studio.tasks.classify.model import Classifier
from lora_studio.tasks.classify.probe import train_probe


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()  # in memory: no base folder, so the cap is CAP


def long_rows(words: int, n: int = 6) -> list[dict[str, str]]:
    """`n` rows per class whose texts are `words` of the class's words (one token each here)."""
    return [
        {"text": " ".join(vocab[(i + j) % len(vocab)] for j in range(words)), "label": label}
        for label, vocab in TOY_WORDS.items()
        for i in range(n)
    ]


# --- the choice ----------------------------------------------------------------------------------
def test_the_99th_percentile_rounded_up_at_least_the_floor_and_at_most_the_cap():
    assert choose_max_length(range(1, 1001), overhead=20, cap=2048).max_length == 1024  # p99 990
    assert choose_max_length(range(1, 1001), overhead=20, cap=1000).max_length == 1000
    outlier = choose_max_length([600] * 199 + [5000], overhead=20, cap=2048)
    assert (outlier.max_length, outlier.percentile, outlier.longest) == (
        640,
        600,
        5000,
    )  # one row does not set it
    assert (
        choose_max_length([40] * 100, overhead=20, cap=2048).max_length == FLOOR
    )  # never below the old default
    assert (
        choose_max_length([40] * 100, overhead=20, cap=256).max_length == 256
    )  # nor above the base's positions
    assert (
        choose_max_length([40] * 100, overhead=700, cap=2048).max_length == 768
    )  # the prompt and some text fit


def test_auto_reads_at_the_cap_or_the_bases_positions_and_a_set_value_as_it_is(
    tiny_model_dir: Path, tokenizer
):
    assert reading_bound("auto", load_tokenizer(tiny_model_dir)) == 256  # its max_position_embeddings
    assert reading_bound("auto", tokenizer) == CAP  # no base folder beside it
    assert reading_bound(300, tokenizer) == 300


def test_recorded_max_length_prefers_what_training_chose_then_the_old_recipe_value():
    recipe = {"recipe": {"data": {"max_length": "auto"}}}
    assert recorded_max_length({**recipe, "classification": {"max_length": 704}}) == 704
    assert recorded_max_length({"recipe": {"data": {"max_length": 128}}, "classification": {}}) == 128
    assert recorded_max_length(recipe) == 512  # nothing usable recorded: the old default


# --- the recipe ----------------------------------------------------------------------------------
def test_a_classify_recipe_defaults_to_auto_and_keeps_an_explicit_value_and_chat_refuses_auto():
    classify = {"task": "classify", "data": {"train_file": "d.csv"}}
    assert Recipe.from_dict(classify).data.max_length == "auto"
    assert (
        Recipe.from_dict({**classify, "data": {"train_file": "d.csv", "max_length": 300}}).data.max_length
        == 300
    )
    assert Recipe.from_dict({"data": {"train_file": "d.jsonl"}}).data.max_length == 512  # chat: as before
    with pytest.raises(ConfigError) as refused:
        Recipe.from_dict({"data": {"train_file": "d.jsonl", "max_length": "auto"}})
    (problem,) = str(refused.value).splitlines()[1:]
    assert "data.max_length: 'auto' is for task: classify" in problem and "'chat'" in problem


# --- preparing data ------------------------------------------------------------------------------
def test_auto_reads_a_text_longer_than_512_tokens_whole_and_says_what_it_chose(
    tokenizer, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    data = write_jsonl(tmp_path / "long.jsonl", long_rows(700))
    settings = DataSettings(train_file=str(data), val_fraction=0.0, max_length="auto")
    with caplog.at_level(logging.INFO, logger="lora_studio.tasks.classify.data"):
        prepared = prepare_classification(settings, tokenizer)
    longest = max(row["length"] for row in prepared.train)
    assert longest > 700 and prepared.max_length == -(-longest // 64) * 64  # from the data, rounded up
    assert all(len(row["input_ids"]) == row["length"] and not row["truncated"] for row in prepared.train)
    report = prepared.report
    assert report.max_length == prepared.max_length and report.truncated == 0
    said = f"max_length: {prepared.max_length} tokens, chosen from the data: the 99th percentile of 18 training rows is {longest} tokens"
    assert said in caplog.text and said in "\n".join(report.lines())
    assert f"within {FLOOR}-{CAP}" in report.max_length_chosen


def test_an_explicit_max_length_is_kept_and_cuts_what_is_longer(tokenizer, tmp_path: Path):
    data = write_jsonl(tmp_path / "long.jsonl", long_rows(700))
    prepared = prepare_classification(DataSettings(train_file=str(data), val_fraction=0.0), tokenizer)
    assert prepared.max_length == 512 and prepared.report.max_length_chosen == ""
    assert prepared.report.truncated == 18 and all(len(row["input_ids"]) == 512 for row in prepared.train)


def test_auto_cuts_the_rows_beyond_its_choice_as_an_explicit_limit_would(tokenizer, tmp_path: Path):
    rows = long_rows(20, n=40) + [{"text": " ".join(["fox"] * 900), "label": "fox"}]  # one outlier
    data = write_jsonl(tmp_path / "outlier.jsonl", rows)
    settings = DataSettings(train_file=str(data), val_fraction=0.0, max_length="auto")
    auto = prepare_classification(settings, tokenizer)
    assert auto.max_length == FLOOR and auto.report.truncated == 1
    explicit = prepare_classification(replace(settings, max_length=FLOOR), tokenizer)
    assert auto.train == explicit.train  # the rows kept from the first encoding are the same ids


# --- training and use ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def roomy_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with 1024 positions (RoPE: only the config changes), so auto can pass 512."""
    folder = tmp_path_factory.mktemp("roomy") / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    return folder


def test_the_chosen_max_length_is_recorded_and_every_later_door_reads_it(
    roomy_model_dir: Path, tmp_path: Path
):
    rows = toy_rows(8) + long_rows(700, n=2)
    data = write_jsonl(tmp_path / "toy.jsonl", rows)
    recipe = classify_recipe(roomy_model_dir, data, tmp_path / "run", max_steps=2).replace(max_length="auto")
    result = train(recipe)
    meta = json.loads((result.adapter_dir / "lora_studio.json").read_text())
    chosen = meta["classification"]["max_length"]
    assert 700 < chosen <= 1024 and meta["recipe"]["data"]["max_length"] == "auto"
    assert "max_length: auto" in (result.run_dir / "config.yaml").read_text()  # a resumed run chooses again
    report = json.loads((result.run_dir / "data_report.json").read_text())
    assert report["max_length"] == chosen and "chosen from the data" in report["max_length_chosen"]
    tokenizer_config = json.loads((result.adapter_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == chosen  # what a merged model truncates at
    assert Classifier.from_adapter(result.adapter_dir).max_length == chosen
    probe = train_probe(str(roomy_model_dir), labeled(rows), max_length="auto")  # bare texts: its own choice
    assert 700 < probe.max_length <= chosen


def labeled(rows: list[dict[str, str]]) -> list[LabeledText]:
    return [LabeledText(f"line {i}", r["text"], r["label"]) for i, r in enumerate(rows)]


def test_evaluating_answers_of_a_classifier_trained_with_auto_is_refused_in_one_line(
    tiny_model_dir: Path, tmp_path: Path
):
    adapter = build_classifier_adapter(tiny_model_dir, tmp_path / "adapter", ["a", "b"])
    meta = json.loads((adapter / "lora_studio.json").read_text())
    meta["recipe"]["data"]["max_length"] = "auto"
    (adapter / "lora_studio.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="it does not write text"):
        run_eval(EvalOptions(str(adapter), str(tmp_path / "test.jsonl")))
