"""The overfitting alarm: hand-made loss curves, then real tiny runs that do and do not overfit."""

from __future__ import annotations

import json

import pytest
from eval_helpers import chat_rows, learnable_tiny_model, noise_pairs, write_jsonl

from lora_studio.cli import main
from lora_studio.evaluation.overfit import detect_overfitting, run_warnings, warning_lines


# --- the rule ----------------------------------------------------------------------------------
def _train(*losses_by_interval):
    """Training losses logged twice between validations every 10 steps: interval k is steps 10k-9..10k."""
    points = []
    for k, (a, b) in enumerate(losses_by_interval, start=1):
        points += [(10 * k - 5, a), (10 * k, b)]
    return points


def test_rising_validation_while_training_falls_raises_the_alarm():
    val = [(0, 3.0), (10, 2.0), (20, 1.5), (30, 1.6), (40, 1.8), (50, 2.0)]
    train = _train((2.5, 2.1), (1.8, 1.6), (1.4, 1.2), (1.0, 0.8), (0.6, 0.4))
    alarm = detect_overfitting(train, val)
    assert alarm is not None
    assert (alarm.started_step, alarm.detected_step, alarm.best_step) == (20, 40, 20)
    assert alarm.val_losses == [1.5, 1.6, 1.8] and alarm.best_val_loss == 1.5
    assert alarm.train_loss_before == pytest.approx((1.8 + 1.6) / 2)  # the interval ending at step 20
    assert alarm.train_loss_after == pytest.approx((1.0 + 0.8) / 2)  # the interval ending at step 40
    assert "overfitting from step 20" in alarm.message and "step 20 (1.5000)" in alarm.message


@pytest.mark.parametrize(
    "val",
    [
        [(0, 3.0), (10, 2.0), (20, 2.1), (30, 1.9), (40, 2.0)],  # never two rises in a row
        [(0, 3.0), (10, 2.0), (20, 2.005), (30, 2.01)],  # two rises of 0.5% in all: noise
        [(0, 3.0), (10, 2.0), (20, 1.5)],  # falling
    ],
)
def test_no_alarm_without_two_real_rises(val):
    train = _train(*[(2.0 - k / 10, 1.9 - k / 10) for k in range(len(val))])
    assert detect_overfitting(train, val) is None


def test_no_alarm_when_training_loss_rises_too():
    val = [(0, 3.0), (10, 2.0), (20, 2.2), (30, 2.5)]
    train = _train((2.0, 2.0), (2.0, 2.0), (2.2, 2.3), (2.5, 2.6))  # diverging, not overfitting
    assert detect_overfitting(train, val) is None


def test_a_rise_from_step_zero_compares_with_the_first_interval():
    val = [(0, 1.0), (10, 1.2), (20, 1.5), (20, 1.0)]  # the repeated last step (load best) is dropped
    alarm = detect_overfitting(_train((1.5, 1.4), (1.0, 0.9)), val)
    assert alarm is not None and alarm.started_step == 0 and alarm.best_step == 0
    assert alarm.train_loss_before == pytest.approx(1.45)
    assert "before any checkpoint" in alarm.message


# --- real runs ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def learnable_dir(tiny_model_dir, tmp_path_factory):
    return learnable_tiny_model(tiny_model_dir, tmp_path_factory.mktemp("learnable"))


def _recipe(model_dir, data, run_dir, epochs: float):
    from lora_studio import Recipe

    return Recipe.from_dict(
        {
            "name": "overfit",
            "model": {"base_model": str(model_dir)},
            "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
            "data": {"train_file": str(data), "max_length": 64, "val_fraction": 0.25},
            "train": {
                "output_dir": str(run_dir),
                "num_train_epochs": epochs,
                "per_device_train_batch_size": 5,
                "eval_every_steps": 6,
                "logging_steps": 3,
                "learning_rate": 1e-2,
                "lr_scheduler_type": "constant",
                "early_stopping_patience": None,
            },
        }
    )


def test_twenty_rows_for_many_epochs_raise_the_alarm(learnable_dir, tmp_path, capsys):
    from lora_studio import train

    data = write_jsonl(tmp_path / "codes.jsonl", chat_rows(noise_pairs(20)))
    result = train(_recipe(learnable_dir, data, tmp_path / "run", epochs=30))
    (warning,) = run_warnings(result.run_dir)
    assert warning["kind"] == "overfitting"
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_loss"] for r in reversed(rows) if "val_loss" in r}  # first value per step
    start, seen = warning["started_step"], warning["detected_step"]
    assert val[seen] > val[start] and start < seen
    assert warning["best_checkpoint"] == f"checkpoint-{warning['best_step']}"
    assert (result.run_dir / "checkpoints" / warning["best_checkpoint"]).is_dir()  # it was kept
    assert result.metrics["best_checkpoint"] == warning["best_checkpoint"]
    assert "overfitting from step" in (result.run_dir / "train.log").read_text()

    # The eval report repeats it.
    test = write_jsonl(tmp_path / "test.jsonl", chat_rows(noise_pairs(2, seed=1, offset=50)))
    assert main(["eval", str(result.run_dir), "--data", str(test), "--no-base", "--max-new-tokens", "2"]) == 0
    assert f"warning: overfitting from step {start}" in capsys.readouterr().out
    assert json.loads((result.run_dir / "eval" / "report.json").read_text())["warnings"] == warning_lines(
        result.run_dir
    )


def test_a_short_run_on_learnable_data_raises_none(learnable_dir, tmp_path):
    from lora_studio import train

    pairs = [(f"Is word{i % 10} even or odd?", "even" if i % 2 == 0 else "odd") for i in range(40)]
    data = write_jsonl(tmp_path / "labels.jsonl", chat_rows(pairs))
    result = train(_recipe(learnable_dir, data, tmp_path / "run", epochs=2))
    status = json.loads((result.run_dir / "status.json").read_text())
    assert status["state"] == "succeeded" and status["warnings"] == []


def test_jobs_show_prints_the_runs_warnings(tiny_recipe, capsys):
    from lora_studio.evaluation.overfit import OverfitAlarm, set_run_warning
    from lora_studio.jobs import JobStore

    store = JobStore()
    job = store.get(store.submit(tiny_recipe))
    job.run_dir.mkdir(parents=True, exist_ok=True)
    (job.run_dir / "status.json").write_text(json.dumps({"state": "succeeded"}))
    alarm = OverfitAlarm(30, 50, [1.0, 1.1, 1.3], 0.9, 0.5, 30, 1.0, "checkpoint-30")
    set_run_warning(job.run_dir, "overfitting", alarm.to_dict())
    assert main(["jobs", "show", job.id]) == 0
    out = capsys.readouterr().out
    assert "warnings" in out and "overfitting from step 30" in out and "checkpoint-30" in out


# --- dedupe --------------------------------------------------------------------------------------
def test_dedupe_drops_exact_duplicates_before_the_split(tiny_model_dir, tmp_path):
    from lora_studio.config import DataSettings
    from lora_studio.data import prepare
    from lora_studio.models import load_tokenizer

    pairs = [(f"Q{i}", f"A{i}") for i in range(10)]
    pairs += [pairs[0], pairs[0], pairs[3], (pairs[5][0], "a different answer")]  # 3 exact repeats
    data = write_jsonl(tmp_path / "dups.jsonl", chat_rows(pairs))
    tokenizer = load_tokenizer(tiny_model_dir)
    kept = prepare(DataSettings(train_file=str(data), val_fraction=0.2, dedupe=True), tokenizer)
    assert kept.report.train_rows + kept.report.val_rows == 11  # 14 rows, 3 exact repeats
    assert kept.report.duplicates == 0
    seen = [e.key() for e in kept.examples]
    assert len(seen) == len(set(seen))
    plain = prepare(DataSettings(train_file=str(data), val_fraction=0.2), tokenizer)
    assert plain.report.train_rows + plain.report.val_rows == 14
    assert plain.fingerprint != kept.fingerprint  # a deduplicated run trained on other rows


def test_dedupe_is_a_recipe_setting(tiny_recipe):
    assert tiny_recipe.data.dedupe is False
    assert tiny_recipe.replace(dedupe=True).data.dedupe is True
