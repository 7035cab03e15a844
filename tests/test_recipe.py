"""Recipes are validated data: every bundled name resolves, and every kind of mistake is a
clear UserError rather than a silently different pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest

from graph_passes.registry import REGISTRY, create_pass
from pipeline.recipe import bundled_recipe_names, load_recipe
from pipeline.runtime.errors import UserError


@pytest.mark.parametrize("name", bundled_recipe_names())
def test_bundled_recipes_load_and_resolve(name: str) -> None:
    recipe = load_recipe(name)
    assert recipe.passes
    for pass_name in recipe.passes:
        assert pass_name in REGISTRY
        assert create_pass(pass_name).name == pass_name


def test_registry_names_match_classes() -> None:
    for name, cls in REGISTRY.items():
        assert cls.name == name
        assert cls.__doc__, f"{name} has no docstring"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('passes = ["no_such_pass"]', "unknown pass"),
        ('passes = ["remove_dead", "remove_dead"]', "listed twice"),
        ('passes = ["remove_dead", "fold_constants"]', "must come before"),
        ('passes = ["remove_dead"]\nspeling = 1', "unknown key"),
        ('passes = "remove_dead"', "list of pass names"),
        ('passes = ["remove_dead"]\n[verify]\nrtol = 1.0', "rtol"),
        ('passes = ["remove_dead"]\n[verify]\nrtol = "1e-3"', "wrong type"),
        ('passes = ["remove_dead"]\n[verify]\nmode = "sometimes"', "verify.mode"),
        ('passes = ["remove_dead"]\n[verify]\ntolerance = 1', "unexpected keyword"),
        ('passes = ["remove_dead"]\nmax_iterations = 0', "max_iterations"),
        ('passes = ["remove_dead"]\n[speed]\nrounds = 1', "speed.rounds"),
        ('passes = ["remove_dead"]\n[speed]\ncheck = "yes"', "wrong type"),
        ('passes = ["remove_dead"]\n[speed]\ntime_kernels = 1', "wrong type"),
        ("passes = [", "not valid TOML"),
    ],
)
def test_invalid_recipe_files_are_rejected(text: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_recipe(str(path))


def test_valid_recipe_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text('passes = ["remove_noops", "remove_dead"]\n[verify]\nmode = "end"\n')
    recipe = load_recipe(str(path))
    assert recipe.name == "mine" and recipe.verify.mode == "end"
    assert recipe.speed.time_kernels  # on unless the recipe or the CLI says otherwise
    changed = recipe.with_overrides(
        skip_passes=["remove_noops"], rtol=1e-3, speed_check=False, time_kernels=False
    )
    assert changed.passes == ("remove_dead",)
    assert changed.verify.rtol == 1e-3 and changed.speed.check is False
    assert not changed.speed.time_kernels and recipe.with_overrides().speed == recipe.speed
    with pytest.raises(UserError, match="unknown pass"):
        recipe.with_overrides(skip_passes=["nope"])
    with pytest.raises(UserError, match="unknown recipe"):
        load_recipe("not-a-recipe")
