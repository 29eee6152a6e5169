"""DELLA (drop and rescale via sampling with magnitude): ``della`` and ``della_linear``.

Reference: Deep, Bhardwaj, Majumder & Poria 2024, "DELLA-Merging: Reducing Interference in Model
Merging through Magnitude-Based Sampling", arXiv 2406.11617. For K models with weights ``w_i``,
densities ``d_i`` and spreads ``ε_i`` (MAGPRUNE, then elect and fuse as in TIES)::

    r_ij  = rank of |δ_ij| in its row, 0 = smallest; p_ij = (d_i − ε_i) + 2 ε_i r_ij / (width − 1)
    m_ij ~ Bernoulli(p_ij)                (drawn model by model, rows in order, from the generator)
    δ̃_i  = m_i ⊙ δ_i · ‖δ_i‖₁ / ‖m_i ⊙ δ_i‖₁     (l1, mergekit)
         = m_i ⊙ δ_i / p_i                       (inverse, the paper: each survivor by its own p)
    della:        out = b + λ Σ_i a_i w_i δ̃_i / Σ_i a_i w_i,  a_i = [sgn(w_i δ̃_i) = γ]
    della_linear: out = b + λ Σ_i w_i δ̃_i                     (÷ Σ_i w_i if normalize)

A row is the tensor's dim 1 (mergekit 0.1.5 ``della_magprune``: a matrix's rows; a 1-D tensor is one
row; higher-rank tensors rank along dim 1). ``d ≥ 1`` keeps δ whole and draws nothing, ``d ≤ 0``
drops it; otherwise ``0 < d − ε`` and ``d + ε < 1`` are required (mergekit raises ValueError; here a
``MethodError`` that names the model). A row of a single entry gets ``p = d`` where mergekit 0.1.5
crashes. Defaults are mergekit's: rescale true (L1 matching), ε 0.15, λ 1, normalize true for
``della`` and false for ``della_linear``. ``rescale_mode: inverse`` is the authors' rescale (the
paper's ``1/(1 − p_drop)``; their code ``declare-lab/della`` divides by the keep probability, with
ε meaning the same half-width as here). Merges match mergekit in distribution (it draws from the
global RNG in tensor-name order); a generator seeded with ``manual_seed(s)`` draws exactly what
mergekit draws after ``torch.manual_seed(s)``, so one tensor's result can match it bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from mergeforge.methods.gta import (
    CONSENSUS,
    INT8_MASK,
    LAMBDA,
    WEIGHT,
    GTAOptions,
    gta_merge,
    normalize_param,
    pop_lambda,
    rescale_param,
    spread_problem,
)
from mergeforge.methods.primitives import Consensus
from mergeforge.methods.spec import MethodSpec, ParamSpec

RescaleMode = Literal["l1", "inverse"]


def _della(
    method: str,
    consensus: Consensus | None,
    tensors: Sequence[Tensor],
    base: Tensor | None,
    per_model: tuple[Sequence[float], Sequence[float], Sequence[float]],
    flags: tuple[bool, bool, RescaleMode],
    generator: torch.Generator | None,
    extra: dict[str, float],
) -> Tensor:
    weight, density, epsilon = per_model
    normalize, rescale, rescale_mode = flags
    opts = GTAOptions(
        sparsifier="della_magprune",
        consensus=consensus,
        rescale=rescale_mode if rescale else "none",
        normalize=normalize,
        lam=pop_lambda(method, extra),
    )
    return gta_merge(
        method, tensors, base, weight, density, opts, epsilons=epsilon, generator=generator
    )


def della(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    *,
    weight: Sequence[float],
    density: Sequence[float],
    epsilon: Sequence[float],
    normalize: bool = True,
    rescale: bool = True,
    rescale_mode: RescaleMode = "l1",
    int8_mask: bool = False,
    consensus: Consensus = "sum",
    generator: torch.Generator | None = None,
    **extra: float,
) -> Tensor:
    """MAGPRUNE, then TIES sign election and disjoint (weighted) mean; ``lambda`` in ``extra``."""
    return _della(
        "della", consensus, tensors, base, (weight, density, epsilon),
        (normalize, rescale, rescale_mode), generator, extra,
    )  # fmt: skip


def della_linear(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    *,
    weight: Sequence[float],
    density: Sequence[float],
    epsilon: Sequence[float],
    normalize: bool = False,
    rescale: bool = True,
    rescale_mode: RescaleMode = "l1",
    int8_mask: bool = False,
    generator: torch.Generator | None = None,
    **extra: float,
) -> Tensor:
    """MAGPRUNE, then task arithmetic (no sign election)."""
    return _della(
        "della_linear", None, tensors, base, (weight, density, epsilon),
        (normalize, rescale, rescale_mode), generator, extra,
    )  # fmt: skip


_DENSITY = ParamSpec(
    "density",
    "float",
    "per_model",
    "mean keep probability d_i of the task vector's entries (1 keeps all); with 0 < d_i < 1 "
    "it needs d_i − ε_i > 0 and d_i + ε_i < 1",
    default=1.0,
    low=0.0,
    high=1.0,
)
EPSILON = ParamSpec(
    "epsilon",
    "float",
    "per_model",
    "spread ε_i of the keep probabilities: from d_i − ε_i (smallest |δ| of a row) to d_i + ε_i "
    "(largest)",
    default=0.15,
    low=0.0,
    high=0.5,
    high_open=True,
)
RESCALE_MODE = ParamSpec(
    "rescale_mode",
    "str",
    "global",
    "how rescale restores the dropped mass: l1 = match the task vector's L1 norm per tensor "
    "(mergekit); inverse = divide each kept entry by its own keep probability (DELLA paper)",
    default="l1",
    choices=("l1", "inverse"),
)
_RESCALE = rescale_param(True, "rescale each task vector after the drop (see rescale_mode)")
_PARAMS = (WEIGHT, _DENSITY, EPSILON, _RESCALE, RESCALE_MODE, LAMBDA, INT8_MASK)


def spread_problems(params: Mapping[str, object]) -> list[str]:
    """Plan-time check of each model's (density, epsilon) pair for one tensor."""
    pairs = zip(params["density"], params["epsilon"], strict=True)  # type: ignore[call-overload]
    found = (spread_problem("della", i, d, e) for i, (d, e) in enumerate(pairs))
    return [p for p in found if p]


DELLA = MethodSpec(
    name="della",
    factor_space=True,
    fn=della,
    summary="drop task-vector entries at random, less often the larger they are in their row, "
    "rescale, elect a sign per entry, average the agreeing ones",
    base="required",
    params=(*_PARAMS[:3], normalize_param(True), *_PARAMS[3:], CONSENSUS),
    locality="tensor",
    stochastic=True,
    paper="https://arxiv.org/abs/2406.11617",
    check=spread_problems,
)

DELLA_LINEAR = MethodSpec(
    name="della_linear",
    factor_space=True,
    fn=della_linear,
    summary="drop task-vector entries at random, less often the larger they are in their row, "
    "rescale, add the weighted sum to the base",
    base="required",
    params=(*_PARAMS[:3], normalize_param(False), *_PARAMS[3:]),
    locality="tensor",
    stochastic=True,
    paper="https://arxiv.org/abs/2406.11617",
    check=spread_problems,
)
