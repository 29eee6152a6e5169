"""Task arithmetic: ``out = b + λ Σ_i w_i (x_i − b)`` (÷ ``Σ_i w_i`` if normalize).

Reference: Ilharco et al. 2023, "Editing models with task arithmetic", arXiv 2212.04089. mergekit
0.1.5 ``task_arithmetic`` is its generalized task arithmetic with no sparsification and no sign
consensus: ``density`` and ``rescale`` are accepted there but have no effect, and so here.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from mergeforge.methods.gta import (
    DENSITY,
    INT8_MASK,
    LAMBDA,
    WEIGHT,
    GTAOptions,
    gta_merge,
    normalize_param,
    pop_lambda,
    rescale_param,
)
from mergeforge.methods.spec import MethodSpec, ParamSpec


def task_arithmetic(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    *,
    weight: Sequence[float],
    density: Sequence[float] | None = None,
    normalize: bool = False,
    rescale: bool = False,
    int8_mask: bool = False,
    **extra: float,
) -> Tensor:
    """``b + λ Σ_i w_i δ_i``; ``lambda`` arrives in ``extra``; density/rescale/int8_mask unused."""
    opts = GTAOptions(
        sparsifier="none",
        consensus=None,
        rescale="none",
        normalize=normalize,
        lam=pop_lambda("task_arithmetic", extra),
    )
    densities = [1.0] * len(tensors) if density is None else density
    return gta_merge("task_arithmetic", tensors, base, weight, densities, opts)


def _unused(p: ParamSpec) -> ParamSpec:
    return ParamSpec(
        p.name,
        p.kind,
        p.scope,
        "accepted for mergekit compatibility; task arithmetic does not sparsify, so no effect",
        default=p.default,
        low=p.low,
        high=p.high,
    )


TASK_ARITHMETIC = MethodSpec(
    name="task_arithmetic",
    factor_space=True,
    fn=task_arithmetic,
    summary="add the weighted task vectors to the base: b + λ Σ w_i (x_i − b)",
    base="required",
    params=(
        WEIGHT,
        _unused(DENSITY),
        normalize_param(False),
        _unused(rescale_param(False, "")),
        LAMBDA,
        INT8_MASK,
    ),
    locality="elementwise",
    stochastic=False,
    paper="https://arxiv.org/abs/2212.04089",
)
