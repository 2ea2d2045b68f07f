"""Choose the default recipe by held-out task scores, not loss alone: labels, extraction, free text.

    python benchmarks/quality.py [--tasks labels,extraction,freetext] [--candidates default,top8]
                                 [--out quality-out] [--threads 1]

For each task (train.jsonl + test.jsonl written by examples/*/make_data.py) and each candidate
(the default recipe plus overrides), trains with LoRA Studio's `train()`, then answers the unseen
test rows greedily and scores them:
    labels      examples/ticket_routing     accuracy of the team name (half the wordings unseen)
    extraction  examples/json_extraction    whole JSON record exactly right
    freetext    examples/customer_replies   word F1 against the reference reply, and facts kept
Results go to OUT/quality.json as they come (a long run can be stopped and read), and a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-lora-cpu.yaml"
# Candidates: recipe overrides on top of the shipped default.
CANDIDATES = {
    "default": [],  # the top 16 blocks, learning rate 1e-3, cosine, 2 epochs
    "top8": ["layers=8"],
    "top12": ["layers=12"],
    "top8-3ep": ["layers=8", "num_train_epochs=3"],
    "all-blocks": ["layers=null", "learning_rate=2e-4", "lr_scheduler_type=linear"],  # TRL's recipe
}


def score_labels(answers: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    right = sum(a.strip().strip(".").lower() == r.lower() for a, r in zip(answers, references, strict=True))
    return {"score": right / len(references)}


def score_extraction(answers: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    from lora_studio.evaluation.scoring import score_json

    result = score_json(answers, references)
    return {"score": result.record_accuracy, "mean_field_accuracy": result.mean_field_accuracy}


def _words(text: str) -> list[str]:
    return re.findall(r"[\w%]+", text.lower())


def word_f1(answer: str, reference: str) -> float:
    got, want = _words(answer), _words(reference)
    common = sum(min(got.count(w), want.count(w)) for w in set(want))
    if not common:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


def score_freetext(answers: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Word F1 with the reference, and the share of replies that keep every fact (name, order, day, offer)."""
    f1 = [word_f1(a, r) for a, r in zip(answers, references, strict=True)]
    facts = []
    for answer, reference in zip(answers, references, strict=True):
        order = re.search(r"order (\d+)", reference)
        day = re.search(r"arrive on (\w+)", reference)
        offer = re.search(r"To make up for it, [^.]*\.", reference)
        needed = [
            reference.split(",")[0],
            order and order.group(1),
            day and day.group(1),
            offer and offer.group(0),
        ]
        facts.append(all(fact in answer for fact in needed if fact))
    return {"score": sum(f1) / len(f1), "facts_kept": sum(facts) / len(facts)}


TASKS: dict[str, tuple[str, Callable[..., dict[str, float]], int]] = {
    "labels": ("examples/ticket_routing", score_labels, 8),
    "extraction": ("examples/json_extraction", score_extraction, 48),
    "freetext": ("examples/customer_replies", score_freetext, 96),
}


def evaluate(task: str, candidate: str, out: Path) -> dict:
    """Train one candidate on one task and score its answers to the task's test rows."""
    from lora_studio import Recipe, train
    from lora_studio.adapters import load_adapted
    from lora_studio.data import load_examples
    from lora_studio.evaluation.answers import generate_answers, split_prompt

    folder, scorer, max_new_tokens = TASKS[task]
    overrides = [
        f"train_file={ROOT / folder / 'train.jsonl'}",
        f"output_dir={out / 'runs' / f'{task}-{candidate}'}",
        "max_length=256",
        *CANDIDATES[candidate],
    ]
    recipe = Recipe.from_yaml(RECIPE, overrides)
    started = time.perf_counter()
    result = train(recipe)
    train_s = time.perf_counter() - started
    _, examples = load_examples(ROOT / folder / "test.jsonl")
    prompts, references = zip(*(split_prompt(e) for e in examples), strict=True)
    adapted = load_adapted(result.adapter_dir)
    answers = generate_answers(
        adapted.model.eval(), adapted.tokenizer, list(prompts), max_new_tokens=max_new_tokens
    )
    return {
        **scorer(answers, references),
        "train_s": round(train_s, 1),
        "val_loss": result.metrics.get("val_loss"),
        "global_step": result.metrics["global_step"],
        "tokens_per_second": result.metrics["tokens_per_second"],
        "samples": [
            {"answer": a, "reference": r} for a, r in list(zip(answers, references, strict=True))[:3]
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated, from: " + ", ".join(TASKS))
    parser.add_argument("--candidates", default="default,top8", help="from: " + ", ".join(CANDIDATES))
    parser.add_argument("--out", type=Path, default=Path("quality-out"))
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (1 is steadier on a busy machine)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "quality.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for task in args.tasks.split(","):
        for candidate in args.candidates.split(","):
            key = f"{task}/{candidate}"
            if key in results:
                continue  # measured in an earlier run
            results[key] = evaluate(task, candidate, args.out)
            path.write_text(json.dumps(results, indent=2))
            logging.info("%s: %s", key, {k: v for k, v in results[key].items() if k != "samples"})
    print(f"\n{'task/candidate':<28} {'score':>7} {'extra':>18} {'val loss':>9} {'train s':>8}")
    for key, r in results.items():
        extra = next((f"{k} {r[k]:.3f}" for k in ("facts_kept", "mean_field_accuracy") if k in r), "")
        print(f"{key:<28} {r['score']:>7.3f} {extra:>18} {r['val_loss'] or 0:>9.4f} {r['train_s']:>8.0f}")


if __name__ == "__main__":
    main()
