"""Inference engines for adapters that may sit on different base models, loaded on first use.

    pool = EnginePool(max_bases=2)
    engine, name = pool.for_adapter(adapter_folder("support"))   # its base loaded once, adapter added once
    engine.stream_chat(messages, adapter=name)
    pool.for_base("smollm2-135m-instruct").stream_chat(messages)  # the plain base

An `InferenceEngine` holds one base model. A person chatting in the web UI may pick any trained
adapter, and adapters can come from different bases, so the pool keeps one engine per base
settings, at most `max_bases` of them (the least recently used is dropped, so memory stays
bounded), and loads each adapter folder into its base's engine once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from .adapters import adapter_name, base_settings, read_metadata
from .config import ModelSettings
from .inference import InferenceEngine


class EnginePool:
    def __init__(
        self, max_bases: int = 2, engine_factory: Callable[[ModelSettings], InferenceEngine] = InferenceEngine
    ):
        if max_bases < 1:
            raise ValueError(f"max_bases must be at least 1, got {max_bases}")
        self.max_bases = max_bases
        self._factory = engine_factory
        self._engines: OrderedDict[ModelSettings, InferenceEngine] = OrderedDict()
        self._names: dict[tuple[ModelSettings, Path], str] = {}  # (base, adapter folder) -> loaded name
        self._lock = threading.Lock()  # loading takes seconds: one load at a time, no double loads

    def for_base(self, base: str | ModelSettings) -> InferenceEngine:
        """The engine of a base model (a name, or settings such as an adapter's recorded ones)."""
        settings = ModelSettings(base_model=base) if isinstance(base, str) else base
        with self._lock:
            return self._engine(settings)

    def for_adapter(self, adapter_dir: str | Path) -> tuple[InferenceEngine, str]:
        """The engine of the base an adapter was trained on, with the adapter loaded; and its name there."""
        folder = Path(adapter_dir).expanduser().resolve()
        settings = base_settings(
            read_metadata(folder), folder
        )  # a ModelError if the folder is not a whole adapter
        with self._lock:
            engine = self._engine(settings)
            key = (settings, folder)
            if key not in self._names:
                taken = set(engine.adapter_names()) | {engine.base_name, "base"}
                name, n = adapter_name(folder), 2
                while name in taken:
                    name, n = f"{adapter_name(folder)}-{n}", n + 1
                engine.load_adapter(name, folder)
                self._names[key] = name
            return engine, self._names[key]

    def loaded_bases(self) -> list[ModelSettings]:
        return list(self._engines)

    def _engine(self, settings: ModelSettings) -> InferenceEngine:
        if settings in self._engines:
            self._engines.move_to_end(settings)
            return self._engines[settings]
        while len(self._engines) >= self.max_bases:  # drop the least recently used base
            old, _ = self._engines.popitem(last=False)
            self._names = {k: v for k, v in self._names.items() if k[0] != old}
        engine = self._factory(settings)
        self._engines[settings] = engine
        return engine
