"""The keystone: the real training path end to end on the tiny model."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lora_studio import Recipe, train


def test_train_writes_a_complete_run_folder(tiny_recipe):
    result = train(tiny_recipe)
    run = result.run_dir
    assert sorted(p.name for p in run.iterdir()) == [
        "adapter",
        "checkpoints",
        "config.yaml",
        "data_report.json",
        "metrics.jsonl",
        "status.json",
        "train.log",
    ]
    assert {p.name for p in result.adapter_dir.iterdir()} >= {
        "adapter_model.safetensors",
        "adapter_config.json",
        "lora_studio.json",
        "tokenizer.json",
    }
    losses = [
        r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]
    assert len(losses) == 6 and all(map(lambda x: x == x, losses))  # finite (not NaN)
    assert losses[-1] < losses[0]
    meta = json.loads((result.adapter_dir / "lora_studio.json").read_text())
    assert meta["base_model"] == str(Path(tiny_recipe.model.base_model))
    assert len(meta["base_model_hash"]) == 64
    assert meta["recipe"]["train"]["max_steps"] == 6
    assert json.loads((run / "status.json").read_text())["state"] == "succeeded"
    again = Recipe.from_yaml(run / "config.yaml")  # the run folder alone is enough to repeat the run
    assert again.output_dir == run.resolve() and again.replace(output_dir="") == tiny_recipe.replace(
        output_dir=""
    )


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_top_layers_only(tiny_recipe):
    result = train(tiny_recipe.replace(layers=1, max_steps=2))
    from safetensors.torch import load_file

    names = list(load_file(result.adapter_dir / "adapter_model.safetensors"))
    assert names and all(".layers.1." in n for n in names)  # the lower block stays frozen, as it was


def test_early_stopping_keeps_the_best_adapter(tiny_model_dir, tmp_path):
    """Training data pulls away from the validation data: validation loss rises and training stops."""
    from lora_studio import Recipe

    def rows(answer):
        return "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"Repeat: word{i % 10}"},
                        {"role": "assistant", "content": answer(i)},
                    ]
                }
            )
            + "\n"
            for i in range(40)
        )

    (tmp_path / "t.jsonl").write_text(rows(lambda i: "word0 word0 word0"))
    (tmp_path / "v.jsonl").write_text(rows(lambda i: f"word{i % 10} word{i % 10} word{i % 10}"))
    recipe = Recipe.from_dict(
        {
            "model": {"base_model": str(tiny_model_dir)},
            "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
            "data": {
                "train_file": str(tmp_path / "t.jsonl"),
                "val_file": str(tmp_path / "v.jsonl"),
                "max_length": 64,
            },
            "train": {
                "output_dir": str(tmp_path / "run"),
                "max_steps": 60,
                "per_device_train_batch_size": 4,
                "eval_every_steps": 2,
                "logging_steps": 2,
                "learning_rate": 0.02,
                "early_stopping_patience": 2,
                "lr_scheduler_type": "constant",
            },
        }
    )
    result = train(recipe)
    val = [(m["step"], m["val_loss"]) for m in read_metrics(result.run_dir) if "val_loss" in m]
    best_step, best = min(val[:-1], key=lambda item: item[1])  # the last line re-evaluates the kept adapter
    assert result.metrics["global_step"] < 60
    assert result.metrics["best_checkpoint"] == f"checkpoint-{best_step}"
    assert result.metrics["val_loss"] == pytest.approx(best)


def test_resume_continues_from_the_last_whole_checkpoint(tiny_recipe, tmp_path):
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 4:  # after checkpoint-3 was written
                raise RuntimeError("simulated crash")

    recipe = tiny_recipe.replace(output_dir=str(tmp_path / "crashed"), save_every_steps=3)
    straight = train(recipe.replace(output_dir=str(tmp_path / "straight")))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(recipe, callbacks=[Crash()])
    run = tmp_path / "crashed"
    assert not (run / "adapter").exists()
    assert json.loads((run / "status.json").read_text())["state"] == "failed"

    # What a SIGKILL can leave besides: a checkpoint cut short mid-save, half a metrics line.
    whole = run / "checkpoints" / "checkpoint-3"
    shutil.copytree(
        whole, run / "checkpoints" / "checkpoint-4", ignore=shutil.ignore_patterns("trainer_state.json")
    )
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 5.8')
    resumed = train(recipe, resume=True)
    assert resumed.metrics["global_step"] == straight.metrics["global_step"] == 6
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-3",
        "checkpoint-6",
    ]

    def losses(run):
        return {m["step"]: m["loss"] for m in read_metrics(run) if "loss" in m}

    steps = [m["step"] for m in read_metrics(resumed.run_dir) if "loss" in m]
    assert steps == [1, 2, 3, 4, 5, 6]  # step 4, logged before the crash, is redone and logged once
    val_steps = [m["step"] for m in read_metrics(resumed.run_dir) if "val_loss" in m]
    assert val_steps == [0, 3, 6, 6]  # the base, two validations, then the kept adapter's final one

    # The curve continues where it stopped (CPU float reductions differ run to run by ~1e-3;
    # restarting from scratch would put step 4 back near step 1's loss, ~0.08 higher).
    assert losses(resumed.run_dir) == pytest.approx(losses(straight.run_dir), abs=0.01)
    assert losses(resumed.run_dir)[1] - losses(resumed.run_dir)[4] > 0.03


@pytest.mark.parametrize("task", ["chat", "classify"])
def test_a_superseded_job_attempt_writes_neither_the_adapter_nor_status(
    task, tiny_recipe, tiny_model_dir, tmp_path
):
    """The job service judged the attempt lost and started a newer one while this one was finishing."""
    from classify_helpers import classify_recipe, toy_rows, write_jsonl
    from transformers import TrainerCallback

    from lora_studio.errors import TrainingCancelled
    from lora_studio.files import atomic_write_text
    from lora_studio.jobs import JobStore

    if task == "classify":
        rows = write_jsonl(tmp_path / "toy.jsonl", toy_rows(8))
        tiny_recipe = classify_recipe(tiny_model_dir, rows, tmp_path / "run", num_train_epochs=1)
    store = JobStore(tmp_path / "jobs.sqlite")
    job_id = store.submit(tiny_recipe)
    # The store checks a running job's pid: give it a live process that looks like a job process.
    job_process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "lora_studio"])
    attempt = store.claim_next(job_process.pid).attempts
    run = tiny_recipe.output_dir

    class TakenOver(TrainerCallback):
        def on_train_end(self, args, state, control, **kw):  # after the last step, before the adapter
            store.process_exited(job_id, attempt, -9)
            store.resume(job_id)
            assert store.claim_next(job_process.pid).attempts == attempt + 1
            atomic_write_text(run / "status.json", '{"state": "running", "attempt": 2}')  # the newer one's

    try:
        with pytest.raises(TrainingCancelled, match=f"attempt {attempt} was superseded"):
            train(tiny_recipe, callbacks=[TakenOver()], fence=lambda: store.fence(job_id, attempt))
    finally:
        job_process.kill()
        job_process.wait()
    assert (run / "status.json").read_text() == '{"state": "running", "attempt": 2}'
    assert not [p.name for p in run.iterdir() if "adapter" in p.name]


def test_resume_without_checkpoint_is_a_clear_error(tiny_recipe):
    from lora_studio import LoraStudioError

    with pytest.raises(LoraStudioError, match="nothing to resume"):
        train(tiny_recipe, resume=True)


def test_the_adapters_random_init_follows_the_recipe_seed_not_the_process(tiny_recipe, tmp_path):
    import torch
    from safetensors.torch import load_file

    weights = []
    for i, process_seed in enumerate([1, 2]):  # what ran before in the process moved its RNG
        torch.manual_seed(process_seed)
        result = train(tiny_recipe.replace(output_dir=str(tmp_path / f"run{i}"), max_steps=1))
        weights.append(load_file(result.adapter_dir / "adapter_model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
