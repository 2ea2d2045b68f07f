"""The library pieces the web UI needs: `engine_pool` (engines per base) and `downloads` (archives).

The pool is tested with a stand-in engine (it only manages engines; the real engine has its own
tests) and adapter folders that hold what `read_metadata` checks for.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from lora_studio.config import ModelSettings
from lora_studio.downloads import adapter_archive, exports_dir
from lora_studio.engine_pool import EnginePool
from lora_studio.errors import ModelError


class FakeEngine:
    """Records what the pool asks of an engine."""

    made: list[str] = []

    def __init__(self, settings: ModelSettings):
        self.settings, self.loaded = settings, {}
        self.base_name = Path(settings.base_model).name
        FakeEngine.made.append(settings.base_model)

    def adapter_names(self) -> list[str]:
        return list(self.loaded)

    def load_adapter(self, name: str, folder: Path) -> None:
        assert name not in self.loaded
        self.loaded[name] = folder


def adapter_folder(root: Path, run: str, base: str) -> Path:
    folder = root / run / "adapter"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    (folder / "adapter_config.json").write_text("{}")
    meta = {
        "base_model": base,
        "recipe": {"model": {"base_model": base, "quantization": "none"}},
        "created_at": "2026-01-01T00:00:00Z",
    }
    (folder / "lora_studio.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(autouse=True)
def fresh_fake():
    FakeEngine.made = []


def test_pool_loads_each_base_once_and_each_adapter_once(tmp_path: Path):
    pool = EnginePool(max_bases=2, engine_factory=FakeEngine)
    a1, a2 = adapter_folder(tmp_path, "a1", "base-a"), adapter_folder(tmp_path, "a2", "base-a")
    engine, name = pool.for_adapter(a1)
    assert (engine, name) == pool.for_adapter(a1)  # cached: no second load
    engine2, name2 = pool.for_adapter(a2)
    assert engine2 is engine and name2 != name and set(engine.loaded) == {name, name2}
    assert pool.for_base("base-a") is engine  # the plain base is the same engine, adapters off
    assert FakeEngine.made == ["base-a"]


def test_pool_names_adapters_apart_when_their_folders_share_a_name(tmp_path: Path):
    pool = EnginePool(engine_factory=FakeEngine)
    first = adapter_folder(tmp_path / "x", "run", "base-a")
    second = adapter_folder(tmp_path / "y", "run", "base-a")  # both would be called "run"
    names = {pool.for_adapter(first)[1], pool.for_adapter(second)[1]}
    assert names == {"run", "run-2"}


def test_pool_keeps_at_most_max_bases_dropping_the_least_recently_used(tmp_path: Path):
    pool = EnginePool(max_bases=2, engine_factory=FakeEngine)
    a = pool.for_base("base-a")
    pool.for_base("base-b")
    assert pool.for_base("base-a") is a  # used again: now b is the oldest
    pool.for_base("base-c")
    assert [s.base_model for s in pool.loaded_bases()] == ["base-a", "base-c"]
    pool.for_base("base-b")  # dropped, so loaded again
    assert FakeEngine.made == ["base-a", "base-b", "base-c", "base-b"]


def test_pool_refuses_an_incomplete_adapter_folder(tmp_path: Path):
    folder = adapter_folder(tmp_path, "half", "base-a")
    (folder / "lora_studio.json").unlink()
    with pytest.raises(ModelError, match="lora_studio.json"):
        EnginePool(engine_factory=FakeEngine).for_adapter(folder)
    assert FakeEngine.made == []  # nothing loaded for it


def test_adapter_archive_zips_the_folder_under_exports_and_reuses_it(tmp_path: Path, studio_home: Path):
    folder = adapter_folder(tmp_path, "job123", "base-a")
    archive = adapter_archive(folder)
    assert archive.parent == exports_dir() == studio_home / "exports"
    with zipfile.ZipFile(archive) as z:
        assert sorted(z.namelist()) == [
            f"job123-adapter/{n}"
            for n in ("adapter_config.json", "adapter_model.safetensors", "lora_studio.json")
        ]
        assert z.read("job123-adapter/adapter_model.safetensors") == b"weights"
    built = archive.stat().st_mtime_ns
    assert adapter_archive(folder).stat().st_mtime_ns == built  # unchanged adapter: same archive
    assert not [p for p in archive.parent.iterdir() if p.name.startswith(".")]  # no temp file left


def test_adapter_archive_refuses_an_incomplete_adapter(tmp_path: Path, studio_home: Path):
    folder = adapter_folder(tmp_path, "job9", "base-a")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelError, match="adapter_model.safetensors"):
        adapter_archive(folder)
    assert not (studio_home / "exports" / "job9-adapter.zip").exists()
