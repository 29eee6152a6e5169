"""slerp, nuslerp, multislerp and karcher recipes: mergeforge vs mergekit 0.1.5, end to end.

Each recipe runs through ``mergekit-yaml`` (batched in one process) and ``mergeforge merge`` on a
tiny Llama family (a base, three 5% fine-tunes, and one model 100% away from the base, so that
slerp meets large angles too). Every output tensor must agree to 1e-6 relative in float32:
``max|ours − theirs| ≤ 1e-6 · max|theirs|``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import mergekit_missing, write_recipe
from models import load_state, make_family, make_finetune
from parity.parity_harness import SEED, MergeforgeRunner, MergekitRunner

pytestmark = pytest.mark.parity

REL_TOL = 1e-6

RECIPES = {
    # per-layer gradients under name filters (first match wins), the base listed among the models
    "slerp_gradient_filter": """
merge_method: slerp
base_model: {base}
dtype: float32
models:
  - model: {base}
  - model: {far}
parameters:
  t:
    - filter: self_attn
      value: [0.0, 0.5, 0.3, 0.7, 1.0]
    - filter: mlp
      value: [1.0, 0.5, 0.7, 0.3, 0.0]
    - value: 0.4
""",
    "slerp_finetune": """
merge_method: slerp
base_model: {base}
dtype: float32
models:
  - model: {ft0}
parameters:
  t: 0.35
""",
    "nuslerp_no_base": """
merge_method: nuslerp
dtype: float32
models:
  - model: {ft0}
    parameters: {{weight: 0.7}}
  - model: {far}
    parameters: {{weight: 0.3}}
""",
    "nuslerp_base_rows": """
merge_method: nuslerp
base_model: {base}
dtype: float32
parameters:
  nuslerp_flatten: false
models:
  - model: {ft0}
    parameters: {{weight: [0.2, 0.8]}}
  - model: {ft1}
    parameters: {{weight: 0.5}}
""",
    "nuslerp_base_columns": """
merge_method: nuslerp
base_model: {base}
dtype: float32
parameters:
  nuslerp_flatten: false
  nuslerp_row_wise: true
models:
  - model: {ft1}
    parameters: {{weight: 1.0}}
  - model: {ft2}
    parameters: {{weight: 3.0}}
""",
    "nuslerp_base_flat": """
merge_method: nuslerp
base_model: {base}
dtype: float32
models:
  - model: {ft0}
    parameters: {{weight: 1.0}}
  - model: {ft2}
    parameters: {{weight: [{{filter: mlp, value: 2.0}}, {{value: 0.5}}]}}
""",
    "multislerp_base": """
merge_method: multislerp
base_model: {base}
dtype: float32
models:
  - model: {ft0}
    parameters: {{weight: 0.5}}
  - model: {ft1}
    parameters: {{weight: [0.1, 0.9]}}
  - model: {ft2}
    parameters: {{weight: 0.9}}
""",
    "multislerp_no_base_raw": """
merge_method: multislerp
dtype: float32
parameters:
  normalize_weights: false
models:
  - model: {ft0}
    parameters: {{weight: 0.4}}
  - model: {ft1}
    parameters: {{weight: 0.3}}
  - model: {far}
    parameters: {{weight: 0.2}}
""",
    # the base is not special: it is appended as a fourth input
    "karcher": """
merge_method: karcher
base_model: {base}
dtype: float32
models:
  - model: {ft0}
  - model: {ft1}
  - model: {far}
""",
    "karcher_options": """
merge_method: karcher
dtype: float32
parameters:
  max_iter: 3
  tol: 1.0e-4
models:
  - model: {ft0}
  - model: {ft2}
""",
}


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path | str]]:
    """recipe name -> (mergeforge output, mergekit output or its error text)."""
    runner = MergekitRunner.locate()
    if runner is None:
        mergekit_missing("mergekit 0.1.5 not found (run `make mergekit-venv`)")
    root = tmp_path_factory.mktemp("spherical")
    base, fts = make_family("llama", root / "fam", 3, seed=321)
    far = make_finetune(base, root / "fam" / "far", seed=999, scale=1.0)
    paths = {"base": base, "far": far} | {f"ft{i}": p for i, p in enumerate(fts)}
    recipes = {
        name: write_recipe(root / f"{name}.yml", text.format(**paths))
        for name, text in RECIPES.items()
    }
    jobs = [(recipe, root / "mk" / name) for name, recipe in recipes.items()]
    results = runner.run(jobs, SEED, root)
    ours = MergeforgeRunner(root / "mf")
    out: dict[str, tuple[Path, Path | str]] = {}
    for (name, recipe), (_, mk_out) in zip(recipes.items(), jobs, strict=True):
        error = results[mk_out]
        out[name] = (ours.run(recipe, name), mk_out if error is None else error)
    return out


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_matches_mergekit(name: str, merged: dict[str, tuple[Path, Path | str]]) -> None:
    ours_dir, theirs_dir = merged[name]
    assert not isinstance(theirs_dir, str), f"mergekit failed on {name}: {theirs_dir}"
    ours, theirs = load_state(ours_dir), load_state(theirs_dir)
    assert sorted(ours) == sorted(theirs)
    worst, where = 0.0, ""
    for key, expected in theirs.items():
        actual = ours[key]
        assert (actual.shape, actual.dtype) == (expected.shape, expected.dtype), key
        rel = float((actual - expected).abs().max()) / (float(expected.abs().max()) or 1.0)
        if rel > worst:
            worst, where = rel, key
    assert worst <= REL_TOL, f"{name}: {where} differs by {worst:.3g} relative"


def test_recipes_are_not_trivial(merged: dict[str, tuple[Path, Path | str]]) -> None:
    """The gradient and the options must change the output (guards against vacuous parity)."""
    state = {name: load_state(out) for name, (out, _) in merged.items()}
    key = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.allclose(state["nuslerp_base_rows"][key], state["nuslerp_base_flat"][key])
    slerp = state["slerp_gradient_filter"]
    base = load_state(Path(merged["slerp_finetune"][0]).parent.parent / "fam" / "base")
    # layer 0 of self_attn has t = 0: the base exactly; its mlp has t = 1: not the base
    assert torch.equal(slerp["model.layers.0.self_attn.q_proj.weight"],
                       base["model.layers.0.self_attn.q_proj.weight"])  # fmt: skip
    assert not torch.equal(slerp["model.layers.0.mlp.up_proj.weight"],
                           base["model.layers.0.mlp.up_proj.weight"])  # fmt: skip
