"""DELLA: keep probabilities by rank (by hand), draws in model order, rescale, properties."""

from __future__ import annotations

import pytest
import torch

from mergeforge.errors import MethodError
from mergeforge.methods import primitives
from mergeforge.methods.sparsify import magprune_probs, rank_layout

T = torch.tensor
B = T([1.0, -1.0, 0.5, 2.0, 0.0, -0.5, 1.5, 3.0])
D1 = T([0.4, -0.2, 0.1, -0.8, 0.3, 0.05, -0.6, 0.7])
D2 = T([-0.3, 0.5, -0.15, 0.2, -0.7, 0.4, 0.1, -0.25])
# |D1| ascending ranks: i5 0, i2 1, i1 2, i4 3, i0 4, i6 5, i7 6, i3 7. With d = 0.5, ε = 0.35:
# p = (0.5 − 0.35) + 2 · 0.35 · r / 7 = 0.15 + 0.1 r
P1 = T([0.55, 0.35, 0.25, 0.85, 0.45, 0.15, 0.65, 0.75])
# |D2| ranks: i6 0, i2 1, i3 2, i7 3, i0 4, i5 5, i1 6, i4 7 -> with d = 0.6, ε = 0.14: 0.46 + 0.04 r
P2 = T([0.62, 0.70, 0.50, 0.54, 0.74, 0.66, 0.46, 0.58])
SEED = 23


def _probs(delta: torch.Tensor, d: float, eps: float) -> torch.Tensor:
    rows, width, inner = rank_layout(delta.shape)
    return magprune_probs(delta.reshape(rows, width, inner), d, eps).reshape(delta.shape)


def _draws(*probs: torch.Tensor, seed: int = SEED) -> list[torch.Tensor]:
    """The masks a DELLA method draws: one Bernoulli(p_i) tensor per model, in order."""
    g = torch.Generator().manual_seed(seed)
    return [torch.bernoulli(p, generator=g) for p in probs]


def test_keep_probabilities_grow_with_rank() -> None:
    torch.testing.assert_close(_probs(D1, 0.5, 0.35), P1, rtol=0, atol=1e-6)
    torch.testing.assert_close(_probs(D2, 0.6, 0.14), P2, rtol=0, atol=1e-6)


def test_rows_are_ranked_separately_along_dim_1() -> None:
    m = T([[1.0, -2.0, 3.0], [30.0, 20.0, -10.0]])
    expected = T([[0.4, 0.5, 0.6], [0.6, 0.5, 0.4]])
    torch.testing.assert_close(_probs(m, 0.5, 0.1), expected, rtol=0, atol=1e-6)
    # 3-D: ranked along dim 1 within each [i, :, j] (mergekit's argsort(dim=1))
    cube = T([[[1.0, 9.0], [3.0, 8.0], [2.0, 7.0]]])  # (1, 3, 2)
    expected = T([[[0.4, 0.6], [0.6, 0.5], [0.5, 0.4]]])
    torch.testing.assert_close(_probs(cube, 0.5, 0.1), expected, rtol=0, atol=1e-6)
    # a lone entry per row sits in the middle: p = d (mergekit 0.1.5 divides 0 by 0 there)
    torch.testing.assert_close(_probs(T([[5.0], [-1.0]]), 0.3, 0.2), T([[0.3], [0.3]]))


def test_della_linear_without_rescale_keeps_the_drawn_entries(call) -> None:
    (m,) = _draws(P1)
    assert 0 < int(m.sum()) < 8
    out = call("della_linear", [B + D1], B, seed=SEED, weight=1.0, density=0.5, epsilon=0.35,
               rescale=False)  # fmt: skip
    torch.testing.assert_close(out, B + D1 * m, rtol=0, atol=1e-6)


def test_della_linear_l1_and_inverse_rescale(call) -> None:
    m1, m2 = _draws(P1, P2)
    args = ([B + D1, B + D2], B)
    params = {"weight": (0.7, 1.5), "density": (0.5, 0.6), "epsilon": (0.35, 0.14)}
    l1 = call("della_linear", *args, seed=SEED, **params)
    r1 = D1 * m1 * (D1.abs().sum() / (D1 * m1).abs().sum())
    r2 = D2 * m2 * (D2.abs().sum() / (D2 * m2).abs().sum())
    torch.testing.assert_close(l1, B + 0.7 * r1 + 1.5 * r2, rtol=1e-6, atol=1e-6)
    inv = call("della_linear", *args, seed=SEED, rescale_mode="inverse", **params)
    expected = B + 0.7 * D1 * m1 / P1 + 1.5 * D2 * m2 / P2
    torch.testing.assert_close(inv, expected, rtol=1e-6, atol=1e-6)


def test_della_elects_signs_and_averages_agreeing_entries(call) -> None:
    m1, m2 = _draws(P1, P2)
    r1 = D1 * m1 * (D1.abs().sum() / (D1 * m1).abs().sum())
    r2 = D2 * m2 * (D2.abs().sum() / (D2 * m2).abs().sum())
    rows = torch.stack([1.0 * r1, -0.5 * r2])  # (2, 8)
    sign = torch.where(rows.sum(0) >= 0, 1.0, -1.0)
    agree = rows.sign() == sign
    divisor = (T([1.0, -0.5]).unsqueeze(1) * agree).sum(0)
    divisor[divisor == 0] = 1
    expected = B + 0.8 * (rows * agree).sum(0) / divisor
    out = call(
        "della", [B + D1, B + D2], B, seed=SEED, weight=(1.0, -0.5), density=(0.5, 0.6),
        epsilon=(0.35, 0.14), **{"lambda": 0.8},
    )  # fmt: skip
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_epsilon_zero_is_dare(call) -> None:
    g = torch.Generator().manual_seed(2)
    base = torch.randn(30, 40, generator=g)
    xs = [base + torch.randn(30, 40, generator=g) for _ in range(2)]
    p = {"weight": (0.6, 0.9), "density": (0.4, 0.7)}
    della = call("della_linear", xs, base, seed=4, epsilon=0.0, **p)
    assert torch.equal(della, call("dare_linear", xs, base, seed=4, **p))
    della = call("della", xs, base, seed=4, epsilon=0.0, normalize=False, **p)
    assert torch.equal(della, call("dare_ties", xs, base, seed=4, **p))


def test_density_one_and_zero(call) -> None:
    xs, w = [B + D1, B + D2], (0.7, -0.4)
    ta = call("task_arithmetic", xs, B, weight=w)
    assert torch.equal(call("della_linear", xs, B, weight=w, density=1.0, epsilon=0.3), ta)
    ties = call("ties", xs, B, weight=w, density=1.0)
    assert torch.equal(call("della", xs, B, weight=w, density=1.0), ties)
    for name in ("della", "della_linear"):
        for mode in ("l1", "inverse"):
            out = call(name, xs, B, weight=1.0, density=0.0, rescale_mode=mode)
            assert torch.equal(out, B)


@pytest.mark.parametrize(("d", "eps"), [(0.1, 0.15), (0.9, 0.15), (0.5, 0.5), (0.5, -0.1)])
def test_probabilities_outside_the_unit_interval_are_refused(d: float, eps: float) -> None:
    from mergeforge.methods.della import della

    with pytest.raises(MethodError, match=r"model #2 .* epsilon"):
        della([B + D1, B + D2], B, weight=(1.0, 1.0), density=(0.5, d), epsilon=(0.1, eps),
              generator=torch.Generator())  # fmt: skip


def test_kept_fraction_and_magnitude_preference(call) -> None:
    g = torch.Generator().manual_seed(6)
    delta = torch.randn(50, 400, generator=g)
    base = torch.zeros(50, 400)
    out = call("della_linear", [delta], base, seed=1, weight=1.0, density=0.4, epsilon=0.2)
    kept = out != 0  # (50, 400)
    n = kept.numel()
    assert abs(float(kept.float().mean()) - 0.4) <= 5 * (0.4 * 0.6 / n) ** 0.5
    ranks = delta.abs().argsort(dim=1).argsort(dim=1)  # (50, 400) 0 = smallest in its row
    low, high = kept[ranks < 40], kept[ranks >= 360]  # bottom / top tenth: p ≈ 0.22 / 0.58
    assert abs(float(low.float().mean()) - 0.219) < 0.05
    assert abs(float(high.float().mean()) - 0.581) < 0.05


def test_inverse_rescale_is_unbiased(call) -> None:
    """E[m ⊙ δ / p] = δ: the mean over many seeds approaches the task vector."""
    delta = torch.linspace(-1.0, 1.0, 40)
    base = torch.zeros(40)
    draws = torch.stack(
        [
            call("della_linear", [delta], base, seed=s, weight=1.0, density=0.4, epsilon=0.2,
                 rescale_mode="inverse")
            for s in range(1500)
        ]
    )  # fmt: skip
    # per entry: std of one draw = |δ|·√((1 − p)/p) ≤ 2|δ| (p ≥ 0.2); of the mean ≤ 0.052|δ|
    err = (draws.mean(0) - delta).abs()
    assert bool((err <= 6 * 2.0 * delta.abs() / 1500**0.5 + 1e-6).all())


def test_l1_rescale_preserves_the_norm(call) -> None:
    g = torch.Generator().manual_seed(8)
    base = torch.randn(40, 100, generator=g)
    delta = torch.randn(40, 100, generator=g)
    out = call("della_linear", [base + delta], base, seed=3, weight=1.0, density=0.3)
    torch.testing.assert_close((out - base).abs().sum(), delta.abs().sum(), rtol=1e-4, atol=0)


def test_seed_and_chunking(call, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 33, generator=g)
    xs = [base + torch.randn(64, 33, generator=g) for _ in range(2)]
    p = {"weight": 1.0, "density": 0.5, "rescale_mode": "inverse"}
    a = call("della", xs, base, seed=1, **p)
    assert torch.equal(a, call("della", xs, base, seed=1, **p))
    assert not torch.equal(a, call("della", xs, base, seed=2, **p))
    monkeypatch.setattr(primitives, "CHUNK", 100)  # slabs of 3 rows, chunks across rows
    assert torch.equal(a, call("della", xs, base, seed=1, **p))


def test_zero_task_vectors_give_the_base(call) -> None:
    for name in ("della", "della_linear"):
        out = call(name, [B.clone(), B.clone()], B, weight=(0.5, 2.0), density=0.4, epsilon=0.1)
        assert torch.equal(out, B)


def test_della_needs_a_generator_and_a_base() -> None:
    from mergeforge.methods.della import della_linear

    with pytest.raises(MethodError, match="generator"):
        della_linear([B + D1], B, weight=(1.0,), density=(0.5,), epsilon=(0.1,))
    with pytest.raises(MethodError, match="base"):
        della_linear([B + D1], None, weight=(1.0,), density=(0.5,), epsilon=(0.1,))
