"""Training's compute threads: the studio's share of the cores, and one fewer while that is faster.

    train(recipe, callbacks=[...])    # training.train adds TrainingThreads itself

`TrainingThreads` is a TrainerCallback. It claims the run's share of the cores (threads.py) as
soon as it is made, so loading and caching use it too, re-reads the share every few seconds (a
chat or a second job may start or stop), and writes what it uses to status.json.

Other load on the machine (another user's process, a test run) is not in the studio's claims. It
shows as time the threads spend waiting for a CPU (Linux's per-thread schedstat) or as steps far
slower than this thread count made before (and, before the first step, as more runnable tasks
than free cores: the run then starts with fewer threads). Then the callback tries one thread fewer for a few
steps and keeps whichever count made more tokens per second: beside one busy process on two
cores, two threads wait for each other at every parallel region and one thread is about twice as
fast. While below its share it tries one thread more now and then (less often each time that
loses), so the run takes the cores back when the load goes. An explicit thread count
(`--threads`, $OMP_NUM_THREADS) is never changed.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from . import runs, threads

log = logging.getLogger(__name__)

CHECK_SECONDS = 2.0  # how often the studio's share is read again
WINDOW_STEPS = 4  # steps measured together before deciding anything
TRIAL_STEPS = 4  # steps a trial thread count runs, after one step to settle
BUSY_WAIT = 0.2  # threads waiting for a CPU this share of the time: the machine is busy
SLOWED = 0.6  # a window this far below the best at its thread count: something else is running
RETRY_STEPS = 40  # steps before trying one thread more (doubled each time that loses)


@dataclass
class Window:
    """Clean steps (no evaluation or save inside) measured at one thread count."""

    seconds: float = 0.0
    tokens: int = 0
    steps: int = 0
    waited: float = 0.0  # seconds the process's threads spent runnable but waiting for a CPU

    def add(self, seconds: float, tokens: int, waited: float) -> None:
        self.seconds, self.tokens, self.steps = self.seconds + seconds, self.tokens + tokens, self.steps + 1
        self.waited += waited

    def speed(self) -> float:
        """Tokens per second (steps per second where the trainer counts no tokens)."""
        return (self.tokens or self.steps) / max(self.seconds, 1e-9)

    def wait_share(self, threads: int) -> float:
        return self.waited / max(self.seconds * threads, 1e-9)


@dataclass
class Trial:
    """One thread count tried against the one before it."""

    threads: int
    before: int
    before_speed: float
    settle: int = 1
    window: Window | None = None


class TrainingThreads(TrainerCallback):
    """Holds the run's share of the cores and backs off a thread under outside load (module doc)."""

    def __init__(self, run_dir: Path, fence: Any = None):
        self.run_dir = Path(run_dir)
        self.label = f"training run {self.run_dir.name}"
        self._fence = fence or contextlib.nullcontext
        self.share = threads.use("training", self.label, quiet=True)  # said once the run's log is open
        self.threads = self.share.threads  # in use: the share, or fewer while that is faster
        self.window = Window()
        self.best: dict[int, float] = {}  # the best window speed seen at each thread count
        self.trial: Trial | None = None
        self.retry_up, self.up_after, self.down_after = RETRY_STEPS, 0, 0
        self._checked = time.monotonic()
        self._mark: tuple[float, int, float] | None = None  # (time, tokens, waited) at the last step's end
        self._why = self.share.line("training")
        self._start_below_share()

    def _start_below_share(self) -> None:
        """Already more runnable tasks than free cores (other users' work): start with fewer threads.
        A guess from one moment; the tries of one thread more (below) correct it."""
        import torch

        others = others_running()
        if self.share.explicit or others is None:
            return
        free = max(1, self.share.cores - round(others))
        if free < self.threads:
            self.threads = free
            torch.set_num_threads(free)
            self._why = (
                f"the machine is busy ({others:.0f} other tasks running on {self.share.cores} cores): "
                f"training on {_count(free)} of {self.share.threads}"
            )
            log.info(self._why)

    # --- Trainer events -----------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._recheck(force=True)
        self._write_status()
        self.up_after = state.global_step + self.retry_up

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        now, tokens, waited = time.perf_counter(), state.num_input_tokens_seen, wait_seconds()
        if self._mark is not None:
            t, seen, w = self._mark
            self._measured(state, now - t, tokens - seen, waited - w)
        self._mark = (now, tokens, waited)
        if time.monotonic() - self._checked > CHECK_SECONDS:
            self._recheck()

    def on_evaluate(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._mark = None  # the span to the next step's end holds an evaluation: not a step's speed

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._mark = None

    def on_prediction_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if time.monotonic() - self._checked > CHECK_SECONDS:  # a long evaluation still holds the share
            self._recheck()

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        threads.release()

    # --- the share ----------------------------------------------------------------------------
    def _recheck(self, force: bool = False) -> None:
        """Read the studio's split again; follow it (down at once, up unless backed off)."""
        self._checked = time.monotonic()
        if self.share.explicit and not force:
            threads.claims().touch(self.label, self.share.threads)
            return
        backed_off = self.threads < self.share.threads
        wanted = self.trial.threads if self.trial else self.threads if backed_off else None
        share = threads.use("training", self.label, limit=wanted)
        if share != self.share:
            self.share, self.trial, self.window = share, None, Window()
            self.threads = min(wanted or share.threads, share.threads)
            self._why = share.line("training")
            self._write_status()

    # --- adapting -----------------------------------------------------------------------------
    def _measured(self, state: Any, seconds: float, tokens: int, waited: float) -> None:
        if self.share.explicit:
            return
        if self.trial is not None:
            self._trial_step(state, seconds, tokens, waited)
            return
        self.window.add(seconds, tokens, waited)
        if self.window.steps < WINDOW_STEPS:
            return
        window, self.window = self.window, Window()
        speed, n = window.speed(), self.threads
        busy = window.wait_share(n) > BUSY_WAIT
        slowed = speed < SLOWED * self.best.get(n, 0.0)
        self.best[n] = max(self.best.get(n, 0.0), speed)
        steps_left = (state.max_steps or 0) - state.global_step
        if steps_left < TRIAL_STEPS + 2:
            return
        if n > 1 and (busy or slowed) and state.global_step >= self.down_after:
            self._start_trial(n - 1, n, speed)
        elif n < self.share.threads and not busy and state.global_step >= self.up_after:
            self._start_trial(n + 1, n, speed)

    def _start_trial(self, to: int, before: int, speed: float) -> None:
        import torch

        self.trial = Trial(to, before, speed)
        torch.set_num_threads(to)

    def _trial_step(self, state: Any, seconds: float, tokens: int, waited: float) -> None:
        trial = self.trial
        if trial.settle > 0:  # the first step after a change pays for resizing the thread pool
            trial.settle -= 1
            return
        trial.window = trial.window or Window()
        trial.window.add(seconds, tokens, waited)
        if trial.window.steps < TRIAL_STEPS:
            return
        self._decide(state, trial, trial.window.speed())

    def _decide(self, state: Any, trial: Trial, speed: float) -> None:
        import torch

        self.trial = None
        self.best[trial.threads] = max(self.best.get(trial.threads, 0.0), speed)
        won = speed > trial.before_speed
        keep = trial.threads if won else trial.before
        torch.set_num_threads(keep)
        self.threads = keep
        down = trial.threads < trial.before
        if down and not won:  # not the thread count's fault: look again later
            self.down_after = state.global_step + RETRY_STEPS
        if not down:
            self.retry_up = RETRY_STEPS if won else 2 * self.retry_up
        self.up_after = state.global_step + self.retry_up
        unit = "tokens/s" if state.num_input_tokens_seen else "steps/s"
        verdict = (
            f"{_count(trial.threads)} made {speed:.0f} {unit}, {_count(trial.before)} "
            f"{trial.before_speed:.0f}: training on {_count(keep)} of {self.share.threads}"
        )
        if won:
            self._why = ("the machine is busy: " if down else "the machine is freer: ") + verdict
            log.info(self._why)
            self._write_status()
        else:
            log.debug("kept %s: %s", _count(keep), verdict)

    def _write_status(self) -> None:
        status = {
            **self.share.to_dict(),
            "threads": self.threads,
            "share": self.share.threads,
            "why": self._why,
        }
        with self._fence():
            runs.write_status(self.run_dir, durable=False, threads=status)


def _count(n: int) -> str:
    return f"{n} thread" + ("s" if n != 1 else "")


def others_running(samples: int = 9, every: float = 0.02) -> float | None:
    """Runnable tasks on the machine other than this (idle-but-for-this-call) process: the median of a
    few readings of /proc/stat's procs_running, less this thread. None where there is no /proc/stat."""
    readings = []
    for _ in range(samples):
        try:
            text = Path("/proc/stat").read_text()
        except OSError:
            return None
        running = next(
            (int(line.split()[1]) for line in text.splitlines() if line.startswith("procs_running")), None
        )
        if running is None:
            return None
        readings.append(running - 1)
        time.sleep(every)
    return float(statistics.median(readings))


def wait_seconds() -> float:
    """Seconds this process's threads have spent runnable but waiting for a CPU (Linux schedstat; 0 elsewhere)."""
    total = 0
    try:
        tasks = list(Path("/proc/self/task").iterdir())
    except OSError:
        return 0.0
    for task in tasks:
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the thread ended, or no schedstat in this kernel
    return total / 1e9
