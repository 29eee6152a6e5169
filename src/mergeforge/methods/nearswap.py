"""NearSwap: move the base to the other model's value where the two are already close.

Reference: the QuartetAnemoi-70B-t0.0001 model card
(https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001; no paper), as in mergekit 0.1.5
``merge_methods/nearswap.py``. For a base ``a``, one model ``b`` and a distance scale ``t > 0``::

    w   = clamp(t / max(|a − b|, 1e-6), 0, 1)     element-wise
    out = w · b + (1 − w) · a

Entries closer than ``t`` are swapped to ``b`` entirely (w = 1); farther ones move towards ``b``
by ``t / |a − b|``, which shrinks as the models disagree more. Identical entries keep their value.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mergeforge.errors import MethodError
from mergeforge.methods.primitives import check_inputs, chunk_slices
from mergeforge.methods.spec import MethodSpec, ParamSpec

DIFF_EPS = 1e-6
"""mergekit clamps ``|a − b|`` to at least this before dividing."""


def nearswap(tensors: Sequence[Tensor], base: Tensor | None, *, t: float) -> Tensor:
    """NearSwap of one tensor (see the module docstring)."""
    if base is None or len(tensors) != 1:
        raise MethodError(
            "nearswap merges exactly one model into a base: set `base_model:` and list one other "
            f"model (got {len(tensors)} model(s) besides the base"
            f"{'' if base is not None else ' and no base'})."
        )
    check_inputs("nearswap", tensors, base)
    a, b = base.reshape(-1), tensors[0].reshape(-1)  # (n,)
    out = torch.empty_like(a)  # (n,)
    for sl in chunk_slices(a.numel()):
        w = (t / (a[sl] - b[sl]).abs().clamp(min=DIFF_EPS)).clamp(min=0, max=1)  # (c,)
        out[sl] = w * b[sl] + (1 - w) * a[sl]
    return out.view(base.shape)


NEARSWAP = MethodSpec(
    name="nearswap",
    fn=nearswap,
    summary="swap the base's entries to the model's where they differ by less than t, and move "
    "the others towards it by t/|difference|",
    base="required",
    params=(
        ParamSpec(
            "t",
            "float",
            "global",
            "distance scale: entries with |base − model| ≤ t take the model's value, farther "
            "ones move by the fraction t/|base − model|",
            required=True,
            low=0.0,
        ),
    ),
    locality="elementwise",
    stochastic=False,
    paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    min_models=1,
    max_models=1,
)
