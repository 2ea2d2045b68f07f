"""`lora-studio bench`: training speed against plain TRL + PEFT, measured in one run on this machine."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import command


def register(sub: argparse._SubParsersAction) -> None:
    from ..bench import CONFIGS, DEFAULT_DATA, DEFAULT_RECIPE, BenchOptions

    defaults = BenchOptions()
    p = command(
        sub,
        "bench",
        run_bench,
        epilog="configurations:\n"
        + "\n".join(f"  {name:<13} {title}" for name, (_, _, title) in CONFIGS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--out", type=Path, default=defaults.out, help="folder for bench.json and logs (default: %(default)s)"
    )
    p.add_argument(
        "--model",
        default=defaults.model,
        help="base model (default: %(default)s), or random:llama-1b / random:CONFIG.json for a random one",
    )
    p.add_argument("--data", default=_shown(DEFAULT_DATA), help="training data file (default: %(default)s)")
    p.add_argument(
        "--recipe",
        default=_shown(DEFAULT_RECIPE),
        help="LoRA Studio's recipe (default: %(default)s)",
    )
    p.add_argument(
        "--epochs", type=float, default=defaults.epochs, help="passes over the data (default: %(default)s)"
    )
    p.add_argument(
        "--max-steps", type=int, default=defaults.max_steps, help="cap every run at N optimizer steps"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per run (default: one per core); 1 gives steadier figures on a busy machine",
    )
    p.add_argument(
        "--configs",
        default=",".join(defaults.configs),
        help="comma-separated configurations to run, or 'all' (default: %(default)s; at least one TRL "
        "baseline). The levers' own rows (cache, label_only, bf16, studio-plain) come with 'all'.",
    )
    p.add_argument(
        "--full-baselines",
        action="store_true",
        help="run every TRL setup in full (default: one a short probe finds 2x slower or worse is not)",
    )


def _shown(path: Path) -> str:
    """A default path as short as it can be shown: relative to the current folder when inside it."""
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def run_bench(args: argparse.Namespace) -> int:
    """Measure training speed, memory and held-out loss against plain TRL + PEFT.

    Train the same data with plain TRL + PEFT and with LoRA Studio (its default recipe and each
    speedup on its own), each in its own process, and report tokens/s, peak memory, held-out loss
    and utilisation as ratios to the faster TRL setup."""
    from .. import bench

    options = bench.BenchOptions(
        out=args.out,
        model=args.model,
        data=args.data,
        recipe=args.recipe,
        epochs=args.epochs,
        max_steps=args.max_steps,
        threads=args.threads,
        configs=bench.config_names(args.configs),
        probe=not args.full_baselines,
    )
    report = bench.run_bench(options)
    print(bench.format_table(report))
    print(f"\nwritten: {args.out / 'bench.json'}")
    return 0
