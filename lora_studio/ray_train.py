"""One run on several Ray Train workers: `train.num_workers: N` for a job on a Ray cluster.

    result = train_on_workers(recipe, resume=False)   # in a job process on the cluster (job_process.py)

Ray Train's TorchTrainer starts N workers (CPU with gloo, or one GPU each with `train.use_gpu`)
and their process group; each runs the same `training.train` with the same Hugging Face Trainer,
prepared by Ray's Transformers integration (`prepare_trainer`, `RayTrainReportCallback`). We write
no process-group code. `per_device_train_batch_size` is per worker: the global batch is N times it.

Rank 0 writes the run folder (runs.is_main_process reads RANK, which Ray Train sets), on storage
every node sees. A worker that dies (node lost, out of memory) makes Ray Train restart the group
(`FailureConfig`), which continues from the run folder's last whole checkpoint. What is not exact
on several processes (the fast path's levers) is left out with one log line each (fast_path.py),
as under `accelerate launch`.

A cancel stops the group at its next step with a checkpoint, as a one-process job does. Rank 0
looks for the run folder's cancel file at each step and the workers agree through one all-reduce
of a flag on the group Ray Train made (every rank must stop at the same step, or the others wait
forever in the next gradient all-reduce). They save, end their loop without an error (an error
would make Ray Train restart the group) and the driver reports the run cancelled. Ray's own stop
(a second cancel) still ends the whole group at once; `resume` continues from the last checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from . import runs
from .cluster import CANCEL_FILE
from .config import Recipe
from .errors import LoraStudioError, TrainingCancelled
from .run_folder import last_complete_checkpoint
from .training import RunResult, train

log = logging.getLogger(__name__)

MAX_FAILURES = 2  # worker-group restarts before the run fails


def train_on_workers(recipe: Recipe, *, resume: bool = False, **_ignored: Any) -> RunResult:
    """Train `recipe` on `recipe.train.num_workers` Ray Train workers; returns what rank 0 wrote.

    Called on a Ray cluster (it joins the cluster the job runs on). The job's own callbacks and
    fence stay in this driver process: they belong to one process, not to every worker.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    recipe = runs.pin(recipe)
    t = recipe.train
    log.info(
        "training on %d Ray Train workers (%s), global batch %d",
        t.num_workers,
        "a GPU each" if t.use_gpu else "CPU, gloo",
        t.num_workers * t.per_device_train_batch_size,
    )
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "recipe": recipe.to_dict(),
            "resume": resume,
            "cancel_file": str(recipe.output_dir / CANCEL_FILE),  # cluster.RayExecutor.stop writes it
        },
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu),
        run_config=ray.train.RunConfig(
            name="ray-train",
            storage_path=str(recipe.output_dir / "ray-train"),  # Ray's copy of the reported checkpoints
            failure_config=ray.train.FailureConfig(max_failures=MAX_FAILURES),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise LoraStudioError(f"training on {t.num_workers} Ray Train workers failed: {result.error}")
    status = runs.read_status(recipe.output_dir)
    if status.get("state") == "cancelled":  # the workers stopped on a cancel, with a checkpoint
        raise TrainingCancelled(status.get("error") or "cancelled")
    if status.get("state") != "succeeded":
        raise LoraStudioError(f"the Ray Train workers ended without an adapter: {status.get('error')}")
    return RunResult(recipe.output_dir, recipe.output_dir / runs.ADAPTER, status.get("metrics") or {})


def _worker_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: the plain training function, prepared for Ray."""
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    recipe = Recipe.from_dict(config["recipe"])
    # After a restart (FailureConfig) continue from the last whole checkpoint the run folder has.
    resume = config["resume"] or last_complete_checkpoint(recipe.output_dir) is not None
    stop = StopTogether(Path(config["cancel_file"]))
    try:  # Ray's callback first: it reports each checkpoint before a cancel ends the loop in on_save
        train(
            recipe, resume=resume, callbacks=[RayTrainReportCallback(), stop], prepare_trainer=prepare_trainer
        )
    except TrainingCancelled:
        if not stop.cancelled:
            raise
        # Rank 0 wrote the run folder's status (cancelled); ending normally keeps Ray Train from
        # restarting the group as it would after a failure.


class StopTogether(TrainerCallback):
    """Every worker stops at the same step, with a checkpoint, once rank 0 sees the cancel file."""

    def __init__(self, cancel_file: Path):
        self.cancel_file = cancel_file
        self.cancelled = False

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
        import torch
        import torch.distributed as dist

        asked = runs.is_main_process() and self.cancel_file.exists()
        if dist.is_available() and dist.is_initialized():  # one flag, the same answer on every rank
            device = (
                torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            )
            flag = torch.tensor([int(asked)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            asked = bool(flag.item())
        if asked:
            self.cancelled = True
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.cancelled:
            raise TrainingCancelled(
                f"cancelled at step {state.global_step} of {state.max_steps}; "
                f"checkpoint-{state.global_step} saved, `resume` continues from it"
            )
