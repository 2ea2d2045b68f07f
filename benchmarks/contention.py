"""Training beside other work: the default recipe alone, beside one and two busy processes, and two
jobs through the worker at once, each with LoRA Studio's automatic threads and with a fixed
thread per core (what every process did before threads.py).

    .venv/bin/python benchmarks/contention.py                  # 24 steps a run, ~20 min on 2 quiet cores
    .venv/bin/python benchmarks/contention.py --steps 36 --skip-fixed --out contention-out

Each run is `lora-studio train recipes/smollm2-lora-cpu.yaml` (no validation, so the time is
training) in its own process and studio home; a "busy process" is a Python loop spinning on one
core. tokens/s is the run's own (tokens seen over the Trainer's runtime). For the worker, one job
alone is set against two submitted together to `worker --concurrency 2` (started together: no
spare process), whose tokens/s is all the tokens over the span from the first job's training start
to the last one's end. The load average is recorded before and after every figure: on a shared
machine other people's work moves the figures too. Not a test: it asserts nothing, it reports.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-lora-cpu.yaml"
sys.path.insert(0, str(ROOT))

from lora_studio.threads import available_cores  # noqa: E402


def settings(steps: int) -> list[str]:
    """The default recipe for `steps` steps with no validation (the time is all training)."""
    return [f"max_steps={steps}", "val_fraction=0", "early_stopping_patience=null", "save_every_steps=36000"]


# One core's worth of pure Python work, which ends by itself if this script is gone.
SPIN = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    sum(range(100_000))\n"


@contextlib.contextmanager
def busy(count: int) -> Iterator[None]:
    """`count` processes each spinning one core, as long as the block runs."""
    procs = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(count)]
    try:
        time.sleep(1 if procs else 0)
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def new_home(out: Path, name: str) -> Path:
    """A studio home of its own (no other process's claims), sharing the converted base model."""
    home = out / "homes" / name
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    models = Path(os.environ.get("LORA_STUDIO_HOME", Path.home() / ".cache" / "lora-studio")) / "models"
    if models.is_dir():
        (home / "models").symlink_to(models)
    return home


def env_for(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LORA_STUDIO_THREADS")}
    return {**env, "LORA_STUDIO_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def train_alone(out: Path, name: str, steps: int, threads: int | None) -> dict:
    home = new_home(out, name)
    run_dir = home / "runs" / name
    cmd = [sys.executable, "-m", "lora_studio.cli", "train", str(RECIPE)]
    cmd += [a for s in settings(steps) + [f"output_dir={run_dir}"] for a in ("--set", s)]
    cmd += ["--threads", str(threads)] if threads else []
    with open(out / f"{name}.log", "w") as log:
        subprocess.run(cmd, env=env_for(home), stdout=log, stderr=subprocess.STDOUT, check=True)
    return run_figures([run_dir])


def through_worker(out: Path, name: str, steps: int, jobs: int, threads: int | None) -> dict:
    from lora_studio.jobs import JobStore

    home = new_home(out, name)
    os.environ["LORA_STUDIO_HOME"] = str(home)  # JobStore pins the run folders under this home
    store = JobStore(home / "jobs.sqlite")
    ids = [store.submit(str(RECIPE), settings(steps)) for _ in range(jobs)]
    cmd = [sys.executable, "-m", "lora_studio.cli", "worker", "--store", str(store.path)]
    cmd += ["--concurrency", str(jobs), "--idle-exit", "1", "--no-prestart", "--poll", "0.2"]
    cmd += ["--threads", str(threads)] if threads else []
    with open(out / f"{name}.log", "w") as log:
        subprocess.run(cmd, env=env_for(home), stdout=log, stderr=subprocess.STDOUT, check=True)
    return run_figures([store.get(i).run_dir for i in ids])


def run_figures(run_dirs: list[Path]) -> dict:
    """tokens/s of the runs together over the span of their training, and the threads they ended on."""
    status = [json.loads((d / "status.json").read_text()) for d in run_dirs]
    bad = [s.get("error") for s in status if s.get("state") != "succeeded"]
    if bad:
        raise SystemExit(f"a run failed: {bad}")
    ends = [s["ended_at"] for s in status]
    starts = [end - s["metrics"]["train_runtime_s"] for end, s in zip(ends, status, strict=True)]
    tokens = [s["metrics"]["tokens_per_second"] * s["metrics"]["train_runtime_s"] for s in status]
    return {
        "tokens_per_s": round(sum(tokens) / (max(ends) - min(starts)), 1),
        "each_tokens_per_s": [s["metrics"]["tokens_per_second"] for s in status],
        "threads": [s.get("threads", {}).get("threads") for s in status],
        "why": [s.get("threads", {}).get("why") for s in status],
    }


def measured(label: str, run) -> dict:
    before = os.getloadavg()[0]
    started = time.time()
    figures = run()
    figures.update(setting=label, load_before=round(before, 2), load_after=round(os.getloadavg()[0], 2))
    figures["wall_s"] = round(time.time() - started, 1)
    print(f"{label}: {figures}", flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps per run (default 24)")
    parser.add_argument("--out", type=Path, default=Path("contention-out"))
    parser.add_argument("--busy", default="1,2", help="busy-process counts to train beside (default 1,2)")
    parser.add_argument(
        "--skip-fixed", action="store_true", help="leave out the fixed-thread comparison rows"
    )
    parser.add_argument("--skip-worker", action="store_true", help="leave out the worker rows")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cores = available_cores()
    fixed = [None] if args.skip_fixed else [None, cores]
    plan = [("alone", lambda: train_alone(out, "alone", args.steps, None))]
    for count in (int(c) for c in args.busy.split(",") if c.strip()):
        for threads in fixed:
            label = f"beside {count} busy, " + (f"{threads} threads fixed" if threads else "auto")
            plan.append((label, lambda t=threads, c=count: beside(c, out, args.steps, t)))
    if not args.skip_worker:
        plan.append(("worker: one job", lambda: through_worker(out, "worker-1", args.steps, 1, None)))
        for threads in fixed:
            label = "worker: two jobs at --concurrency 2, " + (f"--threads {threads}" if threads else "auto")
            plan.append(
                (label, lambda t=threads: through_worker(out, f"worker-2-{t or 'auto'}", args.steps, 2, t))
            )
    rows = []
    for label, run in plan:
        rows.append(measured(label, run))
        report = {"cores": cores, "steps": args.steps, "rows": rows}
        (out / "contention.json").write_text(json.dumps(report, indent=2))  # kept row by row
    print(table(rows, cores, args.steps))


def beside(count: int, out: Path, steps: int, threads: int | None) -> dict:
    with busy(count):
        return train_alone(out, f"busy{count}-{threads or 'auto'}", steps, threads)


def table(rows: list[dict], cores: int, steps: int) -> str:
    solo = rows[0]["tokens_per_s"]
    one_job = next((r["tokens_per_s"] for r in rows if r["setting"] == "worker: one job"), None)
    lines = [
        f"{steps} steps of the default recipe per run, {cores} cores",
        "| setting | threads (at the end) | tokens/s | share of solo | load average before / after |",
        "|---|---|---:|---:|---|",
    ]
    for r in rows:
        worker = r["setting"].startswith("worker") and one_job is not None
        base, of = (one_job, " of one job") if worker else (solo, "")
        lines.append(
            f"| {r['setting']} | {', '.join(str(t) for t in r['threads'])} | {r['tokens_per_s']:.0f} | "
            f"{100 * r['tokens_per_s'] / base:.0f}%{of} | {r['load_before']} / {r['load_after']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
