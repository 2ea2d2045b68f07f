"""Remote code is a fact of one job: the operator's flag at submit, never inherited by later jobs.

A first job is submitted with the operator's flag; the worker it starts then runs later jobs
submitted without it (from the CLI and the UI) on a base whose `auto_map` module writes a sentinel
file when imported. Those jobs must train on the built-in class and the sentinel must never
appear. The first job's own base has such a module too, and it does run: the control that shows
the sentinel would catch it. The UI records its operator's word on each job it submits.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from test_jobs import make_recipe, wait_for
from test_remote_code import EVIL_MODULE
from test_ui import form

from lora_studio.cli import main
from lora_studio.jobs import JobStore
from lora_studio.remote_code import REMOTE_CODE_ENV, REMOTE_CODE_FLAG, remote_code_allowed, take_operator_word


def _evil_base(tiny_model_dir: Path, folder: Path, sentinel: Path) -> Path:
    base = shutil.copytree(tiny_model_dir, folder)
    (base / "evil.py").write_text(EVIL_MODULE.format(sentinel=str(sentinel)))
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (base / "config.json").write_text(json.dumps(config))
    return base


def _recipe_file(tmp_path: Path, name: str, base: Path, data: Path, **model: object) -> Path:
    recipe = make_recipe(base, data, name=name, max_steps=2, eval_every_steps=2)
    recipe["model"].update(model)
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(recipe))
    return path


def test_a_recipe_asking_for_remote_code_is_refused_at_submit(
    tiny_model_dir: Path, chat_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe = _recipe_file(tmp_path, "asks", tiny_model_dir, chat_file, trust_remote_code=True)
    assert main(["jobs", "submit", str(recipe), "--no-worker"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the recipe asks") and REMOTE_CODE_FLAG in err and "\n" not in err
    assert JobStore().list() == []
    assert main(["jobs", "submit", str(recipe), "--no-worker", REMOTE_CODE_FLAG]) == 0
    (job,) = JobStore().list()
    assert job.trust_remote_code
    take_operator_word(False)


def test_the_ui_records_its_operators_word_on_each_job(
    tiny_model_dir: Path, chat_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ui.train_tab import start_training

    monkeypatch.setattr(JobStore, "ensure_worker", lambda self, *a, **k: None)  # queue only
    take_operator_word(True)  # a UI started with --trust-remote-code
    allowed, command = start_training(*form(chat_file, tiny_model_dir, name="with"))
    assert REMOTE_CODE_FLAG in command  # the reproduce command carries it too
    take_operator_word(False)  # a UI started without it
    refused, _ = start_training(*form(chat_file, tiny_model_dir, name="without"))
    assert JobStore().get(allowed).trust_remote_code and not JobStore().get(refused).trust_remote_code


@pytest.mark.subprocess
def test_a_jobs_permission_never_passes_to_later_jobs(
    tiny_model_dir: Path, chat_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ui.train_tab import start_training

    sentinel, control = tmp_path / "evil-ran", tmp_path / "control-ran"
    evil = _evil_base(tiny_model_dir, tmp_path / "evil-base", sentinel)
    trusted = _evil_base(tiny_model_dir, tmp_path / "trusted-base", control)
    store = JobStore()
    monkeypatch.setenv(REMOTE_CODE_ENV, "1")  # the operator's shell: counts for `jobs submit` alone
    try:
        # The first job, with the operator's word, starts the worker; its base's module may run:
        # the control that shows the sentinel would catch a run.
        first = _recipe_file(tmp_path, "trusted", trusted, chat_file)
        assert main(["jobs", "submit", str(first), REMOTE_CODE_FLAG]) == 0
        assert os.environ.get(REMOTE_CODE_ENV) is None  # taken out: nothing this process starts inherits it
        # Later jobs without it, from the CLI and from a UI, on a base whose module writes a sentinel.
        plain = _recipe_file(tmp_path, "on-evil", evil, chat_file)
        assert main(["jobs", "submit", str(plain)]) == 0
        take_operator_word(False)
        start_training(*form(chat_file, evil, name="ui-on-evil", max_steps=2))
        wait_for(lambda: all(j.finished for j in store.list()) and len(store.list()) == 3, 240, "3 jobs")
        jobs = {j.name: j for j in store.list()}
        assert {name for name, j in jobs.items() if j.trust_remote_code} == {"trusted"}
        for name in ("on-evil", "ui-on-evil"):
            assert jobs[name].state == "succeeded", (name, jobs[name].error)  # on the built-in class
        assert not sentinel.exists()
        assert control.read_text() == "remote code ran"
    finally:
        take_operator_word(False)
        pid = store.worker_pid()
        if pid:
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda: store.worker_pid() is None, 60, "the worker to stop")
    assert not remote_code_allowed()
