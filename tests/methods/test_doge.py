"""DOGE (adaptive projective gradient descent): hand-computed pieces and properties."""

from __future__ import annotations

import math

import pytest
import torch

from mergeforge.errors import MethodError
from mergeforge.methods.doge import (
    adaptive_lambdas,
    doge,
    mask_thresholds,
    modifies,
    optimize_delta,
    project_off,
    shared_basis,
    surrogate_grad,
)
from mergeforge.methods.spec import Layer

IN_BLOCK = Layer(1, 4)


def _family(seed: int, k: int, shape: tuple[int, ...], scale: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + scale * (i + 1) * torch.randn(shape, generator=g) for i in range(k)]


def _doge(xs, base, **params):
    params.setdefault("density", (0.3,) * len(xs))
    params.setdefault("trim_scope", "tensor")
    return doge(xs, base, layer=IN_BLOCK, **params)


def test_adaptive_lambda_is_eta_over_the_frobenius_norm() -> None:
    taus = torch.tensor([[[3.0, 4.0]], [[0.0, 0.0]], [[1.0, 0.0]]])  # norms 5, 0, 1
    lams = adaptive_lambdas(taus, 0.07)
    torch.testing.assert_close(lams, torch.tensor([0.014, 0.0, 0.07]))  # 0 for a zero τ


def test_shared_basis_of_a_hand_made_case() -> None:
    """Leading left singular vectors e1 (τ_1) and (1,1)/√2 (τ_2): Ū = [e1, (1,1)/√2] and
    ŪŪᵀ = [[1.5, .5], [.5, .5]], whose top eigenvector is the bisector at π/8."""
    taus = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])
    basis = shared_basis(taus, subspace=2)  # r = 2, q = 1, ⌊2/2⌋ = 1 direction
    assert basis.shape == (2, 1)
    c, s = math.cos(math.pi / 8), math.sin(math.pi / 8)
    want = torch.tensor([[c * c, c * s], [c * s, s * s]])
    torch.testing.assert_close(basis @ basis.T, want, rtol=0, atol=1e-6)


def test_shared_basis_sizes() -> None:
    taus = torch.randn(3, 20, 13, generator=torch.Generator().manual_seed(0))
    basis = shared_basis(taus, 6)  # r = 13: ⌊13/6⌋ = 2 orthonormal columns
    torch.testing.assert_close(basis.T @ basis, torch.eye(2), rtol=0, atol=1e-5)
    assert shared_basis(taus, 20).shape == (20, 0)  # ⌊13/20⌋ = 0: no projection
    assert shared_basis(torch.randn(4, 3, 5), 1).shape == (3, 0)  # q = ⌊3/4⌋ = 0


def test_projected_gradient_is_orthogonal_to_the_basis() -> None:
    base, xs = _family(1, 3, (18, 12))
    taus = torch.stack([x - base for x in xs])
    basis = shared_basis(taus, 3)  # 4 directions
    g = surrogate_grad(taus, adaptive_lambdas(taus, 0.07), torch.randn(18, 12))
    p = project_off(g, basis)
    assert float((basis.T @ g).abs().max()) > 1e-3  # the raw gradient has a shared part
    assert float((basis.T @ p).abs().max()) <= 1e-6 * float(g.abs().max())
    torch.testing.assert_close(project_off(p, basis), p, rtol=0, atol=1e-6)  # idempotent


def test_closed_form_gradient_equals_autograd_of_the_loss() -> None:
    """L(δ) = Σ_j Σ_rows (Σ_cols τ_j ⊙ (τ_j − Σ_i λ_i τ_i − (Σ_i λ_i) δ))², by autograd."""
    base, xs = _family(2, 3, (6, 5), scale=1.0)
    taus = torch.stack([x - base for x in xs])
    lams = adaptive_lambdas(taus, 0.4)
    delta = torch.randn(6, 5, generator=torch.Generator().manual_seed(3), requires_grad=True)
    s = (taus * lams.view(-1, 1, 1)).sum(0)
    loss = sum(((t * (t - s - lams.sum() * delta)).sum(1) ** 2).sum() for t in taus)
    loss.backward()
    torch.testing.assert_close(surrogate_grad(taus, lams, delta.detach()), delta.grad)


def test_one_adam_step_moves_lr_against_the_sign_of_the_projected_gradient() -> None:
    """First Adam step: m̂ = g, v̂ = g², so δ = −lr · g / (|g| + ε) ≈ −lr · sign(g)."""
    base, xs = _family(4, 2, (8, 6), scale=1.0)
    taus = torch.stack([x - base for x in xs])
    lams, basis = adaptive_lambdas(taus, 0.07), shared_basis(taus, 3)
    g = project_off(surrogate_grad(taus, lams, torch.zeros(8, 6)), basis)
    delta = optimize_delta(taus, lams, basis, steps=1, lr=0.01)
    torch.testing.assert_close(delta, -0.01 * g / (g.abs() + 1e-8))


def test_tensor_scope_mask_keeps_the_top_k_and_one_more() -> None:
    """FusionBench's rule: θ = the (n − int(n·d))-th smallest |τ|, keep |τ| ≥ θ (int(n·d) + 1)."""
    tau = (torch.arange(1.0, 11.0) * torch.tensor([1.0, -1.0]).repeat(5)).reshape(1, 2, 5)
    assert mask_thresholds(tau, (0.3,), "tensor", None) == [7.0]  # keeps 7, 8, 9, 10
    assert mask_thresholds(tau, (1.0,), "tensor", None) == [0.0]  # everything
    assert mask_thresholds(tau, (0.05,), "tensor", None) == [10.0]  # int(0.5) = 0: the max
    assert mask_thresholds(tau, (0.3,), "model", (2.5,)) == [2.5]  # the engine's threshold


def test_steps_zero_is_masked_adaptive_task_arithmetic() -> None:
    base, xs = _family(5, 3, (7, 9))
    out = _doge(xs, base, steps=0, eta=0.5, density=(0.3, 0.5, 1.0))
    want = base.clone()
    for x, d in zip(xs, (0.3, 0.5, 1.0), strict=True):
        tau = x - base
        n = tau.numel()
        theta = 0.0 if d >= 1 else float(tau.abs().reshape(-1).kthvalue(n - int(n * d)).values)
        want += 0.5 / float(tau.norm()) * tau * (tau.abs() >= theta)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)


def test_learned_delta_changes_the_merge_only_on_masked_entries() -> None:
    base, xs = _family(6, 3, (12, 10))
    plain = _doge(xs, base, steps=0)
    tuned = _doge(xs, base, steps=50, lr=1e-3)
    assert not torch.equal(plain, tuned)
    kept = torch.zeros(12, 10, dtype=torch.bool)
    for x in xs:
        tau = (x - base).abs()
        kept |= tau >= tau.reshape(-1).kthvalue(120 - 36).values
    assert torch.equal(plain[~kept], tuned[~kept])  # unmasked entries stay at the base


def test_zero_task_vectors_give_the_base() -> None:
    base = torch.randn(6, 8, generator=torch.Generator().manual_seed(7))
    out = _doge([base.clone() for _ in range(3)], base, steps=20)
    assert torch.equal(out, base)


def test_one_zero_task_vector_contributes_nothing() -> None:
    base, xs = _family(8, 2, (6, 8))
    with_zero = _doge([*xs, base.clone()], base, steps=0, density=(0.3, 0.3, 0.3))
    assert bool(torch.isfinite(with_zero).all())  # FusionBench: NaN (η / 0)
    torch.testing.assert_close(with_zero, _doge(xs, base, steps=0), rtol=0, atol=0)


def test_deterministic() -> None:
    base, xs = _family(9, 3, (10, 8))
    assert torch.equal(_doge(xs, base, steps=30), _doge(xs, base, steps=30))


def test_reordering_models_changes_nothing_but_rounding() -> None:
    base, xs = _family(10, 3, (10, 8))
    out = _doge(xs, base, steps=100, density=(0.3, 0.5, 0.7))
    perm = _doge(xs[::-1], base, steps=100, density=(0.7, 0.5, 0.3))
    scale = float((out - base).abs().max())
    assert float((perm - out).abs().max()) <= 1e-4 * scale


@pytest.mark.parametrize(
    ("shape", "layer"),
    [((6, 4), Layer(None, 4)), ((6,), Layer(2, 4)), ((2, 3, 4), Layer(0, 4))],
)
def test_tensors_outside_the_blocks_or_not_2d_stay_the_base(shape, layer) -> None:
    base, xs = _family(11, 2, shape)
    out = doge(xs, base, density=(0.3, 0.3), trim_scope="tensor", layer=layer)
    assert torch.equal(out, base)
    assert not modifies(shape, layer.index)


def test_model_scope_needs_thresholds_and_base_is_required() -> None:
    base, xs = _family(12, 2, (4, 4))
    with pytest.raises(MethodError, match="threshold"):
        doge(xs, base, density=(0.3, 0.3), trim_scope="model", layer=IN_BLOCK)
    with pytest.raises(MethodError, match="base_model"):
        doge(xs, None, density=(0.3, 0.3), trim_scope="tensor")
    with pytest.raises(MethodError, match="density"):
        doge(xs, base, density=(0.3,), trim_scope="tensor")
