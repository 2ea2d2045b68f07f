"""`lora-studio eval` end to end on a tiny trained adapter: the table, the report files, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_studio.cli import main
from lora_studio.evaluation.report import EvalOptions, resolve_adapter, run_eval
from lora_studio.evaluation.scoring import score


def _label_rows(n: int, offset: int = 0) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"Is word{i % 10} even or odd?"},
                {"role": "assistant", "content": "even" if i % 2 == 0 else "odd"},
            ]
        }
        for i in range(offset, offset + n)
    ]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    """A tiny adapter trained for a few steps on an even/odd labelling task, and its test file."""
    from lora_studio import Recipe, train

    root = tmp_path_factory.mktemp("eval-run")
    recipe = Recipe.from_dict(
        {
            "name": "labels",
            "model": {"base_model": str(tiny_model_dir)},
            "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
            "data": {"train_file": str(_write(root / "train.jsonl", _label_rows(40))), "max_length": 64},
            "train": {
                "output_dir": str(root / "run"),
                "max_steps": 6,
                "per_device_train_batch_size": 4,
                "eval_every_steps": 3,
                "logging_steps": 1,
                "learning_rate": 5e-3,
            },
        }
    )
    result = train(recipe)
    return result.run_dir, _write(root / "test.jsonl", _label_rows(8, offset=100))


def test_eval_writes_the_report_beside_the_adapter(trained_run, capsys):
    run_dir, test_file = trained_run
    assert (
        main(["eval", str(run_dir), "--data", str(test_file), "--limit", "6", "--max-new-tokens", "3"]) == 0
    )
    out = capsys.readouterr().out
    assert "Test set: 6 rows of test.jsonl; metric: labels (accuracy)" in out
    assert "base" in out and "adapter" in out and "macro F1" in out and "answer-token loss" in out

    folder = run_dir / "eval"
    assert sorted(p.name for p in folder.iterdir()) == [
        "confusion.png",
        "examples.jsonl",
        "loss_curves.png",
        "report.json",
        "report.md",
    ]
    for png in ("confusion.png", "loss_curves.png"):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((folder / "report.json").read_text())
    rows = [json.loads(line) for line in (folder / "examples.jsonl").read_text().splitlines()]
    assert report["rows"] == len(rows) == 6 and report["metric"] == "labels"
    assert rows[0]["reference"] == "even" and rows[0]["prompt"][-1]["content"] == "Is word0 even or odd?"
    # The report's numbers are the metric applied to the per-example answers it wrote.
    references = [r["reference"] for r in rows]
    for side in ("base", "adapter"):
        again = score([r[side] for r in rows], references, "labels")
        assert report["sides"][side]["score"]["accuracy"] == pytest.approx(again.headline)
        assert report["sides"][side]["score"]["labels"]["confusion"]["counts"] == again.labels.confusion
        assert [r[f"{side}_correct"] for r in rows] == again.correct
        assert report["sides"][side]["perplexity"] > 1.0
    gain = report["sides"]["adapter"]["score"]["accuracy"] - report["sides"]["base"]["score"]["accuracy"]
    assert report["gain"] == pytest.approx(gain)
    markdown = (folder / "report.md").read_text()
    assert "![Loss curves](loss_curves.png)" in markdown and "| accuracy |" in markdown
    assert "can and cannot tell" in markdown


def test_eval_of_the_adapter_folder_without_base_and_a_forced_metric(trained_run, tmp_path):
    run_dir, test_file = trained_run
    assert resolve_adapter(run_dir / "adapter") == (run_dir / "adapter", run_dir)
    report = run_eval(
        EvalOptions(
            str(run_dir / "adapter"), str(test_file), with_base=False, limit=2, metric="exact",
            max_new_tokens=2, out_dir=str(tmp_path / "out"),
        )
    )  # fmt: skip
    assert list(report.sides) == ["adapter"] and report.gain() is None
    assert report.comparison.metric == "exact"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "examples.jsonl",
        "loss_curves.png",
        "report.json",
        "report.md",
    ]  # no labels, so no confusion matrix


def test_eval_bad_input_is_one_clear_line(trained_run, tmp_path, capsys):
    run_dir, _ = trained_run
    assert main(["eval", str(tmp_path), "--data", "x.jsonl"]) == 2
    assert "neither an adapter folder" in capsys.readouterr().err
    text = _write(tmp_path / "text.jsonl", [{"text": "just some text"}])
    assert main(["eval", str(run_dir), "--data", str(text), "--no-base"]) == 2
    assert "text.jsonl, line 1: a plain-text row has no prompt" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--data", str(text), "--limit", "0"]) == 2
    assert "--limit must be a positive number" in capsys.readouterr().err


def test_scratch_baseline_trains_the_same_recipe_on_a_random_copy_of_the_base(trained_run, tmp_path, capsys):
    from safetensors.torch import load_file

    from lora_studio.adapters import read_metadata

    run_dir, test_file = trained_run
    out = tmp_path / "eval"
    args = ["eval", str(run_dir), "--data", str(test_file), "--limit", "4", "--max-new-tokens", "2"]
    assert main([*args, "--baseline", "scratch", "--out", str(out)]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("base"))
    assert header.split() == ["base", "adapter", "scratch"]

    trained, scratch = (
        read_metadata(run_dir / "adapter"),
        read_metadata(tmp_path / "eval-scratch/run/adapter"),
    )
    random_base = tmp_path / "eval-scratch" / "random-base"
    assert scratch["base_model"] == str(random_base)
    assert scratch["metrics"]["global_step"] == trained["metrics"]["global_step"]  # the same budget
    assert scratch["recipe"]["lora"] == trained["recipe"]["lora"]
    assert scratch["recipe"]["data"]["train_file"] == trained["recipe"]["data"]["train_file"]
    original = load_file(next(Path(trained["recipe"]["model"]["base_model"]).glob("*.safetensors")))
    fresh = load_file(next(random_base.glob("*.safetensors")))
    assert original.keys() == fresh.keys()  # same architecture...
    name = "model.layers.0.self_attn.q_proj.weight"
    assert original[name].shape == fresh[name].shape and not original[name].equal(
        fresh[name]
    )  # ...new weights
    report = json.loads((out / "report.json").read_text())
    assert set(report["sides"]) == {"base", "adapter", "scratch"}
    scores = {k: v["score"]["accuracy"] for k, v in report["sides"].items()}
    assert report["gain_over_scratch"] == pytest.approx(scores["adapter"] - scores["scratch"])


@pytest.mark.parametrize("command", ["eval", "fit"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: lora-studio {command}" in out
    assert ("--baseline" in out and "--forgetting" in out) if command == "eval" else "--models" in out
