"""LoRA attachment (all linear layers, top-N blocks) and atomic adapter folders."""

import pytest

from lora_studio import ConfigError, ModelError
from lora_studio.adapters import attach_lora, linear_module_names, read_metadata, save_adapter
from lora_studio.config import LoraSettings, ModelSettings
from lora_studio.models import load_base


@pytest.fixture
def base(tiny_model_dir):
    model, tokenizer, _ = load_base(ModelSettings(base_model=str(tiny_model_dir)))
    return model, tokenizer


def test_all_linear_names_exclude_the_lm_head(base):
    assert linear_module_names(base[0]) == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]


def test_top_layers_only_get_adapters(base):
    model = attach_lora(base[0], LoraSettings(r=2, layers=1))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".layers.1." in n and "lora_" in n for n in trainable)


def test_too_many_layers_or_unknown_modules(base):
    with pytest.raises(ConfigError, match="the model has 2 blocks, so layers=5 is too many"):
        attach_lora(base[0], LoraSettings(layers=5))
    with pytest.raises(ConfigError, match="cannot attach LoRA"):
        attach_lora(base[0], LoraSettings(target_modules=["no_such_proj"]))


def test_a_failed_save_leaves_no_adapter_behind(base, tmp_path, monkeypatch):
    model = attach_lora(base[0], LoraSettings(r=2))
    tokenizer = base[1]

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tokenizer, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tokenizer, tmp_path / "adapter", {"base_model": "x"})
    assert list(tmp_path.iterdir()) == []  # neither the adapter nor a temporary folder


def test_save_then_read_metadata(base, tmp_path):
    model = attach_lora(base[0], LoraSettings(r=2))
    folder = save_adapter(model, base[1], tmp_path / "adapter", {"base_model": "x"})
    assert read_metadata(folder) == {"base_model": "x"}
    (folder / "lora_studio.json").unlink()
    with pytest.raises(ModelError, match="has no lora_studio.json"):
        read_metadata(folder)
    with pytest.raises(ModelError, match="adapter folder not found"):
        read_metadata(tmp_path / "missing")
