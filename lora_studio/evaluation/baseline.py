"""The from-scratch baseline: what the pretrained weights brought to a fine-tune.

`eval --baseline scratch` trains the adapter's own recipe again (same data, same LoRA settings,
same number of steps) on a copy of its base with freshly initialised weights: same architecture
and tokenizer, no pretraining. The gap between that model and the adapter is what the
pretrained knowledge was worth on this task and budget.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..adapters import read_metadata
from ..config import Recipe
from ..files import move_into_place
from ..models import load_tokenizer, resolve_base

log = logging.getLogger(__name__)


def random_copy(source: Path, dest: Path, seed: int = 0) -> Path:
    """A model folder with `source`'s architecture and tokenizer and seeded random weights.

    Written under a temporary name and moved into place; an existing copy is reused.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if (dest / "config.json").is_file():
        return dest
    log.info("building a randomly initialised copy of %s in %s", source, dest)
    config = AutoConfig.from_pretrained(source)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    try:
        model.generation_config = GenerationConfig.from_pretrained(source)
    except OSError:  # no generation_config.json: keep the one built from the config
        pass
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        load_tokenizer(source).save_pretrained(tmp)
        move_into_place(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def scratch_recipe(metadata: dict[str, Any], base_folder: Path, run_dir: Path) -> Recipe:
    """The adapter's recipe on a random base, for exactly as many steps as the adapter trained."""
    raw = metadata["recipe"]
    steps = int((metadata.get("metrics") or {}).get("global_step") or raw["train"]["max_steps"])
    return Recipe.from_dict(
        {
            **raw,
            "name": f"{raw.get('name', 'run')}-scratch",
            "model": {**raw["model"], "base_model": str(base_folder), "revision": None},
            # The same budget: a fixed step count, no early stop.
            "train": {
                **raw["train"],
                "output_dir": str(run_dir),
                "max_steps": steps,
                "early_stopping_patience": None,
            },
        },
        source="the scratch baseline recipe",
    )


def train_scratch(adapter_dir: Path, work_dir: Path) -> Path:
    """Train the scratch baseline of an adapter under `work_dir`; returns its adapter folder."""
    from ..training import train

    meta = read_metadata(adapter_dir)
    recipe = Recipe.from_dict(meta["recipe"])
    ref = resolve_base(recipe.model.base_model, recipe.model.revision)
    base = random_copy(ref.folder, work_dir / "random-base", seed=recipe.train.seed)
    scratch = scratch_recipe(meta, base, work_dir / "run")
    log.info("training the from-scratch baseline: %s steps on a random %s", scratch.train.max_steps, ref.name)
    return train(scratch).adapter_dir
