"""Options and formats that several commands share, written once."""

from __future__ import annotations

import argparse
import inspect
import time
from collections.abc import Callable
from typing import Any


def command(
    sub: argparse._SubParsersAction, name: str, run: Callable[[argparse.Namespace], int], **kw: Any
) -> argparse.ArgumentParser:
    """A subcommand whose `run(args)` does the work. Its help is `run`'s docstring, written once: the
    first line for the command list, the rest for `--help`."""
    first, _, rest = (inspect.getdoc(run) or "").partition("\n")
    kw.setdefault("help", first[:1].lower() + first[1:].rstrip("."))
    kw.setdefault("description", rest.strip() or None)
    parser = sub.add_parser(name, **kw)
    parser.set_defaults(run=run)
    return parser


def add_exposure_options(
    parser: argparse.ArgumentParser, *, port: int, secret: str, secret_help: str, file_help: str, exposed: str
) -> None:
    """Where a server listens and who may use it: --host (loopback by default), --port, a secret given
    as --SECRET or --SECRET-file, and --insecure-no-auth to bind beyond loopback without one."""
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=port, help=f"port (default {port})")
    parser.add_argument(f"--{secret}", default=None, help=secret_help)
    parser.add_argument(f"--{secret}-file", default=None, metavar="FILE", help=file_help)
    parser.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help=f"allow a --host beyond this machine without a {secret.replace('-', ' ')} ({exposed})",
    )


# --- formats of the tables --------------------------------------------------------------------------
def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def when(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


def num(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)
