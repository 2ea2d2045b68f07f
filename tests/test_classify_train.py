"""Training a classifier on the tiny model: the head, what trains, the run folder, many classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from classify_helpers import build_wide_tiny_model, classify_recipe, toy_rows, write_jsonl

from lora_studio import train
from lora_studio.config import LoraSettings, ModelSettings
from lora_studio.tasks.classify.model import attach_classification_lora, load_classification_base
from lora_studio.tasks.classify.train import cross_entropy_loss


def test_new_head_has_the_label_shape_and_only_lora_and_head_train(tiny_model_dir: Path):
    model, _ = load_classification_base(ModelSettings(base_model=str(tiny_model_dir)), ["a", "b", "c"], 2)
    assert model.score.weight.shape == (3, 32)  # labels x hidden size
    assert model.config.id2label == {0: "a", 1: "b", 2: "c"} and model.config.pad_token_id == 2
    peft = attach_classification_lora(model, LoraSettings(r=4, lora_alpha=8, layers=1))
    trainable = {name for name, p in peft.named_parameters() if p.requires_grad}
    head = {n for n in trainable if ".score." in n}
    assert head == {"base_model.model.score.modules_to_save.default.weight"}
    lora = trainable - head
    assert lora and all("lora_" in n and ".layers.1." in n for n in lora)  # layers=1: the top block only
    frozen = {name for name, p in peft.named_parameters() if not p.requires_grad}
    assert any("embed_tokens" in n for n in frozen) and any(".layers.0." in n for n in frozen)


def test_weighted_loss_is_normalised_over_the_accumulated_batch():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 0])
    plain = torch.nn.functional.cross_entropy(logits, labels)
    assert cross_entropy_loss(None)({"logits": logits}, labels) == pytest.approx(plain.item())
    # With num_items_in_batch = 6 (two micro-batches of 3), each half counts for half.
    assert cross_entropy_loss(None)({"logits": logits}, labels, 6) == pytest.approx(plain.item() / 2)
    weights = torch.tensor([1.0, 3.0])
    per_row = torch.nn.functional.cross_entropy(logits, labels, reduction="none") * torch.tensor(
        [1.0, 3.0, 1.0]
    )
    assert cross_entropy_loss(weights)({"logits": logits}, labels) == pytest.approx(per_row.sum().item() / 3)


def test_training_lifts_validation_accuracy_above_90_percent(tiny_model_dir: Path, tmp_path: Path):
    data = write_jsonl(tmp_path / "toy.jsonl", toy_rows(40))
    recipe = classify_recipe(tiny_model_dir, data, tmp_path / "run", select_best="macro_f1")
    result = train(recipe)
    metrics = result.metrics
    assert metrics["val_accuracy"] > 0.9 and metrics["val_macro_f1"] > 0.9
    assert metrics["base_val_accuracy"] > 0.5  # the head starts informed (chance: 1/3; test_classify_head)
    run = result.run_dir
    assert {p.name for p in run.iterdir()} == {
        "adapter",
        "checkpoints",
        "config.yaml",
        "data_report.json",
        "eval",
        "metrics.jsonl",
        "status.json",
        "train.log",
    }
    assert {p.name for p in (run / "eval").iterdir()} == {"scores.json", "confusion.png"}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] and all(loss == loss for loss in losses)  # falls, finite
    assert [r for r in rows if "val_macro_f1" in r and "val_accuracy" in r]
    meta = json.loads((result.adapter_dir / "lora_studio.json").read_text())
    assert meta["task"] == "classify" and meta["classification"]["labels"] == ["city", "fox", "greet"]
    assert json.loads((result.adapter_dir / "labels.json").read_text())["label2id"] == {
        "city": 0,
        "fox": 1,
        "greet": 2,
    }
    assert json.loads((run / "status.json").read_text())["state"] == "succeeded"
    assert "task: classify" in (run / "config.yaml").read_text()


def test_sixty_classes_of_ten_rows_train_and_report_every_class(tiny_model_dir: Path, tmp_path: Path):
    rows = [{"text": f"word{c % 10} {c} hello {i}", "label": c} for c in range(60) for i in range(10)]
    data = write_jsonl(tmp_path / "many.jsonl", rows)
    recipe = classify_recipe(
        tiny_model_dir, data, tmp_path / "run", max_steps=6, eval_every_steps=6, class_weight="balanced"
    ).replace(val_fraction=0.1)
    result = train(recipe)
    report = json.loads((result.run_dir / "data_report.json").read_text())
    assert report["classes"] == 60 and set(report["val_class_counts"].values()) == {1}
    assert set(report["class_counts"].values()) == {9}
    assert not [w for w in report["warnings"] if "imbalanced" in w]
    scores = json.loads((result.run_dir / "eval" / "scores.json").read_text())
    assert [c["label"] for c in scores["per_class"]] == [str(c) for c in range(60)]  # bare numbers, by value
    assert all(c["support"] == 1 for c in scores["per_class"])
    assert len(scores["confusion_matrix"]) == 60 and scores["rows"] == 60
    assert result.metrics["classes"] == 60


def test_a_4bit_base_trains_with_a_full_precision_head_and_merges(tmp_path: Path):
    from bitsandbytes.nn import Linear4bit

    from lora_studio.tasks.classify.model import Classifier
    from lora_studio.tasks.registry import merge as merge_adapter

    model_dir = build_wide_tiny_model(tmp_path / "wide")
    data = write_jsonl(tmp_path / "toy.jsonl", toy_rows(10))
    recipe = classify_recipe(model_dir, data, tmp_path / "run", max_steps=2, eval_every_steps=2)
    result = train(recipe.replace(quantization="4bit"))
    assert result.metrics["global_step"] == 2 and result.metrics["train_loss"] == result.metrics["train_loss"]
    classifier = Classifier.from_adapter(result.adapter_dir)  # loaded 4-bit, as trained
    body = classifier.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    head = classifier.model.get_base_model().score.modules_to_save["default"]
    assert (
        isinstance(body, Linear4bit) and type(head) is torch.nn.Linear and head.weight.dtype == torch.float32
    )
    report = merge_adapter(result.adapter_dir, tmp_path / "merged")  # from the float32 base
    assert report.check.passed


@pytest.mark.subprocess
def test_accelerate_launch_two_processes_trains_a_classifier(tiny_model_dir: Path, tmp_path: Path):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    data = write_jsonl(tmp_path / "toy.jsonl", toy_rows(12))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"name: ddp\ntask: classify\nmodel: {{base_model: {tiny_model_dir}}}\nlora: {{r: 4, lora_alpha: 8}}\n"
        f"data: {{train_file: {data}, max_length: 32, val_fraction: 0.25}}\n"
        f"train: {{output_dir: {tmp_path / 'run'}, max_steps: 3, per_device_train_batch_size: 4, "
        "eval_every_steps: 3, logging_steps: 1}\n"
    )
    accelerate = Path(sys.executable).with_name("accelerate")
    config = root / "recipes/accelerate/cpu_2proc.yaml"
    proc = subprocess.run(
        [
            str(accelerate),
            "launch",
            "--config_file",
            str(config),
            str(root / "recipes/train.py"),
            str(recipe),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((tmp_path / "run/adapter/lora_studio.json").read_text())
    assert meta["metrics"]["world_size"] == 2 and meta["task"] == "classify"
    scores = json.loads((tmp_path / "run/eval/scores.json").read_text())
    assert scores["rows"] == 9  # every validation row scored once, none doubled by the two processes


def test_a_classifier_run_resumes_from_its_checkpoint(tiny_model_dir: Path, tmp_path: Path):
    data = write_jsonl(tmp_path / "toy.jsonl", toy_rows(12))
    recipe = classify_recipe(tiny_model_dir, data, tmp_path / "run", max_steps=2, eval_every_steps=2)
    train(recipe)
    result = train(recipe.replace(max_steps=4), resume=True)
    assert result.metrics["global_step"] == 4
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    validated = [r["step"] for r in rows if "val_accuracy" in r]
    assert validated == [0, 2, 4]  # the resumed run's first validation is not logged twice
