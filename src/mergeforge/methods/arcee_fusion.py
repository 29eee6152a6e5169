"""Arcee Fusion: take the fine-tune's value only where its change from the base is important.

Reference: Arcee AI's ``arcee_fusion`` (https://arcee.ai; no paper), as in mergekit 0.1.5
``merge_methods/arcee_fusion.py``. For a base ``a`` and one model ``b`` (rows along the last axis;
a 1-D tensor is one row)::

    p = softmax(b) + 1e-8,  q = softmax(a) + 1e-8      per row
    I = |b − a| ⊙ KL(p ‖ q),  KL = Σ_row p log(p / q)   importance (one KL per row, broadcast)
    T = Q₂ + 1.5 (Q₃ − Q₁)                              quartiles of I: median + 1.5·IQR
    out = a + [I ≥ T] (b − a)

The quartile Q_q is the element of rank ``floor(q·(m − 1))`` (0-based, ascending) of m values of I.
When the tensor has more than 1,000,000 elements, mergekit takes them from a sample of 10^6
positions drawn with replacement from the global RNG, so its result depends on the order in which
it visits tensors. Here the sample comes from the tensor's own seeded generator: the result is
reproducible per tensor, and equal to mergekit's only in distribution for such tensors; for smaller
tensors no sample is drawn and the results are equal.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mergeforge.errors import MethodError
from mergeforge.methods import primitives
from mergeforge.methods.primitives import check_inputs, chunk_slices
from mergeforge.methods.spec import MethodSpec

SAMPLE_SIZE = 1_000_000
"""Tensors with more elements than this get their quartiles from a sample of this many."""

SOFTMAX_EPS = 1e-8
"""Added to both distributions before the KL divergence (mergekit)."""

QUARTILES = (0.25, 0.5, 0.75)


def arcee_fusion(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Arcee Fusion of one tensor (see the module docstring); ``generator`` draws the quartile
    sample of tensors with more than ``SAMPLE_SIZE`` elements."""
    if base is None or len(tensors) != 1:
        raise MethodError(
            "arcee_fusion merges exactly one model into a base: set `base_model:` and list one "
            f"other model (got {len(tensors)} model(s) besides the base"
            f"{'' if base is not None else ' and no base'})."
        )
    check_inputs("arcee_fusion", tensors, base)
    if base.numel() == 0:
        return base.clone()
    a, b = base.reshape(-1), tensors[0].reshape(-1)  # (n,)
    importance = fusion_importance(tensors[0], base).reshape(-1)  # (n,)
    threshold = iqr_threshold(importance, generator)
    out = torch.empty_like(a)  # (n,)
    for sl in chunk_slices(a.numel()):
        keep = importance[sl] >= threshold  # (c,)
        torch.add(a[sl], (b[sl] - a[sl]) * keep, out=out[sl])
    return out.view(base.shape)


def _rows(x: Tensor) -> Tensor:
    """``x`` as ``(rows, last axis)``; a 0-D or 1-D tensor is a single row."""
    return x.reshape(-1, x.shape[-1]) if x.dim() >= 2 else x.reshape(1, -1)


def fusion_importance(x: Tensor, base: Tensor) -> Tensor:
    """``|x − b| ⊙ KL(softmax(x) + ε ‖ softmax(b) + ε)`` with one KL per row; shape of ``x``.

    Rows are processed in blocks of about ``primitives.CHUNK`` elements (at least one row).
    """
    xr, br = _rows(x), _rows(base)  # (R, L)
    out = torch.empty_like(xr)  # (R, L)
    step = max(1, primitives.CHUNK // max(xr.shape[1], 1))
    for start in range(0, xr.shape[0], step):
        rows = slice(start, start + step)
        p = F.softmax(xr[rows], dim=-1) + SOFTMAX_EPS  # (r, L)
        q = F.softmax(br[rows], dim=-1) + SOFTMAX_EPS  # (r, L)
        kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)  # (r, 1)
        out[rows] = (xr[rows] - br[rows]).abs() * kl
    return out.view(x.shape)


def iqr_threshold(importance: Tensor, generator: torch.Generator | None) -> Tensor:
    """``Q₂ + 1.5 (Q₃ − Q₁)`` of the flattened ``importance`` (a 0-D tensor); quartiles from
    ``SAMPLE_SIZE`` positions drawn with replacement when there are more elements than that."""
    flat = importance.reshape(-1)  # (n,)
    if flat.numel() > SAMPLE_SIZE:
        if generator is None:
            raise MethodError(
                f"arcee_fusion samples {SAMPLE_SIZE} of the {flat.numel()} importance values of a "
                "large tensor and needs a seeded generator; the merge engine supplies one."
            )
        idx = torch.randint(flat.numel(), (SAMPLE_SIZE,), generator=generator, device="cpu")
        flat = flat[idx.to(flat.device)]  # (SAMPLE_SIZE,)
    # ranks floor(q·(m − 1)) computed in float32, as mergekit computes them
    ranks = (torch.tensor(QUARTILES) * (flat.numel() - 1)).long().tolist()
    q1, median, q3 = (torch.kthvalue(flat, r + 1).values for r in ranks)
    return median + 1.5 * (q3 - q1)


ARCEE_FUSION = MethodSpec(
    name="arcee_fusion",
    fn=arcee_fusion,
    summary="take the model's value where its change from the base is an outlier in "
    "importance (|Δ| times the row's KL divergence), keep the base elsewhere",
    base="required",
    params=(),
    locality="tensor",
    stochastic=True,
    paper="https://arcee.ai",
    min_models=1,
    max_models=1,
)
