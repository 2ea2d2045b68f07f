"""Shared fixtures: a tiny random Llama and a tiny tokenizer, built in-process (nothing downloads).

The model is saved to a temporary folder so loaders see a real model folder, exactly as they
would see a converted or downloaded base.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_model import build_tiny_model


@pytest.fixture(autouse=True)
def studio_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own LORA_STUDIO_HOME, so no test sees another's cache or jobs."""
    home = tmp_path_factory.mktemp("studio-home")
    monkeypatch.setenv("LORA_STUDIO_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.fixture(scope="session")
def smollm2_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One studio home for the whole session, so slow tests convert the built-in GGUF only once."""
    return tmp_path_factory.mktemp("smollm2-home")


@pytest.fixture
def use_smollm2_home(smollm2_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """For tests of the real SmolLM2: LORA_STUDIO_HOME is the shared session home."""
    monkeypatch.setenv("LORA_STUDIO_HOME", str(smollm2_home))
    return smollm2_home


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a seeded 2-block Llama (hidden size 32) and a byte-level BPE tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def chat_file(tmp_path: Path) -> Path:
    """A small chat dataset (40 rows) of a task the tiny model can start to learn."""
    rows = [
        {"messages": [{"role": "user", "content": f"Repeat: {w}"}, {"role": "assistant", "content": w}]}
        for w in [f"word{i % 20}" for i in range(40)]
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def tiny_recipe(tiny_model_dir: Path, chat_file: Path, tmp_path: Path):
    """A recipe that trains the tiny model for a few steps on chat_file."""
    from lora_studio import Recipe

    return Recipe.from_dict(
        {
            "name": "tiny",
            "model": {"base_model": str(tiny_model_dir)},
            "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
            "data": {"train_file": str(chat_file), "max_length": 64},
            "train": {
                "output_dir": str(tmp_path / "run"),
                "max_steps": 6,
                "per_device_train_batch_size": 4,
                "eval_every_steps": 3,
                "logging_steps": 1,
                "learning_rate": 5e-3,
            },
        }
    )


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two LoRA adapters on the tiny model, "alpha" and "beta", with different seeded weights."""
    from adapter_helpers import build_adapter

    root = tmp_path_factory.mktemp("adapters")
    return {
        name: build_adapter(tiny_model_dir, root / name, seed=i + 1)
        for i, name in enumerate(["alpha", "beta"])
    }


@pytest.fixture(scope="session")
def gguf_ready_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer, which llama.cpp's GGUF converter accepts."""
    from adapter_helpers import build_gguf_ready_model

    return build_gguf_ready_model(tmp_path_factory.mktemp("tiny-gguf-ready"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def no_remote_code_left_over():
    """A test that gives the operator's --trust-remote-code in-process must not lend it to the next."""
    yield
    from lora_studio.remote_code import set_remote_code

    set_remote_code(False)
