"""Generalized task arithmetic: the one body behind task_arithmetic, ties, dare_linear, dare_ties.

For K models ``x_i`` with weights ``w_i`` and densities ``d_i`` over a base ``b``::

    δ_i = x_i − b                                   task vectors
    δ̃_i = rescale(sparsify(δ_i, d_i))               magnitude trim | random drop | none
    Δ_i = w_i δ̃_i
    γ   = elect_sign(Δ)                             only with a consensus (sum | count)
    a_i = [sgn Δ_i = γ]  (consensus)  or  1  (none)
    τ   = Σ_i a_i Δ_i,  ÷ Σ_i a_i w_i  if normalize (zero divisor → 1; no consensus: |Σ w| < 1e-8 → 1)
    out = b + λ τ

This is mergekit 0.1.5 ``GeneralizedTaskArithmeticMerge.merge_group`` (same order of operations).

Memory: mergekit stacks all K deltas of the tensor. Here phase 1 walks each model's delta in chunks
to fix what needs the whole tensor (the magnitude threshold, the random mask as bools, the rescale
factor) and phase 2 walks the chunks once, rebuilding every model's sparsified delta for that chunk
from ``(x_i, b)`` and its phase-1 record. Extra memory: the output, K chunks, and for random drop
one bool mask per model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from mergeforge.errors import MethodError
from mergeforge.methods.primitives import (
    Consensus,
    check_inputs,
    chunk_slices,
    disjoint_merge,
    elect_sign,
    l1_factor,
    random_drop,
    trim_below,
    weight_column,
    weighted_sum,
)
from mergeforge.methods.selection import first_k_mask, keep_count, magnitude_cut, top_k_mask
from mergeforge.methods.spec import ParamSpec

Sparsifier = Literal["none", "magnitude", "random"]
Rescale = Literal["none", "l1", "inverse"]
TieBreak = Literal["mergekit", "index"]


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


@dataclass(frozen=True)
class _Sparse:
    """How to rebuild one model's sparsified delta chunk: keep ``|δ| ≥ threshold``, keep where
    ``mask``, then multiply by ``factor`` (each step skipped when ``None``)."""

    threshold: float | None = None
    mask: Tensor | None = None  # (numel,) bool
    factor: float | None = None


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
    generator: torch.Generator | None = None,
) -> Tensor:
    """``b + λ τ`` as in the module docstring; ``thresholds`` (per model) replace the densities'
    per-tensor magnitude thresholds; ``generator`` drives random drop (models drawn in order)."""
    if base is None:
        raise MethodError(
            f"{method} needs a base model: task vectors are differences from it. Set "
            "`base_model:` in the recipe."
        )
    check_inputs(method, tensors, base, weight=weights, density=densities)
    if thresholds is not None:
        check_inputs(method, tensors, base, threshold=thresholds)
    if opts.sparsifier == "random" and generator is None:
        raise MethodError(f"{method} draws random masks and needs a seeded generator.")
    if not tensors:
        return base.clone()
    b = base.reshape(-1)  # (n,)
    xs = [x.reshape(-1) for x in tensors]  # K × (n,)
    ts = list(thresholds) if thresholds is not None else [None] * len(xs)
    plans = [_plan(x, b, d, t, opts, generator) for x, d, t in zip(xs, densities, ts, strict=True)]
    out = torch.empty_like(b)  # (n,)
    for sl in chunk_slices(b.numel()):
        rows = torch.stack(
            [_rebuild(x[sl], b[sl], p, sl) for x, p in zip(xs, plans, strict=True)]
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


def _plan(
    x: Tensor,
    b: Tensor,
    density: float,
    threshold: float | None,
    opts: GTAOptions,
    generator: torch.Generator | None,
) -> _Sparse:
    """Phase 1 for one model: what its sparsified delta needs from the whole tensor."""
    if opts.sparsifier == "none":
        return _Sparse()
    if opts.sparsifier == "magnitude":
        sparse = _magnitude(x, b, density, threshold, opts.tie_break)
        if sparse is None:  # mergekit returns δ untouched: no trim, no rescale
            return _Sparse()
        if opts.rescale == "none":
            return sparse
        before, after = _l1_after(x, b, sparse)
        return dataclasses.replace(sparse, factor=_factor(opts.rescale, before, after, density))
    if density >= 1:  # mergekit: no draws, no rescale
        return _Sparse()
    assert generator is not None
    mask = torch.empty(x.numel(), dtype=torch.bool, device=x.device)  # (n,)
    before = after = 0.0
    for sl in chunk_slices(x.numel()):
        delta = x[sl] - b[sl]  # (c,)
        masked, keep = random_drop(delta, density, generator)
        mask[sl] = keep
        if opts.rescale == "l1":
            before += float(delta.abs().sum())
            after += float(masked.abs().sum())
    return _Sparse(mask=mask, factor=_factor(opts.rescale, before, after, density))


def _magnitude(
    x: Tensor, b: Tensor, density: float, threshold: float | None, tie_break: TieBreak
) -> _Sparse | None:
    """The magnitude trim of one model: keep ``|δ| ≥ t``; ``None`` when nothing is trimmed.

    A given ``threshold`` (whole-model trim) keeps every entry tied with it. A per-tensor trim
    keeps exactly ``k = keep_count(n, d)`` entries like mergekit. When entries tied with the k-th
    largest straddle the cut, ``tie_break`` picks among them: ``mergekit`` = mergekit 0.1.5's own
    (unstable but deterministic) sort order, bit-exact parity at the price of sorting that tensor;
    ``index`` = the lowest flat indices, no sort.
    """
    if threshold is not None:
        return _Sparse(threshold=threshold)
    if density >= 1:
        return None
    t, kept = magnitude_cut(x, density, base=b)
    k = keep_count(x.numel(), density)
    if kept <= k:
        return _Sparse(threshold=t)
    if tie_break == "mergekit":
        return _Sparse(mask=top_k_mask(x, k, base=b))
    return _Sparse(mask=first_k_mask(x, k, t, base=b))


def _l1_after(x: Tensor, b: Tensor, sparse: _Sparse) -> tuple[float, float]:
    """``(‖δ‖₁, ‖sparsified δ‖₁)`` in one chunked pass."""
    before = after = 0.0
    for sl in chunk_slices(x.numel()):
        delta = x[sl] - b[sl]  # (c,)
        before += float(delta.abs().sum())
        after += float(_rebuild(x[sl], b[sl], sparse, sl).abs().sum())
    return before, after


def _factor(rescale: Rescale, before: float, after: float, density: float) -> float | None:
    """The rescale multiplier: L1 matching (mergekit), ``1/d`` (DARE paper) or none."""
    if rescale == "l1":
        return l1_factor(before, after)
    if rescale == "inverse" and 0 < density < 1:
        return 1.0 / density
    return None


def _rebuild(x: Tensor, b: Tensor, plan: _Sparse, sl: slice) -> Tensor:
    """Phase 2 for one model and one chunk: its sparsified, rescaled (unweighted) delta."""
    delta = x - b  # (c,)
    if plan.threshold is not None:
        delta = trim_below(delta, plan.threshold)
    if plan.mask is not None:
        delta = delta * plan.mask[sl]
    if plan.factor is not None:
        delta *= plan.factor
    return delta
