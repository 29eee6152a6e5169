"""TIES-Merging: trim each task vector to its largest magnitudes, elect a sign, disjoint merge.

Reference: Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models",
arXiv 2306.01708. For K models with weights ``w_i`` and densities ``d_i``::

    δ̂_i = top-d_i(x_i − b) by |·|      (trim; entries tied with the threshold are kept)
    Δ_i = w_i δ̂_i,   γ = sgn(Σ_i Δ_i)  (sum; a zero sum counts as +1)  or  sgn(Σ_i sgn Δ_i)  (count)
    a_i = [sgn Δ_i = γ]
    out = b + λ Σ_i a_i Δ_i / Σ_i a_i w_i   (normalize; a zero divisor becomes 1)

Defaults are mergekit 0.1.5 ``ties`` (trim per tensor, sum consensus, normalize true, rescale
false, λ 1, weights influence the election). The paper's variant: ``trim_scope: model`` (one
threshold per model over its whole task vector, computed by the engine with
the engine (``engine/global_pass.py``) and passed as the per-model ``threshold``), weights 1 and
normalize true (the paper's "disjoint mean"), λ ≈ 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor

from mergeforge.errors import MethodError
from mergeforge.methods.gta import (
    CONSENSUS,
    DENSITY,
    INT8_MASK,
    LAMBDA,
    WEIGHT,
    GTAOptions,
    TieBreak,
    gta_merge,
    normalize_param,
    pop_lambda,
    rescale_param,
)
from mergeforge.methods.primitives import Consensus
from mergeforge.methods.spec import MethodSpec, ParamSpec

TrimScope = Literal["tensor", "model"]


def ties(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    *,
    weight: Sequence[float],
    density: Sequence[float],
    normalize: bool = True,
    rescale: bool = False,
    int8_mask: bool = False,
    consensus: Consensus = "sum",
    trim_scope: TrimScope = "tensor",
    threshold: Sequence[float] | None = None,
    tie_break: TieBreak = "mergekit",
    **extra: float,
) -> Tensor:
    """TIES merge of one tensor (see the module docstring); ``lambda`` arrives in ``extra``.

    With ``trim_scope="model"`` the trim keeps ``|δ_i| ≥ threshold[i]`` (thresholds of the
    unweighted task vectors, one per model, from a pass over the whole model); with
    ``trim_scope="tensor"`` ``threshold`` is ignored and each tensor keeps exactly its top
    ``k = max(1, int(d_i·n))``; ``tie_break`` decides among entries tied at the cut (see
    ``gta._magnitude``). ``threshold`` and ``tie_break`` are supplied by the engine, not recipes.
    """
    if trim_scope == "model" and threshold is None:
        raise MethodError(
            "ties with trim_scope: model needs one magnitude threshold per model, computed over "
            "the whole model before merging; the merge engine passes them as `threshold`."
        )
    opts = GTAOptions(
        sparsifier="magnitude",
        consensus=consensus,
        rescale="l1" if rescale else "none",
        normalize=normalize,
        lam=pop_lambda("ties", extra),
        tie_break=tie_break,
    )
    thresholds = threshold if trim_scope == "model" else None
    return gta_merge("ties", tensors, base, weight, density, opts, thresholds=thresholds)


TRIM_SCOPE = ParamSpec(
    "trim_scope",
    "str",
    "global",
    "where the top-density magnitudes are chosen: tensor = in each tensor (mergekit); model = "
    "over each model's whole task vector (TIES paper; costs one extra read of the models)",
    default="tensor",
    choices=("tensor", "model"),
)

TIES = MethodSpec(
    name="ties",
    factor_space=True,
    fn=ties,
    summary="trim task vectors to their largest entries, elect a sign per entry, average the "
    "agreeing ones",
    base="required",
    params=(
        WEIGHT,
        DENSITY,
        normalize_param(True),
        rescale_param(
            False, "after trimming, scale each task vector back to its L1 norm (mergekit)"
        ),
        LAMBDA,
        INT8_MASK,
        CONSENSUS,
        TRIM_SCOPE,
    ),
    locality="tensor",
    stochastic=False,
    paper="https://arxiv.org/abs/2306.01708",
    engine_kwargs=("threshold", "tie_break"),
)
