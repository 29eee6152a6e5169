"""Means of several tensors on the hypersphere: ``multislerp`` and ``karcher``.

Both treat each whole tensor as one vector, split it into a norm ``n_i = ‖x_i‖`` and a direction
``u_i = x_i / n_i``, average the directions on the unit sphere and rescale by the weighted mean
norm ``Σ_i w_i n_i``. They differ in the average:

* ``multislerp`` (C. Goddard, https://goddard.blog/posts/multislerp-wow-what-a-cool-idea): the
  normalised weighted Euclidean mean of the directions, ``m = Σ w_i u_i / ‖Σ w_i u_i‖``;
* ``karcher``: the weighted Karcher (Riemannian, Fréchet) mean, the point of the sphere that
  minimises ``Σ w_i θ_i²`` (θ_i the geodesic distance to u_i), found by fixed-point iteration
  (Karcher 1977, "Riemannian center of mass and mollifier smoothing", CPAM 30; for model
  merging: arXiv 2603.04972).

Semantics and guards are mergekit 0.1.5 ``multislerp.py`` and ``karcher.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mergeforge.errors import MethodError
from mergeforge.methods.primitives import check_inputs
from mergeforge.methods.slerp import flat_dot
from mergeforge.methods.spec import MethodSpec, ParamSpec


def multislerp(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    *,
    weight: Sequence[float],
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> Tensor:
    """Weighted spherical mean of K tensors (of their task vectors ``δ_i = x_i − b`` with a base)::

        w_i ← w_i / Σ_j w_j                 (normalize_weights)
        n_i = ‖δ_i‖,  u_i = δ_i / (n_i + ε),  M = Σ_i w_i u_i
        out = b + (Σ_i w_i n_i) · M / ‖M‖

    mergekit then projects the ``u_i`` onto the tangent space at ``m = M/‖M‖``, sums them with the
    weights and maps the sum back with the exponential map. That sum is identically zero,
    ``Σ w_i (u_i − ⟨u_i, m⟩ m) = M − ⟨M, m⟩ m = 0``, so the map returns m and the formula above is
    the same result (it differs from mergekit's only by float rounding, ~1e-7 relative).

    One model: returned as is. ``‖M‖ < ε``: with two models (or all task vectors zero) the
    weighted sum ``b + Σ w_i δ_i``; otherwise ``MethodError`` (the directions cancel out).
    """
    if not tensors:
        raise MethodError("multislerp needs at least one model besides the base; add models.")
    check_inputs("multislerp", tensors, base, weight=weight)
    if len(tensors) == 1:
        return tensors[0].clone()
    w = torch.tensor(list(weight), dtype=tensors[0].dtype, device=tensors[0].device)  # (K,)
    if normalize_weights:
        if float(w.sum()) == 0.0:
            raise MethodError(
                f"multislerp: the weights {list(weight)} sum to 0, so normalize_weights: true "
                "would divide by zero. Change the weights, or set normalize_weights: false."
            )
        w = w / w.sum()
    norms = []
    mixed = torch.zeros_like(tensors[0])  # M, same shape as the inputs
    for x, wi in zip(tensors, w, strict=True):
        delta = x if base is None else x - base  # (...)
        norm = torch.linalg.vector_norm(delta)  # ()
        # w_i · u_i rounded step by step (no fused multiply-add), so that exactly opposed inputs
        # cancel exactly and hit the ‖M‖ < ε branch, as in mergekit
        mixed.add_(torch.div(delta, norm + eps).mul_(wi))
        norms.append(norm)
    mean_norm = torch.linalg.vector_norm(mixed)  # ()
    if float(mean_norm) < eps:
        return _multislerp_fallback(tensors, base, w, torch.stack(norms), eps)
    out = mixed.mul_((w * torch.stack(norms)).sum() / mean_norm)
    return out if base is None else out.add_(base)


def _multislerp_fallback(
    tensors: Sequence[Tensor], base: Tensor | None, w: Tensor, norms: Tensor, eps: float
) -> Tensor:
    """``b + Σ w_i δ_i`` for two models or all-zero task vectors; the error otherwise."""
    if len(tensors) > 2 and bool((norms > 0).any()):
        raise MethodError(
            f"multislerp: the weighted mean of the {len(tensors)} directions is (nearly) zero "
            f"(norm < eps = {eps:g}): the inputs point in opposing directions whose weights "
            "cancel out (e.g. x and -x with equal weights), so the mean direction is undefined. "
            "Change the weights, or merge these models with linear / task_arithmetic."
        )
    out = torch.zeros_like(tensors[0]) if base is None else base.clone()  # (...)
    for x, wi in zip(tensors, w, strict=True):
        out.addcmul_(x if base is None else x - base, wi)
    return out


def karcher_mean(
    tensors: Sequence[Tensor], weights: Sequence[float], *, max_iter: int, tol: float
) -> Tensor:
    """Weighted Karcher mean of the directions, scaled by the weighted mean norm.

    With ``n_i = ‖x_i‖``, ``u_i = x_i / n_i`` over the inputs with ``n_i > tol`` (the others only
    count in the scale) and their weights renormalised to ``a_i`` (sum 1)::

        u ← Σ a_i u_i / ‖Σ a_i u_i‖            (the first u_i if that norm is < tol)
        repeat ≤ max_iter times:
            θ_i = arccos⟨u, u_i⟩
            T = Σ_{θ_i ≥ tol} a_i θ_i / sin θ_i · (u_i − cos θ_i · u)    (Riemannian gradient)
            stop if ‖T‖ < tol
            u ← cos‖T‖ · u + sin‖T‖ · T / ‖T‖, renormalised       (exponential map)
        out = (Σ_i w_i n_i) · u                 (all inputs, raw weights)

    Units are never materialised (``u_i = x_i / n_i`` is folded into the coefficients) and the
    loop keeps every quantity on the device: one host sync per iteration (the stopping test).
    All norms ≤ tol: zeros.
    """
    norms = torch.stack([torch.linalg.vector_norm(x) for x in tensors])  # (N,)
    valid = [i for i, n in enumerate(norms.tolist()) if n > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    xs = [tensors[i] for i in valid]
    a = torch.tensor([weights[i] for i in valid], dtype=norms.dtype, device=norms.device)
    a = a / a.sum()  # (V,)
    n = norms[valid]  # (V,)
    mean = _weighted_sum(xs, a / n)  # Σ a_i u_i
    mean_norm = torch.linalg.vector_norm(mean)  # ()
    mean = xs[0] / n[0] if float(mean_norm) < tol else mean.div_(mean_norm)
    for _ in range(max_iter):
        cos = (torch.stack([flat_dot(x, mean) for x in xs]) / n).clamp(-1.0, 1.0)  # (V,)
        theta = torch.acos(cos)  # (V,)
        moving = theta >= tol  # (V,) units already at u are skipped
        c = torch.where(moving, a * theta / torch.sin(torch.where(moving, theta, 1.0)), 0.0)
        tangent = _weighted_sum(xs, c / n).sub_(mean * (c * cos).sum())  # T, mean's shape
        tangent_norm = torch.linalg.vector_norm(tangent)  # ()
        if float(tangent_norm) < tol:
            break
        mean = (mean * torch.cos(tangent_norm)).addcmul_(
            tangent, torch.sin(tangent_norm) / tangent_norm
        )
        unit_norm = torch.linalg.vector_norm(mean)  # ()
        mean.div_(torch.where(unit_norm > tol, unit_norm, 1.0))
    w = torch.tensor(list(weights), dtype=norms.dtype, device=norms.device)  # (N,)
    return mean.mul_((w * norms).sum())


def _weighted_sum(xs: Sequence[Tensor], coefficients: Tensor) -> Tensor:
    """``Σ_i c_i x_i`` for 0-dim-indexable ``coefficients`` (V,), without a host sync."""
    out = xs[0] * coefficients[0]  # (...)
    for x, ci in zip(xs[1:], coefficients[1:], strict=True):
        out.addcmul_(x, ci)
    return out


def karcher(
    tensors: Sequence[Tensor], base: Tensor | None, *, max_iter: int = 10, tol: float = 1e-5
) -> Tensor:
    """Karcher mean of the inputs with uniform weights 1/N (see ``karcher_mean``).

    ``base`` is not used: as in mergekit, a ``base_model`` is one more ordinary input (the engine
    appends it to ``tensors``). One input is returned as is.
    """
    if not tensors:
        raise MethodError("karcher needs at least one input model; add models to the recipe.")
    check_inputs("karcher", tensors, None)
    if len(tensors) == 1:
        return tensors[0].clone()
    weights = [1.0 / len(tensors)] * len(tensors)
    return karcher_mean(tensors, weights, max_iter=max_iter, tol=tol)


MULTISLERP = MethodSpec(
    name="multislerp",
    fn=multislerp,
    summary="weighted mean direction on the hypersphere (of task vectors with a base), "
    "scaled by the weighted mean norm",
    base="optional",
    params=(
        ParamSpec(
            "weight",
            "float",
            "per_model",
            "weight w_i of the model's direction and norm in the mean",
            required=True,
        ),
        ParamSpec(
            "normalize_weights",
            "bool",
            "global",
            "divide the weights by their sum (false: use them as given)",
            default=True,
        ),
        ParamSpec(
            "eps",
            "float",
            "global",
            "ε added to each norm before normalising; a mean direction shorter than ε counts as "
            "zero",
            default=1e-8,
            low=0.0,
        ),
    ),
    locality="tensor",
    stochastic=False,
    paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    min_models=1,
)

KARCHER = MethodSpec(
    name="karcher",
    fn=karcher,
    summary="Karcher (Riemannian) mean of the models' directions, scaled by their mean norm",
    base="unused",
    params=(
        ParamSpec(
            "max_iter",
            "int",
            "global",
            "most fixed-point iterations of the mean direction",
            default=10,
            low=0,
        ),
        ParamSpec(
            "tol",
            "float",
            "global",
            "stop when the Riemannian gradient's norm is below tol; inputs with norm ≤ tol are "
            "left out of the direction",
            default=1e-5,
            low=0.0,
        ),
    ),
    locality="tensor",
    stochastic=False,
    paper="https://arxiv.org/abs/2603.04972",
    min_models=1,
)
