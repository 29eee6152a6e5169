"""Per-tensor parity with mergekit 0.1.5's own kernels, run in its interpreter as a subprocess.

mergekit cannot be imported from the dev environment, so one subprocess of mergekit's Python
(``$MERGEKIT_PYTHON``, else ``<repo>/.venv-mergekit/bin/python``, else ``/tmp/venvs/mk/bin/python``)
runs every case through ``mergekit.merge_methods.api.merge_tensors`` and ``mergekit.sparsify``, and
the results are compared with ours: ``max|ours − theirs| ≤ 1e-6 · max|theirs|``.

Random methods are compared exactly too: mergekit draws from the global RNG after
``torch.manual_seed(s)``; ours from ``torch.Generator().manual_seed(s)``, in the same order and
with the same ``torch.bernoulli(full_like(δ, d))`` call, so the masks are the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import require_mergekit_python, run_reference
from mergeforge.methods import get_method, primitives, selection
from mergeforge.methods.primitives import elect_sign, random_drop, rescale_l1, trim_magnitude

pytestmark = pytest.mark.parity

REPO = Path(__file__).resolve().parents[2]
REL_TOL = 1e-6


# Runs CASES.pt through mergekit 0.1.5 and saves one tensor per case to OUT.pt.
_WORKER = r"""
import sys
import torch
from mergekit.merge_methods.api import merge_tensors
from mergekit.merge_methods.generalized_task_arithmetic import (
    ConsensusMethod, GeneralizedTaskArithmeticMerge, get_mask,
)
from mergekit.sparsify import RescaleNorm, SparsificationMethod, bernoulli, magnitude

TIES_COUNT = GeneralizedTaskArithmeticMerge(
    consensus_method=ConsensusMethod.count,
    sparsification_method=SparsificationMethod.magnitude,
    default_normalize=True, default_rescale=False, method_name="ties_count",
    method_pretty_name=None, method_reference_url=None,
)
results = []
for case in torch.load(sys.argv[1]):
    torch.manual_seed(case.get("seed", 0))
    kind = case["kind"]
    if kind == "merge":
        method = TIES_COUNT if case["method"] == "ties_count" else case["method"]
        out = merge_tensors(case["tensors"], method, parameters=case["parameters"],
                            base_index=case["base_index"])
    elif kind == "magnitude":
        norm = RescaleNorm.l1 if case["rescale"] else None
        out = magnitude(case["tensor"], case["density"], rescale_norm=norm)
    elif kind == "bernoulli":
        out = bernoulli(case["tensor"], case["density"], rescale_norm=RescaleNorm.l1)
    elif kind == "get_mask":
        deltas = case["tensor"]
        out = (get_mask(deltas, case["method"]).to(deltas.dtype) * deltas).sum(dim=0)
    results.append(out)
torch.save(results, sys.argv[2])
"""

SHAPES = {"tiny": (6,), "mid": (37, 53), "big": (211, 307)}  # big: sampled threshold
SMALL_CHUNK = 5003  # ragged chunks: the big tensors span 13 of them


def _family(shape: tuple[int, ...], k: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and k fine-tunes whose task vectors have all-distinct magnitudes, exactly.

    Everything lies on the grid ``u·ℤ`` (u a power of two) in fp32's exact-integer range, so
    ``x_i − b`` is exact and no two entries of a task vector tie at a magnitude threshold. (With
    ties mergekit keeps an arbitrary subset of the tied entries, which no other code can
    reproduce; ``test_ties.py`` covers ties.)
    """
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    u = 2.0 ** -(math.ceil(math.log2(n)) + 1)  # n·u ≤ 1
    base = torch.randint(-4 * n, 4 * n, shape, generator=g).float() * u
    fts = []
    for _ in range(k):
        mags = (torch.randperm(n, generator=g) + 1).float().reshape(shape) * u
        signs = torch.randint(0, 2, shape, generator=g).float() * 2 - 1
        fts.append(base + signs * mags)
    return base, fts


def _merge_cases() -> list[tuple[str, str, dict[str, Any]]]:
    """(case id, method, parameters in mergekit's form); per-model lists exclude the base."""
    w3 = [0.6, -0.3, 0.5]
    return [
        ("linear-norm", "linear", {"weight": [0.2, 0.5, 0.3, 0.4]}),
        ("linear-raw", "linear", {"weight": [0.2, -0.5, 0.3, 1.4], "normalize": False}),
        ("ta", "task_arithmetic", {"weight": w3}),
        ("ta-norm-lam", "task_arithmetic", {"weight": w3, "normalize": True, "lambda": 0.7}),
        ("ties", "ties", {"weight": [0.6, 0.5, 0.4], "density": [0.5, 0.5, 0.5]}),
        ("ties-mixed", "ties", {"weight": w3, "density": [0.3, 1.0, 0.9], "lambda": 1.3}),
        ("ties-raw", "ties", {"weight": w3, "density": [0.2, 0.0, 0.6], "normalize": False}),
        ("ties-rescale", "ties", {"weight": w3, "density": [0.4, 0.7, 0.1], "rescale": True}),
        ("ties-count", "ties_count", {"weight": w3, "density": [0.5, 0.4, 0.8]}),
        ("dare-linear", "dare_linear", {"weight": w3, "density": [0.5, 0.3, 1.0], "seed": 7}),
        ("dare-linear-raw", "dare_linear", {"weight": w3, "density": [0.5, 0.2, 0.9],
                                            "rescale": False, "normalize": True, "seed": 8}),
        ("dare-ties", "dare_ties", {"weight": w3, "density": [0.7, 0.5, 0.3], "seed": 9}),
        ("dare-ties-norm", "dare_ties", {"weight": w3, "density": [0.0, 0.5, 0.3],
                                         "normalize": True, "lambda": 0.8, "seed": 10}),
    ]  # fmt: skip


def _ours_merge(method: str, tensors: list[torch.Tensor], base: torch.Tensor | None, p: dict):
    """Call our method the way the engine does: every spec parameter, per-model ones as tuples."""
    name = "ties" if method == "ties_count" else method
    spec = get_method(name)
    kwargs: dict[str, Any] = {}
    for ps in spec.params:
        value = p.get(ps.name, ps.default)
        if ps.scope == "per_model":
            value = tuple(value) if isinstance(value, list) else (value,) * len(tensors)
        kwargs[ps.name] = value
    if method == "ties_count":
        kwargs["consensus"] = "count"
    if spec.stochastic:
        kwargs["generator"] = torch.Generator().manual_seed(p["seed"])
    return spec.fn(tensors, base, **kwargs)


def _build() -> tuple[list[dict], list[Callable[[], torch.Tensor]], list[str]]:
    cases: list[dict] = []
    ours: list[Callable[[], torch.Tensor]] = []
    ids: list[str] = []
    for shape_id, shape in SHAPES.items():
        base, fts = _family(shape, 3, seed=len(shape_id))
        for case_id, method, params in _merge_cases():
            mk_params = {k: v for k, v in params.items() if k != "seed"}
            if method == "linear":
                tensors, base_index = [*fts, base], None
            else:
                tensors, base_index = [base, *fts], 0
            cases.append({"kind": "merge", "method": method, "tensors": tensors,
                          "parameters": mk_params, "base_index": base_index,
                          "seed": params.get("seed", 0)})  # fmt: skip
            if method == "linear":
                ours.append(lambda m=method, t=tensors, p=params: _ours_merge(m, t, None, p))
            else:
                ours.append(lambda m=method, b=base, f=fts, p=params: _ours_merge(m, f, b, p))
            ids.append(f"{case_id}-{shape_id}")
        delta = fts[0] - base
        for density in (0.0, 0.01, 0.3, 0.999, 1.0):
            for rescale in (False, True):
                cases.append({"kind": "magnitude", "tensor": delta, "density": density,
                              "rescale": rescale})  # fmt: skip
                ours.append(lambda d=delta, q=density, r=rescale: _ours_magnitude(d, q, r))
                ids.append(f"magnitude-{density}-{'l1' if rescale else 'none'}-{shape_id}")
        for density in (0.0, 0.4):
            cases.append({"kind": "bernoulli", "tensor": delta, "density": density, "seed": 3})
            ours.append(lambda d=delta, q=density: _ours_bernoulli(d, q, seed=3))
            ids.append(f"bernoulli-{density}-{shape_id}")
        stacked = torch.stack([f - base for f in fts]) * torch.tensor([1.0, -0.5, 2.0]).reshape(
            (3,) + (1,) * len(shape)
        )
        for consensus in ("sum", "count"):
            cases.append({"kind": "get_mask", "tensor": stacked, "method": consensus})
            ours.append(lambda s=stacked, c=consensus: _ours_masked_sum(s, c))
            ids.append(f"mask-{consensus}-{shape_id}")
    return cases, ours, ids


def _ours_magnitude(delta: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    trimmed = trim_magnitude(delta, density)
    return rescale_l1(delta, trimmed) if rescale and 0 < density < 1 else trimmed


def _ours_bernoulli(delta: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    masked, _ = random_drop(delta, density, torch.Generator().manual_seed(seed))
    return rescale_l1(delta, masked)


def _ours_masked_sum(stacked: torch.Tensor, consensus: str) -> torch.Tensor:
    sign = elect_sign(stacked, consensus)  # type: ignore[arg-type]
    return (stacked * (stacked.sign() == sign)).sum(dim=0)


CASES, OURS, IDS = _build()


@pytest.fixture(scope="module")
def mergekit_results(tmp_path_factory: pytest.TempPathFactory) -> list[torch.Tensor]:
    python = require_mergekit_python()
    return run_reference(python, _WORKER, CASES, tmp_path_factory.mktemp("mk_kernels"))  # type: ignore[return-value]


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
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
    scale = float(theirs.abs().max()) or 1.0
    err = float((ours - theirs).abs().max())
    assert err <= REL_TOL * scale, f"{IDS[index]}: max|diff| {err:.3g} vs max|x| {scale:.3g}"


def test_kernel_cases_are_not_trivial() -> None:
    """The cases must distinguish the options they exercise (guards against vacuous parity)."""
    by_id = dict(zip(IDS, range(len(CASES)), strict=True))
    ties = OURS[by_id["ties-mixed-mid"]]()
    count = OURS[by_id["ties-count-mid"]]()
    ta = OURS[by_id["ta-mid"]]()
    assert not torch.allclose(ties, ta)
    assert not torch.allclose(count, OURS[by_id["ties-mid"]]())
