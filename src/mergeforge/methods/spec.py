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
