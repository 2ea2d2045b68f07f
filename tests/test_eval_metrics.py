"""The metrics, each against values worked out by hand: exact match, labels, JSON fields, the choice."""

from __future__ import annotations

import json

import pytest
import torch

from lora_studio.errors import DataError
from lora_studio.evaluation.answers import generate_answers
from lora_studio.evaluation.scoring import (
    OTHER,
    choose_metric,
    exact_match,
    parse_json_object,
    score,
    score_json,
    score_labels,
)
from lora_studio.models import load_tokenizer


# --- exact match and the choice of metric --------------------------------------------------------
def test_exact_match_ignores_case_and_spacing_only():
    answers = ["Paris", "  the   Eiffel\nTower ", "Paris.", "Lyon"]
    references = ["paris", "The Eiffel Tower", "Paris", "Paris"]
    assert exact_match(answers, references) == [True, True, False, False]
    assert score(answers, references, "exact").headline == 0.5


@pytest.mark.parametrize(
    ("references", "expected"),
    [
        (['{"a": 1}', '{"a": 2, "b": "x"}'], "json"),
        (["cat", "dog", "cat", "dog"], "labels"),
        (["positive", "Negative", "negative", "positive", "neutral", "positive"], "labels"),
        (["a", "b", "c"], "exact"),  # no label repeats: free answers
        (["yes"] * 5, "exact"),  # one label is not a classification
        (["The capital of France is Paris, a city on the Seine."] * 4 + ["x"] * 4, "exact"),
        (['{"a": 1}', "plain"], "exact"),  # not all JSON, no repeats
    ],
)
def test_choose_metric_from_the_references(references, expected):
    assert choose_metric(references) == expected


def test_unknown_metric_is_a_clear_error():
    with pytest.raises(DataError, match="unknown metric 'bleu'"):
        score(["a"], ["a"], "bleu")


# --- labels ------------------------------------------------------------------------------------
def test_label_scores_by_hand():
    references = ["cat", "cat", "cat", "dog", "dog", "bird"]
    answers = ["cat", "dog", "Cat.", "dog", "cat", "I think bird"]
    s = score_labels(answers, references)
    assert s.labels == ["bird", "cat", "dog"] and s.columns == ["bird", "cat", "dog", OTHER]
    # rows: reference bird, cat, dog; columns: answer bird, cat, dog, other
    assert s.confusion == [[0, 0, 0, 1], [0, 2, 1, 0], [0, 1, 1, 0]]
    assert s.accuracy == pytest.approx(3 / 6)
    assert s.precision == pytest.approx({"bird": 0.0, "cat": 2 / 3, "dog": 1 / 2})
    assert s.recall == pytest.approx({"bird": 0.0, "cat": 2 / 3, "dog": 1 / 2})
    assert s.f1 == pytest.approx({"bird": 0.0, "cat": 2 / 3, "dog": 1 / 2})
    assert s.macro_f1 == pytest.approx(7 / 18)

    result = score(answers, references)  # auto: labels
    assert result.metric == "labels" and result.headline == pytest.approx(0.5)
    assert result.correct == [True, False, True, True, False, False]
    assert result.exact_match == pytest.approx(2 / 6)  # "Cat." is the label, but not the exact text
    table = dict(result.table())
    assert table["accuracy"] == pytest.approx(0.5) and table["macro F1"] == pytest.approx(7 / 18)
    assert table["  cat precision"] == pytest.approx(2 / 3)


@pytest.fixture
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), load_tokenizer(
        tiny_model_dir
    )


def test_label_scores_of_a_tiny_model_that_always_answers_x(tiny):
    model, tokenizer = tiny
    (x,) = tokenizer("x", add_special_tokens=False)["input_ids"]
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    head.bias.data[x] = 20.0
    model.lm_head = head
    references = ["x", "x", "y", "x", "y", "z"]
    prompts = [[{"role": "user", "content": f"Classify item {i}"}] for i in range(len(references))]
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=1, batch_size=4)
    assert answers == ["x"] * 6

    result = score(answers, references)
    lab = result.labels
    assert result.metric == "labels" and lab.accuracy == pytest.approx(3 / 6)
    assert lab.confusion == [[3, 0, 0, 0], [2, 0, 0, 0], [1, 0, 0, 0]]
    # x: precision 3/6, recall 3/3, F1 2*0.5*1/1.5; y and z are never predicted: 0
    assert lab.precision == pytest.approx({"x": 0.5, "y": 0.0, "z": 0.0})
    assert lab.recall == pytest.approx({"x": 1.0, "y": 0.0, "z": 0.0})
    assert lab.macro_f1 == pytest.approx((2 / 3) / 3)
    assert result.exact_match == pytest.approx(0.5)


# --- JSON fields -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": 1}', {"a": 1}),
        ('```json\n{"a": 1, "b": "x"}\n```', {"a": 1, "b": "x"}),
        ('Sure! Here it is: {"a": 1} Hope that helps.', {"a": 1}),
        ('{broken {"a": 2}', {"a": 2}),  # the first brace that starts a valid object wins
        ('{"a": 1', None),  # cut off by max_new_tokens
        ("[1, 2]", None),
        ("no json here", None),
    ],
)
def test_parse_json_object(text, expected):
    assert parse_json_object(text) == expected


def test_score_json_counts_fields_and_whole_records():
    refs = [json.dumps({"name": "Ana Silva", "quantity": 3, "city": "Porto"})] * 4
    answers = [
        '{"name": "Ana Silva", "quantity": 3, "city": "Porto"}',  # all right
        '{"name": " ana silva", "quantity": "3", "city": "Porto", "extra": 1}',  # right up to case/space/type
        '{"name": "Ana Silva", "quantity": 4, "town": "Porto"}',  # wrong number, wrong key
        "I cannot do that.",  # no JSON: wrong everywhere
    ]
    s = score_json(answers, refs)
    assert s.rows == 4 and s.parse_errors == 1
    assert s.field_accuracy == {"name": 0.75, "quantity": 0.5, "city": 0.5}
    assert s.record_accuracy == 0.5 and s.records_right == [True, True, False, False]
    assert s.mean_field_accuracy == pytest.approx((0.75 + 0.5 + 0.5) / 3)
    assert "whole-record accuracy: 50.0%" in s.lines()

    result = score(answers, refs)
    assert result.metric == "json" and result.headline == 0.5
    assert result.exact_match == 0.25  # only the first answer is the reference text itself
    assert result.to_dict()["json"]["field_accuracy"]["name"] == 0.75


def test_score_json_refuses_mismatched_or_non_json_references():
    with pytest.raises(ValueError, match="one answer per reference"):
        score_json(["{}"], [])
    with pytest.raises(DataError, match="reference 2"):
        score_json(["{}", "{}"], ['{"a": 1}', "plain text"])
