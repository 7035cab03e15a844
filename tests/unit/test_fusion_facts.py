"""A fusion's facts are read from the fusion: the registry finds it, the default recipe and the
ordering rules come from its class, the report counts the ops it declares."""

from __future__ import annotations

import pkgutil

import pytest

from graph_passes import cleanup, fusions
from graph_passes.fusion import Fusion
from graph_passes.registry import REGISTRY, default_fusions, order_rules
from pipeline import fusion_report
from pipeline.recipe import Recipe, load_recipe, parse_recipe
from pipeline.runtime.errors import UserError


def test_every_public_pass_module_is_registered():
    modules = {
        f"{package.__name__}.{info.name}"
        for package in (cleanup, fusions)
        for info in pkgutil.iter_modules(package.__path__)
        if not info.name.startswith("_")
    }
    assert modules == {cls.__module__ for cls in REGISTRY.values()}


def test_the_fusions_entry_expands_to_default_fusions_by_position():
    names = default_fusions()
    classes = [REGISTRY[name] for name in names]
    assert all(issubclass(cls, Fusion) and cls.in_default for cls in classes)
    assert [cls.position for cls in classes] == sorted(cls.position for cls in classes)
    assert "fuse_embed_layer_norm" not in names  # opt-in
    recipe = parse_recipe({"passes": ["raise_opset", "fusions", "remove_dead"]}, "test")
    assert recipe.passes == ("raise_opset", *names, "remove_dead")
    assert load_recipe("default").passes[6 : 6 + len(names)] == names


def test_default_order_satisfies_every_runs_after_fact():
    # Recipe validation checks order_rules(); the default positions must agree with them.
    positions = {name: i for i, name in enumerate(load_recipe("default").passes)}
    for earlier, later in order_rules():
        if earlier in positions and later in positions:
            assert positions[earlier] < positions[later], (earlier, later)


def test_a_runs_after_fact_rejects_a_recipe_that_breaks_it():
    with pytest.raises(UserError, match="'fuse_gelu' must come before 'fuse_bias_gelu'"):
        Recipe("bad", ("fuse_bias_gelu", "fuse_gelu"))


def test_every_fusion_declares_what_it_emits_consistently():
    for cls in REGISTRY.values():
        if issubclass(cls, Fusion):
            assert cls.emits.cuda <= cls.emits.contrib, cls.name
            assert all(opset >= 1 for opset in cls.emits.standard.values()), cls.name


def test_report_rows_count_the_ops_the_fusions_declare():
    assert fusion_report.GELU_OPS == {"Gelu", "FastGelu", "BiasGelu"}
    assert {"LayerNormalization", "SkipLayerNormalization"} <= fusion_report.LAYER_NORM_OPS
    assert "MultiHeadAttention" in fusion_report.ATTENTION_OPS
