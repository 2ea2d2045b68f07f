"""Every shipped recipe and accelerate config loads and validates."""

from pathlib import Path

import pytest

from lora_studio import Recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
ACCELERATE = sorted((Path(__file__).resolve().parents[1] / "recipes/accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path):
    recipe = Recipe.from_yaml(path)
    assert recipe.name == path.stem
    assert Path(recipe.data.train_file).is_file(), "recipes point at data shipped in the repo"


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_config_is_valid(path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))
    assert config.num_processes >= 1


def test_there_are_recipes():
    assert {p.name for p in RECIPES} >= {"smollm2-lora-cpu.yaml", "smollm2-qlora-4bit.yaml"}
    assert len(ACCELERATE) >= 5
