"""What every tab shares: turning library errors into page errors, choices for pickers, hints.

The UI's rule for errors: a `LoraStudioError` is the user's to fix, so its message is shown as
is; anything else is a bug, so the page gets one line naming it and the server log gets the
traceback. A Python traceback never reaches the page.

The rule for typed paths: bound to this machine (loopback), the UI reads any path its user types,
as the CLI does. Reachable from other machines, it reads data and model files only from uploads,
the bundled examples and the studio folder (LORA_STUDIO_HOME), so a visitor cannot make it read
other files of the machine.
"""

from __future__ import annotations

import functools
import html
import inspect
import ipaddress
import logging
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from lora_studio.config import DEFAULT_BASE_MODEL, field_help
from lora_studio.errors import DataError, LoraStudioError, ModelError
from lora_studio.home import studio_home

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


def say_skipped(problems: list[str]) -> None:
    """Tell the page (a warning toast; outside an event, a Python warning) what a list left out."""
    if problems:
        log.warning("not listed: %s", "; ".join(problems))
        gr.Warning("<br>".join(html.escape(f"Not listed: {p}") for p in problems))


# --- typed paths -----------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """Whether a bind address serves this machine only."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def readable_roots() -> list[Path]:
    """Where a UI reachable from other machines reads typed paths: uploads and all the studio's
    own files (LORA_STUDIO_HOME), and the bundled examples."""
    return [studio_home().resolve(), (REPO_ROOT / "examples").resolve()]


def check_data_path(path: str, public: bool) -> None:
    """Refuse, on a public UI, a typed dataset path outside `readable_roots`; never reads it."""
    if public and not _inside_roots(path):
        raise DataError(f"the dataset {path!r} is {_OUTSIDE}; upload the file or pick one from the list")


def check_model_path(name: str, public: bool) -> None:
    """Refuse, on a public UI, a base model given as a local path outside `readable_roots`.

    Built-in names and hub ids pass; a name counts as local exactly when `resolve_base` would
    read it from disk (a .gguf, a path-like name, or an existing folder).
    """
    from lora_studio.models import BUILTIN_MODELS

    if not public or name in BUILTIN_MODELS:
        return
    path = Path(name).expanduser()
    local = path.suffix == ".gguf" or name.startswith((".", "/", "~")) or path.exists()
    if local and not _inside_roots(name):
        raise ModelError(f"the base model {name!r} is {_OUTSIDE}; use a listed model or a hub id")


_OUTSIDE = (
    "outside the folders this UI reads (uploads, bundled examples, the studio folder): "
    "it is reachable from other machines"
)


def _inside_roots(path: str) -> bool:
    resolved = Path(path).expanduser().resolve()  # symlinks and '..' followed before the check
    return any(resolved.is_relative_to(root) for root in readable_roots())


def literal_choices(tp: Any) -> list[str]:
    """The choices of a config `Literal` type, for a dropdown."""
    return list(typing.get_args(tp))


def base_model_choices() -> list[str]:
    """The built-in default and models cached locally; a hub id or folder can also be typed."""
    from lora_studio.models import list_models

    names = [DEFAULT_BASE_MODEL]
    try:
        names += [row["name"] for row in list_models() if row["kind"] != "built-in"]
    except LoraStudioError as e:  # a broken cache must not break the page
        say_skipped([f"the cached models ({e})"])
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
    label: str  # what pickers show: run name, run id (a job's id), when
    base_model: str
    run_id: str
    metadata: dict[str, Any]


def trained_adapters(task: str | None = None, *, writes_text: bool | None = None) -> list[TrainedAdapter]:
    """Finished adapters, newest first: every succeeded run in the run index, wherever its folder is
    (a CLI run from any folder, `accelerate launch`, a job, this UI). `task` keeps one task's
    adapters; `writes_text` those that can (or cannot) chat.

    A damaged adapter (missing or broken files) is left out and named in a warning; the rest are
    still listed. A deleted adapter is left out quietly.
    """
    from lora_studio import runs
    from lora_studio.adapters import read_metadata
    from lora_studio.tasks.kinds import generates_text, task_name

    found: dict[Path, TrainedAdapter] = {}
    skipped: list[str] = []
    for run in runs.list_runs():
        folder = (run.folder / runs.ADAPTER).resolve()
        if run.state != "succeeded" or folder in found:
            continue
        try:
            meta = read_metadata(folder)
        except LoraStudioError as e:
            if folder.exists():
                skipped.append(f"a damaged adapter ({e})")
            continue
        if (task and task_name(meta) != task) or writes_text not in (None, generates_text(meta)):
            continue
        when = str(meta.get("created_at", ""))[:16].replace("T", " ")
        label = f"{run.name} ({run.id}, {when})"
        found[folder] = TrainedAdapter(folder, label, str(meta.get("base_model", "?")), run.id, meta)
    say_skipped(skipped)
    return sorted(found.values(), key=lambda a: str(a.metadata.get("created_at", "")), reverse=True)


def hint(name: str) -> str:
    """The one-line help of a recipe field, as the config module wrote it."""
    return HELP[name]
