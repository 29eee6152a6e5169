"""WIDEN: merge by weight disentanglement into per-column magnitude and direction.

Reference: Yu, Yu, Yu, Huang, Li 2024, "Extend Model Merging from Fine-Tuned to Pre-Trained Large
Language Models via Weight Disentanglement", arXiv 2408.03092; steps as the official MergeLLM
``widen_merging`` (spec: algorithms.md §25). For K models ``x_t`` over a base ``b``:

2-D weights ``W`` (out × in, as ``nn.Linear``), one score per column ``j`` (input feature)::

    m = ‖W[:, j]‖₂,  D = W[:, j] / m                        for b and every x_t
    Δm_t[j] = |m_t − m_b|,   Δd_t[j] = 1 − cos(D_t[:, j], D_b[:, j])
    S_t[j]  = rank of column j among the n columns of model t (ascending, stable) / n
    score(S)_t[j] = softmax_t(S_·[j]),  set to s where S_t[j] > κ · mean_j S_t[j]
    w_t[j]  = ½ (score(S^m)_t[j] + score(S^d)_t[j])
    out     = b + Σ_t w_t[j] τ_t[:, j]                      τ_t = x_t − b

1-D (and 0-D) tensors: ``S_t = |x_t − b|`` elementwise (raw values, no ranking),
``out = b + Σ_t score(S)_t ⊙ τ_t``. κ = ``above_average_value_ratio``, s =
``score_calibration_value``.

Column axis: the official code transposes ``model.embed_tokens.weight`` (vocab × hidden) so that
its columns are tokens; the method cannot see tensor names, so recipes select that with
``columns: out`` through a parameter filter on the embedding (``columns: in``, the default, is
the ``nn.Linear`` rule). Tensors with more than 2 dims (not handled by the official code, which
asserts 2-D) are viewed as ``(shape[0], -1)``: one column per trailing index.

Zero columns (mergeforge's choice; the official code divides 0/0 into NaN): a zero column has no
direction, so its cosine is taken as 0 — or as 1 when the base column and the model's are both
zero (nothing changed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from mergeforge.errors import MethodError
from mergeforge.methods.primitives import check_inputs
from mergeforge.methods.spec import MethodSpec, ParamSpec

Columns = Literal["in", "out"]


def widen(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    *,
    above_average_value_ratio: float = 1.0,
    score_calibration_value: float = 1.0,
    columns: Columns = "in",
) -> Tensor:
    """WIDEN merge of one tensor (see the module docstring)."""
    if base is None:
        raise MethodError(
            "widen needs a base model: it compares each model's magnitudes and directions with "
            "the base's. Set `base_model:` in the recipe."
        )
    check_inputs("widen", tensors, base)
    if not tensors:
        return base.clone()
    calib = (above_average_value_ratio, score_calibration_value)
    if base.dim() < 2:
        b = base.reshape(-1)  # (n,)
        taus = torch.stack([x.reshape(-1) - b for x in tensors])  # (K, n)
        scores = importance_scores(taus.abs(), *calib)  # (K, n)
        return (taus.mul_(scores).sum(dim=0) + b).view(base.shape)
    b = _matrix(base, columns)  # (r, n)
    mats = [_matrix(x, columns) for x in tensors]  # K × (r, n)
    ref = unit_columns(b)
    mag, direc = zip(*(column_differences(unit_columns(w), ref) for w in mats), strict=True)
    weights = 0.5 * (
        importance_scores(rank_significance(torch.stack(mag)), *calib)
        + importance_scores(rank_significance(torch.stack(direc)), *calib)
    )  # (K, n)
    out = b.clone()  # (r, n)
    for w, col in zip(mats, weights, strict=True):
        out.add_((w - b).mul_(col))  # (r, n)
    return (out.T if columns == "out" else out).reshape(base.shape)


def _matrix(x: Tensor, columns: Columns) -> Tensor:
    """``x`` as a matrix whose columns are WIDEN's columns: ``(shape[0], -1)``, transposed for
    ``columns="out"``."""
    m = x.reshape(x.shape[0], -1)  # (out, in)
    return m.T if columns == "out" else m


def unit_columns(w: Tensor) -> tuple[Tensor, Tensor]:
    """Column norms ``m`` (n,) and directions ``D = w / m`` (r, n) of ``w`` (r, n); a zero
    column keeps direction 0."""
    m = torch.linalg.vector_norm(w, dim=0)  # (n,)
    return m, w / torch.where(m > 0, m, torch.ones_like(m))  # (n,), (r, n)


def column_differences(
    model: tuple[Tensor, Tensor], base: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor]:
    """``(Δm, Δd)`` (n,) each from ``unit_columns`` of a model and of the base:
    ``|m − m_b|`` and ``1 − cos(D, D_b)`` per column (cos = 1 where both columns are zero)."""
    (m, d), (mb, db) = model, base
    cos = torch.cosine_similarity(d, db, dim=0)  # (n,)
    cos = torch.where((m == 0) & (mb == 0), torch.ones_like(cos), cos)  # (n,)
    return (m - mb).abs_(), 1.0 - cos


def rank_significance(diff: Tensor) -> Tensor:
    """Within-model significance (K, n): each entry's position in its row sorted ascending
    (stable: equal values keep column order), divided by n; values in ``[0, 1)``."""
    k, n = diff.shape
    order = torch.argsort(diff, dim=1, stable=True)  # (K, n)
    positions = (torch.arange(n, device=diff.device) / n).expand(k, n)  # (K, n)
    return torch.zeros_like(diff).scatter_(1, order, positions.to(diff.dtype))  # (K, n)


def importance_scores(significance: Tensor, ratio: float, calibration: float) -> Tensor:
    """``softmax`` over models (dim 0) of ``significance`` (K, n), then ``calibration`` where an
    entry exceeds ``ratio`` × its model's mean significance."""
    scores = torch.softmax(significance, dim=0)  # (K, n)
    above = significance > significance.mean(dim=1, keepdim=True) * ratio  # (K, n)
    return scores.masked_fill_(above, calibration)


WIDEN = MethodSpec(
    name="widen",
    fn=widen,
    summary="weight each column of each task vector by how much its magnitude and direction "
    "changed, ranked within the model and softmaxed across models",
    base="required",
    params=(
        ParamSpec(
            "above_average_value_ratio",
            "float",
            "global",
            "κ: an entry whose significance exceeds κ × its model's mean significance gets the "
            "calibration score instead of its softmax score",
            default=1.0,
            low=0.0,
        ),
        ParamSpec(
            "score_calibration_value",
            "float",
            "global",
            "s: the score (task-vector weight) given to above-average entries",
            default=1.0,
        ),
        ParamSpec(
            "columns",
            "str",
            "global",
            "which axis of a 2-D weight holds the columns scored: in = one per input feature "
            "(nn.Linear, out × in); out = one per row (token embeddings; the official code "
            "transposes embed_tokens, so filter this to out there)",
            default="in",
            choices=("in", "out"),
        ),
    ),
    locality="tensor",
    stochastic=False,
    paper="https://arxiv.org/abs/2408.03092",
)
