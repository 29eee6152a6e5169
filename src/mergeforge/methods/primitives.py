"""Shared building blocks of the task-vector methods: trim, random drop, rescale, elect, merge.

Notation: ``δ`` is a task vector (a model's tensor minus the base's), ``K`` the number of models,
``d`` a density (the fraction of entries kept). Every function is pure: it returns new tensors and
never changes its arguments. Functions that take stacked deltas ``(K, ...)`` hold K copies at once;
the methods call them on chunks of a tensor (``chunk_slices``) so that memory stays small.

References: TIES-Merging (Yadav et al. 2023, arXiv 2306.01708) for trim / elect sign / disjoint
merge; DARE (Yu et al. 2023, arXiv 2311.03099) for random drop and rescale. Edge cases follow
mergekit 0.1.5 (``mergekit/sparsify.py``, ``merge_methods/generalized_task_arithmetic.py``).
The magnitude threshold itself lives in ``selection.py``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor

from mergeforge.errors import MethodError
from mergeforge.methods.selection import keep_count, magnitude_threshold

CHUNK = 1 << 18
"""Elements per chunk when a method walks a flattened tensor (1 MiB of float32)."""

L1_EPS = 1e-7
"""mergekit's ``rescaled_masked_tensor`` skips rescaling when either L1 norm is below this."""

Consensus = Literal["sum", "count"]


def check_inputs(
    method: str, tensors: Sequence[Tensor], base: Tensor | None, **per_model: Sequence[object]
) -> None:
    """``MethodError`` unless every tensor has the first one's shape (and the base's, if given)
    and every per-model parameter has one value per tensor."""
    shape = base.shape if base is not None else (tensors[0].shape if tensors else None)
    for i, x in enumerate(tensors):
        if x.shape != shape:
            raise MethodError(
                f"{method}: input {i} has shape {tuple(x.shape)} but the "
                f"{'base' if base is not None else 'first input'} has {tuple(shape or ())}; "
                "all inputs of one output tensor must have the same shape. Check that the "
                "models share an architecture, or exclude this tensor from the merge."
            )
    for name, values in per_model.items():
        if len(values) != len(tensors):
            raise MethodError(
                f"{method}: per-model parameter {name!r} has {len(values)} values for "
                f"{len(tensors)} input tensors; pass exactly one value per model (the base "
                "model takes none)."
            )


def chunk_slices(numel: int, chunk: int | None = None) -> Iterator[slice]:
    """Consecutive slices ``[i, i + chunk)`` covering ``range(numel)`` (default ``CHUNK``)."""
    step = CHUNK if chunk is None else chunk
    for start in range(0, numel, step):
        yield slice(start, min(start + step, numel))


def trim_below(delta: Tensor, threshold: float) -> Tensor:
    """Zero the entries with ``|δ| < threshold``: ``δ · [|δ| ≥ t]``. Entries equal to t are kept."""
    return delta * (delta.abs() >= threshold)  # same shape as delta; dropped entries become ±0


def trim_magnitude(delta: Tensor, density: float) -> Tensor:
    """Keep the ``k = max(1, int(d · numel))`` largest ``|δ|``, zero the rest (TIES "trim").

    mergekit 0.1.5 ``sparsify.magnitude``: ``d ≥ 1`` returns δ unchanged, ``d ≤ 0`` returns zeros.
    Entries tied with the k-th largest magnitude are all kept, so slightly more than k may survive;
    mergekit keeps whichever tied entries its unstable ``argsort`` puts first, which no other code
    can reproduce. Ties do occur in real task vectors: ``x − b`` is a multiple of the larger
    operand's ulp, so a tensor of 10^5 entries often has a couple tied at the threshold.
    """
    k = keep_count(delta.numel(), density)
    if k == 0:
        return torch.zeros_like(delta)
    if k == delta.numel():
        return delta.clone()
    return trim_below(delta, magnitude_threshold(delta, density))


def random_drop(delta: Tensor, density: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """DARE's drop: keep each entry with probability d, ``m ~ Bernoulli(d)``; returns ``(m ⊙ δ, m)``.

    The mask is drawn as mergekit 0.1.5 ``sparsify.bernoulli`` draws it
    (``torch.bernoulli(full_like(δ, d))``), so for the same generator state the draws are the same.
    ``d ≥ 1`` keeps everything and draws nothing. ``m`` is returned as a bool tensor.
    """
    if density >= 1:
        return delta.clone(), torch.ones_like(delta, dtype=torch.bool)
    # drawn where the generator lives (CPU), so CPU and GPU merges draw the same masks
    probs = torch.full(delta.shape, density, dtype=delta.dtype, device=generator.device)
    mask = torch.bernoulli(probs, generator=generator).to(delta.device)  # 0/1 floats
    return delta * mask, mask.bool()


def l1_factor(before: float, after: float) -> float | None:
    """``‖δ‖₁ / ‖m ⊙ δ‖₁``, or ``None`` (no rescale) when either norm is below 1e-7 (mergekit)."""
    if before < L1_EPS or after < L1_EPS:
        return None
    return before / after


def rescale_l1(original: Tensor, masked: Tensor) -> Tensor:
    """mergekit's rescale: ``masked · ‖original‖₁ / ‖masked‖₁``, skipped if either norm < 1e-7.

    It keeps the L1 norm of the task vector; it is close to DARE's ``1/d`` in expectation.
    """
    factor = l1_factor(float(original.abs().sum()), float(masked.abs().sum()))
    return masked.clone() if factor is None else masked * factor


def rescale_inverse(masked: Tensor, density: float) -> Tensor:
    """DARE paper rescale: ``m ⊙ δ / (1 − p) = m ⊙ δ / d``; unchanged for ``d ≤ 0`` or ``d ≥ 1``."""
    if density <= 0 or density >= 1:
        return masked.clone()
    return masked / density


def elect_sign(deltas: Tensor, method: Consensus = "sum") -> Tensor:
    """TIES "elect": the majority sign per entry of stacked deltas ``(K, ...)`` → int8 ±1 ``(...)``.

    * ``sum`` (TIES paper, mergekit default): ``γ = sgn(Σ_i δ_i)``, total mass decides;
    * ``count``: ``γ = sgn(Σ_i sgn(δ_i))``, majority of signs decides.

    As in mergekit, a zero total counts as +1 (the TIES paper would use the global majority sign).
    """
    if method == "sum":
        total = deltas.sum(dim=0)  # (...)
    elif method == "count":
        total = deltas.sign().sum(dim=0)  # (...)
    else:
        raise ValueError(f"unknown consensus method {method!r}; use 'sum' or 'count'")
    return torch.where(total >= 0, 1, -1).to(torch.int8)  # (...)


def weight_column(weights: Sequence[float], like: Tensor) -> Tensor:
    """Weights as a float32 tensor shaped ``(K, 1, ..., 1)`` to broadcast over ``like`` (K, ...)."""
    w = torch.tensor(list(weights), dtype=like.dtype, device=like.device)  # (K,)
    return w.reshape((-1,) + (1,) * (like.dim() - 1))


def weighted_sum(weighted: Tensor, weights: Sequence[float], normalize: bool) -> Tensor:
    """Plain mix of stacked weighted deltas ``(K, ...)``: ``Σ_i w_i δ_i`` (÷ ``Σ_i w_i`` if normalize).

    As in mergekit, a weight sum with ``|Σ w| < 1e-8`` is replaced by 1.
    """
    mixed = weighted.sum(dim=0)  # (...)
    if normalize:
        divisor = float(torch.tensor(list(weights), dtype=weighted.dtype).sum())
        mixed /= 1.0 if abs(divisor) < 1e-8 else divisor
    return mixed


def disjoint_merge(
    weighted: Tensor, weights: Sequence[float], sign: Tensor, normalize: bool
) -> Tensor:
    """TIES "disjoint merge" of stacked weighted deltas ``(K, ...)`` against an elected sign ``(...)``.

    ``a_i = [sgn(w_i δ_i) = γ]`` (a trimmed zero never agrees), ``out = Σ_i a_i w_i δ_i``, and with
    ``normalize`` ``out /= Σ_i a_i w_i`` where a zero divisor becomes 1 (mergekit). With all weights
    1 and normalize this is the paper's disjoint mean.
    """
    agree = weighted.sign() == sign  # (K, ...) bool
    mixed = (weighted * agree).sum(dim=0)  # (...)
    if normalize:
        divisor = (weight_column(weights, weighted) * agree).sum(dim=0)  # (...)
        mixed /= divisor.masked_fill_(divisor == 0, 1.0)
    return mixed


def disjoint_mean(deltas: Tensor, sign: Tensor) -> Tensor:
    """The TIES paper's disjoint mean: the mean of the ``δ_i`` that agree with γ, 0 where none do."""
    return disjoint_merge(deltas, [1.0] * deltas.shape[0], sign, normalize=True)
