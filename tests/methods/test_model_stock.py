"""Hand-computed cases and properties of model_stock."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergeforge.errors import MethodError
from mergeforge.methods import primitives
from mergeforge.methods.model_stock import model_stock

T = torch.tensor
ZERO2 = torch.zeros(2)
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def test_two_models_hand_computed() -> None:
    # δ1 = [3, 4], δ2 = [4, 3]: cos = 24 / (5·5) = 0.96, t = 2·0.96 / 1.96 = 48/49,
    # out = 48/49 · [3.5, 3.5] = [24/7, 24/7]
    out = model_stock([T([3.0, 4.0]), T([4.0, 3.0])], ZERO2)
    torch.testing.assert_close(out, T([24 / 7, 24 / 7]))


def test_three_models_average_the_pairwise_cosines() -> None:
    # cosines 0.96, 1, 0.96 -> cos θ = 73/75; t = 3·(73/75) / (1 + 2·73/75) = 219/221;
    # mean = [10/3, 11/3]; with base b: out = t·mean + (1 − t)·b
    base = T([1.0, -1.0])
    xs = [base + T([3.0, 4.0]), base + T([4.0, 3.0]), base + T([3.0, 4.0])]
    t = 219 / 221
    expected = t * (base + T([10 / 3, 11 / 3])) + (1 - t) * base
    torch.testing.assert_close(model_stock(xs, base), expected)


def test_filter_wise_gives_each_row_its_own_ratio() -> None:
    # row 0: δ = [3, 4], [4, 3] -> t = 48/49; row 1: δ = [1, 0], [0, 1] -> cos 0 -> t = 0 (base)
    base = T([[0.0, 0.0], [5.0, 5.0]])
    xs = [base + T([[3.0, 4.0], [1.0, 0.0]]), base + T([[4.0, 3.0], [0.0, 1.0]])]
    out = model_stock(xs, base, filter_wise=True)
    torch.testing.assert_close(out, T([[24 / 7, 24 / 7], [5.0, 5.0]]))
    # flat: δ1 = [3, 4, 1, 0], δ2 = [4, 3, 0, 1]: cos = 24/26, t = (24/13)/(25/13) = 24/25
    flat = model_stock(xs, base)
    t = 24 / 25
    torch.testing.assert_close(flat, t * (xs[0] + xs[1]) / 2 + (1 - t) * base)


def test_negative_cosine_is_not_clamped() -> None:
    # δ1 = [3, 4], δ2 = [-4, -3]: cos = -0.96, t = -1.92 / 0.04 = -48; mean = [-0.5, 0.5]
    out = model_stock([T([3.0, 4.0]), T([-4.0, -3.0])], ZERO2)
    torch.testing.assert_close(out, T([24.0, -24.0]), rtol=1e-4, atol=1e-4)


def test_singular_denominator_keeps_the_base() -> None:
    base = T([1.0, 2.0])
    # two opposite offsets: 1 + (2 − 1)(−1) = 0
    assert torch.equal(model_stock([base + T([1.0, 2.0]), base - T([1.0, 2.0])], base), base)
    # three offsets at 120°: mean cosine −1/2, 1 + 2·(−1/2) = 0 (up to rounding)
    s = 3**0.5 / 2
    xs = [base + T([1.0, 0.0]), base + T([-0.5, s]), base + T([-0.5, -s])]
    assert torch.equal(model_stock(xs, base), base)


def test_zero_offsets_give_the_base() -> None:
    base = T([0.5, -2.0, 3.0])
    assert torch.equal(model_stock([base.clone(), base.clone(), base.clone()], base), base)


def test_needs_a_base_and_two_models() -> None:
    with pytest.raises(MethodError, match="base"):
        model_stock([ZERO2, ZERO2], None)
    with pytest.raises(MethodError, match="at least 2 models"):
        model_stock([ZERO2], ZERO2)


def _family(seed: int, k: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    shared = torch.randn(shape, generator=g)  # correlated fine-tunes: cos θ well above 0
    return base, [base + shared + torch.randn(shape, generator=g) for _ in range(k)]


seeds = st.integers(min_value=0, max_value=2**31 - 1)
shapes = st.sampled_from([(7,), (5, 9), (3, 4, 6)])


@SETTINGS
@given(seed=seeds, k=st.integers(2, 5), shape=shapes, filter_wise=st.booleans(), perm=seeds)
def test_reordering_models_changes_nothing(
    seed: int, k: int, shape: tuple[int, ...], filter_wise: bool, perm: int
) -> None:
    base, xs = _family(seed, k, shape)
    order = torch.randperm(k, generator=torch.Generator().manual_seed(perm)).tolist()
    out = model_stock(xs, base, filter_wise=filter_wise)
    out_p = model_stock([xs[i] for i in order], base, filter_wise=filter_wise)
    torch.testing.assert_close(out_p, out, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(seed=seeds, k=st.integers(2, 5), shape=shapes, filter_wise=st.booleans())
def test_copies_of_one_model_give_that_model(
    seed: int, k: int, shape: tuple[int, ...], filter_wise: bool
) -> None:
    base, (x,) = _family(seed, 1, shape)  # cos θ = 1 -> t = 1
    out = model_stock([x.clone() for _ in range(k)], base, filter_wise=filter_wise)
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(seed=seeds, k=st.integers(2, 4), s=st.floats(0.01, 100.0), filter_wise=st.booleans())
def test_scaling_the_offsets_scales_the_update(
    seed: int, k: int, s: float, filter_wise: bool
) -> None:
    """t depends only on angles, so out − b is linear in a common scale of the offsets."""
    base, xs = _family(seed, k, (4, 6))
    one = model_stock(xs, base, filter_wise=filter_wise) - base
    scaled = model_stock([base + s * (x - base) for x in xs], base, filter_wise=filter_wise)
    torch.testing.assert_close(scaled - base, s * one, rtol=1e-4, atol=1e-4 * s)


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(4099,), (13, 701), (2, 3, 1500)])
def test_chunked_equals_whole(
    monkeypatch: pytest.MonkeyPatch, filter_wise: bool, shape: tuple[int, ...]
) -> None:
    """Blocks of rows, or of one long row, give the whole-tensor result."""
    base, xs = _family(3, 3, shape)
    whole = model_stock(xs, base, filter_wise=filter_wise)
    monkeypatch.setattr(primitives, "CHUNK", 1000)
    torch.testing.assert_close(model_stock(xs, base, filter_wise=filter_wise), whole)
