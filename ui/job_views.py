"""How a training job looks in the page: progress bar with ETA, loss curves, the job table.

Pure functions of `Job` objects and metrics rows from the job store; nothing here reads files.
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

import pandas as pd

from lora_studio.jobs import Job

JOB_COLUMNS = ["job", "name", "state", "progress", "base model", "data", "last loss", "started", "runs on"]


def progress_html(job: Job | None) -> str:
    if job is None:
        return '<div class="ls-status">No job yet: fill in the form and press Start training.</div>'
    done = 1.0 if job.state == "succeeded" else (job.progress or 0.0)
    parts = [f"<b>{html.escape(job.name)}</b> ({job.id}): {job.state}"]
    if job.total_steps:
        parts.append(f"step {job.step}/{job.total_steps}")
    parts.append(f"{done:.0%}")
    if job.state == "running":
        parts.append(f"ETA {_duration(job.eta_seconds)}" if job.eta_seconds is not None else "ETA: measuring")
    elif job.state == "queued":
        parts.append(f"waiting in the queue (position {job.queue_position})")
    for key in ("loss", "val_loss"):
        if isinstance(job.metrics.get(key), (int, float)):
            parts.append(f"{key.replace('_', ' ')} {job.metrics[key]:.4f}")
    lines = [" · ".join(parts)]
    if job.adapter_dir:
        lines.append(f"adapter: <code>{html.escape(str(job.adapter_dir))}</code>")
    if job.error:
        lines.append(f'<span class="ls-error">{html.escape(job.error)}</span>')
    bar = f'<div class="ls-bar"><div class="ls-bar-fill ls-{job.state}" style="width:{done * 100:.1f}%"></div></div>'
    return f'<div class="ls-status" data-state="{job.state}">{bar}' + "<br>".join(lines) + "</div>"


SERIES = {"loss": "training", "val_loss": "validation"}


def loss_frame(rows: list[dict[str, Any]]) -> pd.DataFrame | None:
    """Metrics rows as a long table (step, loss, series) for the line plot; None before any point."""
    points = [
        {"step": r["step"], "loss": float(r[key]), "series": label}
        for r in rows
        for key, label in SERIES.items()
        if isinstance(r.get(key), (int, float))
    ]
    if not points:
        return None  # gradio fixes a plot's scales at its first data: an empty table would break it
    # The plot also fixes its series at the first data, so both are always present: a series with
    # no point yet gets one empty (NaN) point, which is not drawn.
    first = points[0]["step"]
    points += [
        {"step": first, "loss": float("nan"), "series": label}
        for label in SERIES.values()
        if label not in {p["series"] for p in points}
    ]
    # The final validation is logged twice at the last step (evaluation, then the result): one point.
    return pd.DataFrame(points, columns=["step", "loss", "series"]).drop_duplicates(ignore_index=True)


def jobs_table(jobs: list[Job]) -> pd.DataFrame:
    rows = []
    for j in jobs:
        progress = (
            "100%" if j.state == "succeeded" else (f"{j.progress:.0%}" if j.progress is not None else "")
        )
        loss = j.metrics.get("loss", j.metrics.get("train_loss"))
        rows.append(
            [
                j.id,
                j.name,
                j.state,
                progress,
                _short(j.recipe["model"]["base_model"]),
                Path(j.recipe["data"]["train_file"]).name,
                f"{loss:.4f}" if isinstance(loss, (int, float)) else "",
                time.strftime("%Y-%m-%d %H:%M", time.localtime(j.started_at or j.created_at)),
                j.cluster or "this machine",
            ]
        )
    return pd.DataFrame(rows, columns=JOB_COLUMNS)


def _short(name: str) -> str:
    return Path(name).name if "/" in name and Path(name).exists() else name


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m {seconds:02d}s" if minutes < 60 else f"{minutes // 60}h {minutes % 60:02d}m"
