"""Hand-computed case and properties of RMM, reversible merging of low-rank updates (rmm.py)."""

from __future__ import annotations

import itertools

import pytest
import torch

from mergeforge.errors import MethodError
from mergeforge.methods.rmm import RMM, compress, low_rank_factors, rmm

T = torch.tensor
ARTS = RMM.artifacts
assert ARTS is not None


def _family(
    m: int, n: int, k: int, rank: int | None, seed: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Base + K updates, of the given rank (``None``: full rank)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(m, n, generator=gen)
    if rank is None:
        return [base + torch.randn(m, n, generator=gen) for _ in range(k)], base
    ups = [
        torch.randn(m, rank, generator=gen) @ torch.randn(rank, n, generator=gen) for _ in range(k)
    ]
    return [base + u for u in ups], base


def _recovered(xs: list, base: torch.Tensor, **params: int) -> list[torch.Tensor]:
    _, arts = rmm(xs, base, artifacts=True, **params)
    return [ARTS.recover(arts, base, i, params) for i in range(len(xs))]


def _truncate(delta: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return ((u[:, :r] * s[:r]) @ vh[:r]).float()


def test_hand_computed_case() -> None:
    # Δ1 = diag(4, 1): A1 = B1 = diag(2, 1). Δ2 = diag(1, 4): its top triplet is (e2, 4, e2), so
    # A2 = [[0, 1], [2, 0]], B2 = [[0, 2], [1, 0]]. Rows of A: p = 0 stacks X = [(2, 0), (0, 1)]
    # (columns = models), whose top left singular vector is e1: Q = e1, C = (2, 0), so
    # Â1[0] = (2, 0), Â2[0] = 0; p = 1 stacks [(0, 1), (2, 0)]: Q = e1, C = (0, 2). The columns
    # of B go the same way. With one basis vector each model keeps its top component:
    # Δ̂1 = diag(4, 0), Δ̂2 = diag(0, 4); merged = b + mean = b + diag(2, 2).
    base = T([[1.0, -1.0], [0.5, 2.0]])
    xs = [base + torch.diag(T([4.0, 1.0])), base + torch.diag(T([1.0, 4.0]))]
    merged, arts = rmm(xs, base, rank=2, basis=1, artifacts=True)
    torch.testing.assert_close(merged, base + torch.diag(T([2.0, 2.0])), rtol=0, atol=1e-6)
    rec = [ARTS.recover(arts, base, i, {}) for i in range(2)]
    torch.testing.assert_close(rec[0], base + torch.diag(T([4.0, 0.0])), rtol=0, atol=1e-6)
    torch.testing.assert_close(rec[1], base + torch.diag(T([0.0, 4.0])), rtol=0, atol=1e-6)
    # two basis vectors span both models: exact, merged = b + diag(2.5, 2.5)
    merged2 = rmm(xs, base, rank=2, basis=2)
    assert isinstance(merged2, torch.Tensor)
    torch.testing.assert_close(merged2, base + torch.diag(T([2.5, 2.5])), rtol=0, atol=1e-6)


def test_full_basis_gives_the_rank_r_truncation() -> None:
    xs, base = _family(9, 7, 3, None, seed=1)
    for i, rec in enumerate(_recovered(xs, base, rank=3, basis=3)):
        torch.testing.assert_close(rec - base, _truncate(xs[i] - base, 3), rtol=0, atol=1e-5)


def test_rank_at_least_the_true_rank_recovers_the_inputs() -> None:
    xs, base = _family(10, 6, 4, 2, seed=2)
    for rank in (2, 5, 64):  # 64 > min(m, n): capped at 6
        for i, rec in enumerate(_recovered(xs, base, rank=rank, basis=4)):
            torch.testing.assert_close(rec, xs[i], rtol=0, atol=1e-5)


def test_more_models_than_rank_need_only_r_basis_vectors() -> None:
    xs, base = _family(8, 8, 5, 2, seed=3)
    for i, rec in enumerate(_recovered(xs, base, rank=2, basis=2)):  # k = r = 2 < K = 5
        torch.testing.assert_close(rec, xs[i], rtol=0, atol=1e-5)


def test_reconstruction_error_decreases_with_basis_size() -> None:
    # per position, Q C is the best rank-k fit of X (Eckart–Young): the factor errors shrink
    # monotonically with k and vanish at k = K; so does the rebuilt update's error here
    # (K = 4 models of rank 5 < r: the basis is capped at K, where the fit is exact)
    xs, base = _family(12, 9, 4, 5, seed=4)
    deltas = [x - base for x in xs]
    factors = [low_rank_factors(d, 5) for d in deltas]
    a = torch.stack([f[0] for f in factors], dim=2)  # (m, r, K)
    factor_errs, update_errs = [], []
    for k in range(1, 5):
        arts = compress(deltas, 5, k)
        fit = arts["q_a"] @ arts["c_a"]  # (m, r, K)
        factor_errs.append(float((fit - a).norm()))
        recs = _recovered(xs, base, rank=5, basis=k)
        update_errs.append(sum(float((r - x).norm()) for r, x in zip(recs, xs, strict=True)))
    for errs in (factor_errs, update_errs):
        assert all(e1 > e2 for e1, e2 in itertools.pairwise(errs)), errs
    assert factor_errs[-1] < 1e-9 and update_errs[-1] < 1e-4


def test_merged_is_base_plus_mean_of_the_rebuilt_updates() -> None:
    xs, base = _family(6, 11, 3, 3, seed=5)
    merged, arts = rmm(xs, base, rank=2, basis=2, artifacts=True)
    recs = [ARTS.recover(arts, base, i, {}) for i in range(3)]
    torch.testing.assert_close(merged, base + sum(r - base for r in recs) / 3, rtol=0, atol=1e-5)
    plain = rmm(xs, base, rank=2, basis=2)
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, merged)


def test_reordering_models_reorders_their_reconstructions() -> None:
    xs, base = _family(7, 5, 4, 3, seed=6)
    recs = _recovered(xs, base, rank=3, basis=2)
    perm = [3, 1, 0, 2]
    recs_p = _recovered([xs[i] for i in perm], base, rank=3, basis=2)
    for j, i in enumerate(perm):
        torch.testing.assert_close(recs_p[j], recs[i], rtol=0, atol=1e-5)


def test_factor_signs_are_fixed() -> None:
    xs, base = _family(6, 4, 1, None, seed=7)
    a, b = low_rank_factors(xs[0] - base, 3)
    pivots = a.abs().argmax(dim=0)
    assert bool((a[pivots, torch.arange(3)] > 0).all())
    a2, b2 = low_rank_factors(-(xs[0] - base), 3)  # the same update negated: B flips, A stays
    torch.testing.assert_close(a2, a)
    torch.testing.assert_close(b2, -b)


@pytest.mark.parametrize(
    ("shape", "k", "params"),
    [
        ((9, 7), 3, {"rank": 4, "basis": 2}),
        ((5, 12), 2, {"rank": 16, "basis": 2}),  # rank capped at 5
        ((6, 6), 3, {"rank": 2, "basis": 5}),  # basis capped at min(K, r) = 2
        ((4, 3), 1, {}),  # defaults 16 and 2, capped at r = 3 and K = 1
        ((7,), 3, {"rank": 4, "basis": 2}),
        ((2, 3, 2), 2, {"rank": 4, "basis": 2}),
    ],
)
def test_artifact_shapes_match_what_the_method_returns(
    shape: tuple[int, ...], k: int, params: dict[str, int]
) -> None:
    gen = torch.Generator().manual_seed(8)
    base = torch.randn(shape, generator=gen)
    xs = [base + torch.randn(shape, generator=gen) for _ in range(k)]
    merged, arts = rmm(xs, base, artifacts=True, **params)
    assert merged.shape == base.shape
    got = {key: (tuple(t.shape), t.dtype) for key, t in arts.items()}
    assert got == ARTS.shapes(shape, k, params)
    assert all(t.is_contiguous() for t in arts.values())


def test_non_matrix_tensors_come_back_exactly() -> None:
    gen = torch.Generator().manual_seed(9)
    base = torch.randn(13, generator=gen)
    xs = [base + torch.randn(13, generator=gen) for _ in range(3)]
    merged, arts = rmm(xs, base, artifacts=True)
    torch.testing.assert_close(merged, base + sum(x - base for x in xs) / 3)
    for i, x in enumerate(xs):
        torch.testing.assert_close(ARTS.recover(arts, base, i, {}), x, rtol=0, atol=1e-6)


def test_spec_and_errors() -> None:
    assert RMM.name == "rmm" and RMM.base == "required" and not RMM.stochastic
    assert ARTS.enabled({}) and ARTS.enabled({"rank": 4})
    xs, base = _family(3, 3, 2, 1, seed=10)
    with pytest.raises(MethodError, match="base model"):
        rmm(xs, None)
    with pytest.raises(MethodError, match="at least one model"):
        rmm([], base)
    _, arts = rmm(xs, base, artifacts=True)
    with pytest.raises(MethodError, match="needs the base"):
        ARTS.recover(arts, None, 0, {})
