"""What an adapter's task lets it do, read from its `lora_studio.json`, for the building blocks.

The loaders that generate text (`adapters.load_adapted`, the inference engine, GGUF export,
evaluation) sit below the tasks, which build on them, so they cannot look a task up in
`tasks.registry`. They ask here instead: one check, so no loader can forget it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ModelError

DEFAULT_TASK = "chat"  # adapters from before tasks existed are chat adapters
TEXT_TASKS = ("chat",)  # tasks whose adapters write text (Task.generates_text)
USE_INSTEAD = {  # what serves an adapter that does not write text (Task.use_instead)
    "classify": "`lora-studio classify ADAPTER TEXT` or POST /v1/classify (scored: `lora-studio eval "
    "ADAPTER --data TEST [--baseline probe]`)",
}


def task_name(metadata: dict[str, Any]) -> str:
    """The task an adapter was trained for, from its lora_studio.json."""
    name = metadata.get("task", DEFAULT_TASK)
    return name if isinstance(name, str) else DEFAULT_TASK


def generates_text(metadata: dict[str, Any]) -> bool:
    return task_name(metadata) in TEXT_TASKS


def require_text(metadata: dict[str, Any], folder: str | Path) -> None:
    """Refuse, in one line, an adapter that picks labels where text is to be generated."""
    if generates_text(metadata):
        return
    name = task_name(metadata)
    raise ModelError(
        f"{folder} is a {name!r} adapter (task: {name}): it does not write text, so it cannot chat, "
        f"be evaluated on answers or exported to GGUF; use {USE_INSTEAD.get(name, 'its own command')}"
    )
