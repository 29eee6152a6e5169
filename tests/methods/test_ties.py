"""Hand-computed cases for ties: trim, sum/count election, disjoint merge, trim_scope model."""

from __future__ import annotations

import pytest
import torch

from mergeforge.errors import MethodError

T = torch.tensor
D1 = T([4.0, -3.0, 2.0, -1.0, 0.5, 0.0])
D2 = T([-5.0, 1.0, 3.0, -2.0, -0.5, 1.0])
D3 = T([1.0, -2.0, -4.0, 0.25, 2.0, -1.0])
ZERO = torch.zeros(6)
ONE = torch.ones(6)
# At density 0.5 (k = 3 of 6) the trimmed task vectors are
#   δ̂1 = [4, -3, 2, 0, 0, 0], δ̂2 = [-5, 0, 3, -2, 0, 0], δ̂3 = [0, -2, -4, 0, 2, 0]
# with column sums -1, -5, 1, -2, 2, 0, so γ = [-, -, +, -, +, +] (a zero sum counts as +).


def _ties(call, base, deltas=(D1, D2, D3), **params):
    params.setdefault("weight", 1.0)
    params.setdefault("density", 0.5)
    return call("ties", [base + d for d in deltas], base, **params)


def test_ties_default_normalize(call) -> None:
    # agreeing entries: {-5}, {-3, -2}, {2, 3}, {-2}, {2}, {} -> means
    assert torch.equal(_ties(call, ZERO), T([-5.0, -2.5, 2.5, -2.0, 2.0, 0.0]))


def test_ties_without_normalize_sums_agreeing_entries(call) -> None:
    assert torch.equal(_ties(call, ZERO, normalize=False), T([-5.0, -5.0, 5.0, -2.0, 2.0, 0.0]))


def test_ties_base_and_lambda(call) -> None:
    out = _ties(call, ONE, **{"lambda": 0.5})  # 1 + 0.5 · [-5, -2.5, 2.5, -2, 2, 0]
    assert torch.equal(out, T([-1.5, -0.25, 2.25, 0.0, 2.0, 1.0]))


def test_ties_count_consensus(call) -> None:
    # sign counts: 0 (-> +), -2, +1, -1, +1, 0: column 0 now elects + and keeps δ̂1's 4
    assert torch.equal(_ties(call, ZERO, consensus="count"), T([4.0, -2.5, 2.5, -2.0, 2.0, 0.0]))


def test_ties_weights_vote_and_divide(call) -> None:
    # Δ2 = 0.5·δ̂2 = [-2.5, 0, 1.5, -1, 0, 0]; sums 1.5, -5, -0.5, -1, 2, 0
    # col 0: + -> 4/1; col 1: (-3-2)/2; col 2: - -> -4/1; col 3: -1/0.5; col 4: 2/1; col 5: 0
    out = _ties(call, ZERO, weight=(1.0, 0.5, 1.0))
    assert torch.equal(out, T([4.0, -2.5, -4.0, -2.0, 2.0, 0.0]))


def test_ties_negative_weight_flips_the_vote(call) -> None:
    # weights (1, -1, 1): Δ2 = [5, 0, -3, 2, 0, 0]; sums 9, -5, -5, 2, 2, 0
    # col 0: (4 + 5)/(1 - 1) -> divisor 0 becomes 1 -> 9; col 1: -5/2; col 2: (-3 - 4)/(-1 + 1) -> -7
    # col 3: 2 / -1 = -2; col 4: 2; col 5: 0
    out = _ties(call, ZERO, weight=(1.0, -1.0, 1.0))
    assert torch.equal(out, T([9.0, -2.5, -7.0, -2.0, 2.0, 0.0]))


def test_ties_density_zero_and_one(call) -> None:
    # δ̂1 = 0: sums -5, -2, -1, -2, 2, 0 -> [-5, -2, -4, -2, 2, 0]
    out = _ties(call, ZERO, density=(0.0, 0.5, 0.5))
    assert torch.equal(out, T([-5.0, -2.0, -4.0, -2.0, 2.0, 0.0]))
    # no trim: sums 0 (-> +), -4, 1, -2.75, 2, 0 (-> +)
    # col 0: (4 + 1)/2; col 1: (-3 - 2)/2; col 2: (2 + 3)/2; col 3: (-1 - 2)/2; col 4: (0.5 + 2)/2
    # col 5: only δ2's 1 agrees -> 1
    out = _ties(call, ZERO, density=1.0)
    assert torch.equal(out, T([2.5, -2.5, 2.5, -1.5, 1.25, 1.0]))


def test_ties_rescale_l1(call) -> None:
    # one model: ‖δ1‖₁ = 10.5, ‖δ̂1‖₁ = 9 -> δ̂1 · 7/6
    out = _ties(call, ZERO, deltas=(D1,), rescale=True)
    torch.testing.assert_close(out, T([14 / 3, -3.5, 7 / 3, 0.0, 0.0, 0.0]), rtol=1e-7, atol=0)


def test_ties_trim_scope_model_uses_given_thresholds(call) -> None:
    # keep |δ| ≥ 2.5: [4, -3, 0..], [-5, 0, 3, 0..], [0, 0, -4, 0..]; sums -1, -3, -1 -> all "-"
    out = _ties(call, ZERO, trim_scope="model", threshold=(2.5, 2.5, 2.5))
    assert torch.equal(out, T([-5.0, -3.0, -4.0, 0.0, 0.0, 0.0]))
    # per-model thresholds: δ1 and δ3 trimmed away entirely, δ2 keeps |δ| ≥ 0.75
    out = _ties(call, ZERO, trim_scope="model", threshold=(4.5, 0.75, 10.0))
    assert torch.equal(out, T([-5.0, 1.0, 3.0, -2.0, 0.0, 1.0]))


def test_ties_trim_scope_tensor_ignores_threshold(call) -> None:
    out = _ties(call, ZERO, trim_scope="tensor", threshold=(9.0, 9.0, 9.0))
    assert torch.equal(out, _ties(call, ZERO))


def test_ties_trim_scope_model_needs_thresholds(call) -> None:
    with pytest.raises(MethodError, match="threshold"):
        _ties(call, ZERO, trim_scope="model")


def test_ties_keeps_exactly_k_when_ties_straddle_the_cut_as_mergekit(call) -> None:
    d = T([3.0, -3.0, 3.0, 1.0])  # density 0.5 -> k = 2, but three entries have |δ| = 3
    out = call("ties", [d], torch.zeros(4), weight=1.0, density=0.5)
    assert int(torch.count_nonzero(out)) == 2 and out[3] == 0
    chosen = torch.argsort(d.abs(), descending=True)[:2]  # mergekit 0.1.5's own choice
    want = torch.zeros(4)
    want[chosen] = d[chosen]
    assert torch.equal(out, want)


def test_ties_ties_on_a_large_tensor_pick_mergekits_subset(call) -> None:
    g = torch.Generator().manual_seed(5)
    d = (torch.randn(200_003, generator=g) * 8).round() / 8  # few distinct magnitudes
    out = call("ties", [d], torch.zeros_like(d), weight=1.0, density=0.37)
    k = int(0.37 * d.numel())
    want = torch.zeros_like(d)
    chosen = torch.argsort(d.abs(), descending=True)[:k]
    want[chosen] = d[chosen]
    assert int(torch.count_nonzero(d[chosen])) == int(torch.count_nonzero(out))
    assert torch.equal(out, want)


def test_ties_matches_reference_on_many_chunks(call) -> None:
    """A tensor spanning several chunks equals the dense (K, n) formula written out here."""
    g = torch.Generator().manual_seed(21)
    base = torch.randn(2, 140_001, generator=g)  # 2 chunks, sampled threshold
    xs = [base + 0.1 * torch.randn(2, 140_001, generator=g) for _ in range(3)]
    w, dens = (0.7, 1.2, -0.4), (0.3, 0.6, 0.9)
    out = call("ties", xs, base, weight=w, density=dens)
    rows = []
    for x, wi, di in zip(xs, w, dens, strict=True):
        delta = (x - base).reshape(-1)
        k = int(di * delta.numel())
        t = torch.kthvalue(delta.abs(), delta.numel() - k + 1).values
        rows.append(wi * delta * (delta.abs() >= t))
    stacked = torch.stack(rows)  # (3, n)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = stacked.sign() == sign
    divisor = (torch.tensor(w)[:, None] * agree).sum(0)
    divisor[divisor == 0] = 1
    expected = base.reshape(-1) + (stacked * agree).sum(0) / divisor
    torch.testing.assert_close(out.reshape(-1), expected, rtol=1e-6, atol=1e-6)


def test_ties_index_tie_break_keeps_the_lowest_indices(call) -> None:
    d = T([3.0, -3.0, 3.0, 1.0, 5.0])  # density 0.4 -> k = 2: 5 and the first of the three 3s
    out = call("ties", [d], torch.zeros(5), weight=1.0, density=0.4, tie_break="index")
    assert torch.equal(out, T([3.0, 0.0, 0.0, 0.0, 5.0]))
