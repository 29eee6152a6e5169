"""RAM (Reinforced Agent Merging) and its tensor-local RAM+ variant ``ramplus_tl``.

Reference: Yuan et al. 2026, "Behavior Knowledge Merge in Reinforced Agentic Models",
arXiv 2601.13572. RL fine-tuning changes few parameters, so averaging dilutes an update that only
one model made; RAM keeps such unique updates whole and averages only the shared ones. For a base
``b`` and K models with task vectors ``τ_i = x_i − b``::

    a_i = [|τ_i| > ε]                 active entries;   c = Σ_i a_i   (models touching a position)
    ram:        out = b + Σ_i a_i τ_i ([c = 1] + [c > 1] / c)
    ramplus_tl: ρ_i = #{a_i ∧ c > 1} / max(#{a_i ∧ c = 1}, ε)    counted over the tensor
                λ_i = 1 + r · clamp(ρ_i, 0, α)
                out = b + Σ_i a_i τ_i (λ_i [c = 1] + [c > 1] / c)

Positions no model touches keep the base. RAM+ rescales a model's unique updates more the more
of its updates it shares with other models; ``_tl`` means ρ_i is counted per tensor (mergekit
0.1.5 ``ramplus_tl``, whose formulas these are), not over the whole model. When a model has no
unique entry in the tensor its λ_i multiplies nothing, and is set to 1 here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mergeforge.errors import MethodError
from mergeforge.methods.primitives import check_inputs, chunk_slices, weight_column
from mergeforge.methods.spec import MethodSpec, ParamSpec


def ram(tensors: Sequence[Tensor], base: Tensor | None, *, epsilon: float = 1e-5) -> Tensor:
    """RAM merge of one tensor: unique updates kept, shared ones averaged (module docstring)."""
    return _ram_merge("ram", tensors, base, epsilon, None)


def ramplus_tl(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    *,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
) -> Tensor:
    """RAM+ (tensor-local): unique updates scaled by ``λ_i = 1 + r·clamp(ρ_i, 0, α)``."""
    return _ram_merge("ramplus_tl", tensors, base, epsilon, (r, alpha))


def _ram_merge(
    method: str,
    tensors: Sequence[Tensor],
    base: Tensor | None,
    epsilon: float,
    plus: tuple[float, float] | None,
) -> Tensor:
    if base is None:
        raise MethodError(
            f"{method} needs a base model: it sorts task vectors (differences from the base) into "
            "unique and shared updates. Set `base_model:` in the recipe."
        )
    check_inputs(method, tensors, base)
    if not tensors:
        return base.clone()
    b = base.reshape(-1)  # (n,)
    xs = [x.reshape(-1) for x in tensors]  # K × (n,)
    scales = [1.0] * len(xs) if plus is None else unique_scales(xs, b, epsilon, *plus)
    out = torch.empty_like(b)  # (n,)
    for sl in chunk_slices(b.numel()):
        tv, active, count = active_updates(xs, b, sl, epsilon)  # (K, c), (K, c), (c,)
        tvz = tv * active  # (K, c)
        unique = (tvz * (count == 1)) * weight_column(scales, tvz)  # (K, c)
        merged = (unique + tvz * (count > 1) / count.clamp(min=1)).sum(dim=0)  # (c,)
        torch.add(b[sl], merged, out=out[sl])
    return out.view(base.shape)


def active_updates(
    xs: Sequence[Tensor], b: Tensor, sl: slice, epsilon: float
) -> tuple[Tensor, Tensor, Tensor]:
    """For one chunk: the task vectors ``(K, c)``, the active mask ``|τ| > ε`` ``(K, c)`` and the
    number of active models per position ``(c,)`` (int64)."""
    tv = torch.stack([x[sl] - b[sl] for x in xs])  # (K, c)
    active = tv.abs() > epsilon  # (K, c)
    return tv, active, active.sum(dim=0)


def unique_scales(
    xs: Sequence[Tensor], b: Tensor, epsilon: float, r: float, alpha: float
) -> list[float]:
    """RAM+'s ``λ_i = 1 + r·clamp(ρ_i, 0, α)`` with ``ρ_i`` = shared / unique active entries of
    model i in this tensor (the unique count clamped to at least ε); 1 without unique entries."""
    shared = torch.zeros(len(xs), dtype=torch.int64)  # (K,)
    unique = torch.zeros(len(xs), dtype=torch.int64)  # (K,)
    for sl in chunk_slices(b.numel()):
        _, active, count = active_updates(xs, b, sl, epsilon)
        shared += (active & (count > 1)).sum(dim=1).cpu()
        unique += (active & (count == 1)).sum(dim=1).cpu()
    rho = shared / unique.clamp(min=epsilon) if epsilon > 0 else shared / unique  # (K,) float32
    lam = 1 + r * rho.clamp(min=0, max=alpha)  # (K,)
    return torch.where(unique > 0, lam, torch.ones_like(lam)).tolist()


EPSILON = ParamSpec(
    "epsilon",
    "float",
    "global",
    "an entry of a task vector counts as an update when its magnitude exceeds this",
    default=1e-5,
    low=0.0,
)

RAM = MethodSpec(
    name="ram",
    fn=ram,
    summary="keep updates that only one model made, average those several models made "
    "(for sparse, RL-trained task vectors)",
    base="required",
    params=(EPSILON,),
    locality="elementwise",
    stochastic=False,
    paper="https://arxiv.org/abs/2601.13572",
)

RAMPLUS_TL = MethodSpec(
    name="ramplus_tl",
    fn=ramplus_tl,
    summary="RAM with each model's unique updates scaled up by its share of overlapping "
    "updates, counted per tensor",
    base="required",
    params=(
        ParamSpec(
            "r",
            "float",
            "global",
            "strength of the rescale: λ_i = 1 + r·clamp(ρ_i, 0, α)",
            default=0.1,
            low=0.0,
        ),
        ParamSpec(
            "alpha",
            "float",
            "global",
            "cap α on the overlap ratio ρ_i (shared / unique updates) in the rescale",
            default=0.2,
            low=0.0,
        ),
        EPSILON,
    ),
    locality="tensor",
    stochastic=False,
    paper="https://arxiv.org/abs/2601.13572",
)
