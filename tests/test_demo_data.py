"""The committed demo data: well formed, the promised sizes, no train/test overlap, reproducible."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from lora_studio import Recipe
from lora_studio.data import load_examples

DEMO = Path(__file__).resolve().parents[1] / "examples" / "json_extraction"
FIELDS = ["name", "item", "quantity", "city"]


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DEMO / name).read_text(encoding="utf-8").splitlines()]


def _sentence(row: dict) -> str:
    return row["messages"][1]["content"]


@pytest.mark.parametrize(("name", "minimum"), [("train.jsonl", 300), ("test.jsonl", 60)])
def test_demo_file_is_well_formed_chat_data(name, minimum):
    fmt, examples = load_examples(DEMO / name)  # the library's own checks: roles, non-empty, an answer
    assert fmt == "messages" and len(examples) >= minimum
    for row in _rows(name):
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        record = json.loads(row["messages"][2]["content"])
        assert list(record) == FIELDS
        assert isinstance(record["quantity"], int) and record["quantity"] > 0
        assert all(isinstance(record[k], str) and record[k] for k in ("name", "item", "city"))
        assert record["name"] in _sentence(row) and record["city"] in _sentence(row)


def test_test_rows_are_unseen_in_training():
    train, test = _rows("train.jsonl"), _rows("test.jsonl")
    train_sentences = {_sentence(r) for r in train}
    train_records = {r["messages"][2]["content"] for r in train}
    assert len(train_sentences) == len(train)  # no duplicates within training either
    assert len({_sentence(r) for r in test}) == len(test)
    assert not train_sentences & {_sentence(r) for r in test}
    assert not train_records & {r["messages"][2]["content"] for r in test}


def test_data_is_varied_enough_to_be_learned_not_memorised():
    rows = _rows("train.jsonl") + _rows("test.jsonl")
    records = [json.loads(r["messages"][2]["content"]) for r in rows]
    assert len({r["name"] for r in records}) >= 100
    assert len({r["item"] for r in records}) >= 20 and len({r["city"] for r in records}) >= 20
    # Some quantities are written as words, and some items appear in the plural: not a pure copy task.
    assert any(str(r["quantity"]) not in _sentence(row) for r, row in zip(records, rows, strict=True))
    assert any(r["item"] not in _sentence(row) for r, row in zip(records, rows, strict=True))


def test_generator_reproduces_the_committed_files():
    spec = importlib.util.spec_from_file_location("make_data", DEMO / "make_data.py")
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    train, test = make_data.generate()
    assert train == _rows("train.jsonl") and test == _rows("test.jsonl")


def test_default_recipe_trains_on_the_demo_data():
    recipe = Recipe.from_yaml(Path(__file__).resolve().parents[1] / "recipes" / "smollm2-lora-cpu.yaml")
    assert recipe.model.base_model == "smollm2-135m-instruct"
    assert Path(recipe.data.train_file).resolve() == (DEMO / "train.jsonl").resolve()
    assert recipe.data.val_file is None  # the test file must never steer training (early stopping)
