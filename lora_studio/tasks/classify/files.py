"""Classify a whole data file in batches, write the predictions, and score them where labels are given.

    result = classify_file(classifier, "test.csv", "predictions.csv")   # -> FileResult
    result.scores.lines()      # when test.csv has a label column: accuracy, macro F1, per class
    scores = evaluate_classifier(adapter_folder("tickets"), "test.csv")    # scores only (`lora-studio eval`)

The output keeps every input field and adds `predicted` and the probability of each label: in a
.jsonl file as a `probabilities` object, in a .csv file as one `prob_<label>` column per label. It is
written under a temporary name and renamed, so a failed run leaves no half-written file.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...data import read_rows
from ...errors import ConfigError, DataError
from ...text_checks import check_text, csv_cell
from .data import label_text
from .model import Classifier, Prediction
from .scores import ClassScores, score_predictions

OUTPUT_SUFFIXES = (".jsonl", ".csv")


@dataclass
class FileResult:
    rows: int
    out: Path | None
    scores: ClassScores | None  # None when the file has no label column


def read_texts(
    path: str | Path, text_column: str, label_column: str | None, max_length: int | None = None
) -> tuple[list[dict[str, Any]], list[str], list[str] | None]:
    """(rows, texts, labels or None): labels only when every row has the label column.

    Texts are cut as they are read to what `max_length` tokens can hold (data_files.text_limit)."""
    rows, texts, labels = [], [], []
    for where, row in read_rows(path, max_length):
        if (
            not isinstance(row, dict)
            or not isinstance(row.get(text_column), str)
            or not row[text_column].strip()
        ):
            raise DataError(f"{where}: expected a non-empty text in the field {text_column!r}")
        check_text(row[text_column], f"{where}, field {text_column!r}")
        rows.append(dict(row))
        texts.append(row[text_column])
        if label_column and row.get(label_column) not in (None, ""):
            labels.append(label_text(row[label_column], where, label_column))
    return rows, texts, labels if len(labels) == len(rows) else None


def score_labels(
    labels: list[str], predictions: list[Prediction], known: list[str], source: str
) -> ClassScores:
    unseen = sorted(set(labels) - set(known))
    if unseen:
        raise DataError(
            f"{source}: the label(s) {', '.join(repr(u) for u in unseen[:10])} are not ones the classifier "
            f"was trained on ({', '.join(known[:10])}{', ...' if len(known) > 10 else ''}); it cannot be scored on them"
        )
    ids = {label: i for i, label in enumerate(known)}
    return score_predictions([ids[x] for x in labels], [ids[p.label] for p in predictions], known)


def classify_file(
    classifier: Classifier,
    path: str | Path,
    out: str | Path | None,
    *,
    text_column: str = "text",
    label_column: str | None = "label",
    batch_size: int = 16,
    progress: bool = False,
) -> FileResult:
    """Predict every row of `path`; write them to `out` (.jsonl or .csv) and score any labels."""
    out = Path(out) if out else None
    if out is not None and out.suffix not in OUTPUT_SUFFIXES:
        raise ConfigError(
            f"--out: expected a file ending in {' or '.join(OUTPUT_SUFFIXES)}, got {str(out)!r}"
        )
    rows, texts, labels = read_texts(path, text_column, label_column, classifier.max_length)
    predictions = classifier.predict(texts, batch_size=batch_size, progress=progress)
    if out is not None:
        write_predictions(out, rows, predictions, classifier.labels)
    scores = score_labels(labels, predictions, classifier.labels, Path(path).name) if labels else None
    return FileResult(len(rows), out, scores)


def write_predictions(
    out: Path, rows: list[dict[str, Any]], predictions: list[Prediction], labels: list[str]
) -> None:
    if out.suffix == ".jsonl":
        lines = [
            json.dumps({**row, "predicted": p.label, "probabilities": p.probabilities}, default=str) + "\n"
            for row, p in zip(rows, predictions, strict=True)
        ]
        text = "".join(lines)
    else:
        buffer = io.StringIO()
        fields = list(dict.fromkeys(k for row in rows for k in row)) + ["predicted"]
        fields += [f"prob_{label}" for label in labels]
        writer = csv.writer(buffer)
        writer.writerow([csv_cell(f) for f in fields])  # cells that start a formula are kept as text
        for row, p in zip(rows, predictions, strict=True):
            cells = {
                **row,
                "predicted": p.label,
                **{f"prob_{k}": f"{v:.6f}" for k, v in p.probabilities.items()},
            }
            writer.writerow([csv_cell(cells.get(f, "")) for f in fields])
        text = buffer.getvalue()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)


def evaluate_classifier(
    adapter_dir: str | Path, path: str | Path, batch_size: int = 16, progress: bool = False
) -> ClassScores:
    """Scores of a classification adapter on a labelled file (its recipe's text and label columns)."""
    from .model import require_classifier

    columns = require_classifier(adapter_dir).get("classification") or {}
    text_column, label_column = columns.get("text_column", "text"), columns.get("label_column", "label")
    result = classify_file(
        Classifier.from_adapter(adapter_dir),
        path,
        None,
        text_column=text_column,
        label_column=label_column,
        batch_size=batch_size,
        progress=progress,
    )
    if result.scores is None:
        raise DataError(f"{Path(path).name}: rows need a {label_column!r} field to be scored")
    return result.scores
