"""Per-tensor parity of model_stock, sce, arcee_fusion, nearswap, ram and ramplus_tl with
mergekit 0.1.5's own kernels, run in its interpreter as a subprocess.

Every case runs through ``mergekit.merge_methods.api.merge_tensors`` (base first) and through our
method; deterministic results must agree within ``1e-6 · max|theirs|``. arcee_fusion is exact up
to 10^6 elements (no sampling); above that both sides sample the quartiles, mergekit from its
global RNG and we from the tensor's generator, so those results are compared in distribution.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from method_calls import call_method

from helpers import require_mergekit_python, run_reference
from mergeforge.methods import primitives
from mergeforge.methods.arcee_fusion import SAMPLE_SIZE, fusion_importance

pytestmark = pytest.mark.parity

REL_TOL = 1e-6
SMALL_CHUNK = 5003  # ragged chunks: the big tensors span 13 of them, the 3-D ones several rows

_WORKER = r"""
import sys
import torch
from mergekit.merge_methods.api import merge_tensors
results = []
for case in torch.load(sys.argv[1]):
    torch.manual_seed(case["seed"])
    results.append(merge_tensors(case["tensors"], case["method"],
                                 parameters=case["parameters"], base_index=0))
torch.save(results, sys.argv[2])
"""

SHAPES = {"tiny": (6,), "row": (300,), "mid": (37, 53), "cube": (5, 7, 11), "big": (211, 307)}


def _family(shape: tuple[int, ...], k: int, seed: int, kind: str) -> tuple[torch.Tensor, list]:
    """A base and k models. ``sparse``: each model changes ~40 % of the entries (so positions are
    untouched, unique or shared); ``coarse``: changes on a grid of 1/8 (equal magnitudes and
    variances tie); ``tiny``: changes of ~1e-4 (sce's weight sum falls below 1e-6)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = []
    for _ in range(k):
        if kind == "coarse":
            delta = torch.randint(-3, 4, shape, generator=g).float() / 8
        else:
            delta = torch.randn(shape, generator=g) * (1e-4 if kind == "tiny" else 0.1)
            delta *= torch.rand(shape, generator=g) < (0.4 if kind == "sparse" else 1.0)
        models.append(base + delta)
    return base, models


def _opposed(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, list]:
    """Two models with exactly opposite offsets: model_stock's singular case (cos θ = −1)."""
    g = torch.Generator().manual_seed(seed)
    base, delta = torch.randn(shape, generator=g), torch.randn(shape, generator=g) / 8
    return base, [base + delta, base - delta]


# (case id, method, family kind, k, parameters)
CASES_SPEC: list[tuple[str, str, str, int, dict[str, Any]]] = [
    ("stock-2", "model_stock", "dense", 2, {}),
    ("stock-3", "model_stock", "sparse", 3, {}),
    ("stock-4-rows", "model_stock", "dense", 4, {"filter_wise": True}),
    ("stock-3-rows", "model_stock", "sparse", 3, {"filter_wise": True}),
    ("stock-opposed", "model_stock", "opposed", 2, {}),
    ("stock-opposed-rows", "model_stock", "opposed", 2, {"filter_wise": True}),
    ("sce-all", "sce", "dense", 3, {}),
    ("sce-top30", "sce", "sparse", 3, {"select_topk": 0.3}),
    ("sce-top99", "sce", "coarse", 3, {"select_topk": 0.999}),
    ("sce-top0", "sce", "dense", 2, {"select_topk": 0.0}),
    ("sce-coarse", "sce", "coarse", 4, {"select_topk": 0.5}),
    ("sce-uniform", "sce", "tiny", 3, {"select_topk": 0.6}),
    ("sce-one", "sce", "dense", 1, {"select_topk": 0.5}),
    ("fusion", "arcee_fusion", "dense", 1, {}),
    ("fusion-sparse", "arcee_fusion", "sparse", 1, {}),
    ("nearswap", "nearswap", "dense", 1, {"t": 0.05}),
    ("nearswap-sparse", "nearswap", "sparse", 1, {"t": 0.001}),
    ("nearswap-t0", "nearswap", "dense", 1, {"t": 0.0}),
    ("ram", "ram", "sparse", 3, {}),
    ("ram-eps", "ram", "dense", 2, {"epsilon": 0.05}),
    ("ram-coarse", "ram", "coarse", 4, {"epsilon": 0.2}),
    ("ramplus", "ramplus_tl", "sparse", 3, {}),
    ("ramplus-wide", "ramplus_tl", "sparse", 2, {"r": 0.5, "alpha": 2.0}),
    ("ramplus-coarse", "ramplus_tl", "coarse", 3, {"r": 0.3, "alpha": 1.0, "epsilon": 0.2}),
]


def _build() -> tuple[list[dict], list[Callable[[], torch.Tensor]], list[str]]:
    cases: list[dict] = []
    ours: list[Callable[[], torch.Tensor]] = []
    ids: list[str] = []
    for s, (shape_id, shape) in enumerate(SHAPES.items()):
        for c, (case_id, method, kind, k, params) in enumerate(CASES_SPEC):
            seed = 100 * s + c
            base, models = (
                _opposed(shape, seed) if kind == "opposed" else _family(shape, k, seed, kind)
            )
            cases.append({"method": method, "tensors": [base, *models], "parameters": params,
                          "seed": seed})  # fmt: skip
            ours.append(lambda m=method, b=base, x=models, p=params: call_method(m, x, b, **p))
            ids.append(f"{case_id}-{shape_id}")
    return cases, ours, ids


CASES, OURS, IDS = _build()
SAMPLED_SHAPE = (1100, 1000)  # 1.1e6 elements > SAMPLE_SIZE: arcee_fusion samples its quartiles


def _sampled_case() -> dict:
    base, models = _family(SAMPLED_SHAPE, 1, seed=5, kind="dense")
    return {"method": "arcee_fusion", "tensors": [base, *models], "parameters": {}, "seed": 3}


def _run_mergekit(cases: list[dict], tmp: Path) -> list[torch.Tensor]:
    return run_reference(require_mergekit_python(), _WORKER, cases, tmp)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def mergekit_results(tmp_path_factory: pytest.TempPathFactory) -> list[torch.Tensor]:
    """mergekit's result for every case of ``CASES``, then for ``_sampled_case()``."""
    return _run_mergekit([*CASES, _sampled_case()], tmp_path_factory.mktemp("mk_selective"))


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(primitives, "CHUNK", SMALL_CHUNK)


@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_matches_mergekit(
    index: int, mergekit_results: list[torch.Tensor], small_chunks: None
) -> None:
    theirs = mergekit_results[index]
    ours = OURS[index]()
    assert ours.shape == theirs.shape and ours.dtype == torch.float32
    scale = float(theirs.abs().max()) or 1.0
    err = float((ours - theirs).abs().max())
    assert err <= REL_TOL * scale, f"{IDS[index]}: max|diff| {err:.3g} vs max|x| {scale:.3g}"


def test_cases_are_not_trivial() -> None:
    """Options must change the result, or parity would not show they are implemented."""
    by_id = dict(zip(IDS, range(len(CASES)), strict=True))

    def run(case_id: str, **override: Any) -> torch.Tensor:
        i = by_id[case_id]
        base, *models = CASES[i]["tensors"]
        return call_method(
            CASES[i]["method"], models, base, **{**CASES[i]["parameters"], **override}
        )

    assert not torch.allclose(run("stock-3-mid"), run("stock-3-mid", filter_wise=True))
    assert not torch.allclose(run("sce-top30-mid"), run("sce-top30-mid", select_topk=1.0))
    assert not torch.allclose(run("ramplus-mid"), run("ram-mid"))
    base = CASES[by_id["stock-opposed-mid"]]["tensors"][0]
    assert torch.equal(run("stock-opposed-mid"), base)  # the singular guard keeps the base
    fused, base = run("fusion-mid"), CASES[by_id["fusion-mid"]]["tensors"][0]
    assert 0 < int((fused != base).sum()) < fused.numel()  # some entries taken, not all


def test_arcee_fusion_on_a_sampled_tensor_matches_in_distribution(
    mergekit_results: list[torch.Tensor],
) -> None:
    """Above 10^6 elements both tools take quartiles from 10^6 positions drawn with replacement:
    the masks must differ only near the threshold, on a small fraction of the entries."""
    base, model = _sampled_case()["tensors"]
    theirs = mergekit_results[-1]
    ours = call_method("arcee_fusion", [model], base, seed=11)
    again = call_method("arcee_fusion", [model], base, seed=11)
    other = call_method("arcee_fusion", [model], base, seed=12)
    assert torch.equal(ours, again)  # seeded: reproducible
    importance = fusion_importance(model, base).reshape(-1)
    taken_ours, taken_theirs = (ours != base).reshape(-1), (theirs != base).reshape(-1)
    exact = _exact_threshold(importance)
    frac_ours, frac_theirs = float(taken_ours.float().mean()), float(taken_theirs.float().mean())
    expected = float((importance >= exact).float().mean())
    # binomial noise of a fraction estimated from the sample (observed deviations: ≤ 1.5 σ)
    tol = 6 * math.sqrt(expected * (1 - expected) / SAMPLE_SIZE)
    assert 0.01 < expected < 0.2  # an outlier threshold: few entries taken
    assert abs(frac_ours - expected) < tol and abs(frac_theirs - expected) < tol
    assert float((taken_ours != taken_theirs).float().mean()) < 2 * tol  # nested masks
    assert not torch.equal(ours, other)  # the sample, hence the threshold, follows the seed


def _exact_threshold(values: torch.Tensor) -> float:
    """median + 1.5·IQR of all values (no sampling), ranks floor(q·(n − 1))."""
    n = values.numel()
    q1, q2, q3 = (float(values.kthvalue(int(q * (n - 1)) + 1).values) for q in (0.25, 0.5, 0.75))
    return q2 + 1.5 * (q3 - q1)
