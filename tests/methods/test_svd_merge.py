"""Hand-computed cases and properties of tsv, iso_c and iso_cts (svd_merge.py)."""

from __future__ import annotations

import math

import pytest
import torch

from mergeforge.errors import MethodError
from mergeforge.methods import get_method
from mergeforge.methods.svd_merge import (
    ISO_C,
    ISO_CTS,
    TSV,
    common_size,
    iso_c,
    iso_cts,
    polar_factor,
    tsv,
)

T = torch.tensor
METHODS = (tsv, iso_c, iso_cts)


def _random(shape: tuple[int, ...], count: int, seed: int = 0) -> tuple[list, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    return [base + torch.randn(shape, generator=gen) for _ in range(count)], base


def _outer(u: list[float], v: list[float]) -> torch.Tensor:
    return torch.outer(T(u), T(v))


def test_tsv_orthogonal_rank_one_tasks_add_up() -> None:
    # τ1 = 3 u1 v1ᵀ, τ2 = 2 u2 v2ᵀ with u1 ⟂ u2, v1 ⟂ v2: r = 3, k = int(3/2) = 1 triplet each;
    # U = [u1 u2] and Vᵀ = [v1; v2] are already orthonormal, so TSV = b + α (τ1 + τ2)
    base = torch.ones(4, 3)
    t1 = 3 * _outer([0.6, 0.8, 0.0, 0.0], [1.0, 0.0, 0.0])
    t2 = 2 * _outer([0.0, 0.0, 1.0, 0.0], [0.0, 0.6, -0.8])
    out = tsv([base + t1, base + t2], base, alpha=0.5)
    torch.testing.assert_close(out, base + 0.5 * (t1 + t2), rtol=0, atol=1e-6)


def test_tsv_polar_step_rotates_correlated_directions_apart() -> None:
    # τ1 = 2 e1 e1ᵀ, τ2 = w wᵀ with w at θ = 60°. The polar factor of [e1 w] puts its columns at
    # θ/2 ∓ 45° = −15°, 75°: p1 = (cos 15°, −sin 15°), p2 = (sin 15°, cos 15°), and
    # out = 2 p1 p1ᵀ + p2 p2ᵀ, with cos² 15° = (2 + √3)/4 and sin 15° cos 15° = 1/4:
    # [[2(2+√3)/4 + (2−√3)/4, −2/4 + 1/4], [·, 2(2−√3)/4 + (2+√3)/4]]
    w = [0.5, math.sqrt(3) / 2]
    base = torch.zeros(2, 2)
    out = tsv([2 * _outer([1.0, 0.0], [1.0, 0.0]), _outer(w, w)], base)
    s3 = math.sqrt(3)
    want = T([[(6 + s3) / 4, -0.25], [-0.25, (6 - s3) / 4]])
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)


def test_iso_c_flattens_the_spectrum_of_the_sum() -> None:
    # Σ τ = diag(3, 1): s̄ = 2 -> b + α · 2 I
    base = torch.full((2, 2), 0.5)
    out = iso_c(
        [base + torch.diag(T([3.0, 0.0])), base + torch.diag(T([0.0, 1.0]))], base, alpha=1.5
    )
    torch.testing.assert_close(out, base + 3.0 * torch.eye(2), rtol=0, atol=1e-6)


def test_iso_c_rank_deficient_sum_keeps_its_range() -> None:
    # Σ τ = diag(3, 1, 0): the zero direction is dropped and s̄ = (3 + 1)/2 (FusionBench would put
    # (3 + 1 + 0)/3 on an arbitrary third direction as well)
    base = torch.zeros(3, 3)
    out = iso_c([torch.diag(T([3.0, 0.0, 0.0])), torch.diag(T([0.0, 1.0, 0.0]))], base)
    torch.testing.assert_close(out, torch.diag(T([2.0, 2.0, 0.0])), rtol=0, atol=1e-6)


def test_iso_cts_common_and_task_subspaces() -> None:
    # r = 4, T = 2, f = 0.5: k_c = 2, one task direction each. Σ τ = diag(5, 4, 2, 1) -> common
    # e1 (5), e2 (4). τ1 minus common = diag(0, 0, 2, 1) -> e3 (2); τ2 minus common = 0 -> none.
    # s = [2, ·, 5, 4] -> s̄ = 11/3 on e1, e2, e3. (iso_c would give 3 · I.)
    base = torch.zeros(4, 4)
    t1, t2 = torch.diag(T([5.0, 0.0, 2.0, 1.0])), torch.diag(T([0.0, 4.0, 0.0, 0.0]))
    out = iso_cts([t1, t2], base, common_space_fraction=0.5)
    torch.testing.assert_close(out, torch.diag(T([11 / 3] * 3 + [0.0])), rtol=0, atol=1e-5)
    torch.testing.assert_close(iso_c([t1, t2], base), 3.0 * torch.eye(4), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("rank", "tasks", "fraction", "want"),
    [
        (8, 3, 0.8, 5),  # int(6.4) = 6, round(2/3)·3 = 3 -> 8 − 3
        (5, 2, 0.8, 5),  # int(4.0) = 4, round(0.5) = 0 (half to even) -> all common
        (6, 2, 0.5, 2),  # int(3.0) = 3, round(1.5) = 2 -> 6 − 4
        (3, 2, 0.2, 1),  # int(0.6) = 0, round(1.5)·2 = 4 > 3 -> 2 (FusionBench: −1)
        (10, 1, 1.0, 10),
    ],
)
def test_common_size(rank: int, tasks: int, fraction: float, want: int) -> None:
    assert common_size(rank, tasks, fraction) == want


def test_polar_factor_of_rank_deficient_matrix_is_a_partial_isometry() -> None:
    a = T([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # two equal columns and a zero one
    half = 1 / math.sqrt(2)
    torch.testing.assert_close(polar_factor(a), T([[half, half, 0.0], [0.0, 0.0, 0.0]]))
    assert torch.equal(polar_factor(torch.zeros(3, 2)), torch.zeros(3, 2))


@pytest.mark.parametrize("method", METHODS)
def test_permutation_invariance(method) -> None:
    xs, base = _random((7, 5), 3)
    a = method(xs, base)
    b = method([xs[2], xs[0], xs[1]], base)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_zero_task_vectors_give_the_base(method) -> None:
    base = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(method([base.clone(), base.clone()], base), base)


@pytest.mark.parametrize("method", METHODS)
def test_alpha_scales_the_task_vector(method) -> None:
    xs, base = _random((6, 4), 2)
    one, two = method(xs, base, alpha=1.0) - base, method(xs, base, alpha=2.5) - base
    torch.testing.assert_close(two, 2.5 * one, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(6,), (2, 3, 2)])
def test_non_matrix_tensors_take_the_mean(method, shape: tuple[int, ...]) -> None:
    xs, base = _random(shape, 3)
    want = base + 2.0 * (torch.stack(xs) - base).mean(dim=0)
    torch.testing.assert_close(method(xs, base, alpha=2.0), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_svd_false_takes_the_mean_of_a_matrix(method) -> None:
    xs, base = _random((4, 3), 2)
    want = base + (torch.stack(xs) - base).mean(dim=0)
    torch.testing.assert_close(method(xs, base, svd=False), want, rtol=1e-6, atol=1e-6)


def test_tsv_single_task_is_that_task() -> None:
    # T = 1 keeps every triplet and U, V are already orthonormal: b + α τ
    (x,), base = _random((6, 4), 1)
    torch.testing.assert_close(
        tsv([x], base, alpha=0.5), base + 0.5 * (x - base), atol=1e-5, rtol=0
    )


def test_tsv_identical_tasks_give_the_truncation() -> None:
    # three copies of τ (4 × 6, r = 4): k = 1 each; the three equal columns of U have polar factor
    # u1/√3 (×3), so out = s1 u1 v1ᵀ — deterministic, where FusionBench adds arbitrary directions
    (x,), base = _random((4, 6), 1)
    u, s, vh = torch.linalg.svd(x - base)
    want = base + s[0] * torch.outer(u[:, 0], vh[0])
    torch.testing.assert_close(tsv([x, x, x], base), want, rtol=0, atol=1e-5)


def test_tsv_keeps_nothing_when_rank_is_below_task_count() -> None:
    xs, base = _random((2, 5), 3)  # int(2 · 1/3) = 0 triplets per task, as FusionBench
    assert torch.equal(tsv(xs, base), base)


def test_iso_c_output_has_equal_singular_values() -> None:
    xs, base = _random((7, 5), 3)
    s = torch.linalg.svdvals(iso_c(xs, base) - base)
    torch.testing.assert_close(s, torch.full_like(s, float(s.mean())), rtol=1e-5, atol=0)


def test_iso_cts_output_has_equal_singular_values() -> None:
    xs, base = _random((9, 8), 3)
    s = torch.linalg.svdvals(iso_cts(xs, base) - base)
    torch.testing.assert_close(s, torch.full_like(s, float(s.mean())), rtol=1e-5, atol=0)


def test_single_task_iso_cts_equals_iso_c() -> None:
    # T = 1: common + task directions are all singular directions of τ
    (x,), base = _random((6, 5), 1)
    torch.testing.assert_close(iso_cts([x], base), iso_c([x], base), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_needs_a_base_and_equal_shapes(method) -> None:
    with pytest.raises(MethodError, match="base_model"):
        method([torch.ones(2, 2)], None)
    with pytest.raises(MethodError, match="shape"):
        method([torch.ones(2, 2), torch.ones(2, 3)], torch.zeros(2, 2))


def test_specs() -> None:
    assert ISO_CTS.param("common_space_fraction").check(0.0) is not None
    assert ISO_CTS.param("common_space_fraction").check(1.0) is None
    for spec in (TSV, ISO_C, ISO_CTS):
        assert spec.base == "required" and spec.locality == "tensor"
        assert spec.param("alpha").default == 1.0
        assert get_method(spec.name) is spec
