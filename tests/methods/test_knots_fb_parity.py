"""KnOTS parity with FusionBench 0.2.33's own functions, run in its interpreter.

FusionBench 0.2.33 has no KnOTS algorithm class, only ``method/knots/knots_utils.py``
``subspace_alignment`` (the SVD of the concatenated updates, float64, ``s > eps``). The worker
composes it with FusionBench's TIES (``method/ties_merging/ties_merging_utils.ties_merging``,
``merge_func="mean"``) the way the official KnOTS code does (``s_on_V``: the TIES input is
``diag(s) V_tᵀ``; ``out = b + α U · merged``), and with a plain mean for the task-arithmetic inner.
Every merged tensor must match ours within ``1e-5 · max|theirs|``.

Trim count: FusionBench's ``topk_values_mask(K)`` keeps ``int(N·K) + 1`` entries of N (it keeps
everything ``≥`` the ``(N − int(N·K))``-th smallest magnitude), mergekit and mergeforge keep
``int(N·d)``; the worker gets ``K = (int(N·d) − 0.5)/N`` so both keep the same entries.

The DARE inners draw random masks and are not compared here; their distribution is checked in
``test_knots.py`` (density-1 identity with ties, unbiasedness for task arithmetic).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import fusionbench_missing, fusionbench_python, run_reference
from mergeforge.methods.knots import knots

pytestmark = pytest.mark.parity

REL_TOL = 1e-5
SMALL = 5e-3

_WORKER = r"""
import sys
import torch
from fusion_bench.method.knots.knots_utils import subspace_alignment
from fusion_bench.method.ties_merging.ties_merging_utils import ties_merging

results = []
for case in torch.load(sys.argv[1]):
    base, deltas = case["base"], case["deltas"]
    U, S, Vhs = subspace_alignment(deltas, eps=case["eps"])
    coords = [(torch.diag(S) @ vh) for vh in Vhs]
    if case["inner"] == "ties":
        n_entries = coords[0].numel()
        keep = int(n_entries * case["density"])
        flat = torch.stack([c.reshape(-1) for c in coords])
        merged = ties_merging(flat, reset_thresh=(keep - 0.5) / n_entries, merge_func="mean")
    else:
        merged = torch.stack(coords).mean(dim=0)
    merged = merged.reshape(coords[0].shape)
    results.append(base + case["alpha"] * (U @ merged))
torch.save(results, sys.argv[2])
"""

# (m, n, K, LoRA rank, inner, density, α, small component): a small component adds a rank-1
# update with singular value SMALL to the first task, and the case runs with eps = 2·SMALL (both
# sides) so that dropping it moves the result well beyond the tolerance
CASES = [
    (12, 8, 2, 2, "ties", 0.5, 1.0, False),
    (12, 8, 3, 2, "ties", 0.2, 0.6, False),
    (6, 10, 4, 1, "ties", 0.35, 1.3, False),
    (9, 9, 3, 3, "ties", 0.8, 1.0, True),
    (10, 5, 3, 2, "task_arithmetic", 1.0, 0.7, False),
    (7, 7, 2, 2, "task_arithmetic", 1.0, 1.0, True),
]


def _case(i: int, spec: tuple) -> dict[str, Any]:
    m, n, k, rank, inner, density, alpha, small = spec
    gen = torch.Generator().manual_seed(100 + i)
    base = torch.randn(m, n, generator=gen)
    ups = [
        0.5 * torch.randn(m, rank, generator=gen) @ torch.randn(rank, n, generator=gen)
        for _ in range(k)
    ]
    if small:
        u, v = torch.randn(m, generator=gen), torch.randn(n, generator=gen)
        ups[0] = ups[0] + SMALL * torch.outer(u / u.norm(), v / v.norm())
    xs = [base + up for up in ups]
    return {
        "xs": xs,
        "base": base,
        "deltas": [x - base for x in xs],  # what we compute: FB gets the same rounded updates
        "inner": inner,
        "density": density,
        "alpha": alpha,
        "eps": 2 * SMALL if small else 1e-4,  # 1e-4: FusionBench's default
    }


@pytest.fixture(scope="module")
def fusionbench(tmp_path_factory: pytest.TempPathFactory) -> tuple[list, list]:
    python = fusionbench_python()
    if python is None:
        fusionbench_missing("FusionBench 0.2.33 interpreter not found ($FUSIONBENCH_PYTHON)")
    cases = [_case(i, spec) for i, spec in enumerate(CASES)]
    payload = [{k: v for k, v in c.items() if k != "xs"} for c in cases]
    out = run_reference(python, _WORKER, payload, Path(tmp_path_factory.mktemp("fb_knots")))
    assert isinstance(out, list)
    return cases, out


@pytest.mark.parametrize("index", range(len(CASES)))
def test_matches_fusionbench(fusionbench: tuple[list, list], index: int) -> None:
    cases, theirs_all = fusionbench
    case, theirs = cases[index], theirs_all[index]
    k = len(case["xs"])
    ours = knots(
        case["xs"],
        case["base"],
        weight=(1.0,) * k,
        density=(case["density"],) * k,
        inner=case["inner"],
        normalize=True,
        alpha=case["alpha"],
        eps=case["eps"],
    )
    err = float((ours - theirs).abs().max())
    scale = float(theirs.abs().max())
    assert err <= REL_TOL * scale, f"case {index}: max error {err:.3g}, scale {scale:.3g}"


def test_small_component_is_dropped_by_both(fusionbench: tuple[list, list]) -> None:
    # the SMALL component is below eps in both implementations: with eps = 0 ours keeps it
    cases, theirs_all = fusionbench
    index = next(i for i, spec in enumerate(CASES) if spec[7] and spec[4] == "task_arithmetic")
    case = cases[index]
    k = len(case["xs"])
    kept = knots(
        case["xs"], case["base"], weight=(1.0,) * k, density=(1.0,) * k,
        inner="task_arithmetic", alpha=case["alpha"], eps=0.0,
    )  # fmt: skip
    theirs = theirs_all[index]
    gap = float((kept - theirs).abs().max())
    assert gap > 10 * REL_TOL * float(theirs.abs().max()), gap
