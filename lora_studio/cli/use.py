"""`lora-studio chat`, `merge`, `export`, `serve` and `verify`: use and ship a trained adapter."""

from __future__ import annotations

import argparse
import os
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import DEFAULT_BASE_MODEL, DType, GgufQuant, VerifyTarget
from ..errors import ConfigError
from . import add_precision_flag, add_remote_code_flag, add_threads_flag
from .options import add_exposure_options, command
from .runs import adapter_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "chat", run_chat)
    p.add_argument(
        "adapter",
        nargs="?",
        type=adapter_arg,
        help="an adapter folder, or a run name or id (`lora-studio adapters list`); omit to chat with --base",
    )
    p.add_argument(
        "--base", default=None, help=f"base model when no adapter is given (default {DEFAULT_BASE_MODEL})"
    )
    p.add_argument(
        "--compare", action="store_true", help="show the base model's answer next to the adapter's"
    )
    p.add_argument("--prompt", help="answer this one prompt and exit (no interactive session)")
    p.add_argument("--system", help="a system message for the conversation")
    _generation_args(p)
    add_threads_flag(p, "the chat")
    add_remote_code_flag(p)

    p = command(sub, "merge", run_merge)
    p.add_argument("adapter", type=adapter_arg, help="an adapter folder, or a run name or id")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=typing.get_args(DType),
        help="saved weight dtype (auto: the base checkpoint's)",
    )
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    add_remote_code_flag(p)

    p = command(sub, "export", run_export)
    p.add_argument("adapter", type=adapter_arg, help="an adapter folder, or a run name or id")
    p.add_argument("--format", default="gguf", choices=["gguf"], help="the file format (gguf)")
    p.add_argument(
        "--quant", default="f16", choices=typing.get_args(GgufQuant), help="weight format in the file"
    )
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    add_remote_code_flag(p)

    p = command(sub, "serve", run_serve)
    p.add_argument(
        "adapters", nargs="*", metavar="ADAPTER", help="adapter folders or run names, optionally as NAME=PATH"
    )
    p.add_argument("--base", default=None, help="the base model (default: the first adapter's)")
    add_exposure_options(
        p,
        port=8000,
        secret="api-key",
        secret_help="require 'Authorization: Bearer KEY' (visible in ps: prefer --api-key-file or "
        "$LORA_STUDIO_API_KEY, used when neither option is given)",
        file_help="read the API key from this file",
        exposed="anyone who connects can use it",
    )
    p.add_argument(
        "--max-body-mb",
        type=float,
        default=4.0,
        help="largest request body, in MB; more gets 413 (default 4)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=16,
        help="requests that may wait for the model; more get 429 with Retry-After (default 16)",
    )
    add_precision_flag(p, "--classify-precision")  # each /v1/classify response says which
    add_threads_flag(p, "the server")
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name or address clients may reach the server by, besides this machine's loopback "
        "and --host (repeatable; '*' allows any). Other Host headers get 400 (DNS rebinding)",
    )
    add_remote_code_flag(p)

    p = command(sub, "verify", run_verify)
    p.add_argument("adapter", type=adapter_arg, help="an adapter folder, or a run name or id")
    p.add_argument("--merged", help="an existing merged folder to check (default: merge now)")
    p.add_argument("--gguf", help="an existing GGUF file to check (default: export now)")
    p.add_argument(
        "--quant",
        default="f16",
        choices=typing.get_args(GgufQuant),
        help="format of the GGUF made for the check",
    )
    p.add_argument("--server", help="URL of a running server to check (default: start one on a free port)")
    p.add_argument("--model", help="model id to ask the server for (default: the adapter's name)")
    p.add_argument("--api-key", default=None, help="the server's API key (default: $LORA_STUDIO_API_KEY)")
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=typing.get_args(VerifyTarget),
        help="leave a target out (repeatable)",
    )
    p.add_argument(
        "--prompt",
        action="append",
        default=[],
        help="a prompt to check (repeatable; default: the adapter's first training chats)",
    )
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer length compared (default 32)")
    add_remote_code_flag(p)


def _generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, reproducible (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling share (default 1.0)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")


# --- chat --------------------------------------------------------------------------------------
def run_chat(args: argparse.Namespace) -> int:
    """Chat with an adapter (or the base) in the terminal, streamed.

    Chat in the terminal. Type /reset to start over, /exit (or Ctrl-D) to leave."""
    from ..adapters import adapter_name
    from ..generation import GenerationSettings
    from ..inference import InferenceEngine

    if args.compare and not args.adapter:
        raise ConfigError("--compare needs an adapter folder to compare with the base")
    if args.adapter:
        name = adapter_name(args.adapter)
        engine = InferenceEngine.from_adapters([args.adapter], [name], base=args.base)
    else:
        name, engine = None, InferenceEngine(args.base or DEFAULT_BASE_MODEL)
    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.seed).check()
    sides = [("base", None), (name, name)] if args.compare else [(name or engine.base_name, name)]
    system = [{"role": "system", "content": args.system}] if args.system else []
    histories = {label: list(system) for label, _ in sides}

    def answer(prompt: str) -> None:
        for label, adapter in sides:
            history = histories[label]
            history.append({"role": "user", "content": prompt})
            if len(sides) > 1 or sys.stdin.isatty():
                print(f"[{label}] ", end="", flush=True)
            text = _stream(
                engine.stream_chat(history, adapter, settings), lambda s: print(s, end="", flush=True)
            )
            print(flush=True)
            history.append({"role": "assistant", "content": text})

    if args.prompt is not None:
        answer(args.prompt)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {' vs '.join(label for label, _ in sides)}; /reset starts over, /exit leaves")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            histories = {label: list(system) for label, _ in sides}
            continue
        if line.strip():
            answer(line)


def _stream(pieces: Any, write: Callable[[str], Any]) -> str:
    text = ""
    for piece in pieces:
        write(piece)
        text += piece
    return text


# --- merge / export ----------------------------------------------------------------------------
def run_merge(args: argparse.Namespace) -> int:
    """Merge an adapter into its base: a standalone model folder, verified."""
    from ..tasks.registry import task_of

    task = task_of(args.adapter)
    report = task.merge(Path(args.adapter), Path(args.out), dtype=args.dtype, overwrite=args.force)
    print("\n".join(report.lines()))
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Export the merged model as a GGUF file (llama.cpp, Ollama), verified."""
    from ..export import export_gguf

    report = export_gguf(args.adapter, args.out, quant=args.quant, overwrite=args.force)
    print("\n".join(report.lines()))
    return 0


# --- serve -------------------------------------------------------------------------------------
def served_adapters(specs: list[str]) -> tuple[list[str], list[str]]:
    """(names, folders) for `serve`'s NAME=ADAPTER or ADAPTER arguments (a folder, run name or id).

    A run given by name or id is served under what was typed; a folder under its run's name.
    """
    from ..adapters import adapter_name
    from ..runs import adapter_folder

    names, paths = [], []
    for spec in specs:
        name, sep, ref = spec.partition("=")
        ref = ref if sep else spec
        path = str(adapter_folder(ref))
        names.append(name if sep else ref if not Path(ref).expanduser().exists() else adapter_name(path))
        paths.append(path)
    return names, paths


def run_serve(args: argparse.Namespace) -> int:
    """Serve adapters over an OpenAI-compatible HTTP API.

    Serve the base model and chat adapters at /v1/chat/completions and classifiers (task: classify)
    at /v1/classify, all listed at /v1/models. Each adapter is PATH or NAME=PATH; `model` in a
    request picks one (or the base)."""
    from ..access import read_secret
    from ..inference import InferenceEngine
    from ..serve.app import API_KEY_ENV, check_exposure, model_ids, run_server
    from ..serve.classify import load_classifiers
    from ..tasks.registry import group_by_task
    from ..threads import set_label

    if not args.max_body_mb > 0:
        raise ConfigError(f"--max-body-mb: expected a positive size in MB, got {args.max_body_mb}")
    if args.max_queue < 0:
        raise ConfigError(f"--max-queue: expected 0 or more waiting requests, got {args.max_queue}")
    set_label("the server")  # how training under the same studio home names it ("the server holds 1")
    api_key = read_secret(args.api_key, args.api_key_file, API_KEY_ENV, "--api-key")
    check_exposure(args.host, api_key, args.insecure_no_auth)  # before the model loads: fail fast
    names, paths = served_adapters(args.adapters)
    groups = group_by_task(dict(zip(names, map(Path, paths), strict=True)))
    chat, classifiers = (
        groups.pop("chat", {}),
        load_classifiers(groups.pop("classify", {}), args.classify_precision),
    )
    if not chat and not classifiers and args.base is None:
        raise ConfigError(
            "nothing to serve: give adapter folders, or --base MODEL to serve a base model alone"
        )
    engine = None  # a server of classifiers only: their bases may have no chat template
    if chat or args.base is not None:
        engine = InferenceEngine.from_adapters(list(map(str, chat.values())), list(chat), base=args.base)
    served = [*(model_ids(engine) if engine else []), *classifiers]
    print(
        f"serving {', '.join(served)} at http://{args.host}:{args.port}/v1"
        f"{' (API key required)' if api_key else ''}",
        flush=True,
    )
    run_server(
        engine,
        host=args.host,
        port=args.port,
        api_key=api_key,
        max_body_mb=args.max_body_mb,
        max_queue=args.max_queue,
        insecure_no_auth=args.insecure_no_auth,
        classifiers=classifiers,
        allowed_hosts=args.allowed_host,
    )
    return 0


# --- verify ------------------------------------------------------------------------------------
def run_verify(args: argparse.Namespace) -> int:
    """Check the adapter answers the same unmerged, merged, as GGUF and served.

    Runs the same prompts greedily through the unmerged adapter, the merged model, the GGUF export
    and the server, reports any divergence, and checks the adapter's answers differ from the base's.
    Targets not given are made in a temporary folder."""
    from ..serve.app import API_KEY_ENV
    from ..tasks.registry import task_of

    prompts = [[{"role": "user", "content": p}] for p in args.prompt] or None
    targets = [t for t in typing.get_args(VerifyTarget) if t not in args.skip]
    report = task_of(args.adapter).verify(
        Path(args.adapter),
        merged_dir=args.merged,
        gguf_file=args.gguf,
        server_url=args.server,
        server_model=args.model,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        targets=targets,
        quant=args.quant,
        prompts=prompts,
        max_new_tokens=args.max_new_tokens,
    )
    print("\n".join(report.lines()))
    return 0 if report.ok else 1
