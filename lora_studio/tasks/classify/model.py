"""The classification model: a pretrained body with a new label head, and a `Classifier` to use it.

    model, ref = load_classification_base(settings, labels, pad_token_id)  # *ForSequenceClassification
    model = attach_classification_lora(model, lora_settings)   # LoRA on the body, the head trained in full
    clf = Classifier.from_adapter(adapter_folder("tickets"))       # or Classifier.from_merged("merged/tickets")
    clf.predict(["my parcel never came"])   # -> [Prediction(label="shipping", probabilities={...})]

transformers' `AutoModelForSequenceClassification` puts a linear `score` head (hidden size x labels,
randomly initialised) on the base's transformer body and reads it at the last token that is not
padding, so the config needs `pad_token_id` and batches are padded on the right (a causal body
sees only what came before, so padding after the text changes nothing). The head is PEFT's
`modules_to_save`: trained in full and saved in the adapter file next to the LoRA weights.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ...adapters import apply_adapter, base_settings, read_metadata
from ...config import LoraSettings, ModelSettings
from ...errors import ConfigError, ModelError
from ...models import BaseModelRef, load_tokenizer, loading_kwargs, resolve_base
from ...text_checks import check_text
from ...threads import use as use_threads
from .lengths import recorded_max_length
from .prompt import ClassifyPrompt

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16"]
HEAD_NAMES = ("score", "classifier")  # transformers' names for the label head of decoder models
LABELS_FILE = "labels.json"


def head_name(model: torch.nn.Module) -> str:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in HEAD_NAMES:
        if isinstance(getattr(inner, name, None), torch.nn.Module):
            return name
    raise ModelError(f"{type(inner).__name__} has no classification head named {' or '.join(HEAD_NAMES)}")


def load_classification_base(
    settings: ModelSettings, labels: Sequence[str], pad_token_id: int
) -> tuple[Any, BaseModelRef]:
    """The frozen base as a sequence classifier with a fresh head for `labels` (id i = labels[i])."""
    from transformers import AutoModelForSequenceClassification

    ref = resolve_base(settings.base_model, settings.revision)
    # the new head stays full precision and trainable in a quantized base
    device, kwargs = loading_kwargs(settings, full_precision_modules=HEAD_NAMES)
    kwargs.update(
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        pad_token_id=pad_token_id,
        problem_type="single_label_classification",
    )
    try:
        with _quiet_load_report():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                ref.folder, output_loading_info=True, **kwargs
            )
    except (OSError, ValueError, ImportError, KeyError) as e:
        raise ModelError(
            f"could not load {settings.base_model!r} as a sequence classifier from {ref.folder}: {e}"
        ) from None
    # Only the head may start from scratch: a body weight missing here would train on noise.
    body_missing = [k for k in info["missing_keys"] if k.split(".")[0] not in HEAD_NAMES]
    if body_missing:
        raise ModelError(
            f"{settings.base_model!r} loaded as a sequence classifier lacks body weights "
            f"({', '.join(sorted(body_missing)[:3])}, ...): its checkpoint does not fit "
            f"{type(model).__name__}; choose another base model"
        )
    log.debug("%s loaded as a sequence classifier for %d labels", ref.name, len(labels))
    if settings.quantization == "none":
        model.to(device)
    model.requires_grad_(False)
    return model, ref


@contextlib.contextmanager
def _quiet_load_report() -> Iterator[None]:
    """transformers reports the new head as MISSING and lm_head as UNEXPECTED, as if something were
    wrong; both are expected here, and the caller checks the missing keys itself."""
    logger = logging.getLogger("transformers.modeling_utils")
    drop = logging.Filter()
    drop.filter = lambda record: "LOAD REPORT" not in str(record.msg)  # type: ignore[method-assign]
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def attach_classification_lora(
    model: Any, settings: LoraSettings, gradient_checkpointing: bool = False
) -> Any:
    """LoRA on the body (the top `layers` blocks if set) and the head trained in full."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    from ...adapters import peft_config, peft_deprecations_hidden

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    config = peft_config(settings, model)
    config.task_type = "SEQ_CLS"
    head_name(model)  # a clear error for a model without a head PEFT knows
    # PEFT's SEQ_CLS task adds the head ("score" or "classifier") to modules_to_save itself.
    config.modules_to_save = [m for m in settings.modules_to_save or [] if m not in HEAD_NAMES] or None
    try:
        with peft_deprecations_hidden():
            return get_peft_model(model, config)
    except ValueError as e:
        raise ConfigError(f"cannot attach LoRA with these settings: {e}") from None


# --- adapter metadata -------------------------------------------------------------------------------
def is_classifier(metadata: dict[str, Any]) -> bool:
    return metadata.get("task") == "classify"


def labels_of(metadata: dict[str, Any], where: str | Path) -> list[str]:
    labels = (metadata.get("classification") or {}).get("labels")
    if not labels:
        raise ModelError(f"{where}: lora_studio.json has no classification labels; retrain the adapter")
    return list(labels)


def require_classifier(adapter_dir: str | Path) -> dict[str, Any]:
    """The metadata of a classification adapter folder, or a ModelError that says what it is instead."""
    meta = read_metadata(adapter_dir)
    if not is_classifier(meta):
        raise ModelError(
            f"{adapter_dir} is a chat adapter (task: {meta.get('task', 'chat')}), not a classifier: "
            "use `lora-studio chat` with it, or train one with task: classify"
        )
    return meta


# --- using a trained classifier ---------------------------------------------------------------------
@dataclass(frozen=True)
class Prediction:
    label: str
    probabilities: dict[str, float]  # every label, in id order

    @property
    def confidence(self) -> float:
        return self.probabilities[self.label]


class Classifier:
    """A sequence classifier ready for texts: adapter on its base, or a merged model folder.

    precision "auto" reads texts under bf16 autocast where training's bf16 lever would be on (a CPU
    with native bf16, fp32 weights, a wide enough model: fast_path.bf16_ruled_out), else in fp32.
    On SmolLM2 with AVX-512 BF16 that is 2-2.5x the rows/s, with probabilities within ~0.05 of
    fp32's (docs/classification.md); a run trained there was trained and validated under the same
    autocast. "fp32" gives exact fp32 probabilities (verify and merge compare in it)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        labels: Sequence[str],
        max_length: int,
        source: str,
        prompt: ClassifyPrompt | None = None,
        precision: Precision = "auto",
    ):
        self.model = model.eval()
        self.precision = _chosen_precision(model, precision, source)
        self.prompt = prompt or ClassifyPrompt()  # how texts were read in training (prompt.py)
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"  # the head reads the last real token; see the module doc
        self.labels = list(labels)
        self.max_length = max_length
        self.source = source
        self._lock = threading.Lock()  # one forward pass at a time (server threads share the model)
        self._prefix_cache: tuple[Any, int] | None = None  # the prompt's start, run once (_prefix)

    @classmethod
    def from_adapter(
        cls,
        adapter_dir: str | Path,
        model_settings: ModelSettings | None = None,
        precision: Precision = "auto",
    ) -> Classifier:
        """The base an adapter was trained on, loaded as it was (or as `model_settings` say), with the adapter."""
        folder = Path(adapter_dir).expanduser().resolve()
        meta = require_classifier(folder)
        labels = labels_of(meta, folder)
        settings = model_settings or base_settings(meta, folder)
        tokenizer = load_tokenizer(
            folder
            if (folder / "tokenizer_config.json").is_file()
            else resolve_base(settings.base_model).folder
        )
        model, ref = load_classification_base(settings, labels, tokenizer.pad_token_id)
        peft = apply_adapter(model, folder, meta, ref, settings.base_model)
        prompt = ClassifyPrompt.from_metadata(meta.get("classification"))
        return cls(peft, tokenizer, labels, recorded_max_length(meta), str(folder), prompt, precision)

    @classmethod
    def from_merged(cls, folder: str | Path, precision: Precision = "auto") -> Classifier:
        """A merged folder, loaded with plain transformers exactly as a user without PEFT would."""
        from transformers import AutoModelForSequenceClassification

        folder = Path(folder).expanduser()
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                folder, dtype=torch.float32, use_safetensors=True
            )
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load {folder} as a sequence classifier: {e}") from None
        tokenizer = load_tokenizer(folder)
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        prompt = ClassifyPrompt.from_metadata(merged_classification(folder))
        max_length = int(tokenizer.model_max_length)
        return cls(model, tokenizer, labels, max_length, str(folder), prompt, precision)

    @torch.inference_mode()
    def probabilities(
        self, texts: Sequence[str], batch_size: int = 16, progress: bool = False
    ) -> torch.Tensor:
        """Label probabilities (rows x labels, float32 on the CPU), in the order of `texts`."""
        for i, text in enumerate(texts, start=1):  # one line naming the text, not a tokenizer TypeError
            check_text(text, f"text {i}", fix="remove it from the text")
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad less
        out = torch.empty(len(texts), len(self.labels))
        batches = range(0, len(order), batch_size)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, unit="batch", desc="classifying")
        device = next(self.model.parameters()).device
        for start in batches:
            chunk = order[start : start + batch_size]
            inputs = self.prompt.encode_batch([texts[i] for i in chunk], self.tokenizer, self.max_length)
            with self._lock, self._autocast(device):
                use_threads("classification")  # this process's share of the cores now (threads.py)
                logits = self._logits({k: v.to(device) for k, v in inputs.items()})
            out[chunk] = torch.softmax(logits.float(), dim=-1).cpu()
        return out

    def _logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The head's logits. With a prompt, the part before the text is the same for every text: it
        runs once (its keys and values kept, `_prefix`) and each batch runs only from the text on.
        A causal body gives the same states either way (tests: within 1e-5)."""
        prefix = self._prefix(inputs["input_ids"].device)
        if prefix is None:
            return self.model(**inputs).logits
        cache, n = prefix
        rows = inputs["input_ids"].shape[0]
        batch_cache = copy.deepcopy(cache)
        batch_cache.batch_repeat_interleave(rows)
        return self.model(
            input_ids=inputs["input_ids"][:, n:],  # the head reads the last real token of these
            attention_mask=inputs["attention_mask"],  # prefix and text: the positions follow on
            cache=batch_cache,
            use_cache=True,
        ).logits

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(device.type, torch.bfloat16)
        return contextlib.nullcontext()

    def _prefix(self, device: torch.device) -> tuple[Any, int] | None:
        """(key/value cache, length) of the prompt's text before the text, computed once; None: no prompt."""
        if self.prompt.plain or not self.prompt.before:
            return None
        if self._prefix_cache is None:
            ids = torch.tensor([self.prompt.prefix_ids(self.tokenizer)], device=device)
            out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
            self._prefix_cache = (out.cache, ids.shape[1])
        return self._prefix_cache

    def with_precision(self, precision: Precision) -> Classifier:
        """The same model and settings, reading texts in `precision`."""
        return Classifier(
            self.model, self.tokenizer, self.labels, self.max_length, self.source, self.prompt, precision
        )

    def predict(self, texts: Sequence[str], batch_size: int = 16, progress: bool = False) -> list[Prediction]:
        probs = self.probabilities(texts, batch_size, progress)
        return [
            Prediction(
                self.labels[int(row.argmax())],
                {label: float(p) for label, p in zip(self.labels, row, strict=True)},
            )
            for row in probs
        ]


def _chosen_precision(model: Any, precision: Precision, source: str) -> Literal["fp32", "bf16"]:
    """The precision texts are read in: `precision`, or for "auto" bf16 where it pays (see Classifier)."""
    if precision != "auto":
        return precision
    from ...fast_path import bf16_ruled_out

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    quantized = getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)
    reason = "the base is quantized" if quantized else bf16_ruled_out(base)
    if reason is None:
        log.info(
            "%s: reads texts under bf16 autocast (native bf16 here); precision fp32 for exact fp32", source
        )
    return "fp32" if reason else "bf16"


def merged_classification(folder: Path) -> dict[str, Any] | None:
    """The `classification` metadata a merged folder keeps in lora_studio_merge.json (None: not ours)."""
    from ...export import MERGE_INFO_FILE

    try:
        return json.loads((folder / MERGE_INFO_FILE).read_text()).get("classification")
    except (OSError, ValueError, AttributeError):
        return None  # a classifier merged elsewhere: bare texts


def float32_settings(metadata: dict[str, Any]) -> ModelSettings:
    """The adapter's base settings, unquantized in float32: what merging and checking need."""
    return base_settings(metadata, full_precision=True)
