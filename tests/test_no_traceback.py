"""No traceback on any door: lone surrogates on the classify and chat doors, a damaged row in
jobs.sqlite, and an adapter whose weights hold NaN each end in one line (exit 2 in the CLI)."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from adapter_helpers import build_adapter
from classify_helpers import build_classifier_adapter
from safetensors.torch import load_file, save_file

from lora_studio import worker
from lora_studio.cli import main
from lora_studio.errors import ModelError
from lora_studio.jobs import JobStore

LONE = "\udc80"  # what a byte that is not UTF-8 becomes in argv (surrogateescape)


def one_line_error(capsys: pytest.CaptureFixture, *words: str) -> str:
    everything = capsys.readouterr().err
    err = everything.strip().splitlines()[-1]  # (progress bars of model loading may come before it)
    assert err.startswith("error: ") and "Traceback" not in everything, everything
    for word in words:
        assert word in err, err
    return err


def test_a_lone_surrogate_is_one_line_naming_the_row_on_every_door(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    classifier = build_classifier_adapter(tiny_model_dir, tmp_path / "classifier", ["a", "b"])
    texts = tmp_path / "texts.jsonl"
    rows = [{"text": f"fine {i}", "label": "ab"[i % 2]} for i in range(11)]
    texts.write_text(
        "".join(json.dumps(r) + "\n" for r in rows) + '{"text": "bad \\ud800 here", "label": "a"}\n'
    )

    assert main(["classify", str(classifier), "fine", f"bad {LONE}"]) == 2
    one_line_error(capsys, "text 2", "unpaired surrogate")
    assert main(["classify", str(classifier), "--file", str(texts), "--out", str(tmp_path / "p.csv")]) == 2
    one_line_error(capsys, "texts.jsonl, line 12", "unpaired surrogate")

    recipe = tmp_path / "classify.yaml"
    recipe.write_text(
        json.dumps(
            {
                "name": "c",
                "task": "classify",
                "model": {"base_model": str(tiny_model_dir)},
                "data": {"train_file": str(texts), "max_length": 32},
                "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1},
            }
        )
    )
    assert main(["train", str(recipe)]) == 2
    one_line_error(capsys, "texts.jsonl, line 12", "unpaired surrogate")

    adapter = build_adapter(tiny_model_dir, tmp_path / "chat", seed=1)
    assert main(["chat", str(adapter), "--prompt", f"hi {LONE}", "--max-new-tokens", "2"]) == 2
    one_line_error(capsys, "messages[0].content", "unpaired surrogate")


def test_an_adapter_with_nan_weights_is_refused_on_load(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from lora_studio.inference import InferenceEngine

    adapter = build_adapter(tiny_model_dir, tmp_path / "nan", seed=1)
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, weights)
    with pytest.raises(ModelError, match="NaN or infinite") as caught:
        InferenceEngine.from_adapters([adapter])
    assert "\n" not in str(caught.value)
    assert main(["chat", str(adapter), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    one_line_error(capsys, "NaN or infinite", name)
    tensors[name][0, 0] = float("inf")
    save_file(tensors, weights)
    with pytest.raises(ModelError, match="NaN or infinite"):
        InferenceEngine.from_adapters([adapter])
    tensors[name][0, 0] = 0.0
    save_file(tensors, weights)
    assert InferenceEngine.from_adapters([adapter]).adapter_names  # the control: a finite adapter loads


@pytest.fixture
def damaged_store(tiny_model_dir: Path, chat_file: Path) -> tuple[JobStore, list[str]]:
    """Three queued jobs; the first's recipe is not JSON and the second's is not an object."""
    from test_jobs import make_recipe

    store = JobStore()
    ids = [store.submit(make_recipe(tiny_model_dir, chat_file, name=f"job{i}")) for i in range(3)]
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE jobs SET recipe = '{not json' WHERE id = ?", (ids[0],))
        db.execute("UPDATE jobs SET recipe = '5' WHERE id = ?", (ids[1],))
    return store, ids


def test_a_damaged_job_row_is_listed_as_damaged_beside_the_others(
    damaged_store: tuple[JobStore, list[str]], capsys: pytest.CaptureFixture
) -> None:
    store, ids = damaged_store
    assert main(["jobs", "list"]) == 0
    out = capsys.readouterr().out
    lines = {i: next(line for line in out.splitlines() if line.startswith(i)) for i in ids}
    assert "damaged" in lines[ids[0]] and "damaged" in lines[ids[1]] and "queued" in lines[ids[2]]
    assert main(["jobs", "show", ids[0]]) == 0
    assert "damaged (JSONDecodeError" in capsys.readouterr().out
    assert main(["jobs", "list", "--json"]) == 0
    assert [j["damaged"] is None for j in json.loads(capsys.readouterr().out)] == [True, False, False]
    assert main(["jobs", "resume", ids[1], "--no-worker"]) == 2
    one_line_error(capsys, "damaged", "submit its recipe again")


def test_the_worker_fails_a_damaged_job_with_the_reason_and_goes_on(
    damaged_store: tuple[JobStore, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, ids = damaged_store
    started: list[str] = []

    def spawn(store: JobStore, job, stdout) -> subprocess.Popen:  # no training here: a process that ends
        started.append(job.id)
        return subprocess.Popen([sys.executable, "-c", "pass"])

    monkeypatch.setattr(worker, "_spawn", spawn)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = worker.run_worker(store, poll_seconds=0.05, idle_exit_seconds=0.5, prestart=False)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert code == 0
    jobs = {j.id: j for j in store.list()}
    for damaged in ids[:2]:
        assert jobs[damaged].state == "failed" and "damaged" in jobs[damaged].error
    assert started == [ids[2]]  # the sound job after them was started
