"""Merge and GGUF export: standalone, equal to the unmerged adapter within tolerance, never half-written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from adapter_helpers import build_adapter, edit_json

from lora_studio.errors import ConfigError, ModelError
from lora_studio.export import MERGE_INFO_FILE, export_gguf, merge_adapter
from lora_studio.inference import InferenceEngine

PROMPT = [{"role": "user", "content": "Repeat: word3"}]

# Loads a merged folder in a fresh interpreter where `import peft` fails, and prints its logits.
NO_PEFT_SCRIPT = """
import json, sys
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
assert "peft" not in sys.modules, "loading imported peft"
ids = torch.tensor([json.loads(sys.argv[2])])
with torch.no_grad():
    print(json.dumps(model(input_ids=ids).logits[0].tolist()))
"""


def test_merged_folder_equals_the_adapter_and_loads_without_peft(tiny_model_dir, tiny_adapters, tmp_path):
    report = merge_adapter(tiny_adapters["alpha"], tmp_path / "merged")
    out = report.out_dir
    assert report.check.passed and report.check.max_abs_diff < 1e-4 < report.check.adapter_effect
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        MERGE_INFO_FILE,
    } <= {p.name for p in out.iterdir()}
    assert not list(out.glob("adapter_*")) and not list(out.glob("*.bin"))
    assert any("merged vs unmerged adapter" in line and line.endswith("OK") for line in report.lines())

    engine = InferenceEngine(str(tiny_model_dir))
    engine.load_adapter("alpha", tiny_adapters["alpha"])
    ids = engine.encode_chat(PROMPT)
    blocker = tmp_path / "no-peft"  # a `peft` package that fails on import shadows the real one
    (blocker / "peft").mkdir(parents=True)
    (blocker / "peft" / "__init__.py").write_text("raise ImportError('peft is not installed here')\n")
    env = {"PYTHONPATH": str(blocker), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", NO_PEFT_SCRIPT, str(out), json.dumps(ids[0].tolist())],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    merged_logits = torch.tensor(json.loads(done.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(merged_logits, engine.logits(ids, "alpha")[0], rtol=0, atol=1e-4)
    assert not torch.allclose(merged_logits, engine.logits(ids)[0], atol=1e-2)  # and it is not the bare base


def test_merge_folds_the_lora_update_into_full_precision_weights(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    # Trained as QLoRA (4-bit base): the merge must still use the float32 base weights.
    adapter = build_adapter(tiny_model_dir, tmp_path / "qlora", seed=5, recipe_model={"quantization": "4bit"})
    merged = load_file(merge_adapter(adapter, tmp_path / "merged").out_dir / "model.safetensors")
    base = load_file(Path(tiny_model_dir) / "model.safetensors")
    lora = load_file(adapter / "adapter_model.safetensors")
    key = "model.layers.1.self_attn.q_proj"
    a, b = (lora[f"base_model.model.{key}.lora_{x}.weight"] for x in "AB")
    expected = base[f"{key}.weight"] + (8 / 4) * b @ a  # lora_alpha / r = 8 / 4
    torch.testing.assert_close(merged[f"{key}.weight"], expected, rtol=0, atol=1e-6)
    assert merged[f"{key}.weight"].dtype == torch.float32


def test_merged_generation_config_stops_at_the_end_of_turn(tiny_model_dir, tmp_path):
    from adapter_helpers import build_constant_model

    base = build_constant_model(tiny_model_dir, tmp_path / "base", "<|im_end|>", eos_token="<|endoftext|>")
    adapter = build_adapter(base, tmp_path / "adapter", seed=1, scale=0.01)
    out = merge_adapter(adapter, tmp_path / "merged").out_dir
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert eos == [0, 2]  # <|endoftext|> from the config and <|im_end|> from the chat template


def test_a_failed_merge_leaves_nothing_behind(tiny_adapters, tmp_path):
    broken = tmp_path / "adapters" / "broken"
    shutil.copytree(tiny_adapters["alpha"], broken)
    edit_json(broken / "lora_studio.json", base_model_hash="f" * 64)
    with pytest.raises(ModelError, match="trained on base model"):
        merge_adapter(broken, tmp_path / "out" / "merged")
    assert list((tmp_path / "out").iterdir()) == []  # no merged folder, no temporary one


def test_merge_refuses_to_overwrite_unless_forced(tiny_adapters, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists.*--force"):
        merge_adapter(tiny_adapters["beta"], tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    merge_adapter(tiny_adapters["beta"], tmp_path / "taken", overwrite=True)
    assert (tmp_path / "taken" / "model.safetensors").is_file() and not (
        tmp_path / "taken" / "keep.txt"
    ).exists()


@pytest.fixture(scope="module")
def gguf_adapter(gguf_ready_model_dir, tmp_path_factory) -> Path:
    return build_adapter(gguf_ready_model_dir, tmp_path_factory.mktemp("gguf-adapter") / "adapter", seed=3)


@pytest.mark.subprocess  # llama.cpp's converter runs as a process
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_gguf_export_matches_the_adapter_when_read_back(gguf_ready_model_dir, gguf_adapter, tmp_path, quant):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    report = export_gguf(gguf_adapter, tmp_path / "model.gguf", quant=quant)
    assert report.path.is_file() and report.check.passed and len(report.metadata_checks) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]  # no partial file left
    fields = GGUFReader(report.path).fields
    engine = InferenceEngine(str(gguf_ready_model_dir))
    engine.load_adapter("a", gguf_adapter)
    assert fields["tokenizer.chat_template"].contents() == engine.tokenizer.chat_template
    assert fields["tokenizer.ggml.eos_token_id"].contents() in engine.stop_ids

    # Independently of the report: transformers' GGUF loader gives the adapter's logits, not the base's.
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    ids = engine.encode_chat(PROMPT)
    with torch.no_grad():
        got = model(input_ids=ids).logits[0]
    adapter, base = engine.logits(ids, "a")[0], engine.logits(ids)[0]
    error = (got - adapter).abs().max().item()
    assert error <= report.check.tolerance and error < (got - base).abs().max().item() / 4


@pytest.mark.subprocess  # llama.cpp's converter runs as a process
def test_gguf_export_of_a_tokenizer_llama_cpp_does_not_know_is_a_clear_error(tiny_adapters, tmp_path):
    with pytest.raises(ModelError, match="converter failed.*does not know this model's tokenizer"):
        export_gguf(tiny_adapters["alpha"], tmp_path / "model.gguf")
    assert list(tmp_path.iterdir()) == []


def test_gguf_export_checks_its_options(tiny_adapters, tmp_path):
    with pytest.raises(ConfigError, match="--quant"):
        export_gguf(tiny_adapters["alpha"], tmp_path / "model.gguf", quant="q4_k")
    with pytest.raises(ConfigError, match=r"\.gguf"):
        export_gguf(tiny_adapters["alpha"], tmp_path / "model.bin")


def test_cli_merge_prints_the_check(tiny_adapters, tmp_path, capsys):
    from lora_studio.cli import main

    assert main(["merge", str(tiny_adapters["beta"]), "--out", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "merged vs unmerged adapter: max |logit difference|" in out and "OK" in out
    assert (
        main(["merge", str(tiny_adapters["beta"]), "--out", str(tmp_path / "m")]) == 2
    )  # exists: one-line error


@pytest.mark.subprocess  # llama.cpp's converter runs as a process
def test_cli_export_reports_a_converter_failure_in_one_line(tiny_adapters, tmp_path, capsys):
    from lora_studio.cli import main

    args = ["export", str(tiny_adapters["alpha"]), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the loaders' progress bars
    assert err.startswith("error: llama.cpp's GGUF converter failed")
    assert "pre-tokenizer was not recognized" in err
