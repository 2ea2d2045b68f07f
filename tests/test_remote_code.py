"""An adapter is data, never code: only the operator's flag lets a base model run its own Python.

The base here is a tiny Llama whose config names an `auto_map` module that writes a sentinel file
when imported, as a malicious download could. Its adapter's `lora_studio.json` asks for
`trust_remote_code`. Every path that loads an adapter's base must refuse with a one-line error
naming the flag, and the sentinel must never appear; with the operator's permission the same
load does import the module, which shows the sentinel would catch it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from adapter_helpers import build_adapter

from lora_studio.errors import ModelError
from lora_studio.remote_code import REMOTE_CODE_ENV, REMOTE_CODE_FLAG

EVIL_MODULE = """
from pathlib import Path
Path({sentinel!r}).write_text("remote code ran")
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    pass
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
"""


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    return tmp_path / "remote-code-ran"


@pytest.fixture
def evil_base(tiny_model_dir: Path, tmp_path: Path, sentinel: Path) -> Path:
    """A copy of the tiny model whose config points transformers at code that leaves a sentinel."""
    base = shutil.copytree(tiny_model_dir, tmp_path / "evil-base")
    (base / "evil.py").write_text(EVIL_MODULE.format(sentinel=str(sentinel)))
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (base / "config.json").write_text(json.dumps(config))
    return base


@pytest.fixture
def asking_adapter(evil_base: Path, tmp_path: Path) -> Path:
    """An adapter on that base whose metadata asks for the base's own code to run."""
    return build_adapter(evil_base, tmp_path / "asking", seed=1, recipe_model={"trust_remote_code": True})


def _loaders(tmp_path: Path) -> dict[str, object]:
    from lora_studio.adapters import load_adapted
    from lora_studio.downloads import merged_archive
    from lora_studio.engine_pool import EnginePool
    from lora_studio.export import export_gguf
    from lora_studio.inference import InferenceEngine
    from lora_studio.tasks.registry import merge as merge_adapter
    from lora_studio.tasks.registry import verify

    return {
        "serve/chat (engine)": lambda a: InferenceEngine.from_adapters([a]),
        "UI chat (engine pool)": lambda a: EnginePool().for_adapter(a),
        "merge": lambda a: merge_adapter(a, tmp_path / "merged"),
        "export": lambda a: export_gguf(a, tmp_path / "out.gguf"),
        "evaluate": load_adapted,
        "verify": lambda a: verify(a, targets=()),
        "download merged": merged_archive,
    }


def test_every_loading_path_refuses_an_adapter_asking_for_remote_code(
    asking_adapter: Path, sentinel: Path, tmp_path: Path
) -> None:
    for path, load in _loaders(tmp_path).items():
        with pytest.raises(ModelError, match=REMOTE_CODE_FLAG) as caught:
            load(asking_adapter)
        assert "\n" not in str(caught.value), path
        assert str(asking_adapter) in str(caught.value), path
    assert not sentinel.exists()
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize(
    "command",
    [
        ["chat", "{a}", "--prompt", "hi"],
        ["merge", "{a}", "--out", "{tmp}/m"],
        ["export", "{a}", "--out", "{tmp}/m.gguf"],
        ["serve", "{a}", "--port", "1"],
        ["verify", "{a}"],
    ],
)
def test_cli_refuses_with_one_line_naming_the_flag(
    command: list[str], asking_adapter: Path, sentinel: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from lora_studio.cli import main

    argv = [part.format(a=asking_adapter, tmp=tmp_path) for part in command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: adapter") and REMOTE_CODE_FLAG in err and "\n" not in err
    assert not sentinel.exists()


def test_a_base_with_auto_map_loads_its_built_in_class_without_running_code(
    evil_base: Path, sentinel: Path, tmp_path: Path
) -> None:
    from lora_studio.inference import InferenceEngine

    adapter = build_adapter(evil_base, tmp_path / "plain", seed=2)
    engine = InferenceEngine.from_adapters([adapter])
    assert type(engine._base).__name__ == "LlamaForCausalLM"
    assert not sentinel.exists()


def test_a_recipe_asking_for_remote_code_is_refused_before_training(
    tiny_recipe, evil_base: Path, sentinel: Path
) -> None:
    from lora_studio import train

    recipe = tiny_recipe.replace(base_model=str(evil_base), trust_remote_code=True)
    with pytest.raises(ModelError, match=REMOTE_CODE_FLAG):
        train(recipe)
    assert not sentinel.exists()
    assert not recipe.output_dir.exists()


def test_the_operators_flag_is_what_lets_the_code_run(
    asking_adapter: Path, sentinel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: with permission the module is imported, so the sentinel does detect it."""
    from lora_studio.inference import InferenceEngine

    monkeypatch.setenv(REMOTE_CODE_ENV, "1")
    try:
        InferenceEngine.from_adapters([asking_adapter])
    except ModelError:
        pass  # the module's classes need not load for this check
    assert sentinel.read_text() == "remote code ran"


def test_a_classifier_asking_for_remote_code_is_refused_too(
    evil_base: Path, sentinel: Path, tmp_path: Path
) -> None:
    from classify_helpers import build_classifier_adapter

    from lora_studio.tasks.classify.model import Classifier

    adapter = build_classifier_adapter(evil_base, tmp_path / "classifier", ["a", "b"])
    meta = json.loads((adapter / "lora_studio.json").read_text())
    meta["recipe"]["model"]["trust_remote_code"] = True
    (adapter / "lora_studio.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=REMOTE_CODE_FLAG):
        Classifier.from_adapter(adapter)
    assert not sentinel.exists()
