"""SCE (Select, Calculate, Erase): the merge of FuseChat's target models.

Reference: Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models", arXiv 2408.07990 (§3.3).
For a base ``b`` and K models ``x_i`` of one tensor, with ``τ_i = x_i − b``::

    Select     (only if select_topk < 1) s² = Var_i(τ_i) per position (population variance);
               k = int(#{s² ≠ 0} · select_topk); keep the k positions of largest s² in every τ_i
    Calculate  ω_i = mean(τ_i²) / Σ_j mean(τ_j²)       (1/K each when that sum is below 1e-6)
    Erase      γ = sgn(Σ_i τ_i) (a zero sum counts as +);  m_i = [sgn τ_i = γ]
    out = b + Σ_i ω_i m_i τ_i / max(Σ_i ω_i m_i, 1e-6)

The weights are the paper's matrix-level ones, computed per tensor; the recipe gives no per-model
weights. This is mergekit 0.1.5 ``sce``: ties among equal variances at the cut are broken by
``torch.topk`` exactly as there, and the weights are computed after the selection.

Memory: the variance (one float32 per position) and the selection mask are whole-tensor; the
rest walks chunks of ``CHUNK`` positions holding K rows at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mergeforge.errors import MethodError
from mergeforge.methods.gta import INT8_MASK
from mergeforge.methods.primitives import check_inputs, chunk_slices, elect_sign, weight_column
from mergeforge.methods.spec import MethodSpec, ParamSpec

WEIGHT_SUM_EPS = 1e-6
"""Below this total of the mean squares, mergekit gives every model the weight 1/K."""

DIVISOR_EPS = 1e-6
"""mergekit clamps the per-position sum of the agreeing weights to at least this."""


def sce(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    *,
    select_topk: float = 1.0,
    int8_mask: bool = False,
) -> Tensor:
    """SCE merge of one tensor (see the module docstring); ``int8_mask`` has no effect."""
    if base is None:
        raise MethodError(
            "sce needs a base model: it merges task vectors, the differences from the base. Set "
            "`base_model:` in the recipe."
        )
    check_inputs("sce", tensors, base)
    if not tensors:
        return base.clone()
    b = base.reshape(-1)  # (n,)
    xs = [x.reshape(-1) for x in tensors]  # K × (n,)
    keep = select_by_variance(xs, b, select_topk) if select_topk < 1 else None  # (n,) | None
    omega = matrix_weights(xs, b, keep)
    out = torch.empty_like(b)  # (n,)
    for sl in chunk_slices(b.numel()):
        tv = task_vectors(xs, b, sl, keep)  # (K, c)
        agree = tv.sign() == elect_sign(tv, "sum")  # (K, c)
        erased = weight_column(omega, tv) * agree  # (K, c)
        merged = (tv * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=DIVISOR_EPS)  # (c,)
        torch.add(b[sl], merged, out=out[sl])
    return out.view(base.shape)


def task_vectors(xs: Sequence[Tensor], b: Tensor, sl: slice, keep: Tensor | None) -> Tensor:
    """The stacked task vectors of one chunk, ``(K, c)``, zeroed outside ``keep`` (if given)."""
    tv = torch.stack([x[sl] - b[sl] for x in xs])  # (K, c)
    return tv if keep is None else tv * keep[sl]


def select_by_variance(xs: Sequence[Tensor], b: Tensor, fraction: float) -> Tensor:
    """SCE "select": a bool mask (n,) of the ``k = int(#{s² ≠ 0} · fraction)`` positions with the
    largest variance ``s²`` of the task vectors across models; all False for ``fraction ≤ 0``."""
    if fraction >= 1:
        return torch.ones_like(b, dtype=torch.bool)
    mask = torch.zeros_like(b, dtype=torch.bool)  # (n,)
    if fraction <= 0:
        return mask
    var = torch.empty_like(b)  # (n,)
    for sl in chunk_slices(b.numel()):
        var[sl] = torch.var(task_vectors(xs, b, sl, None), dim=0, unbiased=False)
    # int64 count × float is a float32 product in torch, as in mergekit: the same k
    k = int(torch.count_nonzero(var) * fraction)
    if k > 0:
        mask[torch.topk(var, k, largest=True).indices] = True
    return mask


def matrix_weights(xs: Sequence[Tensor], b: Tensor, keep: Tensor | None) -> list[float]:
    """SCE "calculate": ``ω_i = mean(τ_i²) / Σ_j mean(τ_j²)`` over the selected task vectors;
    ``1/K`` each when the sum is below 1e-6 (mergekit)."""
    sums = torch.zeros(len(xs), dtype=torch.float64)  # (K,)
    for sl in chunk_slices(b.numel()):
        sums += task_vectors(xs, b, sl, keep).square().sum(dim=1).double().cpu()  # (K,)
    means = (sums / max(b.numel(), 1)).float()  # (K,) float32 like mergekit
    total = float(means.sum())
    if abs(total) < WEIGHT_SUM_EPS:
        return [1.0 / len(xs)] * len(xs)
    return (means / total).tolist()


SCE = MethodSpec(
    name="sce",
    fn=sce,
    summary="keep the positions where the models vary most, weight each task vector by its "
    "mean square, merge the sign-agreeing entries",
    base="required",
    params=(
        ParamSpec(
            "select_topk",
            "float",
            "global",
            "fraction of the positions with nonzero variance across the task vectors that is "
            "kept (the largest variances); 1 keeps every position",
            default=1.0,
            low=0.0,
            high=1.0,
        ),
        INT8_MASK,
    ),
    locality="tensor",
    stochastic=False,
    paper="https://arxiv.org/abs/2408.07990",
)
