"""A Ray job against a local job on the same tiny recipe, and 1 against 2 Ray Train CPU workers.

    ray start --head --num-cpus 2                     # a head on this machine (dashboard on :8265)
    .venv/bin/python benchmarks/ray_overhead.py --address http://127.0.0.1:8265 [--steps 30] [--storage s3://B/P]

Trains the tests' tiny Llama (tests/tiny_model.py, nothing downloads) on 40 chat rows, as jobs
one after another in a fresh studio home: first on this machine's worker (started cold, as
`jobs submit` does), then on the Ray cluster, then on the cluster with `train.num_workers: 2` and
half the per-worker batch (the same global batch), and with `--storage URI` once more on one
process with its run in that bucket (the head's environment must reach it). For each: seconds
from submit to the first logged step and to the end, and the Trainer's own train_runtime. Not a
test: it reports.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--storage", help="also run one job with its run on this s3:// or gs:// URI")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ray-overhead-"))
    os.environ["LORA_STUDIO_HOME"] = str(root / "home")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from tiny_model import build_tiny_model

    from lora_studio import cluster
    from lora_studio.jobs import JobStore

    model = build_tiny_model(root / "model")
    data = root / "chat.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Repeat: word{i % 20}"},
                {"role": "assistant", "content": f"word{i % 20}"},
            ]
        }
        for i in range(40)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = JobStore()

    def recipe(name: str, batch: int = 4, workers: int = 1) -> dict:
        return {
            "name": name,
            "model": {"base_model": str(model)},
            "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
            "data": {"train_file": str(data), "max_length": 64},
            "train": {
                "max_steps": args.steps,
                "per_device_train_batch_size": batch,
                "eval_every_steps": 10,
                "logging_steps": 1,
                "learning_rate": 5e-3,
                "early_stopping_patience": None,
                "num_workers": workers,
            },
        }

    runs = [
        ("local", recipe("local"), None),
        ("ray, 1 process", recipe("ray1"), cluster.ray_placement(args.address)),
        ("ray, 2 workers", recipe("ray2", batch=2, workers=2), cluster.ray_placement(args.address)),
    ]
    if args.storage:  # its progress is seen every few seconds (run_mirror.PUSH_SECONDS): first step is late
        runs.append(
            ("ray, 1, on storage", recipe("ray-s3"), cluster.ray_placement(args.address, args.storage))
        )
    print(f"load average before: {os.getloadavg()}")
    for label, spec, placement in runs:
        started = time.monotonic()
        job_id = store.submit(spec, placement=placement)
        cluster.start(store, job_id)
        first = None
        while not (job := store.get(job_id)).finished and job.state != "interrupted":
            if first is None and job.step >= 1:
                first = time.monotonic() - started
            time.sleep(0.1)
        total = time.monotonic() - started
        m = job.metrics
        print(
            f"{label:<16} {job.state:<10} first step {first or float('nan'):6.1f} s  total {total:6.1f} s  "
            f"train_runtime {m.get('train_runtime_s')} s  tokens/s {m.get('tokens_per_second')}  "
            f"train_loss {m.get('train_loss'):.4f}  load {os.getloadavg()[0]:.1f}"
        )
    if store.worker_pid():  # the local worker this started
        os.kill(store.worker_pid(), signal.SIGTERM)


if __name__ == "__main__":
    main()
