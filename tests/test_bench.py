"""`lora-studio bench`: the report's arithmetic, and one real (tiny) run of TRL and LoRA Studio."""

import json

import pytest

from lora_studio.bench import BenchOptions, far_slower, format_table, run_bench, summarize, time_to_loss
from lora_studio.errors import ConfigError

MACHINE = {"cpu": "test cpu", "cpu_native_bf16": False, "amx": False, "torch_threads": 2, "gpu": None}


def result(tokens_per_s, loss, mem=1000.0, curve=None):
    return {
        "tokens_per_s": tokens_per_s,
        "heldout_loss": loss,
        "peak_mem_mb": mem,
        "compute_dtype": "fp32",
        "utilisation": 0.1,
        "curve": curve or [{"train_s": 10.0, "loss": loss}],
    }


def test_the_faster_trl_setup_is_the_baseline_and_everything_is_a_ratio_to_it():
    results = {
        "trl": result(50.0, 1.0),
        "trl-fp32": result(
            100.0, 1.1, mem=800.0, curve=[{"train_s": 5.0, "loss": 2.0}, {"train_s": 9.0, "loss": 1.1}]
        ),
        "default": result(
            400.0, 1.05, mem=600.0, curve=[{"train_s": 1.0, "loss": 1.5}, {"train_s": 2.0, "loss": 1.09}]
        ),
    }
    report = summarize(results, MACHINE, {"epochs": 2})
    assert report["baseline"]["config"] == "trl-fp32" and "trl-fp32" not in report
    default = report["default"]
    assert default["speedup"] == 4.0 and default["memory_ratio"] == 0.75
    assert default["heldout_loss_ratio"] == pytest.approx(1.05 / 1.1, abs=1e-4)
    assert default["time_to_baseline_loss_s"] == 2.0
    assert report["trl"]["time_to_baseline_loss_s"] == 10.0
    assert default["machine"] == MACHINE
    table = format_table(report)
    assert "trl-fp32 (baseline)" in table and "4.00x" in table and "test cpu" in table


def test_a_probe_rules_out_only_a_setup_at_least_twice_as_slow():
    assert set(far_slower({"trl": 10.0, "trl-fp32": 100.0})) == {"trl"}  # bf16 without native support
    assert far_slower({"trl": 94.0, "trl-fp32": 102.0}) == {}  # a close call: both run in full
    assert "trl-fp32 100" in far_slower({"trl": 50.0, "trl-fp32": 100.0})["trl"]["skipped"]


def test_time_to_loss_is_the_first_evaluation_that_reaches_it():
    curve = [{"train_s": 1.0, "loss": 3.0}, {"train_s": 2.0, "loss": 2.0}, {"train_s": 3.0, "loss": 1.0}]
    assert time_to_loss(curve, 2.5) == 2.0
    assert time_to_loss(curve, 0.5) is None


def test_a_failed_configuration_is_reported_and_a_missing_baseline_is_an_error():
    report = summarize({"trl": result(50.0, 1.0), "default": {"error": "exit code 1"}}, MACHINE, {})
    assert "failed" in format_table(report)
    with pytest.raises(ConfigError, match="no TRL baseline"):
        summarize({"trl": {"error": "exit code 1"}, "default": result(1.0, 1.0)}, MACHINE, {})
    with pytest.raises(ConfigError, match="at least one TRL baseline"):
        run_bench(BenchOptions(configs=("default",)))


def test_bench_runs_trl_and_lora_studio_on_the_same_rows(tiny_model_dir, chat_file, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "lora: {r: 16, lora_alpha: 32, layers: 1}\n"
        "data: {train_file: x.jsonl, val_fraction: 0.1}\n"
        "train: {per_device_train_batch_size: 8, learning_rate: 0.001}\n"
    )
    options = BenchOptions(
        out=tmp_path / "bench",
        model=str(tiny_model_dir),
        data=str(chat_file),
        recipe=str(recipe),
        max_steps=2,
        configs=("trl", "trl-fp32", "default"),
    )
    report = run_bench(options)
    saved = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert set(saved) == {"baseline", "trl", "default", "settings"} or set(saved) == {
        "baseline",
        "trl-fp32",
        "default",
        "settings",
    }
    other = saved.get("trl") or saved["trl-fp32"]  # run in full too, unless a probe found it far slower
    if "skipped" in other:
        assert "tokens/s over steps 2-8" in other["skipped"] and "not run in full" in format_table(report)
    else:
        assert other["tokens_per_s"] <= saved["baseline"]["tokens_per_s"]
    for entry in (saved["baseline"], saved["default"]):
        for key in ("tokens_per_s", "peak_mem_mb", "heldout_loss", "time_to_baseline_loss_s", "utilisation"):
            assert entry[key] is not None and entry[key] >= 0, key
        assert entry["tokens"] > 0 and entry["machine"]["cpu"]
        assert entry["steady_tokens_per_s"] > 0  # what the probe compares: the steps after the first
        assert [p["step"] for p in entry["curve"]][-1] == 2  # the held-out loss after the same 2 steps
    assert saved["default"]["flops_per_token"] > 0  # from sampled steps
    assert saved["default"]["speedup"] == pytest.approx(
        saved["default"]["tokens_per_s"] / saved["baseline"]["tokens_per_s"], rel=1e-2
    )
    assert report["settings"]["max_length"] == 21  # the longest row: nothing truncated in either
    assert (tmp_path / "bench" / "runs" / "default" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_run_that_takes_too_much_memory_is_stopped(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    from tqdm import tqdm

    from lora_studio import bench

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lora: {layers: 1}\ndata: {train_file: x.jsonl}\n")
    options = BenchOptions(
        out=tmp_path, model=str(tiny_model_dir), data=str(chat_file), recipe=str(recipe), max_steps=2
    )
    settings, _ = bench.plan(options)
    monkeypatch.setattr(bench, "MEMORY_GUARD", 1e-9)  # any process is too big
    with tqdm(total=2, disable=True) as bar:
        result = bench.run_child("default", settings, bar)
    assert result["error"].startswith("stopped: it used")
