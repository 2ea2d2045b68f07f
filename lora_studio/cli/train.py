"""`lora-studio train`, `models` and `data check`: fine-tune, see bases, check a data file."""

from __future__ import annotations

import argparse

from ..config import SECTIONS, DataSettings, Recipe, add_set_argument
from ..data import FORMAT_FIELDS
from . import add_remote_code_flag, add_threads_flag
from .options import command


def register(sub: argparse._SubParsersAction) -> None:
    p = command(
        sub,
        "train",
        run=run_train,
        help="fine-tune an adapter from a YAML recipe",
        description="Fine-tune a LoRA adapter as a recipe says.",
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", help="a YAML recipe, e.g. recipes/smollm2-lora-cpu.yaml")
    add_set_argument(p)
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    add_threads_flag(p, "training")
    add_remote_code_flag(p)

    p = command(sub, "models", run_models)

    data = sub.add_parser("data", help="work with data files").add_subparsers(
        dest="data_command", required=True
    )
    p = command(data, "check", run_data_check)
    p.add_argument("file", help="a .jsonl, .json, .csv or .parquet file, or a saved datasets folder")
    p.add_argument(
        "--format",
        default="auto",
        help="the row format, if not detected: auto (default), " + ", ".join(FORMAT_FIELDS),
    )
    p.add_argument("--base-model", default=None, help="render examples with this model's chat template")
    p.add_argument("--max-length", type=int, default=DataSettings.max_length, help="token limit per example")
    p.add_argument(
        "--fit",
        action="store_true",
        help="also check how well the base fits: zero-shot score and answer loss, with a verdict (loads the model)",
    )
    add_remote_code_flag(p)


def settings_help() -> str:
    """Every recipe setting with its section, default and help, for `train --help`."""
    import dataclasses
    import textwrap

    lines = ["recipe settings (YAML sections, or --set NAME=VALUE):"]
    for section, kind in SECTIONS.items():
        lines.append(f"  {section}:")
        for f in dataclasses.fields(kind):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"    {f.name} (default {default!r})")
            lines += textwrap.wrap(f.metadata["help"], 90, initial_indent=" " * 8, subsequent_indent=" " * 8)
    return "\n".join(lines)


def run_train(args: argparse.Namespace) -> int:
    """Train with the progress display; `-v` shows everything instead (the Trainer's own output too)."""
    recipe = Recipe.load(args.recipe, args.overrides)
    if args.verbose:
        from ..training import train

        result = train(recipe, resume=args.resume)
        print(f"adapter: {result.adapter_dir}")
        for key, value in result.metrics.items():
            print(f"  {key}: {value}")
        return 0
    from ..progress import train_on_console

    train_on_console(recipe, resume=args.resume)
    return 0


def run_models(args: argparse.Namespace) -> int:
    """List the base models available without a download."""
    from ..models import list_models

    for row in list_models():
        print(f"{row['name']:<48} {row['kind']:<15} {row['status']:<10} {row['detail']}")
    return 0


def run_data_check(args: argparse.Namespace) -> int:
    """Parse a data file, detect its format and report problems."""
    from ..config import DEFAULT_BASE_MODEL
    from ..data import check_file, check_options
    from ..models import load_tokenizer, resolve_base

    check_options(args.format, args.max_length)  # before the (slow) tokenizer load
    tokenizer = load_tokenizer(resolve_base(args.base_model or DEFAULT_BASE_MODEL).folder)
    print("\n".join(check_file(args.file, tokenizer, args.format, args.max_length).lines()))
    if args.fit:
        print(task_fit(args.file, args.format, args.base_model or DEFAULT_BASE_MODEL, args.max_length))
    return 0


def task_fit(path: str, fmt: str, base_model: str, max_length: int) -> str:
    from ..evaluation.fit import fit_models

    reports, _ = fit_models([base_model], path, fmt, max_length=max_length)
    return "\n".join(reports[0].lines())
