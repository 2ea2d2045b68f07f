"""Training throughput: LoRA Studio against plain TRL on the same data, measured in one run.

    python benchmarks/train_speed.py [--steps 12]

The baselines are what a user gets from TRL's SFTTrainer with a LoRA config (r=16, all linear
layers) on SmolLM2-135M: with TRL's defaults (bf16 autocast and gradient checkpointing, even on a
CPU), and with bf16 turned off. LoRA Studio runs fp32 without checkpointing on CPUs, groups batches
by length, and can adapt only the top blocks so backward stops early. Figures are non-padding
training tokens per second over the same number of optimizer steps, and each process's peak
resident memory. Whether bf16 helps or hurts depends on the CPU (AVX-512 BF16 or not).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples/json_extraction/train.jsonl"


def plain_trl(steps: int, out: Path, bf16: bool = True) -> float:
    """TRL's documented LoRA recipe with its defaults (bf16 unless told otherwise); returns tokens/s."""
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from lora_studio.data import load_examples
    from lora_studio.models import resolve_base

    folder = resolve_base("smollm2-135m-instruct").folder
    _, examples = load_examples(DATA)
    from datasets import Dataset

    dataset = Dataset.from_list([{"messages": list(e.messages)} for e in examples])
    args = SFTConfig(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=8,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=steps,
        max_length=256,
        include_num_input_tokens_seen="non_padding",
        learning_rate=2e-4,
        bf16=bf16,
    )
    trainer = SFTTrainer(
        model=str(folder),
        args=args,
        train_dataset=dataset,
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    output = trainer.train()
    return trainer.state.num_input_tokens_seen / output.metrics["train_runtime"]


def lora_studio(steps: int, out: Path, layers: int | None) -> float:
    from lora_studio import Recipe, train

    recipe = Recipe.from_dict(
        {
            "name": "bench",
            "lora": {"r": 16, "lora_alpha": 32, "layers": layers},
            "data": {"train_file": str(DATA), "val_fraction": 0.0, "max_length": 256},
            "train": {
                "output_dir": str(out),
                "max_steps": steps,
                "per_device_train_batch_size": 8,
                "logging_steps": steps,
                "save_every_steps": 1000,
                "eval_every_steps": 1000,
                "learning_rate": 2e-4,
            },
        }
    )
    return train(recipe).metrics["tokens_per_second"]


def measure(kind: str, steps: int, layers: int | None = None) -> dict:
    """Run one measurement in a fresh process, so its peak memory and warm-up are its own."""
    cmd = [sys.executable, __file__, "--steps", str(steps), "--only", kind]
    if layers:
        cmd += ["--layers", str(layers)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def run_one(kind: str, steps: int, layers: int | None) -> None:
    out = Path(tempfile.mkdtemp())
    if kind == "studio":
        tps = lora_studio(steps, out, layers)
    else:
        tps = plain_trl(steps, out, bf16=kind == "trl")
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"tps": tps, "rss_mb": rss_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per measurement (batch 8)")
    parser.add_argument(
        "--only", choices=["trl", "trl-fp32", "studio"], help=argparse.SUPPRESS
    )  # one measurement
    parser.add_argument("--layers", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        return run_one(args.only, args.steps, args.layers)
    from lora_studio.models import resolve_base

    resolve_base("smollm2-135m-instruct")  # convert the GGUF once, before timing anything
    rows = [
        ("plain TRL defaults (bf16, grad. checkpointing)", measure("trl", args.steps)),
        ("plain TRL, bf16=False (fp32, grad. checkpointing)", measure("trl-fp32", args.steps)),
        ("LoRA Studio, all 30 blocks", measure("studio", args.steps)),
        ("LoRA Studio, top 8 blocks (layers: 8)", measure("studio", args.steps, 8)),
    ]
    baseline = rows[0][1]["tps"]
    print(f"\nSmolLM2-135M, LoRA r=16 on all linear layers, batch 8, {args.steps} steps, {DATA.name}")
    print(f"{'setup':<50} {'tokens/s':>9} {'vs TRL':>7} {'peak RSS':>9}")
    for name, r in rows:
        print(f"{name:<50} {r['tps']:>9.1f} {r['tps'] / baseline:>6.1f}x {r['rss_mb']:>7.0f} MB")


if __name__ == "__main__":
    main()
