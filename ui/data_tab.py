"""The Data tab: upload a file or pick an example, and see it as training will.

It shows the detected format, row counts and warnings from `data.check_file`, the first examples
rendered with the base model's chat template (what the model learns to write is highlighted),
and any problem with the line it is on.
"""

from __future__ import annotations

import functools
import html
import math
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from lora_studio.config import DEFAULT_BASE_MODEL, DataFormat, DataSettings
from lora_studio.data import SUFFIXES, FileCheck, check_file, check_options
from lora_studio.errors import DataError, LoraStudioError

from .common import (
    base_model_choices,
    check_data_path,
    check_model_path,
    dataset_choices,
    hint,
    literal_choices,
    shows_errors,
)
from .uploads import store_upload

SAMPLES = 3


@dataclass
class DataTab:
    dataset: gr.Dropdown  # the chosen file: the Train tab follows it


# --- handlers (plain functions: the tests call them directly) -----------------------------------
@functools.lru_cache(maxsize=4)
def _tokenizer(base_model: str):
    from lora_studio.models import load_tokenizer, resolve_base

    return load_tokenizer(resolve_base(base_model).folder)


def check_dataset(
    path: str | None, base_model: str, fmt: str, max_length: float | None, public: bool = False
) -> tuple[str, str]:
    """(summary markdown, rendered examples html) for one data file; problems go in the summary.

    `public`: the UI is reachable from other machines, so typed paths are limited (common.py).
    """
    if not path:
        return "Upload a data file or pick one above.", ""
    base_model = base_model or DEFAULT_BASE_MODEL
    try:
        if max_length is None or not math.isfinite(max_length):
            raise DataError(f"max_length: expected a whole number of tokens, got {max_length}")
        check_options(fmt, int(max_length))
        check_data_path(path, public)
        check_model_path(base_model, public)
        checked = check_file(path, _tokenizer(base_model), fmt, int(max_length), samples=SAMPLES)
    except LoraStudioError as e:
        return _problem(str(e)), ""
    return summary_markdown(checked), samples_html(checked)


def upload_dataset(payload: dict | None, max_bytes: int) -> str | None:
    """Store an upload safely; returns the stored path. A bad upload becomes a page error.

    The event runs with preprocess=False so the name the client sent (`orig_name`) is seen as
    sent: gradio would otherwise have already cut it to a base name, hiding a traversal attempt.
    """
    if not payload:
        return None
    src = received_file(payload)
    return str(store_upload(src, payload.get("orig_name") or src.name, max_bytes=max_bytes))


def refresh_datasets(current: str | None) -> gr.Dropdown:
    return gr.Dropdown(choices=dataset_choices(), value=current)


def received_file(payload: dict) -> Path:
    """The server-side path of an upload; only files inside gradio's upload folder are accepted."""
    from gradio.utils import get_upload_folder

    folder = Path(get_upload_folder()).resolve()
    path = Path(str(payload.get("path") or "")).resolve()
    if not path.is_relative_to(folder) or not path.is_file():
        raise DataError("the upload did not arrive: upload the file again from the page")
    return path


def summary_markdown(checked: FileCheck) -> str:
    r = checked.report
    lines = [
        f"**{Path(checked.path).name}**: format **{r.format}**, **{r.train_rows}** training rows, "
        f"**{r.val_rows}** validation rows (held out at training time)"
    ]
    lines += [f"- {line}" for line in r.lines()[2:] if not line.startswith("warning:")]
    lines += [f"- ⚠️ {_md(w)}" for w in r.warnings]
    return "\n".join(lines)


def samples_html(checked: FileCheck) -> str:
    """The rendered examples; the highlighted spans are the tokens that count in the loss."""
    blocks = []
    for i, segments in enumerate(checked.samples, start=1):
        body = "".join(
            f'<mark class="ls-learn">{html.escape(t)}</mark>' if learn else html.escape(t)
            for t, learn in segments
        )
        blocks.append(
            f'<div class="ls-sample"><div class="ls-sample-title">example {i}</div><pre>{body}</pre></div>'
        )
    legend = '<p class="ls-legend">Highlighted: what the model learns to write. The rest is context.</p>'
    return legend + "".join(blocks)


def _problem(message: str) -> str:
    return "**Problem:** " + _md(message).replace("\n", "  \n")


def _md(text: str) -> str:
    """Text shown inside markdown, literally (file names and tokens like <|im_end|> included)."""
    return html.escape(text, quote=False).replace("*", "\\*").replace("_", "\\_").replace("`", "\\`")


# --- layout ---------------------------------------------------------------------------------------
def build(max_upload_bytes: int, public: bool = False) -> DataTab:
    gr.Markdown(
        "Upload a data file (one row per example) or pick a bundled example, and see it the way "
        f"training will. Accepted: {', '.join(SUFFIXES)}, up to {max_upload_bytes / 2**20:.0f} MB."
    )
    with gr.Row():
        with gr.Column(scale=1):
            upload = gr.File(
                label="Upload a data file", file_types=list(SUFFIXES), type="filepath", elem_id="data-upload"
            )
            dataset = gr.Dropdown(
                label="Dataset",
                choices=dataset_choices(),
                value=None,
                allow_custom_value=True,
                info="An uploaded file or a bundled example"
                + ("." if public else ", or a path on this machine."),
                elem_id="data-dataset",
            )
            base_model = gr.Dropdown(
                label="Base model (its chat template renders the examples)",
                choices=base_model_choices(),
                value=DEFAULT_BASE_MODEL,
                allow_custom_value=True,
                info=hint("base_model"),
                elem_id="data-base-model",
            )
            with gr.Row():
                fmt = gr.Dropdown(
                    label="Format", choices=literal_choices(DataFormat), value="auto", info=hint("format")
                )
                max_length = gr.Number(
                    label="Max length (tokens)",
                    value=DataSettings.max_length,
                    precision=0,
                    minimum=1,
                    info=hint("max_length"),
                )
            check = gr.Button("Check", variant="primary", elem_id="data-check")
        with gr.Column(scale=2):
            summary = gr.Markdown("Upload a data file or pick one.", elem_id="data-summary")
            samples = gr.HTML(elem_id="data-samples")

    @shows_errors
    def on_upload(payload: dict | None) -> str | None:
        return upload_dataset(payload, max_upload_bytes)

    # Handlers answer API clients with plain values; the picker's choices are refreshed after.
    upload.upload(
        on_upload, inputs=upload, outputs=dataset, api_name="upload_dataset", preprocess=False
    ).success(refresh_datasets, inputs=dataset, outputs=dataset, api_visibility="private")
    dataset.focus(refresh_datasets, inputs=dataset, outputs=dataset, api_visibility="private")

    @shows_errors
    def on_check(path: str | None, base_model: str, fmt: str, max_length: float | None) -> tuple[str, str]:
        return check_dataset(path, base_model, fmt, max_length, public=public)

    inputs = [dataset, base_model, fmt, max_length]
    check.click(on_check, inputs=inputs, outputs=[summary, samples], api_name="check_dataset")
    dataset.change(on_check, inputs=inputs, outputs=[summary, samples], api_visibility="private")
    return DataTab(dataset=dataset)
