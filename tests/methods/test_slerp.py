"""slerp and nuslerp: hand-computed cases, guards, and algebraic properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergeforge.errors import MethodError
from mergeforge.methods import get_method, primitives
from mergeforge.methods.slerp import NUSLERP, SLERP, nuslerp, nuslerp_t, slerp

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
R2 = 1 / math.sqrt(2)


def _t(*rows: object) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


# --- slerp: hand-computed ------------------------------------------------------------------------


def test_orthogonal_unit_vectors_at_half_give_the_normalised_sum() -> None:
    # Ω = π/2: sin(Ω/2)/sin Ω = sin(π/4) = 1/√2 for both
    _close(slerp([_t(0.0, 1.0)], _t(1.0, 0.0), t=0.5), _t(R2, R2))


def test_coefficients_apply_to_the_raw_vectors() -> None:
    # Ω = π/2 for (2, 0) and (0, 3); t = 1/3: c0 = sin(π/3) = √3/2, c1 = sin(π/6) = 1/2
    _close(slerp([_t(0.0, 3.0)], _t(2.0, 0.0), t=1 / 3), _t(math.sqrt(3), 1.5))


def test_sixty_degrees_at_half_gives_the_unit_vector_at_thirty() -> None:
    # Ω = π/3: c = sin(π/6)/sin(π/3) = 1/√3; (1/√3)·(1.5, √3/2) = (√3/2, 1/2)
    v1 = _t(0.5, math.sqrt(3) / 2)
    _close(slerp([v1], _t(1.0, 0.0), t=0.5), _t(math.sqrt(3) / 2, 0.5))


def test_the_angle_is_over_the_whole_tensor_not_per_row() -> None:
    # as 4-vectors: ⟨v0, v1⟩ = 1, norms √2 → Ω = π/3, c = 1/√3; per row it would be
    # [[1/√2, 1/√2], [1, 0]]
    v0, v1 = _t([1.0, 0.0], [1.0, 0.0]), _t([0.0, 1.0], [1.0, 0.0])
    _close(slerp([v1], v0, t=0.5), _t([1.0, 1.0], [2.0, 0.0]) / math.sqrt(3))


def test_colinear_inputs_fall_back_to_lerp() -> None:
    _close(slerp([_t(2.0, 4.0, 6.0)], _t(1.0, 2.0, 3.0), t=0.25), _t(1.25, 2.5, 3.75))


def test_nearly_colinear_inputs_fall_back_to_lerp() -> None:
    # cos Ω = 1/√1.0004 ≈ 0.9998 > 0.9995: lerp gives (1, 0.01); the spherical formula would give
    # sin(Ω/2)/sin Ω · (2, 0.02) ≈ (1.000025, 0.0100005)
    _close(slerp([_t(1.0, 0.02)], _t(1.0, 0.0), t=0.5), _t(1.0, 0.01), tol=1e-7)


def test_antiparallel_inputs_fall_back_to_lerp() -> None:
    _close(slerp([_t(-2.0, 0.0)], _t(1.0, 0.0), t=0.5), _t(-0.5, 0.0))


def test_a_zero_tensor_counts_as_orthogonal() -> None:
    # the zero norm is replaced by 1, so cos Ω = 0 and Ω = π/2 (mergekit): c0 = sin(π/4)
    _close(slerp([torch.zeros(2)], _t(3.0, 4.0), t=0.5), _t(3.0, 4.0) * R2)


def test_small_chunks_give_the_same_angle(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(3)
    v0, v1 = torch.randn(41, 17, generator=g), torch.randn(41, 17, generator=g)
    whole = slerp([v1], v0, t=0.3)
    monkeypatch.setattr(primitives, "CHUNK", 10)  # 70 ragged chunks
    _close(slerp([v1], v0, t=0.3), whole)


def test_slerp_needs_a_base_and_exactly_one_other_model() -> None:
    x = torch.ones(3)
    with pytest.raises(MethodError, match="exactly two models"):
        slerp([x], None, t=0.5)
    with pytest.raises(MethodError, match="got 2 other"):
        slerp([x, x], x, t=0.5)
    with pytest.raises(MethodError, match="shape"):
        slerp([torch.ones(4)], x, t=0.5)


# --- nuslerp: hand-computed ----------------------------------------------------------------------


def test_nuslerp_t_is_the_second_weight_share() -> None:
    assert nuslerp_t((1.0, 3.0)) == 0.75
    assert nuslerp_t((2.0, -0.5)) == pytest.approx(-1 / 3)
    assert nuslerp_t((1.0, -1.0)) == 0.5  # |Σw| < 1e-6


def test_nuslerp_interpolates_at_the_weight_share() -> None:
    # t = 3/4, Ω = π/2: c0 = sin(π/8), c1 = sin(3π/8)
    out = nuslerp([_t(1.0, 0.0), _t(0.0, 1.0)], None, weight=(1.0, 3.0))
    _close(out, _t(math.sin(math.pi / 8), math.sin(3 * math.pi / 8)))


def test_nuslerp_with_a_base_interpolates_task_vectors() -> None:
    # δ0 = (1, 0), δ1 = (0, 1): b + (1/√2, 1/√2)
    out = nuslerp([_t(2.0, 1.0), _t(1.0, 2.0)], _t(1.0, 1.0), weight=(0.5, 0.5))
    _close(out, _t(1 + R2, 1 + R2))


def test_nuslerp_rows_and_columns() -> None:
    v0, v1 = _t([1.0, 0.0], [1.0, 0.0]), _t([0.0, 1.0], [1.0, 0.0])
    w = (1.0, 1.0)
    # rows (vectors along the last axis): row 0 orthogonal → (1, 1)/√2; row 1 identical → (1, 0)
    rows = nuslerp([v0, v1], None, weight=w, nuslerp_flatten=False)
    _close(rows, _t([R2, R2], [1.0, 0.0]))
    # columns (nuslerp_row_wise): column 0 is (1,1) vs (0,1), Ω = π/4, c = sin(π/8)/sin(π/4);
    # column 1 is (0,0) vs (1,0): a zero vector is orthogonal, c = sin(π/4)
    c = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    cols = nuslerp([v0, v1], None, weight=w, nuslerp_flatten=False, nuslerp_row_wise=True)
    _close(cols, _t([c, R2], [2 * c, 0.0]))
    # flattened (default): the whole tensor, like slerp
    _close(nuslerp([v0, v1], None, weight=w), slerp([v1], v0, t=0.5))


def test_nuslerp_uses_the_spherical_formula_up_to_exact_colinearity() -> None:
    # unlike slerp (lerp above cos 0.9995), nuslerp lerps only when 1 − cos² ≤ 1e-16
    theta = math.atan(0.02)
    c = math.sin(theta / 2) / math.sin(theta)
    out = nuslerp([_t(1.0, 0.0), _t(1.0, 0.02)], None, weight=(1.0, 1.0))
    _close(out, _t(2 * c, 0.02 * c), tol=1e-7)
    _close(nuslerp([_t(1.0, 2.0), _t(2.0, 4.0)], None, weight=(3.0, 1.0)), _t(1.25, 2.5))


def test_nuslerp_takes_exactly_two_models() -> None:
    x = torch.ones(3)
    with pytest.raises(MethodError, match="exactly two models"):
        nuslerp([x, x, x], None, weight=(1.0, 1.0, 1.0))
    with pytest.raises(MethodError, match="per-model parameter 'weight'"):
        nuslerp([x, x], None, weight=(1.0,))


# --- properties ----------------------------------------------------------------------------------

shapes = st.sampled_from([(1,), (7,), (3, 5), (2, 3, 4)])
seeds = st.integers(min_value=0, max_value=2**31 - 1)
ts = st.floats(min_value=-0.5, max_value=1.5)


def _pair(seed: int, shape: tuple[int, ...], spread: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g)
    return a, a + spread * torch.randn(shape, generator=g)


@SETTINGS
@given(seed=seeds, shape=shapes, spread=st.sampled_from([0.0, 0.05, 3.0]))
def test_slerp_endpoints_are_exact(seed: int, shape: tuple[int, ...], spread: float) -> None:
    a, b = _pair(seed, shape, spread)
    assert torch.equal(slerp([b], a, t=0.0), a)
    assert torch.equal(slerp([b], a, t=1.0), b)


@SETTINGS
@given(seed=seeds, shape=shapes, t=ts)
def test_merging_a_model_with_itself_returns_it(
    seed: int, shape: tuple[int, ...], t: float
) -> None:
    a, _ = _pair(seed, shape, 0.0)
    _close(slerp([a.clone()], a, t=t), a, tol=1e-5)
    _close(nuslerp([a, a.clone()], None, weight=(1 - t, t)), a, tol=1e-5)
    for flatten, row_wise in ((True, False), (False, False), (False, True)):
        base = a * 0.5
        out = nuslerp(
            [a, a.clone()],
            base,
            weight=(0.3, 0.9),
            nuslerp_flatten=flatten,
            nuslerp_row_wise=row_wise,
        )
        _close(out, a, tol=1e-5)


@SETTINGS
@given(seed=seeds, shape=shapes, t=ts, spread=st.sampled_from([0.05, 3.0]))
def test_swapping_the_ends_reverses_t(
    seed: int, shape: tuple[int, ...], t: float, spread: float
) -> None:
    a, b = _pair(seed, shape, spread)
    _close(slerp([b], a, t=t), slerp([a], b, t=1 - t), tol=1e-5)
    w = (0.4, 0.4 + abs(t))
    for flatten in (True, False):
        one = nuslerp([a, b], None, weight=w, nuslerp_flatten=flatten)
        two = nuslerp([b, a], None, weight=w[::-1], nuslerp_flatten=flatten)
        _close(one, two, tol=1e-5)


@SETTINGS
@given(seed=seeds, shape=shapes, t=st.floats(min_value=0.0, max_value=1.0))
def test_equal_norms_stay_on_the_sphere(seed: int, shape: tuple[int, ...], t: float) -> None:
    a, b = _pair(seed, shape, 3.0)
    b = b * (a.norm() / b.norm())
    if abs(float(torch.dot(a.flatten(), b.flatten()) / a.norm() ** 2)) > 0.9995:
        return  # the lerp fallback (e.g. antipodal one-element tensors) leaves the sphere
    assert float(slerp([b], a, t=t).norm()) == pytest.approx(float(a.norm()), rel=1e-5)


@SETTINGS
@given(seed=seeds, shape=shapes, t=st.floats(min_value=0.05, max_value=0.95))
def test_flattened_nuslerp_is_slerp_away_from_colinear(
    seed: int, shape: tuple[int, ...], t: float
) -> None:
    a, b = _pair(seed, shape, 3.0)
    cos = float(torch.dot(a.flatten(), b.flatten()) / (a.norm() * b.norm()))
    if abs(cos) > 0.999:
        return  # the two methods lerp at different thresholds
    _close(nuslerp([a, b], None, weight=(1 - t, t)), slerp([b], a, t=t), tol=1e-5)


# --- specs ---------------------------------------------------------------------------------------


def test_specs_match_mergekit() -> None:
    assert get_method("slerp") is SLERP and get_method("nuslerp") is NUSLERP
    assert (SLERP.base, SLERP.min_models, SLERP.max_models) == ("required", 1, 1)
    t = SLERP.param("t")
    assert t is not None and t.required and t.scope == "global"
    assert (NUSLERP.base, NUSLERP.min_models, NUSLERP.max_models) == ("optional", 2, 2)
    params = {p.name: (p.scope, p.default, p.required) for p in NUSLERP.params}
    assert params == {
        "weight": ("per_model", None, True),
        "nuslerp_row_wise": ("global", False, False),
        "nuslerp_flatten": ("global", True, False),
    }
    assert not SLERP.stochastic and not NUSLERP.stochastic
