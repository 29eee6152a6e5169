"""The runner's cheap grids: for every method in ``SCALE_AXES``, deriving a grid point by scaling
the reference merge (θ0 + s/s_ref·(θ_ref − θ0)) equals merging that point directly."""

from __future__ import annotations

import pytest
import torch

from bench.fake_pool import build_fake_pool, one_thread
from mergeforge.bench.evaluate import load_encoder_state
from mergeforge.bench.grid import SCALE_AXES, build_recipe, grid_for, scale_groups
from mergeforge.bench.runner import scaled
from mergeforge.config import parse_recipe
from mergeforge.engine.merge import merge
from mergeforge.methods.registry import get_method


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return build_fake_pool(tmp_path_factory.mktemp("pool"), train_steps=10)


def _merge(pool, method: str, params: dict, out) -> dict:  # type: ignore[no-untyped-def]
    recipe = parse_recipe(build_recipe(pool, get_method(method), params))
    merge(recipe, out, seed=0, overwrite=True, progress=False)
    return load_encoder_state(out)


@pytest.mark.parametrize("method", sorted(SCALE_AXES))
def test_scaling_the_reference_merge_equals_merging(pool, method: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    grid = grid_for(method)
    groups = scale_groups(method, grid)
    assert len(groups) == 1, "every point of a scale grid shares one merge"
    ref, members = groups[0]
    with one_thread():
        reference = _merge(pool, method, grid[ref], tmp_path / "ref")
        for i, factor in members[1:]:
            direct = _merge(pool, method, grid[i], tmp_path / f"p{i}")
            derived = scaled(pool, reference, factor)
            base = load_encoder_state(pool.base_dir)
            for k, v in direct.items():
                # float32 rounding: a few ulps of the values, plus 1e-5 of the update's size
                ulps = 4 * torch.finfo(torch.float32).eps * float(v.abs().max())
                tol = 1e-5 * float((v - base[k]).abs().max()) + ulps
                err = float((derived[k] - v).abs().max())
                assert err <= tol, (method, grid[i], k, err, tol)
    moved = sum(float((reference[k] - base[k]).abs().sum()) for k in base)
    assert moved > 0, "the merge moved away from the base (the check above is not vacuous)"


def test_groups_of_a_method_without_scale_axis() -> None:
    assert scale_groups("lines", grid_for("lines")) == [(0, [(0, 1.0)]), (1, [(1, 1.0)])]
    grid = [{"weight": 0.5, "density": 0.2}, {"weight": 1.0, "density": 0.2},
            {"weight": 0.5, "density": 0.4}]  # fmt: skip
    assert scale_groups("dare_linear", grid) == [(0, [(0, 1.0), (1, 2.0)]), (2, [(2, 1.0)])]


def test_recipes_break_ties_by_index(pool) -> None:  # type: ignore[no-untyped-def]
    recipe = build_recipe(pool, get_method("ties"), grid_for("ties")[0])
    assert recipe["mergeforge"] == {"index_tie_break": True}
    assert "index_tie_break" in parse_recipe(recipe).opt_ins
