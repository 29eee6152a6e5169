"""Sparsifiers of the task-vector methods, as two phases that keep memory bounded.

Phase 1 (``plan_sparse``) walks one model's task vector ``δ = x − b`` and fixes what needs the whole
tensor: magnitude thresholds, a random mask (as bools), DELLA's keep probabilities, the rescale
factor. Phase 2 (``rebuild``) turns any chunk of ``(x, b)`` back into that model's sparsified
delta. Names follow mergekit 0.1.5 ``sparsify.py``:

* ``magnitude`` (TIES, arXiv 2306.01708): keep the top ``max(1, int(d n))`` of |δ|;
* ``random`` (DARE, arXiv 2311.03099): keep each entry with probability d;
* ``magnitude_outliers`` (Model Breadcrumbs, arXiv 2312.06795): keep the ``int(d n)`` entries of
  |δ| just below the ``int(γ n)`` largest (outliers), dropping the smallest;
* ``della_magprune`` (DELLA, arXiv 2406.11617): keep each entry with a probability that grows
  linearly with the rank of its |δ| within its row, from ``d − ε`` to ``d + ε``.

Rescale: ``l1`` (mergekit) multiplies by ``‖δ‖₁ / ‖sparsified δ‖₁`` (skipped below 1e-7);
``inverse`` (the papers) divides by the keep probability: ``1/d`` for DARE, each survivor's own
``p_i`` for DELLA.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from mergeforge.methods import primitives
from mergeforge.methods.primitives import chunk_slices, l1_factor, random_drop, trim_below
from mergeforge.methods.selection import first_k_mask, keep_count, magnitude_cut, top_k_mask

Sparsifier = Literal["none", "magnitude", "random", "magnitude_outliers", "della_magprune"]
Rescale = Literal["none", "l1", "inverse"]
TieBreak = Literal["mergekit", "index"]


@dataclass(frozen=True)
class Sparse:
    """How to rebuild one model's sparsified delta chunk: keep ``|δ| ≥ threshold``, keep
    ``|δ| < ceiling``, keep where ``mask``, divide by ``divisor`` element-wise, then multiply by
    ``factor`` (each step skipped when ``None``)."""

    threshold: float | None = None
    ceiling: float | None = None
    mask: Tensor | None = None  # (numel,) bool
    divisor: Tensor | None = None  # (numel,) float32: keep probability, +inf where dropped
    factor: float | None = None


@dataclass(frozen=True)
class Knobs:
    """One model's sparsifier settings for this tensor."""

    density: float
    threshold: float | None = None
    gamma: float = 0.0
    epsilon: float = 0.0


def plan_sparse(
    x: Tensor,
    b: Tensor,
    shape: torch.Size,
    knob: Knobs,
    how: tuple[Sparsifier, Rescale, TieBreak],
    generator: torch.Generator | None,
) -> Sparse:
    """Phase 1 for one model (``x``, ``b`` flat; ``shape`` the tensor's): what its sparsified
    delta needs from the whole tensor. ``how`` = (sparsifier, rescale, tie break)."""
    sparsifier, rescale, tie_break = how
    if sparsifier == "none":
        return Sparse()
    if sparsifier in ("random", "della_magprune"):
        assert generator is not None
        if sparsifier == "random":
            return _random(x, b, knob.density, rescale, generator)
        return _magprune(x, b, shape, knob, rescale, generator)
    if sparsifier == "magnitude":
        sparse = _magnitude(x, b, knob.density, knob.threshold, tie_break)
    else:
        sparse = _outliers(x, b, knob.density, knob.gamma, tie_break)
    if sparse is None:  # mergekit returns δ untouched: no trim, no rescale
        return Sparse()
    if rescale == "none":
        return sparse
    before, after = _l1_after(x, b, sparse)
    return dataclasses.replace(sparse, factor=_factor(rescale, before, after, knob.density))


def _random(
    x: Tensor, b: Tensor, density: float, rescale: Rescale, generator: torch.Generator
) -> Sparse:
    """DARE's drop: a Bernoulli(d) mask drawn chunk by chunk (as bools) and the rescale."""
    if density >= 1:  # mergekit: no draws, no rescale
        return Sparse()
    mask = torch.empty(x.numel(), dtype=torch.bool, device=x.device)  # (n,)
    before = after = 0.0
    for sl in chunk_slices(x.numel()):
        delta = x[sl] - b[sl]  # (c,)
        masked, keep = random_drop(delta, density, generator)
        mask[sl] = keep
        if rescale == "l1":
            before += float(delta.abs().sum())
            after += float(masked.abs().sum())
    return Sparse(mask=mask, factor=_factor(rescale, before, after, density))


def _magnitude(
    x: Tensor, b: Tensor, density: float, threshold: float | None, tie_break: TieBreak
) -> Sparse | None:
    """The magnitude trim of one model: keep ``|δ| ≥ t``; ``None`` when nothing is trimmed.

    A given ``threshold`` (whole-model trim) keeps every entry tied with it. A per-tensor trim
    keeps exactly ``k = keep_count(n, d)`` entries like mergekit. When entries tied with the k-th
    largest straddle the cut, ``tie_break`` picks among them: ``mergekit`` = mergekit 0.1.5's own
    (unstable but deterministic) sort order, bit-exact parity at the price of sorting that tensor;
    ``index`` = the lowest flat indices, no sort.
    """
    if threshold is not None:
        return Sparse(threshold=threshold)
    if density >= 1:
        return None
    t, kept = magnitude_cut(x, density, base=b)
    k = keep_count(x.numel(), density)
    if kept <= k:
        return Sparse(threshold=t)
    if tie_break == "mergekit":
        return Sparse(mask=top_k_mask(x, k, base=b))
    return Sparse(mask=first_k_mask(x, k, t, base=b))


def _outliers(
    x: Tensor, b: Tensor, density: float, gamma: float, tie_break: TieBreak
) -> Sparse | None:
    """Breadcrumbs' band of one model; ``None`` when nothing is removed (``d ≥ 1``).

    mergekit 0.1.5 ``magnitude_outliers``: with ``n`` entries sorted by |δ| ascending, keep the
    positions ``[n_bot, n_bot + m)`` where ``m = int(d n)`` (no ``max(1, ·)``: a small density can
    keep nothing), ``n_top = int(γ n)`` and ``n_bot = max(0, n − m − n_top)``; when ``m + n_top > n``
    fewer outliers are removed. Without ties at the two cuts that is ``t_lo ≤ |δ| < t_hi``; with
    ties, ``tie_break`` decides: ``mergekit`` = its ascending sort, ``index`` = lower flat indices
    rank higher.
    """
    if density >= 1:
        return None
    n = x.numel()
    m = int(density * n)
    if m <= 0:
        return Sparse(threshold=math.inf)
    n_bot = max(0, n - m - int(gamma * n))
    n_out = n - n_bot - m  # the largest entries dropped as outliers
    lo, lo_count = _kth_largest(x, b, n - n_bot) if n_bot > 0 else (None, n)
    hi, hi_count = _kth_largest(x, b, n_out) if n_out > 0 else (None, 0)
    if lo_count == n - n_bot and hi_count == n_out:
        return Sparse(threshold=lo, ceiling=hi)
    if tie_break == "mergekit":
        a = (x - b).abs_()  # (n,) float32, as mergekit sorts it
        order = torch.sort(a, descending=False).indices  # (n,)
        mask = torch.zeros(n, dtype=torch.bool, device=x.device)  # (n,)
        mask[order[n_bot : n_bot + m]] = True
        return Sparse(mask=mask)
    mask = torch.ones(n, dtype=torch.bool, device=x.device)  # (n,)
    if lo is not None:
        mask = first_k_mask(x, n - n_bot, lo, base=b)
    if hi is not None:
        mask &= ~first_k_mask(x, n_out, hi, base=b)
    return Sparse(mask=mask)


def _kth_largest(x: Tensor, b: Tensor, k: int) -> tuple[float, int]:
    """``(t, c)``: the k-th largest ``|x − b|`` (``1 ≤ k < n``) and how many entries reach it.

    ``magnitude_cut`` takes a density; ``(k + ½)/n`` maps back to exactly ``k`` through its
    ``int(d·n)`` (the rounding error is far below ½ for any real tensor size).
    """
    return magnitude_cut(x, (k + 0.5) / x.numel(), base=b)


def _magprune(
    x: Tensor,
    b: Tensor,
    shape: torch.Size,
    knob: Knobs,
    rescale: Rescale,
    generator: torch.Generator,
) -> Sparse:
    """DELLA's MAGPRUNE of one model: draw the keep mask slab by slab (whole rows), in order.

    mergekit 0.1.5 ``della_magprune``: ``d ≥ 1`` returns δ (no draws, no rescale), ``d ≤ 0``
    zeros; otherwise one Bernoulli per entry with probability ``magprune_probs`` in memory order,
    then L1 rescale (``l1``), or each survivor divided by its own keep probability (``inverse``).
    """
    density, epsilon = knob.density, knob.epsilon
    if density >= 1 or x.numel() == 0:
        return Sparse()
    if density <= 0:
        return Sparse(threshold=math.inf)
    rows, width, inner = rank_layout(shape)
    per_row = width * inner
    step = max(1, primitives.CHUNK // per_row)
    keep = torch.empty(x.numel(), dtype=torch.bool, device=x.device)  # (n,)
    divisor = torch.empty_like(x) if rescale == "inverse" else None  # (n,)
    before = after = 0.0
    for r0 in range(0, rows, step):
        sl = slice(r0 * per_row, min(r0 + step, rows) * per_row)
        delta = (x[sl] - b[sl]).view(-1, width, inner)  # (r, width, inner)
        probs = magprune_probs(delta, density, epsilon).to(generator.device)  # (r, width, inner)
        drawn = torch.bernoulli(probs, generator=generator).to(x.device).view(-1)  # (c,) 0/1
        keep[sl] = drawn.bool()
        if divisor is not None:
            divisor[sl] = torch.where(keep[sl], probs.view(-1).to(x.device), math.inf)
        if rescale == "l1":
            before += float(delta.abs().sum())
            after += float((delta.view(-1) * drawn).abs().sum())
    if divisor is not None:
        return Sparse(divisor=divisor)
    return Sparse(mask=keep, factor=l1_factor(before, after) if rescale == "l1" else None)


def rank_layout(shape: Sequence[int]) -> tuple[int, int, int]:
    """``(rows, width, inner)``: MAGPRUNE ranks along dim 1 of the tensor viewed as
    ``(rows, width, inner)``; tensors with fewer than 2 dims are one row (mergekit unsqueezes
    them), and dims after the second fold into ``inner`` (mergekit ranks along dim 1 of any
    tensor, so a 3-D tensor's rows are its ``[i, :, j]`` slices)."""
    if len(shape) < 2:
        return 1, math.prod(shape), 1
    return shape[0], shape[1], math.prod(shape[2:])


def magprune_probs(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA keep probabilities of a ``(rows, width, inner)`` block, ranked along dim 1.

    ``p = (d − ε) + 2ε · r / (width − 1)`` with ``r`` the 0-based rank of |δ| in its row
    (ascending; ties in ``torch.argsort`` order, as mergekit), so the smallest entry gets ``d − ε``
    and the largest ``d + ε``; the mean is d. A row of one entry gets ``p = d`` (mergekit 0.1.5
    divides 0 by 0 there and torch.bernoulli rejects the NaN).
    """
    width = delta.shape[1]
    order = torch.argsort(delta.abs(), dim=1)  # (rows, width, inner) ascending
    ranks = torch.empty_like(delta)  # (rows, width, inner) float32
    steps = torch.arange(width, dtype=delta.dtype, device=delta.device).view(1, -1, 1)
    ranks.scatter_(1, order, steps.expand_as(order))
    # (rows, width, inner) in [0, 1]; a lone entry sits in the middle
    rank_norm = ranks / (width - 1) if width > 1 else torch.full_like(ranks, 0.5)
    return (density - epsilon) + rank_norm * 2 * epsilon  # same operation order as mergekit


def _l1_after(x: Tensor, b: Tensor, sparse: Sparse) -> tuple[float, float]:
    """``(‖δ‖₁, ‖sparsified δ‖₁)`` in one chunked pass."""
    before = after = 0.0
    for sl in chunk_slices(x.numel()):
        delta = x[sl] - b[sl]  # (c,)
        before += float(delta.abs().sum())
        after += float(rebuild(x[sl], b[sl], sparse, sl).abs().sum())
    return before, after


def _factor(rescale: Rescale, before: float, after: float, density: float) -> float | None:
    """The rescale multiplier: L1 matching (mergekit), ``1/d`` (DARE paper) or none."""
    if rescale == "l1":
        return l1_factor(before, after)
    if rescale == "inverse" and 0 < density < 1:
        return 1.0 / density
    return None


def rebuild(x: Tensor, b: Tensor, plan: Sparse, sl: slice) -> Tensor:
    """Phase 2 for one model and one chunk: its sparsified, rescaled (unweighted) delta."""
    delta = x - b  # (c,)
    if plan.threshold is not None:
        delta = trim_below(delta, plan.threshold)
    if plan.ceiling is not None:
        delta = delta * (delta.abs() < plan.ceiling)
    if plan.mask is not None:
        delta = delta * plan.mask[sl]
    if plan.divisor is not None:
        delta = delta / plan.divisor[sl]  # dropped: ±0 / inf = ±0
    if plan.factor is not None:
        delta *= plan.factor
    return delta
