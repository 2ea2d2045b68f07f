"""Who may let a base model run its own Python code: the operator, never an artifact.

Some hub models ship Python files that transformers runs when `trust_remote_code` is on. LoRA
Studio allows that only on the operator's word, given on the command they run
(`--trust-remote-code`, or `LORA_STUDIO_TRUST_REMOTE_CODE=1` in that command's environment):
never from a recipe field, an adapter's `lora_studio.json`, a model folder, an upload or a
request. Settings that ask for it without that word are refused before anything is loaded.

The word holds for the one process it was given to, and is never inherited. The CLI turns it
into this process's permission and takes it out of the environment, so nothing the command
starts inherits it. A queued job carries its own: `JobStore.submit` records the submitting
operator's word on that job, and the job's process takes its permission from that record alone
(`set_remote_code`), never from the worker's environment. A light module (no torch), so the CLI
can set it before any heavy import.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from .config import ModelSettings
from .errors import ModelError

REMOTE_CODE_ENV = "LORA_STUDIO_TRUST_REMOTE_CODE"
REMOTE_CODE_FLAG = "--trust-remote-code"

_allowed = False  # this process's permission: set by the operator's flag, or by a job's record


def allow_remote_code() -> None:
    """The operator's word that base models may run their own code, for this process only."""
    set_remote_code(True)


def set_remote_code(allowed: bool) -> None:
    """Set this process's permission exactly (a job process: from its job's record)."""
    global _allowed
    _allowed = allowed
    os.environ.pop(REMOTE_CODE_ENV, None)  # only ever this process's: children never inherit it


def take_operator_word(flag: bool, from_env: bool = True) -> bool:
    """At a command's start: the operator's flag, or the variable in its environment (unless not
    `from_env`: the worker's), becomes this process's permission, and the variable leaves the
    environment. Returns the permission."""
    set_remote_code(flag or (from_env and os.environ.get(REMOTE_CODE_ENV) == "1"))
    return _allowed


def remote_code_allowed() -> bool:
    """Whether the operator allowed remote code for this process (a library caller may also have
    set the variable itself: it counts for this process, as for the command line)."""
    return _allowed or os.environ.get(REMOTE_CODE_ENV) == "1"


def without_permission(env: Mapping[str, str]) -> dict[str, str]:
    """A child's environment that cannot grant remote code (the worker's job processes)."""
    return {k: v for k, v in env.items() if k != REMOTE_CODE_ENV}


def check_remote_code(
    settings: ModelSettings, asked_by: str = "the recipe", allowed: bool | None = None
) -> bool:
    """Whether loading this base may run its own code; refuses settings that ask without permission.

    `asked_by` names where the settings came from (a recipe, an adapter folder) for the message.
    `allowed`: the permission of the run being checked (a job's, at submit); default this process's.
    """
    allowed = remote_code_allowed() if allowed is None else allowed
    if settings.trust_remote_code and not allowed:
        raise ModelError(
            f"{asked_by} asks to run {settings.base_model!r}'s own Python code (trust_remote_code), "
            f"which LoRA Studio takes only from you: pass {REMOTE_CODE_FLAG} (or set "
            f"{REMOTE_CODE_ENV}=1) if you trust that model's code"
        )
    return allowed
