"""The record every fusion algorithm registers (``mergeforge.fusion.registry``).

An algorithm is a frozen config dataclass (validated in ``__post_init__``: a bad value raises
``FusionError`` naming the field, the value and the allowed range) and a
``run(problem, config, *, device="cpu", progress=None)`` function returning a
``StaticResult`` or ``DynamicResult`` (``fusion.results``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Literal

FusionCategory = Literal["needs-data", "dynamic"]


@dataclass(frozen=True)
class FusionSpec:
    """``name`` (recipe/CLI name), ``category``, ``config`` (the frozen dataclass; its fields are
    the algorithm's parameters, each documented in the dataclass docstring), ``run``, ``data``
    (what data it reads, for reports: e.g. ``"unlabeled test inputs (test-time adaptation)"``),
    ``paper`` (arXiv link) and a one-line ``doc``."""

    name: str
    category: FusionCategory
    config: type
    run: Callable[..., Any]
    data: str
    paper: str
    doc: str

    def params(self) -> list[dict[str, Any]]:
        """``[{name, default, type}]`` of the config's fields, in order."""
        out = []
        for f in fields(self.config):
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            out.append({"name": f.name, "default": f.default, "type": kind})
        return out

    def to_json(self) -> dict[str, Any]:
        """What ``mergeforge methods --json`` prints for this algorithm."""
        return {
            "name": self.name,
            "category": self.category,
            "summary": self.doc,
            "data": self.data,
            "paper": self.paper,
            "params": self.params(),
        }

    def make_config(self, params: dict[str, Any]) -> Any:
        """``config(**params)``; ``FusionError`` listing the known parameters for unknown ones."""
        from mergeforge.errors import FusionError

        known = [f.name for f in fields(self.config)]
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise FusionError(
                f"unknown parameter(s) {unknown} for fusion algorithm {self.name!r}; its "
                f"parameters are {known}"
            )
        return self.config(**params)
