"""Passthrough: copy one input tensor, optionally scaled — the method of layer stacking.

``out = s · x`` for the single input ``x`` (``s`` = per-model ``scale``, default 1). With a
``slices:`` recipe it builds "frankenmerges" and depth up-scaled models (SOLAR, Kim et al. 2023,
arXiv 2312.15166): output layers are taken from chosen layer ranges of the inputs, unchanged.
mergekit 0.1.5 ``passthrough``: at most one input per output tensor, ``scale`` per model.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from mergeforge.errors import MethodError
from mergeforge.methods.spec import MethodSpec, ParamSpec


def passthrough(
    tensors: Sequence[Tensor], base: Tensor | None, *, scale: Sequence[float]
) -> Tensor:
    """The one input tensor, times its ``scale`` (1 copies it unchanged)."""
    if len(tensors) != 1 or base is not None:
        raise MethodError(
            f"passthrough copies exactly one tensor, got {len(tensors)} input(s)"
            f"{' and a base' if base is not None else ''}; give one source per slice"
        )
    return tensors[0].clone() if scale[0] == 1 else tensors[0] * scale[0]


PASSTHROUGH = MethodSpec(
    name="passthrough",
    fn=passthrough,
    summary="copy the one input (optionally scaled); with `slices:` stacks layers of models",
    base="unused",
    params=(
        ParamSpec(
            "scale",
            "float",
            "per_model",
            "multiply the copied tensor by this factor (e.g. 0.5 on o_proj for a filter)",
            default=1.0,
        ),
    ),
    locality="elementwise",
    stochastic=False,
    paper="https://arxiv.org/abs/2312.15166",
    max_models=1,
)
