"""The record every fusion algorithm registers (``mergeforge.fusion.registry``).

An algorithm is a frozen config dataclass (validated in ``__post_init__``: a bad value raises
``FusionError`` naming the field, the value and the allowed range) and a
``run(problem, config, *, device="cpu", progress=None)`` function returning a
``StaticResult`` or ``DynamicResult`` (``fusion.results``).
"""

from __future__ import annotations

import re
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
        """``[{name, default, type, doc}]`` of the config's fields, in order; ``doc`` comes from
        the config's docstring (``* ``name``: text`` or ``name: text`` items)."""
        docs = [c.__doc__ or "" for c in self.config.__mro__ if c is not object]
        items = [item for d in docs for item in _doc_items(d)]
        out = []
        for f in fields(self.config):
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            doc = next((text for head, text in items if _names(head, f.name)), "")
            out.append({"name": f.name, "default": f.default, "type": kind, "doc": doc})
        return out

    def to_json(self) -> dict[str, Any]:
        """What ``mergeforge methods --json`` prints for this algorithm."""
        return {
            "name": self.name,
            "category": self.category,
            "summary": self.doc,
            "data": self.data,
            "paper": self.paper,
            "parameters": self.params(),
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


def _doc_items(doc: str) -> list[tuple[str, str]]:
    """``(head, text)`` of every ``* head: text``, ``* head — text`` or ``head: text`` item of a
    docstring (head: names, plain or in double backticks, comma-separated), continuation lines
    joined."""
    items: list[list[str]] = []
    for raw in doc.splitlines():
        line = raw.strip()
        start = _ITEM.match(line)
        if start:
            items.append([start["head"], line[start.end() :].strip()])
        elif items and line:
            items[-1][1] += " " + line
        elif not line and items:
            items.append(["", ""])
    return [(h, t.rstrip(";")) for h, t in items if h]


_NAME = r"(``[A-Za-z_]+``|[a-z_]+)"
_ITEM = re.compile(rf"^(\* )?(?P<head>{_NAME}(, {_NAME})*)(:| —)\s")


def _names(head: str, name: str) -> bool:
    return name in [h.strip().strip("`") for h in head.split(",")]
