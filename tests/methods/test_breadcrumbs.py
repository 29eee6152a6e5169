"""Breadcrumbs: the outlier band of each task vector, by hand, and its algebraic properties."""

from __future__ import annotations

import pytest
import torch

from mergeforge.errors import MethodError
from mergeforge.methods import primitives, selection

T = torch.tensor
B = T([1.0, -1.0, 0.5, 2.0, 0.0, -0.5, 1.5, 3.0, -2.0, 0.25])
D1 = T([0.5, -3.0, 2.0, -1.0, 4.0, 0.25, -6.0, 1.5, 3.5, -0.75])
D2 = T([-1.0, 2.0, -0.5, 3.0, -4.0, 0.75, 5.0, -2.5, 0.25, 1.5])
# |D1| ascending: 0.25 (i5) 0.5 (i0) 0.75 (i9) 1 (i3) 1.5 (i7) 2 (i2) 3 (i1) 3.5 (i8) 4 (i4) 6 (i6)
# |D2| ascending: 0.25 (i8) 0.5 (i2) 0.75 (i5) 1 (i0) 1.5 (i9) 2 (i1) 2.5 (i7) 3 (i3) 4 (i4) 5 (i6)
# density 0.5, gamma 0.1 (n = 10): m = 5 kept, n_top = 1, n_bot = 10 − 5 − 1 = 4 -> ranks 4..8
C1 = T([0.0, -3.0, 2.0, 0.0, 4.0, 0.0, 0.0, 1.5, 3.5, 0.0])
C2 = T([0.0, 2.0, 0.0, 3.0, -4.0, 0.0, 0.0, -2.5, 0.0, 1.5])


def _crumbs(call, name="breadcrumbs", deltas=(D1,), **params):
    params.setdefault("weight", 1.0)
    params.setdefault("density", 0.5)
    params.setdefault("gamma", 0.1)
    return call(name, [B + d for d in deltas], B, **params)


def test_band_drops_the_largest_and_the_smallest(call) -> None:
    torch.testing.assert_close(_crumbs(call) - B, C1, rtol=0, atol=1e-6)
    # gamma 0.2: n_top = 2, n_bot = 3 -> ranks 3..7: 1, 1.5, 2, 3, 3.5
    expected = T([0.0, -3.0, 2.0, -1.0, 0.0, 0.0, 0.0, 1.5, 3.5, 0.0])
    torch.testing.assert_close(_crumbs(call, gamma=0.2) - B, expected, rtol=0, atol=1e-6)


def test_fewer_outliers_when_density_and_gamma_exceed_one(call) -> None:
    # density 0.9, gamma 0.2: m = 9, n_top = 2, n_bot = max(0, 10 − 9 − 2) = 0 -> only 6 goes
    out = _crumbs(call, density=0.9, gamma=0.2) - B
    torch.testing.assert_close(out, D1 * (D1.abs() < 6), rtol=0, atol=1e-6)


def test_tiny_density_keeps_nothing_unlike_ties(call) -> None:
    # int(0.05 · 10) = 0: no max(1, ·) here, so the base comes back; ties would keep one entry
    assert torch.equal(_crumbs(call, density=0.05), B)
    ties = call("ties", [B + D1], B, weight=1.0, density=0.05, normalize=False)
    assert int((ties != B).sum()) == 1


def test_breadcrumbs_weighted_sum_and_lambda(call) -> None:
    # C1 + 0.5·C2, doubled by lambda 2
    out = _crumbs(call, deltas=(D1, D2), weight=(1.0, 0.5), **{"lambda": 2.0})
    mixed = T([0.0, -2.0, 2.0, 1.5, 2.0, 0.0, 0.0, 0.25, 3.5, 0.75])
    torch.testing.assert_close(out, B + 2.0 * mixed, rtol=0, atol=1e-6)
    normed = _crumbs(call, deltas=(D1, D2), weight=(1.0, 0.5), normalize=True)
    torch.testing.assert_close(normed, B + mixed / 1.5, rtol=0, atol=1e-6)


def test_breadcrumbs_ties_elects_signs(call) -> None:
    # Δ1 = C1, Δ2 = 0.5·C2 = [0, 1, 0, 1.5, -2, 0, 0, -1.25, 0, 0.75]; sums
    # [0, -2, 2, 1.5, 2, 0, 0, 0.25, 3.5, 0.75] -> γ = [+, -, +, +, +, +, +, +, +, +]
    # agreeing: col1 {-3}, col3 {1.5 (w 0.5)}, col4 {4}, col7 {1.5}, col9 {0.75 (w 0.5)}
    out = _crumbs(call, "breadcrumbs_ties", deltas=(D1, D2), weight=(1.0, 0.5))
    expected = T([0.0, -3.0, 2.0, 1.5, 4.0, 0.0, 0.0, 1.5, 3.5, 0.75])
    torch.testing.assert_close(out - B, expected, rtol=0, atol=1e-6)
    normed = _crumbs(call, "breadcrumbs_ties", deltas=(D1, D2), weight=(1.0, 0.5), normalize=True)
    expected = T([0.0, -3.0, 2.0, 3.0, 4.0, 0.0, 0.0, 1.5, 3.5, 1.5])
    torch.testing.assert_close(normed - B, expected, rtol=0, atol=1e-6)


def test_rescale_matches_the_l1_norm(call) -> None:
    # ‖D1‖₁ = 22.5, ‖C1‖₁ = 14
    out = _crumbs(call, rescale=True) - B
    torch.testing.assert_close(out, C1 * (22.5 / 14.0), rtol=1e-6, atol=1e-6)


TIED = T([2.0, 1.0, 2.0, 1.0, 3.0, 2.0, 2.0])
# n = 7, density 0.5 -> m = 3, gamma 0.15 -> n_top = 1, n_bot = 3: three of the four 2s survive


def test_ties_at_the_cut_index_rule() -> None:
    from mergeforge.methods.breadcrumbs import breadcrumbs

    zero = torch.zeros(7)
    out = breadcrumbs([TIED], zero, weight=(1.0,), density=(0.5,), gamma=(0.15,), tie_break="index")
    # top 4 by |δ|: the 3, then the tied 2s at the lowest indices 0, 2, 5; minus the top 1 (the 3)
    assert torch.equal(out, T([2.0, 0.0, 2.0, 0.0, 0.0, 2.0, 0.0]))


def test_ties_at_the_cut_mergekit_rule_follows_the_ascending_sort() -> None:
    from mergeforge.methods.breadcrumbs import breadcrumbs

    zero = torch.zeros(7)
    out = breadcrumbs([TIED], zero, weight=(1.0,), density=(0.5,), gamma=(0.15,))
    expected = torch.zeros(7)
    window = torch.sort(TIED.abs(), descending=False).indices[3:6]  # what mergekit keeps
    expected[window] = TIED[window]
    assert torch.equal(out, expected)
    assert int((out == 2.0).sum()) == 3


def test_density_one_is_task_arithmetic_and_gamma_zero_is_ties(call) -> None:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(40, generator=g)
    xs = [base + torch.randn(40, generator=g) for _ in range(3)]
    w = (0.7, -0.4, 1.1)
    ta = call("task_arithmetic", xs, base, weight=w)
    assert torch.equal(call("breadcrumbs", xs, base, weight=w, density=1.0), ta)
    d = (0.3, 0.55, 0.8)  # int(d · 40) ≥ 1, so both keep the same top-k
    ties = call("ties", xs, base, weight=w, density=d)
    crumbs = call("breadcrumbs_ties", xs, base, weight=w, density=d, gamma=0.0, normalize=True)
    assert torch.equal(crumbs, ties)


def test_keeps_exactly_the_sorted_window_on_a_big_tensor(
    call, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sampled thresholds and chunked passes (small chunks) keep ascending ranks [n_bot, n_bot+m)."""
    monkeypatch.setattr(primitives, "CHUNK", 4099)
    monkeypatch.setattr(selection, "SELECT_CHUNK", 4099)
    monkeypatch.setattr(selection, "DIRECT_MAX", 1000)
    g = torch.Generator().manual_seed(5)
    base = torch.randn(200, 250, generator=g)
    x = base + torch.randn(200, 250, generator=g)
    n, m, n_top = x.numel(), int(0.3 * 50000), int(0.02 * 50000)
    out = call("breadcrumbs", [x], base, weight=1.0, density=0.3, gamma=0.02)
    kept = (out - base) != 0  # (200, 250)
    order = torch.sort((x - base).abs().flatten()).indices  # (n,) ascending
    expected = torch.zeros(n, dtype=torch.bool)
    expected[order[n - m - n_top : n - n_top]] = True
    assert int(kept.sum()) == m
    assert torch.equal(kept.flatten(), expected)


def test_zero_task_vectors_and_reordering(call) -> None:
    g = torch.Generator().manual_seed(9)
    base = torch.randn(30, generator=g)
    for name in ("breadcrumbs", "breadcrumbs_ties"):
        out = call(name, [base.clone(), base.clone()], base, weight=(0.5, 2.0), density=0.4)
        assert torch.equal(out, base)
    xs = [base + torch.randn(30, generator=g) for _ in range(3)]
    w, d, gm = (0.6, -0.3, 1.2), (0.5, 0.7, 0.3), (0.1, 0.0, 0.2)
    for name in ("breadcrumbs", "breadcrumbs_ties"):
        out = call(name, xs, base, weight=w, density=d, gamma=gm)
        perm = [2, 0, 1]
        out_p = call(
            name, [xs[i] for i in perm], base, weight=tuple(w[i] for i in perm),
            density=tuple(d[i] for i in perm), gamma=tuple(gm[i] for i in perm),
        )  # fmt: skip
        torch.testing.assert_close(out_p, out, rtol=1e-6, atol=1e-6)


def test_bad_gamma_and_missing_base() -> None:
    from mergeforge.methods.breadcrumbs import breadcrumbs, breadcrumbs_ties

    with pytest.raises(MethodError, match=r"gamma .* \[0, 1\], got -0.1"):
        breadcrumbs([B + D1], B, weight=(1.0,), density=(0.5,), gamma=(-0.1,))
    with pytest.raises(MethodError, match="base"):
        breadcrumbs_ties([B + D1], None, weight=(1.0,), density=(0.5,), gamma=(0.1,))
    with pytest.raises(MethodError, match="'gamma' has 2 values for 1 input"):
        breadcrumbs([B + D1], B, weight=(1.0,), density=(0.5,), gamma=(0.1, 0.1))
