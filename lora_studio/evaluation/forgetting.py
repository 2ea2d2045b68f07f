"""The forgetting check: what did the fine-tune cost the base in general ability?

    report = forgetting_report(peft_model, tokenizer, adapter_dir, run_dir, checkpoints=True)
    print("\\n".join(report.table()))

Two measurements on the probe set shipped in `probes/` (see its README):
  - probe accuracy: 78 short questions with checkable answers (arithmetic, capitals, units,
    common sense, simple instructions), answered greedily;
  - general-text perplexity: the loss on 225 plain English sentences, teacher-forced.
Each is taken for the base (adapter off), the adapter and, on request, every saved checkpoint,
so the report can set the task gain against the general regression. `select_best: balanced`
uses the same general text during training (`balanced_callback`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from ..data import Example
from .answers import base_fit, generate_answers
from .scoring import normalise

log = logging.getLogger(__name__)

PROBE_DIR = Path(__file__).resolve().parents[1] / "probes"
TRAINING_SENTENCES = 64  # general sentences scored at each validation with select_best: balanced


@dataclass(frozen=True)
class Probe:
    category: str
    question: str
    answers: tuple[str, ...]  # any one of them, as a whole word or phrase, ignoring case
    reject: tuple[str, ...] = ()  # an answer naming one of these is wrong (choice questions)


@cache
def load_probes() -> tuple[Probe, ...]:
    lines = (PROBE_DIR / "general_qa.jsonl").read_text(encoding="utf-8").splitlines()
    return tuple(
        Probe(r["category"], r["question"], tuple(r["answers"]), tuple(r.get("reject", ())))
        for r in map(json.loads, lines)
    )


@cache
def load_general_text() -> tuple[str, ...]:
    lines = (PROBE_DIR / "general_text.txt").read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip())


def probe_correct(answer: str, probe: Probe) -> bool:
    """An accepted answer appears as a whole word in the answer, and no rejected option does."""
    text = normalise(answer)

    def says(word: str) -> bool:
        return re.search(rf"(?<!\w){re.escape(normalise(word))}(?!\w)", text) is not None

    return any(says(a) for a in probe.answers) and not any(says(r) for r in probe.reject)


# --- measuring one model -------------------------------------------------------------------------
@dataclass(frozen=True)
class Ability:
    """General ability of one model: probe accuracy (overall and per category) and text loss."""

    name: str  # "base", "adapter" or a checkpoint folder name
    probe_accuracy: float
    by_category: dict[str, float]
    text_loss: float
    text_perplexity: float
    step: int | None = None  # a checkpoint's training step
    val_loss: float | None = None  # its validation loss, from metrics.jsonl
    answers: list[str] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "step": self.step,
            "val_loss": self.val_loss,
            "probe_accuracy": self.probe_accuracy,
            "by_category": self.by_category,
            "text_loss": self.text_loss,
            "text_perplexity": self.text_perplexity,
        }


def text_examples(count: int | None = None) -> list[Example]:
    sentences = load_general_text()[:count]
    return [Example(f"general_text.txt, line {i}", text=s) for i, s in enumerate(sentences, start=1)]


def general_ability(model: Any, tokenizer: Any, name: str, batch_size: int = 16) -> Ability:
    """Answer the probe questions and score the general text with `model` as it is now."""
    probes = load_probes()
    log.info("general ability of the %s model: %d probe questions", name, len(probes))
    answers = generate_answers(
        model, tokenizer, [[{"role": "user", "content": p.question}] for p in probes], 24, batch_size
    )
    right = [probe_correct(a, p) for a, p in zip(answers, probes, strict=True)]
    categories = list(dict.fromkeys(p.category for p in probes))
    by_category = {
        c: sum(r for r, p in zip(right, probes, strict=True) if p.category == c)
        / sum(p.category == c for p in probes)
        for c in categories
    }
    fit = base_fit(model, tokenizer, text_examples(), sample=len(load_general_text()), max_length=128)
    return Ability(name, sum(right) / len(right), by_category, fit.loss, fit.perplexity, answers=answers)


# --- the report ----------------------------------------------------------------------------------
@dataclass
class ForgettingReport:
    rows: list[Ability]  # the base first

    @property
    def base(self) -> Ability:
        return self.rows[0]

    def regression(self, row: Ability) -> tuple[float, float]:
        """(probe accuracy lost, general-text loss gained) against the base; positive is worse."""
        return self.base.probe_accuracy - row.probe_accuracy, row.text_loss - self.base.text_loss

    def change(self, row: Ability) -> str:
        """The regression of a row against the base, in words ("" for the base)."""
        if row is self.base:
            return ""
        lost, gained = self.regression(row)
        return f"{0.0 - lost:+.1%} probes right, {gained:+.3f} general-text loss"

    def cells(self, row: Ability) -> list[str]:
        """model, probes right, text loss, perplexity, val loss, regression."""
        val = f"{row.val_loss:.4f}" if row.val_loss is not None else ""
        return [
            row.name,
            f"{row.probe_accuracy:.1%}",
            f"{row.text_loss:.3f}",
            f"{row.text_perplexity:.4g}",
            val,
            self.change(row),
        ]

    def table(self) -> list[str]:
        widths = (24, 13, 11, 12, 10)
        head = ["", "probes right", "text loss", "perplexity", "val loss", "  regression"]
        lines = [
            f"General ability (forgetting): {len(load_probes())} probe questions, "
            f"{len(load_general_text())} sentences of general text"
        ]
        for cells in [head, *(self.cells(r) for r in self.rows)]:
            lines.append(
                f"{cells[0]:{widths[0]}}"
                + "".join(f"{c:>{w}}" for c, w in zip(cells[1:5], widths[1:], strict=True))
                + f"  {cells[5].strip()}"
            )
        return lines

    def markdown(self) -> list[str]:
        lines = [
            "| model | probes right | text loss | perplexity | val loss | regression |",
            "|---|" + "---:|" * 4 + "---|",
        ]
        lines += ["| " + " | ".join(self.cells(r)) + " |" for r in self.rows]
        categories = " · ".join(
            f"{c} {self.base.by_category[c]:.0%} → {self.rows[1].by_category[c]:.0%}"
            for c in self.base.by_category
        )
        return [*lines, "", f"Probe accuracy by category, base → adapter: {categories}."]

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": [r.to_dict() for r in self.rows],
            "regression": {
                r.name: dict(
                    zip(("probe_accuracy_lost", "text_loss_gained"), self.regression(r), strict=True)
                )
                for r in self.rows[1:]
            },
        }


def forgetting_report(
    model: Any, tokenizer: Any, adapter_dir: Path, run_dir: Path | None, checkpoints: bool = False
) -> ForgettingReport:
    """General ability of the base (adapter off), the adapter and, on request, each checkpoint."""
    with model.disable_adapter():
        rows = [general_ability(model, tokenizer, "base")]
    rows.append(general_ability(model, tokenizer, "adapter"))
    if checkpoints:
        rows += [checkpoint_ability(model, tokenizer, c, run_dir) for c in saved_checkpoints(run_dir)]
    return ForgettingReport(rows)


def saved_checkpoints(run_dir: Path | None) -> list[Path]:
    folder = run_dir / "checkpoints" if run_dir else None
    if folder is None or not folder.is_dir():
        return []
    found = [p for p in folder.glob("checkpoint-*") if (p / "adapter_config.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[-1]))


def checkpoint_ability(model: Any, tokenizer: Any, checkpoint: Path, run_dir: Path | None) -> Ability:
    """Load a checkpoint's adapter next to the final one, measure it, and unload it."""
    name = checkpoint.name
    model.load_adapter(str(checkpoint), adapter_name=name)
    model.set_adapter(name)
    try:
        ability = general_ability(model, tokenizer, name)
    finally:
        model.set_adapter("default")
        model.delete_adapter(name)
    step = int(name.rsplit("-", 1)[-1])
    return dataclasses.replace(ability, step=step, val_loss=_val_loss_at(run_dir, step))


def _val_loss_at(run_dir: Path | None, step: int) -> float | None:
    path = run_dir / "metrics.jsonl" if run_dir else None
    if path is None or not path.is_file():
        return None
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("step") == step and isinstance(row.get("val_loss"), (int, float)):
            return row["val_loss"]
    return None


# --- select_best: balanced -----------------------------------------------------------------------
def balanced_callback(tokenizer: Any, max_length: int) -> Any:
    """A TrainerCallback that adds `eval_general_loss` and `eval_balanced` to every validation.

    general_loss is the loss on TRAINING_SENTENCES of general text; balanced is the validation
    loss plus how much general_loss rose above the base's (never below zero): the checkpoint with
    the lowest sum learned the task at the smallest cost. It must run before the metrics log,
    so the row it writes has both values.
    """
    from transformers import TrainerCallback

    sentences = text_examples(TRAINING_SENTENCES)

    class BalancedMetric(TrainerCallback):
        base_loss: float | None = None

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            if not logs or "eval_loss" not in logs:
                return
            model = kw["model"]
            if self.base_loss is None:  # the base itself: the adapter switched off
                with (
                    model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
                ):
                    self.base_loss = base_fit(model, tokenizer, sentences, len(sentences), max_length).loss
            general = base_fit(model, tokenizer, sentences, len(sentences), max_length).loss
            logs["eval_general_loss"] = general
            logs["eval_balanced"] = logs["eval_loss"] + max(0.0, general - self.base_loss)

    return BalancedMetric()
