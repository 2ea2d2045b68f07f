"""Who may let a base model run its own Python code: the operator, never an artifact.

Some hub models ship Python files that transformers runs when `trust_remote_code` is on. LoRA
Studio allows that only on the operator's word, given on the command they run
(`--trust-remote-code`) or in the environment they start it with: never from a recipe field, an
adapter's `lora_studio.json`, a model folder, an upload or a request. Settings that ask for it
without that word are refused before anything is loaded. The permission lives in the environment
so that the job worker and job processes a command starts inherit it. A light module (no torch),
so the CLI can set it before any heavy import.
"""

from __future__ import annotations

import os

from .config import ModelSettings
from .errors import ModelError

REMOTE_CODE_ENV = "LORA_STUDIO_TRUST_REMOTE_CODE"
REMOTE_CODE_FLAG = "--trust-remote-code"


def allow_remote_code() -> None:
    """The operator's word that base models may run their own code, for this process and its children."""
    os.environ[REMOTE_CODE_ENV] = "1"


def remote_code_allowed() -> bool:
    return os.environ.get(REMOTE_CODE_ENV) == "1"


def check_remote_code(settings: ModelSettings, asked_by: str = "the recipe") -> bool:
    """Whether loading this base may run its own code; refuses settings that ask without permission.

    `asked_by` names where the settings came from (a recipe, an adapter folder) for the message.
    """
    allowed = remote_code_allowed()
    if settings.trust_remote_code and not allowed:
        raise ModelError(
            f"{asked_by} asks to run {settings.base_model!r}'s own Python code (trust_remote_code), "
            f"which LoRA Studio takes only from you: pass {REMOTE_CODE_FLAG} (or set "
            f"{REMOTE_CODE_ENV}=1) if you trust that model's code"
        )
    return allowed
