"""Scoring generated answers against references: pure functions, no model, no torch.

    metric = choose_metric(references)           # "json", "labels" or "exact", from the references alone
    result = score(answers, references, metric)   # Score: headline number, per-row correctness, details

Three metrics, one per kind of answer:
  exact   the answer equals the reference up to whitespace and letter case (any task);
  labels  classification: accuracy, macro F1, per-class precision/recall and a confusion matrix;
  json    extraction: per-field and whole-record exact match of a JSON object.
Exact match is reported for every metric, so any two runs can be compared on it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import DataError

Metric = Literal["json", "labels", "exact"]
METRICS: tuple[str, ...] = ("auto", "json", "labels", "exact")
OTHER = "(other)"  # the confusion-matrix column of answers that are none of the labels
MAX_LABELS = 20  # more distinct answers than this is not a classification task
MAX_LABEL_CHARS = 40


# --- normalising ---------------------------------------------------------------------------------
def normalise(text: str) -> str:
    """Whitespace collapsed, letter case folded: what exact match compares."""
    return " ".join(str(text).split()).casefold()


def normalise_label(text: str) -> str:
    """A label as compared: normalised, without surrounding quotes or a final full stop."""
    return normalise(text).strip("\"'`").rstrip(".!").strip()


def exact_match(answers: Sequence[str], references: Sequence[str]) -> list[bool]:
    _check_lengths(answers, references)
    return [normalise(a) == normalise(r) for a, r in zip(answers, references, strict=True)]


# --- choosing the metric -----------------------------------------------------------------------
def choose_metric(references: Sequence[str]) -> Metric:
    """The metric the references call for: JSON objects, a few repeated labels, or free text."""
    if not references:
        raise ValueError("choose_metric needs at least one reference")
    if all(r.strip().startswith("{") and parse_json_object(r) is not None for r in references):
        return "json"
    labels = {normalise_label(r) for r in references}
    short = all(len(r.strip()) <= MAX_LABEL_CHARS and "\n" not in r.strip() for r in references)
    # Labels repeat: at most half as many distinct values as rows (a test set of 4 rows with 2
    # labels qualifies, 10 different one-word answers do not).
    if short and 2 <= len(labels) <= min(MAX_LABELS, len(references) / 2):
        return "labels"
    return "exact"


# --- labels ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelScore:
    """Classification scores; labels are the references' distinct values (normalised)."""

    labels: list[str]
    accuracy: float
    macro_f1: float  # the mean F1 over the reference labels, each label weighing the same
    precision: dict[str, float]
    recall: dict[str, float]
    f1: dict[str, float]
    confusion: list[list[int]]  # rows: reference label; columns: labels + OTHER (predicted)

    @property
    def columns(self) -> list[str]:
        return [*self.labels, OTHER]

    def lines(self) -> list[str]:
        out = [f"accuracy: {self.accuracy:.1%}", f"macro F1: {self.macro_f1:.3f}"]
        out += [
            f"  {label}: precision {self.precision[label]:.3f}, recall {self.recall[label]:.3f}, "
            f"F1 {self.f1[label]:.3f}"
            for label in self.labels
        ]
        return out


def score_labels(answers: Sequence[str], references: Sequence[str]) -> LabelScore:
    """Accuracy, per-class precision/recall/F1, macro F1 and the confusion matrix.

    An answer that is none of the labels counts in the OTHER column: wrong for its row and a
    prediction of no class (so it lowers recall, not any label's precision).
    """
    _check_lengths(answers, references)
    refs = [normalise_label(r) for r in references]
    labels = sorted(set(refs))
    preds = [p if p in labels else OTHER for p in (normalise_label(a) for a in answers)]
    columns = [*labels, OTHER]
    confusion = [[0] * len(columns) for _ in labels]
    for ref, pred in zip(refs, preds, strict=True):
        confusion[labels.index(ref)][columns.index(pred)] += 1
    precision, recall, f1 = {}, {}, {}
    for i, label in enumerate(labels):
        hits = confusion[i][i]
        predicted = sum(row[i] for row in confusion)
        actual = sum(confusion[i])
        precision[label] = hits / predicted if predicted else 0.0
        recall[label] = hits / actual
        both = precision[label] + recall[label]
        f1[label] = 2 * precision[label] * recall[label] / both if both else 0.0
    return LabelScore(
        labels=labels,
        accuracy=sum(p == r for p, r in zip(preds, refs, strict=True)) / len(refs),
        macro_f1=sum(f1.values()) / len(labels),
        precision=precision,
        recall=recall,
        f1=f1,
        confusion=confusion,
    )


# --- JSON objects, field by field --------------------------------------------------------------
def parse_json_object(text: str) -> dict[str, Any] | None:
    """The JSON object in an answer, or None when there is none.

    Lenient on the wrapping (a code fence or a sentence around the object is allowed, so a base
    model is not marked down for chattiness alone) but strict on the object itself.
    """
    text = text.strip()
    decoder = json.JSONDecoder()
    for start in [i for i, ch in enumerate(text) if ch == "{"]:
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _same(predicted: Any, expected: Any) -> bool:
    """Exact match up to surrounding spaces and letter case; 3 == "3" (a field, not a type test)."""
    if isinstance(predicted, (dict, list)) or predicted is None:
        return predicted == expected
    return str(predicted).strip().casefold() == str(expected).strip().casefold()


@dataclass(frozen=True)
class JsonScore:
    """Exact-field-match accuracy of predicted JSON objects against reference ones."""

    rows: int
    parse_errors: int  # answers with no JSON object at all (counted wrong on every field)
    field_accuracy: dict[str, float]  # per field of the reference schema
    record_accuracy: float  # every field right (extra keys allowed)
    mean_field_accuracy: float
    records_right: list[bool] = field(default_factory=list, repr=False)  # per row

    def lines(self) -> list[str]:
        return [
            f"whole-record accuracy: {self.record_accuracy:.1%}",
            f"mean field accuracy:   {self.mean_field_accuracy:.1%}",
            *(f"  {name}: {acc:.1%}" for name, acc in self.field_accuracy.items()),
            f"no JSON object: {self.parse_errors}/{self.rows}",
        ]


def _reference(number: int, text: str) -> dict[str, Any]:
    value = parse_json_object(text) if text.strip().startswith("{") else None
    if value is None:
        raise DataError(
            f"reference {number} is not a JSON object, so it cannot be scored field by field: "
            f"{text!r:.80}. The JSON metric needs answers that are JSON objects"
        )
    return value


def score_json(answers: Sequence[str], references: Sequence[str]) -> JsonScore:
    """Score answers against reference JSON strings, field by field and whole record."""
    if len(answers) != len(references) or not references:
        raise ValueError(f"need one answer per reference, got {len(answers)} answers for {len(references)}")
    refs = [_reference(i, r) for i, r in enumerate(references, start=1)]
    fields = list(dict.fromkeys(k for r in refs for k in r))
    right = dict.fromkeys(fields, 0)
    records, errors = [], 0
    for answer, ref in zip(answers, refs, strict=True):
        got = parse_json_object(answer)
        errors += got is None
        got = got or {}
        hits = [k for k in ref if k in got and _same(got[k], ref[k])]
        for k in hits:
            right[k] += 1
        records.append(len(hits) == len(ref))
    n = len(refs)
    per_field = {k: right[k] / n for k in fields}
    return JsonScore(
        rows=n,
        parse_errors=errors,
        field_accuracy=per_field,
        record_accuracy=sum(records) / n,
        mean_field_accuracy=sum(per_field.values()) / len(per_field),
        records_right=records,
    )


# --- one entry point ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Score:
    """Answers scored by one metric: a headline number, per-row correctness and the details."""

    metric: Metric
    rows: int
    headline_name: str  # "whole-record accuracy", "accuracy" or "exact match"
    headline: float
    exact_match: float
    correct: list[bool]  # per row, by the metric's own rule
    labels: LabelScore | None = None
    json: JsonScore | None = None

    def table(self) -> list[tuple[str, float | int]]:
        """(name, value) rows for a side-by-side table; shares are in [0, 1]."""
        rows: list[tuple[str, float | int]] = [(self.headline_name, self.headline)]
        if self.json is not None:
            rows += [(f"  field {k}", v) for k, v in self.json.field_accuracy.items()]
            rows.append(("answers with no JSON object", self.json.parse_errors))
        if self.labels is not None:
            rows.append(("macro F1", self.labels.macro_f1))
            for label in self.labels.labels:
                rows += [
                    (f"  {label} precision", self.labels.precision[label]),
                    (f"  {label} recall", self.labels.recall[label]),
                ]
        if self.metric != "exact":
            rows.append(("exact match", self.exact_match))
        return rows

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "metric": self.metric,
            "rows": self.rows,
            self.headline_name.replace(" ", "_").replace("-", "_"): self.headline,
            "exact_match": self.exact_match,
        }
        if self.labels is not None:
            lab = self.labels
            names = ("labels", "accuracy", "macro_f1", "precision", "recall", "f1")
            out["labels"] = {name: getattr(lab, name) for name in names}
            out["labels"]["confusion"] = {"rows": lab.labels, "columns": lab.columns, "counts": lab.confusion}
        if self.json is not None:
            names = ("record_accuracy", "mean_field_accuracy", "field_accuracy", "parse_errors")
            out["json"] = {name: getattr(self.json, name) for name in names}
        return out


def score(answers: Sequence[str], references: Sequence[str], metric: str = "auto") -> Score:
    """Score answers with the given metric ("auto" chooses it from the references)."""
    _check_lengths(answers, references)
    if metric not in METRICS:
        raise DataError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    chosen: Metric = choose_metric(references) if metric == "auto" else metric  # type: ignore[assignment]
    exact = exact_match(answers, references)
    em = sum(exact) / len(exact)
    if chosen == "json":
        j = score_json(answers, references)
        return Score("json", j.rows, "whole-record accuracy", j.record_accuracy, em, j.records_right, json=j)
    if chosen == "labels":
        lab = score_labels(answers, references)
        right = [normalise_label(a) == normalise_label(r) for a, r in zip(answers, references, strict=True)]
        return Score("labels", len(right), "accuracy", lab.accuracy, em, right, labels=lab)
    return Score("exact", len(exact), "exact match", em, em, exact)


def _check_lengths(answers: Sequence[str], references: Sequence[str]) -> None:
    if len(answers) != len(references) or not references:
        raise ValueError(f"need one answer per reference, got {len(answers)} answers for {len(references)}")
