"""The keystone: the real training path end to end on the tiny model."""

import json
from pathlib import Path

from lora_studio import train


def test_train_writes_a_complete_run_folder(tiny_recipe):
    result = train(tiny_recipe)
    run = result.run_dir
    assert sorted(p.name for p in run.iterdir()) == [
        "adapter", "checkpoints", "config.yaml", "data_report.json", "metrics.jsonl", "status.json", "train.log"]
    assert {p.name for p in result.adapter_dir.iterdir()} >= {
        "adapter_model.safetensors", "adapter_config.json", "lora_studio.json", "tokenizer.json"}
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 6 and all(map(lambda x: x == x, losses))  # finite (not NaN)
    assert losses[-1] < losses[0]
    meta = json.loads((result.adapter_dir / "lora_studio.json").read_text())
    assert meta["base_model"] == str(Path(tiny_recipe.model.base_model))
    assert len(meta["base_model_hash"]) == 64
    assert meta["recipe"]["train"]["max_steps"] == 6
    assert json.loads((run / "status.json").read_text())["state"] == "succeeded"
