"""Classification scores: accuracy, macro F1, per-class precision and recall, the confusion matrix.

    scores = score_predictions(true_ids, predicted_ids, labels)   # -> ClassScores
    scores.accuracy, scores.macro_f1, scores.per_class()
    write_scores(scores, "RUN_DIR/eval")     # scores.json (with the confusion matrix) and confusion.png

Macro F1 averages the per-class F1 over the classes that occur in the true or the predicted labels
(scikit-learn's default), so a class absent from a small validation set does not count as a zero.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...files import atomic_write_text

SCORES_FILE = "scores.json"
CONFUSION_PNG = "confusion.png"


@dataclass(frozen=True)
class ClassScores:
    labels: tuple[str, ...]
    confusion: tuple[tuple[int, ...], ...]  # confusion[true][predicted] = rows

    @property
    def rows(self) -> int:
        return sum(map(sum, self.confusion))

    @property
    def accuracy(self) -> float:
        right = sum(self.confusion[i][i] for i in range(len(self.labels)))
        return right / self.rows if self.rows else 0.0

    def per_class(self) -> list[dict[str, Any]]:
        """One row per label: precision, recall, F1 and support (true rows of that label)."""
        out = []
        for i, label in enumerate(self.labels):
            hits = self.confusion[i][i]
            support = sum(self.confusion[i])
            predicted = sum(row[i] for row in self.confusion)
            precision = hits / predicted if predicted else 0.0
            recall = hits / support if support else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            out.append(
                {
                    "label": label,
                    "precision": precision,
                    "recall": recall,
                    "f1": f1,
                    "support": support,
                    "predicted": predicted,
                }
            )
        return out

    @property
    def macro_f1(self) -> float:
        present = [c["f1"] for c in self.per_class() if c["support"] or c["predicted"]]
        return sum(present) / len(present) if present else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "per_class": self.per_class(),
            "labels": list(self.labels),
            "confusion_matrix": [list(row) for row in self.confusion],
            "confusion_axes": "rows: true label, columns: predicted label, in the order of `labels`",
        }

    def lines(self, max_classes: int = 30) -> list[str]:
        out = [f"accuracy {self.accuracy:.1%}, macro F1 {self.macro_f1:.3f} over {self.rows} rows"]
        width = max(5, *(len(label) for label in self.labels[:max_classes]))
        out.append(f"  {'label':<{width}}  precision  recall  support")
        for c in self.per_class()[:max_classes]:
            out.append(
                f"  {c['label']:<{width}}  {c['precision']:9.1%}  {c['recall']:6.1%}  {c['support']:7d}"
            )
        if len(self.labels) > max_classes:
            out.append(f"  ... {len(self.labels) - max_classes} more classes in {SCORES_FILE}")
        return out


def score_predictions(
    true_ids: Sequence[int], predicted_ids: Sequence[int], labels: Sequence[str]
) -> ClassScores:
    if len(true_ids) != len(predicted_ids):
        raise ValueError(f"{len(true_ids)} true labels but {len(predicted_ids)} predictions")
    matrix = [[0] * len(labels) for _ in labels]
    for t, p in zip(true_ids, predicted_ids, strict=True):
        matrix[int(t)][int(p)] += 1
    return ClassScores(tuple(labels), tuple(tuple(row) for row in matrix))


def write_scores(scores: ClassScores, folder: str | Path, title: str = "") -> list[Path]:
    """scores.json and confusion.png in `folder`; returns both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / SCORES_FILE, json.dumps(scores.to_dict(), indent=2))
    png = folder / CONFUSION_PNG
    tmp = folder / f".{CONFUSION_PNG}.tmp.png"
    confusion_figure(scores, title).savefig(tmp, dpi=100)
    tmp.replace(png)
    return [folder / SCORES_FILE, png]


def confusion_figure(scores: ClassScores, title: str = "") -> Any:
    """The confusion matrix as a matplotlib Figure (no pyplot: no global state, no display needed)."""
    from matplotlib.figure import Figure

    n = len(scores.labels)
    side = min(4 + 0.35 * n, 24)
    figure = Figure(figsize=(side + 1.5, side))
    ax = figure.add_subplot()
    image = ax.imshow(scores.confusion, cmap="Blues")
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ticks = list(range(n))
    font = 9 if n <= 20 else 6
    ax.set_xticks(ticks, scores.labels, rotation=90 if n > 6 else 0, fontsize=font)
    ax.set_yticks(ticks, scores.labels, fontsize=font)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(title or f"accuracy {scores.accuracy:.1%}, macro F1 {scores.macro_f1:.3f}")
    if n <= 20:  # counts in the cells stay readable up to ~20 classes
        top = max(max(row) for row in scores.confusion) or 1
        for i, row in enumerate(scores.confusion):
            for j, count in enumerate(row):
                color = "white" if count > top / 2 else "black"
                ax.text(j, i, str(count), ha="center", va="center", color=color, fontsize=font)
    figure.tight_layout()
    return figure
