"""The eval report's pictures: loss curves from a run's metrics.jsonl, and confusion matrices.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend switch), so
plotting works on a server without a display and leaves a caller's own matplotlib state alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .scoring import LabelScore


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file; an unreadable line ends the list (a run still writing)."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    return rows


def plot_loss_curves(rows: list[dict[str, Any]], dest: Path, marks: dict[str, int] | None = None) -> bool:
    """Training and validation loss against step; `marks` draws labelled vertical lines.

    Returns False (and writes nothing) when the rows hold no loss to draw.
    """
    train = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float))]
    val = sorted(
        {r["step"]: r["val_loss"] for r in rows if isinstance(r.get("val_loss"), (int, float))}.items()
    )
    if not train and not val:
        return False
    fig, ax = _figure(6.4, 3.6)
    if train:
        ax.plot(*zip(*train, strict=True), color="#2563eb", label="training loss")
    if val:
        ax.plot(*zip(*val, strict=True), color="#f97316", marker="o", label="validation loss")
    for label, step in (marks or {}).items():
        ax.axvline(step, color="#dc2626", linestyle="--", linewidth=1)
        ax.annotate(label, (step, 1), xycoords=("data", "axes fraction"), fontsize=8, color="#dc2626",
                    rotation=90, va="top", ha="right")  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Loss during training")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, dest)
    return True


def plot_confusion(scores: dict[str, LabelScore], dest: Path) -> None:
    """One confusion matrix per model side by side (rows: reference label, columns: answer)."""
    fig, axes = _figure(4.2 * len(scores), 4.0, columns=len(scores))
    for ax, (name, s) in zip(axes if len(scores) > 1 else [axes], scores.items(), strict=True):
        ax.imshow(s.confusion, cmap="Blues")
        ax.set_xticks(range(len(s.columns)), s.columns, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(s.labels)), s.labels, fontsize=8)
        peak = max(max(row) for row in s.confusion) or 1
        for i, row in enumerate(s.confusion):
            for j, count in enumerate(row):
                color = "white" if count > peak / 2 else "black"
                ax.text(j, i, str(count), ha="center", va="center", color=color, fontsize=9)
        ax.set_xlabel("answer")
        ax.set_ylabel("reference")
        ax.set_title(f"{name}: accuracy {s.accuracy:.0%}")
    _save(fig, dest)


def _figure(width: float, height: float, columns: int = 1) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    axes = fig.subplots(1, columns)
    return fig, axes


def _save(fig: Any, dest: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(dest, format="png")
