"""Deployment consistency: does the adapter answer the same way everywhere it is shipped?

    report = verify_chat("support")  # a run name or an adapter folder    # merges, exports a GGUF and starts a server itself
    print("\\n".join(report.lines())); report.ok

The same prompts (the adapter's own training chats when the data file is still there) are answered
greedily by the unmerged adapter (the reference), then by
  - the merged model folder, loaded with plain transformers, with *its own* tokenizer, chat
    template and generation config (so a wrong template or a lost EOS shows up),
  - the GGUF file, loaded with transformers' GGUF loader, with the chat template and EOS stored in
    the file (what llama.cpp uses),
  - the OpenAI-compatible server, over HTTP, non-streaming and streaming;
and by the bare base, to show that the adapter changes the answers at all ("no effect" is the
most common complaint). Prompts must render to the same tokens; answers must be the same tokens.
A local target may only part ways where the reference's preference between the two tokens was
within that format's rounding tolerance (a near-tie, reported but not a failure).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .adapters import adapter_name, read_metadata
from .config import VerifyTarget
from .errors import LoraStudioError
from .export import (
    RELATIVE_TOLERANCE,
    check_conversations,
    export_gguf,
    load_gguf_model,
    merge_adapter,
    prompt_part,
)
from .generation import GenerationSettings
from .inference import InferenceEngine, check_messages
from .models import load_tokenizer
from .serve.local import local_server
from .tasks.kinds import require_text

log = logging.getLogger(__name__)

Status = Literal["match", "near-tie", "diverged", "error", "skipped"]
FAILING: tuple[Status, ...] = ("diverged", "error")


@dataclass(frozen=True)
class TargetResult:
    """How one deployment target compared with the unmerged adapter."""

    target: str
    status: Status
    details: tuple[str, ...] = ()


@dataclass
class Answer:
    prompt_ids: list[int]
    token_ids: list[int]  # the final stop token included when the answer stopped by itself
    text: str
    finish_reason: str


@dataclass
class VerifyReport:
    adapter: str
    prompts: list[list[dict[str, str]]]
    answers: list[str]
    base_answers: list[str]
    targets: list[TargetResult] = field(default_factory=list)

    @property
    def adapter_differs(self) -> bool:
        return any(a != b for a, b in zip(self.answers, self.base_answers, strict=True))

    @property
    def ok(self) -> bool:
        return self.adapter_differs and not any(t.status in FAILING for t in self.targets)

    def lines(self) -> list[str]:
        out = [f"verify {self.adapter}: {len(self.prompts)} prompts, greedy"]
        for i, (prompt, answer, base) in enumerate(
            zip(self.prompts, self.answers, self.base_answers, strict=True)
        ):
            out.append(f"  prompt {i + 1}: {_short(prompt[-1]['content'])}")
            out.append(f"    adapter: {_short(answer)}")
            out.append(f"    base:    {_short(base)}{'  (same as the adapter)' if base == answer else ''}")
        differs = sum(a != b for a, b in zip(self.answers, self.base_answers, strict=True))
        verdict = "OK" if differs else "FAILED: the adapter has no effect on these prompts"
        out.append(
            f"adapter vs base: different answers on {differs} of {len(self.prompts)} prompts: {verdict}"
        )
        for t in self.targets:
            label = {"match": "OK, same answers", "near-tie": "OK (near-tie only)"}.get(
                t.status, t.status.upper()
            )
            out.append(f"{t.target}: {label}")
            out.extend(f"  {d}" for d in t.details)
        out.append("result: " + ("consistent" if self.ok else "PROBLEMS FOUND"))
        return out


def verify_chat(
    adapter_dir: str | Path,
    *,
    merged_dir: str | Path | None = None,
    gguf_file: str | Path | None = None,
    server_url: str | None = None,
    server_model: str | None = None,
    api_key: str | None = None,
    targets: Sequence[str] = typing.get_args(VerifyTarget),
    quant: str = "f16",
    prompts: Sequence[Sequence[dict[str, str]]] | None = None,
    max_new_tokens: int = 32,
) -> VerifyReport:
    """Answer the same prompts through every target and report any divergence (see the module doc).

    A target that is asked for but not given (merged_dir, gguf_file, server_url) is made for the
    check: merged and exported into a temporary folder, or a server started on a free loopback port.
    """
    adapter_dir = Path(adapter_dir).expanduser().resolve()
    meta = read_metadata(adapter_dir)
    require_text(meta, adapter_dir)
    name = adapter_name(adapter_dir)
    engine = InferenceEngine.from_adapters([adapter_dir], [name])
    chosen = (
        [check_messages(p) for p in prompts]
        if prompts
        else [prompt_part(c) for c in check_conversations(meta)]
    )
    reference = [_engine_answer(engine, p, name, max_new_tokens) for p in chosen]
    base = [_engine_answer(engine, p, None, max_new_tokens).text for p in chosen]
    report = VerifyReport(str(adapter_dir), chosen, [a.text for a in reference], base)
    scale = max(1.0, max(_ref_logits(engine, name, a).abs().max().item() for a in reference))

    with tempfile.TemporaryDirectory(prefix="lora-studio-verify-") as work:
        local = {  # target -> (its name in the report, how to make it)
            "merged": ("merged model", lambda: _merged_target(adapter_dir, merged_dir, Path(work))),
            "gguf": (
                f"GGUF ({quant})",
                lambda: _gguf_target(adapter_dir, gguf_file, Path(work), quant, engine),
            ),
        }
        for target, (label, make) in local.items():
            if target in targets:
                check = _check_target(label, make, engine, name, chosen, reference, scale, max_new_tokens)
                report.targets.append(check)
        if "server" in targets:
            report.targets.append(
                _check_server(
                    engine, name, server_url, server_model, api_key, chosen, reference, max_new_tokens
                )
            )
    return report


# --- the reference -----------------------------------------------------------------------------
def _engine_answer(
    engine: InferenceEngine, prompt: list[dict[str, str]], adapter: str | None, n: int
) -> Answer:
    reply = engine.start(prompt, adapter, GenerationSettings(max_new_tokens=n))  # greedy
    text = reply.wait()
    return Answer(engine.encode_chat(prompt)[0].tolist(), reply.token_ids, text, reply.finish_reason or "")


def _ref_logits(engine: InferenceEngine, adapter: str, answer: Answer) -> torch.Tensor:
    ids = torch.tensor([answer.prompt_ids + answer.token_ids])
    return engine.logits(ids, adapter)[0]


# --- local targets (merged folder, GGUF) -------------------------------------------------------
@dataclass
class LocalTarget:
    """A model to check, with the tokenizer, template and stop tokens it would be deployed with."""

    model: Any
    tokenizer: Any
    chat_template: str | None
    stop_ids: list[int]
    tolerance_key: str  # RELATIVE_TOLERANCE key of its weight format
    source: str


def _merged_target(adapter_dir: Path, merged_dir: str | Path | None, work: Path) -> LocalTarget:
    from transformers import AutoModelForCausalLM

    if merged_dir is None:
        merged_dir = merge_adapter(adapter_dir, work / "merged").out_dir
    folder = Path(merged_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True).eval()
    tokenizer = load_tokenizer(folder)
    eos = model.generation_config.eos_token_id
    stops = [eos] if isinstance(eos, int) else list(eos or [])
    saved = (folder / "config.json").read_text()
    key = next((d for d in ("bfloat16", "float16") if f'"{d}"' in saved), "float32")
    return LocalTarget(model, tokenizer, tokenizer.chat_template, stops, key, f"{folder} (saved as {key})")


def _gguf_target(
    adapter_dir: Path, gguf_file: str | Path | None, work: Path, quant: str, engine: InferenceEngine
) -> LocalTarget:
    from gguf import GGUFReader

    if gguf_file is None:
        gguf_file = export_gguf(adapter_dir, work / "model.gguf", quant=quant).path
    path = Path(gguf_file)
    fields = GGUFReader(path).fields

    def value(key: str) -> Any:
        return fields[key].contents() if key in fields else None

    stops = [
        v
        for v in (value("tokenizer.ggml.eos_token_id"), value("tokenizer.ggml.eot_token_id"))
        if v is not None
    ]
    file_type = {0: "float32", 1: "f16", 7: "q8_0"}.get(value("general.file_type"), "q8_0")
    # The file's own template and stop tokens; its vocabulary was checked equal to the adapter's on export.
    return LocalTarget(
        load_gguf_model(path), engine.tokenizer, value("tokenizer.chat_template"), stops, file_type, str(path)
    )


def _check_target(
    label: str,
    make: Any,
    engine: InferenceEngine,
    adapter: str,
    prompts: list,
    reference: list[Answer],
    scale: float,
    max_new_tokens: int,
) -> TargetResult:
    try:
        target = make()
    except LoraStudioError as e:
        return TargetResult(label, "error", (str(e).splitlines()[0],))
    allowance = RELATIVE_TOLERANCE.get(target.tolerance_key, 8e-2) * scale
    details, statuses = [f"from {target.source}"], []
    for i, (prompt, ref) in enumerate(zip(prompts, reference, strict=True)):
        status, detail = _compare_local(target, engine, adapter, prompt, ref, allowance, max_new_tokens)
        statuses.append(status)
        if detail:
            details.append(f"prompt {i + 1}: {detail}")
    worst = next((s for s in ("diverged", "near-tie") if s in statuses), "match")
    return TargetResult(label, worst, tuple(details))


def _compare_local(
    target: LocalTarget,
    engine: InferenceEngine,
    adapter: str,
    prompt: list[dict[str, str]],
    ref: Answer,
    allowance: float,
    max_new_tokens: int,
) -> tuple[Status, str]:
    if target.chat_template is None:
        return "diverged", "has no chat template"
    prompt_ids = target.tokenizer.apply_chat_template(
        prompt, chat_template=target.chat_template, add_generation_prompt=True, return_dict=True
    )["input_ids"]
    if prompt_ids != ref.prompt_ids:
        ours = target.tokenizer.decode(prompt_ids)
        theirs = engine.tokenizer.decode(ref.prompt_ids)
        return (
            "diverged",
            f"renders the prompt differently (chat template or tokenizer): {_first_difference(theirs, ours)}",
        )
    if not target.stop_ids:
        return "diverged", "has no EOS token id: generation would never stop by itself"
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = target.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            **GenerationSettings(max_new_tokens=max_new_tokens).generate_kwargs(),  # greedy
            eos_token_id=target.stop_ids,
            pad_token_id=target.stop_ids[0],
        )
    got = out[0, len(prompt_ids) :].tolist()
    if got == ref.token_ids:
        return "match", ""
    i = next(
        (k for k, (a, b) in enumerate(zip(got, ref.token_ids, strict=False)) if a != b),
        min(len(got), len(ref.token_ids)),
    )
    if i >= len(ref.token_ids):  # the reference stopped (or ran out) where the target went on
        return "diverged", f"goes on after the adapter's answer ended (token {i}): its EOS/stop tokens differ"
    if i >= len(got):
        return "diverged", f"stops at token {i} where the adapter goes on"
    logits = engine.logits(torch.tensor([ref.prompt_ids + ref.token_ids[:i]]), adapter)[0, -1]
    margin = (logits[ref.token_ids[i]] - logits[got[i]]).item()
    where = f"token {i}: adapter {engine.tokenizer.decode([ref.token_ids[i]])!r} vs {engine.tokenizer.decode([got[i]])!r}"
    if margin <= allowance:
        return (
            "near-tie",
            f"parts at a near-tie ({where}, the adapter preferred its token by only {margin:.2e})",
        )
    return "diverged", f"answers differently from {where} (the adapter preferred its token by {margin:.2f})"


# --- the server --------------------------------------------------------------------------------
def _check_server(
    engine: InferenceEngine,
    adapter: str,
    url: str | None,
    model: str | None,
    api_key: str | None,
    prompts: list,
    reference: list[Answer],
    max_new_tokens: int,
) -> TargetResult:
    import httpx

    label = f"server ({url})" if url else "server (started for the check)"
    with contextlib.ExitStack() as stack:
        if url is None:
            url = stack.enter_context(_local_server(engine, api_key))
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        details, diverged = [f"at {url}, model {model or adapter!r}"], False
        try:
            with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=120) as client:
                for i, (prompt, ref) in enumerate(zip(prompts, reference, strict=True)):
                    body = {
                        "model": model or adapter,
                        "messages": prompt,
                        "temperature": 0,
                        "max_tokens": max_new_tokens,
                    }
                    plain = client.post("/v1/chat/completions", json=body)
                    if plain.status_code != 200:
                        return TargetResult(
                            label, "error", (f"HTTP {plain.status_code}: {plain.text[:200]}",)
                        )
                    choice = plain.json()["choices"][0]
                    streamed = "".join(_stream_text(client, body))
                    for how, text in (
                        ("non-streaming", choice["message"]["content"]),
                        ("streaming", streamed),
                    ):
                        if text != ref.text:
                            diverged = True
                            details.append(f"prompt {i + 1} ({how}): {_first_difference(ref.text, text)}")
                    if choice["finish_reason"] != ref.finish_reason:
                        diverged = True
                        details.append(
                            f"prompt {i + 1}: finish_reason {choice['finish_reason']!r}, "
                            f"adapter {ref.finish_reason!r}"
                        )
        except httpx.HTTPError as e:
            return TargetResult(label, "error", (f"cannot reach the server at {url}: {e}",))
    return TargetResult(label, "diverged" if diverged else "match", tuple(details))


def _stream_text(client: Any, body: dict[str, Any]) -> Iterator[str]:
    import json

    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:]).get("choices", []):
                    yield choice.get("delta", {}).get("content") or ""


def _local_server(engine: InferenceEngine, api_key: str | None) -> contextlib.AbstractContextManager[str]:
    """The real HTTP app on a free loopback port, for the check's duration."""
    from .serve.app import build_app

    return local_server(build_app(engine, api_key))


def _first_difference(expected: str, got: str) -> str:
    i = next(
        (k for k, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b),
        min(len(expected), len(got)),
    )
    return f"first difference at character {i}: expected {expected[i : i + 40]!r}, got {got[i : i + 40]!r}"


def _short(text: str, n: int = 70) -> str:
    text = text.replace("\n", " ")
    return repr(text if len(text) <= n else text[: n - 1] + "…")
