"""Every UI action that takes a path refuses one outside the allowed folders, on a UI bound beyond
loopback: the test enumerates the app's handlers (public and private alike: the page's queue can
call any of them), so a new action cannot forget.

For every handler and each of its path inputs (a file upload, or a picker that accepts a typed
value), the handler is called with a path outside the allowed folders there and valid values
elsewhere. A Python audit hook records every file opened under that outside folder: none may be,
and no output may carry the outside file's contents. The control (a loopback
UI's data check, which reads any path as the CLI does) shows the hook sees a read.
"""

from __future__ import annotations

import inspect
import shutil
import sys
from pathlib import Path
from typing import Any

import gradio as gr
import pytest
from eval_helpers import chat_rows, write_jsonl

from lora_studio.jobs import JobStore

MARKER = "outside-secret-7f3a"
OPENED: list[str] = []
WATCHED: list[Path] = []


def _audit(event: str, args: tuple) -> None:
    if event == "open" and WATCHED and isinstance(args[0], (str, bytes, Path)):
        path = Path(args[0] if not isinstance(args[0], bytes) else args[0].decode(errors="replace"))
        if any(str(path).startswith(str(w)) for w in WATCHED):
            OPENED.append(str(path))


sys.addaudithook(_audit)  # hooks cannot be removed: it records only while WATCHED is set


@pytest.fixture
def places(tiny_recipe, studio_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Valid values (inside the studio) and outside values, per kind of path input."""
    from lora_studio import train

    monkeypatch.setattr(JobStore, "ensure_worker", lambda self, *a, **k: None)  # queue only
    result = train(tiny_recipe.replace(output_dir=str(studio_home / "runs" / "listed"), max_steps=2))
    outside = tmp_path / "outside"
    outside.mkdir()
    pairs = [(f"{MARKER} {i}", MARKER) for i in range(4)]
    secret = write_jsonl(outside / "secret.jsonl", chat_rows(pairs))
    (studio_home / "uploads").mkdir(exist_ok=True)
    inside_data = write_jsonl(studio_home / "uploads" / "data.jsonl", chat_rows([("a", "b")] * 8))
    base = shutil.copytree(tiny_recipe.model.base_model, studio_home / "models" / "tiny")
    outside_adapter = shutil.copytree(result.adapter_dir, outside / "adapter")
    outside_model = shutil.copytree(base, outside / "model")
    adapter = str(result.adapter_dir.resolve())
    dataset = (str(inside_data), str(secret))
    return {
        "Dataset": dataset,
        "Test file (rows never used in training)": dataset,
        "Base model": (str(base), str(outside_model)),
        "Base model (its chat template renders the examples)": (str(base), str(outside_model)),
        "Adapter": (adapter, str(outside_adapter)),
        "Classification adapter": (adapter, str(outside_adapter)),
        "Model": ("adapter:" + adapter, "adapter:" + str(outside_adapter)),
        "Job": (None, str(secret)),  # job ids, never read as paths
        "Upload a data file": (None, {"path": str(secret), "orig_name": "secret.jsonl"}),
        "_outside": outside,
    }


def _takes_a_path(component: Any) -> bool:
    return isinstance(component, (gr.File, gr.UploadButton)) or (
        isinstance(component, gr.Dropdown) and component.allow_custom_value
    )


def _call(fn: Any, args: list) -> str:
    """Run a handler to its end; what it returned (or the error it raised), as text."""
    try:
        out = fn(*args)
        if inspect.isgenerator(out):
            out = list(out)
        return repr(out)
    except Exception as e:  # a refusal: gr.Error or a library error
        return f"{type(e).__name__}: {e}"


def _watch(outside: Path, fn: Any, args: list) -> tuple[str, list[str]]:
    OPENED.clear()
    WATCHED[:] = [outside.resolve()]
    try:
        text = _call(fn, args)
    finally:
        WATCHED.clear()
    return text, list(OPENED)


def test_every_path_input_of_every_action_refuses_a_path_outside(places: dict) -> None:
    from ui.app import build_app

    app = build_app(host="0.0.0.0")
    checked = []
    for block_fn in app.fns.values():
        if block_fn.fn is None:
            continue
        slots = [i for i, c in enumerate(block_fn.inputs) if _takes_a_path(c)]
        for slot in slots:
            labels = [getattr(c, "label", None) for c in block_fn.inputs]
            assert labels[slot] in places, f"{block_fn.name}: teach this test the path input {labels[slot]!r}"
            args = [
                places[lb][0] if i in slots else c.value
                for i, (lb, c) in enumerate(zip(labels, block_fn.inputs, strict=True))
            ]
            args[slot] = places[labels[slot]][1]
            text, opened = _watch(places["_outside"], block_fn.fn, args)
            where = f"{block_fn.api_name or block_fn.name}({labels[slot]!r})"
            assert opened == [], f"{where} read a file outside the allowed folders: {opened}"
            assert MARKER not in text.replace(str(places["_outside"]), ""), f"{where} returned its contents"
            checked.append(where)
    assert len(checked) >= 20, checked  # every handler with a path input was tried
    assert "evaluate_adapter('Test file (rows never used in training)')" in checked


def test_the_control_a_loopback_ui_reads_the_same_path(tiny_model_dir: Path, tmp_path: Path) -> None:
    from ui.data_tab import check_dataset

    outside = tmp_path / "outside"
    outside.mkdir()
    secret = write_jsonl(outside / "secret.jsonl", chat_rows([(f"{MARKER} {i}", MARKER) for i in range(4)]))
    text, opened = _watch(outside, check_dataset, [str(secret), str(tiny_model_dir), "auto", 64])
    assert opened and MARKER in text, (
        text
    )  # the hook sees the read (through the same reader) a public UI refuses
