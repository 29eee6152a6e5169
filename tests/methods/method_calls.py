"""Call a merge method the way the engine does (shared by the method tests)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mergeforge.methods import get_method


def call_method(
    name: str,
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    seed: int | None = None,
    **params: Any,
) -> torch.Tensor:
    """Run method ``name`` with every spec parameter: given ones, else the spec default.

    A scalar for a per-model parameter is broadcast to one value per tensor; ``seed`` makes the
    generator of a stochastic method (default 0).
    """
    spec = get_method(name)
    kwargs: dict[str, Any] = {}
    for p in spec.params:
        value = params.pop(p.name, p.default)
        if p.scope == "per_model" and not isinstance(value, tuple):
            value = (value,) * len(tensors)
        kwargs[p.name] = value
    kwargs.update(params)  # extras such as `threshold`
    if spec.stochastic:
        kwargs["generator"] = torch.Generator().manual_seed(0 if seed is None else seed)
    return spec.fn(list(tensors), base, **kwargs)
