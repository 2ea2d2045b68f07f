"""The feature cache proves what it serves: damaged caches are rebuilt, the key covers what changes
the features, and two runs filling one cache never see each other's unfinished file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_fast_path import fake_lower, lora_model, varied_file  # noqa: F401 (fixtures)

from lora_studio import fast_path as fp
from lora_studio import feature_cache, train

ROWS = [[1, 2, 3], [4, 5], [6]]


def _noise(folder: Path) -> None:
    values = folder / "values.bin"
    values.write_bytes(np.random.default_rng(0).integers(0, 255, values.stat().st_size, np.uint8).tobytes())


def _zeros(folder: Path) -> None:
    values = folder / "values.bin"
    values.write_bytes(bytes(values.stat().st_size))


def _nan_with_a_matching_checksum(folder: Path) -> None:
    """Non-finite values that pass the checksum: only the finiteness check can catch them."""
    meta = json.loads((folder / "meta.json").read_text())
    values = folder / "values.bin"
    values.write_bytes(np.full(values.stat().st_size // 2, np.nan, np.float16).tobytes())
    meta["sha256"] = feature_cache._checksum(values, torch.float16)[0]
    (folder / "meta.json").write_text(json.dumps(meta))


def _truncated(folder: Path) -> None:
    values = folder / "values.bin"
    values.write_bytes(values.read_bytes()[:-3])


def _bad_meta(folder: Path) -> None:
    (folder / "meta.json").write_text('{"offsets": [0, 3')


def _meta_without_checksum(folder: Path) -> None:  # a cache written before checksums
    meta = json.loads((folder / "meta.json").read_text())
    del meta["sha256"]
    (folder / "meta.json").write_text(json.dumps(meta))


DAMAGE = [_noise, _zeros, _nan_with_a_matching_checksum, _truncated, _bad_meta, _meta_without_checksum]


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__.strip("_"))
def test_a_damaged_cache_is_logged_in_one_line_and_rebuilt(damage, caplog) -> None:
    calls: list[int] = []
    key = feature_cache.cache_key(ROWS, base="b", lower_blocks=2)
    first = feature_cache.FeatureCache(key, ROWS, 4, fake_lower(calls), limit_bytes=0)
    want = [r.clone() for r in first.rows([0, 1, 2])]
    damage(first.folder)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lora_studio.feature_cache"):
        again = feature_cache.FeatureCache(key, ROWS, 4, fake_lower(calls), limit_bytes=0)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1, lines
    line = lines[0]
    assert "damaged" in line and "rebuilding" in line and "\n" not in line
    assert not again.filled.any()  # nothing served from the damaged file
    got = again.rows([0, 1, 2])
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    third = feature_cache.FeatureCache(key, ROWS, 4, fake_lower(calls), limit_bytes=0)
    assert third.filled.all() and len(calls) == 2  # the rebuilt cache is whole and kept


def test_two_runs_filling_one_cache_never_see_each_others_unfinished_file() -> None:
    calls: list[int] = []
    key = feature_cache.cache_key(ROWS, base="b", lower_blocks=2)
    a = feature_cache.FeatureCache(key, ROWS, 4, fake_lower(calls), limit_bytes=0)
    a.rows([0, 1])
    b = feature_cache.FeatureCache(key, ROWS, 4, fake_lower(calls), limit_bytes=0)
    assert not b.filled.any() and not a.folder.exists()  # a's half-filled file is its own
    b.rows([0, 1, 2])  # b publishes first
    a.rows([2])  # a finishes too: the published cache stays b's, whole
    c = feature_cache.FeatureCache(key, ROWS, 4, fake_lower(calls), limit_bytes=0)
    assert c.filled.all()
    assert [r.tolist() for r in c.rows([0, 1, 2])] == [r.tolist() for r in a.rows([0, 1, 2])]
    a.close()
    assert not [p for p in c.folder.parent.iterdir() if p.name.startswith(".")]  # no unfinished file left


def test_the_key_covers_the_weights_dtype_device_and_autocast(lora_model, monkeypatch) -> None:  # noqa: F811
    keys = []
    monkeypatch.setattr(fp, "FeatureCache", lambda key, *a, **k: keys.append(key))
    model, tokenizer, data = lora_model
    for dtype, bf16 in ((torch.float32, False), (torch.bfloat16, False), (torch.float32, True)):
        fast = fp.FastPath(
            model.to(dtype),
            fp.Levers(cache=True, bf16=bf16),
            tokenizer.pad_token_id,
            data.train,
            len(data.train),
        )
        fast.use_cache(1, "hash")
        fast.restore()
    assert len(set(keys)) == 3
    model.to(torch.float32)


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def test_a_run_on_a_damaged_cache_trains_the_fresh_runs_adapter(
    tiny_recipe, tmp_path, studio_home, monkeypatch, caplog
) -> None:
    monkeypatch.setattr(feature_cache, "MEMORY_LIMIT_BYTES", 0)  # every cache goes to disk
    # 5 steps of 8 rows: every one of the 36 training rows (and the validation rows) comes up once.
    recipe = tiny_recipe.replace(layers=1, speedups=["cache"], max_steps=5, per_device_train_batch_size=8)
    fresh = train(recipe.replace(output_dir=str(tmp_path / "fresh")))
    (folder,) = [p for p in (studio_home / "feature-cache").iterdir() if not p.name.startswith(".")]
    want = _adapter(fresh.run_dir)
    for i, damage in enumerate((_noise, _nan_with_a_matching_checksum)):  # the silent cases
        damage(folder)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lora_studio.feature_cache"):
            again = train(recipe.replace(output_dir=str(tmp_path / f"again{i}")))
        assert "rebuilding" in caplog.text, damage.__name__
        got = _adapter(again.run_dir)
        assert all(torch.equal(got[k], want[k]) for k in want), damage.__name__
