"""The distributed path: `accelerate launch` with two processes trains one adapter (DDP on CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess  # accelerate launch: two training processes

ROOT = Path(__file__).resolve().parents[1]


def test_accelerate_launch_two_processes(tiny_model_dir, chat_file, tmp_path, studio_home, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"name: ddp\nmodel: {{base_model: {tiny_model_dir}}}\nlora: {{r: 4, lora_alpha: 8}}\n"
        f"data: {{train_file: {chat_file}, max_length: 64}}\n"
        f"train: {{output_dir: {tmp_path / 'run'}, max_steps: 4, per_device_train_batch_size: 4, "
        "eval_every_steps: 2, logging_steps: 1}\n"
    )
    accelerate = Path(sys.executable).with_name("accelerate")
    proc = subprocess.run(
        [
            str(accelerate),
            "launch",
            "--config_file",
            str(ROOT / "recipes/accelerate/cpu_2proc.yaml"),
            str(ROOT / "recipes/train.py"),
            str(recipe),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("adapter: ") == 2  # both ranks finished training
    adapters = list((tmp_path / "run").glob("**/adapter_model.safetensors"))
    assert [p.parent.name for p in adapters if "checkpoint" not in str(p)] == ["adapter"]
    meta = json.loads((tmp_path / "run/adapter/lora_studio.json").read_text())
    assert meta["metrics"]["world_size"] == 2
    assert meta["metrics"]["global_step"] == 4
    # 36 training rows at 4 per process per step: an epoch is 5 steps with 2 processes (9 with one),
    # so after 4 steps the data is 80% seen only if both processes took their shares.
    steps = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert max(s["epoch"] for s in steps) == 0.8
    # The main process alone indexed the run: `runs list` and `adapters list` show it once.
    from lora_studio.cli import main

    assert len(list((studio_home / "index").glob("*.json"))) == 1
    for command in (["runs", "list", "--json"], ["adapters", "list", "--json"]):
        assert main(command) == 0
        (run,) = json.loads(capsys.readouterr().out)
        assert (run["name"], run["state"], run["step"]) == ("ddp", "succeeded", 4)
        assert run["folder"] == str(tmp_path / "run")
