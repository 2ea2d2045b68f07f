"""`lora-studio classify`: label texts with a classification adapter (task: classify)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..files import atomic_write_text
from . import add_precision_flag, add_threads_flag
from .options import command
from .runs import adapter_arg

if TYPE_CHECKING:
    from ..tasks.classify.model import Classifier
    from ..tasks.classify.scores import ClassScores


def register(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "classify", run_classify)
    p.add_argument("adapter", type=adapter_arg, help="a classification adapter folder, or a run name or id")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify")
    p.add_argument("--file", help="a data file to classify row by row")
    p.add_argument("--out", help="where to write the file's predictions (.csv or .jsonl)")
    p.add_argument("--text-column", help="the file's text field (default: the one the adapter trained on)")
    p.add_argument("--label-column", help="the file's label field, for scoring (default: as trained)")
    p.add_argument("--scores-dir", help="write scores.json and confusion.png here (needs labels)")
    p.add_argument("--batch-size", type=int, default=16, help="texts per forward pass (default 16)")
    p.add_argument(
        "--baseline",
        choices=["probe"],
        default=None,
        help="with a labelled --file: also fit a linear probe on the frozen base (the adapter's training "
        "rows, no LoRA) and score it on the file: what fine-tuning added",
    )
    add_precision_flag(p)
    add_threads_flag(p, "classifying")


def run_classify(args: argparse.Namespace) -> int:
    """Label texts with a classification adapter: the label and every label's probability.

    Classify the given texts, or a whole --file (CSV, JSONL, JSON, Parquet) in batches into --out
    (.csv or .jsonl). When the file has a label column, accuracy, macro F1 and per-class scores are
    printed (and written with a confusion matrix to --scores-dir)."""
    from ..tasks.classify.model import Classifier, require_classifier

    if bool(args.texts) == bool(args.file):
        raise ConfigError(
            'give texts to classify, or --file IN --out OUT (not both), e.g. lora-studio classify ADAPTER "text"'
        )
    if args.baseline and not args.file:
        raise ConfigError("--baseline probe goes with a labelled --file to score on")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: expected a positive number, got {args.batch_size}")
    columns = require_classifier(args.adapter).get("classification") or {}
    classifier = Classifier.from_adapter(args.adapter, precision=args.precision)
    if args.texts:
        for text, prediction in zip(args.texts, classifier.predict(args.texts, args.batch_size), strict=True):
            print(f"{prediction.label}\t{prediction.confidence:.3f}\t{text}")
            for label, p in sorted(prediction.probabilities.items(), key=lambda kv: -kv[1]):
                print(f"  {label:<24} {p:6.3f}  {'█' * round(p * 30)}")
        return 0
    return _classify_file(args, classifier, columns)


def _classify_file(args: argparse.Namespace, classifier: Classifier, columns: dict) -> int:
    from ..tasks.classify.files import classify_file
    from ..tasks.classify.scores import write_scores

    if not args.out and not args.scores_dir:
        raise ConfigError("--file needs --out (predictions) or --scores-dir (scores of a labelled file)")
    result = classify_file(
        classifier,
        args.file,
        args.out,
        text_column=args.text_column or columns.get("text_column", "text"),
        label_column=args.label_column or columns.get("label_column", "label"),
        batch_size=args.batch_size,
        progress=True,
    )
    if result.out:
        print(f"{result.rows} rows classified: {result.out}")
    if result.scores is not None:
        print("\n".join(result.scores.lines()))
        if args.scores_dir:
            paths = write_scores(
                result.scores, args.scores_dir, f"{Path(args.file).name}: {result.scores.rows} rows"
            )
            print("scores: " + ", ".join(str(p) for p in paths))
    elif args.scores_dir:
        raise ConfigError(f"--scores-dir: {args.file} has no label column to score against")
    if args.baseline:
        _probe_baseline(args, result.scores, columns)
    return 0


def _probe_baseline(args: argparse.Namespace, trained: ClassScores | None, columns: dict) -> None:
    from ..tasks.classify.baseline import fit_probe, probe_lines, probe_scores

    if trained is None:
        raise ConfigError(f"--baseline probe: {args.file} has no label column to score against")
    probe = probe_scores(
        fit_probe(args.adapter),
        args.file,
        args.text_column or columns.get("text_column", "text"),
        args.label_column or columns.get("label_column", "label"),
    )
    print("\n".join(probe_lines(probe, trained)))
    if args.scores_dir:
        path = Path(args.scores_dir) / "probe_scores.json"
        atomic_write_text(path, json.dumps(probe.to_dict(), indent=2))
        print(f"probe scores: {path}")
