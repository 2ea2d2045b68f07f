"""`make demo`, a newcomer's first command: its console is `lora-studio train`'s, then the eval table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess  # the demo script as `make demo` runs it: a real process

DEMO = Path(__file__).resolve().parents[1] / "examples" / "json_extraction" / "demo.py"


def test_demo_shows_the_training_console_then_the_table(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    overrides = [f"base_model={tiny_model_dir}", "max_steps=2", "eval_every_steps=2", "layers=1"]
    proc = subprocess.run(
        [sys.executable, str(DEMO), *[f"--set={o}" for o in [*overrides, f"output_dir={run}"]]],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ.copy(),
    )
    assert proc.returncode in (0, 1), proc.stderr[-2000:]  # 1: two steps of a random model gain nothing
    # the display (not a terminal here): a line per validation, and the summary
    assert "step 0/2  val loss " in proc.stderr and "step 2/2  val loss " in proc.stderr
    assert (
        "best val loss " in proc.stdout
        and f"try it:  lora-studio chat {run / 'adapter'} --compare" in proc.stdout
    )
    # then the evaluation: the table and the samples
    assert "whole-record accuracy" in proc.stdout and "sample 1: " in proc.stdout
    # none of the Trainer's raw dicts or tqdm bars, no timestamps before log lines
    output = proc.stdout + proc.stderr
    assert "{'loss'" not in output and "{'eval_loss'" not in output and "it/s]" not in output, output[-3000:]
    assert "\r" not in output
    assert any(line.startswith("demo 1/2: training ") for line in proc.stderr.splitlines())  # no timestamps
