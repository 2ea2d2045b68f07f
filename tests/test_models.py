"""Base models: resolving names, errors for what cannot be found, device/dtype choice, loading."""

import pytest
import torch

from lora_studio import ModelError
from lora_studio.config import ModelSettings
from lora_studio.models import load_base, model_fingerprint, pick_dtype, resolve_base


def test_local_folder_resolves_and_loads_frozen_in_fp32_on_cpu(tiny_model_dir):
    ref = resolve_base(str(tiny_model_dir))
    assert ref.kind == "local" and ref.folder == tiny_model_dir.resolve()
    model, tokenizer, _ = load_base(ModelSettings(base_model=str(tiny_model_dir)))
    assert next(model.parameters()).dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token is not None and tokenizer.chat_template


def test_dtype_choice():
    assert pick_dtype("auto", "cpu") == torch.float32  # bf16 is ~12x slower on CPUs
    assert pick_dtype("bfloat16", "cpu") == torch.bfloat16


def test_missing_paths_and_files_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="model folder not found"):
        resolve_base(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve_base(str(tmp_path / "model.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_base(str(tmp_path / "empty"))


def test_unreachable_hub_says_so_and_suggests_a_local_folder():
    with pytest.raises(
        ModelError, match="could not get 'someone/some-model' from the Hugging Face Hub.*local folder"
    ):
        resolve_base("someone/some-model")


def test_fingerprint_is_a_stable_content_hash(tiny_model_dir, tmp_path):
    import shutil

    first = model_fingerprint(tiny_model_dir)
    assert first == model_fingerprint(tiny_model_dir) and len(first) == 64
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    assert model_fingerprint(copy) == first  # same weights, same hash, wherever they live
