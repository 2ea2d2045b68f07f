"""Recipes: defaults, validation that reports every problem at once, overrides, YAML round trip."""

import dataclasses
import math
import re
import typing
from pathlib import Path

import pytest

from lora_studio import ConfigError, Recipe
from lora_studio.config import SECTIONS, Range, apply_overrides, field_help


def test_defaults_and_plain_name_overrides():
    recipe = Recipe.from_dict({"data": {"train_file": "d.jsonl"}})
    assert recipe.model.base_model == "smollm2-135m-instruct"
    assert recipe.lora.target_modules == "all-linear"
    changed = recipe.replace(max_steps=3, r=8, output_dir="/tmp/x")
    assert (changed.train.max_steps, changed.lora.r, changed.output_dir) == (3, 8, Path("/tmp/x"))


def test_replace_sets_none_and_checks_the_copy_again():
    recipe = Recipe.from_dict({"name": "a", "data": {"train_file": "d.jsonl"}, "lora": {"layers": 2}})
    plain = recipe.replace(layers=None, name="b", learning_rate=1e-3)  # None used to be read as "None"
    assert (plain.lora.layers, plain.name, plain.train.learning_rate, plain.lora.r) == (None, "b", 1e-3, 16)
    assert recipe.lora.layers == 2  # the original is unchanged
    with pytest.raises(ConfigError, match="layers: must be at least 1"):
        recipe.replace(layers=0)
    with pytest.raises(ConfigError, match="max_steps: expected an integer"):
        recipe.replace(max_steps="ten")
    with pytest.raises(ConfigError, match="unknown setting 'layer'; did you mean 'layers'"):
        recipe.replace(layer=None)


def test_load_takes_a_file_a_mapping_or_a_recipe_with_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data:\n  train_file: d.jsonl\n")
    from_file = Recipe.load(path, ["max_steps=4"])
    assert (from_file.name, from_file.train.max_steps) == ("r", 4)
    assert Recipe.load(from_file.to_dict(), ["r=4"]).lora.r == 4
    assert Recipe.load(from_file) is from_file
    assert Recipe.load(from_file, ["layers=1"]).lora.layers == 1


def test_all_problems_are_reported_together_with_suggestions():
    with pytest.raises(ConfigError) as err:
        Recipe.from_dict(
            {
                "data": {"train_fil": "x"},
                "train": {"max_steps": "ten", "lerning_rate": 1},
                "lora": {"r": -1},
                "modle": {},
            }
        )
    text = str(err.value)
    for expected in [
        "'data.train_fil'; did you mean 'data.train_file'",
        "'train.lerning_rate'; did you mean 'train.learning_rate'",
        "max_steps: expected an integer, got 'ten'",
        "r: must be at least 1 and at most 16384, got -1",
        "unknown top-level key 'modle'; did you mean 'model'",
        "train_file: required",
    ]:
        assert expected in text


def test_literal_choices_are_checked():
    with pytest.raises(ConfigError, match="quantization: expected one of 'none', '8bit', '4bit', got '3bit'"):
        Recipe.from_dict({"model": {"quantization": "3bit"}, "data": {"train_file": "d"}})


def test_overrides_parse_yaml_values_and_accept_dotted_names():
    raw = apply_overrides(
        {}, ["max_steps=3", "train.learning_rate=0.001", "target_modules=[q_proj, v_proj]", "val_file="]
    )
    assert raw["train"] == {"max_steps": 3, "learning_rate": 0.001}
    assert raw["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert raw["data"]["val_file"] is None


def test_exponent_numbers_yaml_reads_as_text_are_accepted():
    recipe = Recipe.from_dict(apply_overrides({"data": {"train_file": "d"}}, ["learning_rate=1e-4"]))
    assert recipe.train.learning_rate == 1e-4


def test_bad_override_names_the_closest_setting():
    with pytest.raises(ConfigError, match="unknown setting 'max_step'; did you mean 'max_steps'"):
        apply_overrides({}, ["max_step=3"])
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["max_steps"])


def test_yaml_round_trip_and_relative_data_paths(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data/train.jsonl").write_text("{}\n")
    path = tmp_path / "r.yaml"
    path.write_text("data:\n  train_file: data/train.jsonl\ntrain:\n  max_steps: 5\n")
    recipe = Recipe.from_yaml(path, ["r=4"])
    assert recipe.name == "r"
    assert recipe.data.train_file == str(tmp_path / "data/train.jsonl")
    assert (recipe.train.max_steps, recipe.lora.r) == (5, 4)
    again = tmp_path / "again.yaml"
    again.write_text(recipe.to_yaml())
    assert Recipe.from_yaml(again) == recipe


def test_missing_or_broken_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        Recipe.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Recipe.from_yaml(bad)


def test_save_interval_must_fit_validation_interval():
    with pytest.raises(
        ConfigError, match="save_every_steps: must be a positive multiple of eval_every_steps"
    ):
        Recipe.from_dict(
            {"data": {"train_file": "d"}, "train": {"eval_every_steps": 10, "save_every_steps": 15}}
        )


def test_training_length_must_be_positive():
    with pytest.raises(ConfigError, match="num_train_epochs: must be above 0, got 0"):
        Recipe.from_dict({"data": {"train_file": "d"}, "train": {"num_train_epochs": 0}})
    with pytest.raises(
        ConfigError, match=r"max_steps: expected -1 or a positive number \(at most 2147483647\), got 0"
    ):
        Recipe.from_dict({"data": {"train_file": "d"}, "train": {"max_steps": 0}})


def test_every_field_has_help():
    assert all(len(text) > 10 for text in field_help().values())


# --- numbers out of range, and recipe files that cannot be read -------------------------------------
def number_fields() -> list[tuple[str, str, type, Range | None]]:
    """(section, name, int or float, range) of every number setting of the Recipe dataclasses."""
    out = []
    for section, kind in SECTIONS.items():
        for f in dataclasses.fields(kind):
            hint = typing.get_type_hints(kind)[f.name]
            types = {t for t in (typing.get_args(hint) or [hint]) if t in (int, float)}
            if types:
                out.append((section, f.name, types.pop(), f.metadata.get("range")))
    return out


def test_every_number_setting_has_a_range():
    fields = number_fields()
    assert len(fields) >= 15
    missing = [name for _, name, _, limits in fields if limits is None and name != "max_steps"]
    assert missing == []  # max_steps has its own rule: -1, or a positive count


def outside(limits: Range, kind: type) -> list[float]:
    step = 1 if kind is int else 0.5
    values = [limits.low if limits.low_open else limits.low - step]
    if limits.high != math.inf:
        values.append(limits.high if limits.high_open else limits.high + step)
    return [kind(v) for v in values]


@pytest.mark.parametrize("end", [0, -1], ids=["below", "above"])
def test_every_out_of_range_number_is_reported_together(end):
    raw: dict = {"data": {"train_file": "d"}, "train": {"max_steps": 10**12 if end else -2}}
    expected = ["max_steps: expected -1 or a positive number"]
    for section, name, kind, limits in number_fields():
        if limits is None:
            continue
        values = outside(limits, kind)
        if end == -1 and len(values) == 1:
            continue  # no upper end
        raw.setdefault(section, {})[name] = values[end]
        expected.append(f"{name}: must be {limits}, got {values[end]}")
    with pytest.raises(ConfigError) as caught:
        Recipe.from_dict(raw)
    text = str(caught.value)
    assert f"recipe has {len(expected)} problem(s)" in text
    for line in expected:
        assert line in text


def test_max_length_zero_or_negative_is_refused():
    for value in (0, -3):
        with pytest.raises(
            ConfigError, match=f"max_length: must be at least 1 and at most 131072, got {value}"
        ):
            Recipe.from_dict({"data": {"train_file": "d", "max_length": value}})


def test_floats_must_be_finite():
    raw = apply_overrides(
        {"data": {"train_file": "d"}},
        ["learning_rate=.nan", "num_train_epochs=.inf", "weight_decay=.inf", "lora_dropout=.nan"],
    )
    with pytest.raises(ConfigError) as caught:
        Recipe.from_dict(raw)
    for name, value in [("learning_rate", "nan"), ("num_train_epochs", "inf"), ("weight_decay", "inf")]:
        assert f"{name}: must be a finite number, got {value}" in str(caught.value)
    assert "lora_dropout: must be a finite number, got nan" in str(caught.value)


def test_warmup_of_one_or_more_is_refused_as_it_would_count_steps():
    with pytest.raises(ConfigError, match=r"warmup_ratio: must be at least 0 and below 1, got 1.0"):
        Recipe.from_dict({"data": {"train_file": "d"}, "train": {"warmup_ratio": 1}})


def test_unreadable_recipe_files_and_overrides_are_config_errors(tmp_path):
    huge = "9" * 5000
    cases = {
        "digits.yaml": f"train:\n  max_steps: {huge}\n".encode(),
        "deep.yaml": b"x: " + b"[" * 5000 + b"]" * 5000 + b"\n",
        "latin1.yaml": b"name: caf\xe9\n",
    }
    messages = {
        "digits.yaml": "a value cannot be read: Exceeds the limit (4300 digits)",
        "deep.yaml": "nested too deeply to read",
        "latin1.yaml": "byte 0xe9 at position 9 is not UTF-8 text; re-save the recipe as UTF-8",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ConfigError, match=re.escape(messages[name])):
            Recipe.from_yaml(tmp_path / name)
    with pytest.raises(ConfigError) as caught:
        apply_overrides({}, [f"max_steps={huge}", "r=[", "r=4"])
    assert "override max_steps: a value cannot be read" in str(caught.value)
    assert "override r: not valid YAML" in str(caught.value)
