"""Labelled toy data and a tiny classification recipe, for the classification tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

# Three classes whose words the tiny tokenizer knows: separable by any one of their words.
TOY_WORDS = {
    "greet": ["hello", "world", "Repeat", "after"],
    "fox": ["quick", "brown", "fox", "jumps"],
    "city": ["Paris", "capital", "France", "city"],
}


def toy_rows(per_class: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = [
        {"text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 7))), "label": label}
        for label, words in TOY_WORDS.items()
        for _ in range(per_class)
    ]
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def classify_recipe(model_dir: Path, train_file: Path, run_dir: Path, **train: object):
    """A classify recipe for the tiny model; `train` overrides train (or classify) settings."""
    from lora_studio import Recipe

    return Recipe.from_dict(
        {
            "name": "toy",
            "task": "classify",
            "model": {"base_model": str(model_dir)},
            "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
            "data": {"train_file": str(train_file), "max_length": 32, "val_fraction": 0.2},
            "train": {
                "output_dir": str(run_dir),
                "num_train_epochs": 3,
                "per_device_train_batch_size": 8,
                "eval_every_steps": 10,
                "logging_steps": 2,
                "learning_rate": 1e-2,
                **{k: v for k, v in train.items() if k != "class_weight"},
            },
            "classify": {k: v for k, v in train.items() if k == "class_weight"},
        }
    )


def build_classifier_adapter(model_dir: Path, dest: Path, labels: list[str]) -> Path:
    """An untrained classification adapter (fresh head, zero LoRA update), written as training writes one."""
    from lora_studio.adapters import save_adapter
    from lora_studio.config import LoraSettings, ModelSettings
    from lora_studio.models import load_tokenizer, model_fingerprint
    from lora_studio.tasks.classify.data import LabelMap
    from lora_studio.tasks.classify.model import attach_classification_lora, load_classification_base
    from lora_studio.tasks.classify.train import classification_metadata

    tokenizer = load_tokenizer(model_dir)
    model, ref = load_classification_base(
        ModelSettings(base_model=str(model_dir)), labels, tokenizer.pad_token_id
    )
    peft = attach_classification_lora(model, LoraSettings(r=4, lora_alpha=8))
    recipe = classify_recipe(model_dir, Path("unused.jsonl"), dest.parent / "run")
    metadata = {
        "base_model": str(model_dir),
        "base_model_hash": model_fingerprint(ref.folder),
        "recipe": recipe.to_dict(),
        "created_at": "2025-01-01T00:00:00Z",
        **classification_metadata(recipe, LabelMap(tuple(labels))),
    }
    return save_adapter(peft, tokenizer, dest, metadata)


def build_wide_tiny_model(folder: Path) -> Path:
    """The tiny Llama at hidden size 64: bitsandbytes packs 4-bit weights in blocks of 64."""
    import torch
    from tiny_model import build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
