"""Data: every file type and row format, masks on answers only, splits, the report, bad input."""

import json

import pytest

from lora_studio import DataError, train
from lora_studio.config import DataSettings
from lora_studio.data import (
    IGNORE_INDEX,
    check_file,
    encode,
    load_examples,
    prepare,
    render,
    split,
)
from lora_studio.models import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize(
    "row, fmt",
    [
        (CHAT, "messages"),
        ({"instruction": "Say hello", "input": "", "output": "hello"}, "alpaca"),
        ({"prompt": "hi", "completion": "hello"}, "prompt_completion"),
        ({"text": "hello world"}, "text"),
    ],
)
def test_formats_are_detected(tmp_path, row, fmt):
    detected, examples = load_examples(write_jsonl(tmp_path / "d.jsonl", [row] * 3))
    assert detected == fmt and len(examples) == 3


def test_json_csv_parquet_and_datasets_folder(tmp_path):
    from datasets import Dataset

    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(4)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("prompt,completion\n" + "".join(f"p{i},c{i}\n" for i in range(4)))
    Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "folder"))
    for name in ("d.json", "d.csv", "d.parquet", "folder"):
        fmt, examples = load_examples(tmp_path / name)
        assert fmt == "prompt_completion" and examples[3].answer() == "c3", name


def test_loss_covers_only_the_assistant_answers(tokenizer):
    _, [example] = load_examples_from_rows(
        [
            {
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "one"},
                    {"role": "assistant", "content": "1"},
                    {"role": "user", "content": "two"},
                    {"role": "assistant", "content": "2"},
                ]
            }
        ]
    )
    segments = render(example, tokenizer)
    assert [text for text, trainable in segments if trainable] == ["1<|im_end|>\n", "2<|im_end|>\n"]
    row = encode(example, tokenizer, max_length=512)
    learned = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "1<|im_end|>\n2<|im_end|>\n"
    full = tokenizer.apply_chat_template(list(example.messages), tokenize=False)
    assert tokenizer.decode(row["input_ids"]) == full


def test_plain_text_learns_everything_and_ends_with_eos(tokenizer):
    _, [example] = load_examples_from_rows([{"text": "hello world"}])
    row = encode(example, tokenizer, max_length=512)
    assert row["labels"] == row["input_ids"] and row["input_ids"][-1] == tokenizer.eos_token_id


def test_truncation_and_split(tokenizer):
    _, examples = load_examples_from_rows([CHAT] * 20)
    row = encode(examples[0], tokenizer, max_length=5)
    assert len(row["input_ids"]) == 5 and row["truncated"]
    train_rows, val_rows = split(examples, 0.1, seed=1)
    assert (len(train_rows), len(val_rows)) == (18, 2)
    assert split(examples[:9], 0.1, seed=1)[1] == []  # too few rows to hold any out


def test_report_finds_duplicates_leakage_imbalance_and_truncation(tmp_path, tokenizer):
    rows = [{"prompt": f"q{i % 15}", "completion": "yes" if i % 5 else "no"} for i in range(30)]
    check = check_file(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, max_length=8)
    r = check.report
    assert r.duplicates > 0 and r.leaked > 0 and r.truncated > 0
    assert r.top_answer_share > 0.5
    text = "\n".join(check.lines())
    for word in ("duplicate", "also appear in training", "imbalanced", "cut at max_length"):
        assert word in text
    assert "[[" in text  # the rendered example marks what is learned


def test_the_imbalance_warning_is_relative_to_the_number_of_answers(tmp_path, tokenizer):
    def warned(answers: list[str]) -> bool:
        rows = [{"prompt": f"question {i}", "completion": a} for i, a in enumerate(answers)]
        report = check_file(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, max_length=32).report
        return any("imbalanced" in w for w in report.warnings)

    assert not warned(["yes"] * 54 + ["no"] * 46)  # two answers, 54/46: near even
    assert warned(["yes"] * 80 + ["no"] * 20)  # 4x the other answer
    assert warned(["a"] * 40 + [f"label{i % 19}" for i in range(60)])  # 40% of 20 answers
    assert not warned(["Thanks!"] * 3 + [f"a free-text reply {i}" for i in range(97)])  # a repeated reply


def test_system_prompt_is_added(tmp_path, tokenizer):
    _, [example] = load_examples(
        write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}]),
        system_prompt="You extract JSON.",
    )
    assert example.messages[0] == {"role": "system", "content": "You extract JSON."}


# --- bad input: a clear message naming file, line and field, and nothing written ------------------
BAD_FILES = [
    ('{"text": "ok"}\n{"text": "broken"\n', "d.jsonl, line 2: not valid JSON"),
    ('{"instruction": "x"}\n', "d.jsonl, line 1: missing field 'output'"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "x"}\n', "d.jsonl, line 2: missing field 'completion'"),
    ('{"text": 5}\n', "d.jsonl, line 1, field 'text': expected a string, got int"),
    ('{"messages": "hi"}\n', "d.jsonl, line 1, field 'messages': expected a list of messages"),
    ('{"messages": [{"role": "bot", "content": "x"}]}\n', "line 1, field 'messages', item 0: expected"),
    ('{"messages": [{"role": "user", "content": "x"}]}\n', "has no assistant message"),
    ("", "d.jsonl is empty"),
    ('{"question": "x", "answer": "y"}\n', "cannot tell the format from the fields ['answer', 'question']"),
]


@pytest.mark.parametrize("content, message", BAD_FILES, ids=[m[:30] for _, m in BAD_FILES])
def test_bad_data_is_rejected_and_nothing_is_written(tmp_path, tiny_recipe, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    recipe = tiny_recipe.replace(train_file=str(path), output_dir=str(tmp_path / "run"))
    with pytest.raises(DataError) as err:
        train(recipe)
    assert message in str(err.value)
    assert not (tmp_path / "run").exists()


def test_every_example_too_long(tmp_path, tiny_recipe):
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT] * 12)
    recipe = tiny_recipe.replace(train_file=str(path), max_length=3, output_dir=str(tmp_path / "run"))
    with pytest.raises(DataError, match="every example is longer than max_length=3 tokens"):
        train(recipe)
    assert not (tmp_path / "run").exists()


def test_unsupported_or_missing_file(tmp_path, tokenizer):
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_examples(tmp_path / "d.txt")
    with pytest.raises(DataError, match="data file not found"):
        load_examples(tmp_path / "missing.jsonl")


def test_csv_with_extra_values(tmp_path):
    (tmp_path / "d.csv").write_text("prompt,completion\na,b,c\n")
    with pytest.raises(DataError, match="d.csv, line 2: more values than the header"):
        load_examples(tmp_path / "d.csv")


def test_prepare_uses_val_file(tmp_path, tokenizer):
    train_path = write_jsonl(tmp_path / "t.jsonl", [CHAT] * 12)
    val_path = write_jsonl(tmp_path / "v.jsonl", [CHAT] * 3)
    prepared = prepare(DataSettings(train_file=str(train_path), val_file=str(val_path)), tokenizer)
    assert (len(prepared.train), len(prepared.val)) == (12, 3)
    assert len(prepared.fingerprint) == 64


def load_examples_from_rows(rows):
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp())
    return load_examples(write_jsonl(folder / "d.jsonl", rows))
