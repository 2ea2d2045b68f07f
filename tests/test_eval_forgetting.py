"""The forgetting check: the shipped probe set, the answer rule, real regression on the tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from eval_helpers import chat_rows, learnable_tiny_model, write_jsonl

from lora_studio.cli import main
from lora_studio.evaluation.forgetting import (
    PROBE_DIR,
    Probe,
    forgetting_report,
    load_general_text,
    load_probes,
    probe_correct,
)

ROOT = Path(__file__).resolve().parents[1]
NARROW = [(f"Repeat: word{i % 10}", f"word{i % 10}") for i in range(40)]


# --- the probe set -------------------------------------------------------------------------------
def test_the_probe_set_is_shipped_as_promised():
    probes = load_probes()
    assert 60 <= len(probes) <= 100
    assert {p.category for p in probes} == {"arithmetic", "capitals", "units", "common sense", "instructions"}
    assert all(p.question.strip() and p.answers for p in probes)
    assert len({p.question for p in probes}) == len(probes)
    sentences = load_general_text()
    assert len(sentences) >= 200 and len(set(sentences)) == len(sentences)
    # Installed with the package: pyproject's package data covers every probe file.
    line = next(
        x for x in (ROOT / "pyproject.toml").read_text().splitlines() if x.startswith("lora_studio = [")
    )
    patterns = re.findall(r'"([^"]+)"', line)
    shipped = {p for pattern in patterns for p in (ROOT / "lora_studio").glob(pattern)}
    assert set(PROBE_DIR.iterdir()) <= shipped


@pytest.mark.parametrize(
    ("answer", "right"),
    [
        ("12", True),
        ("The answer is 12.", True),
        ("120", False),  # a whole number, not a digit inside another
        ("It's cold.", True),
        ("Is ice hot or cold? Cold.", False),  # naming the rejected option (an echo) is wrong
        ("COLD", True),
    ],
)
def test_probe_answers_are_whole_words_and_rejects_count(answer, right):
    probes = {
        "12": Probe("arithmetic", "What is 3 * 4?", ("12",)),
        "cold": Probe("s", "Hot or cold?", ("cold",), ("hot",)),
    }
    probe = probes["12"] if answer[0].isdigit() or "answer is" in answer else probes["cold"]
    assert probe_correct(answer, probe) is right


# --- real models ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def learnable_dir(tiny_model_dir, tmp_path_factory):
    return learnable_tiny_model(tiny_model_dir, tmp_path_factory.mktemp("learnable"))


def _recipe(model_dir, data, run_dir, **train):
    from lora_studio import Recipe

    return Recipe.from_dict(
        {
            "name": "narrow",
            "model": {"base_model": str(model_dir)},
            "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
            "data": {"train_file": str(data), "max_length": 64},
            "train": {
                "output_dir": str(run_dir),
                "per_device_train_batch_size": 8,
                "eval_every_steps": 10,
                "logging_steps": 5,
                "learning_rate": 1e-2,
                "early_stopping_patience": None,
                **train,
            },
        }
    )


def test_the_base_shows_no_regression_against_itself(learnable_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_studio.models import load_tokenizer

    base = AutoModelForCausalLM.from_pretrained(learnable_dir)
    untrained = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))  # B = 0: the base
    report = forgetting_report(untrained, load_tokenizer(learnable_dir), Path("."), None)
    assert [r.name for r in report.rows] == ["base", "adapter"]
    assert report.regression(report.rows[1]) == pytest.approx((0.0, 0.0), abs=1e-6)
    assert report.rows[1].answers == report.rows[0].answers


def test_an_adapter_trained_hard_on_a_narrow_task_regresses(learnable_dir, tmp_path, capsys):
    from lora_studio import train

    data = write_jsonl(tmp_path / "narrow.jsonl", chat_rows(NARROW))
    result = train(_recipe(learnable_dir, data, tmp_path / "run", max_steps=30))
    test = write_jsonl(tmp_path / "test.jsonl", chat_rows(NARROW[:4]))
    args = ["eval", str(result.run_dir), "--data", str(test), "--forgetting", "--checkpoints"]
    assert main([*args, "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "General ability (forgetting)" in out and "trade-off, adapter vs base: task" in out

    report = json.loads((result.run_dir / "eval" / "report.json").read_text())["forgetting"]
    names = [r["name"] for r in report["rows"]]
    assert names[:2] == ["base", "adapter"] and names[2:] == ["checkpoint-20", "checkpoint-30"]
    gained = report["regression"]["adapter"]["text_loss_gained"]
    assert gained > 0.3  # measurably worse at general text: it learned to repeat words
    adapter, base = report["rows"][1], report["rows"][0]
    assert adapter["text_loss"] == pytest.approx(base["text_loss"] + gained)
    assert report["rows"][3]["val_loss"] is not None and report["rows"][3]["step"] == 30
    assert "## General ability (forgetting)" in (result.run_dir / "eval" / "report.md").read_text()
    probes = [json.loads(x) for x in (result.run_dir / "eval" / "forgetting.jsonl").read_text().splitlines()]
    assert len(probes) == len(load_probes()) and {"base", "adapter_correct", "checkpoint-30"} <= set(
        probes[0]
    )
    right = sum(p["adapter_correct"] for p in probes) / len(probes)
    assert right == pytest.approx(report["rows"][1]["probe_accuracy"])


def test_select_best_balanced_keeps_the_best_trade_off(learnable_dir, tmp_path):
    from lora_studio import train

    data = write_jsonl(tmp_path / "narrow.jsonl", chat_rows(NARROW))
    result = train(_recipe(learnable_dir, data, tmp_path / "run", max_steps=30, select_best="balanced"))
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if "val_loss" in r}
    base_general = evals[0]["general_loss"]  # step 0: LoRA's B is zero, so this is the base
    for r in evals.values():
        expected = r["val_loss"] + max(0.0, r["general_loss"] - base_general)
        assert r["balanced"] == pytest.approx(expected, rel=1e-5)
    saved = {s: r["balanced"] for s, r in evals.items() if s > 0}
    assert result.metrics["best_checkpoint"] == f"checkpoint-{min(saved, key=saved.get)}"
