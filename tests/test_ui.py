"""The web UI's handlers and safety rules, called in-process (no server, no browser).

The end-to-end flows through a real server are in test_ui_e2e.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pytest

from lora_studio.errors import ConfigError, DataError, ModelError
from lora_studio.jobs import JobStore
from ui import uploads
from ui.common import shows_errors
from ui.data_tab import check_dataset, received_file, upload_dataset
from ui.train_tab import cancel_job, recipe_from_form, resume_job, start_training, watch_job


def form(dataset: Path | str, base: Path | str, **changes):
    """The Train form's values in order, tiny settings by default."""
    values = {
        "name": "t",
        "base_model": str(base),
        "dataset": str(dataset),
        "r": 4,
        "layers": None,
        "quantization": "none",
        "epochs": 1.0,
        "learning_rate": 5e-3,
        "max_length": 64,
        "max_steps": 4,
        "batch_size": 4,
        "eval_every": 2,
        "log_every": 1,
    }
    values.update(changes)
    return list(values.values())


# --- building ------------------------------------------------------------------------------------
def test_build_app_has_no_side_effects(studio_home: Path):
    from ui.app import build_app

    app = build_app()
    assert isinstance(app, gr.Blocks)
    assert not (studio_home / "jobs.sqlite").exists()  # no job store opened, no worker started
    assert not (studio_home / "uploads").exists()
    assert not (studio_home / "models").exists()  # no model converted or loaded
    names = {d.api_name for d in app.fns.values() if d.api_name}
    assert {
        "upload_dataset",
        "check_dataset",
        "start_training",
        "watch_job",
        "cancel_job",
        "chat",
        "describe_adapter",
        "download_adapter",
        "download_merged",
    } <= names


# --- uploads -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "given, expected",
    [
        ("train.jsonl", "train.jsonl"),
        ("My Data (v2).JSONL", "My_Data_v2_.jsonl"),
        ("..hidden.csv", "hidden.csv"),
        ("ümlaut.json", "mlaut.json"),
        ("noext", "noext"),
    ],
)
def test_safe_name_keeps_a_plain_name(given: str, expected: str):
    assert uploads.safe_name(given) == expected


@pytest.mark.parametrize(
    "name", ["../../etc/evil.jsonl", "..\\..\\evil.jsonl", "/abs/evil.jsonl", "..", "a\x00.jsonl"]
)
def test_store_upload_refuses_names_with_folder_parts(tmp_path: Path, studio_home: Path, name: str):
    src = tmp_path / "x.jsonl"
    src.write_text('{"text": "hi"}\n')
    with pytest.raises(DataError, match="folder parts"):
        uploads.store_upload(src, name)
    assert list((studio_home / "uploads").glob("*")) == []  # nothing stored, in uploads or anywhere else


def test_store_upload_keeps_the_file_under_uploads_with_a_content_hash(tmp_path: Path, studio_home: Path):
    src = tmp_path / "upload.bin"
    src.write_text('{"text": "hi"}\n')
    stored = uploads.store_upload(src, "My notes.jsonl")
    assert stored.parent == studio_home / "uploads"
    assert stored.name.startswith("My_notes-") and stored.suffix == ".jsonl"
    assert stored.read_text() == src.read_text()
    assert uploads.store_upload(src, "My notes.jsonl") == stored  # same bytes: same file, no copy
    src.write_text('{"text": "changed"}\n')
    assert uploads.store_upload(src, "My notes.jsonl") != stored  # new bytes never overwrite the old


def test_store_upload_refuses_wrong_type_oversized_and_empty(tmp_path: Path):
    src = tmp_path / "f"
    src.write_text("x" * 2000)
    with pytest.raises(DataError, match=r"not a data file.*'\.txt'.*\.jsonl"):
        uploads.store_upload(src, "notes.txt")
    with pytest.raises(DataError, match="over the upload limit of 0 MB"):
        uploads.store_upload(src, "big.jsonl", max_bytes=1000)
    src.write_text("")
    with pytest.raises(DataError, match="empty"):
        uploads.store_upload(src, "empty.jsonl")


def test_upload_handler_only_reads_files_gradio_received(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    outside = tmp_path / "secret.jsonl"
    outside.write_text('{"text": "secret"}\n')
    with pytest.raises(DataError, match="did not arrive"):
        received_file({"path": str(outside), "orig_name": "secret.jsonl"})
    inside = tmp_path / "gradio" / "abc" / "data.jsonl"
    inside.parent.mkdir(parents=True)
    inside.write_text('{"text": "hi"}\n')
    stored = upload_dataset({"path": str(inside), "orig_name": "data.jsonl"}, max_bytes=10_000)
    assert Path(stored).read_text() == inside.read_text()
    with pytest.raises(DataError, match="folder parts"):
        upload_dataset({"path": str(inside), "orig_name": "../data.jsonl"}, max_bytes=10_000)


# --- Data tab --------------------------------------------------------------------------------------
def test_check_dataset_shows_format_rows_and_rendered_examples(chat_file: Path, tiny_model_dir: Path):
    summary, samples = check_dataset(str(chat_file), str(tiny_model_dir), "auto", 64)
    assert (
        "format **messages**" in summary
        and "**36** training rows" in summary
        and "**4** validation" in summary
    )
    assert samples.count('class="ls-sample"') == 3
    assert '<mark class="ls-learn">word0&lt;|im_end|&gt;' in samples  # the answer is what it learns; escaped


def test_check_dataset_names_the_bad_line(tmp_path: Path, tiny_model_dir: Path):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "a", "completion": "b"})
    bad.write_text(f"{good}\n{good}\n{{not json\n")
    summary, samples = check_dataset(str(bad), str(tiny_model_dir), "auto", 64)
    assert summary.startswith("**Problem:**") and "bad.jsonl, line 3: not valid JSON" in summary
    assert samples == ""


# --- errors ----------------------------------------------------------------------------------------
def test_errors_reach_the_page_as_messages_not_tracebacks():
    def user_mistake():
        raise ModelError("model folder not found: <nowhere>")

    def bug():
        raise KeyError("oops")

    with pytest.raises(gr.Error) as caught:
        shows_errors(user_mistake)()
    assert caught.value.message == "model folder not found: &lt;nowhere&gt;"
    with pytest.raises(gr.Error) as caught:
        shows_errors(bug)()
    assert caught.value.message.startswith("Unexpected KeyError: &#x27;oops&#x27;")
    assert "Traceback" not in caught.value.message


# --- Train tab -------------------------------------------------------------------------------------
def test_form_becomes_a_recipe(chat_file: Path, tiny_model_dir: Path):
    recipe = recipe_from_form(*form(chat_file, tiny_model_dir, r=8, layers=1, quantization="4bit"))
    assert (recipe.lora.r, recipe.lora.lora_alpha, recipe.lora.layers) == (8, 16, 1)
    assert recipe.model.quantization == "4bit" and recipe.train.max_steps == 4
    assert recipe_from_form(*form(chat_file, tiny_model_dir, layers=0, max_steps=None)).lora.layers is None


def test_the_forms_defaults_are_the_default_recipes_and_take_the_fast_path(
    chat_file: Path, tiny_model_dir: Path
):
    from lora_studio.config import DEFAULT_RECIPE, Recipe
    from ui.train_tab import DEFAULT

    shipped = Recipe.from_yaml(DEFAULT_RECIPE)
    assert DEFAULT == shipped and shipped.lora.layers == 16  # SmolLM2 has 30: 14 blocks are cached
    recipe = recipe_from_form(*form(chat_file, tiny_model_dir, layers=shipped.lora.layers))
    picked = (recipe.lora.lora_dropout, recipe.data.val_fraction, recipe.train.lr_scheduler_type)
    assert picked == (shipped.lora.lora_dropout, shipped.data.val_fraction, shipped.train.lr_scheduler_type)
    assert recipe.train.speedups == "auto"


def test_form_problems_are_reported_together(chat_file: Path, tiny_model_dir: Path):
    with pytest.raises(ConfigError) as caught:
        recipe_from_form(*form("", tiny_model_dir, learning_rate=0, max_length=float("nan"), epochs=None))
    message = str(caught.value)
    assert (
        "the training form has 4 problem(s)" in message and "num_train_epochs: expected a number" in message
    )
    assert "train_file: required" in message and "learning_rate" in message and "max_length" in message


def test_start_training_queues_a_job_and_shows_the_cli_command(
    chat_file: Path, tiny_model_dir: Path, studio_home: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(JobStore, "ensure_worker", lambda self, *a, **k: None)  # queue only: no training here
    job_id, command = start_training(*form(chat_file, tiny_model_dir, name="../../../escape"))
    job = JobStore().get(job_id)
    assert job.state == "queued" and job.recipe["lora"]["r"] == 4
    recipe_file = Path(command.splitlines()[1].removeprefix("lora-studio train "))
    assert recipe_file.is_file() and f"lora-studio jobs submit {recipe_file}" in command
    assert recipe_file.parent == studio_home / "recipes"  # the typed run name cannot move it elsewhere
    from lora_studio.config import Recipe

    again = Recipe.from_yaml(recipe_file)  # the command's recipe is the job's, bar the run folder
    assert again.to_dict()["lora"] == job.recipe["lora"] and again.data.train_file == str(chat_file)
    progress, plot, table = watch_job(job.id)
    assert 'data-state="queued"' in progress and "position 1" in progress
    assert plot is None and list(table["job"]) == [job.id]  # no loss points yet


def test_cancel_and_resume_buttons_change_the_job(
    chat_file: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(JobStore, "ensure_worker", lambda self, *a, **k: None)
    job_id, _ = start_training(*form(chat_file, tiny_model_dir))
    assert f"Job {job_id} is cancelled" in cancel_job(job_id)  # queued: cancelled at once
    assert JobStore().get(job_id).state == "cancelled"
    with pytest.raises(gr.Error, match="already ended as cancelled"):
        shows_errors(cancel_job)(job_id)
    assert "queued again" in resume_job(job_id)
    assert JobStore().get(job_id).state == "queued"
    with pytest.raises(gr.Error, match="Pick a job"):
        cancel_job(None)


def test_start_training_refuses_a_missing_dataset(tiny_model_dir: Path, tmp_path: Path):
    with pytest.raises(gr.Error) as caught:
        shows_errors(start_training)(*form(tmp_path / "nope.jsonl", tiny_model_dir))
    assert "data file not found" in caught.value.message
    assert JobStore().list() == []


# --- CLI -------------------------------------------------------------------------------------------
def test_cli_ui_checks_its_arguments():
    from lora_studio.cli import main
    from lora_studio.cli.ui import parse_auth

    assert parse_auth("ann:s3cret:x") == ("ann", "s3cret:x")
    assert main(["ui", "--auth", "nopassword"]) == 2
    assert main(["ui", "--port", "70000"]) == 2
