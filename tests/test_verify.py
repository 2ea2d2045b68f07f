"""`verify`: the same greedy answers unmerged, merged, as GGUF and served, and it catches the usual breakages."""

from __future__ import annotations

import json

import pytest
from adapter_helpers import build_adapter, build_constant_model, edit_json

from lora_studio.export import merge_adapter
from lora_studio.tasks.registry import verify


@pytest.mark.subprocess  # llama.cpp's converter runs as a process
def test_verify_finds_merged_gguf_and_server_consistent(gguf_ready_model_dir, tmp_path, capsys):
    from lora_studio.cli import main

    adapter = build_adapter(gguf_ready_model_dir, tmp_path / "adapter", seed=11)
    assert main(["verify", str(adapter), "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    for label in ["merged model: OK", "GGUF (f16): OK", "server (started for the check): OK"]:
        assert label in out, out
    assert "adapter vs base: different answers on 3 of 3 prompts: OK" in out
    assert out.strip().endswith("result: consistent")


def test_verify_catches_a_merged_folder_with_the_wrong_chat_template(tiny_adapters, tmp_path):
    merged = merge_adapter(tiny_adapters["alpha"], tmp_path / "merged").out_dir
    good = verify(tiny_adapters["alpha"], merged_dir=merged, targets=["merged"], max_new_tokens=8)
    assert good.ok and good.targets[0].status == "match"

    # A common breakage: the folder ships another template (here: no newline after the role).
    template = (merged / "chat_template.jinja").read_text()
    (merged / "chat_template.jinja").write_text(template.replace("role'] + '\n'", "role'] + ' '"))
    assert (merged / "chat_template.jinja").read_text() != template
    report = verify(tiny_adapters["alpha"], merged_dir=merged, targets=["merged"], max_new_tokens=8)
    assert not report.ok and report.targets[0].status == "diverged"
    assert any("renders the prompt differently" in d for d in report.targets[0].details)
    assert "merged model: DIVERGED" in report.lines() and report.lines()[-1] == "result: PROBLEMS FOUND"


def test_verify_catches_a_merged_model_that_lost_its_end_of_turn_token(tiny_model_dir, tmp_path):
    # A base that always ends its turn at once, and whose EOS (<|endoftext|>) is not the end-of-turn token.
    base = build_constant_model(tiny_model_dir, tmp_path / "base", "<|im_end|>", eos_token="<|endoftext|>")
    adapter = build_adapter(base, tmp_path / "adapter", seed=2, scale=0.01)
    merged = merge_adapter(adapter, tmp_path / "merged").out_dir
    assert (
        verify(adapter, merged_dir=merged, targets=["merged"], max_new_tokens=6).targets[0].status == "match"
    )

    edit_json(merged / "generation_config.json", eos_token_id=0)  # what a plain save of the base config does
    target = verify(adapter, merged_dir=merged, targets=["merged"], max_new_tokens=6).targets[0]
    assert target.status == "diverged"
    assert any("goes on after the adapter's answer ended" in d for d in target.details)


def test_verify_catches_a_server_that_ignores_the_adapter(tiny_adapters):
    report = verify(tiny_adapters["beta"], targets=["server"], server_model="base", max_new_tokens=8)
    assert not report.ok and report.targets[0].status == "diverged"
    assert any("first difference" in d for d in report.targets[0].details)


def test_verify_reports_an_adapter_with_no_effect(tiny_model_dir, tmp_path):
    adapter = build_adapter(
        tiny_model_dir, tmp_path / "untrained", seed=0, zero=True
    )  # LoRA B = 0, as initialised
    report = verify(adapter, targets=[], max_new_tokens=8)
    assert not report.adapter_differs and not report.ok
    assert any("the adapter has no effect" in line for line in report.lines())


def test_verify_prompts_come_from_the_training_data(tiny_model_dir, tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": w}]}
        for w in ["one", "two", "three", "four"]
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    adapter = build_adapter(tiny_model_dir, tmp_path / "adapter", seed=4, train_file=str(data))
    report = verify(adapter, targets=[], max_new_tokens=4)
    assert [p[-1]["content"] for p in report.prompts] == ["Say one", "Say two", "Say three"]


@pytest.mark.slow
def test_smollm2_adapter_trained_a_few_steps_chats_stops_and_stays_consistent(tmp_path, use_smollm2_home):
    """The real base: train a few steps, chat (answer ends at <|im_end|>), then merged and served agree."""
    from lora_studio import Recipe, train
    from lora_studio.inference import InferenceEngine

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Capital of {country}?"},
                {"role": "assistant", "content": f"{city}."},
            ]
        }
        for country, city in [("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Peru", "Lima")]
    ]
    data = tmp_path / "capitals.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 2))
    recipe = Recipe.from_dict(
        {
            "name": "smollm2-verify",
            "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "layers": 2},
            "data": {"train_file": str(data), "val_fraction": 0.0, "max_length": 48},
            "train": {
                "output_dir": str(tmp_path / "run"),
                "max_steps": 3,
                "per_device_train_batch_size": 8,
                "learning_rate": 1e-3,
                "logging_steps": 1,
            },
        }
    )
    adapter = train(recipe).adapter_dir

    engine = InferenceEngine.from_adapters([adapter], ["capitals"])
    reply = engine.start(
        [{"role": "user", "content": "What is the capital of France?"}], "capitals", max_new_tokens=48
    )
    assert "Paris" in reply.wait() and reply.finish_reason == "stop"
    ids = engine.encode_chat([{"role": "user", "content": "Capital of Peru?"}])
    assert (engine.logits(ids, "capitals") - engine.logits(ids)).abs().max() > 1e-3  # the adapter acts

    report = verify(adapter, targets=["merged", "server"], max_new_tokens=12)
    assert [t.status for t in report.targets] == ["match", "match"], "\n".join(report.lines())
