"""Inference speed: the base, an unmerged adapter and the merged model on the same prompts, in one run.

    .venv/bin/python benchmarks/inference_speed.py                 # SmolLM2 + a fresh r=16 all-linear adapter
    .venv/bin/python benchmarks/inference_speed.py --adapter runs/x/adapter --rounds 5

Prints greedy generation tokens/s for each (medians over rounds; the variants take turns within
each round, so a busy machine slows them alike and the ratios stay fair), the ratios to the base,
and the time to switch between two loaded adapters. Goals: unmerged adapter at most 15% slower than
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


def make_adapter(base: str, dest: Path, seed: int) -> Path:
    """An adapter as the default recipe makes it (r=16 on every linear layer of every block),
    with small random weights so it changes the answers like a trained one."""
    model, tokenizer, ref = load_base(ModelSettings(base_model=base))
    peft = attach_lora(model, LoraSettings())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.002)
    meta = {"base_model": base, "base_model_hash": model_fingerprint(ref.folder), "recipe": {"model": {}}}
    return save_adapter(peft, tokenizer, dest, meta)


def tokens_per_second(engine: InferenceEngine, adapter: str | None, max_new_tokens: int) -> tuple[float, int]:
    tokens, seconds = 0, 0.0
    for prompt in PROMPTS:
        start = time.perf_counter()
        reply = engine.start([{"role": "user", "content": prompt}], adapter, max_new_tokens=max_new_tokens)
        reply.wait()
        seconds += time.perf_counter() - start
        tokens += reply.completion_tokens
    return tokens / seconds, tokens


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default=DEFAULT_BASE_MODEL, help="base model when no --adapter is given")
    parser.add_argument("--adapter", help="an adapter folder to measure (default: make one)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per variant (default 3)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens per answer (default 48)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lora-studio-bench-") as work:
        work_dir = Path(work)
        adapter = Path(args.adapter) if args.adapter else make_adapter(args.base, work_dir / "a", seed=1)
        other = make_adapter_for_switch(adapter, work_dir)
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
        counts: dict[str, int] = {}
        for _ in range(args.rounds):
            for label, (engine, name) in variants.items():
                rate, counts[label] = tokens_per_second(engine, name, args.max_new_tokens)
                rates[label].append(rate)

        switches = []
        for i in range(50):
            switches.append(with_adapters.activate("a" if i % 2 else "b") * 1000)

    device = next(plain._base.parameters()).device
    print(
        f"base {plain.settings.base_model} on {device} ({torch.get_num_threads()} threads), "
        f"{len(PROMPTS)} prompts x {args.max_new_tokens} new tokens max, {args.rounds} rounds, greedy"
    )
    base_rate = statistics.median(rates["base"])
    for label, values in rates.items():
        rate = statistics.median(values)
        print(
            f"  {label:<22} {rate:7.1f} tokens/s  ({rate / base_rate:6.1%} of base; "
            f"{counts[label]} tokens per round; rounds: {', '.join(f'{v:.1f}' for v in values)})"
        )
    print(
        f"  adapter switch         median {statistics.median(switches):.3f} ms, max {max(switches):.3f} ms "
        f"over {len(switches)} switches (no weights move; PEFT set_adapter)"
    )
    return 0


def make_adapter_for_switch(adapter: Path, work_dir: Path) -> Path:
    """A second adapter on the same base, to switch to and from."""
    from lora_studio.adapters import read_metadata
    from lora_studio.inference import base_settings

    return make_adapter(base_settings(read_metadata(adapter)).base_model, work_dir / "b", seed=2)


if __name__ == "__main__":
    sys.exit(main())
