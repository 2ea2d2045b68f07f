"""Bad input of every kind gets one line naming file, line and field: never a traceback, nothing written.

Each class is tried where a person meets it: the library (`load_examples`, `train`), the CLI
(`data check`, `train`: exit code 2) and the UI's handlers (a readable message, no job). Rows
are cut before tokenising, so one huge line costs little memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gradio as gr
import pytest

from lora_studio import DataError, train
from lora_studio.cli import main
from lora_studio.data import check_file, encode, load_examples
from lora_studio.data_files import MAX_DEPTH
from lora_studio.jobs import JobStore
from lora_studio.models import load_tokenizer

PAIR = '{"prompt": "a", "completion": "b"}\n'
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# (file name, content as bytes, the message it must give)
BAD_FILES = [
    ("d.jsonl", PAIR.encode() + b'{"prompt": "caf\xe9", "completion": "b"}\n', "d.jsonl, line 2, column 16: byte 0xe9 is not UTF-8 text; re-save the file as UTF-8"),
    ("d.json", b'[{"prompt": "a", "completion": "b"},\n {"prompt": "\xff"}]', "d.json, line 2, column 14: byte 0xff is not UTF-8 text; re-save"),
    ("d.csv", b"prompt,completion\na,b\ncaf\xe9,b\n", "d.csv, line 3, column 4: byte 0xe9 is not UTF-8 text; re-save"),
    ("d.csv", f"prompt,completion\na,b\nx,{'y' * 200_000}\n".encode(), "d.csv, line 3, field 'completion': a cell is longer than 131072 characters"),
    ("d.csv", f'prompt,completion\na,"b\nb"\nx,"{"y" * 140_000}"\n'.encode(), "d.csv, line 4, field 'completion': a cell is longer"),
    ("d.jsonl", f'{{"prompt": "a", "completion": "b", "extra": {nested(MAX_DEPTH + 5)}}}\n'.encode(), f"d.jsonl, line 1, field 'extra': nested deeper than {MAX_DEPTH} levels"),
    ("d.jsonl", f'{{"prompt": "a", "completion": {nested(100_000)}}}\n'.encode(), "d.jsonl, line 1: JSON nested deeper than"),
    ("d.jsonl", f'{{"prompt": "a", "completion": "b", "id": {"9" * 5000}}}\n'.encode(), "d.jsonl, line 1, field 'id': a number with 5000 digits; numbers may have at most 4300"),
    ("d.json", f'[{{"prompt": "a", "completion": -{"1" * 5000}}}]'.encode(), "d.json, row 1, field 'completion': a number with 5000 digits"),
    ("d.jsonl", b'{"prompt": "a \\ud800 b", "completion": "b"}\n', "d.jsonl, line 1, field 'prompt': holds an unpaired surrogate (\\ud800) at character 3"),
    ("d.jsonl", b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\\udfff"}]}\n', "line 1, field 'messages', item 1, 'content': holds an unpaired surrogate"),
    ("d.jsonl", b'{"text": "nul \\u0000 here"}\n', "d.jsonl, line 1, field 'text': holds a NUL character (\\x00) at character 5"),
    ("d.csv", b"prompt,completion\na\x00,b\n", "d.csv, line 2, field 'prompt': holds a NUL character"),
    ("d.csv", f'messages\n"{nested(60)}"\n'.encode(), f"d.csv, line 2, field 'messages': nested deeper than {MAX_DEPTH} levels"),
]  # fmt: skip
IDS = [f"{name}: {message.split(': ', 1)[1][:40]}" for name, _, message in BAD_FILES]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def write(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


# --- the library ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name, content, message", BAD_FILES, ids=IDS)
def test_bad_files_name_the_line_and_field_and_write_nothing(tmp_path, tiny_recipe, name, content, message):
    path = write(tmp_path, name, content)
    with pytest.raises(DataError) as caught:
        load_examples(path)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(DataError, match="line|row"):
        train(tiny_recipe.replace(train_file=str(path), output_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.csv"])
def test_a_utf8_byte_order_mark_is_accepted(tmp_path, name):
    rows = [{"prompt": "café", "completion": "b"}] * 2
    text = {
        "d.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
        "d.json": json.dumps(rows, ensure_ascii=False),
        "d.csv": "prompt,completion\ncafé,b\ncafé,b\n",
    }[name]
    fmt, examples = load_examples(write(tmp_path, name, "\ufeff".encode() + text.encode()))
    assert fmt == "prompt_completion" and examples[1].messages[0]["content"] == "café"


def test_error_messages_never_quote_cell_values(tmp_path):
    secret = "s3cret-token-123"
    cases = [
        {"text": {"x": secret}},
        {"text": [secret]},
        {"messages": [{"role": secret, "content": "x"}]},
        {"messages": [{"role": [secret], "content": "x"}]},
        {"messages": [{"role": {"k": secret}, "content": "x"}]},
        {"messages": [{"role": "user", "content": {"k": secret}}]},
        {"messages": [secret]},
    ]
    for row in cases:
        with pytest.raises(DataError) as caught:
            load_examples(write(tmp_path, "d.jsonl", (json.dumps(row) + "\n").encode()))
        assert secret not in str(caught.value), row


def test_an_unknown_format_lists_the_valid_ones(tmp_path):
    with pytest.raises(DataError, match="unknown data format 'bogus'; use one of: auto, messages, alpaca"):
        load_examples(write(tmp_path, "d.jsonl", PAIR.encode()), fmt="bogus")


# --- rows are cut before tokenising ------------------------------------------------------------------
def test_a_long_row_is_cut_before_tokenising_without_changing_its_tokens(tokenizer):
    words = " ".join(f"word{i % 10}" for i in range(50_000))  # ~300k characters
    [example] = examples_of([{"text": words}])
    row = encode(example, tokenizer, max_length=64)
    full = tokenizer(words + tokenizer.eos_token)["input_ids"]
    assert row["input_ids"] == full[:64] and row["labels"] == full[:64]
    assert row["cut"] and row["truncated"] and 64 < row["length"] < len(full)
    chat = examples_of([{"prompt": words, "completion": "yes"}])[0]
    row = encode(chat, tokenizer, max_length=64)
    rendered = tokenizer.apply_chat_template(list(chat.messages), tokenize=False)
    assert row["input_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"][:64]


def test_endless_turns_are_cut_too(tokenizer):
    turns = [{"role": r, "content": "x"} for _ in range(20_000) for r in ("user", "assistant")]
    [example] = examples_of([{"messages": turns}])
    row = encode(example, tokenizer, max_length=32)  # would render 20,000 prefixes without the cut
    assert row["cut"] and row["truncated"] and len(row["input_ids"]) == 32


def test_the_report_says_when_a_row_was_counted_only_up_to_its_cut(tmp_path, tokenizer):
    rows = [{"prompt": "p " * 5000, "completion": "c"}, {"prompt": "q", "completion": "c"}]
    path = write(tmp_path, "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    check = check_file(path, tokenizer, max_length=16)
    assert check.report.cut == 1 and "1 row(s) over 272 characters counted only that far" in "\n".join(
        check.lines()
    )


@pytest.mark.subprocess
def test_data_check_of_one_60_mb_line_stays_small(tmp_path, tiny_model_dir):
    """Tokenising the whole line took 8.7 GiB; cut first, the check peaks near 0.5 GiB (bound: 1.5 GiB)."""
    big = tmp_path / "big.jsonl"
    with open(big, "w") as f:
        f.write(PAIR)
        f.write(json.dumps({"prompt": "hello world " * (5 * 2**20), "completion": "b"}) + "\n")
    # A fresh parent, so RUSAGE_CHILDREN holds this one check and no earlier test's child.
    measure = (
        "import resource, subprocess, sys\n"
        "proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "print(proc.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "print(proc.stdout, proc.stderr)\n"
    )
    command = [
        sys.executable,
        "-m",
        "lora_studio.cli",
        "data",
        "check",
        str(big),
        "--base-model",
        str(tiny_model_dir),
    ]
    out = subprocess.run(
        [sys.executable, "-c", measure, *command], capture_output=True, text=True, timeout=300
    )
    code, peak_kb = map(int, out.stdout.split("\n", 1)[0].split())
    assert code == 0, out.stdout[-2000:]
    assert "truncated at max_length=512: 1" in out.stdout
    print(f"data check of a 60 MB line: peak RSS {peak_kb / 2**20:.2f} GiB")
    assert peak_kb < 1.5 * 2**20


# --- the CLI: exit code 2, one line, no traceback -----------------------------------------------------
@pytest.mark.parametrize("name, content, message", BAD_FILES[::3], ids=IDS[::3])
def test_data_check_exits_2_with_one_line(tmp_path, tiny_model_dir, capsys, name, content, message):
    path = write(tmp_path, name, content)
    assert main(["data", "check", str(path), "--base-model", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "bogus"], "unknown data format 'bogus'; use one of: auto, messages, alpaca, prompt_completion, text"),
        (["--max-length", "0"], "max_length: must be at least 1 and at most 131072 tokens, got 0"),
        (["--max-length", "-5"], "got -5"),
    ],
)  # fmt: skip
def test_data_check_refuses_bad_options_before_loading_a_model(tmp_path, capsys, args, message):
    path = write(tmp_path, "d.jsonl", PAIR.encode())
    assert main(["data", "check", str(path), "--base-model", str(tmp_path / "no-model"), *args]) == 2
    assert message in capsys.readouterr().err


def test_train_with_bad_data_exits_2_and_writes_no_run_folder(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # (run folders were once ./runs/<name>: none may appear here either)
    data = write(tmp_path, "d.jsonl", b'{"text": "caf\xe9"}\n')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  base_model: {tiny_model_dir}\ndata:\n  train_file: {data}\n")
    assert main(["train", str(recipe), "--set", f"output_dir={tmp_path / 'run'}"]) == 2
    assert "d.jsonl, line 1, column 14: byte 0xe9 is not UTF-8" in capsys.readouterr().err
    assert main(["train", str(recipe), "--set", "max_length=0", "--set", "learning_rate=.nan"]) == 2
    err = capsys.readouterr().err
    assert (
        "max_length: must be at least 1" in err and "learning_rate: must be a finite number, got nan" in err
    )
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


@pytest.mark.subprocess
def test_the_real_command_prints_no_traceback(tmp_path, tiny_model_dir):
    path = write(tmp_path, "d.csv", b"prompt,completion\ncaf\xe9,b\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_studio.cli",
            "data",
            "check",
            str(path),
            "--base-model",
            str(tiny_model_dir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "error: d.csv, line 2, column 4: byte 0xe9 is not UTF-8 text; " + (
        "re-save the file as UTF-8 (e.g. 'Save as' > 'UTF-8' in a spreadsheet or text editor)"
    )


# --- the UI's handlers: a readable message, no job -----------------------------------------------------
@pytest.mark.parametrize("name, content, message", BAD_FILES[1::3], ids=IDS[1::3])
def test_ui_shows_bad_files_as_problems(tmp_path, tiny_model_dir, monkeypatch, name, content, message):
    from ui.common import shows_errors
    from ui.data_tab import check_dataset
    from ui.train_tab import start_training

    path = write(tmp_path, name, content)
    summary, samples = check_dataset(str(path), str(tiny_model_dir), "auto", 64)
    assert summary.startswith("**Problem:**") and samples == ""
    monkeypatch.setattr(JobStore, "ensure_worker", lambda self, *a, **k: None)
    with pytest.raises(gr.Error) as caught:
        shows_errors(start_training)(*ui_form(path, tiny_model_dir))
    assert not caught.value.message.startswith("Unexpected") and "Traceback" not in caught.value.message
    assert JobStore().list() == []


def test_ui_data_check_refuses_out_of_range_max_length(tmp_path, tiny_model_dir):
    from ui.data_tab import check_dataset

    path = write(tmp_path, "d.jsonl", PAIR.encode())
    for value, expected in [
        (0, "got 0"),
        (10**9, "at most 131072"),
        (float("nan"), "got nan"),
        (None, "got None"),
    ]:
        summary, _ = check_dataset(str(path), str(tiny_model_dir), "auto", value)
        assert summary.startswith("**Problem:** max\\_length") and expected in summary


def examples_of(rows: list[dict]) -> list:
    import tempfile

    folder = Path(tempfile.mkdtemp())
    return load_examples(write(folder, "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode()))[1]


def ui_form(dataset: Path, base: Path) -> list:
    return ["t", str(base), str(dataset), 4, None, "none", 1.0, 5e-3, 64, 4, 4, 2, 1]


def test_unreadable_or_special_files_are_refused(tmp_path):
    import os

    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)  # reading it would wait forever
    with pytest.raises(DataError, match="pipe.jsonl is not a regular file"):
        load_examples(fifo)
    if os.geteuid() != 0:  # root reads any file
        locked = write(tmp_path, "locked.jsonl", PAIR.encode())
        locked.chmod(0)
        with pytest.raises(DataError, match="locked.jsonl: cannot be read \\(Permission denied\\)"):
            load_examples(locked)


def test_a_chat_template_that_refuses_a_conversation_names_the_row(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)  # a fresh one: its template is changed
    tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    [example] = examples_of([{"messages": [{"role": "system", "content": "s"}, *CHAT["messages"]]}])
    with pytest.raises(
        DataError, match="d.jsonl, line 1: the model's chat template refuses this conversation"
    ):
        encode(example, tokenizer, max_length=64)
