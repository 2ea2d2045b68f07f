"""Classification head vs chat LoRA vs a linear probe, side by side on three generated label sets.

    python benchmarks/classify_quality.py [--sets words,ids,long] [--methods head,head-whole,chat,probe]
                                          [--out classify-quality-out] [--threads N]
    python benchmarks/classify_quality.py --measure-inference --out classify-quality-out

For each set (benchmarks/classify_sets.py: few word labels; 60 opaque-id labels with 10 rows each;
long e-mails) and each method, in one process, one after another:
    head    recipes/smollm2-classify-cpu.yaml as shipped (task: classify), only the data path set
    head-whole  the same, with the prompt's start run in every row (speedups cache, bf16: no
            `prefix` lever), to show what running it once per batch buys
    chat    recipes/smollm2-lora-cpu.yaml as shipped (task: chat), trained on prompt/completion
            rows whose answer is the label; scored on its greedy answer (the first label it names)
    probe   logistic regression on the frozen base's features (lora_studio.tasks.classify.probe)
it prints accuracy and macro F1 on the held-out test rows, training seconds (wall clock of the whole
training call: data, model load, feature pass, training) and inference rows/s (model loaded,
batches of 16), each as the product runs it: the head in its precision "auto" (bf16 autocast on a
CPU with native bf16), chat generating in fp32; chat's rows/s under bf16 autocast is noted beside it.
Results go to OUT/classify_quality.json as they come, and a table at the end.
`--measure-inference` measures rows/s again, side by side, on the head and chat adapters a run left
in OUT (the head also with its prompt's start run for every batch, to show what reusing it buys).
Goal for the head: accuracy >= chat's and clearly above the probe's, <= 1/3 of chat's training
time, >= 5x chat's inference rows/s.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from classify_sets import SETS  # noqa: E402

HEAD_RECIPE = ROOT / "recipes" / "smollm2-classify-cpu.yaml"
CHAT_RECIPE = ROOT / "recipes" / "smollm2-lora-cpu.yaml"
BATCH = 16
LIST_LABELS_UP_TO = 12  # the chat prompt names the labels when there are this few
NO_LABEL = "(no label)"

log = logging.getLogger("classify_quality")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def scores(labels: list[str], predicted: list[str], known: list[str]) -> dict[str, float]:
    """Accuracy, and macro F1 over the real labels (an answer naming none counts as wrong)."""
    from lora_studio.tasks.classify.scores import score_predictions

    names = [*known, NO_LABEL]
    result = score_predictions([names.index(x) for x in labels], [names.index(x) for x in predicted], names)
    real = result.per_class()[: len(known)]
    return {"accuracy": result.accuracy, "macro_f1": sum(c["f1"] for c in real) / len(real)}


# --- the three methods ---------------------------------------------------------------------------
def run_head(train_file: Path, test: list[dict], out: Path, extra: list[str]) -> dict:
    from lora_studio import Recipe, train
    from lora_studio.tasks.classify.model import Classifier

    recipe = Recipe.from_yaml(HEAD_RECIPE, [f"train_file={train_file}", f"output_dir={out}", *extra])
    started = time.perf_counter()
    result = train(recipe)
    train_s = time.perf_counter() - started
    classifier = Classifier.from_adapter(result.adapter_dir)
    predicted, rows_s = head_inference(classifier, test)
    m = result.metrics
    return {
        **scores([r["label"] for r in test], predicted, classifier.labels),
        "train_s": train_s,
        "trainer_s": m["train_runtime_s"],
        "rows_per_s": rows_s,
        "step0_val_accuracy": m.get("base_val_accuracy"),
        "val_accuracy": m.get("val_accuracy"),
        "global_step": m["global_step"],
        "best_checkpoint": m.get("best_checkpoint"),
        "kept_start": m.get("kept_start"),
        "epochs": _epochs(result.run_dir),
    }


def head_inference(classifier: object, test: list[dict]) -> tuple[list[str], float]:
    """(predicted labels, rows/s) in batches of BATCH, the model loaded."""
    started = time.perf_counter()
    predicted = [p.label for p in classifier.predict([r["text"] for r in test], batch_size=BATCH)]
    return predicted, len(test) / (time.perf_counter() - started)


def _epochs(run_dir: Path) -> float | None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return max((r.get("epoch", 0) for r in rows), default=None)


def chat_prompt(text: str, labels: list[str]) -> str:
    if len(labels) <= LIST_LABELS_UP_TO:
        return f"Classify this text as one of: {', '.join(labels)}. Answer with the label only.\n\n{text}"
    return f"Classify this text. Answer with its label code only.\n\n{text}"


def label_in(answer: str, labels: list[str]) -> str:
    """The label the answer names first (whole word, any case), or NO_LABEL."""
    hits = [(m.start(), x) for x in labels if (m := re.search(rf"\b{re.escape(x)}\b", answer, re.I))]
    return min(hits)[1] if hits else NO_LABEL


def run_chat(train_rows: list[dict], test: list[dict], out: Path, extra: list[str]) -> dict:
    from lora_studio import Recipe, train

    labels = sorted({r["label"] for r in train_rows})
    data = write_jsonl(
        out.parent / f"{out.name}-chat.jsonl",
        [{"prompt": chat_prompt(r["text"], labels), "completion": r["label"]} for r in train_rows],
    )
    longest = max(len(r["text"]) for r in train_rows) // 3 + 64  # ~3+ characters a token, plus the prompt
    overrides = [f"train_file={data}", f"output_dir={out}", f"max_length={max(128, longest)}", *extra]
    recipe = Recipe.from_yaml(CHAT_RECIPE, overrides)
    started = time.perf_counter()
    result = train(recipe)
    train_s = time.perf_counter() - started
    answers, rows_s = chat_inference(result.adapter_dir, test, labels)
    predicted = [label_in(a, labels) for a in answers]
    return {
        **scores([r["label"] for r in test], predicted, labels),
        "train_s": train_s,
        "trainer_s": result.metrics["train_runtime_s"],
        "rows_per_s": rows_s,
        "bf16_rows_per_s": chat_bf16_rows_per_s(result.adapter_dir, test, labels),
        "no_label_answers": predicted.count(NO_LABEL),
        "global_step": result.metrics["global_step"],
        "sample_answers": answers[:3],
    }


def chat_inference(adapter_dir: Path, test: list[dict], labels: list[str]) -> tuple[list[str], float]:
    """(greedy answers, rows/s) in batches of BATCH, the model loaded."""
    from lora_studio.adapters import load_adapted
    from lora_studio.evaluation.answers import generate_answers

    adapted = load_adapted(adapter_dir)
    prompts = [[{"role": "user", "content": chat_prompt(r["text"], labels)}] for r in test]
    started = time.perf_counter()
    answers = generate_answers(
        adapted.model.eval(), adapted.tokenizer, prompts, max_new_tokens=8, batch_size=BATCH
    )
    return answers, len(test) / (time.perf_counter() - started)


def chat_bf16_rows_per_s(adapter_dir: Path, test: list[dict], labels: list[str]) -> float | None:
    """The chat LoRA's rows/s under bf16 autocast, where the classifier's precision "auto" would use
    it: not what chat serving does (it generates in fp32), shown so the head's bf16 is not its only edge."""
    import torch

    from lora_studio.hardware import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        return None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return chat_inference(adapter_dir, test, labels)[1]


def measure_inference(out: Path, sets: list[str]) -> list[str]:
    """Rows/s again, side by side in this process, of the adapters a run left in OUT/runs: the head
    (the prompt's start run once, and with it run for every batch) and the chat LoRA."""
    from lora_studio.tasks.classify.model import Classifier

    lines = [
        "| set | head rows/s | head, prompt start per batch | chat LoRA rows/s | load |",
        "|---|---:|---:|---:|---|",
    ]
    for name in sets:
        train_rows, test = SETS[name]()
        labels = sorted({r["label"] for r in train_rows})
        classifier = Classifier.from_adapter(out / "runs" / f"{name}-head" / "adapter")
        head_inference(classifier, test[:BATCH])  # warm-up
        _, reused = head_inference(classifier, test)
        classifier._prefix = lambda device: None  # type: ignore[method-assign]  # every batch runs it all
        _, per_batch = head_inference(classifier, test)
        _, chat = chat_inference(out / "runs" / f"{name}-chat" / "adapter", test, labels)
        lines.append(f"| {name} | {reused:.1f} | {per_batch:.1f} | {chat:.1f} | {os.getloadavg()[0]:.1f} |")
        log.info(lines[-1])
    return lines


def run_probe(train_file: Path, test: list[dict], extra: list[str]) -> dict:
    from lora_studio import Recipe
    from lora_studio.tasks.classify.data import load_labeled, stratified_split
    from lora_studio.tasks.classify.probe import train_probe

    # the head's base, validation split and max_length
    recipe = Recipe.from_yaml(HEAD_RECIPE, [f"train_file={train_file}", *extra])
    started = time.perf_counter()
    rows = load_labeled(train_file)
    train_rows, val_rows = stratified_split(rows, recipe.data.val_fraction, recipe.train.seed)
    probe = train_probe(recipe.model.base_model, train_rows, val_rows, recipe.data.max_length)
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    predicted = probe.predict([r["text"] for r in test])
    rows_s = len(test) / (time.perf_counter() - started)
    return {
        **scores([r["label"] for r in test], predicted, probe.labels),
        "train_s": train_s,
        "rows_per_s": rows_s,
        "l2": probe.fit.l2,
    }


# --- the run -------------------------------------------------------------------------------------
def warm_up() -> None:
    """Import what training and inference import, so the first method timed does not pay for it."""
    import peft  # noqa: F401
    import trl  # noqa: F401
    from transformers import Trainer  # noqa: F401

    import lora_studio.tasks.classify.train  # noqa: F401
    import lora_studio.training  # noqa: F401


def table(results: dict) -> list[str]:
    out = [
        "| set | method | accuracy | macro F1 | training s | inference rows/s | notes |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for name, methods in results["sets"].items():
        for method, r in methods.items():
            notes = ""
            if method.startswith("head"):
                notes = (
                    f"step 0: {r['step0_val_accuracy']:.1%} val; stopped at epoch {r['epochs']:.1f}, "
                    f"best {'the start (frozen body)' if r.get('kept_start') else r['best_checkpoint']}"
                )
            elif method == "chat":
                notes = f"{r['no_label_answers']} answers named no label"
                if r.get("bf16_rows_per_s"):
                    notes += f"; {r['bf16_rows_per_s']:.1f} rows/s under bf16 autocast"
            out.append(
                f"| {name} | {method} | {r['accuracy']:.1%} | {r['macro_f1']:.3f} | {r['train_s']:.0f} "
                f"| {r['rows_per_s']:.1f} | {notes} |"
            )
    return out


def goal_lines(results: dict) -> list[str]:
    out = []
    for name, m in results["sets"].items():
        if not {"head", "chat", "probe"} <= m.keys():
            continue
        head, chat, probe = m["head"], m["chat"], m["probe"]
        checks = {
            "accuracy >= chat": head["accuracy"] >= chat["accuracy"],
            "accuracy > probe": head["accuracy"] > probe["accuracy"],
            "train <= 1/3 chat": head["train_s"] <= chat["train_s"] / 3,
            "rows/s >= 5x chat": head["rows_per_s"] >= 5 * chat["rows_per_s"],
        }
        out.append(f"{name}: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in checks.items()))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sets", default=",".join(SETS), help="comma-separated, from: " + ", ".join(SETS))
    parser.add_argument("--methods", default="head,head-whole,chat,probe")
    parser.add_argument("--out", type=Path, default=Path("classify-quality-out"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument(
        "--base-model", default=None, help="another base for every method (a smoke test on a small model)"
    )
    parser.add_argument(
        "--head-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting of the classify recipe (repeatable), e.g. num_train_epochs=10",
    )
    parser.add_argument(
        "--measure-inference",
        action="store_true",
        help="only measure rows/s again on the head and chat adapters an earlier run left in --out",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure_inference:
        print("\n".join(measure_inference(args.out, args.sets.split(","))))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "classify_quality.json"
    extra = [f"base_model={args.base_model}"] if args.base_model else []
    warm_up()
    results: dict = {"load_before": os.getloadavg(), "threads": torch.get_num_threads(), "sets": {}}
    for name in args.sets.split(","):
        train_rows, test = SETS[name]()
        train_file = write_jsonl(args.out / "data" / name / "train.jsonl", train_rows)
        write_jsonl(args.out / "data" / name / "test.jsonl", test)
        results["sets"][name] = {}
        for method in args.methods.split(","):
            log.info("%s: %s (%d training rows, %d test rows)", name, method, len(train_rows), len(test))
            if method in ("head", "head-whole"):  # head-whole: the prompt's start run in every row
                whole = ["speedups=[cache,bf16]"] if method == "head-whole" else []
                r = run_head(
                    train_file, test, args.out / "runs" / f"{name}-{method}", extra + args.head_set + whole
                )
            elif method == "chat":
                r = run_chat(train_rows, test, args.out / "runs" / f"{name}-chat", extra)
            else:
                r = run_probe(train_file, test, extra)
            r["load_after"] = os.getloadavg()[0]
            results["sets"][name][method] = r
            log.info("%s %s: %s", name, method, {k: v for k, v in r.items() if k != "sample_answers"})
            path.write_text(json.dumps(results, indent=2, default=str))
    results["load_after"] = os.getloadavg()
    path.write_text(json.dumps(results, indent=2, default=str))
    print(
        "\n".join(["", *table(results), "", *goal_lines(results), f"load average: {results['load_after']}"])
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
