"""PCB-Merging: weight each task-vector entry by its intra- and inter-task competition balance.

Reference: Du et al. 2024, "Parameter Competition Balancing for Model Merging", NeurIPS 2024,
arXiv 2410.02396; steps as in the official ``pcb-merging.py`` (``pcb_merging``). For K task
vectors ``τ_t = x_t − b`` of one tensor, flattened to ``(K, d)``::

    |τ̂_t|  = clamp(|τ_t|, q_lo, q_hi)              per model, q = sorted values at indices
                                                   int(d·1e-4) and int(d·(1 − 1e-4) − 1)
    τ̂_t    = sgn(τ_t) |τ̂_t|
    B_intra = exp(K · Norm(|τ̂_t|)²)                 Norm = per-model min–max to [0, 1]
    B_inter = tanh(τ_t ⊙ Σ_s τ_s)                   (unclipped τ, as the official code)
    B_t     = B_intra ⊙ B_inter
    B̃_t     = Norm(clamp(B_t, q_r, max))           q_r = sorted B_t at index int(d·(1 − r)):
                                                   the bottom 1 − r become 0, the top r in (0, 1]
    τ_m     = Σ_t B̃_t ⊙ τ̂_t / max(Σ_t B̃_t, 1e-12)
    out     = b + λ τ_m

Per tensor, not per model: the official code (and the spec, algorithms.md §16) flatten the whole
model into one ``(K, D)`` matrix, so its quantiles and min–max ranges are model-wide statistics.
mergeforge streams tensor by tensor, so here they are computed over each tensor's ``d`` entries
(the same function applied to a one-tensor model). Consequence of the official index rule on small
tensors: for ``d < 10⁴`` the upper outlier clip is the second-largest ``|τ|`` (the largest entry
is clipped to it) and the lower clip does nothing.

Degenerate ranges (mergeforge's choice; the official code divides 0/0 into NaN): where a model's
row is constant, ``Norm`` gives 0. So a zero task vector contributes nothing and a one-entry
tensor keeps the base (its single entry is both the minimum and the maximum of its row).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mergeforge.errors import MethodError
from mergeforge.methods.gta import LAMBDA, pop_lambda
from mergeforge.methods.primitives import check_inputs
from mergeforge.methods.spec import MethodSpec, ParamSpec

OUTLIER_RATIO = 0.0001
"""Fraction of each row clipped at either end before balancing (official ``min/max_ratio``)."""


def pcb(
    tensors: Sequence[Tensor], base: Tensor | None, *, ratio: float = 0.1, **extra: float
) -> Tensor:
    """``b + λ τ_m`` as in the module docstring; ``lambda`` arrives in ``extra``."""
    lam = pop_lambda("pcb", extra)
    if base is None:
        raise MethodError(
            "pcb needs a base model: it balances task vectors, the differences from the base. "
            "Set `base_model:` in the recipe."
        )
    if not 0 < ratio <= 1:
        raise MethodError(f"pcb: ratio must be in (0, 1], got {ratio!r}.")
    check_inputs("pcb", tensors, base)
    if not tensors:
        return base.clone()
    b = base.reshape(-1)  # (d,)
    taus = torch.stack([x.reshape(-1) - b for x in tensors])  # (K, d)
    merged = pcb_task_vector(taus, ratio)  # (d,)
    if lam != 1:
        merged.mul_(lam)
    return merged.add_(b).view(base.shape)


def pcb_task_vector(taus: Tensor, ratio: float) -> Tensor:
    """The balanced mix ``τ_m`` (d,) of stacked task vectors ``taus`` (K, d); steps 1–6."""
    k, d = taus.shape
    mag = clamp_rows(taus.abs(), int(d * OUTLIER_RATIO), int(d * (1 - OUTLIER_RATIO) - 1))
    clipped = mag * torch.sign(taus)  # (K, d)
    balance = minmax_rows(mag).square_().mul_(k).exp_()  # (K, d)  B_intra
    balance.mul_(torch.tanh(taus * taus.sum(dim=0)))  # (K, d)  B_intra ⊙ B_inter
    keep = minmax_rows(clamp_rows(balance, int(d * (1 - ratio)), d - 1))  # (K, d)
    total = keep.sum(dim=0).clamp_(min=1e-12)  # (d,)
    return (keep * clipped).sum(dim=0).div_(total)  # (d,)


def clamp_rows(x: Tensor, low_index: int, high_index: int) -> Tensor:
    """Clamp each row of ``x`` (K, d) to its ascending-sorted values at ``low_index`` and
    ``high_index`` (official ``clamp``; indices limited to ``[0, d − 1]``)."""
    d = x.shape[1]
    lo = torch.kthvalue(x, min(max(low_index, 0), d - 1) + 1, dim=1, keepdim=True).values  # (K, 1)
    hi = torch.kthvalue(x, min(max(high_index, 0), d - 1) + 1, dim=1, keepdim=True).values  # (K, 1)
    return torch.clamp(x, lo, hi)  # (K, d)


def minmax_rows(x: Tensor) -> Tensor:
    """Per-row min–max normalisation ``(x − min) / (max − min)`` of ``x`` (K, d); a constant row
    gives 0 (the official code gives NaN)."""
    lo = x.amin(dim=1, keepdim=True)  # (K, 1)
    span = x.amax(dim=1, keepdim=True) - lo  # (K, 1)
    out = (x - lo).div_(torch.where(span > 0, span, torch.ones_like(span)))  # (K, d)
    return out.masked_fill_(span == 0, 0.0)


RATIO = ParamSpec(
    "ratio",
    "float",
    "global",
    "keep ratio r: per model, the fraction of entries with the highest balance score that are "
    "kept (the rest get weight 0)",
    default=0.1,
    low=0.0,
    high=1.0,
    low_open=True,
)

PCB = MethodSpec(
    name="pcb",
    fn=pcb,
    summary="weight task-vector entries by intra-/inter-task competition balance, keep the top "
    "ratio per model, take the weighted mean (per tensor)",
    base="required",
    params=(RATIO, LAMBDA),
    locality="tensor",
    stochastic=False,
    paper="https://arxiv.org/abs/2410.02396",
)
