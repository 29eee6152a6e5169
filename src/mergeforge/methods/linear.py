"""Linear merge (weighted average, model soups): ``out = Σ_i w_i x_i``, ``÷ Σ_i w_i`` if normalize.

Reference: Wortsman et al. 2022, "Model soups", arXiv 2203.05482. mergekit 0.1.5 ``linear``:
accumulates ``w_i x_i`` in float32 (``addcmul_``, in recipe order) and divides by the float32 sum
of the weights. The base model plays no special part: in mergekit a ``base_model`` that is not
among ``models`` is appended to the inputs as one more model (its weight comes from the global
``parameters``), so the engine passes it inside ``tensors``; ``base`` is ignored here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mergeforge.errors import MethodError
from mergeforge.methods.primitives import check_inputs
from mergeforge.methods.spec import MethodSpec, ParamSpec


def linear(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    *,
    weight: Sequence[float],
    normalize: bool = True,
) -> Tensor:
    """``Σ_i w_i x_i`` (÷ ``Σ_i w_i`` when ``normalize``); ``base`` is not used.

    mergekit divides by a zero weight sum and writes inf/NaN; here that is a ``MethodError``.
    """
    if not tensors:
        raise MethodError("linear needs at least one input model; add models to the recipe.")
    check_inputs("linear", tensors, None, weight=weight)
    w = torch.tensor(list(weight), dtype=torch.float32)  # (K,)
    out = torch.zeros_like(tensors[0], dtype=torch.float32)  # same shape as the inputs
    for x, wi in zip(tensors, w, strict=True):
        out.addcmul_(x, wi)
    if normalize:
        total = w.sum()
        if total == 0:
            raise MethodError(
                f"linear: the weights {list(weight)} sum to 0, so normalize: true would divide by "
                "zero. Change the weights, or set normalize: false to use them as given."
            )
        out.div_(total)
    return out


LINEAR = MethodSpec(
    name="linear",
    factor_space=True,
    fn=linear,
    summary="weighted average of the models: Σ w_i x_i / Σ w_i (model soups)",
    base="unused",
    params=(
        ParamSpec(
            "weight",
            "float",
            "per_model",
            "coefficient w_i of the model in the average (the base too, when it is an input)",
            required=True,
        ),
        ParamSpec(
            "normalize",
            "bool",
            "global",
            "divide by the sum of the weights (a weighted mean); false gives the plain sum",
            default=True,
        ),
    ),
    locality="elementwise",
    stochastic=False,
    paper="https://arxiv.org/abs/2203.05482",
)
