"""Recipes: defaults, validation that reports every problem at once, overrides, YAML round trip."""

from pathlib import Path

import pytest

from lora_studio import ConfigError, Recipe
from lora_studio.config import apply_overrides, field_help


def test_defaults_and_plain_name_overrides():
    recipe = Recipe.from_dict({"data": {"train_file": "d.jsonl"}})
    assert recipe.model.base_model == "smollm2-135m-instruct"
    assert recipe.lora.target_modules == "all-linear"
    changed = recipe.replace(max_steps=3, r=8, output_dir="/tmp/x")
    assert (changed.train.max_steps, changed.lora.r, changed.output_dir) == (3, 8, Path("/tmp/x"))


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
        "r: must be positive, got -1",
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
    with pytest.raises(ConfigError, match="num_train_epochs: must be positive, got 0"):
        Recipe.from_dict({"data": {"train_file": "d"}, "train": {"num_train_epochs": 0}})
    with pytest.raises(ConfigError, match="max_steps: expected -1 or a positive number, got 0"):
        Recipe.from_dict({"data": {"train_file": "d"}, "train": {"max_steps": 0}})


def test_every_field_has_help():
    assert all(len(text) > 10 for text in field_help().values())
