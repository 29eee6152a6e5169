"""What fusion algorithms return, so that callers (``mergeforge fuse``, the bench) can keep it.

* :class:`StaticResult` — one set of body weights (Fisher, RegMean, AdaMerging, Concrete): written
  as a normal HF model directory by the same writer as ``mergeforge merge``. Where the result is a
  coefficient per (task, tensor) (AdaMerging), ``coefficients`` holds it so it can be exported as a
  recipe the streaming engine applies to full-size checkpoints.
* :class:`DynamicResult` — a new architecture (WEMoE, SMILE, Twin-Merging): the upscaled module,
  its tensors and a small JSON-able description from which ``rebuild`` (named by ``loader``)
  recreates it on top of a body of the base architecture.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from mergeforge.fusion.data import StateDict


@dataclass(frozen=True)
class StaticResult:
    """Fused body weights, plus what produced them.

    ``coefficients``: ``{task name: {tensor name: λ}}`` when the result is θ0 + Σ_t λ_{t,k} τ_t^k
    (every fused tensor k listed), else ``None``. ``history``: the loss after each step (empty for
    closed-form algorithms). ``info``: JSON-able facts for the model card (data used, steps, ...).
    """

    algorithm: str
    state: StateDict
    coefficients: dict[str, dict[str, float]] | None = None
    history: tuple[float, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DynamicResult:
    """An upscaled model: ``module`` (the body with some submodules replaced), ``tensors`` (every
    tensor needed to rebuild it: ``module.state_dict()``), ``description`` (JSON-able: algorithm,
    config, which submodules were replaced and how) and ``loader`` (the dotted name of the function
    ``rebuild(body, description, tensors) -> nn.Module`` in ``mergeforge.fusion``)."""

    algorithm: str
    module: nn.Module
    tensors: dict[str, Tensor]
    description: dict[str, Any]
    loader: str
    history: tuple[float, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)
