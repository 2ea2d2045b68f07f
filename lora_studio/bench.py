"""`lora-studio bench`: LoRA Studio's training speed against plain TRL + PEFT, measured in one run.

    report = run_bench(BenchOptions(out=Path("bench-out"), max_steps=20))
    print(format_table(report))        # and bench-out/bench.json

Every configuration (bench_runs.CONFIGS) trains in a process of its own, on the same base, data,
held-out rows, LoRA shape (r=16 on all linear layers) and token budget. The baseline is the faster
of TRL's defaults and TRL with bf16 off, on this machine: a baseline crippled by the wrong dtype
would prove nothing. Figures are ratios to it, measured in the same run, because machines differ
(native bf16 or not, other work running).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .config import DEFAULT_BASE_MODEL, DEFAULT_RECIPE, Recipe
from .errors import ConfigError
from .files import atomic_write_text

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / "examples" / "json_extraction" / "train.jsonl"
MEMORY_GUARD = 0.6  # a run using more than this share of the machine's memory is stopped
PROBE_STEPS = 8  # steps of each TRL setup that decide which one is the baseline
# A probe only rules out a TRL setup this many times slower than the fastest: bf16 without native
# support is ~10x slower, while on an AMX CPU bf16 is slower in its first steps (likely a kernel per
# new batch shape) and a probe of a few steps can rank a close call wrongly. Close calls run in full.
PROBE_MARGIN = 2.0
EVALS_PER_RUN = 4  # held-out evaluations along each run: the curve for "time to the baseline's loss"
# Randomly initialised bases for `--model random:NAME` (speed only: with SmolLM2's tokenizer).
RANDOM_MODELS = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, tie_word_embeddings=True),
    "llama-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, tie_word_embeddings=True),
}  # fmt: skip


# Each configuration: (kind, TRL's bf16 setting or LoRA Studio's recipe overrides, what it is).
CONFIGS: dict[str, tuple[str, Any, str]] = {
    "trl": ("trl", None, "plain TRL + PEFT, TRL's defaults (bf16 autocast, gradient checkpointing)"),
    "trl-fp32": ("trl", False, "plain TRL + PEFT, bf16=False (fp32, gradient checkpointing)"),
    "default": ("studio", {}, "LoRA Studio's default recipe as shipped"),
    "top8": ("studio", {"layers": 8}, "the default recipe adapting the top 8 blocks, not 16"),
    "studio-plain": ("studio", {"speedups": "none"}, "the default recipe on the plain path (no speedups)"),
    "cache": ("studio", {"speedups": ["cache"]}, "plain path + cached frozen features only"),
    "label_only": ("studio", {"speedups": ["label_only"]}, "plain path + label-only logits only"),
    "bf16": ("studio", {"speedups": ["bf16"]}, "plain path + bf16 autocast only"),
}
DEFAULT_CONFIGS = ("trl", "trl-fp32", "default")  # the headline; `all` adds each lever on its own


def config_names(text: str) -> tuple[str, ...]:
    """`a,b,c` or `all` as configuration names (checked by run_bench)."""
    names = tuple(c.strip() for c in text.split(",") if c.strip())
    return tuple(CONFIGS) if names == ("all",) else names


@dataclass(frozen=True)
class RunSettings:
    """What every configuration shares, passed to each child process as JSON."""

    model: str  # a base_model value (resolved and converted by the parent already)
    data: str
    recipe: str  # LoRA Studio's default recipe file
    out: str
    epochs: float
    max_steps: int
    max_length: int
    eval_every_steps: int
    batch_size: int
    val_fraction: float
    seed: int
    threads: int | None  # torch threads in each run; None: torch's default (one per core)


@dataclass(frozen=True)
class BenchOptions:
    out: Path = Path("bench-out")
    model: str = DEFAULT_BASE_MODEL  # a base_model value, or random:NAME / random:config.json
    data: str = str(DEFAULT_DATA)
    recipe: str = str(DEFAULT_RECIPE)  # LoRA Studio's default recipe
    epochs: float = 2.0
    max_steps: int = -1  # a positive number caps every run at that many optimizer steps
    threads: int | None = None  # torch threads per run (fewer than cores when the machine is shared)
    configs: tuple[str, ...] = DEFAULT_CONFIGS
    probe: bool = True  # a far slower TRL setup is not run in full (see probe_baselines)


def run_bench(options: BenchOptions) -> dict[str, Any]:
    """Run every configuration, write `bench.json` to `options.out` and return the report."""
    from tqdm.auto import tqdm

    from .hardware import describe

    unknown = [c for c in options.configs if c not in CONFIGS]
    if unknown or not any(CONFIGS[c][0] == "trl" for c in options.configs):
        raise ConfigError(
            f"configs: got {', '.join(options.configs)}; expected names from {', '.join(CONFIGS)}, "
            "with at least one TRL baseline ('trl' or 'trl-fp32')"
        )
    options.out.mkdir(parents=True, exist_ok=True)
    settings, steps = plan(options)
    trl = [c for c in options.configs if CONFIGS[c][0] == "trl"]
    probing = len(trl) > 1 and options.probe
    runs = len(options.configs) - (len(trl) - 1 if probing else 0)
    results: dict[str, dict[str, Any]] = {}
    with tqdm(
        total=steps * runs + (PROBE_STEPS * len(trl) if probing else 0), desc="bench", unit="step"
    ) as bar:
        if probing:
            results.update(probe_baselines(trl, settings, bar))
            bar.total += steps * (len(trl) - 1 - sum(n in results for n in trl))  # close calls run in full
            bar.refresh()
        for name in (c for c in options.configs if c not in results):
            bar.set_postfix_str(name)
            results[name] = run_child(name, settings, bar)
    machine = describe()
    machine["torch_threads"] = options.threads or "auto"  # auto: each run's share (threads.py), in its row
    report = summarize(results, machine, asdict(settings))
    atomic_write_text(options.out / "bench.json", json.dumps(report, indent=2))
    return report


def probe_baselines(names: list[str], settings: RunSettings, bar: Any) -> dict[str, dict[str, Any]]:
    """Run each TRL setup for a few steps; those far slower are recorded as probed, not run.

    A full run of each costs as much as the rest of the benchmark; a short one tells which dtype
    is far faster on this machine (bf16 is ~10x slower than fp32 on CPUs without native bf16). The
    probe compares the steps after the first: loading and warm-up would swamp a few steps.
    """
    probe = dataclasses.replace(settings, max_steps=PROBE_STEPS, eval_every_steps=10 * PROBE_STEPS)
    speeds = {}
    for name in names:
        bar.set_postfix_str(f"{name} (probe)")
        speeds[name] = run_child(name, probe, bar).get("steady_tokens_per_s", 0.0)
    return far_slower(speeds)


def far_slower(speeds: dict[str, float]) -> dict[str, dict[str, Any]]:
    """The probed setups at least PROBE_MARGIN times slower than the fastest, each with why."""
    fastest = max(speeds, key=lambda n: speeds[n])
    return {
        name: {"skipped": f"{speed:.0f} tokens/s over steps 2-{PROBE_STEPS}, {fastest} {speeds[fastest]:.0f}"}
        for name, speed in speeds.items()
        if speed * PROBE_MARGIN <= speeds[fastest]
    }


def plan(options: BenchOptions) -> tuple[RunSettings, int]:
    """The settings every configuration shares, and the optimizer steps of one run."""
    from .data import encode, load_examples, split
    from .models import load_tokenizer, resolve_base

    model = random_model(options.model, options.out) if options.model.startswith("random:") else options.model
    folder = resolve_base(model).folder  # converts a GGUF once, before anything is timed
    recipe = Recipe.from_yaml(options.recipe)
    val_fraction = recipe.data.val_fraction or 0.1  # held-out rows are needed to compare quality
    _, examples = load_examples(options.data)
    train_rows, val_rows = split(examples, val_fraction, recipe.train.seed)
    if not val_rows:
        raise ConfigError(
            f"{options.data}: {len(examples)} rows are too few to hold some out; give 10 or more"
        )
    tokenizer = load_tokenizer(folder)
    longest = max(encode(e, tokenizer, 1 << 30)["length"] for e in examples)  # nothing is truncated
    batch = recipe.train.per_device_train_batch_size
    steps = (
        options.max_steps if options.max_steps > 0 else math.ceil(len(train_rows) / batch) * options.epochs
    )
    steps = math.ceil(steps)
    settings = RunSettings(
        model=model,
        data=str(Path(options.data).resolve()),
        recipe=str(Path(options.recipe).resolve()),
        out=str(options.out.resolve()),
        epochs=options.epochs,
        max_steps=options.max_steps,
        max_length=longest,
        eval_every_steps=max(1, steps // EVALS_PER_RUN),
        batch_size=batch,
        val_fraction=val_fraction,
        seed=recipe.train.seed,
        threads=options.threads,
    )
    return settings, steps


def run_child(name: str, settings: RunSettings, bar: Any) -> dict[str, Any]:
    """One configuration in its own process; the bar follows its steps. Failures are recorded."""
    out = Path(settings.out)
    progress, log_file = out / f".progress-{name}", out / "logs" / f"{name}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    progress.unlink(missing_ok=True)
    start = bar.n
    cmd = [sys.executable, "-m", "lora_studio.bench_runs", name, json.dumps(asdict(settings))]
    with open(log_file, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=os.environ.copy())
        too_big = None
        while proc.poll() is None:
            time.sleep(0.5)
            done = progress.read_text().split() if progress.is_file() else []
            if done and bar.n != start + int(done[0]):
                bar.n = start + int(done[0])
                bar.refresh()
            if (rss := _rss_bytes(proc.pid)) > MEMORY_GUARD * _total_memory():
                too_big = rss  # a shared machine must not run out of memory for one benchmark
                proc.kill()
        stdout = proc.stdout.read() if proc.stdout else ""
    progress.unlink(missing_ok=True)
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if too_big:
        log.warning("bench: %s stopped at %.1f GB of memory; its log: %s", name, too_big / 2**30, log_file)
        return {"error": f"stopped: it used {too_big / 2**30:.1f} GB of memory; see {log_file}"}
    if proc.returncode or not lines:
        log.warning("bench: %s failed (exit code %s); its log: %s", name, proc.returncode, log_file)
        return {"error": f"exit code {proc.returncode}; see {log_file}"}
    return json.loads(lines[-1].removeprefix("RESULT "))


def _rss_bytes(pid: int) -> int:
    """A process's resident memory (Linux); 0 where /proc is not there."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 1 << 62


def summarize(results: dict[str, dict], machine: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """The report: the baseline (the faster TRL configuration) and every other one, with ratios."""
    trl = [n for n, r in results.items() if CONFIGS[n][0] == "trl" and "tokens_per_s" in r]
    if not trl:
        raise ConfigError(
            "bench: no TRL baseline finished, so there is nothing to compare with; see the logs"
        )
    base_name = max(trl, key=lambda n: results[n]["tokens_per_s"])
    base = results[base_name]
    report: dict[str, Any] = {"baseline": {"config": base_name, **base}}
    report.update({name: {"config": name, **r} for name, r in results.items() if name != base_name})
    for entry in (e for e in report.values() if "tokens_per_s" in e):
        entry.update(
            title=CONFIGS[entry["config"]][2],
            machine=machine,
            time_to_baseline_loss_s=time_to_loss(entry.get("curve", []), base["heldout_loss"]),
            speedup=round(entry["tokens_per_s"] / base["tokens_per_s"], 3),
            memory_ratio=round(entry["peak_mem_mb"] / base["peak_mem_mb"], 3),
            heldout_loss_ratio=_ratio(entry.get("heldout_loss"), base["heldout_loss"]),
        )
    report["settings"] = settings
    return report


def time_to_loss(curve: list[dict[str, float]], target: float | None) -> float | None:
    """Training seconds until a held-out evaluation first reached `target` (None: it never did)."""
    if target is None:
        return None
    return next((round(point["train_s"], 1) for point in curve if point["loss"] <= target), None)


def _ratio(value: float | None, base: float | None) -> float | None:
    return round(value / base, 4) if value is not None and base else None


def format_table(report: dict[str, Any]) -> str:
    """The report as a table with ratios to the baseline first, then the machine."""
    rows = [
        (
            "config",
            "dtype",
            "tokens/s",
            "x base",
            "peak MB",
            "x base",
            "held-out",
            "x base",
            "t->base s",
            "util",
        )
    ]
    for entry in (e for k, e in report.items() if k not in ("settings",)):
        if "tokens_per_s" not in entry:
            continue  # listed under the table
        rows.append(
            (
                entry["config"] + (" (baseline)" if entry is report["baseline"] else ""),
                entry["compute_dtype"],
                f"{entry['tokens_per_s']:.0f}",
                f"{entry['speedup']:.2f}x",
                f"{entry['peak_mem_mb']:.0f}",
                f"{entry['memory_ratio']:.2f}x",
                f"{entry['heldout_loss']:.4f}" if entry["heldout_loss"] is not None else "-",
                f"{entry['heldout_loss_ratio']:.3f}" if entry["heldout_loss_ratio"] is not None else "-",
                f"{entry['time_to_baseline_loss_s']:.0f}"
                if entry["time_to_baseline_loss_s"] is not None
                else "never",
                f"{entry['utilisation']:.1%}" if entry.get("utilisation") is not None else "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines += [
        f"{e['config']}: " + (f"failed: {e['error']}" if "error" in e else f"not run in full: {e['skipped']}")
        for k, e in report.items()
        if k != "settings" and "tokens_per_s" not in e
    ]
    m = report["baseline"]["machine"]
    lines += [
        "",
        f"machine: {m['cpu']}, native bf16: {'yes' if m['cpu_native_bf16'] else 'no'}"
        f"{' (AMX)' if m['amx'] else ''}, {m['torch_threads']} threads of {m.get('available_cores', '?')} cores"
        f"{_threads_used(report)}, GPU: {m['gpu'] or 'none'}, "
        f"load average {m.get('load_average_1m', '?')}",
        f"baseline: {report['baseline']['title']}",
    ]
    return "\n".join(lines)


def _threads_used(report: dict[str, Any]) -> str:
    """How many threads each run ended on, e.g. " (runs ended on 2, 2, 1)", where the report has it."""
    used = [str(e["threads"]) for k, e in report.items() if k != "settings" and "threads" in e]
    return f" (runs ended on {', '.join(used)})" if used else ""


def random_model(spec: str, out: Path) -> str:
    """A randomly initialised base (speed only) saved under `out`, with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from .models import load_tokenizer, resolve_base

    name = spec.removeprefix("random:")
    if name in RANDOM_MODELS:
        shape = RANDOM_MODELS[name]
    elif Path(name).is_file():
        shape = json.loads(Path(name).read_text())
    else:
        raise ConfigError(
            f"--model {spec}: expected random:<one of {', '.join(RANDOM_MODELS)}> or random:<config.json>"
        )
    folder = out / f"random-{Path(name).stem}"
    if not (folder / "config.json").is_file():
        tokenizer = load_tokenizer(resolve_base(DEFAULT_BASE_MODEL).folder)
        config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **shape)
        torch.manual_seed(0)
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        AutoModelForCausalLM.from_config(config).to(dtype).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return str(folder)
