"""Inference speed: the base, an unmerged adapter and the merged model on the same prompts, in one run.

    .venv/bin/python benchmarks/inference_speed.py                 # SmolLM2 + a fresh r=16 all-linear adapter
    .venv/bin/python benchmarks/inference_speed.py --adapter runs/x/adapter --rounds 5

Prints greedy generation tokens/s for each and its speed relative to the base: the variants take
turns prompt by prompt, and each round's rate is divided by the base's in the same round, so a
busy (shared) machine slows both sides of every ratio alike. Then the time to switch between two
loaded adapters. Goals: unmerged adapter at most 15% slower than
the base, merged indistinguishable from the base, a switch under 50 ms. Not a test: it asserts
nothing, it reports.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lora_studio.adapters import attach_lora, save_adapter
from lora_studio.config import DEFAULT_BASE_MODEL, LoraSettings, ModelSettings
from lora_studio.export import merge_adapter
from lora_studio.inference import InferenceEngine
from lora_studio.models import load_base, model_fingerprint

PROMPTS = [
    "What is the capital of France?",
    "Write two sentences about the sea.",
    "List three uses of a paperclip.",
]


def make_adapter(base: str, dest: Path, seed: int, lora: LoraSettings | None = None) -> Path:
    """An adapter as the recipe makes it (default: r=16 on every linear layer of every block),
    with small random weights so it changes the answers like a trained one."""
    model, tokenizer, ref = load_base(ModelSettings(base_model=base))
    peft = attach_lora(model, lora or LoraSettings())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.002)
    meta = {"base_model": base, "base_model_hash": model_fingerprint(ref.folder), "recipe": {"model": {}}}
    return save_adapter(peft, tokenizer, dest, meta)


def one_answer(
    engine: InferenceEngine, adapter: str | None, prompt: str, max_new_tokens: int
) -> tuple[int, float]:
    start = time.perf_counter()
    reply = engine.start([{"role": "user", "content": prompt}], adapter, max_new_tokens=max_new_tokens)
    reply.wait()
    return reply.completion_tokens, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default=DEFAULT_BASE_MODEL, help="base model when no --adapter is given")
    parser.add_argument("--adapter", help="an adapter folder to measure (default: make one)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per variant (default 3)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens per answer (default 48)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--layers", type=int, default=None, help="made adapter: adapt only the top N blocks")
    parser.add_argument("--target-modules", default="all-linear", help="made adapter: e.g. q_proj,v_proj")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    lora = LoraSettings(layers=args.layers, target_modules=targets)

    with tempfile.TemporaryDirectory(prefix="lora-studio-bench-") as work:
        work_dir = Path(work)
        adapter = Path(args.adapter) if args.adapter else make_adapter(args.base, work_dir / "a", 1, lora)
        other = make_adapter_for_switch(adapter, work_dir, lora)
        merged = merge_adapter(adapter, work_dir / "merged").out_dir

        with_adapters = InferenceEngine.from_adapters([adapter, other], ["a", "b"])
        plain = InferenceEngine(with_adapters.settings)
        merged_engine = InferenceEngine(str(merged))
        variants = {
            "base": (plain, None),
            "unmerged adapter": (with_adapters, "a"),
            "merged model": (merged_engine, None),
            "base via adapters off": (with_adapters, None),
        }
        for engine, name in variants.values():  # warm-up: first calls pay one-time costs
            engine.chat([{"role": "user", "content": "hi"}], name, max_new_tokens=4)
        rates: dict[str, list[float]] = {label: [] for label in variants}
        labels = list(variants)
        for r in range(args.rounds):
            tokens = dict.fromkeys(labels, 0)
            seconds = dict.fromkeys(labels, 0.0)
            for prompt in PROMPTS:  # variants take turns prompt by prompt, in a rotating order
                for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
                    engine, name = variants[label]
                    n, dt = one_answer(engine, name, prompt, args.max_new_tokens)
                    tokens[label] += n
                    seconds[label] += dt
            for label in labels:
                rates[label].append(tokens[label] / seconds[label])

        switches = []
        for i in range(50):
            switches.append(with_adapters.activate("a" if i % 2 else "b") * 1000)

    device = next(plain._base.parameters()).device
    print(
        f"base {plain.settings.base_model} on {device} ({torch.get_num_threads()} threads), adapter "
        f"{describe(lora) if not args.adapter else args.adapter}, "
        f"{len(PROMPTS)} prompts x {args.max_new_tokens} new tokens max, {args.rounds} rounds, greedy"
    )
    for label, values in rates.items():
        # Paired: each round's rate over the base's in the same round, so load changes cancel out.
        ratios = [v / b for v, b in zip(values, rates["base"], strict=True)]
        print(
            f"  {label:<22} {statistics.median(values):6.1f} tokens/s median, {max(values):6.1f} best; "
            f"vs base: {statistics.median(ratios):6.1%} (rounds: {', '.join(f'{x:.0%}' for x in ratios)})"
        )
    print(
        f"  adapter switch         median {statistics.median(switches):.3f} ms, max {max(switches):.3f} ms "
        f"over {len(switches)} switches (no weights move; PEFT set_adapter)"
    )
    return 0


def describe(lora: LoraSettings) -> str:
    return f"r={lora.r} on {lora.target_modules}, layers={lora.layers or 'all'}"


def make_adapter_for_switch(adapter: Path, work_dir: Path, lora: LoraSettings) -> Path:
    """A second adapter on the same base, to switch to and from."""
    from lora_studio.adapters import read_metadata
    from lora_studio.inference import base_settings

    return make_adapter(base_settings(read_metadata(adapter)).base_model, work_dir / "b", 2, lora)


if __name__ == "__main__":
    sys.exit(main())
