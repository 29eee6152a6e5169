"""The record that describes a merge method: its function, parameters and properties.

A method is a pure function ``fn(tensors, base, **params) -> Tensor``:

* ``tensors``: the K non-base input tensors of one output tensor, same shape, float32, in recipe
  order;
* ``base``: the base tensor (float32) or ``None``;
* ``params``: every parameter of the spec. A ``per_model`` parameter arrives as a tuple of K floats
  (or bools), aligned with ``tensors``; a ``global`` one as a scalar;
* stochastic methods also receive ``generator: torch.Generator`` seeded from (seed, tensor name).

The function returns a float32 tensor of the same shape. Casting to the output dtype, I/O and
parameter resolution (gradients, filters) are the engine's job, not the method's.

Engine keywords a method can ask for in ``MethodSpec.engine_kwargs`` (never set by recipes):

* ``tie_break``: how a top-k trim breaks ties (``"mergekit"`` or ``"index"``);
* ``layer``: a ``Layer`` (index of the tensor's transformer block and the model's block count;
  ``index`` is ``None`` for tensors outside the blocks: embeddings, final norm, head);
* ``name``: the output tensor's name (for methods whose rule depends on the kind of tensor).

A method with an ``ArtifactSpec`` whose ``enabled(params)`` is true is called with
``artifacts=True`` and returns ``(merged, {key: tensor})``; the engine saves those tensors beside
the merged model so every input model can be rebuilt (``mergeforge recover``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

ParamKind = Literal["float", "int", "bool", "str"]
Scope = Literal["global", "per_model"]
BaseUse = Literal["required", "optional", "unused"]
Locality = Literal["elementwise", "rowwise", "tensor", "model"]
Category = Literal["data-free", "needs-data", "dynamic"]

MethodFn = Callable[..., torch.Tensor]
ArtifactShapes = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass(frozen=True)
class Layer:
    """Where a tensor sits in the model: its block ``index`` (``None`` outside the blocks) out of
    ``count`` blocks (``None`` when the architecture is unknown)."""

    index: int | None
    count: int | None

    def fraction(self) -> float | None:
        """``index / (count − 1)`` in [0, 1] (0 for a one-block model); ``None`` outside blocks."""
        if self.index is None or self.count is None:
            return None
        return self.index / (self.count - 1) if self.count > 1 else 0.0


@dataclass(frozen=True)
class ArtifactSpec:
    """Tensors a method can save beside its merged model so that each input can be rebuilt.

    * ``enabled(params)``: whether this tensor's resolved parameters ask for artifacts;
    * ``shapes(shape, k, params)``: ``{key: (shape, dtype)}`` of the artifacts of one tensor of
      ``shape`` merged from ``k`` models (known before any tensor is read, so the writer can lay
      out its files in advance);
    * ``recover(artifacts, base, i, params)``: input model ``i``'s tensor (float32) rebuilt from
      one tensor's artifacts and the base tensor (``None`` for methods without a base).
    """

    enabled: Callable[[Mapping[str, object]], bool]
    shapes: Callable[[tuple[int, ...], int, Mapping[str, object]], ArtifactShapes]
    recover: Callable[
        [Mapping[str, torch.Tensor], torch.Tensor | None, int, Mapping[str, object]], torch.Tensor
    ]
    doc: str


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a method.

    ``required`` parameters have no default; ``low``/``high`` bound numeric values (inclusive
    unless ``low_open``/``high_open``); ``choices`` closes a ``str`` parameter.
    """

    name: str
    kind: ParamKind
    scope: Scope
    doc: str
    default: float | int | bool | str | None = None
    required: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()

    def range_text(self) -> str:
        """Human-readable allowed range, e.g. ``(0, 1]`` or ``one of sum, count``."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.kind == "bool":
            return "true or false"
        if self.low is None and self.high is None:
            return "any number"
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        return f"{left}{lo}, {hi}{right}"

    def check(self, value: object) -> str | None:
        """Return a problem description if ``value`` is not allowed, else ``None``."""
        if self.kind == "bool":
            return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
        if self.kind == "str":
            if not isinstance(value, str):
                return f"must be a string, got {value!r}"
            if self.choices and value not in self.choices:
                return f"must be {self.range_text()}, got {value!r}"
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, got {value!r}"
        if self.kind == "int" and not float(value).is_integer():
            return f"must be an integer, got {value!r}"
        v = float(value)
        if math.isnan(v):
            return "must be a number, got NaN"
        below = self.low is not None and (v <= self.low if self.low_open else v < self.low)
        above = self.high is not None and (v >= self.high if self.high_open else v > self.high)
        if below or above:
            return f"must be in {self.range_text()}, got {value!r}"
        return None


@dataclass(frozen=True)
class MethodSpec:
    """Everything the engine, the CLI and the docs need to know about a method."""

    name: str
    fn: MethodFn
    summary: str
    base: BaseUse
    params: tuple[ParamSpec, ...]
    locality: Locality
    stochastic: bool
    paper: str
    category: Category = "data-free"
    min_models: int = 1
    max_models: int | None = None
    engine_kwargs: tuple[str, ...] = ()
    """Keywords the engine supplies besides the parameters (never set by recipes)."""
    check: Callable[[Mapping[str, object]], list[str]] | None = None
    """Problems with a combination of one tensor's resolved parameters (each parameter alone is
    checked against its ParamSpec); the planner reports them before any tensor is read."""
    global_scope: Callable[[tuple[int, ...], int | None], bool] | None = None
    """Which merged tensors (by shape and block index) whole-model statistics cover, for a
    method that changes only some tensors; ``None``: every merged tensor."""
    factor_space: bool = False
    """Meaningful on LoRA factors (acts entry by entry on task vectors), so it may merge adapters
    factor by factor (``mergeforge: {factor_space: true}``)."""
    continual: bool = False
    """Folds the models in one at a time (``merge_continual`` in ``engine.continual`` runs it in
    memory independent of the number of models); ``fn`` is then the per-tensor step."""
    artifacts: ArtifactSpec | None = None
    """What the method can save so each input model can be rebuilt (see ``ArtifactSpec``)."""

    def param(self, name: str) -> ParamSpec | None:
        """The parameter called ``name``, or ``None``."""
        return next((p for p in self.params if p.name == name), None)

    def to_json(self) -> dict[str, object]:
        """Description for ``mergeforge methods --json``."""
        return {
            "name": self.name,
            "summary": self.summary,
            "category": self.category,
            "base_model": self.base,
            "locality": self.locality,
            "stochastic": self.stochastic,
            "paper": self.paper,
            "min_models": self.min_models,
            "max_models": self.max_models,
            "reversible": self.artifacts is not None,
            "continual": self.continual,
            "factor_space": self.factor_space,
            "parameters": [
                {
                    "name": p.name,
                    "scope": p.scope,
                    "type": p.kind,
                    "default": p.default,
                    "required": p.required,
                    "range": p.range_text(),
                    "doc": p.doc,
                }
                for p in self.params
            ],
        }
