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

import csv
import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError

FORMAT_FIELDS = {
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
ROLES = {"system", "user", "assistant"}
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
IGNORE_INDEX = -100  # label of tokens that do not count in the loss


@dataclass(frozen=True)
class Example:
    """One checked row: a chat (`messages`) or a plain text, with where it came from."""

    where: str  # "file.jsonl, line 3"
    messages: tuple[dict[str, str], ...] = ()
    text: str | None = None

    def key(self) -> str:
        """Identity of the row, for duplicates."""
        return json.dumps([list(self.messages), self.text], sort_keys=True)

    def prompt_key(self) -> str:
        """Identity of what the model is asked, for leakage between train and validation."""
        if self.text is not None:
            return self.text
        last_answer = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return json.dumps(list(self.messages[:last_answer]), sort_keys=True)

    def answer(self) -> str:
        return (
            self.text
            if self.text is not None
            else [m["content"] for m in self.messages if m["role"] == "assistant"][-1]
        )


# --- reading files -----------------------------------------------------------------------------
def read_rows(path: str | Path) -> list[tuple[str, Any]]:
    """Rows of a data file as (location, row) pairs; malformed content names its line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        rows = _read_datasets_folder(path)
    elif path.suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif path.suffix == ".json":
        rows = _read_json(path)
    elif path.suffix == ".csv":
        rows = _read_csv(path)
    elif path.suffix == ".parquet":
        rows = _read_parquet(path)
    else:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}"
            " or a saved `datasets` folder"
        )
    if not rows:
        raise DataError(f"{path} is empty: it has no rows")
    return rows


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path.name}, line {number}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path.name}, line {number}: not valid JSON ({e.msg} at column {e.colno})"
                ) from None
    return rows


def _read_json(path: Path) -> list[tuple[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path.name}, line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})"
        ) from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]}-style wrappers
    if not isinstance(data, list):
        raise DataError(f"{path.name}: expected a JSON list of rows, got a {type(data).__name__}")
    return [(f"{path.name}, row {i}", row) for i, row in enumerate(data, start=1)]


def _read_csv(path: Path) -> list[tuple[str, Any]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        rows = []
        for row in reader:
            if None in row:
                raise DataError(
                    f"{path.name}, line {reader.line_num}: more values than the header has columns"
                )
            rows.append((f"{path.name}, line {reader.line_num}", row))
    return rows


def _read_parquet(path: Path) -> list[tuple[str, Any]]:
    from datasets import Dataset

    try:
        table = Dataset.from_parquet(str(path))
    except Exception as e:
        raise DataError(f"{path.name}: not a readable Parquet file ({e})") from None
    return [(f"{path.name}, row {i}", row) for i, row in enumerate(table, start=1)]


def _read_datasets_folder(path: Path) -> list[tuple[str, Any]]:
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: not a saved `datasets` folder ({e})") from None
    if isinstance(data, DatasetDict):
        data = data["train"] if "train" in data else next(iter(data.values()))
    return [(f"{path.name}, row {i}", row) for i, row in enumerate(data, start=1)]


# --- formats -----------------------------------------------------------------------------------
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
    raise DataError(
        f"{source}: cannot tell the format from the fields {sorted(first)} of its first row. Expected "
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
    value = row.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DataError(
            f"{where}, field {name!r}: expected a string, got {type(value).__name__} {value!r:.60}"
        )
    if required and not value.strip():
        raise DataError(f"{where}, field {name!r}: is empty")
    return value


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if isinstance(value, str):  # CSV cells hold the list as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{where}, field 'messages': expected a list of messages, got text") from None
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}, field 'messages': expected a non-empty list of {{role, content}} objects")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise DataError(
                f"{where}, field 'messages', item {i}: expected {{\"role\": one of "
                f'{sorted(ROLES)}, "content": a string}}, got {m!r:.80}'
            )
        messages.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}, field 'messages': has no assistant message to learn from")
    if [m["role"] for m in messages if m["role"] != "system"][0] == "assistant":
        raise DataError(
            f"{where}, field 'messages': the first message (after any system one) must be the user's"
        )
    return messages


def load_examples(
    path: str | Path, fmt: str = "auto", system_prompt: str | None = None
) -> tuple[str, list[Example]]:
    """Read, detect and check a whole file; the first bad row raises a DataError naming it."""
    rows = read_rows(path)
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
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)

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


def encode(example: Example, tokenizer: Any, max_length: int) -> dict[str, Any]:
    """Token ids and labels (-100 outside the answers), cut to max_length."""
    input_ids: list[int] = []
    labels: list[int] = []
    for i, (text, trainable) in enumerate(render(example, tokenizer)):
        # Chat templates write their own special tokens; plain text gets the tokenizer's BOS.
        add_special = example.text is not None and i == 0
        ids = tokenizer(text, add_special_tokens=add_special)["input_ids"]
        input_ids += ids
        labels += ids if trainable else [IGNORE_INDEX] * len(ids)
    truncated = len(input_ids) > max_length
    return {
        "input_ids": input_ids[:max_length],
        "labels": labels[:max_length],
        "length": len(input_ids),
        "truncated": truncated,
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
    max_length: int = 0
    token_lengths: dict[str, float] = field(default_factory=dict)
    top_answer_share: float = 0.0  # share of the most common answer among training rows
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [
            f"format: {self.format}",
            f"rows: {self.train_rows} train, {self.val_rows} validation",
            "tokens per row: " + ", ".join(f"{k} {v:.0f}" for k, v in self.token_lengths.items()),
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
    fmt, train_examples = load_examples(settings.train_file, settings.format, settings.system_prompt)
    if settings.dedupe:  # before the split, so no row can land on both sides
        train_examples = dedupe(train_examples)
    if settings.val_file:
        _, val_examples = load_examples(settings.val_file, fmt, settings.system_prompt)
    else:
        train_examples, val_examples = split(train_examples, settings.val_fraction, seed)
    train = [encode(e, tokenizer, settings.max_length) for e in train_examples]
    val = [encode(e, tokenizer, settings.max_length) for e in val_examples]
    if all(row["truncated"] for row in train):
        longest = max(row["length"] for row in train)
        raise DataError(
            f"{Path(settings.train_file).name}: every example is longer than max_length="
            f"{settings.max_length} tokens (the longest has {longest}); raise max_length"
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
    if r.train_rows >= 20 and r.top_answer_share > 0.5:
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
                h.update(f.read_bytes())
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
    fmt, examples = load_examples(path, fmt)
    train_examples, val_examples = split(examples, val_fraction, seed=42)
    encoded = [encode(e, tokenizer, max_length) for e in examples]
    report = make_report(fmt, train_examples, val_examples, encoded, max_length)
    return FileCheck(str(path), report, [render(e, tokenizer) for e in examples[:samples]])
