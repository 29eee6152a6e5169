"""Recipe schema: parsing, collected errors, gradient and filter evaluation (mergekit semantics)."""

from __future__ import annotations

import pytest

from mergeforge.config import Conditional, evaluate_setting, parse_recipe
from mergeforge.errors import RecipeError


def test_parses_the_mergekit_schema():
    r = parse_recipe(
        {
            "merge_method": "ties",
            "base_model": "b",
            "models": [{"model": "a", "parameters": {"weight": [0, 1], "density": 0.5}}, "c"],
            "parameters": {"normalize": True, "weight": [{"filter": "mlp", "value": 0.5}]},
            "dtype": "bf16",
            "out_dtype": "float16",
            "tokenizer_source": "base",
            "mergeforge": {"truncate_embeddings": True},
        }
    )
    assert r.dtype == "bfloat16" and r.out_dtype == "float16"
    assert r.models[0].parameters["weight"] == (0, 1)
    assert r.parameters["weight"] == (Conditional("mlp", 0.5),)
    assert r.model_paths() == ("b", "a", "c")
    assert r.opt_ins == frozenset({"truncate_embeddings"})


def test_collects_every_schema_problem():
    with pytest.raises(RecipeError) as e:
        parse_recipe(
            {
                "merge_method": "ties",
                "modelz": [],
                "dtype": "float8",
                "models": [{"model": "a", "paramters": {}}],
                "mergeforge": {"yolo": True},
                "parameters": {"w": {"nested": 1}},
            }
        )
    msg = str(e.value)
    for part in ("'modelz'", "float8", "'paramters'", "yolo", "parameters.w"):
        assert part in msg
    assert "5 problems" in msg


@pytest.mark.parametrize("data", [None, [], "x"])
def test_empty_or_non_mapping_recipe(data):
    with pytest.raises(RecipeError):
        parse_recipe(data)


def test_unsupported_mergekit_keys_say_so():
    with pytest.raises(RecipeError, match="not supported yet"):
        parse_recipe({"merge_method": "linear", "models": ["a"], "modules": {}})


@pytest.mark.parametrize(
    ("setting", "t", "want"),
    [
        (0.5, 0.3, 0.5),
        ((0.0, 1.0), 1 / 3, 1 / 3),
        ((0.0, 0.5, 1.0), 1 / 3, 1 / 3),  # s = 2/3 between 0 and 0.5
        ((0.0, 0.5, 1.0), 1.0, 1.0),
        ((1.0, 3.0), 0.0, 1.0),
        ((2.0,), 0.7, 2.0),
        ((False, True), 2 / 3, False),  # non-numeric lists index int(t·(n−1)), no interpolation
        ((False, True), 1.0, True),
    ],
)
def test_gradients_interpolate_like_mergekit(setting, t, want):
    assert evaluate_setting(setting, "model.layers.1.mlp.up_proj.weight", t) == pytest.approx(want)


def test_filters_first_substring_match_wins_and_fall_through():
    s = (Conditional("mlp", 0.5), Conditional("self_attn", (0.2, 0.8)), Conditional(None, 0.3))
    assert evaluate_setting(s, "model.layers.0.mlp.up_proj.weight", 0.0) == 0.5
    assert evaluate_setting(s, "model.layers.3.self_attn.q_proj.weight", 1.0) == pytest.approx(0.8)
    assert evaluate_setting(s, "model.norm.weight", 0.0) == 0.3
    assert evaluate_setting((Conditional("mlp", 1.0),), "model.norm.weight", 0.0) is None
    assert evaluate_setting((Conditional("*", 2.0),), "anything", 0.0) == 2.0
