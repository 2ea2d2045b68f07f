"""The Adapters tab: every trained adapter with its base, recipe, data and final metrics; evaluation; downloads.

"Evaluate" runs `lora-studio eval` on a test file (the same library call): the base and the
adapter answer the same prompts, the table and the plots appear here and the report is written
beside the adapter.

A download is the adapter folder zipped, or the adapter merged into its base (a standalone
transformers model, checked against the unmerged adapter's logits) and zipped. Archives are
written under the studio's exports folder, the only folder the app serves files from.
"""

from __future__ import annotations

import functools
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
import yaml

from lora_studio.downloads import adapter_archive, merged_archive
from lora_studio.evaluation.report import EvalOptions, run_eval

from .common import TrainedAdapter, check_data_path, dataset_choices, shows_errors, trained_adapters
from .eval_views import eval_frame, warnings_banner

COLUMNS = [
    "adapter",
    "base model",
    "created",
    "rank",
    "layers",
    "data",
    "rows",
    "steps",
    "train loss",
    "val loss",
]


@dataclass
class AdaptersTab:
    adapter: gr.Dropdown
    table: gr.Dataframe


# --- handlers -----------------------------------------------------------------------------------
def adapters_table(adapters: list[TrainedAdapter]) -> pd.DataFrame:
    rows = []
    for a in adapters:
        recipe, metrics = a.metadata.get("recipe") or {}, a.metadata.get("metrics") or {}
        report = a.metadata.get("data_report") or {}
        rows.append(
            [
                a.label,
                _short(a.base_model),
                str(a.metadata.get("created_at", ""))[:16].replace("T", " "),
                (recipe.get("lora") or {}).get("r", ""),
                (recipe.get("lora") or {}).get("layers") or "all",
                Path((recipe.get("data") or {}).get("train_file", "")).name,
                f"{report.get('train_rows', '?')} + {report.get('val_rows', '?')}",
                metrics.get("global_step", ""),
                _num(metrics.get("train_loss")),
                _num(metrics.get("val_loss")),
            ]
        )
    return pd.DataFrame(rows, columns=COLUMNS)


def refresh(current: str | None = None) -> tuple[gr.Dropdown, pd.DataFrame]:
    """The adapter list again, keeping the current pick while it exists (else the newest)."""
    adapters = trained_adapters()
    choices = [(a.label, str(a.folder)) for a in adapters]
    values = [value for _, value in choices]
    pick = current if current in values else (values[0] if values else None)
    return gr.Dropdown(choices=choices, value=pick), adapters_table(adapters)


def describe(folder: str | None) -> tuple[str, str]:
    """(markdown summary, recipe YAML) of one adapter."""
    if not folder:
        return "No adapter yet: train one on the Train tab.", ""
    adapter = _find(folder)
    meta = adapter.metadata
    lines = [
        f"**{html.escape(adapter.label)}**",
        f"- folder: `{adapter.folder}`",
        f"- base model: `{adapter.base_model}` (weights hash `{str(meta.get('base_model_hash', ''))[:12]}`)",
    ]
    lines += [
        f"- {k.replace('_', ' ')}: {_num(v) if isinstance(v, float) else v}"
        for k, v in (meta.get("metrics") or {}).items()
    ]
    report = meta.get("data_report") or {}
    if report:
        lines.append(
            f"- data: {report.get('format')} format, {report.get('train_rows')} training / "
            f"{report.get('val_rows')} validation rows, data hash `{str(meta.get('data_fingerprint'))[:12]}`"
        )
        lines += [f"- ⚠️ {w}" for w in report.get("warnings", [])]
    lines.append(f"- versions: {', '.join(f'{k} {v}' for k, v in (meta.get('versions') or {}).items())}")
    return "\n".join(lines), yaml.safe_dump(meta.get("recipe") or {}, sort_keys=False)


def download_adapter(folder: str | None) -> tuple[str, str]:
    """(zip path for the download box, note)."""
    path = adapter_archive(_find(folder).folder)
    return str(path), f"Adapter archive ready: {path.name} ({path.stat().st_size / 1e6:.1f} MB)."


def download_merged(folder: str | None) -> tuple[str, str]:
    path, report = merged_archive(_find(folder).folder)
    note = "\n".join(f"- {line}" for line in report)
    return str(path), f"Merged model archive ready: {path.name} ({path.stat().st_size / 1e6:.1f} MB)\n{note}"


def evaluate(
    folder: str | None,
    test_file: str | None,
    limit: float | None,
    with_base: bool,
    forgetting: bool = False,
    public: bool = False,
) -> tuple:
    """(table, summary markdown, loss curves image, confusion matrix image) of an adapter on a test file.

    `public`: the UI is reachable from other machines, so typed paths are limited (common.py).
    """
    from PIL import Image

    adapter = _find(folder)
    if not (test_file or "").strip():
        raise gr.Error("Pick a test file first: rows the adapter never saw in training.")
    check_data_path(test_file.strip(), public)
    report = run_eval(
        EvalOptions(
            str(adapter.folder),
            test_file.strip(),
            with_base=bool(with_base),
            limit=int(limit) if limit else None,
            forgetting=bool(forgetting),
        )
    )
    gain = report.gain()
    headline = next(iter(report.sides.values())).score.headline_name
    lines = [f"Metric: **{report.comparison.metric}** ({headline})."]
    if gain is not None:
        lines.append(f"Adapter gain over base: **{gain:+.1%}** {headline}.")
    if report.forgetting is not None:
        lines += [
            "**General ability (forgetting)**",
            "\n".join(report.forgetting.markdown()),
            report.trade_off(),
        ]
    lines.append(f"Report and per-example answers: `{report.out_dir}`")
    summary = "\n\n".join(lines) + warnings_banner(report.run_dir)
    images = [
        Image.open(report.files[k]) if k in report.files else None for k in ("loss_curves", "confusion")
    ]
    return eval_frame(report), summary, *images


def _find(folder: str | None) -> TrainedAdapter:
    """Only adapters the studio lists may be packed: a typed-in path is never read or served."""
    if not folder:
        raise gr.Error("Pick an adapter first.")
    for a in trained_adapters():
        if str(a.folder) == str(Path(folder).resolve()):
            return a
    raise gr.Error("That adapter is no longer listed (deleted or moved); refresh the list.")


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""


def _short(name: str) -> str:
    return Path(name).name if "/" in name and Path(name).exists() else name


# --- layout ---------------------------------------------------------------------------------------
def build(public: bool = False) -> AdaptersTab:
    table = gr.Dataframe(
        adapters_table([]),
        label="Trained adapters (newest first)",
        interactive=False,
        elem_id="adapters-table",
    )
    with gr.Row():
        adapter = gr.Dropdown(
            # Choices are filled per page; every handler checks the value against the listed adapters.
            label="Adapter",
            choices=[],
            value=None,
            allow_custom_value=True,
            scale=4,
            elem_id="adapters-pick",
        )
        reload = gr.Button("Refresh", scale=1)
    with gr.Row():
        with gr.Column(scale=3):
            summary = gr.Markdown(elem_id="adapters-summary")
            recipe = gr.Code(label="Recipe it was trained with", language="yaml", interactive=False)
        with gr.Column(scale=2):
            get_adapter = gr.Button("Download the adapter (.zip)", elem_id="adapters-download")
            get_merged = gr.Button(
                "Merge into a standalone model and download (.zip)",
                variant="primary",
                elem_id="adapters-merge",
            )
            gr.Markdown(
                "The adapter alone is small and needs its base model; the merged model runs "
                "anywhere transformers runs, without PEFT."
            )
            archive = gr.File(label="Download", interactive=False, elem_id="adapters-file")
            note = gr.Markdown(elem_id="adapters-note")
    with gr.Accordion("Evaluate on a test file", open=False):
        with gr.Row():
            test_file = gr.Dropdown(
                label="Test file (rows never used in training)",
                choices=dataset_choices(),
                value=None,
                allow_custom_value=True,
                scale=4,
                elem_id="adapters-eval-data",
            )
            limit = gr.Number(label="First N rows (empty: all)", value=50, precision=0, minimum=1, scale=1)
            with_base = gr.Checkbox(label="Also score the base", value=True, scale=1)
            forgetting = gr.Checkbox(label="Check forgetting (general probes)", value=False, scale=1)
        run = gr.Button("Evaluate", variant="primary", elem_id="adapters-evaluate")
        scores = gr.Dataframe(label="Base vs adapter", interactive=False, elem_id="adapters-eval-table")
        verdict = gr.Markdown(elem_id="adapters-eval-summary")
        with gr.Row():
            curves = gr.Image(label="Loss curves", type="pil", interactive=False)
            confusion = gr.Image(label="Confusion matrices", type="pil", interactive=False)

    reload.click(shows_errors(refresh), inputs=adapter, outputs=[adapter, table], api_visibility="private")
    adapter.change(
        shows_errors(describe), inputs=adapter, outputs=[summary, recipe], api_name="describe_adapter"
    )
    get_adapter.click(
        shows_errors(download_adapter), inputs=adapter, outputs=[archive, note], api_name="download_adapter"
    )
    get_merged.click(
        shows_errors(download_merged), inputs=adapter, outputs=[archive, note], api_name="download_merged"
    )
    run.click(
        shows_errors(functools.partial(evaluate, public=public)),
        inputs=[adapter, test_file, limit, with_base, forgetting],
        outputs=[scores, verdict, curves, confusion],
        api_name="evaluate_adapter",
    )
    return AdaptersTab(adapter=adapter, table=table)
