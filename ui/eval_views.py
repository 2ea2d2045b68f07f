"""How evaluation results look in the page: the run's warnings banner and the eval table.

Pure functions of library results; the tabs call them.
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from lora_studio.evaluation.overfit import warning_lines
from lora_studio.evaluation.report import EvalReport, table_rows

BANNER_STYLE = "background:#fef3c7;color:#78350f;border:1px solid #f59e0b;border-radius:6px;padding:6px 10px;margin:6px 0"


def warnings_banner(run_dir: str | Path | None) -> str:
    """A banner with the run's alarms (overfitting, ...) from its status.json; empty when none."""
    lines = warning_lines(run_dir) if run_dir else []
    if not lines:
        return ""
    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    return (
        f'<div class="ls-warning" role="alert" style="{BANNER_STYLE}"><b>⚠️ Warning</b><ul>{items}</ul></div>'
    )


def eval_frame(report: EvalReport) -> pd.DataFrame:
    """The eval table (one column per model) as the page shows it."""
    rows = table_rows(report.sides)
    return pd.DataFrame([[label.strip(), *cells] for label, cells in rows], columns=["", *report.sides])
