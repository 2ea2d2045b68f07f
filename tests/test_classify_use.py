"""Using a trained classifier: load, merge, verify, the CLI and `/v1/classify` over real HTTP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from classify_helpers import classify_recipe, toy_rows, write_jsonl

from lora_studio import train
from lora_studio.cli import main
from lora_studio.errors import DataError, ModelError
from lora_studio.export import export_gguf
from lora_studio.inference import InferenceEngine
from lora_studio.serve.local import free_port
from lora_studio.tasks.classify.model import Classifier
from lora_studio.tasks.registry import merge as merge_adapter
from lora_studio.tasks.registry import verify

LABELS = ["city", "fox", "greet"]
TEXTS = ["hello world after", "Paris capital city", "quick brown fox jumps"]


def lora_studio_command() -> list[str]:
    script = Path(sys.executable).parent / "lora-studio"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lora_studio.cli"]


@pytest.fixture(scope="module")
def classifier_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A toy classifier trained once for this module (its own studio home)."""
    root = tmp_path_factory.mktemp("classifier")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_STUDIO_HOME", str(root / "home"))
        data = write_jsonl(root / "toy.jsonl", toy_rows(40))
        recipe = classify_recipe(tiny_model_dir, data, root / "run", num_train_epochs=2)
        return train(recipe).adapter_dir


def test_label_map_survives_save_and_load(classifier_dir: Path):
    classifier = Classifier.from_adapter(classifier_dir)
    assert classifier.labels == LABELS
    predictions = classifier.predict(TEXTS)
    assert [p.label for p in predictions] == ["greet", "city", "fox"]
    for p in predictions:
        assert list(p.probabilities) == LABELS and sum(p.probabilities.values()) == pytest.approx(1.0)
    # Batching and padding change nothing: one at a time gives the same probabilities.
    alone = torch.cat([classifier.probabilities([t]) for t in TEXTS])
    assert torch.allclose(alone, classifier.probabilities(TEXTS, batch_size=3), atol=1e-5)


def test_precision_auto_reads_in_bf16_only_where_it_pays(
    classifier_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    import lora_studio.fast_path as fast_path

    exact = Classifier.from_adapter(classifier_dir)
    assert exact.precision == "fp32"  # the tiny model is too narrow for bf16 to pay (or no native bf16)
    # bf16 autocast: the same labels, probabilities within the tolerance merge allows a bf16 model
    bf16 = exact.with_precision("bf16")
    assert (bf16.precision, bf16.labels) == ("bf16", exact.labels)
    got, want = bf16.probabilities(TEXTS), exact.probabilities(TEXTS)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert torch.allclose(got, want, atol=5e-2) and not torch.equal(got, want)
    # the rule training's bf16 lever uses: a CPU with native bf16 and a wide enough model
    monkeypatch.setattr(fast_path, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(fast_path, "MIN_BF16_WIDTH", 16)
    assert exact.with_precision("auto").precision == "bf16"
    assert exact.with_precision("fp32").precision == "fp32"


def test_merge_writes_a_plain_transformers_classifier_with_the_label_map(
    classifier_dir: Path, tmp_path: Path
):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    report = merge_adapter(classifier_dir, tmp_path / "merged")
    assert report.check.passed and report.labels == tuple(LABELS)
    assert "AutoModelForSequenceClassification" in "\n".join(report.lines())
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert model.config.id2label == dict(enumerate(LABELS))
    assert model.config.label2id == {label: i for i, label in enumerate(LABELS)}
    with torch.no_grad():
        merged = torch.softmax(model(**tokenizer(TEXTS[0], return_tensors="pt")).logits, -1)[0]
    adapter = Classifier.from_adapter(classifier_dir).probabilities(TEXTS[:1])[0]
    assert torch.allclose(merged, adapter, atol=1e-4)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folder left
    with pytest.raises(ModelError, match="is a .classify. adapter .* exported to GGUF"):
        export_gguf(classifier_dir, tmp_path / "x.gguf")


def test_verify_compares_probabilities_of_adapter_merged_and_server(classifier_dir: Path):
    report = verify(classifier_dir)
    assert report.ok, "\n".join(report.lines())
    whats = [c.what for c in report.checks]
    assert any(w.startswith("merged model") for w in whats) and any(w.startswith("server") for w in whats)
    assert all(c.same_label == 1.0 for c in report.checks)
    assert "GGUF: not checked (GGUF export is for chat models, not classifiers)" in report.lines()


def test_chat_engine_refuses_a_classifier(tiny_model_dir: Path, classifier_dir: Path):
    engine = InferenceEngine(str(tiny_model_dir))
    with pytest.raises(
        ModelError, match="is a .classify. adapter .* it does not write text, so it cannot chat"
    ):
        engine.load_adapter("toy", classifier_dir)


# --- the CLI ---------------------------------------------------------------------------------------
def test_cli_classifies_texts_and_files(classifier_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    assert main(["classify", str(classifier_dir), TEXTS[1]]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("city\t") and sorted(line.split()[0] for line in out[1:4]) == LABELS

    rows = [{"text": t, "label": label} for t, label in zip(TEXTS, ["greet", "city", "fox"], strict=True)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    args = ["classify", str(classifier_dir), "--file", str(src), "--out", str(tmp_path / "out.jsonl")]
    assert main([*args, "--scores-dir", str(tmp_path / "scores")]) == 0
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [w["predicted"] for w in written] == ["greet", "city", "fox"]
    assert all(set(w["probabilities"]) == set(LABELS) and w["text"] for w in written)
    assert "accuracy 100.0%" in capsys.readouterr().out
    assert (tmp_path / "scores" / "confusion.png").is_file()

    write_jsonl(src, [{"text": "hello", "label": "alien"}])
    assert main(args) == 2
    assert "'alien' are not ones the classifier was trained on" in capsys.readouterr().err


def test_cli_scores_a_linear_probe_beside_the_adapter(
    classifier_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    """`--baseline probe`: a probe on the frozen base, fitted on the adapter's own training rows,
    scored on the same file; the line says what fine-tuning added."""
    rows = toy_rows(10, seed=7)  # 30 fresh rows of the same three labels
    src = write_jsonl(tmp_path / "test.jsonl", rows)
    scores = tmp_path / "scores"
    args = ["classify", str(classifier_dir), "--file", str(src), "--scores-dir", str(scores)]
    assert main([*args, "--baseline", "probe"]) == 0
    out = capsys.readouterr().out
    probe = json.loads((scores / "probe_scores.json").read_text())
    trained = json.loads((scores / "scores.json").read_text())
    assert probe["rows"] == trained["rows"] == 30 and probe["labels"] == LABELS
    assert f"a linear probe already gets {probe['accuracy']:.1%}; " in out
    gain = (trained["accuracy"] - probe["accuracy"]) * 100
    assert f"{gain:+.1f} points" in out or f"better by {-gain:.1f} points" in out

    assert main(["classify", str(classifier_dir), TEXTS[0], "--baseline", "probe"]) == 2
    assert "--baseline probe goes with a labelled --file" in capsys.readouterr().err

    # An adapter from another machine: its training rows are not here, said in one line.
    moved = tmp_path / "moved"
    shutil.copytree(classifier_dir, moved)
    meta = json.loads((moved / "lora_studio.json").read_text())
    meta["recipe"]["data"]["train_file"] = str(tmp_path / "elsewhere" / "train.jsonl")
    (moved / "lora_studio.json").write_text(json.dumps(meta))
    assert (
        main(["classify", str(moved), "--file", str(src), "--scores-dir", str(scores), "--baseline", "probe"])
        == 2
    )
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the classifier's own loading bar
    assert last.startswith("error: --baseline probe is fitted on the adapter's own training rows")
    assert "not on this machine" in last


def test_eval_scores_a_classifier_on_a_test_file_with_the_probe(
    classifier_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    """`lora-studio eval CLASSIFIER --data TEST --baseline probe` is the classifier's eval: its scores
    and the probe's, written to --out; the chat-only options are refused by name."""
    src = write_jsonl(tmp_path / "test.jsonl", toy_rows(10, seed=7))
    out = tmp_path / "eval"
    assert (
        main(["eval", str(classifier_dir), "--data", str(src), "--out", str(out), "--baseline", "probe"]) == 0
    )
    printed = capsys.readouterr().out
    trained = json.loads((out / "scores.json").read_text())
    probe = json.loads((out / "probe_scores.json").read_text())
    assert trained["rows"] == probe["rows"] == 30
    assert f"accuracy {trained['accuracy']:.1%}, macro F1" in printed
    assert f"a linear probe already gets {probe['accuracy']:.1%}" in printed
    assert (
        main(["eval", str(classifier_dir), "--data", str(src), "--forgetting", "--baseline", "scratch"]) == 2
    )
    assert "--baseline scratch, --forgetting: not for a classifier" in capsys.readouterr().err


def test_cli_needs_texts_or_a_file(classifier_dir: Path, capsys: pytest.CaptureFixture):
    assert main(["classify", str(classifier_dir)]) == 2
    assert "give texts to classify" in capsys.readouterr().err


# --- the server, as a real process -----------------------------------------------------------------
@pytest.fixture(scope="module")
def server(
    classifier_dir: Path, tiny_adapters: dict, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """`lora-studio serve` with a chat adapter (alpha) and the classifier (toy)."""
    home, port = tmp_path_factory.mktemp("classify-serve-home"), free_port()
    log = home / "server.log"
    env = {**os.environ, "LORA_STUDIO_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    cmd = [*lora_studio_command(), "serve", f"alpha={tiny_adapters['alpha']}", f"toy={classifier_dir}"]
    with open(log, "w") as out:
        proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, f"the server exited: {log.read_text()[-3000:]}"
            assert time.time() < deadline, f"the server did not start: {log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=15)


@pytest.mark.subprocess
def test_v1_classify_answers_labels_and_probabilities(server: str, classifier_dir: Path):
    expected = Classifier.from_adapter(classifier_dir).predict(TEXTS)
    response = httpx.post(f"{server}/v1/classify", json={"model": "toy", "input": TEXTS}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "toy" and body["labels"] == LABELS and body["precision"] == "fp32"
    for row, want, text in zip(body["data"], expected, TEXTS, strict=True):
        assert (row["input"], row["label"]) == (text, want.label)
        assert row["probabilities"] == pytest.approx(want.probabilities, abs=1e-5)
    one = httpx.post(f"{server}/v1/classify", json={"model": "toy", "input": TEXTS[1]}, timeout=60).json()
    assert [row["label"] for row in one["data"]] == ["city"]


@pytest.mark.subprocess
def test_v1_classify_refuses_bad_requests(server: str):
    cases = [
        ({"model": "toy", "input": []}, 400, "input"),
        ({"model": "toy", "input": ["ok", ""]}, 400, "input[1]"),
        ({"model": "toy"}, 400, "input"),
        ({"model": "alpha", "input": "hi"}, 404, "not a classifier served here"),
    ]
    for body, status, words in cases:
        response = httpx.post(f"{server}/v1/classify", json=body, timeout=30)
        assert response.status_code == status, (body, response.text)
        assert words in response.json()["error"]["message"]


@pytest.mark.subprocess
def test_chat_endpoint_refuses_a_classifier_but_still_chats(server: str):
    body = {"model": "toy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    response = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "model_is_classifier" and "POST /v1/classify" in error["message"]
    ok = httpx.post(f"{server}/v1/chat/completions", json={**body, "model": "alpha"}, timeout=60)
    assert ok.status_code == 200, ok.text


def test_a_chat_request_file_is_not_classified(classifier_dir: Path, tmp_path: Path):
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match="chat.jsonl, line 1: expected a non-empty text in the field 'text'"):
        from lora_studio.tasks.classify.files import classify_file

        classify_file(Classifier.from_adapter(classifier_dir), src, tmp_path / "o.csv")


def test_a_server_of_classifiers_only_checks_the_key_and_refuses_chat(classifier_dir: Path):
    from lora_studio.tasks.classify.export import _local_server

    with _local_server({"toy": Classifier.from_adapter(classifier_dir)}, "k3y") as url:
        body = {"input": "Paris capital"}  # one classifier served: `model` may be left out
        assert httpx.post(f"{url}/v1/classify", json=body, timeout=30).status_code == 401
        wrong = httpx.post(
            f"{url}/v1/classify", json=body, headers={"Authorization": "Bearer nope"}, timeout=30
        )
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        key = {"Authorization": "Bearer k3y"}
        ok = httpx.post(f"{url}/v1/classify", json=body, headers=key, timeout=30)
        assert ok.status_code == 200 and ok.json()["data"][0]["label"] == "city"
        models = httpx.get(f"{url}/v1/models", headers=key, timeout=30).json()
        assert [m["id"] for m in models["data"]] == ["toy"]
        chat = {"model": "toy", "messages": [{"role": "user", "content": "hi"}]}
        refused = httpx.post(f"{url}/v1/chat/completions", json=chat, headers=key, timeout=30)
        assert refused.status_code == 400 and "POST /v1/classify" in refused.json()["error"]["message"]
