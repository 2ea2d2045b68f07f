"""`lora-studio eval` and `lora-studio fit`: did the fine-tune work, and does a base fit the data?

lora-studio eval smollm2-lora-cpu --data examples/json_extraction/test.jsonl
lora-studio eval ADAPTER --data TEST --limit 20 --metric labels --baseline scratch --forgetting
lora-studio eval CLASSIFIER --data TEST --baseline probe     # task: classify: accuracy, macro F1, a probe
lora-studio fit examples/json_extraction/train.jsonl --models smollm2-135m-instruct,./my-model
"""

from __future__ import annotations

import argparse
import json
import typing
from pathlib import Path

from ..adapters import read_metadata
from ..config import Baseline
from ..errors import ConfigError
from ..evaluation.scoring import METRICS
from ..tasks.kinds import generates_text
from . import add_threads_flag
from .options import command
from .runs import adapter_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "eval", run_eval_command)
    p.add_argument(
        "adapter",
        type=adapter_arg,
        help="an adapter folder, a run folder with adapter/ inside, or a run name or id",
    )
    p.add_argument("--data", required=True, help="the test file: rows never used in training")
    p.add_argument(
        "--base",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also score the base with the adapter off (default: yes; --no-base halves the time)",
    )
    p.add_argument("--limit", type=int, default=None, metavar="N", help="score only the first N rows")
    p.add_argument(
        "--metric",
        choices=METRICS,
        default="auto",
        help="how answers are scored (default: from the references)",
    )
    p.add_argument(
        "--baseline",
        choices=[*typing.get_args(Baseline), "probe"],
        default=None,
        help="scratch: also train the same recipe on a randomly initialised base and score it (what the "
        "pretrained weights brought; one more training run). probe, for a classifier: also fit a linear "
        "probe on the frozen base (what LoRA added)",
    )
    p.add_argument(
        "--forgetting", action="store_true", help="also score general ability on the built-in probe set"
    )
    p.add_argument(
        "--checkpoints", action="store_true", help="with --forgetting: score each saved checkpoint too"
    )
    p.add_argument("--out", default=None, help="the report folder (default: <run>/eval)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts answered at once (default 16)")
    p.add_argument(
        "--max-new-tokens", type=int, default=None, help="answer length limit (default: from the references)"
    )
    p.add_argument("--json", action="store_true", help="print report.json instead of the table")
    add_threads_flag(p, "the evaluation")

    p = command(sub, "fit", run_fit_command)
    p.add_argument("file", help="a data file (.jsonl, .json, .csv, .parquet or a datasets folder)")
    p.add_argument(
        "--models",
        default=None,
        help="comma-separated base models to compare (built-in, cached, local folders, hub ids); "
        "default: the built-in model",
    )
    p.add_argument("--format", default="auto", help="the row format, if not detected (default: auto)")
    p.add_argument("--sample", type=int, default=32, help="rows in the seeded sample (default 32)")
    p.add_argument("--max-length", type=int, default=512, help="token limit per example (default 512)")
    p.add_argument("--json", action="store_true", help="print the reports as JSON")


def run_eval_command(args: argparse.Namespace) -> int:
    """Score an adapter against its base on a test file and write a report beside it.

    Answer a test file's prompts with the base and the adapter, score both, and write
    eval/report.md, report.json, examples.jsonl and plots beside the adapter."""
    from ..evaluation.report import EvalOptions, resolve_adapter, run_eval

    adapter_dir, run_dir = resolve_adapter(args.adapter)
    if not generates_text(read_metadata(adapter_dir)):
        return _eval_classifier(args, adapter_dir, run_dir)
    if args.baseline == "probe":
        raise ConfigError(
            "--baseline probe is for classifiers (task: classify); for chat, --baseline scratch"
        )
    if args.checkpoints and not args.forgetting:
        args.forgetting = True  # checkpoints are scored for forgetting: asking for them asks for it
    report = run_eval(
        EvalOptions(
            adapter=args.adapter,
            data=args.data,
            with_base=args.base,
            limit=args.limit,
            metric=args.metric,
            baseline=args.baseline,
            forgetting=args.forgetting,
            checkpoints=args.checkpoints,
            out_dir=args.out,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
        )
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    print("\n".join(report.table()))
    print(f"report: {report.out_dir / 'report.md'}")
    return 0


def _eval_classifier(args: argparse.Namespace, adapter_dir: Path, run_dir: Path | None) -> int:
    """A classifier is scored as `classify --file` scores it: accuracy, macro F1, per-class scores and
    the confusion matrix in --out (default: <run>/eval/test), and the probe with --baseline probe."""
    from .classify import run_classify

    unsupported = {"--baseline scratch": args.baseline == "scratch", "--forgetting": args.forgetting}
    unsupported.update({"--limit": args.limit is not None, "--no-base": not args.base})
    if any(unsupported.values()):
        names = ", ".join(k for k, v in unsupported.items() if v)
        raise ConfigError(
            f"{names}: not for a classifier (task: classify); it takes --data, --out, --baseline probe"
        )
    out = args.out or (
        run_dir / "eval" / "test" if run_dir else adapter_dir.parent / f"{adapter_dir.name}-eval"
    )
    return run_classify(
        argparse.Namespace(
            adapter=str(adapter_dir),
            texts=[],
            file=args.data,
            out=None,
            scores_dir=str(out),
            text_column=None,
            label_column=None,
            batch_size=args.batch_size,
            baseline=args.baseline,
            precision="auto",
        )
    )


def run_fit_command(args: argparse.Namespace) -> int:
    """Check how well base models fit a data file before training (zero-shot score and answer loss).

    Answer a seeded sample of the data zero-shot and measure the answer loss, for one or several
    base models; give a verdict (format, task or language mismatch) and rank them."""
    from ..config import DEFAULT_BASE_MODEL
    from ..evaluation.fit import fit_models, ranking_lines

    names = [n.strip() for n in (args.models or DEFAULT_BASE_MODEL).split(",") if n.strip()]
    reports, failed = fit_models(names, args.file, args.format, args.sample, args.max_length)
    if args.json:
        print(json.dumps({"reports": [r.to_dict() for r in reports], "failed": failed}, indent=2))
        return 0
    for r in reports:
        print("\n".join(r.lines()) + "\n")
    if len(names) > 1:
        print("\n".join(ranking_lines(reports, failed)))
    return 0 if reports else 2
