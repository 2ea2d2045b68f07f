"""The errors LoRA Studio raises for things a user can fix.

Each message says what was given, what was expected and what to do next. The CLI prints them
as one line without a traceback; the UI shows them in the page.
"""


class LoraStudioError(Exception):
    """Base class: a problem the user can act on (bad input, missing file, unreachable model)."""


class ConfigError(LoraStudioError):
    """A recipe or override is invalid."""


class DataError(LoraStudioError):
    """A data file cannot be used for training."""


class ModelError(LoraStudioError):
    """A base model or adapter cannot be resolved or loaded."""


class RequestError(LoraStudioError):
    """A chat or generation request is invalid (messages, generation settings, prompt too long)."""


class JobError(LoraStudioError):
    """A job cannot be found or changed as asked (unknown id, already finished, nothing to resume)."""


class TrainingCancelled(LoraStudioError):
    """Training stopped on request at a step boundary, after saving a checkpoint it can resume from."""


class TrainingInterrupted(TrainingCancelled):
    """Training stopped to be resumed later (its worker stopping), not because the user cancelled it."""
