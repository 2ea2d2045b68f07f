"""On a cluster node: a run folder on object storage, trained in a local scratch copy and mirrored up.

    mirror = RunMirror("s3://bucket/runs/tiny-1a2b3c", resume=True)   # pulls what the run needs
    train(recipe_in(mirror.scratch), callbacks=[mirror.callback(), ...])
    mirror.push(final=True)                                            # how the attempt ended

The Trainer writes files, not URIs, so the job process trains in a scratch folder with a fixed
path (<tmp>/lora-studio-scratch/<run>: the checkpoint paths the Trainer records stay valid on any
node) and mirrors it to the bucket. The order of uploads is what makes a reader safe:
- a checkpoint's trainer_state.json goes up after the rest of it (run_folder: that file makes it
  whole); checkpoints the Trainer deleted (save_total_limit) are deleted from the bucket too;
- status.json and metrics.jsonl every few seconds, so `jobs list` shows progress (train.log and
  the rest with each checkpoint);
- at the end, the adapter, its lora_studio.json last, and then status.json last of all: a run
  reads as succeeded only once its adapter is all there.
A resumed attempt pulls the small files and every whole checkpoint back first. A cancel is the
`cancel-requested` object beside them (cluster.RayExecutor.stop writes it), looked for each step.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .run_folder import CHECKPOINTS
from .storage import CHECKPOINT_MARKER, SCRATCH_FILE, SMALL_FILES, Remote

log = logging.getLogger(__name__)

PUSH_SECONDS = 5.0  # status and metrics go up at most this often (and at every checkpoint)
CANCEL_CHECK_SECONDS = 1.0  # the bucket is asked for a cancel at most this often
PULLED = ("job.json", *SMALL_FILES, "train.log")


class RunMirror:
    """A run at `uri`, trained in `scratch`: pulls it down (`resume`), pushes changes up."""

    def __init__(self, uri: str, resume: bool):
        self.remote = Remote(uri)
        self.scratch = (
            Path(tempfile.gettempdir()) / "lora-studio-scratch" / uri.rstrip("/").rsplit("/", 1)[-1]
        )
        self._pushed: dict[str, tuple[int, int]] = {}  # name -> (size, mtime_ns) as uploaded
        self._pushed_at = 0.0
        self._cancel_checked, self._cancelled = 0.0, False
        shutil.rmtree(self.scratch, ignore_errors=True)  # a scratch left by an earlier attempt is stale
        self.scratch.mkdir(parents=True)
        (self.scratch / SCRATCH_FILE).write_text(uri)  # runs.start indexes the face, not this copy
        self._pull(resume)

    def _pull(self, resume: bool) -> None:
        files = self.remote.files()
        wanted = [n for n in PULLED if n in files] if resume else ["job.json"]
        if resume:  # every whole checkpoint (the best one too, when the recipe keeps the best)
            whole = {n.split("/")[1] for n in files if n.endswith(f"/{CHECKPOINT_MARKER}")}
            wanted += [n for n in files if n.startswith(f"{CHECKPOINTS}/") and n.split("/")[1] in whole]
        for name in wanted:
            self.remote.download(name, self.scratch / name)
            self._remember(name)
        log.info("pulled %d file(s) of %s into %s", len(wanted), self.remote.uri, self.scratch)

    def cancel_requested(self, name: str) -> bool:
        """Whether the object `name` (the cancel request) is in the bucket; asked at most once a second."""
        if not self._cancelled and time.monotonic() - self._cancel_checked >= CANCEL_CHECK_SECONDS:
            self._cancel_checked = time.monotonic()
            self._cancelled = self.remote.exists(name)
        return self._cancelled

    def push(self, *, checkpoints: bool = False, final: bool = False) -> None:
        """Upload what changed: metrics; with `checkpoints` (or `final`) the checkpoints and the
        other files; with `final` the adapter; then status.json."""
        names = ["metrics.jsonl"]  # often: progress (train.log grows, and S3 cannot append)
        if checkpoints or final:
            self._push_checkpoints()
            names = ["config.yaml", "data_report.json", "metrics.jsonl", "train.log"]
        if final and (self.scratch / "adapter").is_dir():
            adapter = sorted(self._files("adapter"), key=lambda n: n.endswith("/lora_studio.json"))
            names += adapter  # lora_studio.json last: it is what makes an adapter folder whole
        for name in [*names, "status.json"]:  # status last of all
            if (self.scratch / name).is_file() and self._changed(name):
                self.remote.upload(self.scratch / name, name)
                self._remember(name)
        self._pushed_at = time.monotonic()

    def push_if_due(self) -> None:
        """Progress (metrics, status) at most every PUSH_SECONDS."""
        if time.monotonic() - self._pushed_at >= PUSH_SECONDS:
            self.push()

    def close(self) -> None:
        """Delete the scratch copy once the bucket has the run (after the final push)."""
        shutil.rmtree(self.scratch, ignore_errors=True)

    def _push_checkpoints(self) -> None:
        local = {p.name for p in (self.scratch / CHECKPOINTS).glob("checkpoint-*") if p.is_dir()}
        for checkpoint in sorted(local):
            names = self._files(f"{CHECKPOINTS}/{checkpoint}")
            marker = f"{CHECKPOINTS}/{checkpoint}/{CHECKPOINT_MARKER}"
            if marker not in names:
                continue  # being written (or broken): not yet
            for name in sorted(names, key=lambda n: n == marker):  # the marker last
                if self._changed(name):
                    self.remote.upload(self.scratch / name, name)
                    self._remember(name)
        remote = {name.split("/")[1] for name in self.remote.files(CHECKPOINTS)}
        for checkpoint in sorted(remote - local):  # deleted here (save_total_limit): its marker goes first
            with contextlib.suppress(FileNotFoundError):
                self.remote.delete(f"{CHECKPOINTS}/{checkpoint}/{CHECKPOINT_MARKER}")
            self.remote.delete_folder(f"{CHECKPOINTS}/{checkpoint}")

    def _files(self, under: str) -> list[str]:
        return [
            p.relative_to(self.scratch).as_posix() for p in (self.scratch / under).rglob("*") if p.is_file()
        ]

    def _changed(self, name: str) -> bool:
        stat = (self.scratch / name).stat()
        return self._pushed.get(name) != (stat.st_size, stat.st_mtime_ns)

    def _remember(self, name: str) -> None:
        stat = (self.scratch / name).stat()
        self._pushed[name] = (stat.st_size, stat.st_mtime_ns)

    def callback(self) -> TrainerCallback:
        return _MirrorCallback(self)


class _MirrorCallback(TrainerCallback):
    """Pushes each checkpoint once saved, and progress every few seconds. Put it before the job's
    stopper: that one raises from on_save, and callbacks after it would not run."""

    def __init__(self, mirror: RunMirror):
        self.mirror = mirror

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.mirror.push(checkpoints=True)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.mirror.push_if_due()
