"""Classification data: rows of one text and one label, the label map, a stratified split and a report.

    data = prepare_classification(recipe.data, tokenizer, seed=42)   # -> ClassifyData
    data.label_map.labels          # ("billing", "shipping", ...): id i is labels[i]
    data.report.lines()            # class balance, duplicates, leakage, truncation

Rows come from the same files chat data does (CSV, JSONL, JSON, Parquet, `datasets` folders, read by
`data.read_rows`); `text_column` and `label_column` name the two fields. Labels may be names or bare
numbers (`3` and `"3"` are the same label). Label ids follow a fixed order, independent of the row
order: numeric labels by value (so 0..K-1 keep their own numbers as ids), others alphabetically.
The validation split is stratified per class and never takes a class's last training row, so
every label is learned even with ~10 rows per class.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...config import ClassifySettings
from ...data import data_fingerprint, read_rows
from ...errors import DataError
from ...text_checks import check_text
from .lengths import AUTO, choose_max_length, reading_bound
from .lengths import DEFAULT as DEFAULT_MAX_LENGTH
from .prompt import ClassifyPrompt, choose_prompt

log = logging.getLogger(__name__)

IMBALANCE_RATIO = 3.0  # largest / smallest class size that counts as real skew
FEW_ROWS = 5  # a class with fewer training rows than this is hard to learn


@dataclass(frozen=True)
class LabeledText:
    where: str  # "train.csv, line 3"
    text: str
    label: str


@dataclass(frozen=True)
class LabelMap:
    """Label names in id order: id i is `labels[i]`."""

    labels: tuple[str, ...]

    @classmethod
    def from_labels(cls, labels: Any) -> LabelMap:
        unique = set(labels)
        if all(re.fullmatch(r"-?\d+", label) for label in unique):
            return cls(tuple(sorted(unique, key=int)))
        return cls(tuple(sorted(unique)))

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    def to_dict(self) -> dict[str, Any]:
        """What `lora_studio.json` and `labels.json` hold (JSON keys are strings, so id2label's are too)."""
        return {
            "labels": list(self.labels),
            "id2label": {str(i): label for i, label in self.id2label.items()},
            "label2id": self.label2id,
        }


# --- reading rows ----------------------------------------------------------------------------------
def label_text(value: Any, where: str, column: str) -> str:
    """A label as text: names stay as they are (trimmed), numbers become their digits (3.0 -> "3")."""
    if isinstance(value, bool) or value is None:
        value = None if value is None else str(value).lower()
    elif isinstance(value, float) and value.is_integer():
        value = str(int(value))
    elif isinstance(value, (int, float)):
        value = str(value)
    if not isinstance(value, str):
        raise DataError(
            f"{where}, field {column!r}: expected a label name or number, got {type(value).__name__}"
        )
    if not value.strip():
        raise DataError(f"{where}, field {column!r}: the label is empty; every row needs one")
    return value.strip()


def to_labeled(where: str, row: Any, text_column: str, label_column: str) -> LabeledText:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with named fields, got {type(row).__name__}")
    for column, setting in ((text_column, "text_column"), (label_column, "label_column")):
        if column not in row or row[column] is None:
            raise DataError(
                f"{where}: missing field {column!r} (task: classify needs a text and a label per row; "
                f"the row has {sorted(row)}; set {setting}: to name yours)"
            )
    text = row[text_column]
    if not isinstance(text, str):
        raise DataError(f"{where}, field {text_column!r}: expected text, got {type(text).__name__}")
    if not text.strip():
        raise DataError(f"{where}, field {text_column!r}: the text is empty")
    check_text(text, f"{where}, field {text_column!r}")
    return LabeledText(where, text, label_text(row[label_column], where, label_column))


def load_labeled(
    path: str | Path, text_column: str = "text", label_column: str = "label", max_length: int | None = None
) -> list[LabeledText]:
    """Every row of a file as a checked LabeledText; the first bad row raises a DataError naming it.

    Texts are cut as they are read to what `max_length` tokens can hold (data_files.text_limit)."""
    rows = read_rows(path, max_length)
    return [to_labeled(where, row, text_column, label_column) for where, row in rows]


# --- splitting and checking ------------------------------------------------------------------------
def stratified_split(
    rows: list[LabeledText], fraction: float, seed: int
) -> tuple[list[LabeledText], list[LabeledText]]:
    """Hold out about `fraction` of the rows, in proportion per class, never a class's last row.

    The held-out total is shared out by largest remainder (so 60 classes of 10 rows at 0.1 give one
    row each, not zero by rounding), and each class keeps at least one row for training.
    """
    if fraction <= 0 or len(rows) < 10:
        return rows, []
    by_class: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_class.setdefault(row.label, []).append(i)
    total = max(1, round(len(rows) * fraction))
    quotas = {label: len(ids) * total / len(rows) for label, ids in by_class.items()}
    take = {label: min(int(q), len(by_class[label]) - 1) for label, q in quotas.items()}
    by_remainder = sorted(by_class, key=lambda label: (-(quotas[label] - int(quotas[label])), label))
    for label in by_remainder:
        if sum(take.values()) >= total:
            break
        if take[label] < len(by_class[label]) - 1:
            take[label] += 1
    rng = random.Random(seed)
    held: set[int] = set()
    for label in sorted(by_class):
        ids = list(by_class[label])
        rng.shuffle(ids)
        held.update(ids[: take[label]])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def check_label_sets(train: list[LabeledText], other: list[LabeledText], source: str) -> None:
    """Training needs two classes or more; validation and test labels must all be ones training has."""
    labels = {r.label for r in train}
    if len(labels) < 2:
        only = next(iter(labels)) if labels else None
        raise DataError(
            f"{source}: every training row has the label {only!r}; a classifier needs at least two "
            "classes to choose between. Add rows of the other labels"
        )
    unseen = [r for r in other if r.label not in labels]
    if unseen:
        names = sorted({r.label for r in unseen})
        raise DataError(
            f"{unseen[0].where}: the label(s) {', '.join(repr(n) for n in names[:10])} never appear in the "
            f"training rows ({len(unseen)} row(s) have them), so the model cannot learn them. Add training "
            "rows with these labels, or drop these rows"
        )


def class_weights(rows: list[LabeledText], label_map: LabelMap) -> list[float]:
    """Inverse-frequency weights, n_rows / (n_classes * n_rows_of_class), as scikit-learn's 'balanced'."""
    counts = Counter(r.label for r in rows)
    return [len(rows) / (len(label_map.labels) * counts[label]) for label in label_map.labels]


# --- the whole preparation and its report ----------------------------------------------------------
@dataclass
class ClassifyReport:
    """What a person should know about labelled data before training on it."""

    format: str
    train_rows: int
    val_rows: int
    classes: int
    class_counts: dict[str, int]  # training rows per label, in id order
    val_class_counts: dict[str, int]
    imbalance_ratio: float  # largest / smallest training class
    duplicates: int = 0
    conflicting: int = 0  # texts that appear with more than one label
    leaked: int = 0  # validation texts also in training
    truncated: int = 0
    max_length: int = 0
    max_length_chosen: str = ""  # how `auto` chose it (lengths.LengthChoice.line), empty when set
    token_lengths: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        counts = ", ".join(f"{label} {n}" for label, n in list(self.class_counts.items())[:12])
        more = f" (+{self.classes - 12} more)" if self.classes > 12 else ""
        return [
            "format: classification (text + label)",
            f"rows: {self.train_rows} train, {self.val_rows} validation",
            f"classes: {self.classes}; training rows per class: {counts}{more}",
            f"largest / smallest class: {self.imbalance_ratio:.1f}x",
            "tokens per row: " + ", ".join(f"{k} {v:.0f}" for k, v in self.token_lengths.items()),
            f"duplicates: {self.duplicates}; texts with conflicting labels: {self.conflicting}",
            f"train/validation leakage: {self.leaked}",
            f"truncated at max_length={self.max_length}: {self.truncated}",
            *([self.max_length_chosen] if self.max_length_chosen else []),
            *(f"warning: {w}" for w in self.warnings),
        ]


@dataclass
class ClassifyData:
    train: list[dict[str, Any]]  # encoded rows: input_ids, labels (the class id)
    val: list[dict[str, Any]]
    label_map: LabelMap
    report: ClassifyReport
    fingerprint: str
    train_rows: list[LabeledText]
    val_rows: list[LabeledText]
    prompt: ClassifyPrompt = field(default_factory=ClassifyPrompt)  # how each text became input_ids
    max_length: int = DEFAULT_MAX_LENGTH  # the token limit used (chosen from the data under `auto`)


def dedupe_rows(rows: list[LabeledText]) -> list[LabeledText]:
    """The rows without exact repeats (same text, same label), the first of each kept in order."""
    seen: set[tuple[str, str]] = set()
    kept = []
    for row in rows:
        if (row.text, row.label) not in seen:
            seen.add((row.text, row.label))
            kept.append(row)
    return kept


def prepare_classification(
    settings: Any, tokenizer: Any, seed: int = 42, columns: ClassifySettings | None = None
) -> ClassifyData:
    """Load, check, split, tokenize and report on the data of a classify recipe (`data` and `classify`)."""
    columns = columns or ClassifySettings()
    text, label = columns.text_column, columns.label_column
    bound = reading_bound(settings.max_length, tokenizer)  # max_length: auto reads at its cap, then cuts
    train_rows = load_labeled(settings.train_file, text, label, bound)
    if settings.dedupe:  # before the split, so no row can land on both sides
        train_rows = dedupe_rows(train_rows)
    if settings.val_file:
        val_rows = load_labeled(settings.val_file, text, label, bound)
    else:
        train_rows, val_rows = stratified_split(train_rows, settings.val_fraction, seed)
    check_label_sets(train_rows, val_rows, Path(settings.train_file).name)
    label_map = LabelMap.from_labels(r.label for r in train_rows)
    ids = label_map.label2id
    prompt = choose_prompt(columns.prompt, label_map.labels, tokenizer, bound)

    def encoded(rows: list[LabeledText], limit: int, first: list[dict] | None = None) -> list[dict[str, Any]]:
        """`first`: the rows encoded at a higher limit; those that fit `limit` are the same, and kept."""
        return [
            done
            if done and done["length"] <= limit
            else {**prompt.encode(r.text, tokenizer, limit), "labels": ids[r.label]}
            for r, done in zip(rows, first or [None] * len(rows), strict=True)
        ]

    train, val = encoded(train_rows, bound), encoded(val_rows, bound)
    max_length, choice = bound, None
    if settings.max_length == AUTO:
        overhead = prompt.encode("", tokenizer, bound)["length"]
        choice = choose_max_length([row["length"] for row in train], overhead, bound)
        log.info(choice.line())
        max_length = choice.max_length
        train, val = encoded(train_rows, max_length, train), encoded(val_rows, max_length, val)
    report = make_report(train_rows, val_rows, label_map, train + val, max_length)
    report.max_length_chosen = choice.line() if choice else ""
    fields = [text, label] + ([] if prompt.plain else [prompt.to_dict()])  # bare texts: as before prompts
    digest = hashlib.sha256((data_fingerprint(settings) + json.dumps(fields)).encode()).hexdigest()
    return ClassifyData(train, val, label_map, report, digest, train_rows, val_rows, prompt, max_length)


def make_report(
    train: list[LabeledText],
    val: list[LabeledText],
    label_map: LabelMap,
    encoded: list[dict],
    max_length: int,
) -> ClassifyReport:
    counts, val_counts = Counter(r.label for r in train), Counter(r.label for r in val)
    sizes = [counts[label] for label in label_map.labels]
    lengths = sorted(row["length"] for row in encoded)
    labels_of: dict[str, set[str]] = {}
    for r in train + val:
        labels_of.setdefault(r.text, set()).add(r.label)
    train_texts = {r.text for r in train}
    report = ClassifyReport(
        format="classification",
        train_rows=len(train),
        val_rows=len(val),
        classes=len(label_map.labels),
        class_counts={label: counts[label] for label in label_map.labels},
        val_class_counts={label: val_counts[label] for label in label_map.labels},
        imbalance_ratio=max(sizes) / min(sizes),
        duplicates=len(train) - len({(r.text, r.label) for r in train}),
        conflicting=sum(len(labels) > 1 for labels in labels_of.values()),
        leaked=sum(r.text in train_texts for r in val),
        truncated=sum(row["truncated"] for row in encoded),
        max_length=max_length,
        token_lengths={
            "mean": sum(lengths) / len(lengths),
            "p95": lengths[int(0.95 * (len(lengths) - 1))],
            "max": lengths[-1],
        },
    )
    report.warnings = _warnings(report)
    return report


def _warnings(r: ClassifyReport) -> list[str]:
    out = []
    if r.imbalance_ratio >= IMBALANCE_RATIO:
        big = max(r.class_counts, key=r.class_counts.__getitem__)
        small = min(r.class_counts, key=r.class_counts.__getitem__)
        out.append(
            f"imbalanced classes: {big!r} has {r.class_counts[big]} training rows, {small!r} only "
            f"{r.class_counts[small]} ({r.imbalance_ratio:.0f}x); the model may favour the big classes. "
            "Set classify.class_weight: balanced, or add rows to the small ones"
        )
    few = [label for label, n in r.class_counts.items() if n < FEW_ROWS]
    if few:
        out.append(
            f"{len(few)} class(es) have fewer than {FEW_ROWS} training rows (e.g. {few[0]!r}): hard to learn"
        )
    if r.duplicates:
        out.append(f"{r.duplicates} duplicate training rows weigh those examples more; remove them")
    if r.conflicting:
        out.append(f"{r.conflicting} texts appear with different labels: the model cannot get them all right")
    if r.leaked:
        out.append(
            f"{r.leaked} validation texts also appear in training: validation scores will look too good"
        )
    if r.truncated:
        out.append(f"{r.truncated} texts are cut at max_length={r.max_length}; their endings are not read")
    if r.val_rows == 0:
        out.append("no validation rows: accuracy cannot be watched during training and early stopping is off")
    return out
