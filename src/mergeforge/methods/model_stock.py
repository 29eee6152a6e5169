"""Model Stock: move from the base towards the fine-tunes' average by an angle-derived ratio.

Reference: Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models",
arXiv 2403.19522. For a base ``b`` and N ≥ 2 fine-tunes ``x_i`` of one tensor::

    δ_i   = x_i − b                                       offsets
    cos θ = mean over pairs i < j of clamp(<δ_i, δ_j> / max(‖δ_i‖‖δ_j‖, 1e-6), −1, 1)
    t     = N cos θ / (1 + (N − 1) cos θ)                 t = 0 where |1 + (N − 1) cos θ| < 1e-6
    out   = t · mean_i(x_i) + (1 − t) · b

The paper derives t for two models; averaging the pairwise cosines for N > 2 is mergekit's choice,
followed here. With ``filter_wise`` every row (the last axis) gets its own cos θ and t; a 1-D
tensor is one row either way. The guard for the singular denominator (the base is kept) is
mergekit 0.1.5's. Neither the paper nor mergekit clamps t, so negative cosines give t < 0.

Memory: the Gram matrix ``G_ij = <δ_i, δ_j>`` of every row is accumulated over blocks of about
``CHUNK`` elements, so nothing bigger than K blocks and the output is ever held.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from mergeforge.errors import MethodError
from mergeforge.methods import primitives
from mergeforge.methods.primitives import check_inputs
from mergeforge.methods.spec import MethodSpec, ParamSpec

COS_EPS = 1e-6
"""mergekit clamps the product of the offsets' norms to at least this before dividing."""

SINGULAR_EPS = 1e-6
"""mergekit 0.1.5 keeps the base (t = 0) where ``|1 + (N − 1) cos θ|`` is below this."""

Block = tuple[slice, slice]


def model_stock(
    tensors: Sequence[Tensor], base: Tensor | None, *, filter_wise: bool = False
) -> Tensor:
    """Model Stock merge of one tensor (see the module docstring)."""
    if base is None:
        raise MethodError(
            "model_stock needs a base model: it interpolates between the base and the fine-tunes' "
            "average. Set `base_model:` in the recipe."
        )
    if len(tensors) < 2:
        raise MethodError(
            f"model_stock needs at least 2 models besides the base, got {len(tensors)}: the "
            "interpolation ratio comes from the angle between their offsets. Add a fine-tune."
        )
    check_inputs("model_stock", tensors, base)
    b = as_rows(base, filter_wise)  # (R, L)
    xs = [as_rows(x, filter_wise) for x in tensors]  # K × (R, L)
    t = interpolation_ratio(mean_pairwise_cosine(offset_gram(xs, b)), len(xs))  # (R,)
    out = torch.empty_like(b)  # (R, L)
    for rows, cols in row_blocks(*b.shape):
        average = sum(x[rows, cols] for x in xs) / len(xs)  # (r, c)
        tr = t[rows].unsqueeze(1)  # (r, 1)
        out[rows, cols] = tr * average + (1 - tr) * b[rows, cols]
    return out.view(base.shape)


def as_rows(x: Tensor, filter_wise: bool) -> Tensor:
    """``x`` as ``(rows, row length)``: one row per last-axis fiber if ``filter_wise`` (and the
    tensor has ≥ 2 axes), else the whole tensor as a single row."""
    if filter_wise and x.dim() >= 2:
        return x.reshape(-1, x.shape[-1])
    return x.reshape(1, -1)


def row_blocks(n_rows: int, row_len: int) -> Iterator[Block]:
    """``(rows, cols)`` slices covering an ``(n_rows, row_len)`` matrix in blocks of about
    ``primitives.CHUNK`` elements: whole rows when they are short, column chunks of one row
    otherwise."""
    chunk = primitives.CHUNK
    if row_len >= chunk:
        for r in range(n_rows):
            for cols in primitives.chunk_slices(row_len, chunk):
                yield slice(r, r + 1), cols
        return
    step = max(1, chunk // max(row_len, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows)), slice(0, row_len)


def offset_gram(xs: Sequence[Tensor], b: Tensor) -> Tensor:
    """Per-row Gram matrices of the offsets, ``G[r, i, j] = <δ_i[r], δ_j[r]>``, shape (R, K, K).

    Each block is multiplied in float32 and the blocks are summed in float64.
    """
    k = len(xs)
    gram = torch.zeros(b.shape[0], k, k, dtype=torch.float64, device=b.device)  # (R, K, K)
    for rows, cols in row_blocks(*b.shape):
        d = torch.stack([x[rows, cols] - b[rows, cols] for x in xs], dim=1)  # (r, K, c)
        gram[rows] += torch.bmm(d, d.transpose(1, 2)).double()  # (r, K, K)
    return gram


def mean_pairwise_cosine(gram: Tensor) -> Tensor:
    """``cos θ`` per row from Gram matrices (R, K, K): the mean over pairs i < j of the clamped
    cosine ``clamp(G_ij / max(√G_ii √G_jj, 1e-6), −1, 1)`` (mergekit's formula), shape (R,)."""
    norms = gram.diagonal(dim1=1, dim2=2).clamp(min=0).sqrt()  # (R, K)
    i, j = torch.triu_indices(gram.shape[1], gram.shape[2], offset=1, device=gram.device)
    denom = (norms[:, i] * norms[:, j]).clamp(min=COS_EPS)  # (R, pairs)
    cos = (gram[:, i, j] / denom).clamp(-1.0, 1.0)  # (R, pairs)
    return cos.mean(dim=1).float()  # (R,)


def interpolation_ratio(cos_theta: Tensor, n_models: int) -> Tensor:
    """``t = N cos θ / (1 + (N − 1) cos θ)``, and 0 where the denominator is below 1e-6 in size
    (mergekit 0.1.5: no finite estimate there, so the base is kept)."""
    denom = 1 + (n_models - 1) * cos_theta  # (R,)
    singular = denom.abs() < SINGULAR_EPS
    safe = torch.where(singular, torch.ones_like(denom), denom)
    return torch.where(singular, torch.zeros_like(cos_theta), n_models * cos_theta / safe)


MODEL_STOCK = MethodSpec(
    name="model_stock",
    fn=model_stock,
    summary="interpolate from the base to the fine-tunes' average by a ratio from the angle "
    "between their task vectors",
    base="required",
    params=(
        ParamSpec(
            "filter_wise",
            "bool",
            "global",
            "compute the angle and the ratio t per row (last axis) instead of per tensor",
            default=False,
        ),
    ),
    locality="tensor",
    stochastic=False,
    paper="https://arxiv.org/abs/2403.19522",
    min_models=2,
)
