"""Consensus merging and TALL masks end to end: merge a tiny Llama family with the masks saved,
rebuild every input with `mergeforge recover`, and check b + m_i ⊙ τ_MTL tensor by tensor."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from helpers import run_cli, write_recipe
from models import load_state

TALL_LAMBDA = (0.6, 0.3, 0.8)


def _recipe(tmp_path: Path, family, method: str, params: str) -> Path:
    base, fts = family
    models = "".join(
        f"  - model: {p}\n    parameters:\n      tall_lambda: {lam}\n"
        for p, lam in zip(fts, TALL_LAMBDA, strict=True)
    )
    text = f"merge_method: {method}\nbase_model: {base}\nmodels:\n{models}parameters:\n{params}"
    return write_recipe(tmp_path / f"{method}.yaml", text)


def _reference(b: torch.Tensor, xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """τ_MTL and the TALL masks (K, *shape), written out from the paper's formula."""
    tsum = torch.stack([x - b for x in xs]).sum(0)
    lam = torch.tensor(TALL_LAMBDA).view(-1, *([1] * b.dim()))  # (K, 1, ...)
    masks = (b - torch.stack(xs)).abs() > ((b + tsum) - torch.stack(xs)).abs() * lam
    return tsum, masks


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("consensus", "  k: 2\n  lambda: 0.5\n  save_masks: true\n"),
        ("tall_masks", "  lambda: 1.0\n"),
    ],
)
def test_merge_then_recover_every_input(tmp_path, llama_family, method: str, params: str) -> None:
    from transformers import AutoModelForCausalLM

    base, fts = llama_family
    out = tmp_path / "out"
    assert run_cli("merge", _recipe(tmp_path, llama_family, method, params), out, "--quiet") == 0
    manifest = json.loads((out / "artifacts" / "artifacts.json").read_text())
    b_state, xs_state, merged = load_state(base), [load_state(f) for f in fts], load_state(out)
    refs = {}
    for name, b in b_state.items():
        tsum, masks = _reference(b, [x[name] for x in xs_state])
        counts = masks.sum(0)
        lam = 0.5 if method == "consensus" else 1.0
        kept = torch.where(counts >= 2, tsum, 0.0) if method == "consensus" else tsum
        torch.testing.assert_close(merged[name], b + lam * kept, rtol=1e-6, atol=1e-6)
        refs[name] = (tsum, masks)
    assert set(manifest["tensors"]) == set(b_state)
    for i, x in enumerate(xs_state):
        dest = tmp_path / f"rec{i}"
        assert run_cli("recover", out, dest, "--model", str(i)) == 0
        got = load_state(dest)
        err = norm = 0.0
        for name, b in b_state.items():
            tsum, masks = refs[name]
            want = b + torch.where(masks[i], tsum, 0.0)
            torch.testing.assert_close(got[name], want, rtol=1e-6, atol=1e-6)
            err += float((want - x[name]).double().square().sum())
            norm += float((x[name] - b).double().square().sum())
        assert manifest["models"][i]["rel_error"] == pytest.approx(math.sqrt(err / norm), rel=1e-4)
        model = AutoModelForCausalLM.from_pretrained(dest)
        assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in got.values())


def test_consensus_without_save_masks_writes_no_artifacts(tmp_path, llama_family) -> None:
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, llama_family, "consensus", "  k: 1\n")
    assert run_cli("merge", recipe, out, "--quiet") == 0
    assert not (out / "artifacts").exists()
