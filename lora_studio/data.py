"""Training data: read files, detect the row format, check every row, render and tokenize.

Four row formats, detected from the fields of the first row (or named in the recipe):
  messages           {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
  alpaca             {"instruction": ..., "input": ... (optional), "output": ...}
  prompt_completion  {"prompt": ..., "completion": ...}
  text               {"text": ...}
The first three are chats: they are rendered with the base model's chat template and the loss
covers only the assistant's tokens. Plain text is trained on in full.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import field_range
from .data_files import CHARS_PER_TOKEN, parse_json_cell, read_rows
from .data_files import SUFFIXES as SUFFIXES  # re-exported: file reading lives in data_files
from .errors import DataError
from .label_balance import MIN_SKEW_SHARE, SKEW_RATIO, dominance
from .text_checks import check_text

FORMAT_FIELDS = {
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
ROLES = {"system", "user", "assistant"}
IGNORE_INDEX = -100  # label of tokens that do not count in the loss
# Before a row is rendered and tokenised it is cut to (max_length + 1) * CHARS_PER_TOKEN characters:
# ordinary text averages 3-5 characters per token, so the cut keeps every token training sees, and
# one 60 MB line costs what a long row costs (tokenising all of it took 9 GB). The reader
# (data_files.read_rows) has already cut each text to about that as it read it.
MESSAGE_OVERHEAD = 16  # characters counted for each message of a chat, so endless empty turns are cut too


@dataclass(frozen=True)
class Example:
    """One checked row: a chat (`messages`) or a plain text, with where it came from."""

    where: str  # "file.jsonl, line 3"
    messages: tuple[dict[str, str], ...] = ()
    text: str | None = None

    def key(self) -> str:
        """Identity of the row, for duplicates (a hash: sets of keys stay small for long rows)."""
        return _digest([list(self.messages), self.text])

    def prompt_key(self) -> str:
        """Identity of what the model is asked, for leakage between train and validation."""
        if self.text is not None:
            return _digest(self.text)
        last_answer = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return _digest(list(self.messages[:last_answer]))

    def answer(self) -> str:
        return (
            self.text
            if self.text is not None
            else [m["content"] for m in self.messages if m["role"] == "assistant"][-1]
        )


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


# --- formats -----------------------------------------------------------------------------------
def check_format(fmt: str) -> None:
    if fmt != "auto" and fmt not in FORMAT_FIELDS:
        raise DataError(f"unknown data format {fmt!r}; use one of: auto, {', '.join(FORMAT_FIELDS)}")


def check_options(fmt: str, max_length: int) -> None:
    """Refuse an unknown format or an out-of-range max_length before any file is read."""
    check_format(fmt)
    limits = field_range("max_length")
    if max_length not in limits:
        raise DataError(f"max_length: must be {limits} tokens, got {max_length}")


def detect_format(rows: list[tuple[str, Any]], source: str) -> str:
    where, first = rows[0]
    if not isinstance(first, dict):
        raise DataError(f"{where}: expected an object with named fields, got {type(first).__name__}")
    for name, needed in FORMAT_FIELDS.items():
        if all(k in first for k in needed):
            return name
    for name, needed in FORMAT_FIELDS.items():
        if any(k in first for k in needed):  # a partial match: checking the row will name what is missing
            return name
    names = sorted(str(k)[:40] for k in first)
    shown = str(names[:10])[:-1] + (f", ... {len(names) - 10} more]" if len(names) > 10 else "]")
    raise DataError(
        f"{source}: cannot tell the format from the fields {shown} of its first row. Expected "
        "'messages', 'instruction'+'output', 'prompt'+'completion' or 'text' (or set format: in the recipe)"
    )


def to_example(where: str, row: Any, fmt: str, system_prompt: str | None = None) -> Example:
    """Check one row against its format and turn it into an Example."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with named fields, got {type(row).__name__}")
    for name in FORMAT_FIELDS[fmt]:
        if row.get(name) is None:
            raise DataError(
                f"{where}: missing field {name!r} (the {fmt} format needs "
                f"{' and '.join(repr(f) for f in FORMAT_FIELDS[fmt])})"
            )
    if fmt == "text":
        return Example(where, text=_string(row, "text", where))
    if fmt == "messages":
        messages = _messages(row["messages"], where)
    elif fmt == "alpaca":
        instruction = _string(row, "instruction", where)
        extra = _string(row, "input", where, required=False)
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _string(row, "output", where)},
        ]
    else:
        messages = [
            {"role": "user", "content": _string(row, "prompt", where)},
            {"role": "assistant", "content": _string(row, "completion", where)},
        ]
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return Example(where, messages=tuple(messages))


def _string(row: dict, name: str, where: str, required: bool = True) -> str:
    """A text field, checked. Messages name the field and the value's type, never its content."""
    value = row.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}, field {name!r}: expected a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"{where}, field {name!r}: is empty")
    return _checked_text(value, f"{where}, field {name!r}")


_checked_text = check_text  # refuse text no tokenizer should see: NUL characters and unpaired surrogates


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    place = f"{where}, field 'messages'"
    if isinstance(value, str):  # CSV cells hold the list as JSON text
        value = parse_json_cell(value, place)
    if not isinstance(value, list) or not value:
        raise DataError(f"{place}: expected a non-empty list of {{role, content}} objects")
    messages = [_message(m, f"{place}, item {i}") for i, m in enumerate(value)]
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}, field 'messages': has no assistant message to learn from")
    if [m["role"] for m in messages if m["role"] != "system"][0] == "assistant":
        raise DataError(
            f"{where}, field 'messages': the first message (after any system one) must be the user's"
        )
    return messages


def _message(m: Any, place: str) -> dict[str, str]:
    expected = f'expected {{"role": one of {sorted(ROLES)}, "content": a string}}'
    if not isinstance(m, dict):
        raise DataError(f"{place}: {expected}, got {type(m).__name__}")
    if not isinstance(m.get("role"), str) or m["role"] not in ROLES:  # (a list is unhashable)
        raise DataError(f"{place}: {expected}, got {'no role' if 'role' not in m else 'another role'}")
    if not isinstance(m.get("content"), str):
        raise DataError(f"{place}: {expected}, got content of type {type(m.get('content')).__name__}")
    return {"role": m["role"], "content": _checked_text(m["content"], f"{place}, 'content'")}


def load_examples(
    path: str | Path, fmt: str = "auto", system_prompt: str | None = None, max_length: int | None = None
) -> tuple[str, list[Example]]:
    """Read, detect and check a whole file; the first bad row raises a DataError naming it.

    Texts are cut as they are read to what `max_length` tokens can hold (data_files.text_limit).
    """
    check_format(fmt)
    rows = read_rows(path, max_length)
    if fmt == "auto":
        fmt = detect_format(rows, Path(path).name)
    return fmt, [to_example(where, row, fmt, system_prompt) for where, row in rows]


# --- rendering and tokenizing ------------------------------------------------------------------
def render(example: Example, tokenizer: Any) -> list[tuple[str, bool]]:
    """The example as text segments, each marked trainable (assistant answer) or not (prompt)."""
    if example.text is not None:
        return [(example.text + (tokenizer.eos_token or ""), True)]
    messages = list(example.messages)

    def template(msgs: list[dict], prompt: bool = False) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)
        except Exception as e:  # templates raise on conversations they do not support (jinja errors)
            raise DataError(
                f"{example.where}: the model's chat template refuses this conversation "
                f"({type(e).__name__}: {str(e)[:200]})"
            ) from None

    segments, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, full = template(messages[:i], prompt=True), template(messages[: i + 1])
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise DataError(
                f"{example.where}: the model's chat template renders this conversation "
                "inconsistently turn by turn; train on single-turn rows instead"
            )
        segments += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    rest = template(messages)[len(done) :]
    if rest:
        segments.append((rest, False))
    return [(text, trainable) for text, trainable in segments if text]


def bounded(example: Example, max_length: int) -> tuple[Example, bool]:
    """The example cut to what its first max_length tokens can hold, and whether anything was cut."""
    budget = (max_length + 1) * CHARS_PER_TOKEN
    if example.text is not None:
        cut = len(example.text) > budget
        return (dataclasses.replace(example, text=example.text[:budget]) if cut else example), cut
    kept, cut = [], False
    for m in example.messages:
        if budget <= 0:  # later turns start beyond max_length
            cut = True
            break
        if len(m["content"]) > budget:
            m, cut = {**m, "content": m["content"][:budget]}, True
        kept.append(m)
        budget -= len(m["content"]) + MESSAGE_OVERHEAD
    return (dataclasses.replace(example, messages=tuple(kept)) if cut else example), cut


def encode(example: Example, tokenizer: Any, max_length: int) -> dict[str, Any]:
    """Token ids and labels (-100 outside the answers), cut to max_length.

    `length` counts the tokens of the row; for a row cut by `bounded` first (`cut`), it counts
    only those of the part kept (normally already more than max_length).
    """
    example, cut = bounded(example, max_length)
    input_ids: list[int] = []
    labels: list[int] = []
    for i, (text, trainable) in enumerate(render(example, tokenizer)):
        # Chat templates write their own special tokens; plain text gets the tokenizer's BOS.
        add_special = example.text is not None and i == 0
        ids = tokenizer(text, add_special_tokens=add_special)["input_ids"]
        input_ids += ids
        labels += ids if trainable else [IGNORE_INDEX] * len(ids)
    return {
        "input_ids": input_ids[:max_length],
        "labels": labels[:max_length],
        "length": len(input_ids),
        "truncated": cut or len(input_ids) > max_length,
        "cut": cut,
    }


def split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out a seeded random `fraction` for validation (at least one row from 10 rows up)."""
    if fraction <= 0 or len(examples) < 10:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(examples) * fraction))
    held = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in held], [
        e for i, e in enumerate(examples) if i in held
    ]


def dedupe(examples: list[Example]) -> list[Example]:
    """The examples without exact repeats (same messages or text), first occurrence kept."""
    seen: set[str] = set()
    kept = []
    for e in examples:
        if e.key() not in seen:
            seen.add(e.key())
            kept.append(e)
    if len(kept) < len(examples):
        logging.getLogger(__name__).info("dedupe: dropped %d duplicate rows", len(examples) - len(kept))
    return kept


# --- the whole preparation and its report ------------------------------------------------------
@dataclass
class DataReport:
    """What a person should know about their data before training on it."""

    format: str
    train_rows: int
    val_rows: int
    duplicates: int = 0  # training rows identical to an earlier training row
    leaked: int = 0  # validation rows whose prompt also appears in training
    truncated: int = 0  # rows longer than max_length
    cut: int = 0  # rows so long they were cut before tokenising: their token counts are lower bounds
    max_length: int = 0
    token_lengths: dict[str, float] = field(default_factory=dict)
    top_answer_share: float = 0.0  # share of the most common answer among training rows
    top_answer_ratio: float = 0.0  # its rows / the average rows of each other answer (1: even)
    warnings: list[str] = field(default_factory=list)

    @property
    def cut_at(self) -> int:
        return (self.max_length + 1) * CHARS_PER_TOKEN

    def lines(self) -> list[str]:
        out = [
            f"format: {self.format}",
            f"rows: {self.train_rows} train, {self.val_rows} validation",
            "tokens per row: "
            + ", ".join(f"{k} {v:.0f}" for k, v in self.token_lengths.items())
            + (
                f"; {self.cut} row(s) over {self.cut_at} characters counted only that far" if self.cut else ""
            ),
            f"duplicates: {self.duplicates}",
            f"train/validation leakage: {self.leaked}",
            f"truncated at max_length={self.max_length}: {self.truncated}",
            f"most common answer: {self.top_answer_share:.1%} of training rows",
        ]
        return out + [f"warning: {w}" for w in self.warnings]


@dataclass
class PreparedData:
    train: list[dict[str, Any]]  # encoded rows: input_ids, labels
    val: list[dict[str, Any]]
    report: DataReport
    fingerprint: str
    examples: list[Example]  # the training examples, for showing how they render


def prepare(settings: Any, tokenizer: Any, seed: int = 42) -> PreparedData:
    """Load, check, split, tokenize and report on the data of a recipe's `data` section."""
    fmt, train_examples = load_examples(
        settings.train_file, settings.format, settings.system_prompt, settings.max_length
    )
    if settings.dedupe:  # before the split, so no row can land on both sides
        train_examples = dedupe(train_examples)
    if settings.val_file:
        _, val_examples = load_examples(settings.val_file, fmt, settings.system_prompt, settings.max_length)
    else:
        train_examples, val_examples = split(train_examples, settings.val_fraction, seed)
    train = [encode(e, tokenizer, settings.max_length) for e in train_examples]
    val = [encode(e, tokenizer, settings.max_length) for e in val_examples]
    if all(row["truncated"] for row in train):
        longest = max(row["length"] for row in train)
        at_least = "at least " if any(row["cut"] for row in train) else ""
        raise DataError(
            f"{Path(settings.train_file).name}: every example is longer than max_length="
            f"{settings.max_length} tokens (the longest has {at_least}{longest}); raise max_length"
        )
    report = make_report(fmt, train_examples, val_examples, train + val, settings.max_length)
    return PreparedData(train, val, report, data_fingerprint(settings), train_examples)


def make_report(
    fmt: str, train: list[Example], val: list[Example], encoded: list[dict], max_length: int
) -> DataReport:
    report = DataReport(format=fmt, train_rows=len(train), val_rows=len(val), max_length=max_length)
    seen: set[str] = set()
    for e in train:
        report.duplicates += e.key() in seen
        seen.add(e.key())
    train_prompts = {e.prompt_key() for e in train}
    report.leaked = sum(e.prompt_key() in train_prompts for e in val)
    report.truncated = sum(row["truncated"] for row in encoded)
    report.cut = sum(row["cut"] for row in encoded)
    lengths = sorted(row["length"] for row in encoded)
    report.token_lengths = {
        "mean": sum(lengths) / len(lengths),
        "p95": lengths[int(0.95 * (len(lengths) - 1))],
        "max": lengths[-1],
    }
    answers: dict[str, int] = {}
    for e in train:
        answers[e.answer()] = answers.get(e.answer(), 0) + 1
    report.top_answer_share = max(answers.values()) / len(train)
    report.top_answer_ratio = min(dominance(list(answers.values())), float(len(train)))  # finite JSON
    report.warnings = _warnings(report)
    return report


def _warnings(r: DataReport) -> list[str]:
    out = []
    if r.duplicates:
        out.append(f"{r.duplicates} duplicate training rows weigh those examples more; remove them")
    if r.leaked:
        out.append(f"{r.leaked} validation rows also appear in training: validation loss will look too good")
    if r.truncated:
        out.append(f"{r.truncated} rows are cut at max_length={r.max_length}; their endings are not learned")
    # Skew relative to the number of answers: 54/46 over two answers is even enough, 40% over
    # twenty is not; a repeated reply among free-text answers (a small share) is no skew.
    if r.train_rows >= 20 and r.top_answer_ratio >= SKEW_RATIO and r.top_answer_share >= MIN_SKEW_SHARE:
        out.append(
            f"one answer makes up {r.top_answer_share:.0%} of training rows: the model may learn to "
            "always give it (imbalanced data)"
        )
    if r.val_rows == 0:
        out.append("no validation rows: overfitting cannot be watched and early stopping is off")
    return out


def data_fingerprint(settings: Any) -> str:
    """A hash of the data files' bytes and the settings that shape the examples."""
    h = hashlib.sha256()
    for name in (settings.train_file, settings.val_file):
        if not name:
            continue
        path = Path(name)
        for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if f.is_file():
                with open(f, "rb") as stream:  # in chunks: a data file may be larger than memory
                    while chunk := stream.read(1 << 22):
                        h.update(chunk)
    h.update(
        json.dumps(
            [settings.format, settings.system_prompt, settings.max_length, settings.val_fraction]
            + (["dedupe"] if settings.dedupe else [])  # only when on: older fingerprints stay valid
        ).encode()
    )
    return h.hexdigest()


# --- checking a file before training -----------------------------------------------------------
@dataclass
class FileCheck:
    """What `lora-studio data check` and the UI's Data tab show about one file."""

    path: str
    report: DataReport
    samples: list[list[tuple[str, bool]]]  # the first examples as rendered segments

    def lines(self) -> list[str]:
        out = [f"file: {self.path}", *self.report.lines()]
        for i, segments in enumerate(self.samples, start=1):
            out.append(f"--- example {i} as the model sees it ([[...]] is what it learns to write) ---")
            out.append("".join(f"[[{text}]]" if trainable else text for text, trainable in segments))
        return out


def check_file(
    path: str | Path,
    tokenizer: Any,
    fmt: str = "auto",
    max_length: int = 512,
    val_fraction: float = 0.1,
    samples: int = 1,
) -> FileCheck:
    """Parse, detect, split and report on a file as training would, without training."""
    check_options(fmt, max_length)
    fmt, examples = load_examples(path, fmt, max_length=max_length)
    train_examples, val_examples = split(examples, val_fraction, seed=42)
    encoded = [encode(e, tokenizer, max_length) for e in examples]
    report = make_report(fmt, train_examples, val_examples, encoded, max_length)
    shown = [render(bounded(e, max_length)[0], tokenizer) for e in examples[:samples]]
    return FileCheck(str(path), report, shown)
