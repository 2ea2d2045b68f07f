"""The Chat tab: talk to a trained adapter or a base model, with streamed answers.

Side by side, the same message goes to the adapter and to the base it was trained on, and both
answers are shown, so a person sees what the fine-tune changed. Models are loaded on first use
by an `EnginePool` (one engine per base, each adapter loaded once).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from lora_studio.config import DEFAULT_BASE_MODEL
from lora_studio.engine_pool import EnginePool
from lora_studio.generation import DEFAULT_MAX_NEW_TOKENS
from lora_studio.inference import InferenceEngine

from .common import shows_errors, trained_adapters

BASE, ADAPTER = "base:", "adapter:"


@dataclass
class ChatTab:
    model: gr.Dropdown


# --- handlers -----------------------------------------------------------------------------------
def model_choices() -> list[tuple[str, str]]:
    """Adapters (newest first), then the bases they were trained on and the built-in default."""
    adapters = trained_adapters(writes_text=True)  # a classifier picks labels: the Classify tab has them
    rows = [(f"adapter: {a.label}", ADAPTER + str(a.folder)) for a in adapters]
    bases = dict.fromkeys([DEFAULT_BASE_MODEL, *(a.base_model for a in adapters)])
    return rows + [(f"base model: {b}", BASE + b) for b in bases]


def refresh_models(current: str | None = None) -> gr.Dropdown:
    """The model list again, keeping the current pick while it exists (else the newest adapter)."""
    choices = model_choices()
    values = [value for _, value in choices]
    return gr.Dropdown(choices=choices, value=current if current in values else values[0])


def engine_for(pool: EnginePool, choice: str) -> tuple[InferenceEngine, str | None]:
    """The engine and adapter name (None: the plain base) for a model picker value.

    Only listed models are loaded: an API client cannot point the server at another folder.
    """
    if choice not in {value for _, value in model_choices()}:
        raise gr.Error(f"{choice!r} is not one of the models listed on the Chat tab; pick one from the list.")
    if choice.startswith(ADAPTER):
        return pool.for_adapter(choice[len(ADAPTER) :])
    return pool.for_base(choice.removeprefix(BASE) or DEFAULT_BASE_MODEL), None


def plain_messages(history: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Chatbot history (content as text parts in gradio 6) as plain role/content messages."""
    out = []
    for m in history:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        out.append({"role": m["role"], "content": str(content or "")})
    return out


def chat(
    pool: EnginePool,
    message: str,
    history: list[dict[str, Any]],
    other_history: list[dict[str, Any]],
    choice: str | None,
    side_by_side: bool,
    system_prompt: str,
    max_new_tokens: float,
    temperature: float,
) -> Iterator[tuple[list[dict], list[dict], str]]:
    """Stream the answer(s): (left history, right history, cleared message box) after each piece."""
    if not choice:
        raise gr.Error("Pick a model to chat with first.")
    if not (message or "").strip():
        raise gr.Error("Type a message first.")
    settings = {"max_new_tokens": int(max_new_tokens), "temperature": float(temperature)}
    left = [*plain_messages(history), {"role": "user", "content": message}]
    right = [*plain_messages(other_history), {"role": "user", "content": message}] if side_by_side else []
    if side_by_side and not choice.startswith(ADAPTER):
        raise gr.Error("Side by side compares an adapter with its base: pick an adapter.")
    engine, adapter = engine_for(pool, choice)
    targets = [(left, engine, adapter)]
    if side_by_side:  # the same engine with adapters switched off is exactly the adapter's base
        targets.append((right, engine, None))
    yield left, right, ""  # the question shows at once; the answers stream in after it
    for conversation, engine, adapter in targets:
        prompt = _with_system(conversation, system_prompt)
        limit = fit_to_context(engine, prompt, settings["max_new_tokens"])
        conversation.append({"role": "assistant", "content": ""})
        for piece in engine.stream_chat(prompt, adapter=adapter, **(settings | {"max_new_tokens": limit})):
            conversation[-1]["content"] += piece
            yield left, right, ""
        if not conversation[-1]["content"].strip():
            conversation[-1]["content"] = "(the model answered with an empty message)"
        yield left, right, ""


def fit_to_context(engine: InferenceEngine, prompt: list[dict[str, str]], max_new_tokens: int) -> int:
    """The answer length the slider asks for, cut to the room the model's context leaves.

    The engine refuses a request that would overflow the context (right for an API); a person
    in a chat rather wants the longest answer that fits, or to be told to start over.
    """
    if not engine.context_length:
        return max_new_tokens
    room = engine.context_length - engine.encode_chat(prompt).shape[1]
    if room < 1:
        raise gr.Error(
            f"This conversation fills the model's whole context ({engine.context_length} tokens): "
            "press Clear to start a new one."
        )
    return min(max_new_tokens, room)


def _with_system(conversation: list[dict[str, str]], system_prompt: str) -> list[dict[str, str]]:
    if system_prompt and system_prompt.strip():
        return [{"role": "system", "content": system_prompt.strip()}, *conversation]
    return list(conversation)


# --- layout ---------------------------------------------------------------------------------------
def build(pool: EnginePool) -> ChatTab:
    with gr.Row():
        model = gr.Dropdown(
            label="Model",
            choices=[],
            value=None,
            allow_custom_value=True,  # choices are filled per page; `chat` checks the value against them
            scale=4,
            elem_id="chat-model",
            info="A trained adapter (on the base it was trained on) or a plain base model.",
        )
        side_by_side = gr.Checkbox(
            label="Side by side with the base model", value=False, scale=1, elem_id="chat-compare"
        )
    with gr.Accordion("Generation settings", open=False):
        with gr.Row():
            system_prompt = gr.Textbox(label="System prompt", placeholder="optional", scale=2)
            max_new_tokens = gr.Slider(
                1,
                1024,
                value=DEFAULT_MAX_NEW_TOKENS,
                step=1,
                label="Max new tokens",
                info="The longest answer, in tokens.",
            )
            temperature = gr.Slider(
                0,
                2,
                value=0,
                step=0.05,
                label="Temperature",
                info="0 answers greedily (the same every time); higher varies more.",
            )
    with gr.Row():
        left = gr.Chatbot(label="Chat", height=380, elem_id="chat-left")
        right = gr.Chatbot(label="Base model", height=380, visible=False, elem_id="chat-right")
    with gr.Row():
        message = gr.Textbox(
            placeholder="Type a message and press Enter", show_label=False, scale=5, elem_id="chat-message"
        )
        send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
        clear = gr.Button("Clear", scale=1)

    @shows_errors
    def respond(*args: Any) -> Iterator[tuple[list[dict], list[dict], str]]:
        yield from chat(pool, *args)

    inputs = [message, left, right, model, side_by_side, system_prompt, max_new_tokens, temperature]
    send.click(respond, inputs=inputs, outputs=[left, right, message], api_name="chat")
    message.submit(respond, inputs=inputs, outputs=[left, right, message], api_visibility="private")
    clear.click(lambda: ([], [], ""), outputs=[left, right, message], api_visibility="private")
    side_by_side.change(
        lambda on: (gr.Chatbot(visible=on), gr.Chatbot(label="Adapter" if on else "Chat")),
        inputs=side_by_side,
        outputs=[right, left],
        api_visibility="private",
    )
    model.focus(
        lambda value: gr.Dropdown(choices=model_choices(), value=value),
        inputs=model,
        outputs=model,
        api_visibility="private",
    )
    return ChatTab(model=model)
