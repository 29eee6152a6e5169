"""Hand-computed cases and properties of sce, nearswap, ram, ramplus_tl and arcee_fusion."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergeforge.errors import MethodError
from mergeforge.methods import arcee_fusion as fusion_module
from mergeforge.methods import primitives
from mergeforge.methods.arcee_fusion import arcee_fusion
from mergeforge.methods.nearswap import nearswap
from mergeforge.methods.ram import ram, ramplus_tl
from mergeforge.methods.sce import sce

T = torch.tensor
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
seeds = st.integers(min_value=0, max_value=2**31 - 1)

# ---- sce ----------------------------------------------------------------------------------------
# τ1 = [2, -1, 0, 1], τ2 = [-1, -1, 1, 3]: mean squares 6/4 and 12/4 -> ω = [1/3, 2/3];
# column sums [1, -2, 1, 4] -> γ = [+, -, +, +]; τ1 agrees at 0, 1, 3 (its 0 never agrees),
# τ2 at 1, 2, 3. out = [2·ω1/ω1, (-ω1 - ω2)/(ω1 + ω2), ω2/ω2, (ω1 + 3ω2)/(ω1 + ω2)]
TAU1, TAU2 = T([2.0, -1.0, 0.0, 1.0]), T([-1.0, -1.0, 1.0, 3.0])
ZERO4 = torch.zeros(4)


def test_sce_hand_computed() -> None:
    out = sce([TAU1, TAU2], ZERO4)
    torch.testing.assert_close(out, T([2.0, -1.0, 1.0, 7 / 3]))


def test_sce_select_keeps_the_highest_variance_positions() -> None:
    # variances ((τ1 − τ2)/2)² = [2.25, 0, 0.25, 1]: 3 nonzero, k = int(3·0.7) = 2 -> columns 0, 3.
    # masked τ1 = [2, 0, 0, 1], τ2 = [-1, 0, 0, 3]: mean squares 5/4, 10/4 -> ω = [1/3, 2/3] again
    base = T([0.5, 0.5, 0.5, 0.5])
    out = sce([base + TAU1, base + TAU2], base, select_topk=0.7)
    torch.testing.assert_close(out, base + T([2.0, 0.0, 0.0, 7 / 3]))


def test_sce_tiny_task_vectors_get_uniform_weights() -> None:
    # mean squares ~1e-8 sum to less than 1e-6 -> ω = [1/2, 1/2]: column 3 becomes (1 + 3)/2
    out = sce([TAU1 * 1e-4, TAU2 * 1e-4], ZERO4)
    torch.testing.assert_close(out, T([2.0, -1.0, 1.0, 2.0]) * 1e-4)


def test_sce_select_nothing_gives_the_base() -> None:
    base = T([1.0, 2.0, 3.0, 4.0])
    assert torch.equal(sce([base + TAU1, base + TAU2], base, select_topk=0.0), base)


def test_sce_identical_models() -> None:
    base, x = ZERO4, T([1.0, -2.0, 0.5, 3.0])
    torch.testing.assert_close(sce([x, x, x], base), x)
    # no position varies, so selection keeps none of them (mergekit): the base
    assert torch.equal(sce([x, x, x], base, select_topk=0.5), base)


def test_sce_needs_a_base() -> None:
    with pytest.raises(MethodError, match="base_model"):
        sce([TAU1], None)


def _family(seed: int, k: int, n: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    return base, [base + scale * torch.randn(n, generator=g) for _ in range(k)]


@SETTINGS
@given(seed=seeds, k=st.integers(1, 4), n=st.integers(1, 40), topk=st.floats(0.0, 1.0), perm=seeds)
def test_sce_reordering_models_changes_nothing(
    seed: int, k: int, n: int, topk: float, perm: int
) -> None:
    base, xs = _family(seed, k, n)
    order = torch.randperm(k, generator=torch.Generator().manual_seed(perm)).tolist()
    out = sce(xs, base, select_topk=topk)
    torch.testing.assert_close(sce([xs[i] for i in order], base, select_topk=topk), out)


@SETTINGS
@given(seed=seeds, k=st.integers(1, 4), n=st.integers(1, 40), topk=st.floats(0.0, 1.0))
def test_sce_models_equal_to_the_base_give_the_base(seed: int, k: int, n: int, topk: float) -> None:
    base = _family(seed, 0, n)[0]
    assert torch.equal(sce([base.clone() for _ in range(k)], base, select_topk=topk), base)


@SETTINGS
@given(seed=seeds, k=st.integers(2, 4), s=st.floats(0.1, 10.0), topk=st.floats(0.2, 1.0))
def test_sce_update_is_linear_in_a_common_scale(seed: int, k: int, s: float, topk: float) -> None:
    """Selection, weights and signs are scale-free while the weights' sum stays above 1e-6."""
    base, xs = _family(seed, k, 30)
    one = sce(xs, base, select_topk=topk) - base
    scaled = sce([base + s * (x - base) for x in xs], base, select_topk=topk) - base
    torch.testing.assert_close(scaled, s * one, rtol=1e-4, atol=1e-5 * s)


# ---- nearswap -----------------------------------------------------------------------------------


def test_nearswap_hand_computed() -> None:
    # |a − b| = [0.5, 2, 0.1, 0]; w = clamp(0.5 / max(|a − b|, 1e-6), 0, 1) = [1, 0.25, 1, 1]
    a, b = T([0.0, 0.0, 0.0, 1.0]), T([0.5, 2.0, -0.1, 1.0])
    torch.testing.assert_close(nearswap([b], a, t=0.5), T([0.5, 0.5, -0.1, 1.0]))


@SETTINGS
@given(seed=seeds, n=st.integers(1, 50), t=st.floats(0.0, 5.0))
def test_nearswap_stays_between_the_two_models(seed: int, n: int, t: float) -> None:
    a, (b,) = _family(seed, 1, n)
    out = nearswap([b], a, t=t)
    assert bool(
        (out >= torch.minimum(a, b) - 1e-6).all() and (out <= torch.maximum(a, b) + 1e-6).all()
    )
    if t == 0:
        assert torch.equal(out, a)
    close = (a - b).abs() <= t
    torch.testing.assert_close(out[close], b[close])


def test_nearswap_clamps_tiny_differences() -> None:
    # |a − b| = [4e-7, 2e-6] -> max(·, 1e-6) = [1e-6, 2e-6]; t = 1e-7 -> w = [0.1, 0.05]
    a, b = torch.zeros(2), T([4e-7, 2e-6])
    torch.testing.assert_close(nearswap([b], a, t=1e-7), T([4e-8, 1e-7]), rtol=1e-5, atol=0)


def test_nearswap_takes_exactly_one_model_and_a_base() -> None:
    x = torch.zeros(3)
    with pytest.raises(MethodError, match="exactly one model"):
        nearswap([x, x], x, t=0.1)
    with pytest.raises(MethodError, match="no base"):
        nearswap([x], None, t=0.1)


# ---- ram / ramplus_tl ---------------------------------------------------------------------------
# ε = 0.1. Active entries (|τ| > ε):
#   τ1 = [1, 0.05, 2, 0, -1]    T F T F T
#   τ2 = [0, 0,    4, 0.2, 3]   F F T T T
#   τ3 = [0, 0.05, 0, 0, -2]    F F F F T     counts c = [1, 0, 2, 1, 3]
# ram: [1 (unique), 0 (untouched: 0.05 < ε), (2 + 4)/2, 0.2 (unique), (-1 + 3 - 2)/3]
RAM_TAUS = [
    T([1.0, 0.05, 2.0, 0.0, -1.0]),
    T([0.0, 0.0, 4.0, 0.2, 3.0]),
    T([0.0, 0.05, 0.0, 0.0, -2.0]),
]
ZERO5 = torch.zeros(5)


def test_ram_hand_computed() -> None:
    torch.testing.assert_close(ram(RAM_TAUS, ZERO5, epsilon=0.1), T([1.0, 0.0, 3.0, 0.2, 0.0]))


def test_ramplus_scales_unique_updates() -> None:
    # τ1: shared 2 (cols 2, 4), unique 1 (col 0) -> ρ = 2; τ2: shared 2, unique 1 (col 3) -> ρ = 2;
    # τ3 has no unique entry (λ irrelevant). Defaults r = 0.1, α = 0.2: λ = 1 + 0.1·min(2, 0.2)
    out = ramplus_tl(RAM_TAUS, ZERO5, epsilon=0.1)
    torch.testing.assert_close(out, T([1.02, 0.0, 3.0, 0.204, 0.0]))
    # r = 0.5, α = 3: λ = 1 + 0.5·2 = 2 for τ1 and τ2
    out = ramplus_tl(RAM_TAUS, ZERO5, epsilon=0.1, r=0.5, alpha=3.0)
    torch.testing.assert_close(out, T([2.0, 0.0, 3.0, 0.4, 0.0]))
    # r = 0: RAM
    torch.testing.assert_close(
        ramplus_tl(RAM_TAUS, ZERO5, epsilon=0.1, r=0.0), ram(RAM_TAUS, ZERO5, epsilon=0.1)
    )


def test_ram_threshold_is_strict() -> None:
    # |τ| must exceed ε: an entry equal to it is not an update
    base = torch.zeros(2)
    assert torch.equal(ram([T([0.25, 0.5])], base, epsilon=0.25), T([0.0, 0.5]))


def test_ramplus_with_zero_epsilon_stays_finite() -> None:
    # ε = 0: τ3's unique count 0 would divide by 0 (mergekit: NaN); its λ multiplies nothing
    out = ramplus_tl(RAM_TAUS, ZERO5, epsilon=0.0)
    assert bool(torch.isfinite(out).all())


def test_ram_with_disjoint_supports_is_the_sum() -> None:
    taus = [T([1.0, 0.0, 0.0]), T([0.0, -2.0, 0.0]), T([0.0, 0.0, 3.0])]
    base = T([1.0, 1.0, 1.0])
    assert torch.equal(ram([base + t for t in taus], base), base + sum(taus))


def test_ram_needs_a_base() -> None:
    with pytest.raises(MethodError, match="base_model"):
        ram(RAM_TAUS, None)


@SETTINGS
@given(seed=seeds, k=st.integers(1, 4), n=st.integers(1, 40), perm=seeds, plus=st.booleans())
def test_ram_reordering_models_changes_nothing(
    seed: int, k: int, n: int, perm: int, plus: bool
) -> None:
    base, xs = _family(seed, k, n)
    xs = [torch.where(x - base > 0.3, x, base) for x in xs]  # sparse: unique and shared entries
    fn = ramplus_tl if plus else ram
    order = torch.randperm(k, generator=torch.Generator().manual_seed(perm)).tolist()
    torch.testing.assert_close(fn([xs[i] for i in order], base), fn(xs, base))


@SETTINGS
@given(seed=seeds, k=st.integers(1, 4), n=st.integers(1, 40), plus=st.booleans())
def test_ram_copies_of_one_model_give_that_model(seed: int, k: int, n: int, plus: bool) -> None:
    """Every active entry is shared by all k copies (or unique when k = 1): the model itself."""
    base, (x,) = _family(seed, 1, n)
    fn = ramplus_tl if plus else ram
    active = (x - base).abs() > 1e-5
    torch.testing.assert_close(fn([x.clone() for _ in range(k)], base)[active], x[active])


def test_ram_chunked_equals_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    base, xs = _family(4, 3, 10_007)
    xs = [torch.where(x - base > 0.5, x, base) for x in xs]
    whole = (ram(xs, base), ramplus_tl(xs, base), sce(xs, base, select_topk=0.3))
    monkeypatch.setattr(primitives, "CHUNK", 999)
    chunked = (ram(xs, base), ramplus_tl(xs, base), sce(xs, base, select_topk=0.3))
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(b, a)


# ---- arcee_fusion -------------------------------------------------------------------------------


def test_arcee_fusion_takes_only_the_outlier_change() -> None:
    # One row: importance = KL · |b − a| with one KL > 0, so the threshold is KL times that of
    # |d| = [0.2, 10, 0.1, 0.4, 0.3]: sorted [0.1, 0.2, 0.3, 0.4, 10], ranks floor(q·4) = 1, 2, 3
    # -> median 0.3 + 1.5·(0.4 − 0.2) = 0.6: only the 10 is taken.
    a = T([0.5, -1.0, 2.0, 0.0, 1.0])
    d = T([0.2, 10.0, -0.1, 0.4, -0.3])
    out = arcee_fusion([a + d], a)
    assert torch.equal(out, torch.where(d.abs() > 1, a + d, a))


def test_arcee_fusion_ignores_rows_whose_distribution_is_unchanged() -> None:
    # Row 0 shifts by a constant: softmax (and so KL) unchanged -> importance 0 despite |d| = 3.
    # Row 1 as above with |d| = [0.1, 1, 0.2, 0.25, 5]. The 10 importances sorted: five zeros, then
    # KL·[0.1, 0.2, 0.25, 1, 5]; ranks floor(q·9) = 2, 4, 6 -> 0, 0, 0.2·KL: threshold 0.3·KL.
    a = T([[0.5, -1.0, 2.0, 0.0, 1.0], [0.5, -1.0, 2.0, 0.0, 1.0]])
    d = T([[3.0, 3.0, 3.0, 3.0, 3.0], [0.1, -1.0, 0.2, 0.25, 5.0]])
    out = arcee_fusion([a + d], a)
    taken = T([[False] * 5, [False, True, False, False, True]])
    assert torch.equal(out, torch.where(taken, a + d, a))


def test_arcee_fusion_zero_threshold_takes_everything() -> None:
    # Rows 0-2 shift by a constant (KL 0, importance 0 although |d| > 0), row 3 changes shape:
    # 12 importances, 9 of them 0, so all three quartiles (ranks 2, 5, 8) are 0 and the threshold
    # is 0. importance ≥ 0 holds everywhere: the whole model is taken (mergekit's rule).
    a = torch.zeros(4, 3)
    b = T([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0], [0.5, 0.5, 0.5], [1.0, -2.0, 0.5]])
    assert torch.equal(arcee_fusion([b], a), b)
    assert torch.equal(arcee_fusion([a.clone()], a), a)  # self-merge


def test_arcee_fusion_samples_only_large_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    base, (x,) = _family(9, 1, 400)
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    arcee_fusion([x], base, generator=g)  # 400 ≤ SAMPLE_SIZE: no draws
    assert torch.equal(g.get_state(), state)
    monkeypatch.setattr(fusion_module, "SAMPLE_SIZE", 50)
    outs = [
        arcee_fusion([x], base, generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2, 3)
    ]
    assert torch.equal(outs[0], outs[1])  # seeded: reproducible
    assert not (torch.equal(outs[0], outs[2]) and torch.equal(outs[0], outs[3]))
    with pytest.raises(MethodError, match="generator"):
        arcee_fusion([x], base)


def test_arcee_fusion_takes_exactly_one_model_and_a_base() -> None:
    x = torch.zeros(3)
    with pytest.raises(MethodError, match="exactly one model"):
        arcee_fusion([x, x], x)
    with pytest.raises(MethodError, match="no base"):
        arcee_fusion([x], None)


def test_arcee_fusion_chunked_equals_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    base, (x,) = _family(2, 1, 6000)
    base, x = base.reshape(40, 150), x.reshape(40, 150)
    whole = arcee_fusion([x], base)
    monkeypatch.setattr(primitives, "CHUNK", 1000)
    assert torch.equal(arcee_fusion([x], base), whole)


@pytest.mark.parametrize("shape", [(0, 4), ()])
@pytest.mark.parametrize(
    "merge",
    [
        lambda xs, b: sce(xs, b, select_topk=0.5),
        lambda xs, b: nearswap(xs[:1], b, t=0.5),
        lambda xs, b: ram(xs, b),
        lambda xs, b: ramplus_tl(xs, b),
        lambda xs, b: arcee_fusion(xs[:1], b),
    ],
    ids=["sce", "nearswap", "ram", "ramplus_tl", "arcee_fusion"],
)
def test_empty_and_scalar_tensors(shape: tuple[int, ...], merge) -> None:
    base = torch.full(shape, 1.5)
    out = merge([base + 1, base + 2], base)
    assert out.shape == base.shape and bool(torch.isfinite(out).all())
