"""Hand-computed cases and properties of KnOTS (knots.py)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from mergeforge.errors import MethodError
from mergeforge.methods.knots import KNOTS, knots, subspace_alignment
from mergeforge.methods.task_arithmetic import task_arithmetic
from mergeforge.methods.ties import ties

T = torch.tensor


def call_method(
    name: str, tensors: list, base: torch.Tensor | None, *, seed: int = 0, **params: Any
) -> torch.Tensor:
    """``method_calls.call_method`` for the KNOTS spec (works before it is registered)."""
    assert name == "knots"
    kwargs: dict[str, Any] = {}
    for p in KNOTS.params:
        value = params.pop(p.name, p.default)
        if p.scope == "per_model" and not isinstance(value, tuple):
            value = (value,) * len(tensors)
        kwargs[p.name] = value
    assert not params, params
    return knots(tensors, base, generator=torch.Generator().manual_seed(seed), **kwargs)


def _low_rank(m: int, n: int, k: int, rank: int, seed: int) -> tuple[list, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(m, n, generator=gen)
    ups = [
        torch.randn(m, rank, generator=gen) @ torch.randn(rank, n, generator=gen) for _ in range(k)
    ]
    return [base + u for u in ups], base


def test_hand_computed_ties_case_differs_from_raw_ties() -> None:
    # ΔW1 = [2, 2]ᵀ, ΔW2 = [1, −1]ᵀ: [ΔW1 ΔW2] = [[2, 1], [2, −1]] has orthogonal columns, so
    # V = I, s = (2√2, √2), u1 = (1, 1)/√2, u2 = (1, −1)/√2. Aligned coordinates diag(s) V_tᵀ:
    # Ṽ1 = (2√2, 0), Ṽ2 = (0, √2). TIES keeping 1 of 2 entries per task (density 0.5) drops the
    # round-off zeros; every coordinate then has one task: Ṽ_m = (2√2, √2) and
    # ΔW = U Ṽ_m = 2√2 u1 + √2 u2 = (2, 2) + (1, −1) = (3, 1).
    base = T([[1.0], [-1.0]])
    xs = [base + T([[2.0], [2.0]]), base + T([[1.0], [-1.0]])]
    out = knots(xs, base, weight=(1.0, 1.0), density=(0.5, 0.5))
    torch.testing.assert_close(out, base + T([[3.0], [1.0]]), rtol=0, atol=1e-6)
    # raw TIES on the same updates: entry 0 = mean(2, 1) = 1.5; entry 1: 2 − 1 > 0 keeps 2
    raw = ties(xs, base, weight=(1.0, 1.0), density=(1.0, 1.0))
    torch.testing.assert_close(raw, base + T([[1.5], [2.0]]), rtol=0, atol=1e-6)


def test_alignment_factors_rebuild_every_update() -> None:
    xs, base = _low_rank(7, 5, 3, 2, seed=1)
    deltas = [x - base for x in xs]
    u, s, vhs = subspace_alignment(deltas, 1e-4)
    assert s.numel() == 6  # three rank-2 updates, generic: rank 6 ≤ min(7, 15)
    for d, vh in zip(deltas, vhs, strict=True):
        torch.testing.assert_close((u * s) @ vh, d, rtol=0, atol=1e-5)


def test_one_task_with_task_arithmetic_gives_the_task_model() -> None:
    xs, base = _low_rank(6, 9, 1, 3, seed=2)
    out = call_method("knots", xs, base, inner="task_arithmetic")
    torch.testing.assert_close(out, xs[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_inner_is_plain_task_arithmetic(normalize: bool) -> None:
    # the inner merge is linear, and U diag(s) V_tᵀ = ΔW_t: KnOTS-TA is TA
    xs, base = _low_rank(8, 6, 3, 2, seed=3)
    w = (0.5, 1.5, -0.7)
    out = knots(
        xs, base, weight=w, density=(1.0,) * 3, inner="task_arithmetic", normalize=normalize
    )
    want = task_arithmetic(xs, base, weight=w, normalize=normalize)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)


def test_orthogonal_updates_add_up_under_ties() -> None:
    # column spaces of the updates are mutually orthogonal: every singular triplet of the
    # concatenation belongs to one task, so Ṽ_t is (round-off) zero outside its own rows.
    # density 1/K keeps exactly a task's own r·n entries; each coordinate has one task left, the
    # disjoint mean has nothing to average, and the merge is the sum of the updates.
    gen = torch.Generator().manual_seed(4)
    q, _ = torch.linalg.qr(torch.randn(9, 9, generator=gen))
    k, r, n = 3, 2, 5
    base = torch.randn(9, n, generator=gen)
    ups = [q[:, t * r : (t + 1) * r] @ torch.randn(r, n, generator=gen) for t in range(k)]
    out = knots([base + u for u in ups], base, weight=(1.0,) * k, density=(1 / k,) * k)
    torch.testing.assert_close(out, base + sum(ups), rtol=0, atol=1e-5)


def test_order_invariance_with_order_invariant_inner() -> None:
    xs, base = _low_rank(10, 7, 4, 3, seed=5)
    w, d = (1.0, 0.5, 2.0, 0.8), (0.3, 0.6, 0.9, 0.5)
    out = knots(xs, base, weight=w, density=d)
    perm = [2, 0, 3, 1]
    out_p = knots(
        [xs[i] for i in perm],
        base,
        weight=tuple(w[i] for i in perm),
        density=tuple(d[i] for i in perm),
    )
    torch.testing.assert_close(out_p, out, rtol=0, atol=1e-5)


def test_alpha_scales_the_merged_update() -> None:
    xs, base = _low_rank(6, 6, 2, 2, seed=6)
    one = call_method("knots", xs, base, density=0.5) - base
    out = call_method("knots", xs, base, density=0.5, alpha=0.6) - base
    torch.testing.assert_close(out, 0.6 * one, rtol=0, atol=1e-6)


def test_non_matrix_tensors_use_the_inner_method_on_raw_task_vectors() -> None:
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(11, generator=gen)
    xs = [base + torch.randn(11, generator=gen) for _ in range(3)]
    out = call_method("knots", xs, base, density=0.6, alpha=0.7)
    want = ties(xs, base, weight=(1.0,) * 3, density=(0.6,) * 3, **{"lambda": 0.7})
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    # svd: false does the same for a 2-D tensor
    xs2, base2 = _low_rank(4, 3, 2, 1, seed=8)
    out2 = call_method("knots", xs2, base2, svd=False, inner="task_arithmetic")
    torch.testing.assert_close(out2, task_arithmetic(xs2, base2, weight=(1.0, 1.0), normalize=True))


def test_updates_below_eps_give_the_base() -> None:
    base = torch.randn(5, 4, generator=torch.Generator().manual_seed(9))
    assert torch.equal(call_method("knots", [base.clone(), base.clone()], base), base)
    tiny = 1e-5 * torch.outer(torch.ones(5), torch.ones(4)) / math.sqrt(20)  # s = 1e-5
    out = call_method("knots", [base + tiny], base, inner="task_arithmetic")
    assert torch.equal(out, base)  # dropped at eps = 1e-4
    kept = call_method("knots", [base + tiny], base, inner="task_arithmetic", eps=1e-6)
    assert not torch.equal(kept, base)


def test_dare_inner_at_density_one_is_ties() -> None:
    xs, base = _low_rank(7, 6, 3, 2, seed=10)
    dare = call_method("knots", xs, base, inner="dare_ties", seed=1)
    plain = call_method("knots", xs, base, inner="ties")
    torch.testing.assert_close(dare, plain, rtol=0, atol=1e-6)


def test_deterministic_inners_ignore_the_generator() -> None:
    xs, base = _low_rank(5, 8, 2, 2, seed=11)
    for inner in ("ties", "task_arithmetic"):
        a = call_method("knots", xs, base, inner=inner, density=0.4, seed=1)
        b = call_method("knots", xs, base, inner=inner, density=0.4, seed=2)
        assert torch.equal(a, b)


def test_dare_inner_depends_on_the_seed_only() -> None:
    xs, base = _low_rank(8, 8, 3, 2, seed=12)
    a = call_method("knots", xs, base, inner="dare_linear", density=0.5, seed=1)
    b = call_method("knots", xs, base, inner="dare_linear", density=0.5, seed=1)
    c = call_method("knots", xs, base, inner="dare_linear", density=0.5, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dare_linear_inner_is_unbiased_for_task_arithmetic() -> None:
    # each coordinate kept with probability d and scaled by 1/d: E[Ṽ_m] is the TA coordinate
    xs, base = _low_rank(6, 5, 2, 2, seed=13)
    want = call_method("knots", xs, base, inner="task_arithmetic", normalize=False) - base
    runs = 400
    total = torch.zeros_like(base)
    for seed in range(runs):
        out = call_method(
            "knots", xs, base, inner="dare_linear", density=0.7, normalize=False, seed=seed
        )
        total += out - base
    err = float((total / runs - want).norm() / want.norm())
    assert err < 0.05, err


def test_errors() -> None:
    xs, base = _low_rank(3, 3, 2, 1, seed=14)
    with pytest.raises(MethodError, match="base model"):
        call_method("knots", xs, None)
    with pytest.raises(MethodError, match="unknown inner method 'magic'"):
        call_method("knots", xs, base, inner="magic")
    with pytest.raises(MethodError, match="generator"):
        knots(xs, base, weight=(1.0, 1.0), density=(0.5, 0.5), inner="dare_ties")
    with pytest.raises(MethodError, match="per-model parameter 'weight'"):
        knots(xs, base, weight=(1.0,), density=(0.5, 0.5))


def test_spec() -> None:
    assert KNOTS.name == "knots" and KNOTS.base == "required" and KNOTS.stochastic
    inner = KNOTS.param("inner")
    assert inner is not None and inner.default == "ties"
    assert inner.check("dare_linear") is None and inner.check("slerp") is not None
