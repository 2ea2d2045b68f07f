"""Runs on object storage (storage.py, run_mirror.py, adapter_cache.py) against a real S3 server.

moto's S3 server runs in this process on a free port; pyarrow reaches it through the standard
variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), as it would reach S3 or MinIO. The job
process's side runs here too (`run_job` on a `RunFolderJob` given the URI), so these tests train
the tiny model without Ray; tests/test_cluster.py does the same through a real Ray cluster.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_jobs import make_recipe
from transformers import TrainerCallback

from lora_studio import adapter_cache, cluster, runs, storage
from lora_studio.cli import main
from lora_studio.errors import ConfigError, ModelError
from lora_studio.job_process import run_job

BUCKET = "lora-runs"


@pytest.fixture(scope="module")
def s3_env() -> Iterator[dict[str, str]]:
    """A real S3 server (moto) with one bucket; yields the environment that reaches it."""
    server_module = pytest.importorskip("moto.server", reason="needs moto[server] (the dev extra)")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "test-key",
        "AWS_SECRET_ACCESS_KEY": "test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        storage._filesystems.clear()
        server.stop()


def s3_objects(prefix: str) -> dict[str, int]:
    """Every file under s3://BUCKET/prefix, by key relative to it, with its size (boto3, not our code).

    Keys ending in '/' are the empty folder markers pyarrow keeps: not files."""
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    found = [o for p in pages for o in p.get("Contents", []) if not o["Key"].endswith("/")]
    return {o["Key"][len(prefix) :].lstrip("/"): o["Size"] for o in found}


def test_storage_uris_are_checked_and_map_to_a_face_and_back(s3_env):
    face = storage.face_root(f"s3://{BUCKET}/team/runs/")
    assert face.is_dir() and face.parts[-4:] == ("s3", BUCKET, "team", "runs")
    assert storage.uri_of_face(face / "x-1") == f"s3://{BUCKET}/team/runs/x-1"
    assert storage.uri_of_face(Path("/tmp/somewhere")) is None
    for bad in ("ftp://host/x", "s3://", f"s3://{BUCKET}/x?region=eu"):
        with pytest.raises(ConfigError, match=r"expected a folder every node sees, or s3://BUCKET"):
            storage.check_uri(bad)
    assert cluster._storage(f"s3://{BUCKET}/team") == storage.face_root(f"s3://{BUCKET}/team")


def _submit_here(tmp_path: Path, recipe: dict[str, Any], job_id: str) -> tuple[Path, str]:
    """What RayExecutor.submit does, without Ray: the spec in the bucket, the face linked and indexed."""
    face = storage.face_root(f"s3://{BUCKET}/runs") / f"{recipe['name']}-{job_id}"
    uri = storage.uri_of_face(face)
    recipe = {**recipe, "train": {**recipe["train"], "output_dir": str(face)}}
    storage.Remote(uri).write_bytes(
        cluster.JOB_FILE, json.dumps({"id": job_id, "name": recipe["name"], "recipe": recipe}).encode()
    )
    storage.link(face, uri)
    runs.register(face, job_id, recipe["name"], recipe["model"]["base_model"], "chat", 0.0)
    return face, uri


def _run_on_node(uri: str, job_id: str, attempt: int, resume: bool, *extra: TrainerCallback) -> str:
    """The job process on a node (job_process.main --run-dir URI), in this process."""
    folder = cluster.RunFolderJob(uri, resume)
    run_job(folder, job_id, attempt, [*folder.callbacks(), *extra])
    return folder.outcome


class CancelAt(TrainerCallback):
    """Writes the cancel request into the bucket at a step, as `jobs cancel` would."""

    def __init__(self, uri: str, step: int):
        self.uri, self.step = uri, step

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step == self.step:
            storage.Remote(self.uri).write_bytes(cluster.CANCEL_FILE, b"cancelled")


def test_a_run_on_s3_is_mirrored_cancelled_resumed_and_its_adapter_cached_once(
    s3_env, tiny_model_dir, chat_file, tmp_path, caplog, capsys
):
    recipe = make_recipe(tiny_model_dir, chat_file, name="on-s3", max_steps=40, eval_every_steps=4)
    face, uri = _submit_here(tmp_path, recipe, "a1b2c3d4e5")
    key = uri.split(f"{BUCKET}/", 1)[1]

    assert _run_on_node(uri, "a1b2c3d4e5", 1, False, CancelAt(uri, 3)) == "cancelled"
    run = runs.read_run(face)  # the face, refreshed from the bucket
    assert run.state == "cancelled" and run.storage == uri and 3 < run.step < 40, run
    objects = s3_objects(key)
    assert f"checkpoints/checkpoint-{run.step}/trainer_state.json" in objects
    assert "adapter/lora_studio.json" not in objects and "metrics.jsonl" in objects
    assert (face / "checkpoints" / f"checkpoint-{run.step}" / "trainer_state.json").is_file()  # its marker
    with pytest.raises(ModelError, match="has no finished adapter yet: it is cancelled"):
        runs.adapter_folder("on-s3")
    cancelled_at = run.step
    before = {r["step"]: r for r in runs.metrics_rows(face) if "loss" in r}

    storage.Remote(uri).delete(cluster.CANCEL_FILE)  # what the next submit does
    storage.link(face, uri)
    assert _run_on_node(uri, "a1b2c3d4e5", 2, True) == "succeeded"
    run = runs.read_run(face)
    assert run.state == "succeeded" and run.step == 40 and run.adapter is None  # not downloaded yet
    steps = [r["step"] for r in runs.metrics_rows(face) if "loss" in r]
    assert steps == list(range(1, 41))  # each step logged once
    after = {r["step"]: r for r in runs.metrics_rows(face) if "loss" in r}
    assert all(after[s] == before[s] for s in range(1, cancelled_at + 1))  # kept, not redone
    objects = s3_objects(key)
    assert {"adapter/lora_studio.json", "adapter/adapter_model.safetensors", "config.yaml"} <= set(objects)
    capsys.readouterr()
    assert main(["runs", "list"]) == 0 and uri in capsys.readouterr().out
    assert main(["runs", "show", "on-s3"]) == 0
    shown = capsys.readouterr().out
    assert f"storage   {uri}" in shown and "try it:   lora-studio chat on-s3" in shown
    kept = {n.split("/")[1] for n in objects if n.startswith("checkpoints/")}
    assert "checkpoint-40" in kept and len(kept) <= 3, kept  # the Trainer's deletions mirrored too
    assert all(f"checkpoints/{c}/trainer_state.json" in objects for c in kept)  # each one whole

    caplog.set_level(logging.INFO, logger="lora_studio.adapter_cache")
    folder = runs.adapter_folder("on-s3")
    assert folder == adapter_cache.cache_folder(uri) / "adapter" and run.folder == face
    assert json.loads((folder / "lora_studio.json").read_text())["base_model"] == str(tiny_model_dir)
    assert runs.read_run(face).adapter == folder  # listed once it is here
    assert runs.adapter_folder("on-s3") == folder
    downloads = [r for r in caplog.records if r.getMessage().startswith("downloading the adapter")]
    assert len(downloads) == 1  # the second load came from the cache

    from lora_studio.adapters import load_adapted

    assert load_adapted(folder).metadata["metrics"]["global_step"] == 40  # checked and loaded as any adapter

    weights = folder / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-8] + b"\x00" * 8)  # a damaged cached copy: same size, other bytes
    caplog.clear()
    assert runs.adapter_folder("on-s3") == folder and weights.read_bytes() == good  # fetched again
    assert any("damaged or out of date" in r.getMessage() for r in caplog.records)

    storage.Remote(uri).write_bytes("adapter/README.md", b"changed")  # a changed remote: fetched again
    assert (runs.adapter_folder("on-s3") / "README.md").read_text() == "changed"

    # Every command that takes an adapter by run name gets the cached copy (one door: adapter_folder).
    from lora_studio.cli import build_parser
    from lora_studio.cli.use import served_adapters

    parser = build_parser()
    for argv in (
        ["chat", "on-s3"],
        ["merge", "on-s3", "--out", str(tmp_path / "merged")],
        ["export", "on-s3", "--out", str(tmp_path / "a.gguf")],
        ["verify", "on-s3"],
        ["eval", "on-s3", "--data", str(chat_file)],
    ):
        assert parser.parse_args(argv).adapter == str(folder), argv
    assert served_adapters(["on-s3"]) == (["on-s3"], [str(folder)])  # serve


def test_a_damaged_adapter_in_the_bucket_never_enters_the_cache(s3_env, tiny_adapters, tmp_path):
    face = storage.face_root(f"s3://{BUCKET}/damaged") / "run-1"
    uri = storage.uri_of_face(face)
    storage.link(face, uri)
    remote = storage.Remote(uri)
    source = next(iter(tiny_adapters.values()))
    for path in source.iterdir():
        data = path.read_bytes()
        remote.write_bytes(f"adapter/{path.name}", data[:100] if path.name.endswith(".safetensors") else data)
    with pytest.raises(
        ModelError, match=rf"^s3://{BUCKET}/damaged/run-1/adapter/adapter_model.safetensors is not a readable"
    ):
        adapter_cache.fetch(face)
    assert not (adapter_cache.cache_folder(uri) / "adapter").exists()


def test_an_upload_cut_short_never_leaves_an_adapter_that_looks_finished(
    s3_env, tiny_model_dir, chat_file, tmp_path, monkeypatch
):
    """The final push fails just before the adapter's lora_studio.json: the bucket holds its weights,
    but neither the run's status nor the cache takes it for a finished adapter."""
    face, uri = _submit_here(tmp_path, make_recipe(tiny_model_dir, chat_file, name="cut"), "c0ffee1234")
    upload = storage.Remote.upload

    def cut_short(self: storage.Remote, local: Path, name: str) -> None:
        if name == "adapter/lora_studio.json":
            raise storage.StorageError("connection reset (the test's)")
        upload(self, local, name)

    monkeypatch.setattr(storage.Remote, "upload", cut_short)
    with pytest.raises(storage.StorageError, match="connection reset"):
        _run_on_node(uri, "c0ffee1234", 1, False)
    objects = s3_objects(uri.split(f"{BUCKET}/", 1)[1])
    assert "adapter/adapter_model.safetensors" in objects and "adapter/lora_studio.json" not in objects
    assert runs.read_run(face).state != "succeeded"  # status.json goes up after the adapter
    with pytest.raises(ModelError, match="has no finished adapter yet"):
        runs.adapter_folder("cut")
    with pytest.raises(ModelError, match=r"holds no complete adapter \(no lora_studio.json\)"):
        adapter_cache.fetch(face)
