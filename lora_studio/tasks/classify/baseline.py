"""A linear probe beside a trained classifier: what fine-tuning added over the frozen base.

    probe, trained = compare_with_probe(adapter_dir, "test.csv")   # two ClassScores on one file
    print("\n".join(probe_lines(probe, trained)))  # "a linear probe already gets 63.0%; LoRA adds ..."

The probe is fitted on the adapter's own training rows (its recipe's file, columns and validation
split, so none of its validation rows), reading bare texts through the frozen base: the cheapest
transfer there is, and the seed's "pretrained model as a fixed feature extractor". It is the
classify counterpart of `lora-studio fit`: if the probe is as good, the fine-tune bought nothing.
"""

from __future__ import annotations

from pathlib import Path

from ...config import Recipe
from ...errors import DataError
from .data import load_labeled, stratified_split
from .files import read_texts
from .lengths import recorded_max_length
from .model import require_classifier
from .probe import LinearProbe, train_probe
from .scores import ClassScores, score_predictions

AS_GOOD = 0.01  # within a point of the probe: the fine-tune bought nothing measurable


def fit_probe(adapter_dir: str | Path) -> LinearProbe:
    """The probe on a classification adapter's training rows, its penalty chosen on its validation rows."""
    meta = require_classifier(adapter_dir)
    recipe = Recipe.from_dict(meta["recipe"])
    columns = meta.get("classification") or {}
    if not Path(recipe.data.train_file).is_file():  # an adapter trained on another machine
        raise DataError(
            f"--baseline probe is fitted on the adapter's own training rows, {recipe.data.train_file}, "
            "which is not on this machine; put the file there, or score without --baseline"
        )
    max_length = recorded_max_length(meta)  # the texts are read as the classifier reads them
    rows = load_labeled(
        recipe.data.train_file,
        columns.get("text_column", "text"),
        columns.get("label_column", "label"),
        max_length,
    )
    train, val = stratified_split(rows, recipe.data.val_fraction, recipe.train.seed)
    return train_probe(recipe.model.base_model, train, val, max_length, recipe.model)


def probe_scores(probe: LinearProbe, path: str | Path, text_column: str, label_column: str) -> ClassScores:
    """The probe's scores on a labelled file."""
    _, texts, labels = read_texts(path, text_column, label_column, probe.max_length)
    if labels is None:
        raise DataError(f"{Path(path).name}: rows need a {label_column!r} field to be scored")
    unseen = sorted(set(labels) - set(probe.labels))
    if unseen:
        raise DataError(
            f"{Path(path).name}: the label(s) {', '.join(map(repr, unseen[:10]))} are not in the training rows"
        )
    ids = {label: i for i, label in enumerate(probe.labels)}
    predicted = probe.predict(texts)
    return score_predictions([ids[x] for x in labels], [ids[p] for p in predicted], probe.labels)


def probe_lines(probe: ClassScores, trained: ClassScores) -> list[str]:
    """The probe's score, the adapter's, and what fine-tuning added, in words."""
    gain = trained.accuracy - probe.accuracy
    verdict = (
        f"LoRA adds {gain * 100:+.1f} points"
        if gain > AS_GOOD
        else f"the probe is as good ({gain * 100:+.1f} points): the fine-tune bought nothing measurable here"
        if gain >= -AS_GOOD
        else f"the probe is better by {-gain * 100:.1f} points: train less, or use the probe's features"
    )
    return [
        f"linear probe (frozen base, no LoRA, fitted on the adapter's training rows): accuracy "
        f"{probe.accuracy:.1%}, macro F1 {probe.macro_f1:.3f}",
        f"this adapter: accuracy {trained.accuracy:.1%}, macro F1 {trained.macro_f1:.3f}",
        f"a linear probe already gets {probe.accuracy:.1%}; {verdict}",
    ]
