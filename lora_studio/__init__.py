"""LoRA Studio: fine-tune a pretrained language model on your own data with LoRA adapters.

from lora_studio import Recipe, train
result = train(Recipe.from_yaml("recipes/smollm2-lora-cpu.yaml", ["max_steps=20"]))
print(result.adapter_dir, result.metrics)
"""

from typing import Any

from .config import Recipe
from .errors import ConfigError, DataError, LoraStudioError, ModelError
from .version import __version__ as __version__

__all__ = ["Recipe", "train", "RunResult", "LoraStudioError", "ConfigError", "DataError", "ModelError"]


def __getattr__(name: str) -> Any:
    # Training pulls in torch and transformers (seconds to import): load it only when asked for.
    if name in ("train", "RunResult"):
        from . import training

        return getattr(training, name)
    raise AttributeError(f"module 'lora_studio' has no attribute {name!r}")
