"""The Classify tab: pick a classification adapter, type a text, see its label and every label's probability.

Only adapters trained with `task: classify` are offered. Each is loaded on first use (on the base
it was trained on) and kept, at most `MAX_LOADED` at a time, so trying several texts is instant.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import gradio as gr

from lora_studio.tasks.classify.model import Classifier

from .common import shows_errors, trained_adapters

MAX_LOADED = 2


@dataclass
class ClassifyTab:
    adapter: gr.Dropdown


class ClassifierCache:
    """Loaded classifiers by adapter folder, the least recently used dropped past `size`."""

    def __init__(self, size: int = MAX_LOADED):
        self.size = size
        self._loaded: OrderedDict[str, Classifier] = OrderedDict()
        self._lock = threading.Lock()  # loading takes seconds: one at a time, never twice

    def get(self, folder: str) -> Classifier:
        with self._lock:
            if folder not in self._loaded:
                while len(self._loaded) >= self.size:
                    self._loaded.popitem(last=False)
                self._loaded[folder] = Classifier.from_adapter(folder)
            self._loaded.move_to_end(folder)
            return self._loaded[folder]


# --- handlers -----------------------------------------------------------------------------------
def classifier_choices() -> list[tuple[str, str]]:
    """(label, folder) of every finished classification adapter, newest first."""
    return [(a.label, str(a.folder)) for a in trained_adapters(task="classify")]


def refresh(current: str | None = None) -> gr.Dropdown:
    values = [value for _, value in classifier_choices()]
    return gr.Dropdown(
        choices=classifier_choices(), value=current if current in values else (values or [None])[0]
    )


def classify(cache: ClassifierCache, adapter: str | None, text: str) -> tuple[dict[str, float], str]:
    """(probability of every label, a one-line verdict) for the text."""
    if not adapter:
        raise gr.Error("Pick a classification adapter first (train one with the task 'classify').")
    if adapter not in {value for _, value in classifier_choices()}:  # only listed folders are ever loaded
        raise gr.Error(
            f"{adapter!r} is not one of the classification adapters listed here; pick one from the list."
        )
    if not (text or "").strip():
        raise gr.Error("Type a text to classify first.")
    prediction = cache.get(adapter).predict([text])[0]
    return prediction.probabilities, f"**{prediction.label}** ({prediction.confidence:.1%})"


# --- layout ---------------------------------------------------------------------------------------
def build(cache: ClassifierCache | None = None) -> ClassifyTab:
    cache = cache or ClassifierCache()
    adapter = gr.Dropdown(
        label="Classification adapter",
        choices=[],
        value=None,
        allow_custom_value=True,  # choices are filled per page; `classify` checks the value against them
        elem_id="classify-adapter",
        info="Adapters trained with the task 'classify' (a label head on the pretrained body).",
    )
    with gr.Row():
        with gr.Column(scale=3):
            text = gr.Textbox(label="Text", lines=4, placeholder="A text to label", elem_id="classify-text")
            run = gr.Button("Classify", variant="primary", elem_id="classify-run")
            verdict = gr.Markdown(elem_id="classify-verdict")
        with gr.Column(scale=2):
            bars = gr.Label(label="Probability of each label", elem_id="classify-bars")

    @shows_errors
    def respond(adapter_dir: str | None, message: str) -> tuple[dict[str, float], str]:
        return classify(cache, adapter_dir, message)

    run.click(respond, inputs=[adapter, text], outputs=[bars, verdict], api_name="classify")
    text.submit(respond, inputs=[adapter, text], outputs=[bars, verdict], api_visibility="private")
    adapter.focus(shows_errors(refresh), inputs=adapter, outputs=adapter, api_visibility="private")
    return ClassifyTab(adapter=adapter)
