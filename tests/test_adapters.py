"""LoRA attachment (all linear layers, top-N blocks) and atomic adapter folders."""

import logging

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


def test_more_layers_than_blocks_adapt_all_and_unknown_modules_are_an_error(base, caplog):
    with caplog.at_level(logging.WARNING, logger="lora_studio.adapters"):
        model = attach_lora(base[0], LoraSettings(r=2, layers=5))  # e.g. the default's 16 on a small model
    trainable = {n.split(".layers.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0", "1"} and "the model has 2 blocks, so layers=5 adapts all of them" in caplog.text
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


@pytest.fixture
def adapter(base, tmp_path):
    model = attach_lora(base[0], LoraSettings(r=2))
    return save_adapter(model, base[1], tmp_path / "adapter", {"base_model": "x", "recipe": {"model": {}}})


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "lora_studio.json").write_text('{"base_model": "x"'), "lora_studio.json is damaged"),
        (lambda f: (f / "lora_studio.json").write_bytes(b"\xff\xfe{}"), "lora_studio.json is damaged"),
        (lambda f: (f / "lora_studio.json").write_text("[1, 2]"), "expected a JSON object, got list"),
        (lambda f: (f / "lora_studio.json").write_text("[" * 100_000), "lora_studio.json is damaged"),
        (lambda f: (f / "lora_studio.json").write_text('{"recipe": {"model": 3}}'), "recipe.model should be"),
        (lambda f: (f / "lora_studio.json").write_text('{"base_model": 7}'), "base_model should be str"),
        (lambda f: (f / "adapter_config.json").write_text("{"), "adapter_config.json is damaged"),
        (lambda f: (f / "adapter_config.json").unlink(), "has no adapter_config.json"),
        (lambda f: _cut(f / "adapter_model.safetensors", -100), "truncated or damaged"),
        (lambda f: _cut(f / "adapter_model.safetensors", 4), "not a readable safetensors file"),
    ],
)
def test_a_damaged_adapter_gets_one_line_saying_what_and_how_to_recover(adapter, damage, message):
    damage(adapter)
    with pytest.raises(ModelError, match=message) as caught:
        read_metadata(adapter)
    assert "\n" not in str(caught.value) and "retrain" in str(caught.value)


def _cut(path, end):
    """Keep the file's bytes up to `end` (negative: drop that many from the end), as a torn copy would."""
    path.write_bytes(path.read_bytes()[:end])


def test_a_damaged_fingerprint_cache_is_hashed_again(tiny_model_dir):
    from lora_studio.home import studio_home
    from lora_studio.models import model_fingerprint

    good = model_fingerprint(tiny_model_dir)
    (cache,) = (studio_home() / "fingerprints").iterdir()
    for damaged in ["", "not a hash", good[:20], "\x00" * 64]:
        cache.write_text(damaged)
        assert model_fingerprint(tiny_model_dir) == good
        assert cache.read_text() == good
