"""DARE: the masks come from the generator in model order; check the drop/rescale arithmetic."""

from __future__ import annotations

import pytest
import torch

from mergeforge.errors import MethodError

T = torch.tensor
B = T([1.0, -1.0, 0.5, 2.0, 0.0, -0.5, 1.5, 3.0])
D1 = T([0.4, -0.2, 0.1, -0.8, 0.3, 0.05, -0.6, 0.2])
D2 = T([-0.3, 0.5, -0.1, 0.2, -0.7, 0.4, 0.1, -0.2])
SEED = 17


def _masks(densities: tuple[float, ...], n: int = 8, seed: int = SEED) -> list[torch.Tensor]:
    """The masks a DARE method draws: one Bernoulli(d_i) tensor per model, in order."""
    g = torch.Generator().manual_seed(seed)
    return [torch.bernoulli(torch.full((n,), d), generator=g) for d in densities]


def _l1(masked: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return masked * (delta.abs().sum() / masked.abs().sum())


def test_dare_linear_inverse_rescale_is_mask_over_density(call) -> None:
    (m,) = _masks((0.5,))
    assert 0 < int(m.sum()) < 8  # the seed gives a real drop
    out = call(
        "dare_linear", [B + D1], B, seed=SEED, weight=1.0, density=0.5, rescale_mode="inverse"
    )
    torch.testing.assert_close(out, B + D1 * m / 0.5, rtol=1e-6, atol=1e-6)


def test_dare_linear_l1_rescale_two_models(call) -> None:
    m1, m2 = _masks((0.5, 0.3))
    expected = B + 0.7 * _l1(D1 * m1, D1) + 1.5 * _l1(D2 * m2, D2)
    out = call("dare_linear", [B + D1, B + D2], B, seed=SEED, weight=(0.7, 1.5), density=(0.5, 0.3))
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_dare_linear_without_rescale_and_with_normalize(call) -> None:
    m1, m2 = _masks((0.6, 0.6))
    expected = B + (2.0 * D1 * m1 + 1.0 * D2 * m2) / 3.0
    out = call(
        "dare_linear", [B + D1, B + D2], B, seed=SEED,
        weight=(2.0, 1.0), density=0.6, rescale=False, normalize=True,
    )  # fmt: skip
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_dare_ties_elects_sign_on_rescaled_weighted_deltas(call) -> None:
    m1, m2 = _masks((0.5, 0.5))
    rows = torch.stack([1.0 * _l1(D1 * m1, D1), -0.5 * _l1(D2 * m2, D2)])  # (2, 8)
    sign = torch.where(rows.sum(0) >= 0, 1.0, -1.0)
    expected = B + 0.8 * (rows * (rows.sign() == sign)).sum(0)
    out = call(
        "dare_ties", [B + D1, B + D2], B, seed=SEED,
        weight=(1.0, -0.5), density=0.5, **{"lambda": 0.8},
    )  # fmt: skip
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_density_one_is_task_arithmetic_and_ties(call) -> None:
    xs = [B + D1, B + D2]
    w = (0.7, -0.4)
    ta = call("task_arithmetic", xs, B, weight=w)
    assert torch.equal(call("dare_linear", xs, B, weight=w, density=1.0), ta)
    ties = call("ties", xs, B, weight=w, density=1.0, normalize=False)
    assert torch.equal(call("dare_ties", xs, B, weight=w, density=1.0), ties)


def test_density_zero_returns_the_base(call) -> None:
    for name in ("dare_linear", "dare_ties"):
        for mode in ("l1", "inverse"):
            out = call(name, [B + D1, B + D2], B, weight=1.0, density=0.0, rescale_mode=mode)
            assert torch.equal(out, B)


def test_same_seed_same_result_other_seed_other_result(call) -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, generator=g)
    xs = [base + torch.randn(64, generator=g) for _ in range(2)]
    a = call("dare_ties", xs, base, seed=1, weight=1.0, density=0.5)
    assert torch.equal(a, call("dare_ties", xs, base, seed=1, weight=1.0, density=0.5))
    assert not torch.equal(a, call("dare_ties", xs, base, seed=2, weight=1.0, density=0.5))


def test_dare_needs_a_generator_and_a_base() -> None:
    from mergeforge.methods.dare import dare_linear

    with pytest.raises(MethodError, match="generator"):
        dare_linear([B + D1], B, weight=(1.0,), density=(0.5,))
    with pytest.raises(MethodError, match="base"):
        dare_linear([B + D1], None, weight=(1.0,), density=(0.5,))


def test_l1_rescale_preserves_the_task_vector_norm(call) -> None:
    g = torch.Generator().manual_seed(4)
    base = torch.randn(5000, generator=g)
    delta = torch.randn(5000, generator=g)
    out = call("dare_linear", [base + delta], base, seed=3, weight=1.0, density=0.3)
    merged = out - base
    assert 0.6 < float((merged == 0).float().mean()) < 0.8  # about 70% dropped
    torch.testing.assert_close(merged.abs().sum(), delta.abs().sum(), rtol=1e-4, atol=0)


def test_inverse_rescale_is_unbiased(call) -> None:
    """E[m ⊙ δ / d] = δ: the mean over many seeds approaches the task vector."""
    delta = torch.linspace(-1.0, 1.0, 50)
    base = torch.zeros(50)
    draws = torch.stack(
        [
            call("dare_linear", [delta], base, seed=s, weight=1.0, density=0.4,
                 rescale_mode="inverse")
            for s in range(2000)
        ]
    )  # fmt: skip
    # per entry: std of one draw = |δ|·√((1 − d)/d) ≈ 1.22|δ|; of the mean ≈ 0.027|δ|; allow 6σ
    err = (draws.mean(0) - delta).abs()
    assert bool((err <= 6 * 1.23 * delta.abs() / 2000**0.5 + 1e-6).all())
