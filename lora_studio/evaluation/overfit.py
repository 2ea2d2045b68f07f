"""The overfitting alarm: validation loss rising while training loss keeps falling.

A small dataset trained for many epochs is learned by heart: training loss keeps falling while
the loss on held-out rows turns and rises. When validation loss has risen at RISES consecutive
validations and training loss fell over the same stretch, the run says so once: in its log,
in `status.json` (`warnings`), and from there in `jobs show`, the UI's Train tab and the eval
report. Early stopping and load-best-at-end already keep the best checkpoint; the alarm tells
the person why their run stopped improving and which checkpoint they got.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import runs

log = logging.getLogger(__name__)

RISES = 2  # consecutive validations with a higher loss than the one before
MIN_RISE = 0.01  # ...adding up to at least 1% of the loss: smaller wiggles are noise
Point = tuple[int, float]  # (step, loss)


@dataclass(frozen=True)
class OverfitAlarm:
    """Where overfitting began, when it was seen, and the checkpoint kept."""

    started_step: int  # the last validation before the rise (the lowest loss of the stretch)
    detected_step: int
    val_losses: list[float]  # from started_step to detected_step
    train_loss_before: float  # mean training loss logged up to started_step's interval
    train_loss_after: float  # mean training loss logged in the last interval
    best_step: int  # the lowest validation loss so far
    best_val_loss: float
    best_checkpoint: str | None = None  # its folder name, when one was saved

    @property
    def message(self) -> str:
        kept = (
            f"the best checkpoint kept is {self.best_checkpoint} (validation loss {self.best_val_loss:.4f}), "
            "and the final adapter is that one"
            if self.best_checkpoint
            else f"the best validation loss was at step {self.best_step} ({self.best_val_loss:.4f}), "
            "before any checkpoint"
        )
        rise = " -> ".join(f"{v:.4f}" for v in self.val_losses)
        return (
            f"overfitting from step {self.started_step}: validation loss rose {len(self.val_losses) - 1} "
            f"times in a row ({rise}, by step {self.detected_step}) while training loss fell "
            f"({self.train_loss_before:.4f} -> {self.train_loss_after:.4f}); {kept}. "
            "Fewer epochs, more (or deduplicated) data or a lower learning rate would help"
        )

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "overfitting", "message": self.message, **asdict(self)}


def detect_overfitting(
    train: Sequence[Point], val: Sequence[Point], rises: int = RISES
) -> OverfitAlarm | None:
    """The first stretch where validation loss rose `rises` times in a row while training loss fell.

    The rises must add up to MIN_RISE of the loss where the stretch starts.
    Training loss is noisy from batch to batch, so it is compared as the mean of the losses
    logged between validations: the last interval of the stretch against the one that ended
    at its start (or, when the stretch starts at step 0, the first interval after it).
    """
    val = _unique_steps(val)
    for end in range(rises, len(val)):
        start = end - rises
        if not all(val[k][1] > val[k - 1][1] for k in range(start + 1, end + 1)):
            continue
        if val[end][1] - val[start][1] < MIN_RISE * abs(val[start][1]):
            continue
        before = _between(train, val[start - 1][0] if start else -1, val[start][0])
        if not before:  # nothing trained before the stretch began: use its first interval
            before = _between(train, val[start][0], val[start + 1][0])
        after = _between(train, val[end - 1][0], val[end][0])
        if not before or not after or _mean(after) >= _mean(before):
            continue
        best_step, best_loss = min(val[: end + 1], key=lambda p: p[1])
        return OverfitAlarm(
            started_step=val[start][0],
            detected_step=val[end][0],
            val_losses=[v for _, v in val[start : end + 1]],
            train_loss_before=_mean(before),
            train_loss_after=_mean(after),
            best_step=best_step,
            best_val_loss=best_loss,
        )
    return None


def _unique_steps(points: Sequence[Point]) -> list[Point]:
    """One point per step (the first): the final evaluation repeats the last step's."""
    seen: dict[int, float] = {}
    for step, loss in points:
        seen.setdefault(step, loss)
    return sorted(seen.items())


def _between(points: Sequence[Point], after: int, upto: int) -> list[float]:
    return [loss for step, loss in points if after < step <= upto]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


# --- during training ---------------------------------------------------------------------------
class OverfitWatch:
    """Checks the Trainer's log after every validation; raises the alarm once per run."""

    def __init__(self, run_dir: Path, rises: int = RISES):
        self.run_dir = Path(run_dir)
        self.rises = rises
        self.raised = False

    def begin(self, state: Any) -> None:
        self.raised = bool(state.global_step) and bool(run_warnings(self.run_dir))
        if not state.global_step and state.is_world_process_zero:
            set_run_warning(self.run_dir, "overfitting", None)  # a fresh run: no old alarm

    def check(self, state: Any) -> OverfitAlarm | None:
        if self.raised or not state.is_world_process_zero:
            return None
        train = [(h["step"], h["loss"]) for h in state.log_history if "loss" in h]
        val = [(h["step"], h["eval_loss"]) for h in state.log_history if "eval_loss" in h]
        alarm = detect_overfitting(train, val, self.rises)
        if alarm is None:
            return None
        best = state.best_model_checkpoint
        if best and Path(best).name == f"checkpoint-{alarm.best_step}":
            alarm = dataclasses.replace(alarm, best_checkpoint=Path(best).name)
        self.raised = True
        log.warning("%s", alarm.message)
        set_run_warning(self.run_dir, "overfitting", alarm.to_dict())
        return alarm


def overfit_callback(run_dir: Path, rises: int = RISES) -> Any:
    """The TrainerCallback around OverfitWatch (built here, so importing this module stays light)."""
    from transformers import TrainerCallback

    class OverfitCallback(TrainerCallback):
        def __init__(self) -> None:
            self.watch = OverfitWatch(run_dir, rises)

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.watch.begin(state)

        def on_evaluate(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.watch.check(state)

    return OverfitCallback()


# --- the run folder's status.json --------------------------------------------------------------
def run_warnings(run_dir: str | Path) -> list[dict[str, Any]]:
    """The warnings recorded in a run folder's status.json (empty when none or no file)."""
    return list(runs.read_status(Path(run_dir)).get("warnings") or [])


def warning_lines(run_dir: str | Path) -> list[str]:
    return [w.get("message", str(w)) for w in run_warnings(run_dir)]


def set_run_warning(run_dir: Path, kind: str, warning: dict[str, Any] | None) -> None:
    """Replace the warning of this kind in status.json (None removes it)."""
    status = runs.read_status(Path(run_dir))
    if not status:
        return
    kept = [w for w in status.get("warnings") or [] if w.get("kind") != kind]
    runs.write_status(Path(run_dir), warnings=kept + ([warning] if warning else []))
