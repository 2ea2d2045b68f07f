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
from .threads import available_cores, set_explicit

SAMPLE_EVERY = 8  # FLOPs are counted on every 8th step only: counting slows a step several-fold


class BenchClock(TrainerCallback):
    """Training time without the evaluations, the held-out loss curve, FLOPs per token, progress.

    FLOPs are counted by torch's FlopCounterMode over sampled spans, each from one step's end to
    the next (so the feature cache's filling while a batch is collated counts too). Counting
    intercepts every operation and slows the span several-fold, so sampled spans are left out of
    the timed training: tokens/s comes from the others, and FLOPs/s is FLOPs per token (from the
    samples) times tokens/s. A span that ends in an evaluation is dropped.
    """

    def __init__(self, started: float, progress_file: Path):
        self.started = started  # before the model was loaded: setup counts
        self.progress_file = progress_file
        self.eval_s = 0.0
        self.curve: list[dict[str, float]] = []
        self.ended: float | None = None
        self.tokens = 0
        self.bf16 = False
        self.sampled = {"flops": 0.0, "tokens": 0, "seconds": 0.0}  # spans left out of the timing
        self._span: tuple[Any, float, int] | None = None  # (counter, start time, tokens at start)
        self._warm: dict[str, float] | None = None  # the counters at the first step's end

    def _close_span(self, state: Any, keep: bool) -> None:
        if self._span is None:
            return
        counter, start, tokens = self._span
        counter.__exit__(None, None, None)
        self._span = None
        if keep:  # a dropped span held an evaluation, whose time eval_s leaves out already
            self.sampled["seconds"] += time.perf_counter() - start
            self.sampled["flops"] += counter.get_total_flops()
            self.sampled["tokens"] += state.num_input_tokens_seen - tokens

    def _open_span(self, state: Any) -> None:
        from torch.utils.flop_counter import FlopCounterMode

        if state.global_step % SAMPLE_EVERY == 0:
            counter = FlopCounterMode(display=False)
            counter.__enter__()
            self._span = (counter, time.perf_counter(), state.num_input_tokens_seen)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.bf16 = bool(args.bf16)  # bf16 autocast (or bf16 weights on a GPU): its peak is the yardstick
        self._open_span(state)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._close_span(state, keep=True)
        if self._warm is None:
            self._warm = self._counters(time.perf_counter(), state.num_input_tokens_seen)
        self.progress_file.write_text(f"{state.global_step} {state.max_steps}")
        self._open_span(state)

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kw: Any
    ) -> None:
        if self.ended is not None or not metrics:
            return  # an evaluation after training (a final report) is not part of the run
        self._close_span(state, keep=False)  # the span since the last step's end held this evaluation
        self.eval_s += metrics.get("eval_runtime", 0.0)
        self.curve.append(
            {
                "step": state.global_step,
                "tokens": state.num_input_tokens_seen,
                "timed_s": time.perf_counter() - self.started - self.eval_s - self.sampled["seconds"],
                "sampled_tokens": self.sampled["tokens"],
                "loss": metrics["eval_loss"],
            }
        )
        self._open_span(state)  # sample the next step after all

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._close_span(state, keep=True)
        self.ended = time.perf_counter()
        self.tokens = state.num_input_tokens_seen

    def _counters(self, at: float, tokens: int) -> dict[str, float]:
        """Timed seconds and tokens up to `at` (evaluations and sampled spans left out)."""
        seconds = at - self.started - self.eval_s - self.sampled["seconds"]
        return {"seconds": seconds, "tokens": tokens - self.sampled["tokens"]}

    def steady_tokens_per_s(self) -> float | None:
        """Tokens/s after the first step: without loading and warm-up, which swamp a short probe."""
        if self._warm is None or self.ended is None:
            return None
        now = self._counters(self.ended, self.tokens)
        seconds = now["seconds"] - self._warm["seconds"]
        return (now["tokens"] - self._warm["tokens"]) / seconds if seconds > 0 else None

    def result(self) -> dict[str, Any]:
        timed_s = (self.ended or time.perf_counter()) - self.started - self.eval_s - self.sampled["seconds"]
        tokens_per_s = (self.tokens - self.sampled["tokens"]) / timed_s
        # a sampled span's time is what its tokens take at the measured speed
        curve = [
            {"step": p["step"], "tokens": p["tokens"], "loss": p["loss"],
             "train_s": round(p["timed_s"] + p["sampled_tokens"] / tokens_per_s, 2)}
            for p in self.curve
        ]  # fmt: skip
        return {
            "train_s": round(timed_s + self.sampled["tokens"] / tokens_per_s, 2),
            "tokens": self.tokens,
            "tokens_per_s": round(tokens_per_s, 1),
            "steady_tokens_per_s": round(self.steady_tokens_per_s() or tokens_per_s, 1),
            "heldout_loss": curve[-1]["loss"] if curve else None,
            "curve": curve,
            "flops_per_token": self.sampled["flops"] / max(1, self.sampled["tokens"]),
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


def run_studio(settings: RunSettings, changes: dict[str, Any], clock: BenchClock, out: Path) -> None:
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
        **changes,  # the configuration's own (speedups, layers)
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
    flops_per_s = result["flops_per_token"] * result["tokens_per_s"]
    result.update(
        peak_mem_mb=round(peak_mem, 1),
        compute_dtype="bf16" if clock.bf16 else "fp32",
        peak_flops_per_s=round(peak),
        utilisation=round(flops_per_s / peak, 4) if flops_per_s else None,
        threads=torch.get_num_threads(),  # at the end: LoRA Studio's share, or fewer under outside load
        cores=available_cores(),
    )
    return result


def main(argv: list[str]) -> None:
    name, settings = argv[0], RunSettings(**json.loads(argv[1]))
    if settings.threads:  # as given, for TRL and for LoRA Studio's training alike
        set_explicit(settings.threads)
        torch.set_num_threads(settings.threads)
    print("RESULT " + json.dumps(run(name, settings)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
