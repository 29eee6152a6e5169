"""Spherical linear interpolation of two tensors: ``slerp`` and ``nuslerp``.

For vectors ``v0, v1`` at angle ``Ω = arccos(⟨v0, v1⟩ / (‖v0‖ ‖v1‖))`` (Shoemake 1985, "Animating
rotation with quaternion curves", SIGGRAPH, https://dl.acm.org/doi/10.1145/325165.325242)::

    slerp(t; v0, v1) = sin((1 − t) Ω) / sin Ω · v0  +  sin(t Ω) / sin Ω · v1

applied to the raw (unnormalised) vectors, so t = 0 gives v0 and t = 1 gives v1. Where the two are
(nearly) colinear the formula is 0/0 and both methods fall back to ``(1 − t) v0 + t v1``.

The methods differ in what a "vector" is and in their guards (mergekit 0.1.5 ``slerp.py`` and
``nuslerp.py``, reproduced here):

* ``slerp``: the whole tensor is one vector; a norm ≤ 1e-8 is replaced by 1; lerp when
  ``|cos Ω| > 0.9995``.
* ``nuslerp``: the whole tensor (``nuslerp_flatten``, default), or each vector along the last axis
  (the rows of an ``(out, in)`` matrix), or with ``nuslerp_row_wise`` each vector along axis 0 (the
  columns: mergekit transposes axes 0 and −1, whatever its docs say); norms are clamped to ≥ 1e-7;
  lerp only when ``1 − cos² Ω ≤ 1e-16`` (exactly colinear in float32).

Both share ``cosine`` and ``slerp_coefficients``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mergeforge.errors import MethodError
from mergeforge.methods.primitives import check_inputs, chunk_slices
from mergeforge.methods.spec import MethodSpec, ParamSpec

DOT_THRESHOLD = 0.9995
"""slerp interpolates linearly when ``|cos Ω|`` exceeds this (mergekit, FusionBench)."""

SLERP_EPS = 1e-8
"""slerp treats a norm ≤ this as 1 when normalising (so a zero tensor has cos Ω = 0)."""

NUSLERP_NORM_FLOOR = 1e-7
"""nuslerp clamps norms to at least this before normalising."""

NUSLERP_EPS = 1e-8
"""nuslerp interpolates linearly when ``1 − cos² Ω ≤ NUSLERP_EPS²``."""

SafeNorm = Callable[[Tensor], Tensor]


def _slerp_norm(norm: Tensor) -> Tensor:
    return torch.where(norm > SLERP_EPS, norm, 1.0)


def _nuslerp_norm(norm: Tensor) -> Tensor:
    return norm.clamp(min=NUSLERP_NORM_FLOOR)


def flat_dot(a: Tensor, b: Tensor) -> Tensor:
    """``⟨a, b⟩`` over every entry, chunk by chunk (no full-size temporary).

    ``torch.sum`` per chunk (a cascade sum) rather than ``torch.dot`` (a BLAS loop whose float32
    error grows like √n): the angle near colinearity is sensitive to the last digits of the dot.
    """
    fa, fb = a.reshape(-1), b.reshape(-1)  # (n,)
    parts = [(fa[sl] * fb[sl]).sum() for sl in chunk_slices(fa.numel())]
    return torch.stack(parts).sum() if parts else fa.new_zeros(())  # ()


def cosine(a: Tensor, b: Tensor, dim: int | None, safe_norm: SafeNorm) -> Tensor:
    """``cos Ω = ⟨a, b⟩ / (‖a‖ ‖b‖)`` clamped to [−1, 1], with ``safe_norm`` guarding each norm.

    ``dim=None``: the whole tensors are the vectors (0-dim result); otherwise the vectors run
    along ``dim`` and the result keeps that axis with size 1 (so it broadcasts over ``a``).
    """
    if dim is None:
        dot = flat_dot(a, b)  # ()
        na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)  # (), ()
    else:
        dot = (a * b).sum(dim=dim, keepdim=True)  # a's shape with dim → 1
        na = torch.linalg.vector_norm(a, dim=dim, keepdim=True)  # same
        nb = torch.linalg.vector_norm(b, dim=dim, keepdim=True)  # same
    return (dot / (safe_norm(na) * safe_norm(nb))).clamp(-1.0, 1.0)


def slerp_coefficients(t: float, cos: Tensor, colinear: Tensor) -> tuple[Tensor, Tensor]:
    """``(sin((1 − t)Ω) / sin Ω, sin(tΩ) / sin Ω)`` with ``Ω = arccos(cos)``; ``(1 − t, t)``
    where ``colinear``. Shapes follow ``cos``. The colinear entries use Ω = π/2 internally so no
    0/0 is ever formed."""
    theta = torch.acos(torch.where(colinear, 0.0, cos))  # cos's shape
    sin_theta = torch.sin(theta)
    c0 = torch.where(colinear, 1.0 - t, torch.sin((1.0 - t) * theta) / sin_theta)
    c1 = torch.where(colinear, t, torch.sin(t * theta) / sin_theta)
    return c0, c1


def _combine(v0: Tensor, v1: Tensor, c0: Tensor, c1: Tensor) -> Tensor:
    """``c0 · v0 + c1 · v1`` with one full-size allocation."""
    return (v0 * c0).addcmul_(v1, c1)  # v0's shape


def slerp(tensors: Sequence[Tensor], base: Tensor | None, *, t: float) -> Tensor:
    """``slerp(t; base, x)`` of the base and the one other model, over the whole tensor.

    ``t = 0`` returns the base, ``t = 1`` the other model; values outside [0, 1] extrapolate
    along the great circle (mergekit accepts them too).
    """
    if base is None or len(tensors) != 1:
        raise MethodError(
            f"slerp interpolates between exactly two models, the base_model (t = 0) and one "
            f"other (t = 1); got {len(tensors)} other model(s) and "
            f"{'a' if base is not None else 'no'} base. Set `base_model:` and list one other "
            "model, or use multislerp / karcher for more models."
        )
    check_inputs("slerp", tensors, base)
    other = tensors[0]
    cos = cosine(base, other, None, _slerp_norm)  # ()
    c0, c1 = slerp_coefficients(t, cos, cos.abs() > DOT_THRESHOLD)  # (), ()
    return _combine(base, other, c0, c1)


def nuslerp_t(weight: Sequence[float]) -> float:
    """nuslerp's interpolation point ``t = w₂ / (w₁ + w₂)``; 0.5 when ``|w₁ + w₂| < 1e-6``."""
    total = weight[0] + weight[1]
    return 0.5 if abs(total) < 1e-6 else weight[1] / total


def nuslerp(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    *,
    weight: Sequence[float],
    nuslerp_row_wise: bool = False,
    nuslerp_flatten: bool = True,
) -> Tensor:
    """Slerp of two models at ``t = w₂ / (w₁ + w₂)``; with a base, of their task vectors:
    ``b + slerp(t; x₁ − b, x₂ − b)``. See the module docstring for the vector layouts."""
    if len(tensors) != 2:
        raise MethodError(
            f"nuslerp interpolates exactly two models besides the (optional) base, got "
            f"{len(tensors)}; list two models, or use multislerp for more."
        )
    check_inputs("nuslerp", tensors, base, weight=weight)
    t = nuslerp_t(weight)
    v0, v1 = tensors if base is None else (tensors[0] - base, tensors[1] - base)
    dim = None if nuslerp_flatten or v0.dim() == 0 else (0 if nuslerp_row_wise else -1)
    cos = cosine(v0, v1, dim, _nuslerp_norm)  # () or v0's shape with dim → 1
    c0, c1 = slerp_coefficients(t, cos, (1.0 - cos.square()) <= NUSLERP_EPS**2)
    out = _combine(v0, v1, c0, c1)
    return out if base is None else out.add_(base)


SLERP = MethodSpec(
    name="slerp",
    fn=slerp,
    summary="spherical interpolation between the base (t = 0) and one other model (t = 1)",
    base="required",
    params=(
        ParamSpec(
            "t",
            "float",
            "global",
            "interpolation point: 0 gives the base, 1 the other model (often a per-layer "
            "gradient; outside [0, 1] extrapolates)",
            required=True,
        ),
    ),
    locality="tensor",
    stochastic=False,
    paper="https://dl.acm.org/doi/10.1145/325165.325242",
    min_models=1,
    max_models=1,
)

NUSLERP = MethodSpec(
    name="nuslerp",
    fn=nuslerp,
    summary="slerp of two models at t = w2/(w1+w2); with a base, slerp of their task vectors",
    base="optional",
    params=(
        ParamSpec(
            "weight",
            "float",
            "per_model",
            "relative weight w_i; the models are interpolated at t = w2 / (w1 + w2)",
            required=True,
        ),
        ParamSpec(
            "nuslerp_row_wise",
            "bool",
            "global",
            "without flatten: interpolate each vector along axis 0 (the columns of an (out, in) "
            "matrix) instead of along the last axis (the rows)",
            default=False,
        ),
        ParamSpec(
            "nuslerp_flatten",
            "bool",
            "global",
            "treat the whole tensor as one vector (false: one slerp per row or column)",
            default=True,
        ),
    ),
    locality="tensor",
    stochastic=False,
    paper="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#nuslerp-nuslerp",
    min_models=2,
    max_models=2,
)
