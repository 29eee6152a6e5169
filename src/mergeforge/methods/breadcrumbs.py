"""Model Breadcrumbs: drop each task vector's largest outliers and its smallest entries, then add.

Reference: Davari & Belilovsky 2023, "Model Breadcrumbs: Scaling Multi-Task Model Merging with
Sparse Masks", arXiv 2312.06795. For K models with weights ``w_i``, densities ``d_i`` and outlier
fractions ``γ_i``, per tensor of n entries::

    m_i   = int(d_i n)       entries kept,   n_top = int(γ_i n)   largest entries removed
    n_bot = max(0, n − m_i − n_top)                                 smallest entries removed
    δ̃_i   = δ_i on the ascending-|δ_i| positions [n_bot, n_bot + m_i), 0 elsewhere
    breadcrumbs:      out = b + λ Σ_i w_i δ̃_i                     (÷ Σ_i w_i if normalize)
    breadcrumbs_ties: out = b + λ Σ_i a_i w_i δ̃_i, a_i = [sgn(w_i δ̃_i) = γ]  (÷ Σ_i a_i w_i)

This is mergekit 0.1.5 ``magnitude_outliers`` (its fixed index arithmetic: the kept slice ends at
``n_bot + m_i``, so ``γ = 0`` keeps the top ``m_i``; when ``m_i + n_top > n`` fewer outliers are
removed so that exactly ``m_i`` survive). Unlike the TIES trim, ``int(d n)`` has no ``max(1, ·)``:
a density below ``1/n`` keeps nothing. ``d ≥ 1`` keeps the task vector whole (no rescale).
Defaults are mergekit's: normalize false, rescale false (L1 matching when true), γ 0.01, λ 1.
The paper's merge is ``breadcrumbs`` with the weights as its single scale α.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from mergeforge.errors import MethodError
from mergeforge.methods.gta import (
    CONSENSUS,
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


def _breadcrumbs(
    method: str,
    consensus: Consensus | None,
    tensors: Sequence[Tensor],
    base: Tensor | None,
    weight: Sequence[float],
    density: Sequence[float],
    gamma: Sequence[float],
    flags: tuple[bool, bool, TieBreak],
    extra: dict[str, float],
) -> Tensor:
    normalize, rescale, tie_break = flags
    bad = [g for g in gamma if not 0 <= g <= 1]
    if bad:
        raise MethodError(
            f"{method}: gamma (the fraction of largest-magnitude entries removed) must be in "
            f"[0, 1], got {bad[0]!r}; set each model's `gamma` to e.g. 0.01."
        )
    opts = GTAOptions(
        sparsifier="magnitude_outliers",
        consensus=consensus,
        rescale="l1" if rescale else "none",
        normalize=normalize,
        lam=pop_lambda(method, extra),
        tie_break=tie_break,
    )
    return gta_merge(method, tensors, base, weight, density, opts, gammas=gamma)


def breadcrumbs(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    *,
    weight: Sequence[float],
    density: Sequence[float],
    gamma: Sequence[float],
    normalize: bool = False,
    rescale: bool = False,
    int8_mask: bool = False,
    tie_break: TieBreak = "mergekit",
    **extra: float,
) -> Tensor:
    """Breadcrumbs masks then task arithmetic (see the module docstring); ``lambda`` arrives in
    ``extra``; ``tie_break`` (from the engine) decides among entries tied at a cut."""
    flags = (normalize, rescale, tie_break)
    return _breadcrumbs(
        "breadcrumbs", None, tensors, base, weight, density, gamma, flags, extra
    )  # fmt: skip


def breadcrumbs_ties(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    *,
    weight: Sequence[float],
    density: Sequence[float],
    gamma: Sequence[float],
    normalize: bool = False,
    rescale: bool = False,
    int8_mask: bool = False,
    consensus: Consensus = "sum",
    tie_break: TieBreak = "mergekit",
    **extra: float,
) -> Tensor:
    """Breadcrumbs masks then TIES sign election and disjoint merge."""
    flags = (normalize, rescale, tie_break)
    return _breadcrumbs(
        "breadcrumbs_ties", consensus, tensors, base, weight, density, gamma, flags, extra
    )  # fmt: skip


_DENSITY = ParamSpec(
    "density",
    "float",
    "per_model",
    "fraction d_i of the task vector's entries kept: the int(d_i·n) entries just below the "
    "removed outliers (1 keeps all)",
    default=1.0,
    low=0.0,
    high=1.0,
)
GAMMA = ParamSpec(
    "gamma",
    "float",
    "per_model",
    "fraction γ_i of the largest-magnitude entries removed as outliers (fewer when "
    "density + gamma > 1)",
    default=0.01,
    low=0.0,
    high=1.0,
)
_RESCALE = rescale_param(False, "after masking, scale each task vector back to its L1 norm")
_PARAMS = (WEIGHT, _DENSITY, GAMMA, normalize_param(False), _RESCALE, LAMBDA, INT8_MASK)

BREADCRUMBS = MethodSpec(
    name="breadcrumbs",
    factor_space=True,
    fn=breadcrumbs,
    summary="drop each task vector's largest outliers and smallest entries, add the weighted sum "
    "to the base",
    base="required",
    params=_PARAMS,
    locality="tensor",
    stochastic=False,
    paper="https://arxiv.org/abs/2312.06795",
    engine_kwargs=("tie_break",),
)

BREADCRUMBS_TIES = MethodSpec(
    name="breadcrumbs_ties",
    factor_space=True,
    fn=breadcrumbs_ties,
    summary="breadcrumbs masks, then elect a sign per entry and merge the agreeing ones",
    base="required",
    params=(*_PARAMS, CONSENSUS),
    locality="tensor",
    stochastic=False,
    paper="https://arxiv.org/abs/2312.06795",
    engine_kwargs=("tie_break",),
)
