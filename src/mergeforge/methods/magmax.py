"""MagMax: per entry, keep the task-vector entry of largest magnitude.

Reference: Marczak, Twardowski, Trzciński, Cygert 2024, "MagMax: Leveraging Model Merging for
Seamless Continual Learning", ECCV 2024, arXiv 2407.06322. For K models ``x_t`` over a base ``b``::

    τ_t        = x_t − b
    t*(j)      = argmax_t |τ_t[j]|          ties: the LAST model in recipe order wins
    τ_max[j]   = τ_{t*(j)}[j]
    out        = b + λ τ_max

Tie rule and λ match FusionBench 0.2.33 ``fusion_bench.method.magmax`` (and the official
release): models are folded in order and a later task vector replaces the running choice where
``|τ_t| ≥ |τ_max|``. FusionBench's ``magmax_merge`` defaults λ (``scaling_factor``) to 1 and its
``MagMaxAlgorithm`` config to 0.5 (the paper's setting for independent fine-tunes); here λ
defaults to 1 like every other mergeforge ``lambda``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mergeforge.errors import MethodError
from mergeforge.methods.gta import LAMBDA, pop_lambda
from mergeforge.methods.primitives import check_inputs
from mergeforge.methods.spec import MethodSpec


def magmax(tensors: Sequence[Tensor], base: Tensor | None, **extra: float) -> Tensor:
    """``b + λ τ_max`` as in the module docstring; ``lambda`` arrives in ``extra``."""
    lam = pop_lambda("magmax", extra)
    if base is None:
        raise MethodError(
            "magmax needs a base model: it selects among task vectors, the differences from "
            "the base. Set `base_model:` in the recipe."
        )
    check_inputs("magmax", tensors, base)
    if not tensors:
        return base.clone()
    best = tensors[0] - base  # (...)
    for x in tensors[1:]:
        delta = x - base  # (...)
        best = torch.where(delta.abs() >= best.abs(), delta, best)  # (...)
    if lam != 1:
        best.mul_(lam)
    return best.add_(base)


MAGMAX = MethodSpec(
    name="magmax",
    factor_space=True,
    fn=magmax,
    summary="per entry, keep the task-vector entry of largest magnitude (later models win ties)",
    base="required",
    params=(LAMBDA,),
    locality="elementwise",
    stochastic=False,
    paper="https://arxiv.org/abs/2407.06322",
)
