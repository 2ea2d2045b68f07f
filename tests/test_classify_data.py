"""Classification data: label maps, the stratified split, the report, bad label data, and the scores."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from classify_helpers import toy_rows, write_jsonl
from tiny_model import build_tokenizer

from lora_studio import Recipe
from lora_studio.config import DataSettings
from lora_studio.errors import ConfigError, DataError
from lora_studio.tasks.classify.data import (
    LabeledText,
    LabelMap,
    class_weights,
    load_labeled,
    prepare_classification,
    stratified_split,
)
from lora_studio.tasks.classify.scores import score_predictions, write_scores


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def settings(train_file: Path, **changes) -> DataSettings:
    return replace(DataSettings(train_file=str(train_file), max_length=32), **changes)


def rows_of(counts: dict[str, int]) -> list[LabeledText]:
    return [
        LabeledText(f"line {i}", f"text {label} {i}", label) for label, n in counts.items() for i in range(n)
    ]


# --- labels ----------------------------------------------------------------------------------------
def test_label_map_orders_numbers_by_value_and_names_alphabetically():
    assert LabelMap.from_labels(["10", "2", "0", "1"]).labels == ("0", "1", "2", "10")
    assert LabelMap.from_labels(["spam", "ham", "eggs"]).labels == ("eggs", "ham", "spam")
    label_map = LabelMap.from_labels(["b", "a"])
    assert label_map.id2label == {0: "a", 1: "b"} and label_map.label2id == {"a": 0, "b": 1}


def test_numeric_labels_are_the_same_in_jsonl_csv_and_floats(tmp_path: Path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x", "label": 3}, {"text": "y", "label": 3.0}])
    (tmp_path / "b.csv").write_text("text,label\nz,3\n")
    labels = [r.label for r in load_labeled(tmp_path / "a.jsonl")] + [
        r.label for r in load_labeled(tmp_path / "b.csv")
    ]
    assert labels == ["3", "3", "3"]


def test_column_names_can_be_overridden_and_parquet_and_datasets_folders_read(tmp_path: Path):
    from datasets import Dataset

    table = Dataset.from_list(
        [{"sentence": "hello", "intent": "greet"}, {"sentence": "Paris", "intent": "city"}]
    )
    table.to_parquet(str(tmp_path / "d.parquet"))
    table.save_to_disk(str(tmp_path / "folder"))
    for path in (tmp_path / "d.parquet", tmp_path / "folder"):
        rows = load_labeled(path, text_column="sentence", label_column="intent")
        assert [(r.text, r.label) for r in rows] == [("hello", "greet"), ("Paris", "city")]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"text": "hi"}, "missing field 'label'"),
        ({"text": "hi", "label": ""}, "the label is empty"),
        ({"text": "hi", "label": None}, "missing field 'label'"),
        ({"text": "   ", "label": "a"}, "the text is empty"),
        ({"label": "a"}, "missing field 'text'"),
        ({"text": "hi", "label": ["a"]}, "expected a label name or number"),
    ],
)
def test_bad_rows_name_the_file_line_and_field(tmp_path: Path, row: dict, message: str):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine", "label": "a"}, row])
    with pytest.raises(DataError, match=rf"bad\.jsonl, line 2.*{message}"):
        load_labeled(path)


def test_a_single_class_is_refused(tmp_path: Path, tokenizer):
    path = write_jsonl(tmp_path / "one.jsonl", [{"text": f"t{i}", "label": "only"} for i in range(20)])
    with pytest.raises(DataError, match="every training row has the label 'only'.*at least two classes"):
        prepare_classification(settings(path), tokenizer)


def test_validation_labels_training_never_saw_are_refused(tmp_path: Path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", toy_rows(5))
    val = write_jsonl(
        tmp_path / "val.jsonl", [{"text": "hello", "label": "greet"}, {"text": "x", "label": "alien"}]
    )
    with pytest.raises(
        DataError, match=r"val\.jsonl, line 2: the label\(s\) 'alien' never appear in the training"
    ):
        prepare_classification(settings(train, val_file=str(val)), tokenizer)


# --- splitting -------------------------------------------------------------------------------------
def test_sixty_classes_of_ten_rows_split_without_losing_a_class():
    rows = rows_of({str(c): 10 for c in range(60)})
    train, val = stratified_split(rows, 0.1, seed=42)
    assert Counter(r.label for r in val) == {str(c): 1 for c in range(60)}
    assert Counter(r.label for r in train) == {str(c): 9 for c in range(60)}


def test_split_never_takes_a_class_last_row_and_is_seeded():
    rows = rows_of({"big": 40, "small": 2, "single": 1})
    train, val = stratified_split(rows, 0.5, seed=1)
    assert {r.label for r in train} == {"big", "small", "single"}
    assert Counter(r.label for r in train)["small"] == 1 and len(val) == 22
    assert stratified_split(rows, 0.5, seed=1) == (train, val)
    assert stratified_split(rows, 0.5, seed=2) != (train, val)


def test_balanced_class_weights_are_inverse_frequency():
    rows = rows_of({"a": 30, "b": 10})
    assert class_weights(rows, LabelMap.from_labels(["a", "b"])) == pytest.approx([40 / 60, 40 / 20])


# --- the report ------------------------------------------------------------------------------------
def test_balance_warning_fires_on_real_skew_only(tmp_path: Path, tokenizer):
    even = write_jsonl(
        tmp_path / "even.jsonl", [{"text": f"t{c} {i}", "label": c} for c in range(60) for i in range(10)]
    )
    report = prepare_classification(settings(even), tokenizer).report
    assert report.classes == 60 and report.imbalance_ratio == 1.0
    assert not [w for w in report.warnings if "imbalanced" in w]

    two = [{"text": f"good {i}", "label": "pos"} for i in range(54)] + [
        {"text": f"bad {i}", "label": "neg"} for i in range(46)
    ]
    report = prepare_classification(settings(write_jsonl(tmp_path / "two.jsonl", two)), tokenizer).report
    assert not [w for w in report.warnings if "imbalanced" in w]  # 54/46 over two labels

    skewed = [{"text": f"big {i}", "label": "big"} for i in range(100)] + [
        {"text": f"s {i}", "label": "s"} for i in range(10)
    ]
    report = prepare_classification(settings(write_jsonl(tmp_path / "skew.jsonl", skewed)), tokenizer).report
    assert [
        w
        for w in report.warnings
        if "imbalanced classes: 'big' has 90" in w and "class_weight: balanced" in w
    ]


def test_prepare_encodes_ids_and_reports_duplicates_and_conflicts(tmp_path: Path, tokenizer):
    rows = (
        toy_rows(10)
        + [{"text": "hello world", "label": "greet"}] * 2
        + [{"text": "hello world", "label": "city"}]
    )
    data = prepare_classification(settings(write_jsonl(tmp_path / "d.jsonl", rows)), tokenizer)
    assert data.label_map.labels == ("city", "fox", "greet")
    assert {r["labels"] for r in data.train} == {0, 1, 2}
    assert all(len(r["input_ids"]) <= 32 for r in data.train + data.val)
    assert data.report.conflicting == 1
    assert data.report.train_rows + data.report.val_rows == 33


# --- recipe ----------------------------------------------------------------------------------------
def test_recipe_task_is_checked_and_overridable(tmp_path: Path):
    raw = {"data": {"train_file": "x.csv"}}
    assert Recipe.from_dict(raw).task == "chat"
    assert Recipe.from_dict({**raw, "task": "classify"}).task == "classify"
    with pytest.raises(ConfigError, match="task: expected one of 'chat', 'classify', got 'regress'"):
        Recipe.from_dict({**raw, "task": "regress"})
    path = tmp_path / "r.yaml"
    path.write_text("data:\n  train_file: x.csv\n")
    recipe = Recipe.from_yaml(path, ["task=classify", "label_column=intent", "class_weight=balanced"])
    assert (recipe.task, recipe.classify.label_column, recipe.classify.class_weight) == (
        "classify",
        "intent",
        "balanced",
    )
    assert Recipe.from_dict(recipe.to_dict()) == recipe


# --- scores ----------------------------------------------------------------------------------------
def test_scores_match_a_hand_count(tmp_path: Path):
    # true:      a a a b b c     predicted: a a b b c c
    scores = score_predictions([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], ["a", "b", "c"])
    assert scores.confusion == ((2, 1, 0), (0, 1, 1), (0, 0, 1))
    assert scores.accuracy == pytest.approx(4 / 6)
    per = {c["label"]: c for c in scores.per_class()}
    assert (per["a"]["precision"], per["a"]["recall"]) == (1.0, pytest.approx(2 / 3))
    assert (per["b"]["precision"], per["b"]["recall"]) == (0.5, 0.5)
    assert (per["c"]["precision"], per["c"]["recall"]) == (0.5, 1.0)
    f1 = [0.8, 0.5, 2 / 3]
    assert scores.macro_f1 == pytest.approx(sum(f1) / 3)
    paths = write_scores(scores, tmp_path / "eval")
    saved = json.loads(paths[0].read_text())
    assert saved["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]] and saved["labels"] == [
        "a",
        "b",
        "c",
    ]
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_macro_f1_ignores_classes_absent_from_both_sides():
    scores = score_predictions([0, 1], [0, 1], ["a", "b", "never"])
    assert scores.macro_f1 == 1.0


@pytest.mark.parametrize(
    "task, section, setting, value, honoured_by",
    [
        ("chat", "train", "select_best", "macro_f1", "classify"),
        ("chat", "classify", "class_weight", "balanced", "classify"),
        ("chat", "classify", "label_column", "intent", "classify"),
        ("classify", "train", "select_best", "balanced", "chat"),
        ("classify", "data", "system_prompt", "Be brief.", "chat"),
    ],
)
def test_a_setting_the_task_cannot_honour_is_an_error_naming_both(task, section, setting, value, honoured_by):
    raw = {"task": task, "data": {"train_file": "x.csv"}, section: {setting: value}}
    with pytest.raises(
        ConfigError, match=rf"{section}\.{setting}: .* is for task: {honoured_by}; task '{task}'"
    ):
        Recipe.from_dict(raw)


def test_old_keys_still_load_with_a_note_to_move_them(caplog: pytest.LogCaptureFixture):
    raw = {
        "task": "classify",
        "data": {"train_file": "x.csv", "text_column": "sentence", "label_column": "intent"},
        "train": {"class_weight": "balanced", "metric_for_best_model": "macro_f1"},
    }
    with caplog.at_level("WARNING", logger="lora_studio.config"):
        recipe = Recipe.from_dict(raw, source="old.yaml")
    assert (recipe.classify.text_column, recipe.classify.label_column) == ("sentence", "intent")
    assert (recipe.classify.class_weight, recipe.train.select_best) == ("balanced", "macro_f1")
    notes = [r.getMessage() for r in caplog.records]
    assert (
        "old.yaml: data.text_column is now classify.text_column; it is still read, but please move it"
        in notes
    )
    assert len(notes) == 4
    assert Recipe.from_dict(recipe.to_dict()) == recipe  # the resolved recipe has the new keys only
