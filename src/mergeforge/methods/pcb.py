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

Whole model (``scope: model``, the default): the official code (and the spec, algorithms.md
§16) flatten the whole model into one ``(K, D)`` matrix, so its quantiles and min–max ranges are
model-wide statistics: per model ``lo``/``hi`` (the clip quantiles of ``|τ|``) and ``q_r``/max of
``B``. The engine finds them exactly in streaming passes before the merge (``PCBStats``; the
min–max of the clipped ``|τ̂|`` is ``[lo, hi]`` and that of the clamped ``B`` is
``[q_r, max]``). ``scope: tensor`` computes them over each tensor's ``d`` entries instead (the
same function applied to a one-tensor model; one pass). Consequence of the official index rule on
small tensors: for ``d < 10⁴`` the upper outlier clip is the second-largest ``|τ|`` (the largest
entry is clipped to it) and the lower clip does nothing.

Degenerate ranges (mergeforge's choice; the official code divides 0/0 into NaN): where a model's
row is constant, ``Norm`` gives 0. So a zero task vector contributes nothing and a one-entry
tensor keeps the base (its single entry is both the minimum and the maximum of its row).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mergeforge.errors import MethodError
from mergeforge.methods.gta import LAMBDA, pop_lambda
from mergeforge.methods.primitives import check_inputs
from mergeforge.methods.spec import MethodSpec, ParamSpec

OUTLIER_RATIO = 0.0001
"""Fraction of each row clipped at either end before balancing (official ``min/max_ratio``)."""


@dataclass(frozen=True)
class PCBStats:
    """Whole-model statistics, one value per model: the outlier clip ``lo``/``hi`` of ``|τ|`` and
    the balance cut ``qr`` and maximum ``bmax`` of ``B``."""

    lo: tuple[float, ...]
    hi: tuple[float, ...]
    qr: tuple[float, ...]
    bmax: tuple[float, ...]


def clip_ranks(d: int) -> tuple[int, int]:
    """1-based ranks of the lower and upper outlier clip among ``d`` values (official indices
    ``int(d·1e-4)`` and ``int(d·(1 − 1e-4) − 1)``, limited to the values present)."""
    return _rank(int(d * OUTLIER_RATIO), d), _rank(int(d * (1 - OUTLIER_RATIO) - 1), d)


def cut_rank(d: int, ratio: float) -> int:
    """1-based rank of the balance cut ``q_r`` among ``d`` values (official ``int(d·(1 − r))``)."""
    return _rank(int(d * (1 - ratio)), d)


def _rank(index: int, d: int) -> int:
    return min(max(index, 0), d - 1) + 1


def pcb(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    *,
    ratio: float = 0.1,
    scope: str = "model",
    stats: PCBStats | None = None,
    **extra: float,
) -> Tensor:
    """``b + λ τ_m`` as in the module docstring; ``lambda`` arrives in ``extra``; ``stats``
    (whole-model statistics from the engine's first passes) when ``scope`` is ``model``."""
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
    merged = pcb_task_vector(taus, ratio, stats if scope == "model" else None)  # (d,)
    if lam != 1:
        merged.mul_(lam)
    return merged.add_(b).view(base.shape)


def _column(values: Sequence[float], like: Tensor) -> Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)  # (K, 1)


def clip_bounds(taus: Tensor, stats: PCBStats | None) -> tuple[Tensor, Tensor]:
    """``(lo, hi)`` (K, 1): the whole-model clip, or this tensor's own."""
    if stats is not None:
        return _column(stats.lo, taus), _column(stats.hi, taus)
    lo_r, hi_r = clip_ranks(taus.shape[1])
    mag = taus.abs()
    return (
        torch.kthvalue(mag, lo_r, dim=1, keepdim=True).values,
        torch.kthvalue(mag, hi_r, dim=1, keepdim=True).values,
    )


def balance_scores(taus: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Clipped magnitudes ``|τ̂|`` and balance ``B = B_intra ⊙ B_inter`` (both (K, d))."""
    k = taus.shape[0]
    mag = torch.maximum(torch.minimum(taus.abs(), hi), lo)  # (K, d)
    balance = _unit(mag, lo, hi).square_().mul_(k).exp_()  # (K, d)  B_intra
    return mag, balance.mul_(torch.tanh(taus * taus.sum(dim=0)))  # (K, d)  ⊙ B_inter


def pcb_task_vector(taus: Tensor, ratio: float, stats: PCBStats | None = None) -> Tensor:
    """The balanced mix ``τ_m`` (d,) of stacked task vectors ``taus`` (K, d); steps 1–6, over
    this tensor (``stats`` ``None``) or with whole-model statistics."""
    lo, hi = clip_bounds(taus, stats)
    mag, balance = balance_scores(taus, lo, hi)
    clipped = mag.mul_(torch.sign(taus))  # (K, d)
    if stats is None:
        qr = torch.kthvalue(balance, cut_rank(taus.shape[1], ratio), dim=1, keepdim=True).values
        bmax = balance.amax(dim=1, keepdim=True)  # (K, 1)
    else:
        qr, bmax = _column(stats.qr, taus), _column(stats.bmax, taus)
    keep = _unit(torch.maximum(torch.minimum(balance, bmax), qr), qr, bmax)  # (K, d)
    total = keep.sum(dim=0).clamp_(min=1e-12)  # (d,)
    return (keep * clipped).sum(dim=0).div_(total)  # (d,)


def _unit(x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """``(x − lo) / (hi − lo)`` per row (``lo``, ``hi``: (K, 1)); a zero span gives 0 (the
    official code gives NaN)."""
    span = hi - lo  # (K, 1)
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
    "ratio per model, take the weighted mean",
    base="required",
    params=(
        RATIO,
        LAMBDA,
        ParamSpec(
            "scope",
            "str",
            "global",
            "model: quantiles and min–max ranges over each model's whole task vector, as the "
            "paper (found in extra streaming passes); tensor: over each tensor alone (one pass)",
            default="model",
            choices=("model", "tensor"),
        ),
    ),
    locality="model",
    stochastic=False,
    paper="https://arxiv.org/abs/2410.02396",
)
