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

# Command groups, in the order `--help` lists them.
GROUPS = ["train", "jobs", "ui", "use", "classify"]


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


if __name__ == "__main__":
    sys.exit(main())
