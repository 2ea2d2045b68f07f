"""Ship a classification adapter: merge it into a standalone model, and check it agrees everywhere.

    report = merge_classifier(adapter_folder("tickets"), "merged/tickets")   # checked before it appears
    report = verify_classifier(adapter_folder("tickets"))    # adapter vs merged folder vs server

The merged folder is a plain transformers sequence classifier:
`AutoModelForSequenceClassification.from_pretrained(folder)` loads it without PEFT, with `id2label`,
`label2id` and `pad_token_id` in its config, and its tokenizer's `model_max_length` is the training
max_length (so `tokenizer(text, truncation=True)` cuts bare texts as training did). A classifier
trained with a prompt (prompt.py) records it in lora_studio_merge.json, where `Classifier.from_merged`
reads it; plain transformers users wrap each text in its `before` and `after`. Both commands compare
label probabilities on the same texts (the adapter's own training texts when its data file is still
there): merging always starts from the unquantized float32 base, so the merged model must match
the float32 adapter within the saved dtype's rounding, and pick the same label.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...errors import LoraStudioError, ModelError
from ...export import MERGE_INFO_FILE, _check_destination, _save_dtype
from ...files import move_into_place
from ...models import resolve_base
from .model import Classifier, float32_settings, require_classifier

# Largest allowed |probability difference|. float32 differs only by summation order (measured ~1e-7);
# 16-bit weights round each weight by ~2^-11 (fp16) or ~2^-8 (bf16) of its size.
PROBABILITY_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
BUILTIN_TEXTS = [
    "My order arrived broken and I want my money back.",
    "How do I change the password of my account?",
    "The app crashes every time I open the settings page.",
    "Thank you, the problem is solved now.",
]


@dataclass(frozen=True)
class ProbabilityCheck:
    """How far another copy's label probabilities are from the adapter's on the same texts."""

    what: str
    max_abs_diff: float
    tolerance: float
    same_label: float  # share of texts where both pick the same label
    rows: int

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.same_label == 1.0

    def line(self) -> str:
        verdict = "OK" if self.passed else "FAILED"
        return (
            f"{self.what}: max |probability difference| {self.max_abs_diff:.2e} (tolerance {self.tolerance:.0e}) "
            f"over {self.rows} texts, same label on {self.same_label:.0%}: {verdict}"
        )


def compare_probabilities(
    what: str, reference: torch.Tensor, got: torch.Tensor, tolerance: float
) -> ProbabilityCheck:
    return ProbabilityCheck(
        what=what,
        max_abs_diff=(reference - got).abs().max().item(),
        tolerance=tolerance,
        same_label=(reference.argmax(-1) == got.argmax(-1)).float().mean().item(),
        rows=reference.shape[0],
    )


def check_texts(metadata: dict[str, Any], n: int = 8) -> list[str]:
    """Texts to check on: the first n of the adapter's training file if still readable, else built-in ones."""
    from .data import load_labeled

    data = (metadata.get("recipe") or {}).get("data") or {}
    path = data.get("train_file")
    if path and Path(path).exists():
        try:
            rows = load_labeled(path, data.get("text_column", "text"), data.get("label_column", "label"))
            return [r.text for r in rows[:n]]
        except LoraStudioError:
            pass
    return list(BUILTIN_TEXTS)


# --- merge -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassifierMergeReport:
    out_dir: Path
    base_model: str
    dtype: str
    labels: tuple[str, ...]
    check: ProbabilityCheck
    seconds: float
    prompted: bool = False  # the classifier reads texts inside a prompt (prompt.py), recorded in the folder

    def lines(self) -> list[str]:
        return [
            f"merged classifier: {self.out_dir} ({self.dtype}, base {self.base_model}, "
            f"{len(self.labels)} labels, {self.seconds:.1f} s)",
            self.check.line(),
            "loads with: AutoModelForSequenceClassification.from_pretrained(folder)  (no PEFT needed)",
            *(
                [f"texts are read inside a prompt: see 'classification.prompt' in {MERGE_INFO_FILE}"]
                if self.prompted
                else []
            ),
        ]


def merge_classifier(
    adapter_dir: str | Path, out_dir: str | Path, *, dtype: str = "auto", overwrite: bool = False
) -> ClassifierMergeReport:
    """Merge a classification adapter into its base and save a standalone model folder, checked first."""
    start = time.time()
    adapter_dir, out_dir = Path(adapter_dir).expanduser().resolve(), Path(out_dir).expanduser()
    meta = require_classifier(adapter_dir)
    _check_destination(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        settings = float32_settings(meta)  # merge into full precision, whatever it was trained on
        adapter = Classifier.from_adapter(adapter_dir, settings, precision="fp32")
        texts = check_texts(meta)
        reference = adapter.probabilities(texts)
        save_dtype = _save_dtype(dtype, resolve_base(settings.base_model, settings.revision).folder)
        merged = adapter.model.merge_and_unload()
        merged.to(save_dtype)
        merged.save_pretrained(tmp, safe_serialization=True)
        adapter.tokenizer.model_max_length = adapter.max_length
        adapter.tokenizer.save_pretrained(tmp)
        del merged, adapter
        dtype_name = str(save_dtype).split(".")[-1]
        info = {
            "adapter": str(adapter_dir),
            "task": "classify",
            "base_model": settings.base_model,
            "base_model_hash": meta.get("base_model_hash"),
            "classification": meta.get("classification"),  # with the prompt texts are read in
            "dtype": dtype_name,
            "merged_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        # written before the check: the merged folder is loaded as a user would, prompt and all
        (tmp / MERGE_INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
        got = Classifier.from_merged(tmp, precision="fp32").probabilities(texts)
        check = compare_probabilities(
            "merged vs unmerged adapter", reference, got, PROBABILITY_TOLERANCE[dtype_name]
        )
        info["check"] = check.__dict__
        (tmp / MERGE_INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
        if not check.passed:
            raise ModelError(
                f"the merged classifier does not match the adapter, so it was not saved: {check.line()}"
            )
        move_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    labels = tuple((meta.get("classification") or {}).get("labels") or ())
    prompted = bool((meta.get("classification") or {}).get("prompt"))
    return ClassifierMergeReport(
        out_dir, settings.base_model, dtype_name, labels, check, time.time() - start, prompted
    )


# --- verify ----------------------------------------------------------------------------------------
@dataclass
class ClassifierVerifyReport:
    adapter: str
    texts: list[str]
    labels: list[str]  # the adapter's label for each text
    checks: list[ProbabilityCheck] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # targets that could not be checked
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and all(c.passed for c in self.checks)

    def lines(self) -> list[str]:
        out = [f"verify {self.adapter}: {len(self.texts)} texts, label probabilities compared"]
        for text, label in zip(self.texts, self.labels, strict=True):
            short = text if len(text) <= 60 else text[:59] + "…"
            out.append(f"  {short!r} -> {label}")
        out += [c.line() for c in self.checks] + [f"ERROR {e}" for e in self.errors] + self.notes
        out.append("result: " + ("consistent" if self.ok else "PROBLEMS FOUND"))
        return out


def verify_classifier(
    adapter_dir: str | Path,
    *,
    merged_dir: str | Path | None = None,
    server_url: str | None = None,
    server_model: str | None = None,
    api_key: str | None = None,
    targets: Sequence[str] = ("merged", "server"),
    texts: Sequence[str] | None = None,
) -> ClassifierVerifyReport:
    """The same texts through the float32 adapter, the merged folder and the server (`/v1/classify`).

    A merged folder or server that is not given is made for the check (a temporary merge; a server
    on a free loopback port serving this very adapter).
    """
    adapter_dir = Path(adapter_dir).expanduser().resolve()
    meta = require_classifier(adapter_dir)
    adapter = Classifier.from_adapter(adapter_dir, float32_settings(meta), precision="fp32")
    chosen = list(texts) if texts else check_texts(meta)
    reference = adapter.probabilities(chosen)
    labels = [adapter.labels[int(i)] for i in reference.argmax(-1)]
    report = ClassifierVerifyReport(str(adapter_dir), chosen, labels)
    if "gguf" in targets:
        report.notes.append("GGUF: not checked (GGUF export is for chat models, not classifiers)")
    with tempfile.TemporaryDirectory(prefix="lora-studio-verify-") as work:
        if "merged" in targets:
            try:
                folder = merged_dir or merge_classifier(adapter_dir, Path(work) / "merged").out_dir
                merged = Classifier.from_merged(folder, precision="fp32")
                saved = json.loads((Path(folder) / "config.json").read_text()).get("dtype", "float32")
                tolerance = PROBABILITY_TOLERANCE.get(saved, PROBABILITY_TOLERANCE["bfloat16"])
                got = merged.probabilities(chosen)
                report.checks.append(
                    compare_probabilities(f"merged model ({folder})", reference, got, tolerance)
                )
            except LoraStudioError as e:
                report.errors.append(f"merged model: {str(e).splitlines()[0]}")
        if "server" in targets:
            _check_server(report, adapter, adapter_dir, reference, server_url, server_model, api_key)
    return report


def _check_server(
    report: ClassifierVerifyReport,
    adapter: Classifier,
    adapter_dir: Path,
    reference: torch.Tensor,
    url: str | None,
    model: str | None,
    api_key: str | None,
) -> None:
    import httpx

    from ...adapters import adapter_name

    name = model or adapter_name(adapter_dir)
    with contextlib.ExitStack() as stack:
        if url is None:  # the served path, with this very model: only the HTTP layer can differ
            url = stack.enter_context(_local_server({name: adapter}, api_key))
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            response = httpx.post(
                f"{url.rstrip('/')}/v1/classify",
                json={"model": name, "input": report.texts},
                headers=headers,
                timeout=120,
            )
        except httpx.HTTPError as e:
            report.errors.append(f"server: cannot reach {url}: {e}")
            return
        if response.status_code != 200:
            report.errors.append(f"server ({url}): HTTP {response.status_code}: {response.text[:200]}")
            return
        body = response.json()
        got = torch.tensor(
            [[row["probabilities"][label] for label in adapter.labels] for row in body["data"]]
        )
        tolerance = PROBABILITY_TOLERANCE["float32"]
        if body.get("precision") == "bf16":  # a server reading in bf16 (precision auto): like with like
            reference = adapter.with_precision("bf16").probabilities(report.texts)
            tolerance = PROBABILITY_TOLERANCE["bfloat16"]
        report.checks.append(
            compare_probabilities(f"server ({url}, model {name!r})", reference, got, tolerance)
        )


def _local_server(
    classifiers: dict[str, Classifier], api_key: str | None
) -> contextlib.AbstractContextManager[str]:
    """The real HTTP app, classifiers only, on a free loopback port for the check's duration."""
    from ...serve.app import build_app
    from ...serve.local import local_server

    return local_server(build_app(None, api_key, classifiers=classifiers))
