"""The LoRA Studio demo: teach SmolLM2-135M-Instruct to turn order sentences into JSON, then measure it.

    make demo                                            # or:
    .venv/bin/python examples/json_extraction/demo.py [--set max_steps=10 ...]

1. Trains the default recipe (recipes/smollm2-lora-cpu.yaml) on train.jsonl: 320 sentences like
   "Order for Ben Kowalski: eight glass jars, deliver to Ghent." with their JSON record.
   The console is `lora-studio train`'s: one progress bar, a line per validation, a summary.
2. Evaluates it as `lora-studio eval RUN --data examples/json_extraction/test.jsonl` does: the 60
   held-out sentences are answered greedily by the base model (adapter off) and by the adapter,
   both are scored by exact field match, and the report (table, per-example answers, loss curves)
   is written to RUN/eval/. Prints the table and three samples.
Exits 1 when the adapter does not beat the base by MIN_GAIN whole-record accuracy.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from lora_studio import Recipe
from lora_studio.cli import hide_known_noise
from lora_studio.config import add_set_argument

if TYPE_CHECKING:
    from lora_studio import RunResult
    from lora_studio.evaluation.report import EvalReport

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parents[1] / "recipes" / "smollm2-lora-cpu.yaml"
TEST_FILE = HERE / "test.jsonl"
MIN_GAIN = 0.3  # the adapter must get at least 30 more records in 100 exactly right than the base
SAMPLES = 3

log = logging.getLogger("demo")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default=str(RECIPE), help="the recipe to train (default: %(default)s)")
    add_set_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # as `lora-studio train` logs
    hide_known_noise()  # before the imports below load the libraries that log it
    from lora_studio.evaluation.report import EvalOptions, run_eval
    from lora_studio.progress import train_on_console

    started = time.perf_counter()

    recipe = Recipe.from_yaml(args.recipe, args.overrides)
    log.info(
        "demo 1/2: training %s on %s (run folder %s)",
        recipe.model.base_model,
        recipe.data.train_file,
        recipe.train.output_dir or "a fresh one under $LORA_STUDIO_HOME/runs",
    )
    result = train_on_console(recipe)  # the bar, a line per validation and the summary

    log.info("demo 2/2: answering the %s held-out orders with the base and the adapted model", TEST_FILE.name)
    evaluation = run_eval(EvalOptions(str(result.run_dir), str(TEST_FILE)))

    print("\n".join(report(evaluation, result, time.perf_counter() - started)))
    gain = evaluation.gain()
    if gain < MIN_GAIN:
        print(
            f"\nFAILED: the adapter gained only {gain:+.1%} whole-record accuracy (needed {MIN_GAIN:+.0%})."
        )
        return 1
    return 0


def report(evaluation: EvalReport, result: RunResult, seconds: float) -> list[str]:
    """The side-by-side table (the one `lora-studio eval` prints) and a few sample answers."""
    c = evaluation.comparison
    out = ["", *evaluation.table()]
    for i in range(min(SAMPLES, len(c.prompts))):
        out += [
            "",
            f"sample {i + 1}: {c.prompts[i][-1]['content']}",
            f"  expected: {c.references[i]}",
            f"  base:     {_one_line(c.base.answers[i])}",
            f"  adapted:  {_one_line(c.adapter.answers[i])}",
        ]
    m = result.metrics
    out += [
        "",
        f"training: {m['global_step']} steps in {(m['train_runtime_s'] or 0) / 60:.1f} min at "
        f"{m['tokens_per_second']} tokens/s; adapter in {result.adapter_dir}",
        f"report: {evaluation.out_dir / 'report.md'}",
        f"demo finished in {seconds / 60:.1f} min",
    ]
    return out


def _one_line(text: str, limit: int = 150) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


if __name__ == "__main__":
    sys.exit(main())
