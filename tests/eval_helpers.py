"""Helpers for the eval tests: a tiny model that can learn quickly, and small data files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch


def learnable_tiny_model(source: Path, dest: Path, scale: float = 25.0) -> Path:
    """The tiny Llama with its output head scaled up, saved to `dest`.

    The stock tiny model's head is so small (init std 0.02, width 32) that its predictions stay
    near uniform whatever LoRA does to the layers below; a larger head lets a few dozen LoRA
    steps learn, and overfit, a small dataset.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(source).save_pretrained(dest)
    return dest


def chat_rows(pairs: list[tuple[str, str]]) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs
    ]


def noise_pairs(n: int, seed: int = 0, offset: int = 0) -> list[tuple[str, str]]:
    """Questions with random 12-letter codes as answers: nothing to generalise, only to memorise."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [
        (f"Code for item {i}?", "".join(rng.choice(letters) for _ in range(12)))
        for i in range(offset, offset + n)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def taught_tiny_model(source: Path, dest: Path, pairs: list[tuple[str, str]], steps: int = 150) -> Path:
    """The learnable tiny model, fully fine-tuned on `pairs` (a stand-in for an instruct model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_studio.data import Example, encode

    learnable_tiny_model(source, dest)
    model = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(dest)
    rows = [
        encode(Example(f"row {i}", messages=tuple(chat_rows([p])[0]["messages"])), tokenizer, 64)
        for i, p in enumerate(pairs)
    ]
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor(
        [r["input_ids"] + [tokenizer.pad_token_id] * (width - len(r["input_ids"])) for r in rows]
    )
    labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matrices this small gain nothing from threads, and lose a lot on a busy CPU
    try:
        for _ in range(steps):
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(dest)
    return dest
