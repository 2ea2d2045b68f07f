"""`lora-studio runs list|show` and `lora-studio adapters list`: every run, however it was started.

lora-studio runs list                 # name, base, state, steps, best val loss, folder, age
lora-studio runs show NAME            # one run (a name, an id or a folder) with its last metrics rows
lora-studio adapters list --json      # the runs with a finished adapter

Runs come from the run index in $LORA_STUDIO_HOME (runs.py), so a run trained from any folder, a
job and an `accelerate launch` run are all listed. A run name or id works wherever an adapter
folder is taken (`adapter_arg`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .. import runs
from ..errors import LoraStudioError
from ..text_checks import printable
from .options import command, num, when


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("runs", help="list training runs (CLI, jobs, UI, accelerate) and show one")
    cmds = group.add_subparsers(dest="runs_command", metavar="RUNS_COMMAND", required=True)
    p = command(cmds, "list", run_list)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = command(cmds, "show", run_show)
    p.add_argument("run_name", metavar="NAME", help="a run name, id (or unique prefix of one) or folder")
    p.add_argument("--json", action="store_true", help="print the run and all its metrics rows as JSON")

    group = sub.add_parser("adapters", help="list finished adapters")
    cmds = group.add_subparsers(dest="adapters_command", metavar="ADAPTERS_COMMAND", required=True)
    p = command(cmds, "list", run_adapters)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def adapter_arg(text: str) -> str:
    """An argparse `type=`: an adapter folder, or a run name or id, as the adapter folder's path."""
    try:
        return str(runs.adapter_folder(text))
    except LoraStudioError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def run_list(args: argparse.Namespace) -> int:
    """Every indexed run, newest first."""
    found = runs.list_runs()
    return _print(found, args.json, "no runs yet: `lora-studio train RECIPE` starts one")


def run_adapters(args: argparse.Namespace) -> int:
    """Runs with a finished adapter, newest first."""
    found = runs.list_adapters()
    return _print(found, args.json, "no finished adapters yet: `lora-studio runs list` shows the runs")


def run_show(args: argparse.Namespace) -> int:
    """One run: status, progress, metrics."""
    path = Path(args.run_name).expanduser()
    run = runs.read_run(path.resolve()) if (path / runs.STATUS_FILE).is_file() else runs.find(args.run_name)
    rows = runs.metrics_rows(run.folder)
    if args.json:
        print(json.dumps({**run.to_dict(), "metrics_rows": rows}, indent=2, default=str))
        return 0
    print(printable(f"run {run.name} ({run.id}): {run.state}"))
    details = {
        "base": run.base_model,
        "task": run.task,
        "steps": _steps(run),
        "best val": num(run.best_val_loss),
        "folder": str(run.folder),
        "storage": run.storage,  # on object storage: `folder` is its copy of the small files here
        "adapter": run.adapter and str(run.adapter),
        "created": when(run.created_at),
        "updated": when(run.updated_at),
        "error": run.error,
        "metrics": "  ".join(f"{k}={num(v)}" for k, v in run.latest.items()) or None,
    }
    for key, value in details.items():
        if value:
            print(f"  {key:<9} {printable(value)}")
    if run.adapter or (run.storage and run.state == "succeeded"):  # in a bucket: chat downloads it
        print(printable(f"  try it:   lora-studio chat {run.name if _unique(run) else run.id} --compare"))
    return 0


def _print(found: list[runs.Run], as_json: bool, empty: str) -> int:
    if as_json:
        print(json.dumps([r.to_dict() for r in found], indent=2, default=str))
        return 0
    if not found:
        print(empty)
        return 0
    print(
        f"{'NAME':<20} {'ID':<10} {'BASE':<24} {'STATE':<11} {'STEPS':>9} {'BEST VAL':>8} {'AGE':>5}  FOLDER"
    )
    for r in found:
        print(
            f"{printable(r.name)[:20]:<20} {printable(r.id)[:10]:<10} {printable(_short(r.base_model)):<24} "
            f"{printable(r.state):<11} {_steps(r):>9} {num(r.best_val_loss):>8} {_age(r.created_at):>5}  "
            f"{printable(r.storage or r.folder)}"
        )  # fields of an index anyone could have written: never raw control characters
    return 0


def _unique(run: runs.Run) -> bool:
    return sum(r.name == run.name for r in runs.list_runs()) == 1


def _steps(run: runs.Run) -> str:
    return f"{run.step}/{run.max_steps}" if run.max_steps and run.max_steps > 0 else str(run.step)


def _short(base: str) -> str:
    return base if len(base) <= 24 else "…" + base[-23:]


def _age(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    s = max(0, time.time() - timestamp)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{int(s // size)}{unit}"
    return f"{int(s)}s"
