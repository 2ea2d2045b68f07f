"""A real uvicorn server on a free loopback port in a background thread, for the server tests.

    with running_server(build_app(engine, max_queue=2)) as url:   # "http://127.0.0.1:PORT"
        httpx.get(f"{url}/health")

`Started` records every Generation the engine starts, so a test can watch what happens to a request
after its client went away (cancelled? how many tokens?). It wraps the real `start`; nothing is faked.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from lora_studio.inference import Generation, InferenceEngine
from lora_studio.serve.local import local_server

running_server = local_server  # the library's: a real uvicorn server on a free loopback port


class Started:
    """Records the Generations `engine.start` returns, while it is installed (a context manager)."""

    def __init__(self, engine: InferenceEngine):
        self.engine = engine
        self.replies: list[Generation] = []

    def __enter__(self) -> Started:
        real = type(self.engine).start

        def start(*args: Any, **kwargs: Any) -> Generation:
            reply = real(self.engine, *args, **kwargs)
            self.replies.append(reply)
            return reply

        self.engine.start = start  # an instance attribute: shadows the method for this engine only
        return self

    def __exit__(self, *exc: Any) -> None:
        del self.engine.start

    def wait_for(self, count: int, timeout: float = 30) -> list[Generation]:
        deadline = time.time() + timeout
        while len(self.replies) < count:
            assert time.time() < deadline, f"{len(self.replies)} of {count} requests reached the engine"
            time.sleep(0.02)
        return self.replies


def health_while(url: str, request: Callable[[], Any]) -> tuple[float, Any]:
    """Run `request()` in a thread while asking /health every 20 ms: (the slowest /health, its answer)."""
    import httpx

    answer: list[Any] = []
    sender = threading.Thread(target=lambda: answer.append(request()))
    sender.start()
    slowest = 0.0
    while sender.is_alive():
        start = time.perf_counter()
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        slowest = max(slowest, time.perf_counter() - start)
        time.sleep(0.02)
    sender.join()
    return slowest, answer[0]
