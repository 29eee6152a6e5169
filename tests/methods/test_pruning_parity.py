"""Breadcrumbs and DELLA against mergekit 0.1.5's own kernels, run in its interpreter.

Same mechanism as ``test_kernel_parity.py`` (whose family builder, interpreter lookup and method
caller are reused): one subprocess of mergekit's Python runs every case through
``merge_tensors``, ``sparsify.magnitude_outliers`` and ``sparsify.della_magprune``, and the results
must agree with ours to ``max|ours − theirs| ≤ 1e-6 · max|theirs|``.

DELLA is random, and still compared exactly: mergekit draws ``torch.bernoulli(probs)`` from the
global RNG after ``torch.manual_seed(s)``; ours draws the same probabilities, model by model and
row slab by row slab in memory order, from ``torch.Generator().manual_seed(s)``. Breadcrumbs is
also run on task vectors on a coarse grid, where many magnitudes tie at both cuts: the fp32 merge
reproduces mergekit's (unstable but deterministic) ascending sort there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from test_kernel_parity import REL_TOL, SMALL_CHUNK, _family, _ours_merge

from helpers import require_mergekit_python, run_reference
from mergeforge.methods import primitives, selection
from mergeforge.methods.breadcrumbs import breadcrumbs
from mergeforge.methods.della import della_linear

pytestmark = pytest.mark.parity

# Runs CASES.pt through mergekit 0.1.5 and saves one tensor per case to OUT.pt.
_WORKER = r"""
import sys
import torch
from mergekit.merge_methods.api import merge_tensors
from mergekit.sparsify import RescaleNorm, della_magprune, magnitude_outliers

results = []
for case in torch.load(sys.argv[1]):
    torch.manual_seed(case.get("seed", 0))
    norm = RescaleNorm.l1 if case.get("rescale") else None
    if case["kind"] == "merge":
        out = merge_tensors(case["tensors"], case["method"], parameters=case["parameters"],
                            base_index=0)
    elif case["kind"] == "outliers":
        out = magnitude_outliers(case["tensor"], case["density"], rescale_norm=norm,
                                 gamma=case["gamma"])
    elif case["kind"] == "magprune":
        out = della_magprune(case["tensor"], case["density"], case["epsilon"], rescale_norm=norm)
    results.append(out)
torch.save(results, sys.argv[2])
"""

SHAPES = {"tiny": (6,), "mid": (37, 53), "big": (211, 307), "cube": (5, 7, 3)}
OUTLIERS = [(0.0, 0.01), (0.01, 0.05), (0.3, 0.0), (0.5, 0.2), (0.95, 0.1)]  # (density, gamma)
MAGPRUNE = [(0.5, 0.15), (0.2, 0.19), (0.9, 0.05), (1.0, 0.15)]  # (density, epsilon)


def _merge_cases() -> list[tuple[str, str, dict[str, Any]]]:
    """(case id, method, parameters in mergekit's form); per-model lists exclude the base."""
    w3 = [0.6, -0.3, 0.5]
    w_pos = [0.6, 0.5, 0.4]
    return [
        ("crumbs", "breadcrumbs", {"weight": w3, "density": [0.5, 0.7, 0.9],
                                   "gamma": [0.01, 0.1, 0.05]}),
        ("crumbs-defaults", "breadcrumbs", {"weight": w3, "density": [0.3, 0.3, 0.3]}),
        ("crumbs-norm-rescale", "breadcrumbs", {"weight": w3, "density": [0.4, 1.0, 0.05],
                                                "gamma": [0.3, 0.0, 0.1], "normalize": True,
                                                "rescale": True, "lambda": 0.7}),
        ("crumbs-ties", "breadcrumbs_ties", {"weight": w3, "density": [0.6, 0.3, 0.8],
                                             "gamma": [0.02, 0.2, 0.5]}),
        ("crumbs-ties-norm", "breadcrumbs_ties", {"weight": w_pos, "density": [0.5, 0.5, 0.5],
                                                  "normalize": True, "rescale": True}),
        ("della", "della", {"weight": w3, "density": [0.5, 0.4, 0.6],
                            "epsilon": [0.15, 0.1, 0.3], "seed": 11}),
        ("della-defaults", "della", {"weight": w_pos, "density": [0.5, 0.5, 0.5], "seed": 12}),
        ("della-raw", "della", {"weight": w3, "density": [0.7, 1.0, 0.3],
                                "epsilon": [0.2, 0.15, 0.25], "rescale": False,
                                "normalize": False, "lambda": 1.2, "seed": 13}),
        ("della-linear", "della_linear", {"weight": w3, "density": [0.5, 0.3, 1.0],
                                          "epsilon": [0.2, 0.1, 0.15], "seed": 14}),
        ("della-linear-norm", "della_linear", {"weight": w3, "density": [0.0, 0.5, 0.7],
                                               "normalize": True, "seed": 15}),
    ]  # fmt: skip


def _tied(shape: tuple[int, ...]) -> torch.Tensor:
    """A task vector on the grid 1/128 with |δ| ≤ 4/128: every magnitude is shared by many."""
    g = torch.Generator().manual_seed(41)
    return torch.randint(-4, 5, shape, generator=g).float() / 128


def _ours_outliers(delta: torch.Tensor, density: float, gamma: float, rescale: bool):
    zero = torch.zeros_like(delta)
    return breadcrumbs(
        [delta], zero, weight=(1.0,), density=(density,), gamma=(gamma,), rescale=rescale
    )


def _ours_magprune(delta: torch.Tensor, density: float, epsilon: float, rescale: bool, seed: int):
    zero, gen = torch.zeros_like(delta), torch.Generator().manual_seed(seed)
    return della_linear(
        [delta], zero, weight=(1.0,), density=(density,), epsilon=(epsilon,), rescale=rescale,
        generator=gen,
    )  # fmt: skip


def _kernel_cases(shape_id: str, delta: torch.Tensor, tied: torch.Tensor, add) -> None:
    for tag, d_in, grid in (("", delta, OUTLIERS), ("tied-", tied, [(0.3, 0.05), (0.6, 0.2)])):
        for density, gamma in grid:
            for rescale in (False, True):
                case = {"kind": "outliers", "tensor": d_in, "density": density, "gamma": gamma,
                        "rescale": rescale}  # fmt: skip
                ours = lambda t=d_in, d=density, g=gamma, r=rescale: _ours_outliers(t, d, g, r)  # noqa: E731
                add(f"{tag}outliers-{density}-{gamma}-{rescale}-{shape_id}", case, ours)
    for tag, d_in, grid in (("", delta, MAGPRUNE), ("tied-", tied, [(0.5, 0.3)])):
        for density, eps in grid:
            for rescale in (False, True):
                case = {"kind": "magprune", "tensor": d_in, "density": density, "epsilon": eps,
                        "rescale": rescale, "seed": 3}  # fmt: skip
                ours = lambda t=d_in, d=density, e=eps, r=rescale: _ours_magprune(t, d, e, r, 3)  # noqa: E731
                add(f"{tag}magprune-{density}-{eps}-{rescale}-{shape_id}", case, ours)


def _build() -> tuple[list[dict], list[Callable[[], torch.Tensor]], list[str]]:
    cases: list[dict] = []
    ours: list[Callable[[], torch.Tensor]] = []
    ids: list[str] = []

    def add(case_id: str, case: dict, fn: Callable[[], torch.Tensor]) -> None:
        cases.append(case)
        ours.append(fn)
        ids.append(case_id)

    for shape_id, shape in SHAPES.items():
        base, fts = _family(shape, 3, seed=10 + len(shape_id))
        for case_id, method, params in _merge_cases():
            mk_params = {k: v for k, v in params.items() if k != "seed"}
            case = {"kind": "merge", "method": method, "tensors": [base, *fts],
                    "parameters": mk_params, "seed": params.get("seed", 0)}  # fmt: skip
            fn = lambda m=method, b=base, f=fts, p=params: _ours_merge(m, f, b, p)  # noqa: E731
            add(f"{case_id}-{shape_id}", case, fn)
        _kernel_cases(shape_id, fts[0] - base, _tied(shape), add)
    return cases, ours, ids


CASES, OURS, IDS = _build()


@pytest.fixture(scope="module")
def mergekit_results(tmp_path_factory: pytest.TempPathFactory) -> list[torch.Tensor]:
    python = require_mergekit_python()
    return run_reference(python, _WORKER, CASES, tmp_path_factory.mktemp("mk_pruning"))  # type: ignore[return-value]


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 5003 elements: DELLA draws the big tensors in 16-row slabs, thresholds sample."""
    monkeypatch.setattr(primitives, "CHUNK", SMALL_CHUNK)
    monkeypatch.setattr(selection, "SELECT_CHUNK", SMALL_CHUNK)


@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_matches_mergekit(
    index: int, mergekit_results: list[torch.Tensor], small_chunks: None
) -> None:
    theirs = mergekit_results[index]
    ours = OURS[index]()
    assert ours.shape == theirs.shape
    assert ours.dtype == torch.float32
    scale = float(theirs.abs().max()) if theirs.numel() else 1.0
    err = float((ours - theirs).abs().max()) if theirs.numel() else 0.0
    assert err <= REL_TOL * (scale or 1.0), f"{IDS[index]}: max|diff| {err:.3g} vs {scale:.3g}"


def test_pruning_cases_are_not_trivial() -> None:
    """The cases must tell the options apart (guards against vacuous parity)."""
    by_id = dict(zip(IDS, range(len(CASES)), strict=True))
    band = OURS[by_id["outliers-0.5-0.2-False-mid"]]()
    top = OURS[by_id["outliers-0.3-0.0-False-mid"]]()
    assert int((band != 0).sum()) == int(0.5 * band.numel())
    assert float(band.abs().max()) < float(top.abs().max())  # the outliers are gone
    tied = OURS[by_id["tied-outliers-0.6-0.2-False-mid"]]()
    assert int((tied != 0).sum()) == int(0.6 * tied.numel())  # exactly m despite the ties
    della = OURS[by_id["della-mid"]]()
    assert not torch.equal(della, OURS[by_id["della-linear-mid"]]())
    magprune = OURS[by_id["magprune-0.5-0.15-False-big"]]()
    delta = CASES[by_id["magprune-0.5-0.15-False-big"]]["tensor"]
    ranks = delta.abs().argsort(dim=1).argsort(dim=1)  # (211, 307)
    top_rate = float((magprune[ranks >= 276] != 0).float().mean())  # p ≈ 0.64
    low_rate = float((magprune[ranks < 31] != 0).float().mean())  # p ≈ 0.36
    assert top_rate - low_rate > 0.2
