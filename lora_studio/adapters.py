"""LoRA adapters: attach them to a frozen base, and save or read a finished adapter folder.

An adapter folder holds PEFT's `adapter_model.safetensors` and `adapter_config.json`, the
tokenizer, and `lora_studio.json` (base model and its content hash, the resolved recipe, data
fingerprint, final metrics, library versions). It is written under a temporary name and renamed
into place, so a folder with `lora_studio.json` is always complete.

    adapted = load_adapted(adapter_folder("support"))   # its base (as trained), hash-checked, PEFT-wrapped
    adapted.model, adapted.tokenizer, adapted.metadata
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from .config import DEFAULT_BASE_MODEL, LoraSettings, ModelSettings
from .errors import ConfigError, ModelError
from .files import move_into_place, settle_folder, temp_folder
from .models import BaseModelRef, load_base, load_tokenizer, model_fingerprint
from .remote_code import check_remote_code
from .tasks.kinds import require_text

log = logging.getLogger(__name__)

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
        top = min(settings.layers, len(blocks))
        if top < settings.layers:  # a default like the recipe's 16 must work on a smaller model too
            log.warning(
                "layers: the model has %d blocks, so layers=%d adapts all of them", top, settings.layers
            )
        layers_kw = {
            "layers_to_transform": list(range(len(blocks) - top, len(blocks))),
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
        with peft_deprecations_hidden():
            return get_peft_model(model, peft_config(settings, model))
    except ValueError as e:  # e.g. a target module name the model does not have
        raise ConfigError(f"cannot attach LoRA with these settings: {e}") from None


@contextlib.contextmanager
def peft_deprecations_hidden() -> Any:
    """Around PEFT's wrapping of a model: PEFT reads `model.is_gradient_checkpointing`, which
    transformers 5 deprecated, a warning nobody using LoRA Studio can act on. Only that one is hidden."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message="`is_gradient_checkpointing` is deprecated",
            category=FutureWarning,
            module="transformers.modeling_utils",
        )
        yield


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
    tmp = temp_folder(dest)
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
    """The `lora_studio.json` of a whole adapter folder, or a ModelError saying what is wrong.

    An adapter folder is data from anywhere (a download, an upload), so everything read here is
    checked: the metadata's shape, the PEFT config, and that the weights file is complete.
    """
    folder = Path(adapter_dir)
    with contextlib.suppress(OSError):  # a read-only folder is read as it is
        settle_folder(folder)  # finish or roll back a replacement a crash cut short
    if not folder.is_dir():
        raise ModelError(f"adapter folder not found: {folder}")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise ModelError(f"{folder} has no adapter_model.safetensors: not a (complete) LoRA adapter folder")
    meta = folder / METADATA_FILE
    if not meta.is_file():
        raise ModelError(
            f"{folder} has no {METADATA_FILE}: it was not written by LoRA Studio or is incomplete"
        )
    metadata = _json_object(meta)
    problems = [
        f"{key} should be {kind.__name__}, got {type(metadata[key]).__name__}"
        for key, kind in _METADATA_FIELDS.items()
        if key in metadata and not isinstance(metadata[key], kind)
    ]
    recipe = metadata.get("recipe")
    model = recipe.get("model") if isinstance(recipe, dict) else None
    if model is not None and not isinstance(model, dict):
        problems.append(f"recipe.model should be an object, got {type(model).__name__}")
    if not isinstance(metadata.get("base_model"), str):
        problems.append("base_model (the name of the base it was trained on) is missing")
    if problems:
        raise ModelError(f"{meta} is damaged: {'; '.join(problems)}. {_RECOVER}")
    _json_object(folder / "adapter_config.json")
    check_safetensors_complete(weights)
    return metadata


# Fields of lora_studio.json that are read back, and their JSON types.
_METADATA_FIELDS: dict[str, type] = {
    "base_model": str,
    "base_model_hash": str,
    "recipe": dict,
    "metrics": dict,
    "data_fingerprint": str,
}
_RECOVER = "Copy the adapter folder again, or retrain it."


def _json_object(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelError(f"{path.parent} has no {path.name}: not a complete adapter folder. {_RECOVER}")
    try:
        value = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # also bad UTF-8 and absurd nesting
        raise ModelError(f"{path} is damaged (not valid JSON: {str(e)[:80]}). {_RECOVER}") from None
    if not isinstance(value, dict):
        raise ModelError(f"{path} is damaged: expected a JSON object, got {type(value).__name__}. {_RECOVER}")
    return value


def check_safetensors_complete(path: Path) -> None:
    """Refuse a truncated or garbled safetensors file: its header must describe the file's exact size."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if not 2 <= header_len <= min(size - 8, 100_000_000):
                raise ValueError("bad header length")
            header = json.loads(f.read(header_len))
        ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise ModelError(f"{path} is not a readable safetensors file. {_RECOVER}") from None
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        raise ModelError(
            f"{path} is truncated or damaged ({size} bytes, its header describes {expected}). {_RECOVER}"
        )


# --- an adapter on its base --------------------------------------------------------------------
@dataclass
class Adapted:
    """An adapter folder put on the base it was trained on: a PEFT model and what came with it."""

    model: Any  # peft.PeftModel; `model.disable_adapter()` gives the plain base
    tokenizer: Any
    ref: BaseModelRef
    metadata: dict[str, Any]
    folder: Path


def load_adapted(adapter: str | Path, *, full_precision: bool = False) -> Adapted:
    """The base an adapter was trained on, loaded as its recipe said, with the adapter applied.

    `full_precision` loads the base unquantized in float32, whatever it was trained on (QLoRA
    too): what merging needs. The tokenizer is the one saved with the adapter when there is one.
    Refuses (ModelError) a base asking to run its own code, and base weights other than those the
    adapter was trained on.
    """
    folder = Path(adapter).expanduser()
    meta = read_metadata(folder)
    require_text(meta, folder)  # the base as a causal LM: a label head has no place on it
    settings = base_settings(meta, adapter, full_precision=full_precision)
    base, base_tokenizer, ref = load_base(settings, f"adapter {adapter}")
    model = apply_adapter(base, folder, meta, ref, settings.base_model)
    has_tokenizer = (folder / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(folder) if has_tokenizer else base_tokenizer
    return Adapted(model, tokenizer, ref, meta, folder)


def apply_adapter(base: Any, folder: Path, meta: dict[str, Any], ref: BaseModelRef, base_label: str) -> Any:
    """Wrap a loaded base in the adapter of `folder` (a PeftModel), once its base hash is checked."""
    from peft import PeftModel

    check_adapter_base(folder, meta, model_fingerprint(ref.folder), base_label)
    try:
        with peft_deprecations_hidden():
            return PeftModel.from_pretrained(base, str(folder))
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise ModelError(f"cannot load adapter {folder}: {e}") from None


def check_adapter_base(folder: Path, meta: dict[str, Any], base_hash: str, base_label: str) -> None:
    """Refuse an adapter whose recorded base weights hash differs from the base it is put on, or
    whose weights are not all finite: the checks every load makes before weights go on a base."""
    check_weights_finite(folder / "adapter_model.safetensors")
    expected = meta.get("base_model_hash")
    if expected != base_hash:
        raise ModelError(
            f"adapter {folder} was trained on base model {meta.get('base_model')!r} "
            f"(weights hash {str(expected)[:12]}), but it is being put on {base_label!r} "
            f"(hash {base_hash[:12]}). Use it with its own base model ({meta.get('base_model')!r}) "
            "or retrain it on this one."
        )


def check_weights_finite(path: Path) -> None:
    """Refuse an adapter whose weights hold NaN or inf: it would answer silently with garbage."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            tensor = f.get_tensor(name)
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).sum())
                raise ModelError(
                    f"{path} holds {bad} NaN or infinite value(s) in {name}: the training that wrote it "
                    f"diverged or the file was altered. {_RECOVER}"
                )


def base_settings(
    metadata: dict[str, Any], adapter: str | Path = "this adapter", full_precision: bool = False
) -> ModelSettings:
    """The base model settings an adapter was trained with, read from its metadata; with
    `full_precision`, unquantized in float32 (what merging and checking a merge need).

    An adapter is data: if it asks for the base's own code to run (`trust_remote_code`), it is
    refused here, before any loading, unless the operator allowed it (see remote_code).
    """
    recorded = dict((metadata.get("recipe") or {}).get("model") or {})
    known = {f.name for f in fields(ModelSettings)}
    recorded = {k: v for k, v in recorded.items() if k in known}
    recorded["base_model"] = metadata.get("base_model") or recorded.get("base_model") or DEFAULT_BASE_MODEL
    settings = ModelSettings(**recorded)
    check_remote_code(settings, f"adapter {adapter}")
    return replace(settings, quantization="none", dtype="float32") if full_precision else settings


def adapter_name(folder: str | Path) -> str:
    """A default name for an adapter folder: its run's name when the folder is `<run>/adapter`."""
    path = Path(folder).expanduser().resolve()
    name = path.parent.name if path.name == "adapter" else path.name
    return re.sub(r"[^A-Za-z0-9._:-]", "-", name).strip("-.") or "adapter"
