"""Load on the API server: 16 concurrent clients, half reading whole streamed answers, half leaving
mid-answer, against a real `lora-studio serve` process on 127.0.0.1.

    .venv/bin/python benchmarks/serve_load.py                            # the built-in SmolLM2, 120 s
    .venv/bin/python benchmarks/serve_load.py --model PATH --duration 30 # e.g. a tiny model folder
    .venv/bin/python benchmarks/serve_load.py --url http://127.0.0.1:8000 --api-key-file key.txt

First one client alone (the baseline, in the same run), then the load: each client sends chat
requests one after another until the time is up. "Streaming" clients read every answer to its end;
"abandoning" clients close the connection after a few tokens, which must stop their generation.
Reports completed and abandoned requests, 429s, errors, p50/p95 latency and time to first token,
answer tokens per second, /health latency under load, and latency relative to the lone client.
Not a test: it asserts nothing, it reports.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from lora_studio.config import DEFAULT_BASE_MODEL
from lora_studio.verify import free_port

PROMPTS = [
    "What is the capital of France?",
    "Write two sentences about the sea.",
    "List three uses of a paperclip.",
    "Explain what a LoRA adapter is in one paragraph.",
]


@dataclass
class Result:
    kind: str  # "streaming" or "abandoning"
    status: str  # "completed", "abandoned", "429", "error: ..."
    seconds: float = 0.0  # request sent -> answer ended (or was left)
    first_token_s: float | None = None  # to the first event with text (the role event comes at once)
    events: int = 0  # events with text: a few tokens each, as the streamer sends whole words
    tokens: int = 0  # completed answers: the answer's tokens (the stream's usage)


@dataclass
class Tally:
    results: list[Result] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, result: Result) -> None:
        with self.lock:
            self.results.append(result)


def one_request(client: httpx.Client, url: str, kind: str, rng: random.Random, max_tokens: int) -> Result:
    """One streamed chat request; an abandoning client leaves after a few tokens."""
    body = {
        "model": "base",
        "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    leave_after = rng.randint(1, 4) if kind == "abandoning" else None  # events: a few words in
    start = time.perf_counter()
    result = Result(kind, "completed")
    try:
        with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                result.status = str(response.status_code)
                if response.status_code == 429:
                    time.sleep(float(response.headers.get("retry-after", 1)))
                return result
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                result.tokens = (event.get("usage") or {}).get("completion_tokens", result.tokens)
                if (event.get("choices") or [{}])[0].get("delta", {}).get("content"):
                    result.events += 1
                    if result.first_token_s is None:
                        result.first_token_s = time.perf_counter() - start
                    if leave_after is not None and result.events >= leave_after:
                        result.status = "abandoned"
                        break  # closing the stream closes the connection: the client is gone
    except httpx.HTTPError as e:
        result.status = f"error: {type(e).__name__}"
    result.seconds = time.perf_counter() - start
    return result


def client_loop(
    url: str, key: str, kind: str, seed: int, until: float, max_tokens: int, tally: Tally
) -> None:
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {key}"}
    while time.perf_counter() < until:
        with httpx.Client(headers=headers, timeout=600) as client:  # a fresh connection per request
            tally.add(one_request(client, url, kind, rng, max_tokens))


def probe_health(url: str, until: float, latencies: list[float]) -> None:
    with httpx.Client(timeout=30) as client:
        while time.perf_counter() < until:
            start = time.perf_counter()
            client.get(f"{url}/health")
            latencies.append(time.perf_counter() - start)
            time.sleep(0.25)


@contextmanager
def server_process(model: str, key: str, max_queue: int, threads: int | None):
    """`lora-studio serve --base MODEL` on a free loopback port; its URL."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="serve-load-") as work:
        key_file = Path(work) / "key"
        key_file.write_text(key)
        log_path = Path(work) / "server.log"
        cmd = [sys.executable, "-m", "lora_studio.cli", "serve", "--base", model, "--port", str(port)]
        cmd += ["--api-key-file", str(key_file), "--max-queue", str(max_queue)]
        with open(log_path, "w") as log:
            env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 900  # the first run converts the built-in GGUF
            while True:
                if proc.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"the server did not start:\n{log_path.read_text()[-3000:]}")
                try:
                    httpx.get(f"{url}/health", timeout=2)
                    break
                except httpx.HTTPError:
                    time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def report(lone: list[Result], results: list[Result], health: list[float], seconds: float, args) -> None:
    done = [r for r in results if r.status == "completed"]
    lone_p50 = statistics.median(r.seconds for r in lone)
    print(
        f"{args.clients} clients ({args.clients // 2} streaming whole answers, {args.clients - args.clients // 2} "
        f"leaving mid-answer) for {seconds:.0f} s, max_tokens {args.max_tokens}, greedy, model {args.model}"
        f"{f', server OMP_NUM_THREADS={args.threads}' if args.threads else ''}"
    )
    statuses = sorted({r.status for r in results})
    print("  requests: " + ", ".join(f"{s} {sum(r.status == s for r in results)}" for s in statuses))
    for kind in ["streaming", "abandoning"]:
        mine = [r for r in results if r.kind == kind]
        first = [r.first_token_s for r in mine if r.first_token_s is not None]
        print(
            f"  {kind:<10} time to first token p50 {percentile(first, 50):6.2f} s, p95 {percentile(first, 95):6.2f} s"
            f" ({len(first)} requests)"
        )
    lone_first = statistics.median(r.first_token_s or r.seconds for r in lone)
    print(f"  one client alone (baseline, same run): time to first token p50 {lone_first:.2f} s")
    latencies = [r.seconds for r in done]
    print(
        f"  completed answers: latency p50 {percentile(latencies, 50):.2f} s, p95 {percentile(latencies, 95):.2f} s;"
        f" alone (baseline, same run) p50 {lone_p50:.2f} s: p50 under load is {percentile(latencies, 50) / lone_p50:.1f}x"
    )
    tokens = sum(r.tokens for r in done)
    lone_rate = sum(r.tokens for r in lone) / sum(r.seconds for r in lone)
    print(
        f"  tokens in completed answers: {tokens} ({tokens / seconds:.1f}/s; one client alone: {lone_rate:.1f}/s)"
    )
    print(
        f"  /health under load: p50 {percentile(health, 50) * 1000:.0f} ms, max {max(health) * 1000:.0f} ms"
        f" ({len(health)} probes)"
    )


def alone(url: str, key: str, args: argparse.Namespace) -> list[Result]:
    """The baseline: one client alone, after one warm-up request."""
    rng = random.Random(args.seed)
    with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=600) as client:
        one_request(client, url, "streaming", rng, args.max_tokens)
        return [one_request(client, url, "streaming", rng, args.max_tokens) for _ in range(3)]


def load(url: str, key: str, args: argparse.Namespace) -> tuple[list[Result], list[float], float]:
    """Every client (and a /health probe) in its own thread until the time is up."""
    start = time.perf_counter()
    until = start + args.duration
    tally, health = Tally(), []
    threads = [threading.Thread(target=probe_health, args=(url, until, health), daemon=True)]
    for i in range(args.clients):
        kind = "streaming" if i % 2 == 0 else "abandoning"
        loop_args = (url, key, kind, args.seed + 100 + i, until, args.max_tokens, tally)
        threads.append(threading.Thread(target=client_loop, args=loop_args, daemon=True))
    for thread in threads:
        thread.start()
    while alive := [thread for thread in threads if thread.is_alive()]:
        alive[0].join(timeout=15)
        counts = Counter(r.status for r in tally.results)
        print(f"  {time.perf_counter() - start:5.0f} s: {dict(counts)}", file=sys.stderr, flush=True)
    return tally.results, health, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=DEFAULT_BASE_MODEL, help=f"model to serve (default {DEFAULT_BASE_MODEL})"
    )
    parser.add_argument("--url", help="load a running server instead of starting one")
    parser.add_argument("--api-key-file", help="with --url: a file holding the server's API key")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--duration", type=float, default=120, help="seconds of load (default 120)")
    parser.add_argument("--max-tokens", type=int, default=48, help="answer length asked for (default 48)")
    parser.add_argument(
        "--max-queue", type=int, default=16, help="the started server's --max-queue (default 16)"
    )
    parser.add_argument(
        "--threads", type=int, help="the started server's OMP_NUM_THREADS (default: torch's choice)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for prompts and leaving points")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop the server when killed

    key = Path(args.api_key_file).read_text().strip() if args.api_key_file else secrets.token_hex(16)
    server = (
        nullcontext(args.url) if args.url else server_process(args.model, key, args.max_queue, args.threads)
    )
    with server as url:
        baseline = alone(url, key, args)
        results, health, seconds = load(url, key, args)
    report(baseline, results, health, seconds, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
