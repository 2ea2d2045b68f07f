"""The batches the Trainer really trains on: prompt tokens masked, answer tokens kept.

`data.encode` masks the prompt (tested in test_data.py); this checks it survives what comes after:
TRL's collator on the plain path and the fast path's own collator, exactly as `train` builds them.
"""

from __future__ import annotations

import re

import pytest
import torch

from lora_studio import fast_path
from lora_studio.adapters import attach_lora
from lora_studio.data import IGNORE_INDEX, prepare
from lora_studio.models import load_base
from lora_studio.tasks.registry import TASKS
from lora_studio.training import build_trainer


@pytest.mark.parametrize("speedups", ["none", "auto"])
def test_the_trainers_batches_mask_the_prompt_and_keep_the_answer(tiny_recipe, speedups):
    recipe = tiny_recipe.replace(speedups=speedups)
    model, tokenizer, ref = load_base(recipe.model)
    data = prepare(recipe.data, tokenizer, recipe.train.seed)
    model = attach_lora(model, recipe.lora)
    fast = fast_path.prepare(recipe, model, tokenizer, data, ref.folder)
    assert (fast is None) == (speedups == "none")  # "auto" takes the fast path on the tiny model
    trainer = build_trainer(TASKS["chat"], recipe, model, tokenizer, data, ref)  # takes the fast path itself

    batch = next(iter(trainer.get_train_dataloader()))
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == labels.shape and ids.shape[0] == recipe.train.per_device_train_batch_size
    real = batch["attention_mask"].bool() if "attention_mask" in batch else ids != tokenizer.pad_token_id
    for row_ids, row_labels, row_real in zip(ids, labels, real, strict=True):
        kept = row_labels != IGNORE_INDEX
        assert not (kept & ~row_real).any(), "a padding position carries a label"
        assert torch.equal(row_labels[kept], row_ids[kept]), "labels are the tokens themselves"
        positions = kept.nonzero().flatten()
        assert len(positions) > 0 and torch.equal(positions, torch.arange(positions[0], positions[-1] + 1))
        prompt = tokenizer.decode(row_ids[: positions[0]][row_real[: positions[0]]])
        answer = tokenizer.decode(row_ids[kept], skip_special_tokens=True).strip()
        word = re.search(r"Repeat: (word\d+)", prompt)
        assert word, f"the prompt {prompt!r} is not all masked"
        assert answer == word.group(1), f"trained on {answer!r}, expected only the answer {word.group(1)!r}"
