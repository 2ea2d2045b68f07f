"""What every tab shares: turning library errors into page errors, choices for pickers, hints.

The UI's rule for errors: a `LoraStudioError` is the user's to fix, so its message is shown as
is; anything else is a bug, so the page gets one line naming it and the server log gets the
traceback. A Python traceback never reaches the page.
"""

from __future__ import annotations

import functools
import html
import inspect
import logging
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from lora_studio.config import DEFAULT_BASE_MODEL, field_help
from lora_studio.errors import LoraStudioError

log = logging.getLogger("lora_studio.ui")
REPO_ROOT = Path(__file__).resolve().parents[1]
HELP = field_help()


def page_error(e: BaseException) -> gr.Error:
    """The gr.Error that shows `e` in the page (gradio renders its message as HTML: escape it)."""
    if isinstance(e, LoraStudioError):
        return gr.Error(html.escape(str(e)).replace("\n", "<br>"), duration=None, print_exception=False)
    log.exception("unexpected error in the UI")
    return gr.Error(
        html.escape(f"Unexpected {type(e).__name__}: {e} (details are in the server log)"),
        duration=None,
        print_exception=False,
    )


def shows_errors(fn: Callable) -> Callable:
    """Wrap a handler (plain or generator) so every exception becomes a readable page error."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as e:
                raise page_error(e) from None

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as e:
            raise page_error(e) from None

    return wrapper


def literal_choices(tp: Any) -> list[str]:
    """The choices of a config `Literal` type, for a dropdown."""
    return list(typing.get_args(tp))


def base_model_choices() -> list[str]:
    """The built-in default and models cached locally; a hub id or folder can also be typed."""
    from lora_studio.models import list_models

    names = [DEFAULT_BASE_MODEL]
    try:
        names += [row["name"] for row in list_models() if row["kind"] != "built-in"]
    except LoraStudioError:  # a broken cache must not break the page
        log.warning("could not list cached models", exc_info=True)
    return list(dict.fromkeys(names))


def bundled_datasets() -> list[Path]:
    """Example data files shipped in the repository's examples/ folder (absent in a wheel install)."""
    from lora_studio.data import SUFFIXES

    folder = REPO_ROOT / "examples"
    return sorted(p for p in folder.glob("*/*") if p.suffix in SUFFIXES) if folder.is_dir() else []


def dataset_choices() -> list[tuple[str, str]]:
    """(label, path) pairs for dataset pickers: uploads first (newest first), then bundled examples."""
    from .uploads import list_uploads

    rows = [(f"upload: {p.name}", str(p)) for p in list_uploads()]
    rows += [(f"example: {p.parent.name}/{p.name}", str(p)) for p in bundled_datasets()]
    return rows


@dataclass(frozen=True)
class TrainedAdapter:
    folder: Path
    label: str  # what pickers show: run name, job id, when
    base_model: str
    job_id: str | None
    metadata: dict[str, Any]


def trained_adapters() -> list[TrainedAdapter]:
    """Finished adapters, newest first: those of succeeded jobs, then any under ./runs (CLI runs)."""
    from lora_studio.adapters import read_metadata
    from lora_studio.jobs import JobStore

    found: dict[Path, TrainedAdapter] = {}
    candidates = [
        (j.adapter_dir, j.name, j.id) for j in JobStore().list(states=["succeeded"]) if j.adapter_dir
    ]
    candidates += [(p, p.parent.name, None) for p in sorted(Path("runs").glob("*/adapter"))]
    for folder, name, job_id in candidates:
        folder = Path(folder).resolve()
        if folder in found:
            continue
        try:
            meta = read_metadata(folder)
        except LoraStudioError:  # deleted or incomplete: not offered
            continue
        when = str(meta.get("created_at", ""))[:16].replace("T", " ")
        label = f"{name} ({job_id}, {when})" if job_id else f"{name} (runs/{folder.parent.name}, {when})"
        found[folder] = TrainedAdapter(folder, label, str(meta.get("base_model", "?")), job_id, meta)
    return sorted(found.values(), key=lambda a: str(a.metadata.get("created_at", "")), reverse=True)


def hint(name: str) -> str:
    """The one-line help of a recipe field, as the config module wrote it."""
    return HELP[name]
