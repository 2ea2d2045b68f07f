"""Reading a run folder back after a crash: which checkpoints are whole, which metrics rows are.

A process killed while it writes leaves a checkpoint folder without its last files, or half a
line at the end of `metrics.jsonl`. These functions tell the whole from the broken, so a resumed
run continues from what is complete. No heavy imports: the job store uses them too.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
METRICS_FILE = "metrics.jsonl"
# The Trainer writes this last into a checkpoint (after weights, optimizer, scheduler and RNG
# state), so a checkpoint whose trainer_state.json parses was written whole.
_LAST_WRITTEN = "trainer_state.json"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """Every checkpoint folder of a run, whole or not, oldest step first."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _CHECKPOINT_NAME.match(p.name) and p.is_dir()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(checkpoint: str | Path) -> int:
    return int(_CHECKPOINT_NAME.match(Path(checkpoint).name).group(1))


def is_complete(checkpoint: Path) -> bool:
    try:
        json.loads((checkpoint / _LAST_WRITTEN).read_text())
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that was written whole, or None."""
    whole = [p for p in checkpoint_folders(run_dir) if is_complete(p)]
    return whole[-1] if whole else None


def remove_incomplete_checkpoints(run_dir: Path) -> list[Path]:
    """Delete checkpoint folders a crash left half-written (or half-deleted); returns them."""
    broken = [p for p in checkpoint_folders(run_dir) if not is_complete(p)]
    for path in broken:
        log.warning("removing %s: a crash left it incomplete", path)
        shutil.rmtree(path, ignore_errors=True)
    return broken


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a line cut short by a crash (or otherwise broken) is skipped."""
    rows, broken = [], 0
    if not Path(path).is_file():
        return rows
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        elif line.strip():
            broken += 1
    if broken:
        log.warning("%s: skipped %d incomplete line(s) (a crash cut the last write short)", path, broken)
    return rows
