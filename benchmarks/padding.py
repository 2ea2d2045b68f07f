"""Padding waste: the share of batch tokens that are padding, with the Trainer's length-grouped
batches (training's default) and with random batches, for any data files.

    .venv/bin/python benchmarks/padding.py examples/*/train.jsonl
    .venv/bin/python benchmarks/padding.py FILE --batch-size 4 --model PATH

Padding-free packing can save at most the grouped share, so this is the ceiling on what packing
would buy. Not a test: it asserts nothing, it reports.
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers.trainer_pt_utils import get_length_grouped_indices

from lora_studio.config import DEFAULT_BASE_MODEL, DataSettings
from lora_studio.data import encode, load_examples
from lora_studio.models import load_tokenizer, resolve_base

SEEDS = 5  # epochs' worth of shuffles averaged


def padded_tokens(lengths: list[int], order: list[int], batch_size: int) -> int:
    """Tokens in the padded batches that `order` makes (each batch as long as its longest row)."""
    batches = (order[i : i + batch_size] for i in range(0, len(order), batch_size))
    return sum(max(lengths[j] for j in b) * len(b) for b in batches)


def padding_shares(lengths: list[int], batch_size: int) -> tuple[float, float]:
    """(grouped, random) padding shares over SEEDS shuffles."""
    grouped = shuffled = 0
    for seed in range(SEEDS):
        generator = torch.Generator().manual_seed(seed)
        grouped += padded_tokens(
            lengths, get_length_grouped_indices(lengths, batch_size, generator=generator), batch_size
        )
        shuffled += padded_tokens(
            lengths, torch.randperm(len(lengths), generator=generator).tolist(), batch_size
        )
    real = SEEDS * sum(lengths)
    return 1 - real / grouped, 1 - real / shuffled


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+")
    p.add_argument("--model", default=DEFAULT_BASE_MODEL, help="whose tokenizer (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=DataSettings.max_length)
    args = p.parse_args(argv)
    tokenizer = load_tokenizer(resolve_base(args.model).folder)
    for path in args.files:
        _, examples = load_examples(path)
        lengths = [len(encode(e, tokenizer, args.max_length)["input_ids"]) for e in examples]
        grouped, shuffled = padding_shares(lengths, args.batch_size)
        print(
            f"{path}: {len(lengths)} rows, {sum(lengths) / len(lengths):.0f} tokens each on average; "
            f"padding {grouped:.1%} of batch tokens length-grouped, {shuffled:.1%} random"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
