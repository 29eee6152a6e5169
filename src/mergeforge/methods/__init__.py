"""Per-tensor merge math: pure functions ``fn(tensors, base, **params)`` and their specs."""

from __future__ import annotations

from mergeforge.methods.lines import lines_scale
from mergeforge.methods.registry import REGISTRY, find_method, get_method, method_names
from mergeforge.methods.rng import derive_seed, seeded_generator
from mergeforge.methods.spec import ArtifactSpec, Layer, MethodFn, MethodSpec, ParamSpec

__all__ = [
    "REGISTRY",
    "ArtifactSpec",
    "Layer",
    "MethodFn",
    "MethodSpec",
    "ParamSpec",
    "derive_seed",
    "find_method",
    "get_method",
    "lines_scale",
    "method_names",
    "seeded_generator",
]
