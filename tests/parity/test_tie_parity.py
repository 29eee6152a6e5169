"""TIES where task-vector magnitudes tie at the top-k cut: bit-identical to mergekit 0.1.5 in fp32.

mergekit keeps exactly k entries chosen by an (unstable, deterministic) argsort; mergeforge
reproduces that choice for fp32 merges, so the outputs must be equal, not merely close.
"""

from __future__ import annotations

import pytest
import torch

from helpers import mergekit_missing, write_recipe
from models import load_state, make_family
from parity.parity_harness import SEED, MergeforgeRunner, MergekitRunner

pytestmark = pytest.mark.parity


def _tied_family(root):
    from safetensors.torch import save_file

    base, fts = make_family("llama", root, 2, seed=77, hidden=64)
    b = load_state(base)
    for i, ft in enumerate(fts):  # task vectors on a coarse grid: many equal magnitudes
        g = torch.Generator().manual_seed(700 + i)
        state = {k: v + torch.randint(-4, 5, v.shape, generator=g) / 128 for k, v in b.items()}
        save_file(state, ft / "model.safetensors", metadata={"format": "pt"})
    return base, fts


def test_ties_at_the_cut_are_bit_identical_to_mergekit(tmp_path):
    runner = MergekitRunner.locate()
    if runner is None:
        mergekit_missing("mergekit 0.1.5 not found (run `make mergekit-venv`)")
    base, fts = _tied_family(tmp_path / "fam")
    recipe = write_recipe(
        tmp_path / "ties.yml",
        f"merge_method: ties\nbase_model: {base}\ndtype: float32\nmodels:\n"
        f"  - model: {fts[0]}\n    parameters: {{weight: 1.0, density: 0.4}}\n"
        f"  - model: {fts[1]}\n    parameters: {{weight: 0.6, density: 0.7}}\n",
    )
    mk_out = tmp_path / "mk"
    assert runner.run([(recipe, mk_out)], SEED, tmp_path)[mk_out] is None
    ours = load_state(MergeforgeRunner(tmp_path).run(recipe, "mf"))
    theirs = load_state(mk_out)
    assert ours.keys() == theirs.keys()
    for k, v in theirs.items():
        assert torch.equal(ours[k], v), k
