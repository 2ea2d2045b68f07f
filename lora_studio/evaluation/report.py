"""`lora-studio eval`: how much better is the adapter than its base, and what did it cost?

    report = run_eval(EvalOptions(adapter="smollm2-lora-cpu", data="test.jsonl"))
    print("\\n".join(report.table()))        # the terminal table
    report.out_dir                          # report.md, report.json, examples.jsonl, *.png

The same test prompts are answered greedily by the base (adapter off) and by the adapter, and
optionally by a from-scratch baseline (`baseline.py`); each side gets the generation score of
`metrics` and the teacher-forced answer loss. The report is written beside the adapter (a run
folder's `eval/`), all files at once: a crash leaves the previous report, never half of one.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapters import METADATA_FILE, load_adapted, read_metadata
from ..config import Baseline
from ..data import load_examples
from ..errors import DataError, ModelError
from ..files import move_into_place
from ..tasks.kinds import require_text
from .answers import Comparison, Side, answer_side, compare_with_base, split_prompt
from .overfit import warning_lines

if TYPE_CHECKING:
    from .forgetting import ForgettingReport

log = logging.getLogger(__name__)

BASELINES = typing.get_args(Baseline)
# What each check can and cannot tell: printed under every report.
CAVEATS = [
    "Generation scores are greedy answers to the test prompts: they show what the model writes, but a "
    "test set that resembles the training data measures memory as much as skill.",
    "Answer-token loss is teacher-forced: it shows how likely the model finds the reference answer, not "
    "whether it would write it (a low loss with a low score usually means a format problem).",
    "Exact match and labels ignore case and spacing only; a correct answer worded differently counts as wrong.",
]


@dataclass(frozen=True)
class EvalOptions:
    adapter: str  # an adapter folder, or a run folder holding adapter/
    data: str  # the test file (any chat-like format the data module reads)
    with_base: bool = True
    limit: int | None = None  # the first N test rows only
    metric: str = "auto"
    baseline: str | None = None  # "scratch": also train and score a randomly initialised base
    forgetting: bool = False  # also score general ability on the shipped probe set
    checkpoints: bool = False  # ...for each saved checkpoint too
    out_dir: str | None = None  # default: beside the adapter
    batch_size: int = 16
    max_new_tokens: int | None = None  # default: the longest reference plus 16 tokens


@dataclass
class EvalReport:
    adapter_dir: Path
    run_dir: Path | None
    data: str
    comparison: Comparison
    out_dir: Path
    warnings: list[str] = field(default_factory=list)  # the run's alarms (overfitting, ...)
    forgetting: ForgettingReport | None = None  # when asked for
    files: dict[str, str] = field(default_factory=dict)  # what was written, by kind

    @property
    def sides(self) -> dict[str, Side]:
        return self.comparison.sides

    def gain(self, over: str = "base") -> float | None:
        """The adapter's headline score minus the base's (or the scratch baseline's); None without it."""
        s = self.sides
        return s["adapter"].score.headline - s[over].score.headline if over in s else None

    def table(self) -> list[str]:
        """The side-by-side table the terminal shows."""
        names = list(self.sides)
        first = next(iter(self.sides.values()))
        rows = table_rows(self.sides)
        width = max(32, *(len(label) + 2 for label, _ in rows))
        out = [
            f"Test set: {first.score.rows} rows of {Path(self.data).name}; metric: {self.comparison.metric} "
            f"({first.score.headline_name})",
            f"{'':{width}}" + "".join(f"{n:>12}" for n in names),
        ]
        out += [f"{label:{width}}" + "".join(f"{c:>12}" for c in cells) for label, cells in rows]
        if self.gain() is not None:
            out.append(f"adapter gain over base: {self.gain():+.1%} {first.score.headline_name}")
        if self.gain("scratch") is not None:
            out.append(
                f"what the pretrained weights brought (adapter vs scratch): {self.gain('scratch'):+.1%} "
                f"{first.score.headline_name}"
            )
        if self.forgetting is not None:
            out += ["", *self.forgetting.table(), self.trade_off()]
        out += [f"warning: {w}" for w in self.warnings]
        return out

    def trade_off(self) -> str:
        """Task gain against general regression, in one line (needs the forgetting check)."""
        f = self.forgetting
        adapter = next(r for r in f.rows if r.name == "adapter")
        headline = self.sides["adapter"].score.headline_name
        task = f"{self.gain():+.1%} {headline}" if self.gain() is not None else "no base scored"
        return f"trade-off, adapter vs base: task {task}; general {f.change(adapter)}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": str(self.adapter_dir),
            "run": self.run_dir and str(self.run_dir),
            "data": self.data,
            "rows": next(iter(self.sides.values())).score.rows,
            "metric": self.comparison.metric,
            "sides": {
                name: {
                    "score": s.score.to_dict(),
                    "answer_loss": s.fit.loss,
                    "perplexity": s.fit.perplexity,
                    "answer_tokens": s.fit.tokens,
                    "seconds": s.seconds,
                }
                for name, s in self.sides.items()
            },
            "gain": self.gain(),
            "gain_over_scratch": self.gain("scratch"),
            "warnings": self.warnings,
            "forgetting": self.forgetting.to_dict() if self.forgetting is not None else None,
            "files": self.files,
        }

    def markdown(self) -> str:
        lines = [
            f"# Evaluation of `{self.adapter_dir}`",
            "",
            f"Test data: `{self.data}`",
            "",
            "| | " + " | ".join(self.sides) + " |",
            "|---|" + "---:|" * len(self.sides),
        ]
        lines += [
            f"| {label.strip()} | " + " | ".join(cells) + " |" for label, cells in table_rows(self.sides)
        ]
        if self.gain() is not None:
            lines += ["", f"Adapter gain over base: **{self.gain():+.1%}**."]
        if self.gain("scratch") is not None:
            lines += [
                "",
                f"What the pretrained weights brought (adapter vs scratch): **{self.gain('scratch'):+.1%}**.",
            ]
        if self.warnings:
            lines += ["", "## Warnings from training", "", *(f"- {w}" for w in self.warnings)]
        if self.forgetting is not None:
            lines += [
                "",
                "## General ability (forgetting)",
                "",
                *self.forgetting.markdown(),
                "",
                self.trade_off(),
            ]
        for kind, title in (("loss_curves", "Loss curves"), ("confusion", "Confusion matrices")):
            if kind in self.files:
                lines += ["", f"## {title}", "", f"![{title}]({Path(self.files[kind]).name})"]
        lines += ["", "## What these numbers can and cannot tell", "", *(f"- {c}" for c in CAVEATS)]
        lines += ["", f"Per-example answers: `{Path(self.files.get('examples', 'examples.jsonl')).name}`."]
        return "\n".join(lines) + "\n"


def table_rows(sides: dict[str, Side]) -> list[tuple[str, list[str]]]:
    """(label, one formatted cell per side) for the table."""
    score_rows = [dict(s.score.table()) for s in sides.values()]
    labels = list(dict.fromkeys(label for rows in score_rows for label in rows))
    out = [(label, [_share_or_count(rows.get(label)) for rows in score_rows]) for label in labels]
    fits = [s.fit for s in sides.values()]
    out += [
        ("answer-token loss", [f"{f.loss:.3f}" for f in fits]),
        (
            "answer perplexity",
            [f"{f.perplexity:.4g}" if math.isfinite(f.perplexity) else "inf" for f in fits],
        ),
        ("seconds to answer and score", [f"{s.seconds:.0f}" for s in sides.values()]),
    ]
    return out


def _share_or_count(value: float | int | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1%}" if isinstance(value, float) else str(value)


# --- running it ----------------------------------------------------------------------------------
def resolve_adapter(path: str | Path) -> tuple[Path, Path | None]:
    """(adapter folder, its run folder or None) from an adapter folder or a run folder."""
    p = Path(path).expanduser().resolve()
    if (p / "adapter" / METADATA_FILE).is_file():
        return p / "adapter", p
    if (p / METADATA_FILE).is_file():
        run = p.parent if (p.parent / "status.json").is_file() else None
        return p, run
    raise ModelError(
        f"{path} is neither an adapter folder (with {METADATA_FILE}) nor a run folder with a finished "
        "adapter/ inside; give the folder `lora-studio train` printed"
    )


def default_out_dir(adapter_dir: Path, run_dir: Path | None) -> Path:
    return run_dir / "eval" if run_dir else adapter_dir.parent / f"{adapter_dir.name}-eval"


def load_test_examples(path: str, limit: int | None, max_length: int | None = None) -> list:
    _, examples = load_examples(path, max_length=max_length)
    if limit is not None:
        if limit <= 0:
            raise DataError(f"--limit must be a positive number of rows, got {limit}")
        examples = examples[:limit]
    for e in examples:
        split_prompt(e)  # a plain-text row fails here, naming its line
    return examples


def run_eval(opts: EvalOptions) -> EvalReport:
    """Score the adapter (and its base, and any baseline) on the test file and write the report."""
    if opts.baseline is not None and opts.baseline not in BASELINES:
        raise DataError(f"unknown baseline {opts.baseline!r}; expected one of {', '.join(BASELINES)}")
    adapter_dir, run_dir = resolve_adapter(opts.adapter)
    out_dir = Path(opts.out_dir).resolve() if opts.out_dir else default_out_dir(adapter_dir, run_dir)
    meta = read_metadata(adapter_dir)
    require_text(meta, adapter_dir)  # a classifier (its max_length may be 'auto') is refused first
    max_length = int(((meta.get("recipe") or {}).get("data") or {}).get("max_length", 512))
    examples = load_test_examples(opts.data, opts.limit, max_length)
    adapted = load_adapted(adapter_dir)
    model, tokenizer = adapted.model, adapted.tokenizer
    settings = {
        "max_new_tokens": opts.max_new_tokens,
        "batch_size": opts.batch_size,
        "max_length": max_length,
    }
    comparison = compare_with_base(
        model, tokenizer, examples, opts.metric, with_base=opts.with_base, **settings
    )
    forgetting = None
    if opts.forgetting:
        from .forgetting import forgetting_report

        forgetting = forgetting_report(model, tokenizer, adapter_dir, run_dir, opts.checkpoints)
    del model, adapted
    if opts.baseline == "scratch":
        from .baseline import train_scratch

        scratch_dir = train_scratch(adapter_dir, out_dir.with_name(f"{out_dir.name}-scratch"))
        scratch = load_adapted(scratch_dir)
        comparison.sides["scratch"] = answer_side(
            "scratch", scratch.model, scratch.tokenizer, examples, comparison.metric, **settings
        )
    report = EvalReport(
        adapter_dir, run_dir, str(opts.data), comparison, out_dir,
        warnings=warning_lines(run_dir) if run_dir else [], forgetting=forgetting,
    )  # fmt: skip
    write_report(report, examples)
    return report


# --- writing it ----------------------------------------------------------------------------------
def write_report(report: EvalReport, examples: list) -> None:
    """Write every file into a temporary folder, then move it over the old report in one step."""
    from .plots import plot_confusion, plot_loss_curves, read_metrics

    out = report.out_dir
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        files = {"examples": "examples.jsonl", "report_json": "report.json", "report_md": "report.md"}
        _write_examples(tmp / files["examples"], report, examples)
        metrics = report.run_dir / "metrics.jsonl" if report.run_dir else None
        if metrics and metrics.is_file():
            marks = {f"overfitting from step {a}": a for a in _alarm_steps(report.run_dir)}
            if plot_loss_curves(read_metrics(metrics), tmp / "loss_curves.png", marks):
                files["loss_curves"] = "loss_curves.png"
        if report.forgetting is not None:
            files["forgetting"] = "forgetting.jsonl"
            _write_probe_answers(tmp / files["forgetting"], report.forgetting)
        labels = {n: s.score.labels for n, s in report.sides.items() if s.score.labels is not None}
        if labels:
            plot_confusion(labels, tmp / "confusion.png")
            files["confusion"] = "confusion.png"
        report.files = {kind: str(out / name) for kind, name in files.items()}
        (tmp / files["report_json"]).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        (tmp / files["report_md"]).write_text(report.markdown())
        tmp.chmod(0o755)
        move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("eval report written to %s", out / "report.md")


def _write_examples(path: Path, report: EvalReport, examples: list) -> None:
    c = report.comparison
    with open(path, "w") as f:
        for i, (example, prompt, reference) in enumerate(zip(examples, c.prompts, c.references, strict=True)):
            row: dict[str, Any] = {"row": example.where, "prompt": prompt, "reference": reference}
            for name, side in c.sides.items():
                row[name] = side.answers[i]
                row[f"{name}_correct"] = side.score.correct[i]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_probe_answers(path: Path, forgetting: ForgettingReport) -> None:
    """Each probe question with every model's answer and whether it counted as right."""
    from .forgetting import load_probes, probe_correct

    with open(path, "w") as f:
        for i, probe in enumerate(load_probes()):
            row: dict[str, Any] = {
                "category": probe.category,
                "question": probe.question,
                "accepted": probe.answers,
            }
            for ability in forgetting.rows:
                row[ability.name] = ability.answers[i]
                row[f"{ability.name}_correct"] = probe_correct(ability.answers[i], probe)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _alarm_steps(run_dir: Path) -> list[int]:
    from .overfit import run_warnings

    return [w["started_step"] for w in run_warnings(run_dir) if w.get("kind") == "overfitting"]
