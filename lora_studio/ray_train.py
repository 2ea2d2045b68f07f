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
as under `accelerate launch`. A cancel stops the whole group at once (Ray's stop ends the driver
and its workers): `resume` continues from the last checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any

from . import runs
from .config import Recipe
from .errors import LoraStudioError
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
        train_loop_config={"recipe": recipe.to_dict(), "resume": resume},
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
    train(recipe, resume=resume, callbacks=[RayTrainReportCallback()], prepare_trainer=prepare_trainer)
