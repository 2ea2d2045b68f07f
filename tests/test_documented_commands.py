"""The documented commands stay true: every `lora-studio ...` a reader is shown works as shown.

The documented steps are performed first: each `lora-studio train RECIPE` shown for a CPU recipe
on the built-in base trains for real, on the tiny model, in a studio home of this module's own,
so the run names the docs go on to use exist. Then every shown command (tests/doc_commands.py
finds them) is parsed with the CLI's own parser, and each file, recipe, adapter or run it names
must exist: a file of this repository, a run those steps created, an output an earlier command
writes, or a PLACEHOLDER in capitals. A few cheap commands also run for real.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest
from doc_commands import ROOT, Shown, markdown_commands, shown_commands

from lora_studio import runs
from lora_studio.cli import build_parser, main
from lora_studio.config import DEFAULT_BASE_MODEL, Recipe
from lora_studio.errors import LoraStudioError

PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*(\.[a-z0-9]+)?")  # ID, FILE, RUN, ADAPTER, DATA.jsonl
# Files and folders a command reads. Not the operator's own secret files (`--api-key-file
# /run/secrets/api-key`), which are in no repository, nor --base/--models, which may be hub ids.
INPUTS = {"recipe", "file", "data", "store", "merged", "gguf"}
ADAPTERS = {"adapter", "adapters"}  # a folder, a run folder, or a run name or id; serve: NAME=ADAPTER too
OUTPUTS = {"out", "scores_dir"}  # what a command writes: later commands may read it
TINY_STEPS = ["--set", "max_steps=2", "--set", "eval_every_steps=2", "--set", "layers=1"]


class ParseError(Exception):
    pass


@pytest.fixture(scope="module")
def documented_home(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A studio home after the documented training steps, each run on the tiny model."""
    home = tmp_path_factory.mktemp("documented-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_STUDIO_HOME", str(home))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.chdir(ROOT)
        for recipe in trained_recipes(shown_commands()):
            assert main(["train", recipe, "--set", f"base_model={tiny_model_dir}", *TINY_STEPS]) == 0
    return home


@pytest.fixture
def in_documented_home(documented_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LORA_STUDIO_HOME", str(documented_home))
    monkeypatch.chdir(ROOT)  # the docs' relative paths start at the repository's root
    return documented_home


def trained_recipes(commands: list[Shown]) -> list[str]:
    """The recipes of `lora-studio train RECIPE` as shown, that train cheaply on the tiny model."""
    found = []
    for shown in commands:
        argv = shown.argv
        recipe = len(argv) == 2 and argv[0] == "train" and (ROOT / argv[1]).is_file()
        if shown.complete and recipe and argv[1] not in found:
            model = Recipe.load(ROOT / argv[1]).model
            if model.base_model == DEFAULT_BASE_MODEL and model.quantization == "none":
                found.append(argv[1])
    return found


def test_the_docs_show_commands_from_every_source():
    """The finder sees each kind of place (a finder that finds nothing would pass anything)."""
    places = {shown.where.split(":")[0] for shown in shown_commands()}
    assert {"README.md", "docs/classification.md", "docs/evaluate.md", "Makefile"} <= places
    assert {"recipes/smollm2-classify-cpu.yaml", "recipes/smollm2-lora-cpu.yaml"} <= places
    assert trained_recipes(shown_commands()) == [
        "recipes/smollm2-lora-cpu.yaml",
        "recipes/smollm2-classify-cpu.yaml",
    ]


def test_every_documented_command_parses_and_names_what_exists(in_documented_home):
    commands = shown_commands()
    outputs = written_paths(commands)
    problems = [
        f"{s.where}: lora-studio {shlex.join(s.argv)}: {p}" for s in commands for p in check(s, outputs)
    ]
    assert not problems, "documented commands that are not true:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["runs", "list"], "smollm2-classify-cpu"),
        (["runs", "show", "smollm2-lora-cpu"], "succeeded"),
        (["adapters", "list", "--json"], '"name": "smollm2-lora-cpu"'),
        (["classify", "smollm2-classify-cpu", "Where is my parcel? It is two weeks late."], "shipping"),
    ],
)
def test_cheap_documented_commands_run(in_documented_home, argv, expected, capsys):
    shown = [s.argv for s in shown_commands() if s.complete]
    assert argv in shown, f"no longer documented: lora-studio {' '.join(argv)}"
    assert main(argv) == 0
    assert expected in capsys.readouterr().out


def test_a_stale_path_or_an_unknown_option_is_caught(in_documented_home, tmp_path):
    """Drift of each kind fails: a path that is gone, a run no step made, an option that is gone."""
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "```bash\n"
        'lora-studio classify runs/smollm2-classify-cpu/adapter "Where is my parcel?"\n'
        "lora-studio chat support --compare\n"
        "lora-studio eval smollm2-lora-cpu --data test.jsonl\n"
        "lora-studio train recipes/smollm2-lora-cpu.yaml --epochs 3\n"
        "lora-studio chat smollm2-lora-cpu --compare   # true\n"
        "lora-studio jobs show ID                       # true: a placeholder\n"
        "```\n"
        "Prose may mention `lora-studio eval` alone, but not `lora-studio eval --no-such-flag`.\n"
    )
    shown = markdown_commands(page, tmp_path)
    found = [check(s, set()) for s in shown]
    assert [bool(p) for p in found] == [True, True, True, True, False, False, False, True]
    assert "runs/smollm2-classify-cpu/adapter is no adapter folder" in found[0][0]
    assert (
        "'support' is neither a folder nor a run" in found[1][0]
        and "test.jsonl does not exist" in found[2][0]
    )
    assert "unrecognized arguments: --epochs" in found[3][0] and found[7] == ["no option --no-such-flag"]


# --- the check ----------------------------------------------------------------------------------
def check(shown: Shown, outputs: set[str]) -> list[str]:
    """What is untrue in one shown command: it does not parse, or names what does not exist."""
    argv = shown.argv
    if not argv:
        return []  # "the `lora-studio` CLI": the program's name alone
    try:
        args = parse(argv)
    except ParseError as e:
        if not shown.complete and str(e).startswith("the following arguments are required"):
            return unknown_options(argv) + [
                p for w in argv if looks_like_path(w) for p in missing(w, outputs)
            ]
        return [f"does not parse: {e}"]
    problems = []
    for dest, value in vars(args).items():
        values = value if isinstance(value, list) else [value]
        for text in (v for v in values if isinstance(v, str)):
            if dest in INPUTS:
                problems += missing(text, outputs)
            elif dest in ADAPTERS:
                problems += missing_adapter(text.partition("=")[2] or text, outputs)
            elif dest == "run_name" and not PLACEHOLDER.fullmatch(text):
                problems += missing_adapter(text, outputs, finished=False)
            elif dest == "overrides" and text.partition("=")[0].endswith("_file"):
                problems += missing(text.partition("=")[2], outputs)
    return problems


def parse(argv: list[str]) -> argparse.Namespace:
    """The CLI's own parser, with its errors raised, not printed; adapters are checked by `check`."""
    parser = build_parser()
    for sub in parsers(parser):
        sub.error = _raise  # type: ignore[method-assign]
        for action in sub._actions:
            if getattr(action.type, "__name__", None) == "adapter_arg":  # resolves run names
                action.type = None  # checked by missing_adapter, which also accepts placeholders
            if action.type in (int, float) and action.option_strings:
                argv = [_number(argv, i, action) for i in range(len(argv))]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return parser.parse_args(argv)
    except SystemExit as e:  # `--help` prints and exits 0
        if e.code:
            raise ParseError(f"exit code {e.code}") from None
        return argparse.Namespace()


def unknown_options(argv: list[str]) -> list[str]:
    """A mention's options that its command does not have (it may leave out required arguments)."""
    parser, known = build_parser(), set()
    for word in argv:
        known |= set(parser._option_string_actions)
        subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if subparsers and word in subparsers[0].choices:
            parser = subparsers[0].choices[word]
    known |= set(parser._option_string_actions)
    return [f"no option {w}" for w in argv if w.startswith("-") and w.partition("=")[0] not in known]


def parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                found += parsers(sub)
    return found


def _number(argv: list[str], i: int, action: argparse.Action) -> str:
    """`--concurrency N`: a placeholder where a number goes parses as one."""
    follows = i > 0 and argv[i - 1] in action.option_strings
    return "1" if follows and PLACEHOLDER.fullmatch(argv[i]) else argv[i]


def _raise(message: str) -> None:
    raise ParseError(message)


def missing(path: str, outputs: set[str]) -> list[str]:
    """A file or folder a command reads: one of the repository's, an earlier output, or a PLACEHOLDER."""
    if PLACEHOLDER.fullmatch(path) or (ROOT / path).exists() or written_before(path, outputs):
        return []
    return [f"{path} does not exist (not in the repository, not written by a documented command)"]


def missing_adapter(text: str, outputs: set[str], finished: bool = True) -> list[str]:
    """An adapter as the CLI resolves it: a folder, or a run the documented steps trained."""
    if PLACEHOLDER.fullmatch(text) or written_before(text, outputs):
        return []
    try:
        folder = runs.adapter_folder(text) if finished else runs.find(text).folder
    except LoraStudioError as e:
        return [f"{text}: {e}"]
    if not folder.is_dir():
        return [f"{text} is no adapter folder and no run the documented steps train"]
    return []


def written_paths(commands: list[Shown]) -> set[str]:
    """What the shown commands write (`--out`, `--scores-dir`, `--set output_dir=`)."""
    written = set()
    for shown in commands:
        try:
            args = vars(parse(shown.argv)) if shown.argv else {}
        except ParseError:
            continue
        written |= {str(args[dest]) for dest in OUTPUTS if args.get(dest)}
        for override in args.get("overrides") or []:
            key, _, value = override.partition("=")
            if key.split(".")[-1] == "output_dir":
                written.add(value)
    return written


def written_before(path: str, outputs: set[str]) -> bool:
    return any(path == out or path.startswith(out.rstrip("/") + "/") for out in outputs)


def looks_like_path(word: str) -> bool:
    return not word.startswith("-") and (
        "/" in word or bool(re.search(r"\.(jsonl?|csv|parquet|yaml)$", word))
    )
