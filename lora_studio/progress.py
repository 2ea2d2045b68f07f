"""The console while a run trains: one progress bar, a line per validation, and a closing summary.

    display = ProgressDisplay()                      # a TrainerCallback; writes to stderr
    result = train(recipe, callbacks=[display])      # training.build_trainer then mutes the Trainer's own output
    print("\n".join(display.summary(result)))        # best val loss, the adapter, the next command

or all three in one call, as `lora-studio train` and `make demo` do: `train_on_console(recipe)`.

On a terminal the bar redraws in place: step/total, ETA, loss, val loss and tokens/s. Anywhere
else (a pipe, a job's log file) the same facts come as one plain line per logged step, with no
carriage returns. Only the main process draws (several under `accelerate launch`).
"""

from __future__ import annotations

import contextlib
import shlex
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from transformers import TrainerCallback

from .tasks.registry import TASKS

if TYPE_CHECKING:
    from .config import Recipe
    from .training import RunResult


class ProgressDisplay(TrainerCallback):
    """Draws training progress for a person watching (see the module doc)."""

    owns_console = True  # build_trainer turns the Trainer's bars and printed dicts off for this run

    def __init__(self, stream: TextIO | None = None, interactive: bool | None = None):
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.loss: float | None = None
        self.val_loss: float | None = None
        self.best_val_loss: float | None = None
        self.tokens_per_second: float | None = None
        self._bar: Any = None
        self._ended = False  # the final evaluation after training is the summary's, not a new line
        self._exit = contextlib.ExitStack()
        self._started = (time.time(), 0)  # (time, step) when training (or its resumption) began
        self._last = (time.time(), 0)  # (time, tokens seen) at the last loss log

    # --- Trainer events -------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if not state.is_world_process_zero:
            return
        self._started = (time.time(), state.global_step)
        self._last = (time.time(), state.num_input_tokens_seen)
        if self.interactive:
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = tqdm(
                total=state.max_steps, initial=state.global_step, file=self.stream, unit="step", leave=True
            )
            self._exit.enter_context(logging_redirect_tqdm())  # log lines print above the bar, not through it

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self._bar is not None:
            self._bar.update(state.global_step - self._bar.n)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any
    ) -> None:
        if not state.is_world_process_zero or not logs or self._ended:
            return
        if "loss" in logs:
            self.loss = float(logs["loss"])
            now, seen = time.time(), state.num_input_tokens_seen
            self.tokens_per_second = (seen - self._last[1]) / max(now - self._last[0], 1e-9)
            self._last = (now, seen)
            if self._bar is None:
                self._write(self.step_line(state))
        if "eval_loss" in logs:
            self._validated(state, float(logs["eval_loss"]))
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=True)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._ended = True
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._exit.close()

    # --- lines ----------------------------------------------------------------------------------
    def step_line(self, state: Any) -> str:
        """The plain (non-terminal) progress line: step/total, ETA, loss, val loss, tokens/s."""
        done, total = state.global_step, state.max_steps
        steps = done - self._started[1]  # this session's steps: a resumed run skipped the others
        eta = (time.time() - self._started[0]) / steps * (total - done) if steps > 0 else None
        return f"step {done}/{total}  eta {_duration(eta)}  {self._postfix()}"

    def summary(self, result: Any, task: str = "chat") -> list[str]:
        """The closing lines: how it went, where the adapter is, and what to try next."""
        metrics = result.metrics
        lines = [
            f"trained {metrics.get('global_step')} steps in {_duration(metrics.get('train_runtime_s'))}"
            + (f", {metrics['tokens_per_second']:.0f} tokens/s" if metrics.get("tokens_per_second") else "")
        ]
        best = metrics.get(
            "best_val_loss", metrics.get("val_loss")
        )  # a classifier's metrics hold its best model's val_loss
        if best is not None:
            base = metrics.get("base_val_loss")
            checkpoint = metrics.get("best_checkpoint")
            lines.append(
                f"best val loss {best:.4f}"
                + (f" (base model: {base:.4f})" if base is not None else "")
                + (f" at {checkpoint}" if checkpoint else "")
            )
        lines.append(f"adapter: {result.adapter_dir}")
        adapter = shlex.quote(str(result.adapter_dir))
        lines.append(TASKS[task].try_it(adapter))
        return lines

    def _validated(self, state: Any, val_loss: float) -> None:
        self.val_loss = val_loss
        if state.global_step == 0:
            self._write(f"step 0/{state.max_steps}  val loss {val_loss:.4f} (the base, before training)")
            return
        improved = self.best_val_loss is None or val_loss < self.best_val_loss
        self.best_val_loss = val_loss if improved else self.best_val_loss
        mark = "  best so far" if improved else f"  (best {self.best_val_loss:.4f})"
        self._write(f"step {state.global_step}/{state.max_steps}  val loss {val_loss:.4f}{mark}")

    def _postfix(self) -> str:
        parts = [
            f"loss {_number(self.loss)}",
            f"val loss {_number(self.val_loss)}",
            f"{self.tokens_per_second:.0f} tok/s" if self.tokens_per_second is not None else "- tok/s",
            f"{_threads()} threads",  # the share of the cores in use (thread_tuning.py)
        ]
        return "  ".join(parts)

    def _write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)


def train_on_console(recipe: Recipe, *, resume: bool = False) -> RunResult:
    """Train with the display as the console's one bar, then print the summary; the RunResult.

    The console a person sees from `lora-studio train` and from the demo: weight loading and
    saving bars are turned off too, so the display's bar is the only one.
    """
    from transformers.utils import logging as hf_logging

    from .training import train

    hf_logging.disable_progress_bar()
    display = ProgressDisplay()
    result = train(recipe, resume=resume, callbacks=[display])
    print("\n".join(display.summary(result, recipe.task)))
    return result


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
