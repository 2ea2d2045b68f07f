"""The `lora-studio` command as a user runs it: real processes, exit codes, one-line errors."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.subprocess  # every test runs the command as a real process

CLI = [sys.executable, "-m", "lora_studio.cli"]


def run(*args, cwd=None):
    return subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd, env=os.environ.copy()
    )


@pytest.fixture
def recipe_file(tiny_model_dir, chat_file, tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(
        f"model:\n  base_model: {tiny_model_dir}\nlora:\n  r: 4\ndata:\n  train_file: {chat_file}\n"
        "  max_length: 64\ntrain:\n  per_device_train_batch_size: 4\n"
    )
    return path


def test_train_with_plain_name_overrides(recipe_file, tmp_path):
    out = tmp_path / "run"
    proc = run(
        "train",
        recipe_file,
        "--set",
        "max_steps=2",
        "--set",
        f"output_dir={out}",
        "--set",
        "train.eval_every_steps=1",
        "--set",
        "logging_steps=1",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"adapter: {out / 'adapter'}" in proc.stdout
    assert (out / "adapter/adapter_model.safetensors").is_file()
    assert "max_steps: 2" in (out / "config.yaml").read_text()
    # the console (not a terminal here): plain progress lines and a summary, none of the Trainer's
    # raw dicts, bars or deprecation warnings
    assert "step 2/2  eta " in proc.stderr and "step 2/2  val loss " in proc.stderr
    assert f"try it:  lora-studio chat {out / 'adapter'} --compare" in proc.stdout
    assert "best val loss " in proc.stdout
    output = proc.stdout + proc.stderr
    assert "{'loss'" not in output and "\r" not in output and "Warning" not in output, output[-2000:]


def test_train_verbose_shows_the_trainers_own_output(recipe_file, tmp_path):
    out = tmp_path / "run"
    proc = run("-v", "train", recipe_file, "--set", "max_steps=1", "--set", f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "{'eval_loss'" in proc.stdout and "train_loss: " in proc.stdout  # as before the progress display


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "missing.yaml"], "error: recipe file not found: missing.yaml"),
        (
            ["train", "{recipe}", "--set", "max_step=3"],
            "unknown setting 'max_step'; did you mean 'max_steps'?",
        ),
        (
            ["train", "{recipe}", "--set", "train_file=nowhere.jsonl", "--set", "output_dir={tmp}/r"],
            "data file not found: {tmp}/nowhere.jsonl",  # where it looked: paths are pinned first
        ),
        (["data", "check", "{bad}"], "bad.jsonl, line 1: not valid JSON"),
    ],
)
def test_user_mistakes_are_one_line_errors(recipe_file, tmp_path, args, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{nope\n")
    args = [a.format(recipe=recipe_file, bad=bad, tmp=tmp_path) for a in args]
    proc = run(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert message.format(tmp=tmp_path) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()


def test_data_check_shows_format_counts_and_rendered_example(chat_file, tiny_model_dir):
    proc = run("data", "check", chat_file, "--base-model", tiny_model_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "format: messages" in proc.stdout and "rows: 36 train, 4 validation" in proc.stdout
    assert (
        "<|im_start|>user\nRepeat: word0<|im_end|>\n<|im_start|>assistant\n[[word0<|im_end|>\n]]"
        in proc.stdout
    )


def test_help_everywhere():
    for args in ([], ["train"], ["data", "check"], ["models"]):
        proc = run(*args, "--help")
        assert proc.returncode == 0 and "usage: lora-studio" in proc.stdout


def test_models_lists_the_builtin_default():
    proc = run("models")
    assert proc.returncode == 0 and "smollm2-135m-instruct" in proc.stdout


def test_data_check_fit_scores_the_base_on_the_answers(chat_file, tiny_model_dir):
    proc = run("data", "check", chat_file, "--base-model", tiny_model_dir, "--fit")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"fit of {tiny_model_dir} on 32 sampled rows: task mismatch" in proc.stdout
    assert "answer loss" in proc.stdout  # a random tiny model knows nothing of the task
