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
    """A classify recipe for the tiny model; `train` overrides train settings."""
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
                **train,
            },
        }
    )
