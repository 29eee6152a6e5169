"""End to end: model_stock, sce, arcee_fusion, nearswap, ram and ramplus_tl recipes through
mergekit 0.1.5 and ``mergeforge merge``, compared tensor by tensor (fp32, within 1e-6 relative).

The family is a tiny Llama whose three fine-tunes each change about 40 % of the entries, so RAM
sees untouched, unique and shared positions. Every tensor has at most 2048 elements, far below
arcee_fusion's sampling size, so its quartiles are exact and its output deterministic.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import mergekit_missing, write_recipe
from models import load_state, make_family
from parity.parity_harness import SEED, MergeforgeRunner, MergekitRunner

pytestmark = pytest.mark.parity

REL_TOL = 1e-6
ACTIVE_FRACTION = 0.4

# name -> (models besides the base, recipe lines after `base_model`); `${ftN}` is fine-tune N
RECIPES: dict[str, tuple[int, str]] = {
    "model_stock": (3, ""),
    "model_stock_rows": (3, "parameters: {filter_wise: true}\n"),
    "sce": (3, "parameters: {select_topk: 0.5}\n"),
    "arcee_fusion": (1, ""),
    "nearswap": (1, "parameters: {t: 0.001}\n"),
    "ram": (3, ""),
    "ramplus_tl": (3, "parameters: {r: 0.5, alpha: 1.0, epsilon: 1.0e-4}\n"),
}


def _sparse_family(root: Path) -> tuple[Path, list[Path]]:
    """Base + 3 fine-tunes; fine-tune i changes each entry with probability 0.4 by about 5 % of
    the tensor's RMS."""
    from safetensors.torch import save_file

    base, fts = make_family("llama", root, 3, seed=91)
    b = load_state(base)
    for i, ft in enumerate(fts):
        g = torch.Generator().manual_seed(910 + i)
        state = {}
        for k, v in b.items():
            rms = v.pow(2).mean().sqrt().clamp_min(1e-3)
            noise = torch.randn(v.shape, generator=g) * 0.05 * rms
            state[k] = v + noise * (torch.rand(v.shape, generator=g) < ACTIVE_FRACTION)
        save_file(state, ft / "model.safetensors", metadata={"format": "pt"})
    return base, fts


def _recipe(path: Path, method: str, base: Path, fts: list[Path]) -> Path:
    n, extra = RECIPES[method]
    name = "model_stock" if method == "model_stock_rows" else method
    models = "".join(f"  - model: {ft}\n" for ft in fts[:n])
    if method == "model_stock_rows":
        models = f"  - model: {base}\n" + models  # the base listed among the models too
    text = f"merge_method: {name}\nbase_model: {base}\ndtype: float32\n{extra}models:\n{models}"
    return write_recipe(path, text)


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """(mergekit output, mergeforge output) per recipe."""
    runner = MergekitRunner.locate()
    if runner is None:
        mergekit_missing("mergekit 0.1.5 not found (run `make mergekit-venv`)")
    root = tmp_path_factory.mktemp("selective")
    base, fts = _sparse_family(root / "fam")
    recipes = {m: _recipe(root / f"{m}.yml", m, base, fts) for m in RECIPES}
    jobs = [(recipes[m], root / f"mk-{m}") for m in RECIPES]
    errors = runner.run(jobs, SEED, root)
    assert all(e is None for e in errors.values()), errors
    ours = MergeforgeRunner(root / "mf")
    return {m: (root / f"mk-{m}", ours.run(recipes[m], m)) for m in RECIPES}


@pytest.mark.parametrize("method", list(RECIPES))
def test_recipe_matches_mergekit(method: str, merged: dict[str, tuple[Path, Path]]) -> None:
    theirs, ours = (load_state(p) for p in merged[method])
    assert ours.keys() == theirs.keys()
    for name, ref in theirs.items():
        assert ours[name].dtype == ref.dtype == torch.float32, name
        scale = float(ref.abs().max()) or 1.0
        err = float((ours[name] - ref).abs().max())
        assert err <= REL_TOL * scale, f"{method} {name}: max|diff| {err:.3g} vs {scale:.3g}"


def test_recipes_do_something(merged: dict[str, tuple[Path, Path]]) -> None:
    """Each result differs from the base and from every input (else parity would be vacuous)."""
    outputs = {m: load_state(merged[m][1]) for m in RECIPES}
    root = merged["ram"][1].parent.parent / "fam"
    inputs = [load_state(root / d) for d in ("base", "ft0", "ft1", "ft2")]
    name = "model.layers.1.mlp.down_proj.weight"
    for method, out in outputs.items():
        for x in inputs:
            assert not torch.equal(out[name], x[name]), method
    assert not torch.equal(outputs["model_stock"][name], outputs["model_stock_rows"][name])
    assert not torch.equal(outputs["ram"][name], outputs["ramplus_tl"][name])
