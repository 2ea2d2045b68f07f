"""Three ways to route customer messages with SmolLM2-135M-Instruct, measured in one run on the same test rows.

    .venv/bin/python examples/classification/compare.py [--set max_steps=10 ...]

1. zero-shot: the chat base is asked to answer with one of the labels (no training).
2. chat LoRA: a LoRA fine-tune of the chat model that answers with the label word (task: chat,
   the same LoRA and training settings as 3, on the same rows written as prompt/completion pairs).
3. classification head: recipes/smollm2-classify-cpu.yaml (task: classify), a new 4-label head on the
   pretrained body, LoRA on the body.
For each: accuracy and macro F1 on the 120 held-out rows of test.csv, training time (the Trainer's
own runtime, model loading excluded) and inference rows per second (batches of 16, model loaded; up to 24 new tokens per answer).
`--set` overrides apply to both trainings. Results go to runs/classification-compare/results.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path

from lora_studio import Recipe, train
from lora_studio.adapters import load_adapted
from lora_studio.config import ModelSettings, add_set_argument
from lora_studio.evaluation.answers import generate_answers
from lora_studio.models import load_base
from lora_studio.tasks.classify.data import load_labeled
from lora_studio.tasks.classify.model import Classifier
from lora_studio.tasks.classify.scores import score_predictions

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parents[1] / "recipes" / "smollm2-classify-cpu.yaml"
OUT = Path("runs/classification-compare")
PROMPT = (
    "Route this customer message to one team: {labels}. Answer with the team name only.\n\nMessage: {text}"
)
NO_LABEL = "(no label)"
BATCH = 16
MAX_NEW_TOKENS = 24  # room for a chatty base to name the team; a trained answer stops at its end-of-turn

log = logging.getLogger("compare")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_set_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    head_recipe = Recipe.from_yaml(RECIPE, [f"output_dir={OUT / 'head'}", *args.overrides])
    test = load_labeled(HERE / "test.csv")
    labels = sorted({r.label for r in test})
    results = {
        "zero-shot chat base": zero_shot(test, labels),
        "chat LoRA (answers the label)": chat_lora(head_recipe, test, labels),
        "classification head (task: classify)": classification_head(head_recipe, test),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    print("\n".join(table(results, len(test))))
    return 0


# --- the three contenders ---------------------------------------------------------------------------
def zero_shot(test: list, labels: list[str]) -> dict:
    log.info("1/3 zero-shot: the chat base picks a label for %d test rows", len(test))
    model, tokenizer, _ = load_base(ModelSettings())
    return answer_and_score(model, tokenizer, test, labels, train_seconds=0.0)


def chat_lora(head_recipe: Recipe, test: list, labels: list[str]) -> dict:
    log.info("2/3 chat LoRA: fine-tune the chat model to answer with the label word")
    rows = load_labeled(head_recipe.data.train_file)
    OUT.mkdir(parents=True, exist_ok=True)
    data = OUT / "chat_train.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": prompt(r.text, labels), "completion": r.label}) + "\n" for r in rows)
    )
    raw = head_recipe.to_dict() | {"name": "classification-compare-chat", "task": "chat"}
    raw["data"] = raw["data"] | {"train_file": str(data), "max_length": 128}
    raw["train"] = raw["train"] | {"output_dir": str(OUT / "chat"), "metric_for_best_model": "val_loss"}
    result = train(Recipe.from_dict(raw))
    adapted = load_adapted(result.adapter_dir)
    model, tokenizer = adapted.model, adapted.tokenizer
    return answer_and_score(model, tokenizer, test, labels, result.metrics["train_runtime_s"])


def classification_head(recipe: Recipe, test: list) -> dict:
    log.info("3/3 classification head: %s", RECIPE.name)
    result = train(recipe)
    classifier = Classifier.from_adapter(result.adapter_dir)
    start = time.perf_counter()
    predictions = classifier.predict([r.text for r in test], batch_size=BATCH)
    seconds = time.perf_counter() - start
    ids = {label: i for i, label in enumerate(classifier.labels)}
    scores = score_predictions(
        [ids[r.label] for r in test], [ids[p.label] for p in predictions], classifier.labels
    )
    return summary(scores.accuracy, scores.macro_f1, result.metrics["train_runtime_s"], len(test) / seconds)


# --- helpers ----------------------------------------------------------------------------------------
def prompt(text: str, labels: list[str]) -> str:
    return PROMPT.format(labels=", ".join(labels), text=text)


def answer_and_score(model, tokenizer, test: list, labels: list[str], train_seconds: float) -> dict:
    prompts = [[{"role": "user", "content": prompt(r.text, labels)}] for r in test]
    start = time.perf_counter()
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=BATCH)
    seconds = time.perf_counter() - start
    picked = [label_in(a, labels) for a in answers]
    known = [*labels, NO_LABEL]  # an answer naming no label counts as wrong
    scores = score_predictions([known.index(r.label) for r in test], [known.index(p) for p in picked], known)
    real = scores.per_class()[: len(labels)]  # macro F1 over the real labels only
    summary_row = summary(
        scores.accuracy, sum(c["f1"] for c in real) / len(real), train_seconds, len(test) / seconds
    )
    summary_row["no_label_answers"] = picked.count(NO_LABEL)
    summary_row["sample_answers"] = answers[:5]
    return summary_row


def label_in(answer: str, labels: list[str]) -> str:
    """The label the answer names first (whole word, any case), or NO_LABEL."""
    hits = [
        (m.start(), label) for label in labels if (m := re.search(rf"\b{re.escape(label)}\b", answer, re.I))
    ]
    return min(hits)[1] if hits else NO_LABEL


def summary(accuracy: float, macro_f1: float, train_seconds: float, rows_per_second: float) -> dict:
    return {
        "accuracy": round(accuracy, 4),
        "macro_f1": round(macro_f1, 4),
        "train_seconds": round(train_seconds or 0.0, 1),
        "rows_per_second": round(rows_per_second, 1),
    }


def table(results: dict, rows: int) -> list[str]:
    out = [
        "",
        f"Held-out test set: {rows} rows of examples/classification/test.csv (4 teams)",
        "",
        "| approach | accuracy | macro F1 | training time | inference rows/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        trained = f"{r['train_seconds'] / 60:.1f} min" if r["train_seconds"] else "none"
        out.append(
            f"| {name} | {r['accuracy']:.1%} | {r['macro_f1']:.3f} | {trained} | {r['rows_per_second']:.1f} |"
        )
    return out


if __name__ == "__main__":
    sys.exit(main())
