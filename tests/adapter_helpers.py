"""Build LoRA adapters and special tiny models directly, for the inference, export and verify tests.

Adapters get seeded random LoRA B weights (PEFT initialises B to zero, which would make an adapter
with no effect), and are written with the library's own `save_adapter`, so the folders are exactly
what training writes: PEFT safetensors, tokenizer and `lora_studio.json` with the base's hash.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tiny_model import CHATML


def build_adapter(
    base_dir: Path,
    dest: Path,
    seed: int,
    scale: float = 0.5,
    recipe_model: dict | None = None,
    zero: bool = False,
    train_file: str | None = None,
) -> Path:
    """A LoRA adapter (r=4 on every linear layer) on `base_dir` with seeded random weights."""
    from lora_studio.adapters import attach_lora, save_adapter
    from lora_studio.config import LoraSettings, ModelSettings
    from lora_studio.models import load_base, model_fingerprint

    model, tokenizer, ref = load_base(ModelSettings(base_model=str(base_dir)))
    peft = attach_lora(model, LoraSettings(r=4, lora_alpha=8, lora_dropout=0.0))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name and not zero:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    metadata = {
        "base_model": str(base_dir),
        "base_model_hash": model_fingerprint(ref.folder),
        "recipe": {
            "model": {"base_model": str(base_dir), **(recipe_model or {})},
            "data": {"train_file": train_file or ""},
        },
    }
    return save_adapter(peft, tokenizer, dest, metadata)


def smollm2_tokenizer() -> Any:
    """SmolLM2's real tokenizer (from the built-in GGUF): one llama.cpp's converter recognises."""
    import pytest
    from transformers import AutoTokenizer

    from lora_studio.errors import ModelError
    from lora_studio.models import builtin_gguf_path

    try:
        path = builtin_gguf_path("smollm2-135m-instruct")
    except ModelError as e:
        pytest.skip(str(e))
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer.chat_template = CHATML  # the tiny models' template: no default system prompt
    return tokenizer


def build_gguf_ready_model(folder: Path) -> Path:
    """A tiny random Llama (hidden 32, 2 blocks) with SmolLM2's tokenizer, so it exports to GGUF."""
    from tiny_model import build_tiny_model

    return build_tiny_model(folder, smollm2_tokenizer())


def build_constant_model(source: Path, folder: Path, token: str, eos_token: str | None = None) -> Path:
    """A copy of a tiny model that greedily answers `token` after every prompt.

    Every block's weights are zero and every embedding is the same vector, so the last hidden
    state is the same for any input; the output head points only `token` along it. With
    `eos_token`, the tokenizer's and generation config's EOS become that token instead.
    """
    from transformers import AutoModelForCausalLM

    from lora_studio.models import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = load_tokenizer(source)
    target = tokenizer.convert_tokens_to_ids(token)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".layers." in name and "norm" not in name:
                param.zero_()
        model.model.embed_tokens.weight.copy_(torch.ones_like(model.model.embed_tokens.weight))
        model.lm_head.weight.zero_()
        model.lm_head.weight[target] = 10.0
    if eos_token is not None:
        tokenizer.eos_token = eos_token
        eos_id = tokenizer.convert_tokens_to_ids(eos_token)
        model.config.eos_token_id = model.generation_config.eos_token_id = eos_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def index_run(run_dir: Path, name: str, base_model: str = "base", task: str = "chat") -> str:
    """Record a hand-made run folder (its adapter/ already built) in the run index, as training does."""
    import time

    from lora_studio import runs

    run_id = runs.new_id()
    runs.write_status(run_dir, "succeeded", id=run_id, name=name, created_at=time.time())
    runs.register(run_dir, run_id, name, base_model, task, time.time())
    return run_id
