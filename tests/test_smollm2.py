"""Integration with the real default model, SmolLM2-135M-Instruct, for a handful of steps."""

import json

import pytest
import torch

from lora_studio import Recipe, train
from lora_studio.config import ModelSettings

pytestmark = pytest.mark.slow


@pytest.fixture
def answers_file(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Code for city {city}?"},
                {"role": "assistant", "content": f'{{"city": "{city}", "code": "{city[:3].upper()}"}}'},
            ]
        }
        for city in ["Paris", "Berlin", "Madrid", "Lisbon", "Vienna", "Prague", "Dublin", "Oslo"]
    ]
    path = tmp_path / "codes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe(answers_file, tmp_path, **overrides):
    base = Recipe.from_dict(
        {
            "name": "smollm2-it",
            "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "layers": 4},
            "data": {"train_file": str(answers_file), "val_fraction": 0.0, "max_length": 96},
            "train": {
                "output_dir": str(tmp_path / "run"),
                "max_steps": 4,
                "per_device_train_batch_size": 8,
                "logging_steps": 1,
                "learning_rate": 2e-3,
                "warmup_ratio": 0.0,
                "lr_scheduler_type": "constant",
            },
        }
    )
    return base.replace(**overrides) if overrides else base


def test_builtin_default_answers_a_question(use_smollm2_home):
    from lora_studio.models import load_base

    model, tokenizer, ref = load_base(ModelSettings())
    assert ref.kind == "builtin" and (ref.folder / "model.safetensors").is_file()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
    )["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


def test_a_few_steps_lower_the_loss_and_the_adapter_reloads(use_smollm2_home, answers_file, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from lora_studio.models import load_base

    result = train(recipe(answers_file, tmp_path))
    losses = [
        m["loss"]
        for m in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines())
        if "loss" in m
    ]
    assert len(losses) == 4 and losses[-1] < losses[0] * 0.8
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert any(
        name.endswith("lora_B.weight") and w.abs().sum() > 0 for name, w in weights.items()
    )  # B starts at 0

    base, tokenizer, _ = load_base(ModelSettings())
    model = PeftModel.from_pretrained(base, result.adapter_dir)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Code for city Rome?"}], add_generation_prompt=True, return_tensors="pt"
    )["input_ids"]
    out = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1] :]).startswith('{"city"')


def test_qlora_4bit_trains_a_step(use_smollm2_home, answers_file, tmp_path):
    result = train(recipe(answers_file, tmp_path, quantization="4bit", max_steps=1))
    assert result.metrics["global_step"] == 1 and torch.isfinite(torch.tensor(result.metrics["train_loss"]))
    meta = json.loads((result.adapter_dir / "lora_studio.json").read_text())
    assert meta["recipe"]["model"]["quantization"] == "4bit"
