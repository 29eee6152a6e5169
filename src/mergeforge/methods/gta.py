"""Generalized task arithmetic: the one body behind task_arithmetic, ties, dare_*, breadcrumbs*,
della*.

For K models ``x_i`` with weights ``w_i`` and densities ``d_i`` over a base ``b``::

    δ_i = x_i − b                                   task vectors
    δ̃_i = rescale(sparsify(δ_i, d_i))               see sparsify.py
    Δ_i = w_i δ̃_i
    γ   = elect_sign(Δ)                             only with a consensus (sum | count)
    a_i = [sgn Δ_i = γ]  (consensus)  or  1  (none)
    τ   = Σ_i a_i Δ_i,  ÷ Σ_i a_i w_i  if normalize (zero divisor → 1; no consensus: |Σ w| < 1e-8 → 1)
    out = b + λ τ

The sparsifiers (none, magnitude, random, magnitude_outliers, della_magprune) and their rescale
live in ``sparsify.py``. This is mergekit 0.1.5 ``GeneralizedTaskArithmeticMerge.merge_group``
(same order of operations).

Memory: mergekit stacks all K deltas of the tensor. Here phase 1 (``sparsify.plan_sparse``) walks
each model's delta to fix what needs the whole tensor and phase 2 walks the chunks once, rebuilding
every model's sparsified delta for that chunk from ``(x_i, b)`` and its phase-1 record. Extra
memory: the output, K chunks, and per model at most one bool mask (random drop, DELLA, ties at a
magnitude cut) or one float32 tensor (DELLA's keep probabilities under the inverse rescale).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mergeforge.errors import MethodError
from mergeforge.methods.primitives import (
    Consensus,
    check_inputs,
    chunk_slices,
    disjoint_merge,
    elect_sign,
    weight_column,
    weighted_sum,
)
from mergeforge.methods.sparsify import (
    Knobs,
    Rescale,
    Sparsifier,
    TieBreak,
    plan_sparse,
    rebuild,
)
from mergeforge.methods.spec import ParamSpec


@dataclass(frozen=True)
class GTAOptions:
    """The choices that tell the GTA methods apart."""

    sparsifier: Sparsifier
    consensus: Consensus | None
    rescale: Rescale
    normalize: bool
    lam: float
    tie_break: TieBreak = "mergekit"


WEIGHT = ParamSpec(
    "weight",
    "float",
    "per_model",
    "coefficient w_i of the model's task vector; negative values subtract it",
    required=True,
)
DENSITY = ParamSpec(
    "density",
    "float",
    "per_model",
    "fraction d_i of the task vector's entries that are kept (1 keeps all)",
    default=1.0,
    low=0.0,
    high=1.0,
)
LAMBDA = ParamSpec(
    "lambda", "float", "global", "scale λ of the merged task vector: out = b + λ τ", default=1.0
)
INT8_MASK = ParamSpec(
    "int8_mask",
    "bool",
    "global",
    "accepted for mergekit compatibility (it only picks mergekit's mask dtype); no effect",
    default=False,
)


def normalize_param(default: bool) -> ParamSpec:
    """``normalize``: divide the mixed task vector by the sum of the (agreeing) weights."""
    return ParamSpec(
        "normalize",
        "bool",
        "global",
        "divide by the sum of the weights (with a sign consensus: of the agreeing models' weights)",
        default=default,
    )


def rescale_param(default: bool, doc: str) -> ParamSpec:
    """``rescale``: rescale each sparsified task vector (how is method-specific)."""
    return ParamSpec("rescale", "bool", "global", doc, default=default)


CONSENSUS = ParamSpec(
    "consensus",
    "str",
    "global",
    "sign election: sum = sign of the weighted sum (TIES paper, mergekit); count = majority of "
    "the signs",
    default="sum",
    choices=("sum", "count"),
)


def pop_lambda(method: str, extra: Mapping[str, object]) -> float:
    """The ``lambda`` parameter (a Python keyword, so it arrives in ``**extra``); default 1.

    Any other leftover keyword is a programming error in the caller: ``MethodError``.
    """
    unknown = sorted(set(extra) - {"lambda"})
    if unknown:
        raise MethodError(
            f"{method}: unknown parameter(s) {', '.join(unknown)}; see `mergeforge methods` "
            "for the parameters this method takes."
        )
    value = extra.get("lambda", 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MethodError(f"{method}: lambda must be a number, got {value!r}.")
    return float(value)


def gta_merge(
    method: str,
    tensors: Sequence[Tensor],
    base: Tensor | None,
    weights: Sequence[float],
    densities: Sequence[float],
    opts: GTAOptions,
    *,
    thresholds: Sequence[float] | None = None,
    gammas: Sequence[float] | None = None,
    epsilons: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``b + λ τ`` as in the module docstring; ``thresholds`` (per model) replace the densities'
    per-tensor magnitude thresholds; ``gammas`` / ``epsilons`` (per model) are the outlier
    fraction of ``magnitude_outliers`` / the probability spread of ``della_magprune``;
    ``generator`` drives the random sparsifiers (models drawn in order)."""
    if base is None:
        raise MethodError(
            f"{method} needs a base model: task vectors are differences from it. Set "
            "`base_model:` in the recipe."
        )
    check_inputs(method, tensors, base, weight=weights, density=densities)
    knobs = _knobs(method, tensors, base, densities, opts, thresholds, gammas, epsilons)
    if opts.sparsifier in ("random", "della_magprune") and generator is None:
        raise MethodError(f"{method} draws random masks and needs a seeded generator.")
    if not tensors:
        return base.clone()
    b = base.reshape(-1)  # (n,)
    xs = [x.reshape(-1) for x in tensors]  # K × (n,)
    how = (opts.sparsifier, opts.rescale, opts.tie_break)
    plans = [
        plan_sparse(x, b, base.shape, k, how, generator) for x, k in zip(xs, knobs, strict=True)
    ]
    out = torch.empty_like(b)  # (n,)
    for sl in chunk_slices(b.numel()):
        rows = torch.stack(
            [rebuild(x[sl], b[sl], p, sl) for x, p in zip(xs, plans, strict=True)]
        )  # (K, c)
        rows.mul_(weight_column(weights, rows))
        if opts.consensus is None:
            mixed = weighted_sum(rows, weights, opts.normalize)  # (c,)
        else:
            sign = elect_sign(rows, opts.consensus)  # (c,)
            mixed = disjoint_merge(rows, weights, sign, opts.normalize)  # (c,)
        if opts.lam != 1:
            mixed *= opts.lam
        torch.add(b[sl], mixed, out=out[sl])
    return out.view(base.shape)


def _knobs(
    method: str,
    tensors: Sequence[Tensor],
    base: Tensor,
    densities: Sequence[float],
    opts: GTAOptions,
    thresholds: Sequence[float] | None,
    gammas: Sequence[float] | None,
    epsilons: Sequence[float] | None,
) -> list[Knobs]:
    """Per-model settings, checked: one value per model, and what the sparsifier needs."""
    k = len(tensors)
    for name, values in (("threshold", thresholds), ("gamma", gammas), ("epsilon", epsilons)):
        if values is not None:
            check_inputs(method, tensors, base, **{name: values})
    if opts.sparsifier == "magnitude_outliers" and gammas is None:
        raise MethodError(f"{method} removes outliers and needs one gamma per model.")
    if opts.sparsifier == "della_magprune":
        if epsilons is None:
            raise MethodError(f"{method} samples by magnitude and needs one epsilon per model.")
        for i, (d, e) in enumerate(zip(densities, epsilons, strict=True)):
            _check_spread(method, i, d, e)
    return [
        Knobs(
            density=densities[i],
            threshold=None if thresholds is None else thresholds[i],
            gamma=0.0 if gammas is None else gammas[i],
            epsilon=0.0 if epsilons is None else epsilons[i],
        )
        for i in range(k)
    ]


def spread_problem(method: str, index: int, density: float, epsilon: float) -> str | None:
    """DELLA's keep probabilities ``d ± ε`` must lie in (0, 1) (mergekit raises ValueError);
    the problem in words, or ``None``."""
    inside = density - epsilon > 0 and density + epsilon < 1
    if epsilon >= 0 and (inside or density <= 0 or density >= 1):  # d ≤ 0, d ≥ 1: no sampling
        return None
    return (
        f"{method}: model #{index + 1} (recipe order, base excluded) has density {density:g} and "
        f"epsilon {epsilon:g}, so its keep probabilities would run from {density - epsilon:g} to "
        f"{density + epsilon:g}; MAGPRUNE needs epsilon ≥ 0, density − epsilon > 0 and "
        "density + epsilon < 1. Lower epsilon below min(density, 1 − density) = "
        f"{min(density, 1 - density):g} for this model, or change its density."
    )


def _check_spread(method: str, index: int, density: float, epsilon: float) -> None:
    problem = spread_problem(method, index, density, epsilon)
    if problem:
        raise MethodError(problem)
