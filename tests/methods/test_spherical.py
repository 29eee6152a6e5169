"""multislerp and karcher: hand-computed cases, guards, and algebraic properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergeforge.errors import MethodError
from mergeforge.methods import get_method
from mergeforge.methods.slerp import slerp
from mergeforge.methods.spherical import KARCHER, MULTISLERP, karcher, karcher_mean, multislerp

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
R2 = 1 / math.sqrt(2)


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


# --- multislerp: hand-computed -------------------------------------------------------------------


def test_multislerp_is_the_mean_direction_times_the_mean_norm() -> None:
    # u = (1,0), (0,1); M = (0.25, 0.75), ‖M‖ = √0.625; scale 0.25·1 + 0.75·2 = 1.75
    expected = _t(0.25, 0.75) / math.sqrt(0.625) * 1.75
    _close(multislerp([_t(1.0, 0.0), _t(0.0, 2.0)], None, weight=(1.0, 3.0)), expected)
    base = _t(1.0, 1.0)  # the same task vectors over a base
    out = multislerp([_t(2.0, 1.0), _t(1.0, 3.0)], base, weight=(1.0, 3.0))
    _close(out, base + expected)


def test_multislerp_without_normalised_weights() -> None:
    # w = (1, 3) as given: M = (1, 3), direction (1, 3)/√10, scale 1·1 + 3·2 = 7
    out = multislerp([_t(1.0, 0.0), _t(0.0, 2.0)], None, weight=(1.0, 3.0), normalize_weights=False)
    _close(out, _t(1.0, 3.0) / math.sqrt(10) * 7)


def test_multislerp_of_two_equal_norms_is_slerp_at_the_middle() -> None:
    a, b = _t(3.0, 0.0, 0.0), _t(0.0, 1.8, 2.4)  # both of norm 3
    _close(multislerp([a, b], None, weight=(0.5, 0.5)), slerp([b], a, t=0.5))


def test_multislerp_two_opposed_models_fall_back_to_the_weighted_sum() -> None:
    # directions (1,0) and (−1,0) with equal weights cancel: 0.5·(2,0) + 0.5·(−1,0)
    _close(multislerp([_t(2.0, 0.0), _t(-1.0, 0.0)], None, weight=(1.0, 1.0)), _t(0.5, 0.0))
    base = _t(1.0, -1.0)
    out = multislerp([base + _t(2.0, 0.0), base + _t(-1.0, 0.0)], base, weight=(1.0, 1.0))
    _close(out, base + _t(0.5, 0.0))


def test_multislerp_errors_when_more_directions_cancel() -> None:
    x = _t(1.0, 2.0)
    with pytest.raises(MethodError, match="mean of the 3 directions"):
        multislerp([x, -x, x], None, weight=(1.0, 2.0, 1.0))


def test_multislerp_of_unchanged_models_is_the_base() -> None:
    # all task vectors zero: mergekit raises for > 2 models; the mean of zero vectors is zero
    base = _t(0.5, -2.0, 3.0)
    out = multislerp([base.clone(), base.clone(), base.clone()], base, weight=(1.0, 2.0, 3.0))
    assert torch.equal(out, base)


def test_multislerp_guards() -> None:
    x = _t(1.0, 2.0)
    assert torch.equal(multislerp([x], _t(0.0, 0.0), weight=(0.3,)), x)  # one model: as is
    with pytest.raises(MethodError, match="sum to 0"):
        multislerp([x, 2 * x], None, weight=(1.0, -1.0))
    with pytest.raises(MethodError, match="at least one"):
        multislerp([], None, weight=())


# --- karcher: hand-computed ----------------------------------------------------------------------


def test_karcher_of_two_vectors_is_the_normalised_midpoint_times_the_mean_norm() -> None:
    # units (1,0), (0,1): midpoint (1,1)/√2; mean norm (3 + 1)/2 = 2
    _close(karcher([_t(3.0, 0.0), _t(0.0, 1.0)], None), _t(2 * R2, 2 * R2))


def test_karcher_of_the_axes_is_the_diagonal() -> None:
    # by symmetry the mean of e1, e2, e3 is (1,1,1)/√3; mean norm (1 + 2 + 3)/3 = 2
    xs = [_t(1.0, 0.0, 0.0), _t(0.0, 2.0, 0.0), _t(0.0, 0.0, 3.0)]
    _close(karcher(xs, None), torch.full((3,), 2 / math.sqrt(3)), tol=1e-5)


def test_karcher_on_a_circle_is_the_mean_angle() -> None:
    # on S¹ the Karcher mean of angles φ_i is Σ a_i φ_i (arc length), not the Euclidean mean
    # direction atan2(0.75, 0.25) ≈ 71.57° that multislerp gives
    xs = [_t(1.0, 0.0), _t(0.0, 1.0)]
    phi = 0.75 * math.pi / 2
    out = karcher_mean(xs, (0.25, 0.75), max_iter=50, tol=1e-7)
    _close(out, _t(math.cos(phi), math.sin(phi)), tol=1e-5)
    angles = (0.0, 0.4, 1.2)  # uniform weights: mean angle 1.6/3
    xs = [_t(math.cos(a), math.sin(a)) for a in angles]
    _close(karcher(xs, None, max_iter=50, tol=1e-7), _t(math.cos(1.6 / 3), math.sin(1.6 / 3)))


def test_karcher_without_iterations_is_the_euclidean_mean_direction() -> None:
    out = karcher_mean([_t(1.0, 0.0), _t(0.0, 1.0)], (0.25, 0.75), max_iter=0, tol=1e-5)
    _close(out, _t(0.25, 0.75) / math.sqrt(0.625))


def test_karcher_leaves_zero_inputs_out_of_the_direction_only() -> None:
    # direction of (2,0) and (0,2): (1,1)/√2; scale (2 + 0 + 2)/3
    out = karcher([_t(2.0, 0.0), _t(0.0, 0.0), _t(0.0, 2.0)], None)
    _close(out, _t(R2, R2) * 4 / 3)
    assert torch.equal(karcher([torch.zeros(3), torch.zeros(3)], None), torch.zeros(3))


def test_karcher_guards() -> None:
    x = _t(1.0, 2.0)
    assert torch.equal(karcher([x], None), x)
    with pytest.raises(MethodError, match="at least one"):
        karcher([], None)
    with pytest.raises(MethodError, match="shape"):
        karcher([x, torch.ones(3)], None)


# --- properties ----------------------------------------------------------------------------------

shapes = st.sampled_from([(5,), (3, 4), (2, 3, 2)])
seeds = st.integers(min_value=0, max_value=2**31 - 1)
weight_lists = st.lists(st.floats(min_value=0.1, max_value=2.0), min_size=2, max_size=4)


def _models(seed: int, shape: tuple[int, ...], k: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + torch.randn(shape, generator=g) for _ in range(k)]


def _perm(seed: int, k: int) -> list[int]:
    return torch.randperm(k, generator=torch.Generator().manual_seed(seed + 1)).tolist()


@SETTINGS
@given(seed=seeds, shape=shapes, w=weight_lists, with_base=st.booleans())
def test_multislerp_reordering_models_with_weights_changes_nothing(
    seed: int, shape: tuple[int, ...], w: list[float], with_base: bool
) -> None:
    base, xs = _models(seed, shape, len(w))
    b = base if with_base else None
    out = multislerp(xs, b, weight=tuple(w))
    p = _perm(seed, len(w))
    _close(multislerp([xs[i] for i in p], b, weight=tuple(w[i] for i in p)), out, tol=1e-5)


@SETTINGS
@given(seed=seeds, shape=shapes, w=weight_lists)
def test_karcher_reordering_inputs_with_weights_changes_nothing(
    seed: int, shape: tuple[int, ...], w: list[float]
) -> None:
    _, xs = _models(seed, shape, len(w))
    out = karcher_mean(xs, w, max_iter=10, tol=1e-5)
    p = _perm(seed, len(w))
    _close(karcher_mean([xs[i] for i in p], [w[i] for i in p], max_iter=10, tol=1e-5), out, 1e-5)


@SETTINGS
@given(seed=seeds, shape=shapes, k=st.integers(min_value=1, max_value=4))
def test_merging_copies_returns_the_model(seed: int, shape: tuple[int, ...], k: int) -> None:
    base, (x,) = _models(seed, shape, 1)
    _close(multislerp([x] * k, base, weight=(0.7,) * k), x, tol=1e-5)
    _close(multislerp([x] * k, None, weight=(0.7,) * k), x, tol=1e-5)
    _close(karcher([x] * k, None), x, tol=1e-5)


@SETTINGS
@given(seed=seeds, shape=shapes, w=weight_lists, scale=st.floats(min_value=0.01, max_value=100.0))
def test_scaling_the_inputs_scales_the_result(
    seed: int, shape: tuple[int, ...], w: list[float], scale: float
) -> None:
    _, xs = _models(seed, shape, len(w))
    scaled = [x * scale for x in xs]
    ms = multislerp(xs, None, weight=tuple(w))
    _close(multislerp(scaled, None, weight=tuple(w)), ms * scale, tol=1e-4)
    # and normalised weights make their overall scale irrelevant
    _close(multislerp(xs, None, weight=tuple(v * 3.0 for v in w)), ms, tol=1e-5)
    _close(karcher(scaled, None), karcher(xs, None) * scale, tol=1e-4)


# --- specs ---------------------------------------------------------------------------------------


def test_specs_match_mergekit() -> None:
    assert get_method("multislerp") is MULTISLERP and get_method("karcher") is KARCHER
    assert (MULTISLERP.base, MULTISLERP.min_models, MULTISLERP.max_models) == ("optional", 1, None)
    params = {p.name: (p.scope, p.default, p.required) for p in MULTISLERP.params}
    assert params == {
        "weight": ("per_model", None, True),
        "normalize_weights": ("global", True, False),
        "eps": ("global", 1e-8, False),
    }
    assert KARCHER.base == "unused"  # a base_model is appended as one more ordinary input
    params = {p.name: (p.kind, p.default) for p in KARCHER.params}
    assert params == {"max_iter": ("int", 10), "tol": ("float", 1e-5)}
    assert not MULTISLERP.stochastic and not KARCHER.stochastic
