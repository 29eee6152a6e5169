"""DARE (drop and rescale) merges: ``dare_linear`` and ``dare_ties``.

Reference: Yu et al. 2023, "Language Models are Super Mario: Absorbing Abilities from Homologous
Models as a Free Lunch", arXiv 2311.03099. For K models with weights ``w_i``, densities ``d_i``::

    m_i ~ Bernoulli(d_i) element-wise (drawn model by model from the tensor's generator)
    δ̃_i = r_i · m_i ⊙ (x_i − b)     r_i = ‖δ_i‖₁ / ‖m_i ⊙ δ_i‖₁  (l1, mergekit) or 1/d_i (inverse, paper)
    dare_linear: out = b + λ Σ_i w_i δ̃_i                     (÷ Σ_i w_i if normalize)
    dare_ties:   out = b + λ Σ_i a_i w_i δ̃_i, a_i = [sgn(w_i δ̃_i) = γ]  (÷ Σ_i a_i w_i if normalize)

Defaults are mergekit 0.1.5's: rescale true with L1-norm matching (skipped when a norm is below
1e-7), normalize false, λ 1, no magnitude trim in dare_ties, ``d ≥ 1`` draws nothing. The mask is
drawn as mergekit draws it, so with the same generator state the masks are identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from mergeforge.methods.gta import (
    CONSENSUS,
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
from mergeforge.methods.primitives import Consensus
from mergeforge.methods.spec import MethodSpec, ParamSpec

RescaleMode = Literal["l1", "inverse"]


def _dare(
    method: str,
    consensus: Consensus | None,
    tensors: Sequence[Tensor],
    base: Tensor | None,
    weight: Sequence[float],
    density: Sequence[float],
    normalize: bool,
    rescale: bool,
    rescale_mode: RescaleMode,
    generator: torch.Generator | None,
    extra: dict[str, float],
) -> Tensor:
    opts = GTAOptions(
        sparsifier="random",
        consensus=consensus,
        rescale=rescale_mode if rescale else "none",
        normalize=normalize,
        lam=pop_lambda(method, extra),
    )
    return gta_merge(method, tensors, base, weight, density, opts, generator=generator)


def dare_linear(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    *,
    weight: Sequence[float],
    density: Sequence[float],
    normalize: bool = False,
    rescale: bool = True,
    rescale_mode: RescaleMode = "l1",
    int8_mask: bool = False,
    generator: torch.Generator | None = None,
    **extra: float,
) -> Tensor:
    """DARE then task arithmetic (see the module docstring); ``lambda`` arrives in ``extra``."""
    return _dare(
        "dare_linear", None, tensors, base, weight, density, normalize, rescale, rescale_mode,
        generator, extra,
    )  # fmt: skip


def dare_ties(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    *,
    weight: Sequence[float],
    density: Sequence[float],
    normalize: bool = False,
    rescale: bool = True,
    rescale_mode: RescaleMode = "l1",
    int8_mask: bool = False,
    consensus: Consensus = "sum",
    generator: torch.Generator | None = None,
    **extra: float,
) -> Tensor:
    """DARE then TIES sign election and disjoint merge (no magnitude trim)."""
    return _dare(
        "dare_ties", consensus, tensors, base, weight, density, normalize, rescale, rescale_mode,
        generator, extra,
    )  # fmt: skip


RESCALE_MODE = ParamSpec(
    "rescale_mode",
    "str",
    "global",
    "how rescale restores the dropped mass: l1 = match the task vector's L1 norm per tensor "
    "(mergekit); inverse = multiply by 1/density (DARE paper)",
    default="l1",
    choices=("l1", "inverse"),
)
_RESCALE = rescale_param(True, "rescale each task vector after the drop (see rescale_mode)")
_DENSITY = ParamSpec(
    "density",
    "float",
    "per_model",
    "probability d_i of keeping each entry of the task vector (drop rate p = 1 − d_i)",
    default=DENSITY.default,
    low=0.0,
    high=1.0,
)

DARE_LINEAR = MethodSpec(
    name="dare_linear",
    factor_space=True,
    fn=dare_linear,
    summary="randomly drop task-vector entries, rescale, add the weighted sum to the base",
    base="required",
    params=(WEIGHT, _DENSITY, normalize_param(False), _RESCALE, RESCALE_MODE, LAMBDA, INT8_MASK),
    locality="tensor",
    stochastic=True,
    paper="https://arxiv.org/abs/2311.03099",
)

DARE_TIES = MethodSpec(
    name="dare_ties",
    factor_space=True,
    fn=dare_ties,
    summary="randomly drop task-vector entries, rescale, elect a sign per entry, merge the "
    "agreeing ones",
    base="required",
    params=(
        WEIGHT,
        _DENSITY,
        normalize_param(False),
        _RESCALE,
        RESCALE_MODE,
        LAMBDA,
        INT8_MASK,
        CONSENSUS,
    ),
    locality="tensor",
    stochastic=True,
    paper="https://arxiv.org/abs/2311.03099",
)
