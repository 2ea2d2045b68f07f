"""The Train tab: a form that becomes a `Recipe`, submitted to the job service, then watched.

Training runs in the job service's worker process, never in the web server. The page reads the
job store on a timer: progress with ETA, the loss curves, the job list. Everything shown comes
from the store, so it survives a page reload and a UI restart.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from lora_studio import cluster
from lora_studio.config import (
    DEFAULT_BASE_MODEL,
    DEFAULT_RECIPE,
    DataSettings,
    Quantization,
    Recipe,
    Task,
    TrainSettings,
    task_defaults,
)
from lora_studio.files import atomic_write_text
from lora_studio.home import studio_home
from lora_studio.jobs import Job, JobStore
from lora_studio.remote_code import remote_code_allowed

from .common import (
    base_model_choices,
    check_data_path,
    check_model_path,
    dataset_choices,
    hint,
    literal_choices,
    shows_errors,
)
from .eval_views import warnings_banner
from .job_views import jobs_table, loss_frame, progress_html
from .uploads import safe_name

POLL_SECONDS = 1.0
# The form starts from the shipped default recipe: its blocks, learning rate and schedule were
# chosen by held-out task scores, and its top blocks train on the fast path (README, "Speed").
DEFAULT = Recipe.from_yaml(DEFAULT_RECIPE)


@dataclass
class TrainTab:
    dataset: gr.Dropdown
    job: gr.Dropdown  # the watched job
    where: gr.Radio  # this machine or a Ray cluster
    ray_address: gr.Textbox


WHERE_CHOICES = [("this machine", "local"), ("Ray cluster", "ray")]


# --- handlers -----------------------------------------------------------------------------------
def recipe_from_form(
    name: str,
    base_model: str,
    dataset: str,
    r: float,
    layers: float | None,
    quantization: str,
    epochs: float,
    learning_rate: float,
    max_length: float,
    max_steps: float | None = -1,
    batch_size: float = 8,
    eval_every: float = 50,
    log_every: float = 5,
    task: str = "chat",
) -> Recipe:
    """The form's values as a validated Recipe (every problem reported at once, as the CLI does)."""
    return Recipe.from_dict(
        {
            "name": (name or "").strip() or "adapter",
            "task": task,
            "model": {
                "base_model": (base_model or "").strip() or DEFAULT_BASE_MODEL,
                "quantization": quantization,
            },
            # alpha = 2r keeps the update's scale steady when a person changes the rank.
            "lora": {
                "r": _int(r),
                "lora_alpha": 2 * (_int(r) or 0),
                "lora_dropout": DEFAULT.lora.lora_dropout,
                "layers": _int(layers) or None,
            },
            "data": {
                "train_file": (dataset or "").strip(),
                # an empty box: the task's default (classify: chosen from the data, `auto`)
                **({} if max_length is None else {"max_length": _int(max_length)}),
                "val_fraction": DEFAULT.data.val_fraction,
            },
            "train": {
                "lr_scheduler_type": DEFAULT.train.lr_scheduler_type,
                "warmup_ratio": DEFAULT.train.warmup_ratio,
                "num_train_epochs": _float(epochs),
                "learning_rate": _float(learning_rate),
                "max_steps": _int(max_steps) if max_steps not in (None, 0) else -1,
                "per_device_train_batch_size": _int(batch_size),
                "eval_every_steps": _int(eval_every),
                "logging_steps": _int(log_every),
            },
        },
        source="the training form",
    )


def start_training(
    *form: Any, public: bool = False, where: str = "local", address: str | None = None
) -> tuple[str, str]:
    """Submit the form as a job and hand it to what runs it; returns (job id, CLI command).

    `public`: the UI is reachable from other machines, so typed paths are limited (common.py), and
    jobs go only to the Ray cluster the server was started with ($RAY_ADDRESS), never a typed one.
    `where`: "local" (this machine's worker) or "ray" (the cluster at `address`).
    """
    recipe = recipe_from_form(*form)
    check_data_path(recipe.data.train_file, public)
    check_model_path(recipe.model.base_model, public)
    placement = None
    if where == "ray":
        placement = cluster.ray_placement(
            default_ray_address() if public else (address or "").strip() or None
        )
    store = JobStore()
    job_id = store.submit(
        recipe, trust_remote_code=remote_code_allowed(), placement=placement
    )  # the UI operator's word
    cluster.start(store, job_id)
    return job_id, reproduce_command(store.get(job_id))


def default_ray_address() -> str:
    return os.environ.get("RAY_ADDRESS") or cluster.DEFAULT_RAY_ADDRESS


def _where_file() -> Path:
    return studio_home() / "ui" / "run-on.json"


def remember_where(where: str, address: str) -> None:
    """Keep this user's choice of where jobs run (in their studio home) for the next page load."""
    _where_file().parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(_where_file(), json.dumps({"where": where, "address": address}))


def restore_where() -> tuple[str, str]:
    """The remembered choice of where jobs run, for the form (this machine when none)."""
    try:
        saved = json.loads(_where_file().read_text())
    except (OSError, ValueError):
        saved = {}
    where = saved.get("where") if saved.get("where") in cluster.CLUSTERS else "local"
    return where, saved.get("address") or default_ray_address()


def refresh_jobs(current: str | None) -> gr.Dropdown:
    return gr.Dropdown(choices=job_choices(), value=current)


def cancel_job(job_id: str | None) -> str:
    if not job_id:
        raise gr.Error("Pick a job to cancel first.")
    job = JobStore().cancel(job_id)
    if job.state == "cancelled":
        return f"Job {job.id} is cancelled."
    return f"Cancel requested for job {job.id}: it stops at its next step, after saving a checkpoint."


def resume_job(job_id: str | None) -> str:
    if not job_id:
        raise gr.Error("Pick a job to resume first.")
    store = JobStore()
    job = store.resume(job_id, trust_remote_code=remote_code_allowed())
    cluster.start(store, job.id)
    return f"Job {job.id} is queued again; it continues from its last checkpoint."


def watch_job(job_id: str | None) -> tuple[str, pd.DataFrame | None, pd.DataFrame]:
    """What the timer refreshes: (progress html, loss curves, job table)."""
    store = JobStore()
    table = jobs_table(store.list(limit=50))
    if not job_id:
        return progress_html(None), loss_frame([]), table
    job = store.get(job_id)
    return progress_html(job) + warnings_banner(job.run_dir), loss_frame(store.metrics(job.id)), table


def job_choices(store: JobStore | None = None) -> list[tuple[str, str]]:
    jobs = (store or JobStore()).list(limit=50)
    return [job_label(j) for j in jobs]


def job_label(job: Job) -> tuple[str, str]:
    """A picker entry; the state is left out because it changes while the label stays on screen."""
    started = time.strftime("%m-%d %H:%M", time.localtime(job.created_at))
    return f"{job.name} · {job.id} · {started}", job.id


def on_page_load() -> gr.Dropdown:
    """After a reload or restart: list the jobs and watch the running one (else the newest)."""
    jobs = JobStore().list(limit=50)
    running = [j for j in jobs if j.state in ("running", "queued")]
    pick = (running or jobs or [None])[0]
    return gr.Dropdown(choices=[job_label(j) for j in jobs], value=pick and pick.id)


def reproduce_command(job: Job) -> str:
    """The form saved as a recipe file, and the command lines that run it without the UI.

    The saved recipe leaves output_dir empty, so running it again writes a fresh run folder
    instead of overwriting this job's.
    """
    raw = job.recipe | {"train": {**job.recipe["train"], "output_dir": ""}}
    path = studio_home() / "recipes" / f"{safe_name(job.name)}-{job.id}.yaml"  # the name is typed text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(Recipe.from_dict(raw).to_yaml())
    flag = " --trust-remote-code" if job.trust_remote_code else ""  # this job's own permission
    if job.cluster:
        return f"# the same job from a terminal:\nlora-studio jobs submit {path} --cluster {job.cluster} --address {job.cluster_address}"
    return (
        f"# the same training in a terminal:\nlora-studio train {path}{flag}\n"
        f"# or queued for the worker, as this page does:\nlora-studio jobs submit {path}{flag}"
    )


def task_max_length(task: str) -> int | None:
    """The Max length box for a task: empty for one whose default is chosen from the data."""
    return None if task_defaults(DataSettings, task).get("max_length") == "auto" else DataSettings.max_length


def _int(value: float | None) -> int | float | None:
    """A whole number from a number box; an empty box (None) or nan/inf stays as it is, for the
    recipe check to name."""
    return int(round(value)) if value is not None and math.isfinite(value) else value


def _float(value: float | None) -> float | None:
    return None if value is None else float(value)


# --- layout ---------------------------------------------------------------------------------------
def build(public: bool = False) -> TrainTab:
    with gr.Row():
        with gr.Column(scale=2, elem_id="train-form"):
            name = gr.Textbox(label="Run name", value="my-adapter", info="Names the job and its adapter.")
            task = gr.Dropdown(
                label="Task",
                choices=literal_choices(Task),
                value="chat",
                info=hint("task"),
                elem_id="train-task",
            )
            base_model = gr.Dropdown(
                label="Base model",
                choices=base_model_choices(),
                value=DEFAULT_BASE_MODEL,
                allow_custom_value=True,
                info=hint("base_model"),
                elem_id="train-base-model",
            )
            dataset = gr.Dropdown(
                label="Dataset",
                choices=dataset_choices(),
                value=None,
                allow_custom_value=True,
                info=hint("train_file"),
                elem_id="train-dataset",
            )
            with gr.Row():
                r = gr.Slider(1, 128, value=DEFAULT.lora.r, step=1, label="LoRA rank (r)", info=hint("r"))
                layers = gr.Number(
                    label="Top-N layers (0: all)",
                    value=DEFAULT.lora.layers or 0,
                    precision=0,
                    minimum=0,
                    info=hint("layers"),
                )
            with gr.Row():
                quantization = gr.Dropdown(
                    label="Quantization",
                    choices=literal_choices(Quantization),
                    value="none",
                    info=hint("quantization"),
                )
                epochs = gr.Number(
                    label="Epochs",
                    value=DEFAULT.train.num_train_epochs,
                    minimum=0.01,
                    step=0.5,
                    info=hint("num_train_epochs"),
                )
            with gr.Row():
                learning_rate = gr.Number(
                    label="Learning rate",
                    value=DEFAULT.train.learning_rate,
                    minimum=0,
                    step=1e-5,
                    info=hint("learning_rate"),
                )
                max_length = gr.Number(
                    label="Max length (tokens)",
                    value=DataSettings.max_length,  # the recipe's 128 fits only the demo rows
                    precision=0,
                    minimum=8,
                    info=hint("max_length"),
                    elem_id="train-max-length",
                )
            with gr.Accordion("More settings", open=False):
                with gr.Row():
                    max_steps = gr.Number(
                        label="Max steps",
                        value=-1,
                        precision=0,
                        minimum=-1,
                        info=hint("max_steps"),
                        elem_id="train-max-steps",
                    )
                    batch_size = gr.Number(
                        label="Batch size",
                        value=DEFAULT.train.per_device_train_batch_size,
                        precision=0,
                        minimum=1,
                        info=hint("per_device_train_batch_size"),
                    )
                    eval_every = gr.Number(
                        label="Validate every N steps",
                        value=TrainSettings.eval_every_steps,
                        precision=0,
                        minimum=1,
                        info=hint("eval_every_steps"),
                    )
                    log_every = gr.Number(
                        label="Log loss every N steps",
                        value=TrainSettings.logging_steps,
                        precision=0,
                        minimum=1,
                        info=hint("logging_steps"),
                    )
            with gr.Row():
                where = gr.Radio(
                    label="Run on",
                    choices=WHERE_CHOICES,
                    value="local",
                    info="This machine's job worker, or a Ray cluster (pip install 'lora-studio[ray]').",
                    elem_id="train-where",
                )
                ray_address = gr.Textbox(
                    label="Ray cluster address",
                    value=default_ray_address(),
                    interactive=not public,  # a public page sends jobs only to the server's own cluster
                    info="Its dashboard, e.g. http://HEAD:8265.",
                    elem_id="train-ray-address",
                )
            start = gr.Button("Start training", variant="primary", elem_id="train-start")
            command = gr.Code(
                label="The same run from the command line",
                language="shell",
                interactive=False,
                elem_id="train-command",
            )
        with gr.Column(scale=3):
            with gr.Row():
                job = gr.Dropdown(
                    # Choices are filled per page; a value typed by an API client is checked by the job store.
                    label="Job",
                    choices=[],
                    value=None,
                    allow_custom_value=True,
                    elem_id="train-job",
                    scale=3,
                )
                cancel = gr.Button("Cancel", variant="stop", scale=1, elem_id="train-cancel")
                resume = gr.Button("Resume", scale=1)
            progress = gr.HTML(progress_html(None), elem_id="train-progress")
            notice = gr.Markdown()
            plot = gr.LinePlot(
                None,
                x="step",
                y="loss",
                color="series",
                title="Loss",
                x_title="step",
                y_title="loss",
                height=260,
                color_map={"training": "#2563eb", "validation": "#f97316"},
                elem_id="train-plot",
            )
            table = gr.Dataframe(
                jobs_table([]), label="Jobs (newest first)", interactive=False, elem_id="train-jobs"
            )

    form = [
        name,
        base_model,
        dataset,
        r,
        layers,
        quantization,
        epochs,
        learning_rate,
        max_length,
        max_steps,
        batch_size,
        eval_every,
        log_every,
        task,
    ]

    @shows_errors
    def on_start(*values: Any) -> tuple[str, str]:
        # The form, then where it runs (an API caller may leave the trailing fields out).
        where_value, address = (*values[len(form) :], "local", None)[:2]
        return start_training(
            *values[: len(form)], public=public, where=where_value or "local", address=address
        )

    # classify's default chooses max_length from the data: the box empties for it, and refills for chat
    task.input(task_max_length, inputs=task, outputs=max_length, api_visibility="private")
    for changed in (where.input, ray_address.blur):  # the user's own changes, not restore_where's
        changed(remember_where, inputs=[where, ray_address], api_visibility="private")
    start.click(
        on_start, inputs=[*form, where, ray_address], outputs=[job, command], api_name="start_training"
    ).success(refresh_jobs, inputs=job, outputs=job, api_visibility="private")
    cancel.click(shows_errors(cancel_job), inputs=job, outputs=notice, api_name="cancel_job")
    resume.click(shows_errors(resume_job), inputs=job, outputs=notice, api_name="resume_job")
    watch = shows_errors(watch_job)
    job.change(watch, inputs=job, outputs=[progress, plot, table], api_name="watch_job")
    job.focus(shows_errors(refresh_jobs), inputs=job, outputs=job, api_visibility="private")
    gr.Timer(POLL_SECONDS).tick(
        watch, inputs=job, outputs=[progress, plot, table], api_visibility="private", show_progress="hidden"
    )
    return TrainTab(dataset=dataset, job=job, where=where, ray_address=ray_address)
