"""The run folder and the run index: runs started anywhere are listed, found by name, and shown.

Jobs and `accelerate launch` runs are checked in test_jobs.py and test_distributed.py, on the runs
those files train anyway.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from adapter_helpers import index_run

from lora_studio import Recipe, runs
from lora_studio.cli import main
from lora_studio.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def listed(capsys: pytest.CaptureFixture, *command: str) -> list[dict]:
    assert main([*command, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_cli_run_from_another_folder_is_indexed_listed_and_found_by_name(
    tiny_model_dir, chat_file, tmp_path, studio_home, capsys, monkeypatch
):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    recipe = elsewhere / "tiny.yaml"
    recipe.write_text(
        f"model: {{base_model: {tiny_model_dir}}}\nlora: {{r: 4}}\n"
        f"data: {{train_file: {chat_file}, max_length: 64}}\n"
        "train: {max_steps: 2, per_device_train_batch_size: 4, eval_every_steps: 1, logging_steps: 1}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "lora_studio.cli", "train", "tiny.yaml"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (elsewhere / "runs").exists()  # the default folder is in the studio home, not here
    (folder,) = (studio_home / "runs").iterdir()
    assert folder.name.startswith("tiny-") and (folder / "adapter" / "lora_studio.json").is_file()

    monkeypatch.chdir(tmp_path)  # a UI or CLI started from yet another folder sees it too
    (run,) = listed(capsys, "runs", "list")
    status = json.loads((folder / "status.json").read_text())
    assert (run["name"], run["id"], run["state"], run["folder"]) == (
        "tiny",
        status["id"],
        "succeeded",
        str(folder),
    )
    assert (run["step"], run["base_model"], run["task"]) == (2, str(tiny_model_dir), "chat")
    assert run["best_val_loss"] == status["metrics"]["best_val_loss"] > 0
    assert folder.name == f"tiny-{run['id']}"
    assert [a["folder"] for a in listed(capsys, "adapters", "list")] == [str(folder)]
    assert main(["runs", "list"]) == 0
    table = capsys.readouterr().out
    assert "BEST VAL" in table and f"tiny                 {run['id']}" in table and str(folder) in table
    assert main(["runs", "show", "tiny"]) == 0
    assert "lora-studio chat tiny --compare" in capsys.readouterr().out

    # The name works where an adapter folder is taken; so does the id, and the run folder itself.
    adapter = folder / "adapter"
    assert (
        runs.adapter_folder("tiny")
        == runs.adapter_folder(run["id"])
        == runs.adapter_folder(str(folder))
        == adapter
    )
    assert main(["chat", "tiny", "--prompt", "Repeat: word1", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()
    # The Adapters tab lists it, though the UI runs in another folder than the training did.
    from ui.adapters_tab import refresh

    dropdown, table = refresh()
    assert dropdown.value == str(adapter) and table["adapter"][0].startswith(f"tiny ({run['id']}")
    # `train --resume` without output_dir continues the newest run of the recipe's name.
    assert runs.pin(Recipe.from_yaml(recipe), resume=True).output_dir == folder


def test_a_name_of_several_runs_is_an_error_listing_them_and_a_deleted_run_is_pruned(
    tiny_adapters, tmp_path, capsys
):
    import shutil

    folders = [tmp_path / f"run{i}" for i in range(3)]
    for i, folder in enumerate(folders):
        shutil.copytree(tiny_adapters["alpha"], folder / "adapter")
        index_run(folder, "same" if i < 2 else "other")
    ids = [json.loads((f / "status.json").read_text())["id"] for f in folders]
    with pytest.raises(ConfigError, match="'same' names 2 runs: ") as error:
        runs.adapter_folder("same")
    assert ids[0] in str(error.value) and ids[1] in str(error.value) and ids[2] not in str(error.value)
    assert runs.adapter_folder(ids[0]) == folders[0] / "adapter"  # the id picks one
    with pytest.raises(SystemExit, match="2"):  # argparse's usage error names the candidates too
        main(["chat", "same", "--prompt", "hi"])
    assert "error: argument adapter: 'same' names 2 runs" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="'nothing' is neither a folder nor a run name"):
        runs.adapter_folder("nothing")
    assert runs.adapter_folder("./not-there") == Path("./not-there")  # a path: the loader says what is wrong

    shutil.rmtree(folders[2])  # deleted by hand: skipped and its entry pruned, never an error
    assert [r.folder for r in runs.list_runs()] == [folders[1], folders[0]]
    assert not (runs.index_folder() / f"{ids[2]}.json").exists()
    assert sorted(r["folder"] for r in listed(capsys, "adapters", "list")) == sorted(map(str, folders[:2]))


def test_resume_trims_metrics_in_one_place_and_jobs_read_the_same_rows(tiny_recipe, studio_home):
    """The only resume trim is runs.start; a job's metrics are its run folder's rows, not a copy."""
    from lora_studio.jobs import JobStore

    store = JobStore()
    job_id = store.submit(tiny_recipe.replace(output_dir=""))
    job = store.get(job_id)
    assert job.run_dir == studio_home / "runs" / f"tiny-{job_id}"  # one folder scheme for CLI runs and jobs
    recipe = Recipe.from_dict(job.recipe)
    runs.start(recipe, {}, resume_step=None)
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 9)]
    for row in rows:
        runs.append_metrics(job.run_dir, row)
    with open(job.run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "lo')  # torn by a crash
    runs.start(recipe, {}, resume_step=4)  # a resumed attempt: steps 5.. are redone
    assert runs.metrics_rows(job.run_dir) == rows[:4] == store.metrics(job_id)
    status = runs.read_status(job.run_dir)
    assert (status["id"], status["state"], status["resumed"]) == (job_id, "running", True)
    assert store.get(job_id).step == 4 and [r.id for r in runs.list_runs()] == [job_id]


def test_a_running_status_of_a_dead_process_reads_interrupted(tiny_recipe, tmp_path):
    recipe = runs.pin(tiny_recipe)
    runs.start(recipe, {}, resume_step=None)
    assert runs.read_run(recipe.output_dir).state == "running"  # this process wrote it, alive
    gone = subprocess.Popen(["true"])
    gone.wait()
    runs.write_status(recipe.output_dir, "running", pid=gone.pid)
    assert runs.read_run(recipe.output_dir).state == "interrupted"


def test_every_process_of_a_launch_picks_the_same_default_folder(monkeypatch):
    """Under `accelerate launch` the ranks share no memory: the id comes from what they share."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    same = runs.new_id()
    monkeypatch.setenv("RANK", "1")
    assert runs.new_id() == same and runs.default_folder("x", same).name == f"x-{same}"
    monkeypatch.setenv("MASTER_PORT", "29501")  # another launch
    assert runs.new_id() != same
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert runs.new_id() != runs.new_id()  # one process: a fresh id each time
