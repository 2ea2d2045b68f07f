"""Does a base model fit the data, before any training? And which of several bases fits best?

    report = check_fit(model, tokenizer, examples, name="smollm2-135m-instruct")
    report.verdict     # "good fit", "partial fit", "format mismatch", "task mismatch", "language mismatch"
    reports = fit_models(["smollm2-135m-instruct", "path/to/other"], "data.jsonl")   # ranked, best first

Two measurements on the same seeded sample, because each alone misleads:
  - the zero-shot score: the base answers the prompts greedily, scored with the metric `eval`
    would use. It shows what the base *writes*.
  - the answer-token loss (`evaluate.base_fit`): how likely the base finds the reference answers
    when they are shown to it. It shows what the base *knows*, whatever the form.
A low loss with a low score is a format mismatch (the demo's base: loss 0.65, 0% of records
right): the base knows the content but not the form, which LoRA learns in a few steps. A high
loss with a low score is a task mismatch, or a language mismatch when the data's language is
not the one the base answers in.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import random
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import Example, load_examples
from ..errors import LoraStudioError
from .answers import Fit, answer_budget, base_fit, generate_answers, split_prompt
from .scoring import Score, choose_metric, parse_json_object, score

log = logging.getLogger(__name__)

GOOD_SCORE = 0.8  # zero-shot share right from which the base already does the task
PARTIAL_SCORE = 0.5
LOW_LOSS = 1.0  # answer loss (nats per token) under which the base expects the answers
HIGH_LOSS = 2.5  # ...and over which they are far from anything it knows
OVERLAP = 0.5  # share of the reference's words found in the base's answers: right content
VERDICTS = ("good fit", "partial fit", "format mismatch", "task mismatch", "language mismatch")


@dataclass(frozen=True)
class FitReport:
    model: str
    metric: str
    score: Score  # zero-shot, on the sample
    fit: Fit  # teacher-forced answer loss, on the same sample
    overlap: float  # mean share of each reference's words that appear in the base's answer
    data_language: str
    answer_language: str
    verdict: str
    advice: str
    seconds: float = 0.0  # loading and scoring
    memory_mb: float = 0.0  # peak GPU memory, or the weights' size in memory on a CPU
    samples: tuple[tuple[str, str, str], ...] = ()  # (question, reference, answer), a few

    def rank_key(self) -> tuple[float, float]:
        """Higher is better: the zero-shot score first, then the lower answer loss."""
        return (self.score.headline, -self.fit.loss)

    def lines(self) -> list[str]:
        out = [
            f"fit of {self.model} on {self.score.rows} sampled rows: {self.verdict}",
            f"  zero-shot {self.score.headline_name}: {self.score.headline:.1%} (metric: {self.metric})",
            f"  {self.fit.line()}",
            f"  reference words found in its answers: {self.overlap:.0%}",
            f"  language: data {self.data_language}, answers {self.answer_language}",
            f"  {self.advice}",
        ]
        for question, reference, answer in self.samples:
            out += [
                f"  e.g. {_short(question)}",
                f"    expected: {_short(reference)}",
                f"    base:     {_short(answer)}",
            ]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "metric": self.metric,
            "score": self.score.to_dict(),
            "answer_loss": self.fit.loss,
            "perplexity": self.fit.perplexity,
            "overlap": self.overlap,
            "data_language": self.data_language,
            "answer_language": self.answer_language,
            "verdict": self.verdict,
            "advice": self.advice,
            "seconds": self.seconds,
            "memory_mb": self.memory_mb,
        }


# --- the verdict ---------------------------------------------------------------------------------
def diagnose(
    score: float, loss: float, overlap: float, data_language: str, answer_language: str
) -> tuple[str, str]:
    """(verdict, advice) from the zero-shot score, the answer loss, the overlap and the languages."""
    if score >= GOOD_SCORE:
        return (
            "good fit",
            f"the base already gets {score:.0%} right zero-shot: a short run, or none, should do",
        )
    if score >= PARTIAL_SCORE:
        return (
            "partial fit",
            f"the base gets {score:.0%} right zero-shot: LoRA should close the gap in a few epochs",
        )
    known = "unknown" not in (data_language, answer_language)
    if known and data_language != answer_language:
        return "language mismatch", (
            f"the data is in {data_language} but the base answers in {answer_language}: choose a base "
            "trained on that language, or expect to need much more data"
        )
    if loss < LOW_LOSS or (loss < HIGH_LOSS and overlap >= OVERLAP):
        return "format mismatch", (
            f"the base finds the reference answers likely (answer loss {loss:.2f}) and its answers hold "
            f"{overlap:.0%} of their words, but it gets only {score:.0%} right as written: it knows the "
            "content, not the form. LoRA learns a format quickly: a short run should do"
        )
    if loss >= HIGH_LOSS and data_language not in ("english", "unknown"):
        return "language mismatch", (
            f"the base finds these {data_language} answers unlikely (answer loss {loss:.2f}): choose a base "
            "trained on that language, or expect to need much more data"
        )
    return "task mismatch", (
        f"the base neither writes these answers ({score:.0%} right) nor expects them (answer loss {loss:.2f}): "
        "expect to need more data and epochs, a higher rank or more layers, or choose a base closer to the task"
    )


def word_overlap(answers: Sequence[str], references: Sequence[str]) -> float:
    """Mean share of each reference's words (a JSON reference: its values' words) found in the answer."""
    shares = []
    for answer, reference in zip(answers, references, strict=True):
        obj = parse_json_object(reference) if reference.strip().startswith("{") else None
        text = " ".join(str(v) for v in obj.values()) if obj else reference
        words = set(_words(text))
        if words:
            found = answer.casefold()
            shares.append(sum(w in found for w in words) / len(words))
    return sum(shares) / len(shares) if shares else 0.0


# --- languages: the script, then stop words for the common Latin-script languages ----------------
STOP_WORDS = {
    "english": "the and is are of to in it that for with you this what be on not was",
    "french": "le la les et est des une un du pour dans que qui pas vous sur au avec",
    "german": "der die das und ist nicht ein eine zu mit den von sie ich auf für auch",
    "spanish": "el la los las y es que de en un una por para con no se del",
    "italian": "il lo la gli le e è di che un una per non con del della sono",
    "portuguese": "o a os as e é de que um uma para com não do da em",
    "dutch": "de het een en is van dat niet op te met voor zijn ik",
}
_STOP = {lang: set(words.split()) for lang, words in STOP_WORDS.items()}
SCRIPTS = {"CYRILLIC": "cyrillic", "GREEK": "greek", "ARABIC": "arabic", "HEBREW": "hebrew",
           "DEVANAGARI": "hindi", "HANGUL": "korean", "HIRAGANA": "japanese", "KATAKANA": "japanese",
           "CJK": "chinese", "THAI": "thai"}  # fmt: skip


def guess_language(texts: Sequence[str]) -> str:
    """A rough guess from the letters' script and stop words; "unknown" when the text is too short."""
    letters = Counter(_script(ch) for text in texts for ch in text if ch.isalpha())
    if not letters:
        return "unknown"
    script, count = letters.most_common(1)[0]
    if script != "latin":
        return script if count >= 0.5 * sum(letters.values()) else "unknown"
    words = [w for text in texts for w in _words(text)]
    hits = {lang: sum(w in stop for w in words) for lang, stop in _STOP.items()}
    best = max(hits, key=hits.get)
    # Too few stop words (a list of names, a JSON record) says nothing about the language.
    return best if hits[best] >= max(3, 0.05 * len(words)) else "unknown"


def _script(ch: str) -> str:
    name = unicodedata.name(ch, "")
    return next((lang for key, lang in SCRIPTS.items() if name.startswith(key)), "latin")


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.casefold())


# --- measuring -----------------------------------------------------------------------------------
def check_fit(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    name: str = "the base",
    sample: int = 32,
    seed: int = 0,
    metric: str = "auto",
    max_length: int = 512,
    batch_size: int = 8,
) -> FitReport:
    """Zero-shot score and answer loss of a model on a seeded sample of chat examples."""
    if not examples:
        raise LoraStudioError("the fit check needs at least one example")
    chosen = random.Random(seed).sample(list(examples), min(sample, len(examples)))
    prompts, references = (list(x) for x in zip(*(split_prompt(e) for e in chosen), strict=True))
    metric = choose_metric(references) if metric == "auto" else metric
    answers = generate_answers(model, tokenizer, prompts, answer_budget(tokenizer, references), batch_size)
    result = score(answers, references, metric)
    fit = base_fit(model, tokenizer, chosen, sample=len(chosen), max_length=max_length, batch_size=batch_size)
    overlap = word_overlap(answers, references)
    questions = [p[-1]["content"] for p in prompts]
    data_language = guess_language([q + " " + r for q, r in zip(questions, references, strict=True)])
    answer_language = guess_language(answers)
    verdict, advice = diagnose(result.headline, fit.loss, overlap, data_language, answer_language)
    return FitReport(
        name, metric, result, fit, overlap, data_language, answer_language, verdict, advice,
        samples=tuple(zip(questions[:2], references[:2], answers[:2], strict=True)),
    )  # fmt: skip


def fit_models(
    names: Sequence[str],
    path: str | Path,
    fmt: str = "auto",
    sample: int = 32,
    max_length: int = 512,
    seed: int = 0,
) -> tuple[list[FitReport], dict[str, str]]:
    """Check each base on the same sample, best first; (reports, {name: why it failed}) ."""
    from ..config import ModelSettings
    from ..models import load_base

    _, examples = load_examples(path, fmt, max_length=max_length)
    reports, failed = [], {}
    for name in names:
        start = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            model, tokenizer, _ = load_base(ModelSettings(base_model=name))
        except LoraStudioError as e:
            if len(names) == 1:
                raise
            failed[name] = str(e)
            continue
        log.info("checking the fit of %s", name)
        report = check_fit(model, tokenizer, examples, name, sample, seed, max_length=max_length)
        memory = _memory_mb(model)
        del model
        gc.collect()
        seconds = round(time.perf_counter() - start, 1)
        reports.append(dataclasses.replace(report, seconds=seconds, memory_mb=memory))
    reports.sort(key=FitReport.rank_key, reverse=True)
    return reports, failed


def ranking_lines(reports: Sequence[FitReport], failed: dict[str, str] | None = None) -> list[str]:
    """The comparison table of several bases and the recommendation."""
    width = max([24, *(len(r.model) + 2 for r in reports)])
    out = [f"{'model':{width}}{'zero-shot':>10}{'loss':>8}{'seconds':>9}{'memory MB':>11}  verdict"]
    out += [
        f"{r.model:{width}}{r.score.headline:>10.1%}{r.fit.loss:>8.3f}{r.seconds:>9.0f}{r.memory_mb:>11.0f}  {r.verdict}"
        for r in reports
    ]
    out += [f"{name:{width}}could not be checked: {why}" for name, why in (failed or {}).items()]
    if reports:
        best = reports[0]
        out.append(f"recommended: {best.model} ({best.verdict}; {best.advice})")
    return out


def _memory_mb(model: Any) -> float:
    if torch.cuda.is_available() and next(model.parameters()).is_cuda:
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(model.get_memory_footprint() / 2**20, 1)


def _short(text: str, limit: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
