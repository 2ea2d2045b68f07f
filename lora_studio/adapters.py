"""LoRA adapters: attach them to a frozen base, and save or read a finished adapter folder.

An adapter folder holds PEFT's `adapter_model.safetensors` and `adapter_config.json`, the
tokenizer, and `lora_studio.json` (base model and its content hash, the resolved recipe, data
fingerprint, final metrics, library versions). It is written under a temporary name and renamed
into place, so a folder with `lora_studio.json` is always complete.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import LoraSettings
from .errors import ConfigError, ModelError
from .files import move_into_place

METADATA_FILE = "lora_studio.json"


def decoder_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The model's stack of transformer blocks: the longest ModuleList (e.g. `model.layers`)."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise ModelError(f"{type(model).__name__} has no list of transformer blocks to adapt")
    return max(lists, key=lambda item: len(item[1]))


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Names of the linear layers inside the transformer blocks ('all-linear' made explicit)."""
    _, blocks = decoder_blocks(model)
    names = {name.rsplit(".", 1)[-1] for name, m in blocks.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(names)


def peft_config(settings: LoraSettings, model: torch.nn.Module) -> Any:
    """PEFT's LoraConfig for these settings; `layers` selects the top N blocks."""
    from peft import LoraConfig

    targets = settings.target_modules
    if targets == "all-linear":
        # PEFT refuses layers_to_transform with the "all-linear" shorthand: pass the names.
        targets = linear_module_names(model)
    layers_kw = {}
    if settings.layers is not None:
        pattern, blocks = decoder_blocks(model)
        if settings.layers > len(blocks):
            raise ConfigError(
                f"layers: the model has {len(blocks)} blocks, so layers={settings.layers} is too many"
            )
        layers_kw = {
            "layers_to_transform": list(range(len(blocks) - settings.layers, len(blocks))),
            "layers_pattern": pattern.rsplit(".", 1)[-1],
        }
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=targets,
        use_dora=settings.use_dora,
        use_rslora=settings.use_rslora,
        modules_to_save=settings.modules_to_save,
        bias="none",
        task_type="CAUSAL_LM",
        **layers_kw,
    )


def attach_lora(model: Any, settings: LoraSettings, gradient_checkpointing: bool = False) -> Any:
    """Wrap a frozen base with fresh trainable LoRA weights."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    try:
        return get_peft_model(model, peft_config(settings, model))
    except ValueError as e:  # e.g. a target module name the model does not have
        raise ConfigError(f"cannot attach LoRA with these settings: {e}") from None


# --- adapter folders ---------------------------------------------------------------------------
def save_adapter(
    model: Any,
    tokenizer: Any,
    dest: Path,
    metadata: dict[str, Any],
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a complete adapter folder atomically (temp folder, then rename); `extra_files`: name -> text."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str))
        move_into_place(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def read_metadata(adapter_dir: str | Path) -> dict[str, Any]:
    """The `lora_studio.json` of an adapter folder, or a ModelError saying what is wrong."""
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise ModelError(f"adapter folder not found: {folder}")
    if not (folder / "adapter_model.safetensors").is_file():
        raise ModelError(f"{folder} has no adapter_model.safetensors: not a (complete) LoRA adapter folder")
    meta = folder / METADATA_FILE
    if not meta.is_file():
        raise ModelError(
            f"{folder} has no {METADATA_FILE}: it was not written by LoRA Studio or is incomplete"
        )
    return json.loads(meta.read_text())
