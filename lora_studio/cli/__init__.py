"""The `lora-studio` command: one small module per group of subcommands.

Each group module has `register(subparsers)`, adding its commands with `set_defaults(run=...)`;
a command's `run(args) -> int` is a thin call into the library. User mistakes (any
LoraStudioError) end with a one-line message and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..errors import LoraStudioError
from ..remote_code import REMOTE_CODE_FLAG, allow_remote_code

# Command groups, in the order `--help` lists them.
GROUPS = ["train", "runs", "eval", "jobs", "ui", "use", "classify", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-studio", description="Fine-tune, try and serve LoRA adapters."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in GROUPS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if getattr(args, "trust_remote_code", False):
        allow_remote_code()
    try:
        return args.run(args) or 0
    except LoraStudioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe setting, e.g. --set max_steps=10 (repeatable)",
    )


def add_remote_code_flag(parser: argparse.ArgumentParser) -> None:
    """The operator's permission for base models to run their own code (never taken from files)."""
    parser.add_argument(
        REMOTE_CODE_FLAG,
        action="store_true",
        help="let base models run the Python code they ship (trust_remote_code); only for models you "
        "trust. Adapters, recipes and requests can ask for it but never turn it on.",
    )


if __name__ == "__main__":
    sys.exit(main())
