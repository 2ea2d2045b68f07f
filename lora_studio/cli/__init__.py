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
from ..remote_code import REMOTE_CODE_FLAG, take_operator_word
from ..threads import set_explicit

# Command groups, in the order `--help` lists them.
GROUPS = ["train", "runs", "eval", "jobs", "ui", "use", "classify", "bench"]
# Third-party log records a user cannot act on, hidden unless -v: (logger, start of the message).
KNOWN_NOISE = [
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),  # an optional CPU kernel
    ("transformers.trainer_utils", "mtime may not be reliable"),  # how the Trainer orders checkpoints
    ("kernels._internals.hf_hub", "Skipping publisher trust check"),  # offline: that optional kernel again
]


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
    if not args.verbose:
        hide_known_noise()  # before anything imports the libraries that log it
    # The operator's word holds for this command alone; a worker takes it from each job's record.
    take_operator_word(getattr(args, "trust_remote_code", False), from_env=args.command != "worker")
    if (
        getattr(args, "threads", None) is not None and args.command != "bench"
    ):  # bench hands its own to each run
        set_explicit(args.threads, children=args.command == "worker")  # a worker's jobs use it too
    try:
        return args.run(args) or 0
    except LoraStudioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def hide_known_noise() -> None:
    """Hide the log records of KNOWN_NOISE, each by its logger and the start of its message only."""
    for name, prefix in KNOWN_NOISE:
        logging.getLogger(name).addFilter(lambda record, p=prefix: not record.getMessage().startswith(p))


def add_remote_code_flag(parser: argparse.ArgumentParser) -> None:
    """The operator's permission for base models to run their own code (never taken from files)."""
    parser.add_argument(
        REMOTE_CODE_FLAG,
        action="store_true",
        help="let base models run the Python code they ship (trust_remote_code); only for models you "
        "trust. Adapters, recipes and requests can ask for it but never turn it on.",
    )


def add_threads_flag(parser: argparse.ArgumentParser, what: str = "this command") -> None:
    """`--threads N`: compute threads, used as given (no sharing with the studio's other processes)."""
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help=f"compute threads for {what} (default: its share of the cores this process may use, split with "
        "the studio's other training, chat and serve processes; $OMP_NUM_THREADS also sets it)",
    )


def add_precision_flag(parser: argparse.ArgumentParser, flag: str = "--precision") -> None:
    """How a classifier reads texts (tasks/classify/model.Classifier's precision)."""
    parser.add_argument(
        flag,
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="how classifiers read texts: auto (default) bf16 autocast on CPUs with native bf16 (2-2.5x "
        "faster, probabilities within ~0.05), else fp32; fp32: exact fp32 probabilities",
    )


if __name__ == "__main__":
    sys.exit(main())
