"""One measured training run of `lora-studio bench`, in a process of its own.

    python -m lora_studio.bench_runs NAME SETTINGS_JSON     # prints one `RESULT {...}` line

A configuration is either plain TRL + PEFT (`SFTTrainer` with a LoRA config, as TRL's docs show)
or LoRA Studio's own `train()` with the default recipe. Both get the same rows, split the same
way, and a BenchClock callback that times training without the evaluations, records the held-out
loss curve, counts the FLOPs executed and reports progress to a file the parent reads.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .bench import CONFIGS, RunSettings


class BenchClock(TrainerCallback):
    """Training time and FLOPs without the evaluations, the held-out loss curve, progress.

    FLOPs are counted by torch's FlopCounterMode over each span from one step's end to the next
    (so the feature cache's filling while a batch is collated counts too); a span that ends in an
    evaluation is dropped. A new counter per span: one kept open for the whole run holds on to
    tensors (measured on TRL's checkpointed training: memory grew until the kernel killed it).
    """

    def __init__(self, started: float, progress_file: Path):
        self.started = started  # before the model was loaded: setup counts
        self.progress_file = progress_file
        self.eval_s = 0.0
        self.curve: list[dict[str, float]] = []
        self.ended: float | None = None
        self.tokens = 0
        self.bf16 = False
        self.flops = 0.0  # in training, evaluations excluded
        self._counter: Any = None

    def _count(self, keep: bool, again: bool = True) -> None:
        """Close the current FLOP counter (adding its count if `keep`) and open the next."""
        from torch.utils.flop_counter import FlopCounterMode

        if self._counter is not None:
            self.flops += self._counter.get_total_flops() if keep else 0
            self._counter.__exit__(None, None, None)
        self._counter = FlopCounterMode(display=False) if again else None
        if self._counter is not None:
            self._counter.__enter__()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.bf16 = bool(args.bf16)  # bf16 autocast (or bf16 weights on a GPU): its peak is the yardstick
        self._count(keep=False)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._count(keep=True)
        self.progress_file.write_text(f"{state.global_step} {state.max_steps}")

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kw: Any
    ) -> None:
        if self.ended is not None or not metrics:
            return  # an evaluation after training (a final report) is not part of the run
        self._count(keep=False)  # the span since the last step's end held only this evaluation
        runtime = metrics.get("eval_runtime", 0.0)
        train_s = time.perf_counter() - runtime - self.started - self.eval_s
        self.curve.append(
            {
                "step": state.global_step,
                "tokens": state.num_input_tokens_seen,
                "train_s": train_s,
                "loss": metrics["eval_loss"],
            }
        )
        self.eval_s += runtime

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.ended = time.perf_counter()
        self.tokens = state.num_input_tokens_seen
        self._count(keep=True, again=False)

    def result(self) -> dict[str, Any]:
        train_s = (self.ended or time.perf_counter()) - self.started - self.eval_s
        return {
            "train_s": round(train_s, 2),
            "tokens": self.tokens,
            "tokens_per_s": round(self.tokens / train_s, 1),
            "heldout_loss": self.curve[-1]["loss"] if self.curve else None,
            "curve": self.curve,
            "flops": self.flops,
        }


def split_rows(settings: RunSettings) -> tuple[list[Any], list[Any]]:
    """The training and held-out examples, split exactly as LoRA Studio splits them."""
    from .data import load_examples, split

    _, examples = load_examples(settings.data)
    return split(examples, settings.val_fraction, settings.seed)


def run_trl(settings: RunSettings, bf16: bool | None, clock: BenchClock, out: Path) -> None:
    """Plain TRL + PEFT: SFTTrainer with a LoRA config, as TRL's documentation shows."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from .models import pick_device, resolve_base

    def rows(examples: list[Any]) -> Dataset:
        if examples[0].text is not None:
            return Dataset.from_list([{"text": e.text} for e in examples])
        return Dataset.from_list(  # conversational prompt-completion: the loss covers the answer
            [{"prompt": list(e.messages[:-1]), "completion": [e.messages[-1]]} for e in examples]
        )

    train_examples, val_examples = split_rows(settings)
    optional = {"bf16": bf16} if bf16 is not None else {}  # None: TRL's own default
    args = SFTConfig(
        output_dir=str(out),
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        learning_rate=2e-4,  # TRL's PEFT docs: "~10x the full fine-tuning rate for LoRA"
        max_length=settings.max_length,
        eval_strategy="steps",
        eval_steps=settings.eval_every_steps,
        logging_steps=settings.eval_every_steps,
        save_strategy="no",
        report_to="none",
        include_num_input_tokens_seen="non_padding",
        seed=settings.seed,
        use_cpu=pick_device() == "cpu",
        **optional,
    )
    trainer = SFTTrainer(
        model=str(resolve_base(settings.model).folder),
        args=args,
        train_dataset=rows(train_examples),
        eval_dataset=rows(val_examples),
        peft_config=LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
        callbacks=[clock],
    )
    trainer.train()


def run_studio(settings: RunSettings, speedups: Any, clock: BenchClock, out: Path) -> None:
    """LoRA Studio's `train()` with its default recipe, on the shared data and budget."""
    from .config import Recipe
    from .training import train

    overrides = {
        "base_model": settings.model,
        "train_file": str(Path(settings.data).resolve()),
        "val_file": None,
        "val_fraction": settings.val_fraction,
        "max_length": settings.max_length,
        "num_train_epochs": settings.epochs,
        "max_steps": settings.max_steps,
        "per_device_train_batch_size": settings.batch_size,
        "eval_every_steps": settings.eval_every_steps,
        "save_every_steps": settings.eval_every_steps * 100_000,  # no checkpoints mid-run (TRL saves none)
        "early_stopping_patience": None,  # the same token budget for every configuration
        "seed": settings.seed,
        "output_dir": str(out),
        "speedups": speedups,
    }
    recipe = Recipe.from_yaml(settings.recipe, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    train(recipe, callbacks=[clock])


def peak_flops(dtype: torch.dtype, device: str) -> float:
    """This machine's matmul FLOP/s in `dtype` right now: the best of a few large multiplications."""
    n = 2048 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = math.inf
    for _ in range(4):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def run(name: str, settings: RunSettings) -> dict[str, Any]:
    """Measure one configuration in this process."""
    from .models import pick_device

    kind, option, _ = CONFIGS[name]
    device = pick_device()
    clock = BenchClock(time.perf_counter(), Path(settings.out) / f".progress-{name}")
    if kind == "trl":
        run_trl(settings, option, clock, Path(settings.out) / "runs" / name)
    else:
        run_studio(settings, option, clock, Path(settings.out) / "runs" / name)
    if device == "cuda":
        peak_mem = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    result = clock.result()
    peak = peak_flops(torch.bfloat16 if clock.bf16 else torch.float32, device)  # now, in the same process
    flops_per_s = result["flops"] / result["train_s"]
    result.update(
        peak_mem_mb=round(peak_mem, 1),
        compute_dtype="bf16" if clock.bf16 else "fp32",
        peak_flops_per_s=round(peak),
        utilisation=round(flops_per_s / peak, 4) if flops_per_s else None,
    )
    return result


def main(argv: list[str]) -> None:
    name, settings = argv[0], RunSettings(**json.loads(argv[1]))
    if settings.threads:
        torch.set_num_threads(settings.threads)
    print("RESULT " + json.dumps(run(name, settings)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
