"""Memory stays bounded on every path that reads a user's data file: one 60 MB line in a file costs
what a long row costs, under 1 GiB of peak RSS, on train, data check, eval, classify --file, fit and
the UI's data and eval actions (all through data_files.read_rows, the one bounded reader).

The paths run one after another in one child process (the libraries load once), with a watchdog
that ends it at 1.5 GiB so a regression fails fast instead of taking the shared machine's memory;
after each path the child reports its peak RSS (resource.getrusage) so far.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from classify_helpers import build_classifier_adapter

pytestmark = pytest.mark.subprocess
LIMIT_MIB = 1024
LONG_CHARS = 60 * 2**20

CHILD = r"""
import json, os, resource, sys, threading, time
from pathlib import Path

WATCHDOG_MIB = 1536
spec = json.loads(sys.argv[1])
step = ["start"]


def watchdog():  # a regression must not take the machine's memory: stop at 1.5 GiB
    page = os.sysconf("SC_PAGE_SIZE")
    while True:
        rss = int(Path("/proc/self/statm").read_text().split()[1]) * page
        if rss > WATCHDOG_MIB * 2**20:
            print(json.dumps({"step": step[0], "peak_mib": rss / 2**20, "killed": True}), flush=True)
            os._exit(3)
        time.sleep(0.01)


threading.Thread(target=watchdog, daemon=True).start()
from lora_studio.cli import main
from ui.adapters_tab import evaluate
from ui.data_tab import check_dataset


def peak_mib():
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec, so a child forked from a
    # big pytest process would report the parent's peak (1.9 GB late in the full suite).
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


steps = {
    "train": lambda: main(["train", spec["recipe"]]),
    "data check": lambda: main(["data", "check", spec["chat"], "--base-model", spec["base"], "--max-length", "64"]),
    "eval --data": lambda: main(["eval", spec["adapter"], "--data", spec["chat"], "--no-base", "--limit", "2"]),
    "classify --file": lambda: main(["classify", spec["classifier"], "--file", spec["texts"], "--out", spec["out"]]),
    "fit": lambda: main(["fit", spec["chat"], "--models", spec["base"], "--sample", "2", "--max-length", "64"]),
    "UI data check": lambda: check_dataset(spec["chat"], spec["base"], "auto", 64),
    "UI evaluate": lambda: evaluate(spec["adapter"], spec["chat"], 2, False),
}
for name, run in steps.items():
    step[0], start = name, time.perf_counter()
    result = run()
    seconds = round(time.perf_counter() - start, 1)
    print(json.dumps({"step": name, "peak_mib": peak_mib(), "s": seconds, "result": str(result)[:200]}), flush=True)
"""


def _long_row(text_field: dict) -> str:
    return json.dumps(text_field) + "\n"


def test_a_60_mb_line_stays_under_1_gib_on_every_reading_path(
    tiny_model_dir: Path, studio_home: Path, tmp_path: Path
) -> None:
    long_text = "lorem ipsum dolor " * (LONG_CHARS // 18)
    pairs = [(f"Repeat: word{i % 5}", f"word{i % 5}") for i in range(12)]
    chat = tmp_path / "chat.jsonl"
    with open(chat, "w") as f:
        f.write(
            _long_row(
                {"messages": [{"role": "user", "content": long_text}, {"role": "assistant", "content": "x"}]}
            )
        )
        for q, a in pairs:
            f.write(
                _long_row({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
            )
    texts = tmp_path / "texts.jsonl"
    with open(texts, "w") as f:
        f.write(_long_row({"text": long_text, "label": "a"}))
        f.write("".join(_long_row({"text": f"short {i}", "label": "ab"[i % 2]}) for i in range(6)))
    assert chat.stat().st_size > LONG_CHARS
    run_dir = studio_home / "runs" / "long"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        json.dumps(
            {
                "name": "long",
                "model": {"base_model": str(tiny_model_dir)},
                "lora": {"r": 4, "lora_alpha": 8},
                "data": {"train_file": str(chat), "max_length": 64},
                "train": {"output_dir": str(run_dir), "max_steps": 2, "per_device_train_batch_size": 4},
            }
        )
    )
    classifier = build_classifier_adapter(tiny_model_dir, tmp_path / "classifier", ["a", "b"])
    spec = {
        "recipe": str(recipe),
        "chat": str(chat),
        "texts": str(texts),
        "base": str(tiny_model_dir),
        "adapter": str(run_dir / "adapter"),
        "classifier": str(classifier),
        "out": str(tmp_path / "predictions.csv"),
    }
    env = {**os.environ, "TQDM_DISABLE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, env=env, timeout=300
    )
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"step"')]
    assert reports and not reports[-1].get("killed"), f"{reports[-1]}\n{done.stderr[-3000:]}"
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in reports] == [
        "train", "data check", "eval --data", "classify --file", "fit", "UI data check", "UI evaluate"
    ]  # fmt: skip
    assert [r["result"] for r in reports[:5]] == ["0"] * 5, reports
    over = [r for r in reports if r["peak_mib"] > LIMIT_MIB]
    assert not over, f"peak RSS over {LIMIT_MIB} MiB: {over} (all: {reports})"
