"""LiNeS: layer-increasing network scaling of a multi-task vector.

Reference: Wang et al. 2025, "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances
Model Merging", ICLR 2025, arXiv 2410.17146 (spec: algorithms.md §15). With ``τ`` the multi-task
vector of a tensor, its block index ``ℓ ∈ {0, …, L−1}`` (``L`` blocks)::

    λ(ℓ) = α + β · ℓ / (L − 1)          (the paper writes it 1-based: α + β (ℓ−1)/(L−1))
    λ    = α                            tensors outside the blocks (embeddings, final norm, head)
    out  = b + λ(ℓ) · τ

so shallow layers, which hold general features, stay close to the base and deep layers take the
task-specific change. ``lines`` is the paper's multi-task setting on task arithmetic:
``τ = Σ_t w_t (x_t − b)`` with ``α = 1/T`` by default (the paper's ``α`` for task arithmetic:
``‖Σ_t τ_t‖₁ / ‖τ_MTL‖₁ · 1/T`` with ``τ_MTL = Σ_t τ_t``). The same scaling applies after any
method with a base as the recipe opt-in ``mergeforge: {lines: {alpha: A, beta: B}}``, with
``τ = merged − b`` (the paper applies it to TIES and consensus merging this way; there ``α`` is
the ratio of L1 norms above, which the user computes or tunes). FusionBench 0.2.33 has no LiNeS.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mergeforge.errors import MethodError
from mergeforge.methods.primitives import check_inputs
from mergeforge.methods.spec import Layer, MethodSpec, ParamSpec


def lines_scale(layer: Layer, alpha: float, beta: float) -> float:
    """``λ(ℓ) = α + β ℓ/(L−1)`` for a block tensor, ``α`` outside the blocks."""
    frac = layer.fraction()
    return alpha if frac is None else alpha + beta * frac


def lines(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    *,
    weight: Sequence[float],
    alpha: float | None = None,
    beta: float = 0.5,
    layer: Layer,
) -> Tensor:
    """``b + λ(ℓ) Σ_t w_t (x_t − b)`` with ``α = 1/T`` unless given (module docstring)."""
    if base is None:
        raise MethodError("lines needs a base model (`base_model:`): it scales task vectors.")
    check_inputs("lines", tensors, base)
    a = 1.0 / len(tensors) if alpha is None else alpha
    tau = torch.zeros_like(base)
    for x, w in zip(tensors, weight, strict=True):
        tau.add_(x - base, alpha=w)  # (shape)
    return base + lines_scale(layer, a, beta) * tau


LINES = MethodSpec(
    name="lines",
    fn=lines,
    summary="task arithmetic with a scale growing linearly with depth: b + (α + β ℓ/(L−1)) Σ w τ",
    base="required",
    params=(
        ParamSpec(
            "weight",
            "float",
            "per_model",
            "coefficient w_t of the model's task vector",
            default=1.0,
        ),
        ParamSpec(
            "alpha",
            "float",
            "global",
            "scale of the shallowest block and of tensors outside the blocks (default 1/T)",
            default=None,
        ),
        ParamSpec(
            "beta",
            "float",
            "global",
            "extra scale reached at the deepest block (tune on validation data; paper grid "
            "0.1…1.0)",
            default=0.5,
        ),
    ),
    locality="elementwise",
    stochastic=False,
    paper="https://arxiv.org/abs/2410.17146",
    engine_kwargs=("layer",),
)
