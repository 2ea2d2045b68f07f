"""Where LoRA Studio keeps its files: converted models, jobs, runs, uploads and exports.

A module of its own, with no heavy imports, so light commands (`jobs list`) need not load torch.
"""

import os
from pathlib import Path


def studio_home() -> Path:
    """The studio folder: $LORA_STUDIO_HOME, or ~/.cache/lora-studio (created on first use)."""
    home = Path(os.environ.get("LORA_STUDIO_HOME", Path.home() / ".cache" / "lora-studio"))
    home.mkdir(parents=True, exist_ok=True)
    return home
