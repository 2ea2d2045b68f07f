"""The training console (progress.ProgressDisplay) on the tiny model: what a person sees."""

from __future__ import annotations

import io
import warnings

from lora_studio import train
from lora_studio.progress import ProgressDisplay


def test_plain_lines_validation_lines_and_summary(tiny_recipe, capsys):
    stream = io.StringIO()
    display = ProgressDisplay(stream, interactive=False)  # as in a job's log file
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(tiny_recipe, callbacks=[display])
    text = stream.getvalue()
    lines = text.splitlines()

    assert "\r" not in text
    assert lines[0] == f"step 0/6  val loss {result.metrics['base_val_loss']:.4f} (the base, before training)"
    steps = [line for line in lines if " eta " in line]
    assert [line.split()[1] for line in steps] == [f"{n}/6" for n in range(1, 7)]  # logging_steps: 1
    assert all("loss " in line and "val loss " in line and " tok/s" in line for line in steps)
    validations = [line for line in lines[1:] if " eta " not in line]
    assert [line.split()[1] for line in validations] == ["3/6", "6/6"]  # eval_every_steps: 3
    assert all("val loss " in line for line in validations)

    summary = display.summary(result)
    assert summary[0].startswith("trained 6 steps in ")
    assert summary[1].startswith(f"best val loss {result.metrics['best_val_loss']:.4f} (base model: ")
    assert f"adapter: {result.adapter_dir}" in summary
    assert summary[-1] == f"try it:  lora-studio chat {result.adapter_dir} --compare"

    # the Trainer's own output is off for this run: no printed log dicts, no bars on stdout
    assert "{'loss'" not in capsys.readouterr().out
    assert not [w for w in caught if "gradient_checkpointing" in str(w.message)]


def test_on_a_terminal_one_bar_redraws_and_validations_print_above_it(tiny_recipe):
    stream = io.StringIO()
    display = ProgressDisplay(stream, interactive=True)
    train(tiny_recipe, callbacks=[display])
    text = stream.getvalue()
    assert "6/6" in text and "tok/s" in text  # the bar's last state
    assert "\nstep 3/6  val loss " in text.replace("\r", "\n")
    assert " eta " not in text  # the bar shows the ETA itself, no plain step lines


def test_a_classifier_is_pointed_at_classify_and_paths_are_quoted_for_the_shell(tmp_path):
    from lora_studio.training import RunResult

    adapter = tmp_path / "my run" / "adapter"
    result = RunResult(tmp_path, adapter, {"global_step": 4, "train_runtime_s": 2.0, "val_loss": 0.5})
    lines = ProgressDisplay(io.StringIO()).summary(result, task="classify")
    assert lines == [
        "trained 4 steps in 0:02",
        "best val loss 0.5000",
        f"adapter: {adapter}",
        f"try it:  lora-studio classify '{adapter}' \"a text to label\"",
    ]
