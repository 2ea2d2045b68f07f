"""The UI's evaluation: the Adapters tab's Evaluate action and the Train tab's warnings banner."""

from __future__ import annotations

import json

import gradio as gr
import pytest
from eval_helpers import chat_rows, write_jsonl

from lora_studio.evaluation.overfit import OverfitAlarm, set_run_warning
from ui.adapters_tab import evaluate
from ui.eval_views import warnings_banner


def test_evaluate_shows_the_table_and_plots_of_a_listed_adapter(tiny_recipe, tmp_path, monkeypatch):
    from lora_studio import train

    monkeypatch.chdir(tmp_path)  # CLI runs under ./runs are listed on the Adapters tab
    result = train(tiny_recipe.replace(output_dir="runs/tiny"))
    pairs = [(f"Repeat: word{i % 2}", f"word{i % 2}") for i in range(4)]
    test = write_jsonl(tmp_path / "test.jsonl", chat_rows(pairs))

    table, summary, curves, confusion = evaluate(str(result.adapter_dir.resolve()), str(test), 4, True)
    assert list(table.columns) == ["", "base", "adapter"]
    assert table.iloc[0, 0] == "accuracy"  # two labels repeated: a classification
    assert "Adapter gain over base" in summary and "runs/tiny/eval" in summary
    assert curves.size[0] > 100 and confusion.size[0] > 100  # PIL images of the written PNGs
    report = json.loads((tmp_path / "runs/tiny/eval/report.json").read_text())
    assert report["rows"] == 4
    assert table.iloc[0, 2] == f"{report['sides']['adapter']['score']['accuracy']:.1%}"


def test_evaluate_refuses_unlisted_adapters_and_missing_test_files(tmp_path):
    with pytest.raises(gr.Error, match="Pick an adapter first"):
        evaluate(None, "x.jsonl", 5, True)
    with pytest.raises(gr.Error, match="no longer listed"):
        evaluate(str(tmp_path), "x.jsonl", 5, True)


def test_warnings_banner(tmp_path):
    assert warnings_banner(tmp_path) == "" and warnings_banner(None) == ""
    (tmp_path / "status.json").write_text(json.dumps({"state": "running"}))
    alarm = OverfitAlarm(12, 18, [1.0, 1.2, 1.4], 1.0, 0.6, 12, 1.0, "checkpoint-12")
    set_run_warning(tmp_path, "overfitting", alarm.to_dict())
    banner = warnings_banner(tmp_path)
    assert 'role="alert"' in banner and "overfitting from step 12" in banner and "checkpoint-12" in banner
    set_run_warning(tmp_path, "overfitting", None)
    assert warnings_banner(tmp_path) == ""
