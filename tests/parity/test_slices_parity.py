"""`slices:` recipes give mergekit 0.1.5's tensors: layer stacking, scale filters, per-slice merges."""

from __future__ import annotations

import json

import pytest

from helpers import mergekit_missing, write_recipe
from models import load_state, make_family
from parity.parity_harness import SEED, MergeforgeRunner, MergekitRunner

pytestmark = pytest.mark.parity

RECIPES = {
    "stack": """\
merge_method: passthrough
dtype: float32
slices:
  - sources:
      - model: {base}
        layer_range: [0, 3]
  - sources:
      - model: {ft0}
        layer_range: [1, 4]
        parameters:
          scale: [{{filter: o_proj, value: 0.5}}, {{value: 1.0}}]
  - sources:
      - model: {ft1}
        layer_range: [3, 4]
""",
    "slice_linear": """\
merge_method: linear
dtype: float32
parameters: {{normalize: true}}
slices:
  - sources:
      - model: {ft0}
        layer_range: [0, 2]
        parameters: {{weight: [0.2, 0.9]}}
      - model: {ft1}
        layer_range: [2, 4]
        parameters: {{weight: 0.5}}
  - sources:
      - model: {ft0}
        layer_range: [2, 4]
        parameters: {{weight: 1.0}}
      - model: {ft1}
        layer_range: [0, 2]
        parameters: {{weight: [{{filter: mlp, value: 2.0}}, {{value: 0.3}}]}}
""",
}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    runner = MergekitRunner.locate()
    if runner is None:
        mergekit_missing("mergekit 0.1.5 not found (run `make mergekit-venv`)")
    root = tmp_path_factory.mktemp("slices")
    base, fts = make_family("llama", root / "fam", 2, seed=31)
    jobs, recipes = [], {}
    for name, text in RECIPES.items():
        recipes[name] = write_recipe(
            root / f"{name}.yml", text.format(base=base, ft0=fts[0], ft1=fts[1])
        )
        jobs.append((recipes[name], root / f"mk-{name}"))
    errors = runner.run(jobs, SEED, root)
    mf = MergeforgeRunner(root)
    return {n: (root / f"mk-{n}", mf.run(r, f"mf-{n}"), errors[root / f"mk-{n}"])
            for n, r in recipes.items()}  # fmt: skip


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_slices_match_mergekit(outputs, name):
    theirs_dir, ours_dir, error = outputs[name]
    assert error is None, error
    theirs, ours = load_state(theirs_dir), load_state(ours_dir)
    assert ours.keys() == theirs.keys()
    for k, v in theirs.items():
        scale = float(v.abs().max()) or 1.0
        assert float((ours[k] - v).abs().max()) <= 1e-6 * scale, k
    cfg = lambda d: json.loads((d / "config.json").read_text())["num_hidden_layers"]  # noqa: E731
    assert cfg(ours_dir) == cfg(theirs_dir)
