"""The Classify tab's handlers and the Train tab's task choice, called in-process."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest
from adapter_helpers import index_run
from classify_helpers import build_classifier_adapter

from lora_studio.config import DataSettings
from ui.classify_tab import ClassifierCache, classifier_choices, classify, refresh
from ui.train_tab import recipe_from_form


@pytest.fixture
def listed_classifier(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A classification adapter of a run in the run index, where the UI finds every run."""
    monkeypatch.chdir(tmp_path)
    adapter = build_classifier_adapter(
        tiny_model_dir, tmp_path / "runs" / "tickets" / "adapter", ["bug", "ok", "spam"]
    )
    index_run(adapter.parent, "tickets", task="classify")
    return adapter


def test_app_has_a_classify_tab(studio_home: Path):
    from ui.app import build_app

    app = build_app()
    assert "classify" in {d.api_name for d in app.fns.values() if d.api_name}
    assert not (studio_home / "models").exists()  # building loads no model


def test_classify_shows_every_label_probability(listed_classifier: Path, tiny_adapters: dict):
    (Path("runs") / "chatty").mkdir()
    (Path("runs") / "chatty" / "adapter").symlink_to(tiny_adapters["alpha"])  # a chat adapter: not offered
    index_run(Path("runs") / "chatty", "chatty")
    assert [value for _, value in classifier_choices()] == [str(listed_classifier.resolve())]
    assert refresh(None).value == str(listed_classifier.resolve())
    probabilities, verdict = classify(ClassifierCache(), str(listed_classifier.resolve()), "hello world")
    assert list(probabilities) == ["bug", "ok", "spam"] and sum(probabilities.values()) == pytest.approx(1.0)
    best = max(probabilities, key=probabilities.__getitem__)
    assert verdict.startswith(f"**{best}**")


@pytest.mark.parametrize(
    "adapter, text, message",
    [
        (None, "hi", "Pick a classification adapter"),
        ("/etc", "hi", "is not one of the classification adapters listed"),
        ("LISTED", "   ", "Type a text"),
    ],
)
def test_classify_refuses_what_it_cannot_do(listed_classifier: Path, adapter, text: str, message: str):
    adapter = str(listed_classifier.resolve()) if adapter == "LISTED" else adapter
    with pytest.raises(gr.Error, match=message):
        classify(ClassifierCache(), adapter, text)


def test_train_form_offers_the_task(tmp_path: Path):
    values = ["t", "base", str(tmp_path / "d.csv"), 4, None, "none", 1.0, 5e-3, 64, 4, 4, 2, 1]
    assert recipe_from_form(*values).task == "chat"
    recipe = recipe_from_form(*values, task="classify")
    assert recipe.task == "classify" and recipe.classify.label_column == "label"
    assert recipe.data.max_length == 64  # a number typed in is kept


def test_the_train_form_leaves_a_classifiers_max_length_to_the_data(tmp_path: Path):
    """Choosing classify empties the Max length box; an empty box is the task's default: `auto`."""
    from ui.train_tab import task_max_length

    assert task_max_length("classify") is None and task_max_length("chat") == DataSettings.max_length
    values = ["t", "base", str(tmp_path / "d.csv"), 4, None, "none", 1.0, 5e-3, None, 4, 4, 2, 1]
    assert recipe_from_form(*values, task="classify").data.max_length == "auto"
    assert recipe_from_form(*values, task="chat").data.max_length == DataSettings.max_length


def test_the_chat_tab_lists_chat_adapters_only(listed_classifier: Path, tiny_adapters: dict):
    from ui.chat_tab import model_choices

    (Path("runs") / "chatty").mkdir()
    (Path("runs") / "chatty" / "adapter").symlink_to(tiny_adapters["alpha"])
    index_run(Path("runs") / "chatty", "chatty")
    adapters = [label for label, value in model_choices() if value.startswith("adapter:")]
    assert len(adapters) == 1 and "chatty" in adapters[0]  # the classifier is on the Classify tab only
