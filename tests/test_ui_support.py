"""The library pieces the web UI needs: `engine_pool` (engines per base) and `downloads` (archives).

The pool is tested with a stand-in engine (it only manages engines; the real engine has its own
tests) and adapter folders that hold what `read_metadata` checks for.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from adapter_helpers import index_run
from safetensors.torch import save_file

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
    save_file({"w": torch.zeros(2)}, folder / "adapter_model.safetensors")  # a whole (tiny) file
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
        weights = (folder / "adapter_model.safetensors").read_bytes()
        assert z.read("job123-adapter/adapter_model.safetensors") == weights
    built = archive.stat().st_mtime_ns
    assert adapter_archive(folder).stat().st_mtime_ns == built  # unchanged adapter: same archive
    assert not [p for p in archive.parent.iterdir() if p.name.startswith(".")]  # no temp file left


def test_adapter_archive_refuses_an_incomplete_adapter(tmp_path: Path, studio_home: Path):
    folder = adapter_folder(tmp_path, "job9", "base-a")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelError, match="adapter_model.safetensors"):
        adapter_archive(folder)
    assert not (studio_home / "exports" / "job9-adapter.zip").exists()


# --- lists that skip a damaged entry and say so ------------------------------------------------------
def test_adapter_list_skips_a_damaged_adapter_and_says_so(tmp_path: Path):
    from ui.common import trained_adapters

    good = adapter_folder(tmp_path / "runs", "good", "base-a")
    (adapter_folder(tmp_path / "runs", "broken", "base-a") / "lora_studio.json").unlink()
    for name in ("good", "broken"):
        index_run(tmp_path / "runs" / name, name)
    with pytest.warns(
        UserWarning, match=r"Not listed: a damaged adapter .*broken/adapter has no lora_studio.json"
    ):
        listed = trained_adapters()
    assert [a.folder for a in listed] == [good.resolve()]


def test_adapter_list_survives_a_damaged_job_store_and_index_entry(tmp_path: Path, studio_home: Path):
    from ui.common import trained_adapters

    (studio_home / "jobs.sqlite").write_bytes(b"not an SQLite database\n" * 100)  # not read at all
    good = adapter_folder(tmp_path / "runs", "good", "base-a")
    index_run(good.parent, "good")
    (studio_home / "index" / "torn.json").write_text('{"id": "torn", "fol')  # cut short by hand
    assert [a.folder for a in trained_adapters()] == [good.resolve()]


def test_a_deleted_adapter_is_left_out_quietly(tmp_path: Path):
    import shutil
    import warnings

    from ui.common import trained_adapters

    index_run(adapter_folder(tmp_path / "runs", "old", "base-a").parent, "old")
    shutil.rmtree(tmp_path / "runs" / "old" / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trained_adapters() == []


def test_model_list_survives_a_broken_cache_and_says_so(monkeypatch: pytest.MonkeyPatch):
    import lora_studio.models
    from ui.common import base_model_choices

    def broken():
        raise ModelError("the model cache is damaged")

    monkeypatch.setattr(lora_studio.models, "list_models", broken)
    with pytest.warns(UserWarning, match="Not listed: the cached models .*cache is damaged"):
        assert base_model_choices() == ["smollm2-135m-instruct"]


# --- typed paths on a UI reachable from other machines -----------------------------------------------
@pytest.mark.parametrize(
    "host, loopback",
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True), ("0.0.0.0", False),
     ("192.168.1.5", False), ("::", False), ("studio.example.com", False)],
)  # fmt: skip
def test_is_loopback(host: str, loopback: bool):
    from ui.common import is_loopback

    assert is_loopback(host) is loopback


CHAT_ROWS = "".join(
    json.dumps({"prompt": f"question {i}", "completion": f"answer {i}"}) + "\n" for i in range(12)
)


def test_public_ui_reads_typed_data_paths_only_from_its_own_folders(
    tmp_path: Path, studio_home: Path, tiny_model_dir: Path
):
    from ui.common import REPO_ROOT
    from ui.data_tab import check_dataset

    outside = tmp_path / "private.jsonl"
    outside.write_text('{"prompt": "the secret", "completion": 5}\n')
    (studio_home / "uploads").mkdir()
    inside = studio_home / "uploads" / "d.jsonl"
    inside.write_text(CHAT_ROWS)
    (studio_home / "uploads" / "link.jsonl").symlink_to(outside)
    model = studio_home / "models" / "tiny"
    model.parent.mkdir()
    model.symlink_to(tiny_model_dir)  # resolved: the model folder itself is outside, so this is refused too

    def check(path: Path | str, public: bool = True, base: Path | str = tiny_model_dir) -> str:
        return check_dataset(str(path), str(base), "auto", 64, public=public)[0]

    for path in (outside, studio_home / "uploads" / "link.jsonl", studio_home / ".." / outside.name):
        summary = check(path)
        assert "outside the folders this UI reads" in summary and "secret" not in summary, path
    # a model folder outside is refused as well; inside the studio folder it is read
    summary = check(inside)
    assert "the base model" in summary and "outside the folders this UI reads" in summary
    assert "outside" in check(inside, base=model)
    copied = studio_home / "models" / "tiny-copy"
    copied.mkdir()
    for f in tiny_model_dir.iterdir():
        (copied / f.name).write_bytes(f.read_bytes())
    assert "format **prompt_completion**, **11** training rows" in check(inside, base=copied)
    example = REPO_ROOT / "examples" / "json_extraction" / "train.jsonl"
    assert "format **" in check(example, base=copied)
    # on loopback the person at the machine may read any file, as with the CLI
    assert "expected a string, got int" in check(outside, public=False)


def test_public_ui_model_rule_lets_builtin_names_and_hub_ids_pass(tmp_path: Path, monkeypatch):
    from lora_studio.errors import ModelError
    from ui.common import check_model_path

    monkeypatch.chdir(tmp_path)
    for name in ("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M", "gpt2"):
        check_model_path(name, public=True)
    (tmp_path / "org" / "model").mkdir(parents=True)  # a relative folder that looks like a hub id
    for name in ("org/model", "/etc", "~/models/x", "./m", "weights.gguf", "../x.gguf"):
        with pytest.raises(ModelError, match="outside the folders this UI reads"):
            check_model_path(name, public=True)
        check_model_path(name, public=False)


def test_public_ui_refuses_to_train_on_a_typed_outside_path(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    import gradio as gr

    from lora_studio.jobs import JobStore
    from ui.app import build_app

    monkeypatch.setattr(JobStore, "ensure_worker", lambda self, *a, **k: None)
    data = tmp_path / "d.jsonl"
    data.write_text(CHAT_ROWS)
    form = ["t", "smollm2-135m-instruct", str(data), 4, None, "none", 1.0, 5e-3, 64, 4, 4, 2, 1]
    for host, refused in (("0.0.0.0", True), ("127.0.0.1", False)):
        app = build_app(host=host)
        handlers = {d.api_name: d.fn for d in app.fns.values() if d.api_name}
        if refused:
            with pytest.raises(gr.Error, match="outside the folders this UI reads"):
                handlers["start_training"](*form)
            summary, _ = handlers["check_dataset"](str(data), str(tiny_model_dir), "auto", 64)
            assert "outside the folders this UI reads" in summary
        else:
            job_id, _ = handlers["start_training"](*form)
            assert JobStore().get(job_id).state == "queued"
    assert len(JobStore().list()) == 1
