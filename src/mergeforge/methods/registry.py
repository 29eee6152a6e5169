"""The merge methods mergeforge knows, as one explicit tuple of specs."""

from __future__ import annotations

from mergeforge.errors import MethodError
from mergeforge.methods.dare import DARE_LINEAR, DARE_TIES
from mergeforge.methods.linear import LINEAR
from mergeforge.methods.spec import MethodSpec
from mergeforge.methods.task_arithmetic import TASK_ARITHMETIC
from mergeforge.methods.ties import TIES

REGISTRY: tuple[MethodSpec, ...] = (
    LINEAR,
    TASK_ARITHMETIC,
    TIES,
    DARE_LINEAR,
    DARE_TIES,
)


def method_names() -> tuple[str, ...]:
    """Names of every registered method, in registry order."""
    return tuple(spec.name for spec in REGISTRY)


def find_method(name: str) -> MethodSpec | None:
    """The spec called ``name``, or ``None``."""
    return next((spec for spec in REGISTRY if spec.name == name), None)


def get_method(name: str) -> MethodSpec:
    """The spec called ``name``; ``MethodError`` listing the known names if there is none."""
    spec = find_method(name)
    if spec is None:
        raise MethodError(
            f"unknown merge method {name!r}; known methods: {', '.join(method_names())}. "
            "Fix `merge_method:` in the recipe (`mergeforge methods` lists them with their "
            "parameters)."
        )
    return spec
