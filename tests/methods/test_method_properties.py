"""Algebraic properties of the methods, over random inputs (hypothesis drives sizes and params)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from method_calls import call_method

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
GTA = ("task_arithmetic", "ties", "dare_linear", "dare_ties")

ks = st.integers(min_value=1, max_value=4)
sizes = st.integers(min_value=1, max_value=40)
seeds = st.integers(min_value=0, max_value=2**31 - 1)
weights = st.floats(min_value=0.1, max_value=2.0)
signed_weights = st.one_of(weights, weights.map(lambda w: -w))
densities = st.floats(min_value=0.05, max_value=1.0)


def _family(seed: int, k: int, n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    return base, [base + torch.randn(n, generator=g) for _ in range(k)]


@SETTINGS
@given(seed=seeds, n=sizes, w=st.lists(weights, min_size=1, max_size=4))
def test_linear_of_copies_is_the_copy(seed: int, n: int, w: list[float]) -> None:
    x = _family(seed, 0, n)[0]
    out = call_method("linear", [x] * len(w), None, weight=tuple(w))
    torch.testing.assert_close(out, x, rtol=1e-6, atol=1e-6)


@SETTINGS
@given(
    method=st.sampled_from(GTA),
    seed=seeds,
    n=sizes,
    w=st.lists(signed_weights, min_size=1, max_size=4),
    d=densities,
    normalize=st.booleans(),
)
def test_models_equal_to_the_base_give_the_base(
    method: str, seed: int, n: int, w: list[float], d: float, normalize: bool
) -> None:
    base = _family(seed, 0, n)[0]
    params = {"weight": tuple(w), "density": d, "normalize": normalize, "lambda": 1.7}
    out = call_method(method, [base.clone() for _ in w], base, seed=seed, **params)
    assert torch.equal(out, base)


@SETTINGS
@given(method=st.sampled_from(GTA), seed=seeds, n=sizes, k=ks, w=weights)
def test_identical_models_with_normalize_give_the_model(
    method: str, seed: int, n: int, k: int, w: float
) -> None:
    base, (x,) = _family(seed, 1, n)
    out = call_method(method, [x] * k, base, weight=w, density=1.0, normalize=True)
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(
    method=st.sampled_from(("linear", *GTA)),
    seed=seeds,
    n=sizes,
    params=st.lists(st.tuples(signed_weights, densities), min_size=2, max_size=4),
    perm_seed=seeds,
    consensus=st.sampled_from(("sum", "count")),
)
def test_reordering_models_with_their_params_changes_nothing(
    method: str,
    seed: int,
    n: int,
    params: list[tuple[float, float]],
    perm_seed: int,
    consensus: str,
) -> None:
    base, xs = _family(seed, len(params), n)
    w, d = zip(*params, strict=True)
    if method.startswith("dare"):
        d = (1.0,) * len(d)  # random masks are drawn in model order: compare without drops
    extra = {"consensus": consensus} if method in ("ties", "dare_ties") else {}
    if method == "linear":
        base, w = None, tuple(abs(v) for v in w)  # keep Σw away from 0
    else:
        extra["density"] = d
    out = call_method(method, xs, base, weight=tuple(w), **extra)
    perm = torch.randperm(len(xs), generator=torch.Generator().manual_seed(perm_seed)).tolist()
    out_p = call_method(
        method,
        [xs[i] for i in perm],
        base,
        weight=tuple(w[i] for i in perm),
        **{**extra, "density": tuple(d[i] for i in perm)} if "density" in extra else extra,
    )
    torch.testing.assert_close(out_p, out, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(seed=seeds, n=sizes, k=ks, lam=st.floats(min_value=-3.0, max_value=3.0))
def test_task_arithmetic_is_linear_in_lambda(seed: int, n: int, k: int, lam: float) -> None:
    base, xs = _family(seed, k, n)
    one = call_method("task_arithmetic", xs, base, weight=0.5) - base
    out = call_method("task_arithmetic", xs, base, weight=0.5, **{"lambda": lam}) - base
    torch.testing.assert_close(out, lam * one, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(seed=seeds, n=sizes, k=ks, consensus=st.sampled_from(("sum", "count")))
def test_ties_mean_lies_between_zero_and_the_extreme_deltas(
    seed: int, n: int, k: int, consensus: str
) -> None:
    """With weights 1 and normalize, each entry is a mean of same-signed deltas (or 0)."""
    base, xs = _family(seed, k, n)
    out = call_method("ties", xs, base, weight=1.0, density=0.6, consensus=consensus)
    deltas = torch.stack([x - base for x in xs])  # (k, n)
    merged = out - base
    assert bool((merged <= deltas.max(0).values.clamp(min=0) + 1e-5).all())
    assert bool((merged >= deltas.min(0).values.clamp(max=0) - 1e-5).all())
