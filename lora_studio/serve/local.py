"""A real server on a free loopback port, in a background thread: for checks (verify) and tests.

with local_server(build_app(engine)) as url:   # "http://127.0.0.1:PORT"
    httpx.get(f"{url}/health")
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_server(app: Any, start_seconds: float = 30) -> Iterator[str]:
    """Serve `app` with uvicorn on 127.0.0.1 until the block ends; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True, name="local-server")
    thread.start()
    deadline = time.time() + start_seconds
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("the local server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
