"""The inference engine: one frozen base model, any number of LoRA adapters by name, chat replies.

    engine = InferenceEngine("smollm2-135m-instruct")          # or a ModelSettings
    engine.load_adapter("support", adapter_folder("support"))     # -> AdapterInfo; refused if trained on another base
    engine.adapter_names()                                      # ["support"]
    for piece in engine.stream_chat(messages, adapter="support", max_new_tokens=128):  # or a GenerationSettings
        print(piece, end="", flush=True)                        # text as it is produced
    engine.chat(messages)                                       # the base model's whole answer (adapter=None)

    reply = engine.start(messages, adapter="support", seed=1)  # a Generation: iterate it for text pieces,
    text = "".join(reply); reply.finish_reason                  # then "stop"/"length" and token counts

    engine = InferenceEngine.from_adapters([adapter_folder("a"), adapter_folder("b")])  # base read from the adapters

`messages` are OpenAI-style dicts: {"role": "system"|"user"|"assistant", "content": str}. Generation
settings are a `generation.GenerationSettings` (max_new_tokens, temperature: 0 = greedy, the default,
so answers are reproducible; top_p; seed), or single fields of it as keywords. Generation stops at the tokenizer's EOS, the generation config's
EOS ids and the chat template's end-of-turn token (see `stop_token_ids`). Bad messages or settings
raise RequestError before anything runs; an unknown adapter or one trained on another base raises
ModelError. Closing a stream early (or `reply.cancel()`) stops its generation at the next token.
`encode_chat` and `logits` expose the exact prompt tokens and logits, for checks and comparisons.

The base is loaded once. Adapters are PEFT adapters on one `PeftModel`; switching is PEFT's
`set_adapter` (milliseconds: no weights move) and the base is the same model with adapters
disabled. One lock serialises "activate adapter + generate", so concurrent requests for different
adapters can never see each other's weights; requests queue rather than batch (one CPU gains
little from batching a 135M model, and correctness is simpler to show).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .adapters import adapter_name, base_settings, check_adapter_base, peft_deprecations_hidden, read_metadata
from .config import DEFAULT_BASE_MODEL, ModelSettings
from .errors import ModelError, RequestError
from .generation import GenerationSettings, stop_token_ids
from .models import load_base, model_fingerprint
from .tasks.kinds import require_text
from .text_checks import check_text
from .threads import use as use_threads

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class AdapterInfo:
    """A loaded adapter: its name, folder and `lora_studio.json` metadata."""

    name: str
    path: Path
    metadata: dict[str, Any]


class Generation:
    """One reply being generated. Iterate it for text pieces; afterwards read the totals.

    `finish_reason` is "stop" (an end-of-turn/EOS token ended it) or "length" (max_new_tokens hit).
    `cancel()` (or closing the iterator early) stops generation at the next token.
    """

    def __init__(self, streamer: Any, prompt_tokens: int, adapter: str | None):
        self.adapter = adapter
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.token_ids: list[int] = []  # the reply's tokens, the final stop token included
        self.finish_reason: str | None = None
        self.text = ""
        self._streamer = streamer
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self._read = threading.Event()
        self._error: BaseException | None = None

    def __iter__(self) -> Iterator[str]:
        if self._read.is_set():  # the stream can be read once; later reads just see the end
            self._done.wait()
            return
        self._read.set()
        try:
            for piece in self._streamer:
                if piece:
                    self.text += piece
                    yield piece
            self._done.wait()
            if self._error is not None:
                raise self._error
        finally:
            if not self._done.is_set():  # the reader stopped early (closed stream, client gone)
                self.cancel()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def finished(self) -> bool:
        """Generation has ended (completed, cancelled or failed)."""
        return self._done.is_set()

    def wait(self) -> str:
        """Consume the whole reply and return its text."""
        for _ in self:
            pass
        return self.text

    # called from the generating thread ---------------------------------------------------------
    def _should_stop(self, input_ids: torch.Tensor, scores: Any, **kw: Any) -> torch.Tensor:
        return torch.full(
            (input_ids.shape[0],), self._cancelled.is_set(), dtype=torch.bool, device=input_ids.device
        )

    def _finish(
        self, completion: list[int] | None, stop_ids: Sequence[int], error: BaseException | None
    ) -> None:
        if completion is not None:
            self.token_ids = completion
            self.completion_tokens = len(completion)
            self.finish_reason = "stop" if completion and completion[-1] in stop_ids else "length"
        self._error = error
        self._done.set()
        self._streamer.end()  # unblocks the reader even when generation failed


class InferenceEngine:
    """A frozen base model with named LoRA adapters, answering chats one request at a time."""

    def __init__(self, base_model: str | ModelSettings = DEFAULT_BASE_MODEL):
        settings = ModelSettings(base_model=base_model) if isinstance(base_model, str) else base_model
        self.settings = settings
        model, self.tokenizer, self.ref = load_base(settings)
        model.eval()
        self._base = model
        self._peft: Any = None  # the PeftModel, created with the first adapter
        self._adapters: dict[str, AdapterInfo] = {}
        self._active: str | None = None
        self._lock = threading.Lock()
        self._base_hash: str | None = None
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ModelError(
                f"{settings.base_model!r} has no chat template, so it cannot chat; "
                "use an instruction-tuned base model (one whose tokenizer has a chat_template)"
            )
        self.stop_ids = stop_token_ids(self.tokenizer, model.generation_config)
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None

    @classmethod
    def from_adapters(
        cls,
        adapter_dirs: Sequence[str | Path],
        names: Sequence[str] | None = None,
        base: str | ModelSettings | None = None,
    ) -> InferenceEngine:
        """An engine on the base the first adapter was trained on, with every adapter loaded."""
        if not adapter_dirs and base is None:
            raise ModelError("no adapter folder and no base model given: name at least one of them")
        if base is None:
            base = base_settings(read_metadata(adapter_dirs[0]), adapter_dirs[0])
        engine = cls(base)
        names = list(names) if names else [adapter_name(d) for d in adapter_dirs]
        for name, folder in zip(names, adapter_dirs, strict=True):
            engine.load_adapter(name, folder)
        return engine

    # --- adapters ------------------------------------------------------------------------------
    @property
    def base_name(self) -> str:
        """The name the base model answers to (the alias, or a folder's name)."""
        name = self.settings.base_model
        path = Path(name).expanduser()
        return (path.stem if path.suffix == ".gguf" else path.name) if path.exists() else name

    def adapter_names(self) -> list[str]:
        return list(self._adapters)

    def adapter_info(self, name: str) -> AdapterInfo:
        if name not in self._adapters:
            raise ModelError(f"unknown adapter {name!r}; loaded: {', '.join(self._adapters) or 'none'}")
        return self._adapters[name]

    def load_adapter(self, name: str, path: str | Path) -> AdapterInfo:
        """Load an adapter folder under `name`; refused if it was trained on a different base."""
        from peft import PeftModel

        folder = Path(path).expanduser().resolve()
        meta = read_metadata(folder)  # also checks adapter_model.safetensors is there (no pickles)
        require_text(meta, folder)  # a label head cannot chat
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}", name or ""):
            raise ModelError(f"adapter name {name!r}: use 1-64 letters, digits, '.', '_', ':' or '-'")
        if name in self._adapters or name in (self.base_name, "base"):
            raise ModelError(f"the name {name!r} is already taken; give this adapter another name")
        self._check_base(folder, meta)
        with self._lock:
            try:
                with peft_deprecations_hidden():
                    if self._peft is None:
                        self._peft = PeftModel.from_pretrained(self._base, str(folder), adapter_name=name)
                    else:
                        self._peft.load_adapter(str(folder), adapter_name=name)
            except (ValueError, KeyError, RuntimeError, OSError) as e:
                raise ModelError(f"cannot load adapter {folder}: {e}") from None
            self._peft.eval()
            self._peft.requires_grad_(False)
            self._active = None
        info = AdapterInfo(name, folder, meta)
        self._adapters[name] = info
        log.info("loaded adapter %s from %s", name, folder)
        return info

    def _check_base(self, folder: Path, meta: dict[str, Any]) -> None:
        if self._base_hash is None:
            self._base_hash = model_fingerprint(self.ref.folder)
        check_adapter_base(folder, meta, self._base_hash, self.settings.base_model)

    def activate(self, adapter: str | None) -> float:
        """Make `adapter` (None: the plain base) active; returns the seconds the switch took.

        Generation calls this itself under the engine's lock; call it directly only to measure.
        """
        with self._lock:
            return self._activate(adapter)

    def _activate(self, adapter: str | None) -> float:
        start = time.perf_counter()
        if adapter is not None:
            self.adapter_info(adapter)
            if self._active != adapter:
                self._peft.set_adapter(adapter, inference_mode=True)
        self._active = adapter
        return time.perf_counter() - start

    def _model_for(self, adapter: str | None) -> tuple[Any, Any]:
        """The model to call and a context manager that disables adapters for the base."""
        import contextlib

        if self._peft is None:
            return self._base, contextlib.nullcontext()
        if adapter is None:
            return self._peft, self._peft.disable_adapter()
        return self._peft, contextlib.nullcontext()

    # --- chat ----------------------------------------------------------------------------------
    def encode_chat(self, messages: Sequence[dict[str, Any]]) -> torch.Tensor:
        """The prompt's token ids (1 x n) as the chat template renders it, ready for the answer."""
        checked = check_messages(messages)
        ids = self.tokenizer.apply_chat_template(
            checked, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        return ids

    def start(
        self,
        messages: Sequence[dict[str, Any]],
        adapter: str | None = None,
        settings: GenerationSettings | None = None,
        **fields: Any,
    ) -> Generation:
        """Start generating a reply in a background thread and return it as a `Generation`.

        `fields` override single settings, e.g. `engine.start(messages, max_new_tokens=64)`.
        """
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        settings = replace(settings or GenerationSettings(), **fields).check()
        if adapter is not None:
            self.adapter_info(adapter)
        input_ids = self.encode_chat(messages)
        prompt_len = input_ids.shape[1]
        if self.context_length and prompt_len + settings.max_new_tokens > self.context_length:
            raise RequestError(
                f"the prompt is {prompt_len} tokens and max_new_tokens is {settings.max_new_tokens}: together "
                f"they exceed the model's context of {self.context_length} tokens; shorten the chat or ask for fewer"
            )
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        reply = Generation(streamer, prompt_len, adapter)
        kwargs = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "streamer": streamer,
            "eos_token_id": self.stop_ids,
            "pad_token_id": self.tokenizer.pad_token_id,
            "stopping_criteria": StoppingCriteriaList([reply._should_stop]),
            **settings.generate_kwargs(),
        }
        thread = threading.Thread(
            target=self._generate,
            args=(reply, kwargs, settings.seed),
            daemon=True,
            name=f"generate-{adapter or 'base'}",
        )
        thread.start()
        return reply

    def _generate(self, reply: Generation, kwargs: dict[str, Any], seed: int | None) -> None:
        completion, error = None, None
        try:
            with self._lock:
                if reply._cancelled.is_set():  # abandoned while it queued for the engine: skip it
                    reply._finish([], self.stop_ids, None)
                    return
                self._activate(reply.adapter)
                use_threads("chat")  # this process's share of the cores now (threads.py)
                model, context = self._model_for(reply.adapter)
                device = next(model.parameters()).device
                kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
                if seed is not None:  # under the lock, so no other request reseeds mid-generation
                    torch.manual_seed(seed)
                with context, torch.inference_mode():
                    out = model.generate(**kwargs)
            completion = out[0, kwargs["input_ids"].shape[1] :].tolist()
        except BaseException as e:  # handed to the reader, who raises it
            error = e
        reply._finish(completion, self.stop_ids, error)

    def stream_chat(
        self,
        messages: Sequence[dict[str, Any]],
        adapter: str | None = None,
        settings: GenerationSettings | None = None,
        **fields: Any,
    ) -> Iterator[str]:
        """The reply's text, piece by piece as it is generated (adapter None: the base model)."""
        yield from self.start(messages, adapter, settings, **fields)

    def chat(
        self,
        messages: Sequence[dict[str, Any]],
        adapter: str | None = None,
        settings: GenerationSettings | None = None,
        **fields: Any,
    ) -> str:
        """The whole reply as one string."""
        return self.start(messages, adapter, settings, **fields).wait()

    def logits(self, input_ids: torch.Tensor, adapter: str | None = None) -> torch.Tensor:
        """Next-token logits at every position (float32, on the CPU), for checks and comparisons."""
        with self._lock:
            self._activate(adapter)
            model, context = self._model_for(adapter)
            with context, torch.inference_mode():
                out = model(input_ids=input_ids.to(next(model.parameters()).device))
        return out.logits.float().cpu()


# --- helpers -----------------------------------------------------------------------------------
def check_messages(messages: Any) -> list[dict[str, str]]:
    """Messages as plain {"role", "content"} dicts, or a RequestError naming the bad one."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise RequestError("messages: expected a non-empty list of {'role': ..., 'content': ...} objects")
    checked = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ROLES:
            raise RequestError(f"messages[{i}].role: expected one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content: expected a string, got {type(content).__name__}")
        check_text(content, f"messages[{i}].content", "remove it from the message", RequestError)
        checked.append({"role": role, "content": content})
    return checked
